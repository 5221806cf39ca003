"""Queue names and the order a worker takes from its queues (chatbatch/queues.py): single
requests before batch chunks that were queued first."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from chatbatch.queues import CALLBACK_QUEUE, DEFAULT_QUEUE, live_queue, model_queue, worker_queues
from chatbatch.settings import Settings
from producer import Client
from tests.conftest import RedisServer, Worker, batch_line, user, wait_for


def test_single_requests_have_a_queue_of_their_own_beside_each_models_queue() -> None:
    assert live_queue(model_queue("org/model")) == "chatbatch.live.org/model"
    assert live_queue(DEFAULT_QUEUE) == DEFAULT_QUEUE
    assert live_queue("my-own-queue") == "my-own-queue"
    assert worker_queues([model_queue("m"), DEFAULT_QUEUE]) == [
        "chatbatch.live.m", CALLBACK_QUEUE, "chatbatch.model.m", DEFAULT_QUEUE,
    ]
    assert worker_queues(["mine"]) == [CALLBACK_QUEUE, "mine"]


@pytest.fixture(scope="module")
def one_thread_worker(tiny_model: Path, base_env: dict[str, str], redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    worker = Worker(base_env, tmp_path_factory.mktemp("logs") / "one-thread.log", "--model", str(tiny_model),
                    "--served-model-name", "one-thread", "--queue", model_queue("one-thread"), "--concurrency", "1")
    try:
        worker.wait_ready("one-thread", redis_server.client())
        yield worker
    finally:
        worker.stop()


def test_a_worker_takes_single_requests_before_the_chunks_queued_ahead_of_them(
    one_thread_worker: Worker, redis_server: RedisServer, tmp_path: Path
) -> None:
    client = Client(Settings(redis_url=redis_server.url, chunk_size=2))
    source = tmp_path / "slow.jsonl"
    source.write_text("\n".join(batch_line(f"s{i}", user(f"slow {i}", model="one-thread", max_tokens=200, temperature=0)) for i in range(8)) + "\n")
    # Everything is queued while the worker is stopped: its one task thread then finds four
    # chunks and, behind them, three single requests.
    os.killpg(one_thread_worker.process.pid, signal.SIGSTOP)
    try:
        job = client.submit_file(str(source))
        singles = [client.submit(user(f"quick {i}", model="one-thread", max_tokens=4)) for i in range(3)]
    finally:
        os.killpg(one_thread_worker.process.pid, signal.SIGCONT)
    answered_at: dict[str, int] = {}

    def all_answered() -> bool:
        completed = job.status().request_counts.completed
        for handle in singles:
            if handle.id not in answered_at and client.requests.answered(handle.id):
                answered_at[handle.id] = completed
        return len(answered_at) == len(singles)

    wait_for(all_answered, 120, "the single requests' answers", interval=0.01)
    # The chunk the worker had taken before it stopped may run first; no other chunk does.
    assert max(answered_at.values()) <= 2, answered_at
    assert job.wait(timeout=120).request_counts.completed == 8
