"""Several worker processes on one machine share a queue."""

from __future__ import annotations

from pathlib import Path

from chatbatch.settings import Settings
from producer import Client
from tests.conftest import RedisServer, Worker, batch_line, user, wait_for

MODEL = "tiny-llama-chat"


def test_two_workers_share_a_queue_and_both_work(tiny_worker: Worker, tiny_model: Path, base_env: dict[str, str], redis_server: RedisServer, tmp_path: Path) -> None:
    second = Worker({**base_env, "CHATBATCH_BATCH_WAIT_MS": "50"}, tmp_path / "second.log", "--model", str(tiny_model), "--hostname", "second@test")
    try:
        second.wait_ready(MODEL, redis_server.client())
        redis = redis_server.client()
        before = {w.process.pid: w.info(redis, MODEL)["requests"] for w in (tiny_worker, second)}
        client = Client(Settings(redis_url=redis_server.url, chunk_size=2))
        source = tmp_path / "in.jsonl"
        source.write_text("\n".join(batch_line(f"w{i}", user(f"share {i}", max_tokens=48, temperature=0.8)) for i in range(80)))
        job = client.submit_file(str(source)).wait(timeout=300)
        assert job.request_counts.completed == 80

        def both_reported() -> dict[int, int] | None:
            served = {w.process.pid: int(w.info(redis, MODEL)["requests"]) - int(before[w.process.pid]) for w in (tiny_worker, second)}  # type: ignore[call-overload]
            return served if sum(served.values()) >= 80 else None

        served = wait_for(both_reported, 30, "heartbeats with the job's requests")
        assert all(count > 0 for count in served.values()), served
        assert sum(served.values()) == 80
    finally:
        second.stop()
