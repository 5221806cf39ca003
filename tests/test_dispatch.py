"""Fair share between jobs (chatbatch/dispatch.py): backlogs, the window, priority, owners and
their weights, and a stopped job's backlog; then, end to end on a worker, a small job of a
second owner and a high-priority job going ahead of a large one."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from chatbatch import keys, registry
from chatbatch.dispatch import Dispatcher, Share, parse_weights, window
from chatbatch.jobs import Jobs
from chatbatch.ledger import Ledger
from chatbatch.settings import Settings
from producer import Client
from tests.conftest import RedisServer, Worker, batch_line, user, wait_for

QUEUE = "chatbatch.model.fair"


@pytest.fixture
def client(aof_redis: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(aof_redis.url)


def _job(jobs: Jobs, job_id: str) -> str:
    assert jobs.create(job_id, input_file="in.jsonl")
    return job_id


def _hold(dispatcher: Dispatcher, job_id: str, chunks: int, share: Share, *, lines: int = 40, created: int = 0) -> None:
    for number in range(chunks):
        payload = json.dumps([{"line": number, "custom_id": f"{job_id}-{number}", "body": {}}] * lines)
        dispatcher.hold(job_id, QUEUE, f"{job_id}-{number}", payload, lines, share, created)


def _turns(dispatcher: Dispatcher, ledger: Ledger, count: int) -> list[str]:
    """The jobs of the next `count` chunks released, finishing the oldest chunk in flight
    before each release after the first (with no live worker, the window of 64 lines holds
    two chunks of 40)."""
    order: list[str] = []
    in_flight: list[tuple[str, str]] = []
    while len(order) < count:
        released = dispatcher.release(QUEUE)
        if not released and not in_flight:
            break
        for job, chunk, _, _ in released:
            order.append(job)
            in_flight.append((job, chunk))
        job, chunk = in_flight.pop(0)
        ledger.forget_chunk(job, chunk)
    return order[:count]


def test_the_window_holds_two_chunks_per_worker_and_twice_their_rows() -> None:
    assert window([]) == (64, 2), "as for one worker of 32 rows"
    assert window([{"engine": {"max_rows": 32}}, {"engine": {"max_rows": 64}}]) == (192, 4)


def test_released_chunks_are_pending_and_the_rest_wait_in_the_backlog(client: redis.Redis) -> None:
    jobs, ledger, dispatcher = Jobs(client, job_ttl=600), Ledger(client, job_ttl=600), Dispatcher(client, job_ttl=600)
    job = _job(jobs, "batch_window")
    _hold(dispatcher, job, 5, Share())
    released = dispatcher.release(QUEUE)
    assert [chunk for _, chunk, _, _ in released] == ["batch_window-0", "batch_window-1"]
    assert json.loads(released[0][3])[0]["custom_id"] == "batch_window-0"
    assert set(ledger.pending(job)) == {"batch_window-0", "batch_window-1"}
    assert ledger.pending(job)["batch_window-0"] == (QUEUE, released[0][3])
    assert dispatcher.backlog(job, [QUEUE]) == 3
    assert dispatcher.release(QUEUE) == [], "the window is full"
    ledger.forget_chunk(job, "batch_window-0")
    assert [chunk for _, chunk, _, _ in dispatcher.release(QUEUE)] == ["batch_window-2"]


def test_answered_lines_leave_the_window_while_their_chunk_is_still_running(client: redis.Redis) -> None:
    """A chunk holds room for the lines it has not answered: one long answer left in a chunk
    does not keep the window full."""
    jobs, ledger, dispatcher = Jobs(client, job_ttl=600), Ledger(client, job_ttl=600), Dispatcher(client, job_ttl=600)
    job = _job(jobs, "batch_answered")
    _hold(dispatcher, job, 5, Share())
    first = dispatcher.release(QUEUE)
    assert len(first) == 2 and dispatcher.release(QUEUE) == [], "two chunks of 40 fill the window of 64"
    sent: list[tuple[str, list[str]]] = []

    def send(name: str, *, args: list[str], **_: object) -> None:
        sent.append((name, args))

    assert dispatcher.answered(QUEUE, job, first[0][1], 8, send) == 0, "72 lines unanswered: still full"
    assert dispatcher.answered(QUEUE, job, first[0][1], 31, send) == 1, "1 + 40 unanswered: room for one chunk"
    assert [args[1] for _, args in sent] == ["batch_answered-2"]
    assert set(ledger.pending(job)) == {"batch_answered-0", "batch_answered-1", "batch_answered-2"}, "chunk 0 runs on"
    # Answers counted twice (two deliveries of a line) never make room the chunk does not have.
    dispatcher.answered(QUEUE, job, first[0][1], 40, send)
    dispatcher.answered(QUEUE, job, first[1][1], 40, send)
    assert len(sent) == 2, "0 + 0 + 40 unanswered: room for one more chunk"
    entry = client.hget(keys.queue_in_flight(QUEUE), f"{job}\t{first[0][1]}")
    assert isinstance(entry, bytes) and entry.startswith(b"0\t"), entry


def test_chunks_held_by_a_worker_that_died_leave_the_window(client: redis.Redis) -> None:
    """A dead worker's chunks wait for the broker to give them back (the visibility timeout):
    meanwhile the live workers get their room."""
    jobs, dispatcher = Jobs(client, job_ttl=600), Dispatcher(client, job_ttl=600)
    registry.heartbeat(client, "fair", "alive@host", {"queues": [QUEUE], "engine": {"max_rows": 20}}, 5.0)
    job = _job(jobs, "batch_dead")
    _hold(dispatcher, job, 6, Share())
    first = dispatcher.release(QUEUE)
    assert len(first) == 2 and dispatcher.release(QUEUE) == []
    dispatcher.started(QUEUE, job, first[0][1], "alive@host")
    assert dispatcher.release(QUEUE) == [], "a live worker's chunk holds its room"
    dispatcher.started(QUEUE, job, first[1][1], "gone@host")
    assert [chunk for _, chunk, _, _ in dispatcher.release(QUEUE)] == ["batch_dead-2"]


def test_a_higher_priority_job_goes_first(client: redis.Redis) -> None:
    jobs, ledger, dispatcher = Jobs(client, job_ttl=600), Ledger(client, job_ttl=600), Dispatcher(client, job_ttl=600)
    _hold(dispatcher, _job(jobs, "low"), 3, Share(priority="low"), created=1)
    _hold(dispatcher, _job(jobs, "normal"), 3, Share(priority="normal"), created=2)
    _hold(dispatcher, _job(jobs, "high"), 3, Share(priority="high"), created=3)
    assert _turns(dispatcher, ledger, 9) == ["high"] * 3 + ["normal"] * 3 + ["low"] * 3


def test_a_second_owners_job_starts_at_once_and_owners_alternate(client: redis.Redis) -> None:
    jobs, ledger, dispatcher = Jobs(client, job_ttl=600), Ledger(client, job_ttl=600), Dispatcher(client, job_ttl=600)
    _hold(dispatcher, _job(jobs, "big"), 20, Share(owner="team-a"), created=1)
    assert [job for job, _, _, _ in dispatcher.release(QUEUE)] == ["big", "big"]
    assert dispatcher.release(QUEUE) == [], "the window is full"
    _hold(dispatcher, _job(jobs, "small"), 3, Share(owner="team-b"), created=2)
    # An owner with nothing in flight gets a chunk at once, beside the window.
    assert [job for job, _, _, _ in dispatcher.release(QUEUE)] == ["small"]
    assert dispatcher.release(QUEUE) == [], "then it waits its turn"
    # Its next chunk comes with the next room: an owner that comes from idle starts at the
    # queue's clock, so it catches up with the chunk in flight, and no more.
    ledger.forget_chunk("big", "big-0")
    ledger.forget_chunk("big", "big-1")
    assert [job for job, _, _, _ in dispatcher.release(QUEUE)] == ["small", "big"]


def test_a_lower_priority_owner_gets_no_chunk_beside_a_full_window(client: redis.Redis) -> None:
    jobs, dispatcher = Jobs(client, job_ttl=600), Dispatcher(client, job_ttl=600)
    _hold(dispatcher, _job(jobs, "urgent"), 5, Share(owner="team-a", priority="high"), created=1)
    assert [job for job, _, _, _ in dispatcher.release(QUEUE)] == ["urgent", "urgent"]
    _hold(dispatcher, _job(jobs, "later"), 3, Share(owner="team-b", priority="low"), created=2)
    assert dispatcher.release(QUEUE) == []


def test_an_owners_weight_is_its_share_of_the_lines(client: redis.Redis) -> None:
    jobs, ledger, dispatcher = Jobs(client, job_ttl=600), Ledger(client, job_ttl=600), Dispatcher(client, job_ttl=600)
    weights = parse_weights("gold=2, bronze=1")
    _hold(dispatcher, _job(jobs, "gold-job"), 40, Share(owner="gold", weight=weights["gold"]), created=1)
    _hold(dispatcher, _job(jobs, "bronze-job"), 40, Share(owner="bronze", weight=weights["bronze"]), created=1)
    turns = _turns(dispatcher, ledger, 30)
    assert turns.count("gold-job") == 20 and turns.count("bronze-job") == 10
    with pytest.raises(ValueError, match="owner=weight"):
        parse_weights("gold=0")


def test_an_owners_jobs_take_turns(client: redis.Redis) -> None:
    jobs, ledger, dispatcher = Jobs(client, job_ttl=600), Ledger(client, job_ttl=600), Dispatcher(client, job_ttl=600)
    _hold(dispatcher, _job(jobs, "first"), 10, Share(), created=1)
    _hold(dispatcher, _job(jobs, "second"), 10, Share(), created=2)
    turns = _turns(dispatcher, ledger, 8)
    assert turns.count("first") == 4 and turns.count("second") == 4


def test_a_cancelled_jobs_backlog_is_dropped_at_once(client: redis.Redis) -> None:
    jobs, ledger, dispatcher = Jobs(client, job_ttl=600), Ledger(client, job_ttl=600), Dispatcher(client, job_ttl=600)
    job = _job(jobs, "batch_cancelled")
    jobs.add_inputs(job, {n: f"c{n}" for n in range(40)}, queues={QUEUE})
    _hold(dispatcher, job, 10, Share())
    jobs.start(job)
    dispatcher.release(QUEUE)
    jobs.cancel(job)
    assert dispatcher.backlog(job, [QUEUE]) == 0
    assert not client.hexists(keys.queue_backlogged(QUEUE), job)
    assert dispatcher.release(QUEUE) == []
    assert len(ledger.pending(job)) == 2, "the chunks released before the cancel close their lines when they run"
    assert jobs.get(job).request_counts.failed == 40


def test_a_job_that_ended_without_a_close_leaves_the_window(client: redis.Redis) -> None:
    jobs, dispatcher = Jobs(client, job_ttl=600), Dispatcher(client, job_ttl=600)
    gone = _job(jobs, "batch_gone")
    _hold(dispatcher, gone, 4, Share(priority="high"))
    client.hset(keys.job(gone), "status", "failed")
    _hold(dispatcher, _job(jobs, "batch_alive"), 4, Share())
    assert {job for job, _, _, _ in dispatcher.release(QUEUE)} == {"batch_alive"}
    assert dispatcher.backlog(gone, [QUEUE]) == 0


# End to end, on a worker whose window is small (rows of 4: 8 lines, and two chunks).


@pytest.fixture(scope="module")
def narrow_worker(tiny_model: Path, base_env: dict[str, str], redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    env = {**base_env, "CHATBATCH_MAX_BATCH_SIZE": "4", "CHATBATCH_BATCH_WAIT_MS": "0"}
    queue = "chatbatch.model.narrow"
    worker = Worker(env, tmp_path_factory.mktemp("logs") / "narrow.log", "--model", str(tiny_model),
                    "--served-model-name", "narrow", "--queue", queue)
    try:
        worker.wait_ready("narrow", redis_server.client())
        yield worker
    finally:
        worker.stop()


def _file(path: Path, lines: int, max_tokens: int) -> str:
    path.write_text("\n".join(batch_line(f"l{i}", user(f"line {i}", model="narrow", max_tokens=max_tokens, temperature=0)) for i in range(lines)) + "\n")
    return str(path)


def test_a_second_owners_small_job_ends_while_a_large_job_runs(narrow_worker: Worker, redis_server: RedisServer, tmp_path: Path) -> None:
    client = Client(Settings(redis_url=redis_server.url, chunk_size=4))
    large = client.submit_file(_file(tmp_path / "large.jsonl", 800, 6), owner="team-a")
    wait_for(lambda: large.status().request_counts.completed > 0, 60, "the large job's first answers")
    small = client.submit_file(_file(tmp_path / "small.jsonl", 12, 6), owner="team-b")
    done = small.wait(timeout=120)
    assert done.status.value == "completed" and done.request_counts.completed == 12
    big = large.status()
    assert big.status.value == "in_progress"
    assert big.request_counts.completed < 400, "the small job ran beside the large one, not after it"
    client.cancel(large.id)


def test_a_high_priority_job_overtakes_a_normal_one(narrow_worker: Worker, redis_server: RedisServer, tmp_path: Path) -> None:
    client = Client(Settings(redis_url=redis_server.url, chunk_size=4))
    normal = client.submit_file(_file(tmp_path / "normal.jsonl", 200, 6), owner="same")
    wait_for(lambda: normal.status().request_counts.completed > 0, 60, "the normal job's first answers")
    urgent = client.submit_file(_file(tmp_path / "urgent.jsonl", 40, 6), owner="same", priority="high")
    assert urgent.status().priority == "high"
    done = urgent.wait(timeout=120)
    assert done.status.value == "completed" and done.request_counts.completed == 40
    behind = normal.status()
    assert behind.status.value == "in_progress" and behind.request_counts.completed < 100
    finished = normal.wait(timeout=300)
    assert finished.status.value == "completed" and finished.request_counts.completed == 200
    assert finished.completed_at >= done.completed_at  # type: ignore[operator]
    # Nothing is left behind in the queue's window or backlog.
    r = redis_server.client()
    wait_for(lambda: not r.hlen(keys.queue_backlogged("chatbatch.model.narrow")), 10, "the backlog to empty")
    wait_for(lambda: not r.hlen(keys.queue_in_flight("chatbatch.model.narrow")) or not client.dispatcher.release("chatbatch.model.narrow"), 10, "the window to empty")


def test_a_worker_sweep_releases_chunks_nobody_released(narrow_worker: Worker, redis_server: RedisServer) -> None:
    """Chunks held with no release after them (their producer died right after holding them)
    are released by the sweep of a worker that consumes their queue."""
    client = Client(Settings(redis_url=redis_server.url))
    job_id = "batch_unreleased"
    assert client.jobs.create(job_id, input_file="held.jsonl")
    queue = "chatbatch.model.narrow"
    items = [{"line": n, "custom_id": f"h{n}", "body": user(f"held {n}", model="narrow", max_tokens=3)} for n in range(1, 7)]
    client.jobs.add_inputs(job_id, {n: f"h{n}" for n in range(1, 7)}, queues={queue})
    for start in (0, 3):
        client.dispatcher.hold(job_id, queue, f"held-{start}", json.dumps(items[start : start + 3]), 3, Share(), 0)
    client.jobs.finish_enqueueing(job_id, len(items))
    job = client.job(job_id).wait(timeout=60)
    assert job.status.value == "completed" and job.request_counts.completed == 6
