"""Several worker processes on one machine share a queue."""

from __future__ import annotations

from pathlib import Path

from chatbatch.settings import Settings
from producer import Client
from tests.conftest import ROOT, RedisServer, Worker, batch_line, user, wait_for

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


def test_a_worker_whose_engine_dies_exits_and_its_request_is_answered_elsewhere(aof_redis: RedisServer, base_env: dict[str, str], tiny_model: Path, tmp_path: Path) -> None:
    """The engine thread ends on an error no request handling catches: the worker leaves the
    registry and exits non-zero at once (it never hangs looking alive), without acknowledging
    its task, which another worker answers after the visibility timeout."""
    import mlflow

    from chatbatch.registry import live_models
    from worker.service.main import EXIT_ENGINE_DIED

    model = tmp_path / "exiting"
    mlflow.pyfunc.save_model(str(model), python_model=str(ROOT / "tests" / "data" / "exiting_chat_model.py"), pip_requirements=["mlflow"])
    env = {**base_env, "CHATBATCH_REDIS_URL": aof_redis.url, "CHATBATCH_VISIBILITY_TIMEOUT": "3", "CHATBATCH_HEARTBEAT_INTERVAL": "1"}
    r = aof_redis.client()
    doomed = Worker(env, tmp_path / "doomed.log", "--model", str(model), "--served-model-name", "exiting")
    doomed.wait_ready("exiting", r)
    client = Client(Settings(redis_url=aof_redis.url))
    handle = client.submit(user("EXIT now", max_tokens=2))
    try:
        assert doomed.process.wait(60) == EXIT_ENGINE_DIED, doomed.output()[-3000:]
    finally:
        doomed.stop()
    assert "the engine thread stopped on an error" in doomed.output()
    assert not any(w["pid"] == doomed.process.pid for w in live_models(r).get("exiting", [])), "its heartbeat is gone"
    assert not handle.done(), "nothing was answered for it"
    rescuer = Worker(env, tmp_path / "rescuer.log", "--model", str(tiny_model))
    try:
        rescuer.wait_ready(MODEL, r)
        assert handle.result(timeout=120).model == MODEL
    finally:
        rescuer.stop()
