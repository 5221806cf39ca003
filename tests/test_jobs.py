"""The job lifecycle: the OpenAI Batch object, cancel, expiry, resume after a killed producer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis

from chatbatch import keys
from chatbatch.jobs import Jobs
from chatbatch.settings import Settings
from producer import Client
from schemas import BatchJob, BatchRequestOutput, ErrorCode, JobStatus
from tests.conftest import (
    CHATBATCH,
    ROOT,
    RedisServer,
    S3Server,
    Worker,
    batch_line,
    last_event,
    run_cli,
    user,
    wait_for,
)

# The OpenAI Batch object's fields (input/output/error files named as in chatbatch's contract).
BATCH_FIELDS = {
    "id", "object", "endpoint", "errors", "input_file", "completion_window", "status",
    "output_file", "error_file", "created_at", "in_progress_at", "expires_at", "finalizing_at",
    "completed_at", "failed_at", "expired_at", "cancelling_at", "cancelled_at",
    "request_counts", "metadata", "input_file_id", "output_file_id", "error_file_id", "model", "usage",
}
# chatbatch's own additions: the state of a callback the job named (HTTP API), its priority.
CHATBATCH_FIELDS = {"callback", "priority"}


def _slow_file(path: Path, lines: int, max_tokens: int = 200) -> Path:
    path.write_text("\n".join(batch_line(f"s{i}", user(f"long {i}", max_tokens=max_tokens, temperature=0.9)) for i in range(lines)) + "\n")
    return path


def _all_lines(client: Client, job_id: str) -> list[tuple[str, BatchRequestOutput]]:
    return [(kind, BatchRequestOutput.model_validate_json(line)) for kind, line in client.job(job_id).lines()]


def _assert_each_line_once(client: Client, job: BatchJob, expected_ids: list[str]) -> list[tuple[str, BatchRequestOutput]]:
    lines = _all_lines(client, job.id)
    assert sorted(line.custom_id for _, line in lines) == sorted(expected_ids)  # type: ignore[type-var]
    counts = job.request_counts
    assert counts.total == len(expected_ids)
    assert counts.completed == sum(kind == "output" for kind, _ in lines)
    assert counts.failed == sum(kind == "error" for kind, _ in lines)
    assert counts.completed + counts.failed == counts.total
    return lines


def test_job_record_fields_and_transitions(tiny_worker: Worker, redis_server: RedisServer, tmp_path: Path) -> None:
    client = Client(Settings(redis_url=redis_server.url, chunk_size=4))
    handle = client.submit_file(str(_slow_file(tmp_path / "in.jsonl", 24, max_tokens=40)), metadata={"purpose": "lifecycle"})
    seen: list[str] = []
    record = handle.wait(timeout=120, poll=0.01, on_progress=lambda job: seen.append(job.status.value))
    statuses = [s for i, s in enumerate(seen) if i == 0 or seen[i - 1] != s]
    order = ["validating", "in_progress", "finalizing", "completed"]
    assert statuses == [s for s in order if s in statuses], statuses
    assert statuses[-1] == "completed"
    data = record.model_dump()
    assert set(data) == BATCH_FIELDS | CHATBATCH_FIELDS
    assert data["object"] == "batch" and data["endpoint"] == "/v1/chat/completions"
    assert data["completion_window"] == "24h"
    assert data["expires_at"] == data["created_at"] + 86_400
    assert data["created_at"] <= data["in_progress_at"] <= data["finalizing_at"] <= data["completed_at"]
    assert data["request_counts"] == {"total": 24, "completed": 24, "failed": 0}
    assert data["metadata"] == {"purpose": "lifecycle"}
    for unset in ("failed_at", "expired_at", "cancelling_at", "cancelled_at", "callback"):
        assert data[unset] is None


def test_cancel_a_running_job(tiny_worker: Worker, redis_server: RedisServer, base_env: dict[str, str], tmp_path: Path) -> None:
    client = Client(Settings(redis_url=redis_server.url, chunk_size=8))
    ids = [f"s{i}" for i in range(2000)]  # far more than the tiny model finishes in the seconds the test leaves it
    handle = client.submit_file(str(_slow_file(tmp_path / "in.jsonl", len(ids))))
    wait_for(lambda: handle.status().request_counts.completed > 0, 60, "the first answers")
    started = time.monotonic()
    done = run_cli(base_env, "cancel", handle.id)
    assert done.returncode == 0, done.stderr
    job = handle.wait(timeout=30)
    assert time.monotonic() - started < 15
    assert job.status.value == "cancelled"
    assert job.cancelling_at is not None and job.cancelled_at is not None
    lines = _assert_each_line_once(client, job, ids)
    cancelled = [line for kind, line in lines if kind == "error"]
    assert cancelled and all(line.error and line.error.code is ErrorCode.cancelled for line in cancelled)
    assert any(kind == "output" for kind, _ in lines)
    # Chunks still queued when the job was cancelled are closed without running: once the
    # worker has taken every one of them, the counts are still those of the cancel.
    r = redis_server.client()
    wait_for(lambda: not r.llen("chatbatch") and not r.hlen(keys.job_pending(job.id)), 60, "the job's queued chunks to be taken")
    assert handle.status().request_counts == job.request_counts
    status = run_cli(base_env, "submit", str(tmp_path / "in.jsonl"), "--job-id", job.id, "--wait")
    assert status.returncode == 1 and "cancelled" in status.stderr


def test_expired_job_keeps_finished_lines(tiny_worker: Worker, redis_server: RedisServer, tmp_path: Path) -> None:
    client = Client(Settings(redis_url=redis_server.url, chunk_size=8))
    ids = [f"s{i}" for i in range(2000)]  # far more than the tiny model finishes in the seconds the test leaves it
    source = _slow_file(tmp_path / "in.jsonl", len(ids))
    slow = source.read_text().splitlines()
    quick = [batch_line(f"s{i}", user("quick", max_tokens=2)) for i in range(8)]  # the first chunk finishes in time
    source.write_text("\n".join(quick + slow[8:]) + "\n")
    handle = client.submit_file(str(source), completion_window="3s")
    job = handle.wait(timeout=60)
    assert job.status.value == "expired"
    assert job.expired_at is not None and job.expired_at >= job.expires_at  # type: ignore[operator]
    lines = _assert_each_line_once(client, job, ids)
    kinds = {kind for kind, _ in lines}
    assert kinds == {"output", "error"}, "finished lines are delivered, the rest expired"
    assert all(line.error.code is ErrorCode.expired for kind, line in lines if kind == "error" and line.error)


def test_resume_after_the_producer_is_killed_while_enqueueing(tiny_worker: Worker, redis_server: RedisServer, base_env: dict[str, str], tmp_path: Path) -> None:
    source = tmp_path / "big.jsonl"
    ids = [f"k{i}" for i in range(3000)]
    source.write_text("\n".join(batch_line(cid, user("x", max_tokens=1)) for cid in ids) + "\n")
    job_id = "batch_killed_producer"
    env = {**base_env, "CHATBATCH_CHUNK_SIZE": "1"}
    producer = subprocess.Popen([*CHATBATCH, "submit", str(source), "--job-id", job_id], env=env, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    r = redis_server.client()
    wait_for(lambda: r.hlen(keys.job_inputs(job_id)) > 200, 60, "enqueueing to be under way", interval=0.01)
    os.killpg(producer.pid, signal.SIGKILL)
    producer.wait(10)
    assert r.hlen(keys.job_inputs(job_id)) < len(ids), "killed before it enqueued everything"
    assert r.hget(keys.job(job_id), "enqueued") == b"0"

    out = tmp_path / "out.jsonl"
    done = run_cli(base_env, "submit", str(source), "--job-id", job_id, "--wait", "--output", str(out))
    assert done.returncode == 0, done.stderr
    lines = [BatchRequestOutput.model_validate_json(line) for line in out.read_text().splitlines()]
    assert [line.custom_id for line in lines] == ids
    client = Client(Settings(redis_url=redis_server.url))
    _assert_each_line_once(client, client.job(job_id).status(), ids)


def test_status_watch_ends_with_the_record(tiny_worker: Worker, base_env: dict[str, str], tmp_path: Path) -> None:
    source = _slow_file(tmp_path / "in.jsonl", 10, max_tokens=5)
    job_id = run_cli(base_env, "submit", str(source)).stdout.strip()
    done = run_cli(base_env, "status", job_id, "--watch")
    assert done.returncode == 0
    assert BatchJob.model_validate_json(done.stdout).status.value == "completed"
    assert "10 completed" in done.stderr


def test_lines_with_crlf_spaces_and_harmless_fields_are_answered_as_sent(tiny_worker: Worker, redis_server: RedisServer, tmp_path: Path) -> None:
    # Chunks carry each input line as it came (its number spliced in): whitespace around the
    # object, CRLF endings, key order and fields accepted at their "unused" value must all
    # reach the worker intact and give the same answers as the plain line.
    plain = batch_line("plain", user("same prompt", max_tokens=4, temperature=0))
    odd = [
        '  {"body": {"messages": [{"role": "user", "content": "same prompt"}], "max_tokens": 4, "temperature": 0, "stream": false, "logprobs": false},'
        ' "url": "/v1/chat/completions", "method": "POST", "custom_id": "reordered"}  ',
        '\t{"custom_id": "tabbed", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": [{"type": "text", "text": "same prompt"}]}], "max_completion_tokens": 4, "temperature": 0}}',
    ]
    source = tmp_path / "odd.jsonl"
    source.write_bytes(("\r\n".join([plain, *odd]) + "\r\n").encode())
    client = Client(Settings(redis_url=redis_server.url))
    job = client.submit_file(str(source)).wait(timeout=120)
    lines = _assert_each_line_once(client, job, ["plain", "reordered", "tabbed"])
    assert all(kind == "output" for kind, _ in lines), lines
    texts = {line.custom_id: line.response.body["choices"][0]["message"]["content"] for _, line in lines if line.response}
    assert texts["reordered"] == texts["tabbed"] == texts["plain"], texts


# The job module on its own, on a real redis-server of the test's own.


@pytest.fixture(params=[False, True], ids=["bytes", "decoded"])
def jobs(request: pytest.FixtureRequest, aof_redis: RedisServer) -> Jobs:
    """The job store on a client that decodes replies, and on one that does not."""
    return Jobs(redis.Redis.from_url(aof_redis.url, decode_responses=request.param), job_ttl=600)


def _output(line: int, custom_id: str) -> dict[str, object]:
    return {"id": f"batch_req_{line}", "custom_id": custom_id, "response": {"status_code": 200, "request_id": "r", "body": {}}, "error": None}


def test_a_job_moves_through_its_statuses_and_counts_each_line_once(jobs: Jobs) -> None:
    assert jobs.create("batch_a", input_file="in.jsonl", metadata={"k": "v"})
    assert not jobs.create("batch_a", input_file="other.jsonl"), "an id is taken once"
    assert jobs.get("batch_a").status is JobStatus.validating
    jobs.add_inputs("batch_a", {1: "a", 2: "b", 3: "c"}, queues={"chatbatch"})
    jobs.start("batch_a")
    assert jobs.get("batch_a").status is JobStatus.in_progress and jobs.queues("batch_a") == ["chatbatch"]
    assert jobs.record_line("batch_a", 1, "output", _output(1, "a"), tokens=5)
    assert not jobs.record_line("batch_a", 1, "error", _output(1, "a")), "a line is stored once"
    assert jobs.record_lines("batch_a", [(2, "output", json.dumps(_output(2, "b")), 7), (3, "error", _output(3, "c"), 0)]) == 2
    assert jobs.recorded("batch_a", [1, 2, 3, 4]) == [True, True, True, False]
    assert jobs.finish_enqueueing("batch_a", 3) == "completed"
    job = jobs.get("batch_a")
    assert job.status is JobStatus.completed and job.request_counts.model_dump() == {"total": 3, "completed": 2, "failed": 1}
    assert jobs.generated_tokens("batch_a") == 12
    assert [(n, kind) for n, kind, _ in jobs.iter_lines("batch_a")] == [(1, "output"), (2, "output"), (3, "error")]
    assert [n for n, _, _ in jobs.iter_lines("batch_a", "error")] == [3]
    assert 0 < jobs.redis.ttl(keys.job_lines("batch_a")) <= 600
    assert not jobs.redis.zscore(keys.OPEN_JOBS, "batch_a"), "an ended job leaves the sweep's set"
    assert last_event(jobs.redis) == {"type": "batch", "id": "batch_a", "status": "completed"}


def test_cancel_closes_every_unanswered_line_and_ends_the_job(jobs: Jobs) -> None:
    jobs.create("batch_c", input_file="in.jsonl", extra={"callback_url": "http://127.0.0.1:9/hook"})
    jobs.add_inputs("batch_c", {1: "a", 2: "b"})
    jobs.record_line("batch_c", 1, "output", _output(1, "a"))
    jobs.finish_enqueueing("batch_c", 2)
    job = jobs.cancel("batch_c")
    assert job.status is JobStatus.cancelled and job.cancelling_at and job.cancelled_at
    kinds = {n: json.loads(line) for n, _, line in jobs.iter_lines("batch_c")}
    assert kinds[2]["error"]["code"] == "cancelled" and kinds[1]["error"] is None
    assert jobs.cancel("batch_c").status is JobStatus.cancelled, "cancelling an ended job returns it as it is"
    assert last_event(jobs.redis) == {"type": "batch", "id": "batch_c", "status": "cancelled", "callback": "1"}


def test_a_job_past_its_window_reads_as_expiring_until_the_sweep_expires_it(jobs: Jobs) -> None:
    jobs.create("batch_e", input_file="in.jsonl", expires_in=1)
    jobs.add_inputs("batch_e", {1: "a", 2: "b"})
    jobs.record_line("batch_e", 1, "output", _output(1, "a"))
    jobs.finish_enqueueing("batch_e", 2)
    later = time.time() + 5
    assert jobs.get("batch_e").status is JobStatus.in_progress
    assert jobs.get("batch_e", now=later).status is JobStatus.expiring
    assert jobs.stop_reason("batch_e", now=later) is not None
    assert jobs.redis.hget(keys.job("batch_e"), "status") in (b"in_progress", "in_progress"), "reading changed nothing"
    assert jobs.sweep(later) == ["batch_e"]
    job = jobs.get("batch_e")
    assert job.status is JobStatus.expired and job.request_counts.model_dump() == {"total": 2, "completed": 1, "failed": 1}
    assert jobs.sweep(later) == [], "an ended job is swept once"


def test_a_stopped_job_whose_producer_died_ends_with_the_lines_it_has(jobs: Jobs) -> None:
    jobs.create("batch_p", input_file="in.jsonl")
    jobs.hold_enqueuer("batch_p", "producer-1", seconds=60)
    jobs.add_inputs("batch_p", {1: "a"})
    jobs.cancel("batch_p")
    assert jobs.get("batch_p").status is JobStatus.cancelling, "its producer may still enqueue: it waits"
    jobs.redis.delete(keys.job_enqueuer("batch_p"))  # the producer's lease ran out
    assert jobs.sweep(time.time() + 60) == ["batch_p"]
    job = jobs.get("batch_p")
    assert job.status is JobStatus.cancelled and job.request_counts.model_dump() == {"total": 1, "completed": 0, "failed": 1}


def test_the_sweep_writes_the_files_of_a_job_whose_writer_died(jobs: Jobs, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in (("AWS_ENDPOINT_URL", s3_server.endpoint), ("AWS_ACCESS_KEY_ID", "testing"),
                        ("AWS_SECRET_ACCESS_KEY", "testing"), ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)
    bucket = f"b-{uuid.uuid4().hex[:8]}"
    s3_server.client().create_bucket(Bucket=bucket)
    jobs.create("batch_w", input_file="in.jsonl", output_file=f"s3://{bucket}/out.jsonl")
    jobs.add_inputs("batch_w", {1: "a"})
    jobs.record_line("batch_w", 1, "output", _output(1, "a"))
    jobs.redis.hset(keys.job("batch_w"), mapping={"total": 1, "enqueued": 1})
    # A writer takes the job (its lease) and dies before writing anything.
    assert jobs._finalize(keys=jobs._end_keys("batch_w"), args=[int(time.time()), "batch_w", 600, 60]) in (b"deliver", "deliver")
    assert jobs.get("batch_w").status is JobStatus.finalizing
    assert jobs.sweep(time.time() + 120) == [], "not while its lease runs"
    jobs.redis.delete(keys.job_writer("batch_w"))  # the lease ran out
    assert jobs.sweep(time.time() + 300) == ["batch_w"]
    assert jobs.get("batch_w").status is JobStatus.completed
    assert s3_server.client().get_object(Bucket=bucket, Key="out.jsonl")["Body"].read().decode().count("\n") == 1


def test_a_sweep_without_store_credentials_leaves_the_files_to_a_worker(jobs: Jobs, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in (("AWS_ENDPOINT_URL", s3_server.endpoint), ("AWS_ACCESS_KEY_ID", "testing"),
                        ("AWS_SECRET_ACCESS_KEY", "testing"), ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)
    bucket = f"b-{uuid.uuid4().hex[:8]}"
    s3_server.client().create_bucket(Bucket=bucket)
    jobs.create("batch_g", input_file="in.jsonl", expires_in=1, error_file=f"s3://{bucket}/errors.jsonl")
    jobs.add_inputs("batch_g", {1: "a"})
    jobs.redis.hset(keys.job("batch_g"), mapping={"total": 1, "enqueued": 1})
    later = time.time() + 5
    assert jobs.sweep(later, write_files=False) == ["batch_g"]  # a gateway's sweep
    assert jobs.get("batch_g").status is JobStatus.finalizing
    assert s3_server.client().list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0
    assert jobs.sweep(later) == ["batch_g"]  # a worker's, next
    assert jobs.get("batch_g").status is JobStatus.expired
    body = s3_server.client().get_object(Bucket=bucket, Key="errors.jsonl")["Body"].read().decode()
    assert json.loads(body)["error"]["code"] == "expired"


def test_one_job_the_sweep_cannot_handle_does_not_stop_the_others(jobs: Jobs) -> None:
    for job_id in ("batch_x1", "batch_x2"):
        jobs.create(job_id, input_file="in.jsonl", expires_in=1)
        jobs.redis.hset(keys.job(job_id), mapping={"total": 0, "enqueued": 1})
    jobs.redis.hset(keys.job("batch_x1"), "status", "no-such-status")  # a record the sweep cannot read
    later = time.time() + 5
    assert jobs.sweep(later) == ["batch_x2"]
    assert jobs.get("batch_x2").status is JobStatus.expired
    assert (jobs.redis.zscore(keys.OPEN_JOBS, "batch_x1") or 0) > later, "looked at again later"


WRITES = {
    "SET", "SETEX", "SETNX", "GETDEL", "DEL", "UNLINK", "EXPIRE", "PEXPIRE", "PERSIST", "HSET", "HSETNX", "HMSET", "HDEL",
    "HINCRBY", "INCR", "DECR", "INCRBY", "ZADD", "ZREM", "ZINCRBY", "SADD", "SREM", "LPUSH", "RPUSH", "LPOP", "RPOP",
    "BLPOP", "BRPOP", "LMOVE", "BLMOVE", "XADD", "XACK", "XCLAIM", "XAUTOCLAIM", "XGROUP", "XREADGROUP", "XDEL", "XTRIM",
    "EVAL", "EVALSHA", "EVAL_RO", "FCALL", "PUBLISH", "RENAME", "COPY", "FLUSHDB", "FLUSHALL",
}


def test_reading_a_job_past_its_window_writes_nothing(aof_redis: RedisServer, base_env: dict[str, str], tmp_path: Path) -> None:
    """`chatbatch status`, `JobHandle.status()` and `GET /v1/batches/{id}` under MONITOR: no
    write command, and the job reads as expiring."""
    from fastapi.testclient import TestClient

    from gateway import create_app

    settings = Settings(redis_url=aof_redis.url, home=tmp_path / "home")
    client = Client(settings)
    source = tmp_path / "in.jsonl"
    source.write_text(batch_line("a", user("x", max_tokens=2)) + "\n")
    handle = client.submit_file(str(source))  # no worker: it stays unanswered
    # Its window passes now (not during the submit, whose enqueuer would expire it at its end).
    aof_redis.client().hset(keys.job(handle.id), mapping={"owner": "public", "expires_at": int(time.time()) - 1})  # owner: as over HTTP
    assert handle.status().status is JobStatus.expiring
    api = TestClient(create_app(settings, sweeps=False))  # no lifespan: nothing runs in the background
    commands: list[str] = []
    monitor = threading.Thread(target=_monitor, args=(aof_redis, commands), daemon=True)
    monitor.start()
    wait_for(lambda: commands, 10, "MONITOR to start", interval=0.05)

    done = run_cli({**base_env, "CHATBATCH_REDIS_URL": aof_redis.url}, "status", handle.id)
    assert done.returncode == 0, done.stderr
    assert BatchJob.model_validate_json(done.stdout).status is JobStatus.expiring
    assert handle.status().status is JobStatus.expiring
    answer = api.get(f"/v1/batches/{handle.id}")
    assert answer.status_code == 200 and answer.json()["status"] == "expiring"
    aof_redis.client().echo("done")
    monitor.join(10)
    assert "ECHO" in commands
    written = sorted(set(commands) & WRITES)
    assert written == [], f"reads wrote: {written}"


def _monitor(server: RedisServer, commands: list[str]) -> None:
    with server.client().monitor() as listening:
        aof_redis_client = server.client()
        aof_redis_client.ping()
        for item in listening.listen():
            name = str(item["command"]).split(" ", 1)[0].upper()
            commands.append(name)
            if name == "ECHO":
                return


def test_jobs_from_before_the_sweeps_set_are_backfilled_once(jobs: Jobs) -> None:
    for job_id in ("batch_old1", "batch_old2"):
        jobs.create(job_id, input_file="in.jsonl", expires_in=1)
    jobs.create("batch_done", input_file="in.jsonl")
    jobs.redis.hset(keys.job("batch_done"), mapping={"total": 0, "enqueued": 1})
    jobs.finalize("batch_done")
    jobs.redis.delete(keys.OPEN_JOBS)  # as a Redis that held jobs before the set existed
    assert jobs.backfill_open() == 2 and jobs.backfill_open() == 0
    assert jobs.sweep(time.time() + 5) == ["batch_old1", "batch_old2"]


def test_a_page_of_an_owners_jobs_newest_first(jobs: Jobs) -> None:
    for i in range(5):
        jobs.create(f"batch_pg{i}", input_file="in.jsonl", extra={"owner": "a" if i != 2 else "b"})
        jobs.redis.zadd(keys.JOBS, {f"batch_pg{i}": i})  # distinct creation times
    first, more = jobs.page("a", limit=2)
    assert [job.id for job in first] == ["batch_pg4", "batch_pg3"] and more
    rest, more = jobs.page("a", limit=2, after="batch_pg3")
    assert [job.id for job in rest] == ["batch_pg1", "batch_pg0"] and not more


def test_usage_sums_each_output_lines_usage_once_across_a_redelivery(aof_redis: RedisServer, base_env: dict[str, str], tiny_model: Path, tmp_path: Path) -> None:
    """A worker killed mid-job leaves chunks half answered; they are delivered again and their
    lines stored once: the job's usage is the exact sum of its output lines' usage."""
    env = {**base_env, "CHATBATCH_REDIS_URL": aof_redis.url, "CHATBATCH_VISIBILITY_TIMEOUT": "4", "CHATBATCH_HEARTBEAT_INTERVAL": "1"}
    first = Worker(env, tmp_path / "first.log", "--model", str(tiny_model))
    first.wait_ready("tiny-llama-chat", aof_redis.client())
    client = Client(Settings(redis_url=aof_redis.url, chunk_size=8))
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(batch_line(f"u{i}", user(f"usage {i}", max_tokens=24 + i % 16, temperature=0.8)) for i in range(96)) + "\n")
    handle = client.submit_file(str(source))
    wait_for(lambda: handle.status().request_counts.completed >= 6, 120, "the first answers")
    first.stop(signal.SIGKILL)
    second = Worker(env, tmp_path / "second.log", "--model", str(tiny_model))
    try:
        second.wait_ready("tiny-llama-chat", aof_redis.client())
        job = handle.wait(timeout=240)
    finally:
        second.stop()
    assert job.status.value == "completed" and job.request_counts.completed == 96
    deliveries = aof_redis.client().hvals(keys.job_deliveries(job.id))
    assert any(int(count) > 1 for count in deliveries), "no chunk was delivered again: the test did not exercise a redelivery"
    bodies = [line.response.body for kind, line in _all_lines(client, job.id) if kind == "output" and line.response is not None]
    prompt = sum(body["usage"]["prompt_tokens"] for body in bodies)
    generated = sum(body["usage"]["completion_tokens"] for body in bodies)
    cached = sum((body["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0 for body in bodies)
    usage = job.usage
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (prompt, generated, prompt + generated)
    assert usage.input_tokens_details.cached_tokens == cached
    assert job.model == "tiny-llama-chat"
