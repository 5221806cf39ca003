"""chatbatch/logs.py: the one log handler of every process, its JSON and text formats, the ids of
the request, job and chunk on each line, and secrets kept out of both formats."""

from __future__ import annotations

import contextvars
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from chatbatch.logs import MASK, Redactor, known_secrets, log_context, set_log_ids, setup_logging
from chatbatch.settings import Settings
from tests.conftest import Worker, batch_line, run_cli, start_redis, user

PASSWORD = "pw-7Hq2x9Zk"
API_KEY = "sk-live-key-41c8"


def test_redactor_masks_url_passwords_presigned_queries_and_known_secrets() -> None:
    settings = Settings(
        redis_url=f"rediss://chatbatch:{PASSWORD}@redis.internal:6380/2", api_keys=f"{API_KEY}, other-key-9f", callback_secret="whsec-abc123"
    )
    redact = Redactor(known_secrets(settings))
    cases = {
        f"Connected to redis://:{PASSWORD}@10.0.0.1:6379/0": f"Connected to redis://:{MASK}@10.0.0.1:6379/0",
        f"url rediss://chatbatch:{PASSWORD}@redis.internal:6380/2 down": f"url rediss://chatbatch:{MASK}@redis.internal:6380/2 down",
        "redis://user:other-pw@host/0": f"redis://user:{MASK}@host/0",
        f"bearer {API_KEY} refused": f"bearer {MASK} refused",
        "signed with whsec-abc123": f"signed with {MASK}",
        "other-key-9f": MASK,
        # The password alone (in an error message that quotes it) is a known value too.
        f"AUTH {PASSWORD} failed": f"AUTH {MASK} failed",
        "GET https://bucket.s3.amazonaws.com/out.jsonl?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F20240101"
        "&X-Amz-Signature=abcdef0123 failed": f"GET https://bucket.s3.amazonaws.com/out.jsonl?{MASK} failed",
        "https://s3.example.com/b/k?AWSAccessKeyId=AKIA1&Signature=xyz&Expires=1": f"https://s3.example.com/b/k?{MASK}",
        "query X-Amz-Signature=abc123&X-Amz-Credential=AKIA2": f"query X-Amz-Signature={MASK}&X-Amz-Credential={MASK}",
    }
    for raw, expected in cases.items():
        assert redact(raw) == expected
    # What is not a secret stays as it is.
    for plain in ("redis://127.0.0.1:6379/0", "https://example.com/cb?job=batch_1&attempt=2", "job batch_1 chunk c-1: 3 answered"):
        assert redact(plain) == plain


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger whose records reach chatbatch's handler, writing into a buffer; the root
    logger is restored afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    buffer = io.StringIO()
    yield logging.getLogger("chatbatch.test"), buffer
    root.handlers[:] = handlers
    root.setLevel(level)


def _install(settings: Settings, buffer: io.StringIO) -> None:
    handler = setup_logging(settings, "INFO")
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(buffer)


def test_json_lines_carry_ids_and_a_redacted_traceback(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, buffer = captured
    _install(Settings(redis_url=f"redis://:{PASSWORD}@127.0.0.1:6379/0", log_format="json"), buffer)
    with log_context(job_id="batch_1", chunk="c-2"):
        logger.info("chunk %s of %s", "c-2", "batch_1")
        try:
            raise ConnectionError(f"Error connecting to redis://:{PASSWORD}@127.0.0.1:6379/0")
        except ConnectionError:
            logger.warning("write failed", exc_info=True)
    logger.info("outside")
    lines = [json.loads(line) for line in buffer.getvalue().splitlines()]
    assert [line["message"] for line in lines] == ["chunk c-2 of batch_1", "write failed", "outside"]
    first, failed, outside = lines
    assert {"time", "level", "logger", "message"} <= set(first)
    assert first["time"].endswith("Z") and first["level"] == "INFO" and first["logger"] == "chatbatch.test"
    assert first["job_id"] == "batch_1" and first["chunk"] == "c-2" and "request_id" not in first
    assert "ConnectionError" in failed["exc_info"] and f":{MASK}@" in failed["exc_info"]
    assert "job_id" not in outside
    assert PASSWORD not in buffer.getvalue()


def test_text_lines_name_the_request_and_hide_secrets(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, buffer = captured
    _install(Settings(api_keys=API_KEY), buffer)
    with log_context(request_id="chatcmpl-1"):
        logger.info("refused key %s", API_KEY)
    text = buffer.getvalue()
    assert text.rstrip().endswith(f"INFO chatbatch.test: refused key {MASK} [request_id=chatcmpl-1]")
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_a_log_call_whose_arguments_do_not_fit_never_raises(captured: tuple[logging.Logger, io.StringIO]) -> None:
    """The engine thread logs too: a malformed call is logged as it is, not raised."""
    logger, buffer = captured
    _install(Settings(log_format="json"), buffer)
    root = logging.getLogger()
    root.handlers[:] = [handler for handler in root.handlers if getattr(handler, "stream", None) is buffer]
    logger.info("tokens %d", "many")
    (line,) = [json.loads(raw) for raw in buffer.getvalue().splitlines()]
    assert "tokens %d" in line["message"] and "many" in line["message"]


def test_ids_set_in_a_request_context_stay_in_it(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, buffer = captured
    _install(Settings(log_format="json"), buffer)

    def handler() -> None:  # as the gateway's request handlers do, each in a context of its own
        set_log_ids(job_id="batch_9")
        logger.info("inside")

    contextvars.copy_context().run(handler)
    logger.info("after")
    inside, after = (json.loads(line) for line in buffer.getvalue().splitlines())
    assert inside["job_id"] == "batch_9" and "job_id" not in after


def _job_file(path: Path, lines: int) -> Path:
    path.write_text("".join(batch_line(f"l{i}", user(f"hello {i}", max_tokens=4)) + "\n" for i in range(lines)))
    return path


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_worker_log_with_a_password_in_the_redis_url(
    log_format: str, tiny_model: Path, base_env: dict[str, str], tmp_path: Path
) -> None:
    server = start_redis(tmp_path / "redis", "--requirepass", PASSWORD)
    url = f"redis://:{PASSWORD}@127.0.0.1:{server.port}/0"
    env = {**base_env, "CHATBATCH_REDIS_URL": url, "CHATBATCH_LOG_FORMAT": log_format, "CHATBATCH_API_KEYS": API_KEY}
    worker = Worker(env, tmp_path / "worker.log", "--model", str(tiny_model))
    try:
        worker.wait_ready("tiny-llama-chat", redis.Redis.from_url(url))
        done = run_cli(env, "submit", str(_job_file(tmp_path / "in.jsonl", 3)), "--wait", timeout=120)
        assert done.returncode == 0, done.stderr
        job_id = done.stdout.strip()
    finally:
        worker.stop()
        server.process.terminate()
        server.process.wait(10)
    output = worker.output()
    assert PASSWORD not in output and API_KEY not in output
    assert PASSWORD not in done.stderr
    if log_format == "text":
        assert f"[job_id={job_id} chunk=" in output
        assert f"transport:   redis://:**@127.0.0.1:{server.port}/0" in output  # Celery's banner, masked
        return
    lines = [json.loads(line) for line in output.splitlines()]
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    assert any(line["logger"].startswith("celery.") for line in lines)  # Celery's records too
    ours = [line for line in lines if line.get("job_id") == job_id]
    assert ours and all(line.get("chunk") for line in ours)
