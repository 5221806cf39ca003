"""Security: Redis with a password and no secret in any log or message; tenants (API keys)
that cannot hurt each other; limits that hold before the bytes land; callbacks that cannot
reach inside the network; unguessable ids. docs/reliability.md#security maps each line of the
tenant model to its test here."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from schemas import ChatCompletion
from tests.conftest import (
    CHATBATCH,
    ROOT,
    RedisServer,
    S3Server,
    Worker,
    batch_line,
    free_port,
    run_cli,
    start_redis,
    user,
    wait_for,
)

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


# Tenants: two keys on one gateway and one worker, with a Redis of their own (no other test's
# worker takes their work, and no worker here lets callbacks reach loopback).

ALICE, BOB = "sk-alice-5e1d", "sk-bob-07c4"
#: The file size limit of the fleet below (small, so a refused upload is cut off quickly).
FILE_LIMIT = 20 * 1024 * 1024


@dataclass
class Fleet:
    url: str
    gateway: subprocess.Popen[bytes]
    redis: RedisServer
    env: dict[str, str]
    files: Path
    temp: Path

    def auth(self, key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def fleet(base_env: dict[str, str], tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("fleet")
    server = start_redis(root / "redis")
    files, temp = root / "files", root / "tmp"
    temp.mkdir()
    env = {
        **base_env, "CHATBATCH_REDIS_URL": server.url, "CHATBATCH_API_KEYS": f"{ALICE},{BOB}", "CHATBATCH_FILES_DIR": str(files),
        "CHATBATCH_MAX_FILE_BYTES": str(FILE_LIMIT), "CHATBATCH_HEARTBEAT_INTERVAL": "1", "TMPDIR": str(temp),
    }
    worker = Worker(env, root / "worker.log", "--model", str(tiny_model))
    port = free_port()
    with (root / "gateway.log").open("wb") as out:
        gateway = subprocess.Popen([*CHATBATCH, "serve", "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        worker.wait_ready("tiny-llama-chat", server.client())

        def up() -> bool:
            try:
                return httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {ALICE}"}).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, 60, "the gateway")
        yield Fleet(url=url, gateway=gateway, redis=server, env=env, files=files, temp=temp)
    finally:
        gateway.terminate()
        gateway.wait(10)
        worker.stop()
        server.process.terminate()
        server.process.wait(10)


# Limits before the bytes land.


def _rss(pid: int, field: str = "VmRSS") -> int:
    """A process's resident memory (or its peak, VmHWM), in bytes, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _disk(*directories: Path) -> int:
    return sum(path.stat().st_size for directory in directories for path in directory.rglob("*") if path.is_file())


class _Watch:
    """Samples the gateway's resident memory and the bytes under its file and temp
    directories while a request streams, keeping the peaks."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet, self.pid = fleet, fleet.gateway.pid
        self.rss, self.hwm, self.disk = _rss(self.pid), _rss(self.pid, "VmHWM"), _disk(fleet.files, fleet.temp)
        self.peak_rss, self.peak_disk = self.rss, self.disk
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak_rss = max(self.peak_rss, _rss(self.pid))
            self.peak_disk = max(self.peak_disk, _disk(self.fleet.files, self.fleet.temp))

    def __enter__(self) -> _Watch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, self.rss + _rss(self.pid, "VmHWM") - self.hwm)


def _post_streamed(url: str, path: str, headers: dict[str, str], chunks: Iterator[bytes]) -> tuple[int, dict[str, Any], int]:
    """POST a body of unknown length (chunked) from a generator over a raw socket, reading the
    answer while sending, as curl does: (status, JSON body, bytes sent when it came)."""
    import http.client

    parsed = httpx.URL(url)
    sock = socket.create_connection((parsed.host, parsed.port))
    head = f"POST {path} HTTP/1.1\r\nHost: {parsed.host}:{parsed.port}\r\nTransfer-Encoding: chunked\r\n"
    sock.sendall((head + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode())
    sent = 0
    answered = threading.Event()

    def pump() -> None:
        nonlocal sent
        try:
            for chunk in chunks:
                if answered.is_set():
                    return
                sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                sent += len(chunk)
            sock.sendall(b"0\r\n\r\n")
        except OSError:  # the server closed the connection after answering
            pass

    sender = threading.Thread(target=pump, daemon=True)
    sender.start()
    try:
        response = http.client.HTTPResponse(sock)
        response.begin()
        at = sent
        body = json.loads(response.read())
    finally:
        answered.set()
        sock.close()
        sender.join(30)
    return response.status, body, at


def _repeat(block: bytes, total: int) -> Iterator[bytes]:
    for _ in range(total // len(block)):
        yield block


def test_a_1gb_upload_is_cut_off_at_the_file_limit_before_it_lands(fleet: Fleet) -> None:
    boundary = "chatbatch-test-boundary"
    preamble = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"huge.jsonl\"\r\n"
        "Content-Type: application/jsonl\r\n\r\n"
    ).encode()
    line = b'{"custom_id": "x", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n'
    block = line * (1024 * 1024 // len(line))

    def upload() -> Iterator[bytes]:
        yield preamble
        yield from _repeat(block, 1024**3)
        yield f"\r\n--{boundary}--\r\n".encode()

    headers = {**fleet.auth(ALICE), "Content-Type": f"multipart/form-data; boundary={boundary}"}
    with _Watch(fleet) as watch:
        status, body, sent = _post_streamed(fleet.url, "/v1/files", headers, upload())
    assert status == 413, body
    assert "CHATBATCH_MAX_FILE_BYTES" in body["error"]["message"]
    assert sent < 1024**3 // 4, "the upload was cut off, not read to its end"
    assert watch.peak_disk - watch.disk <= FILE_LIMIT, "never more than the limit written"
    assert watch.peak_rss - watch.rss <= 50 * 1024 * 1024
    assert _disk(fleet.files, fleet.temp) == watch.disk, "nothing of it is left"
    # An upload within the limit, in the same streamed form, is stored.
    small = [preamble, block, f"\r\n--{boundary}--\r\n".encode()]
    status, body, _ = _post_streamed(fleet.url, "/v1/files", headers, iter(small))
    assert status == 200 and body["bytes"] == len(block) and body["purpose"] == "batch", body


def test_a_300mb_body_is_cut_off_at_the_line_limit_before_it_is_parsed(fleet: Fleet) -> None:
    def body() -> Iterator[bytes]:
        yield b'{"messages": [{"role": "user", "content": "'
        yield from _repeat(b"a" * (1024 * 1024), 300 * 1024 * 1024)
        yield b'"}]}'

    headers = {**fleet.auth(ALICE), "Content-Type": "application/json"}
    with _Watch(fleet) as watch:
        status, answer, sent = _post_streamed(fleet.url, "/v1/chat/completions", headers, body())
    assert status == 413 and answer["error"]["code"] == "request_too_large", answer
    assert sent < 100 * 1024 * 1024
    assert watch.peak_rss - watch.rss <= 50 * 1024 * 1024
    assert watch.peak_disk == watch.disk
    # Every route counts: a batch body, and a declared length over the limit, answered before
    # a byte of the body is read.
    status, answer, _ = _post_streamed(fleet.url, "/v1/batches", headers, _repeat(b" " * 65536, 2 * 1024 * 1024))
    assert status == 413 and answer["error"]["code"] == "request_too_large"
    with socket.create_connection((httpx.URL(fleet.url).host, httpx.URL(fleet.url).port)) as sock:
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ALICE}\r\nContent-Type: application/json\r\nContent-Length: {300 * 1024**2}\r\n\r\n".encode())
        assert sock.recv(64).startswith(b"HTTP/1.1 413 ")
