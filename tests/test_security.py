"""Redis with a password, and no secret in any log or message."""

from __future__ import annotations

import uuid
from pathlib import Path

from schemas import ChatCompletion
from tests.conftest import S3Server, Worker, batch_line, run_cli, start_redis, user

PASSWORD = "Redis-Pw-7f3c9e"
AWS_SECRET = "Aws-Secret-Key-51d2b8"


def test_password_redis_works_and_secrets_never_leak(base_env: dict[str, str], tiny_model: Path, s3_server: S3Server, tmp_path: Path) -> None:
    server = start_redis(tmp_path / "redis", "--requirepass", PASSWORD)
    try:
        url = f"redis://:{PASSWORD}@127.0.0.1:{server.port}/0"
        env = {**base_env, "CHATBATCH_REDIS_URL": url, "AWS_SECRET_ACCESS_KEY": AWS_SECRET}
        outputs: list[str] = []

        # Without the password, or with a wrong one: a clear refusal that shows no secret.
        for bad in (f"redis://127.0.0.1:{server.port}/0", f"redis://:wrong-{PASSWORD}@127.0.0.1:{server.port}/0"):
            done = run_cli({**env, "CHATBATCH_REDIS_URL": bad}, "chat", "hi", timeout=60)
            outputs += [done.stdout, done.stderr]
            assert done.returncode == 2, done.stderr
            assert "Redis" in done.stderr and "Traceback" not in done.stderr

        worker = Worker(env, tmp_path / "worker.log", "--model", str(tiny_model))
        try:
            from redis import Redis

            worker.wait_ready("tiny-llama-chat", Redis.from_url(url))
            done = run_cli(env, "chat", "--max-tokens", "3", "hello")
            outputs += [done.stdout, done.stderr]
            assert done.returncode == 0, done.stderr
            ChatCompletion.model_validate_json(done.stdout)

            bucket = f"b-{uuid.uuid4().hex[:8]}"
            s3_server.client().create_bucket(Bucket=bucket)
            source = tmp_path / "in.jsonl"
            source.write_text("\n".join(batch_line(f"s{i}", user("x", max_tokens=2)) for i in range(5)))
            done = run_cli(env, "submit", str(source), "--wait", "--output", f"s3://{bucket}/out.jsonl", "--errors", "s3://no-such-bucket-x/err.jsonl")
            outputs += [done.stdout, done.stderr]
            assert done.returncode == 1 and "no-such-bucket-x" in done.stderr
            status = run_cli(env, "status", done.stdout.strip())
            outputs += [status.stdout, status.stderr]
        finally:
            worker.stop()
        logs = worker.output()
        assert "ready" in logs
        for text in [logs, *outputs]:
            assert PASSWORD not in text
            assert AWS_SECRET not in text
    finally:
        server.process.terminate()
        server.process.wait(10)
