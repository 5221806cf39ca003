"""Faults with real processes: killed workers, SIGTERM, redelivery, Redis and S3 outages,
a request that kills its worker. Each test has its own redis-server (with AOF) and workers,
with short timeouts set through configuration."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from chatbatch import keys
from chatbatch.settings import Settings
from producer import Client, JobHandle
from schemas import BatchJob, BatchRequestOutput, ErrorCode
from tests.conftest import (
    ROOT,
    RedisServer,
    S3Server,
    Worker,
    batch_line,
    free_port,
    restart_redis,
    user,
    wait_for,
)

MODEL = "tiny-llama-chat"


def _env(base_env: dict[str, str], redis: RedisServer, **settings: str) -> dict[str, str]:
    env = {**base_env, "CHATBATCH_REDIS_URL": redis.url, "CHATBATCH_BATCH_WAIT_MS": "20", "CHATBATCH_HEARTBEAT_INTERVAL": "1"}
    env.update({f"CHATBATCH_{k.upper()}": v for k, v in settings.items()})
    return env


def _job_file(path: Path, count: int, max_tokens: int, *, poison: set[int] | None = None) -> list[str]:
    ids = [f"l{i}" for i in range(count)]
    path.write_text("\n".join(
        batch_line(cid, user(("POISON " if poison and i in poison else "") + f"line {i}", max_tokens=max_tokens, temperature=0.8))
        for i, cid in enumerate(ids)
    ) + "\n")
    return ids


def _check_exactly_once(client: Client, job: BatchJob, ids: list[str]) -> list[tuple[str, BatchRequestOutput]]:
    lines = [(kind, BatchRequestOutput.model_validate_json(raw)) for kind, raw in client.job(job.id).lines()]
    assert sorted(line.custom_id for _, line in lines) == sorted(ids)  # type: ignore[type-var]
    counts = job.request_counts
    assert counts.total == len(ids)
    assert counts.completed == sum(kind == "output" for kind, _ in lines)
    assert counts.failed == sum(kind == "error" for kind, _ in lines)
    return lines


def _wait(handle: JobHandle, timeout: float, *workers: Worker) -> BatchJob:
    """The job's end; if it does not come, the failure shows the workers' last log lines."""
    try:
        return handle.wait(timeout=timeout)
    except TimeoutError as error:
        logs = "\n".join(f"--- {w.log.name}\n{w.output()[-4000:]}" for w in workers)
        raise AssertionError(f"{error}: {handle.status().request_counts}\n{logs}") from error


def _worker(env: dict[str, str], tmp_path: Path, name: str, model: Path, redis: RedisServer, *extra: str) -> Worker:
    worker = Worker(env, tmp_path / f"{name}.log", "--model", str(model), "--hostname", f"{name}@test", *extra)
    worker.wait_ready(MODEL if "crash" not in str(model) else "crashing", redis.client())
    return worker


def test_sigkill_mid_job_second_worker_finishes(aof_redis: RedisServer, base_env: dict[str, str], tiny_model: Path, tmp_path: Path) -> None:
    env = _env(base_env, aof_redis, visibility_timeout="4")
    first = _worker(env, tmp_path, "first", tiny_model, aof_redis)
    client = Client(Settings(redis_url=aof_redis.url, chunk_size=4))
    ids = _job_file(tmp_path / "in.jsonl", 120, 64)
    handle = client.submit_file(str(tmp_path / "in.jsonl"))
    wait_for(lambda: handle.status().request_counts.completed >= 8, 120, "the first answers")
    first.stop(signal.SIGKILL)  # the whole process group, in the middle of the job
    assert handle.status().request_counts.completed < len(ids)
    second = _worker(env, tmp_path, "second", tiny_model, aof_redis)
    try:
        job = _wait(handle, 240, first, second)
        assert job.status.value == "completed"
        lines = _check_exactly_once(client, job, ids)
        assert all(kind == "output" for kind, _ in lines)
    finally:
        second.stop()


def test_sigterm_hands_unfinished_work_back_at_once(aof_redis: RedisServer, base_env: dict[str, str], tiny_model: Path, tmp_path: Path) -> None:
    env = _env(base_env, aof_redis, visibility_timeout="600", max_batch_size="8")
    first = _worker(env, tmp_path, "first", tiny_model, aof_redis, "--concurrency", "4")
    client = Client(Settings(redis_url=aof_redis.url, chunk_size=40))
    # Four chunks of 40 long lines: the first worker holds all of them, batches of 8 at a time.
    ids = _job_file(tmp_path / "in.jsonl", 160, 200)
    handle = client.submit_file(str(tmp_path / "in.jsonl"))
    wait_for(lambda: handle.status().request_counts.completed >= 8, 120, "the first answers")
    stopped = time.monotonic()
    first.stop(signal.SIGTERM, timeout=60)
    took = time.monotonic() - stopped
    assert first.process.returncode == 0, first.output()[-3000:]
    held = handle.status().request_counts.completed
    assert held < len(ids), "the worker handed back what it held instead of finishing it"
    assert "handed back" in first.output()
    second = _worker(env, tmp_path, "second", tiny_model, aof_redis)
    try:
        job = _wait(handle, 300, first, second)
        # Well before the 600 s visibility timeout: nothing waited for a redelivery.
        assert time.monotonic() - stopped < 200
        assert job.status.value == "completed"
        lines = _check_exactly_once(client, job, ids)
        assert all(kind == "output" for kind, _ in lines)
        # The handed-back chunks ran batched, not one line at a time as crash suspects.
        assert "was redelivered" not in second.output()
    finally:
        second.stop()
    print(f"SIGTERM: worker exited in {took:.1f}s with {held}/{len(ids)} lines answered")


def test_a_chunk_message_the_broker_lost_is_sent_again(aof_redis: RedisServer, base_env: dict[str, str], tiny_model: Path, tmp_path: Path) -> None:
    """A worker killed between taking a message off the queue and recording it as
    unacknowledged loses it (kombu's two steps); here the message is taken off by hand. The
    recovery sweep finds the job stalled with a chunk that has no message anywhere, and sends
    it again from the lines the producer kept."""
    env = _env(base_env, aof_redis, visibility_timeout="4")
    client = Client(Settings(redis_url=aof_redis.url, chunk_size=4))
    ids = _job_file(tmp_path / "in.jsonl", 32, 4)
    handle = client.submit_file(str(tmp_path / "in.jsonl"))  # no worker yet: 8 chunks wait
    queue = aof_redis.client()
    assert queue.llen("chatbatch") == 8
    assert queue.rpop("chatbatch") is not None  # the oldest chunk's message, gone
    worker = _worker(env, tmp_path, "w", tiny_model, aof_redis)
    try:
        job = _wait(handle, 120, worker)
        assert job.status.value == "completed"
        lines = _check_exactly_once(client, job, ids)
        assert all(kind == "output" for kind, _ in lines)
        assert "its message was lost" in worker.output()
        wait_for(lambda: not queue.exists(keys.job_pending(job.id)), 10, "answered chunks forgotten")
    finally:
        worker.stop()


def test_a_request_message_the_broker_lost_is_sent_again(aof_redis: RedisServer, base_env: dict[str, str], tiny_model: Path, tmp_path: Path) -> None:
    """The same loss for a single request: kept until answered, it is sent again."""
    env = _env(base_env, aof_redis, visibility_timeout="4")
    client = Client(Settings(redis_url=aof_redis.url))
    handle = client.submit(user("hello", max_tokens=4))  # no worker yet
    kept = client.submit(user("hello again", max_tokens=4))
    queue = aof_redis.client()
    assert queue.rpop("chatbatch") is not None  # the first request's message, gone
    worker = _worker(env, tmp_path, "w", tiny_model, aof_redis)
    try:
        assert handle.result(timeout=120).choices[0].message.content is not None
        assert kept.result(timeout=30).choices[0].message.content is not None
        assert f"request {handle.id}: its message was lost" in worker.output()
        assert f"request {kept.id}: its message was lost" not in worker.output(), "only the lost one is sent again"
        wait_for(lambda: not queue.hlen(keys.PENDING_REQUESTS), 10, "answered requests forgotten")
    finally:
        worker.stop()


def test_task_longer_than_visibility_timeout_never_duplicates(aof_redis: RedisServer, base_env: dict[str, str], tiny_model: Path, tmp_path: Path) -> None:
    # Batches of 4: a chunk of 32 long lines takes several seconds, past the 2 s timeout.
    env = _env(base_env, aof_redis, visibility_timeout="2", max_deliveries="20", max_batch_size="4")
    workers = [_worker(env, tmp_path, name, tiny_model, aof_redis) for name in ("a", "b")]
    try:
        client = Client(Settings(redis_url=aof_redis.url, chunk_size=32))
        ids = _job_file(tmp_path / "in.jsonl", 64, 220)
        job = client.submit_file(str(tmp_path / "in.jsonl")).wait(timeout=300)
        assert job.status.value == "completed"
        lines = _check_exactly_once(client, job, ids)
        assert all(kind == "output" for kind, _ in lines)
        # Kombu restores a message older than the timeout; either worker may take it again:
        # the one running it waits for its own run, the other runs the lines left one at a time.
        redelivered = sum(w.output().count("was delivered again") + w.output().count("was redelivered") for w in workers)
        assert redelivered, "no chunk outlived the visibility timeout: the test did not exercise redelivery"
    finally:
        for worker in workers:
            worker.stop()


def test_redis_restart_mid_job(aof_redis: RedisServer, base_env: dict[str, str], tiny_model: Path, tmp_path: Path) -> None:
    env = _env(base_env, aof_redis, visibility_timeout="30")
    worker = _worker(env, tmp_path, "w", tiny_model, aof_redis)
    try:
        client = Client(Settings(redis_url=aof_redis.url, chunk_size=4))
        ids = _job_file(tmp_path / "in.jsonl", 120, 48)
        handle = client.submit_file(str(tmp_path / "in.jsonl"))
        wait_for(lambda: handle.status().request_counts.completed >= 8, 120, "the first answers")
        aof_redis.process.kill()
        aof_redis.process.wait(10)
        # The consumer sees Redis gone either as a lost connection, or, when the kill fell
        # between taking a message and recording it, in the mend that holds the message until
        # Redis is back (worker/service/kombu_mends.py), which keeps the consumer from noticing before.
        wait_for(
            lambda: any(sign in worker.output() for sign in ("Connection to broker lost", "Redis went away as message")),
            60,
            "the worker to see Redis gone",
        )
        restart_redis(aof_redis)
        job = _wait(handle, 300, worker)
        assert job.status.value == "completed"
        _check_exactly_once(client, job, ids)
        assert worker.process.poll() is None, "the worker reconnected and kept consuming"
    finally:
        worker.stop()


def test_poison_request_becomes_internal_error(aof_redis: RedisServer, base_env: dict[str, str], tmp_path: Path) -> None:
    import mlflow

    model = tmp_path / "crashing"
    mlflow.pyfunc.save_model(str(model), python_model=str(ROOT / "tests" / "data" / "crashing_chat_model.py"), pip_requirements=["mlflow"])
    env = _env(base_env, aof_redis, visibility_timeout="3", max_deliveries="2")
    client = Client(Settings(redis_url=aof_redis.url, chunk_size=4))
    ids = _job_file(tmp_path / "in.jsonl", 12, 4, poison={5})
    handle = client.submit_file(str(tmp_path / "in.jsonl"))
    restarts = 0
    worker = Worker(env, tmp_path / "w0.log", "--model", str(model), "--served-model-name", "crashing")
    try:
        deadline = time.monotonic() + 240
        while not handle.status().status.is_final:
            assert time.monotonic() < deadline, "the job did not end"
            if worker.process.poll() is not None:  # a supervisor restarts the dead worker
                restarts += 1
                worker = Worker(env, tmp_path / f"w{restarts}.log", "--model", str(model), "--served-model-name", "crashing")
            time.sleep(0.2)
        job = handle.status()
        assert job.status.value == "completed"
        lines = _check_exactly_once(client, job, ids)
        errors = {line.custom_id: line.error for kind, line in lines if kind == "error"}
        assert set(errors) == {"l5"}
        assert errors["l5"] is not None and errors["l5"].code is ErrorCode.internal_error
        assert restarts >= 2
    finally:
        worker.stop()


class TcpProxy:
    """A loopback TCP proxy that can be cut and restored, to take S3 away from a worker."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.port = free_port()
        self._server: socket.socket | None = None
        self._conns: list[socket.socket] = []

    def start(self) -> None:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(64)
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            try:
                self._server.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
            except OSError:
                pass
            self._server.close()
            self._server = None
        for conn in self._conns:
            try:
                conn.close()
            except OSError:
                pass
        self._conns.clear()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass


@pytest.fixture
def proxied_s3(s3_server: S3Server) -> Iterator[TcpProxy]:
    proxy = TcpProxy(s3_server.port)
    proxy.start()
    yield proxy
    proxy.stop()


def _s3_job(env: dict[str, str], redis: RedisServer, bucket: str, tmp_path: Path) -> tuple[Client, str, list[str]]:
    ids = _job_file(tmp_path / "in.jsonl", 24, 3)
    client = Client(Settings(redis_url=redis.url, chunk_size=8))
    handle = client.submit_file(str(tmp_path / "in.jsonl"), output=f"s3://{bucket}/out/output.jsonl", errors=f"s3://{bucket}/out/errors.jsonl")
    return client, handle.id, ids


def test_s3_outage_during_upload_is_retried(aof_redis: RedisServer, base_env: dict[str, str], tiny_model: Path, s3_server: S3Server, proxied_s3: TcpProxy, tmp_path: Path) -> None:
    bucket = f"b-{uuid.uuid4().hex[:8]}"
    s3_server.client().create_bucket(Bucket=bucket)
    env = {**_env(base_env, aof_redis, s3_retry_seconds="60"), "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxied_s3.port}"}
    proxied_s3.stop()  # S3 is down when the job ends
    worker = _worker(env, tmp_path, "w", tiny_model, aof_redis)
    try:
        client, job_id, ids = _s3_job(env, aof_redis, bucket, tmp_path)
        wait_for(lambda: client.job(job_id).status().status.value == "finalizing", 120, "the upload to start")
        wait_for(lambda: "retrying" in worker.output(), 30, "the upload to be retried")
        proxied_s3.start()  # S3 comes back
        job = client.job(job_id).wait(timeout=120)
        assert job.status.value == "completed"
        body = s3_server.client().get_object(Bucket=bucket, Key="out/output.jsonl")["Body"].read().decode()
        assert len(body.splitlines()) == len(ids)
    finally:
        worker.stop()


def test_s3_that_stays_down_fails_the_job_cleanly(aof_redis: RedisServer, base_env: dict[str, str], tiny_model: Path, s3_server: S3Server, proxied_s3: TcpProxy, tmp_path: Path) -> None:
    bucket = f"b-{uuid.uuid4().hex[:8]}"
    s3_server.client().create_bucket(Bucket=bucket)
    env = {**_env(base_env, aof_redis, s3_retry_seconds="4"), "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxied_s3.port}"}
    proxied_s3.stop()
    worker = _worker(env, tmp_path, "w", tiny_model, aof_redis)
    try:
        client, job_id, _ = _s3_job(env, aof_redis, bucket, tmp_path)
        job = client.job(job_id).wait(timeout=180)
        assert job.status.value == "failed"
        assert job.errors is not None
        message = job.errors.data[0].message
        assert f"s3://{bucket}/out/output.jsonl" in message and "gave up" in message
        listed = s3_server.client().list_objects_v2(Bucket=bucket)
        assert listed.get("KeyCount", 0) == 0, [o["Key"] for o in listed.get("Contents", [])]
        assert s3_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    finally:
        worker.stop()


def test_pickled_messages_are_refused_never_run(aof_redis: RedisServer, base_env: dict[str, str], tiny_model: Path, tmp_path: Path) -> None:
    from kombu import Connection

    env = _env(base_env, aof_redis)
    worker = _worker(env, tmp_path, "w", tiny_model, aof_redis)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.system, (f"touch {marker}",))

    try:
        payload = {"task": "chatbatch.chat", "id": "evil", "args": [Exploit()], "kwargs": {}}
        with Connection(aof_redis.url) as conn:
            producer = conn.Producer(serializer="pickle")
            producer.publish(payload, routing_key="chatbatch", exchange="", serializer="pickle",
                             headers={"task": "chatbatch.chat", "id": "evil"})
        wait_for(lambda: "Refusing to deserialize untrusted content of type pickle" in worker.output(), 30, "the refusal in the log")
        assert not marker.exists()
        assert worker.process.poll() is None
    finally:
        worker.stop()
