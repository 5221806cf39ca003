"""cli/top.py: `chatbatch top --once` shows the live workers, their queues and the open jobs, read
from Redis with a user that may only read."""

from __future__ import annotations

from pathlib import Path

from chatbatch.settings import Settings
from producer import Client
from tests.conftest import RedisServer, Worker, batch_line, run_cli, user, wait_for

VIEWER_PASSWORD = "viewer-pw-5d1e"


def test_top_once_shows_the_worker_its_model_and_the_running_job(
    tiny_worker: Worker, base_env: dict[str, str], redis_server: RedisServer, tmp_path: Path
) -> None:
    source = tmp_path / "slow.jsonl"
    source.write_text("".join(batch_line(f"s{i}", user(f"long {i}", max_tokens=100, temperature=0.9)) + "\n" for i in range(200)))
    client = Client(Settings(redis_url=redis_server.url))
    handle = client.submit_file(str(source))
    # A Redis user that can run read commands only: `top` must never write.
    redis_server.client().acl_setuser(
        "viewer", enabled=True, passwords=[f"+{VIEWER_PASSWORD}"], keys=["*"], commands=["+@read", "+@connection", "+info"]
    )
    viewer = {**base_env, "CHATBATCH_REDIS_URL": f"redis://viewer:{VIEWER_PASSWORD}@127.0.0.1:{redis_server.port}/0"}
    try:
        wait_for(lambda: handle.status().request_counts.completed > 0, 120, "the job's first answers")
        done = run_cli(viewer, "top", "--once", timeout=60)
        assert done.returncode == 0, done.stderr
        frame = done.stdout
        assert "\x1b" not in frame  # plain text: no colours or cursor moves
        assert f"-{tiny_worker.process.pid}@" in frame and "tiny-llama-chat" in frame
        worker_row = next(line for line in frame.splitlines() if f"-{tiny_worker.process.pid}@" in line)
        assert " cpu " in f" {worker_row} "  # its device
        job_row = next(line for line in frame.splitlines() if handle.id in line)
        assert "in_progress" in job_row and " 200 " in job_row
        queue_row = next(line for line in frame.splitlines() if line.strip().startswith("chatbatch.callbacks"))
        assert queue_row.split()[1:] == ["0", "0", "0"]
    finally:
        handle.cancel()
        redis_server.client().acl_deluser("viewer")
