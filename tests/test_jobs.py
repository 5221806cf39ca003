"""The job lifecycle: the OpenAI Batch object, cancel, expiry, resume after a killed producer."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from chatbatch import keys
from chatbatch.settings import Settings
from producer import Client
from schemas import BatchJob, BatchRequestOutput, ErrorCode
from tests.conftest import CHATBATCH, ROOT, RedisServer, Worker, batch_line, run_cli, user, wait_for

# The OpenAI Batch object's fields (input/output/error files named as in chatbatch's contract).
BATCH_FIELDS = {
    "id", "object", "endpoint", "errors", "input_file", "completion_window", "status",
    "output_file", "error_file", "created_at", "in_progress_at", "expires_at", "finalizing_at",
    "completed_at", "failed_at", "expired_at", "cancelling_at", "cancelled_at",
    "request_counts", "metadata", "input_file_id", "output_file_id", "error_file_id",
}
# chatbatch's own addition: the state of a callback the job named (HTTP API).
CHATBATCH_FIELDS = {"callback"}


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
    ids = [f"s{i}" for i in range(400)]
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
    # Chunks still queued when the job was cancelled are closed without running.
    time.sleep(1)
    assert handle.status().request_counts == job.request_counts
    status = run_cli(base_env, "submit", str(tmp_path / "in.jsonl"), "--job-id", job.id, "--wait")
    assert status.returncode == 1 and "cancelled" in status.stderr


def test_expired_job_keeps_finished_lines(tiny_worker: Worker, redis_server: RedisServer, tmp_path: Path) -> None:
    client = Client(Settings(redis_url=redis_server.url, chunk_size=8))
    ids = [f"s{i}" for i in range(400)]
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
