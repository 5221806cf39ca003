"""Security: Redis with a password and no secret in any log or message; tenants (API keys)
that cannot hurt each other; limits that hold before the bytes land; callbacks that cannot
reach inside the network; unguessable ids. docs/reliability.md#security maps each line of the
tenant model to its test here."""

from __future__ import annotations

import hashlib
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

from schemas import BatchRequestOutput, ChatCompletion
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
#: The one address the fleet's callbacks may go to besides public ones (nothing listens there).
ALLOWED = "127.0.0.2"


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
        # Callbacks may reach this loopback address only (never 127.0.0.1, where the tests'
        # receivers listen for what must not arrive).
        "CHATBATCH_CALLBACK_ALLOW": ALLOWED,
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


# What one key can reach of another's.


def _owner_id(key: str) -> str:
    """The owner id the gateway records for a key (a digest: keys are never stored)."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _batch(fleet: Fleet, key: str, lines: list[str], **headers: str) -> dict[str, Any]:
    uploaded = httpx.post(
        f"{fleet.url}/v1/files", headers=fleet.auth(key), files={"file": ("in.jsonl", ("\n".join(lines) + "\n").encode())}, data={"purpose": "batch"}
    )
    assert uploaded.status_code == 200, uploaded.text
    created = httpx.post(
        f"{fleet.url}/v1/batches", headers={**fleet.auth(key), **headers},
        json={"input_file_id": uploaded.json()["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"},
    )
    assert created.status_code == 200, created.text
    return dict(created.json())


def _ended(fleet: Fleet, key: str, batch_id: str, timeout: float = 300) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        found = httpx.get(f"{fleet.url}/v1/batches/{batch_id}", headers=fleet.auth(key)).json()
        return dict(found) if found["status"] in ("completed", "failed", "cancelled", "expired") else None

    return wait_for(ended, timeout, f"batch {batch_id}", interval=0.5)


def test_another_keys_batch_id_reads_as_an_unknown_cursor(fleet: Fleet) -> None:
    line = [batch_line("c", user("hi", max_tokens=1))]
    bobs = _batch(fleet, BOB, line)
    alices = [_batch(fleet, ALICE, line)["id"] for _ in range(2)]  # newer than bob's

    def page(key: str, after: str) -> dict[str, Any]:
        answer = httpx.get(f"{fleet.url}/v1/batches", headers=fleet.auth(key), params={"after": after, "limit": 100})
        assert answer.status_code == 200
        return dict(answer.json())

    unknown = page(BOB, "batch_" + "0" * 32)
    assert unknown["data"] == [] and not unknown["has_more"]
    assert page(BOB, alices[0]) == unknown == page(BOB, alices[1]), "alice's ids tell bob nothing"
    assert bobs["id"] not in [b["id"] for b in page(ALICE, alices[1])["data"]]
    assert alices[0] in [b["id"] for b in page(ALICE, alices[1])["data"]]
    assert httpx.get(f"{fleet.url}/v1/batches/{alices[0]}", headers=fleet.auth(BOB)).status_code == 404


def test_text_that_is_not_valid_unicode_is_a_400_naming_the_field_and_mints_no_id(fleet: Fleet) -> None:
    headers = {**fleet.auth(BOB), "Content-Type": "application/json"}
    raw = b'{"messages": [{"role": "user", "content": "hello \\udc80"}], "max_tokens": 2}'
    refused = httpx.post(f"{fleet.url}/v1/chat/completions", headers=headers, content=raw)
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["code"] == "invalid_request" and error["param"] == "messages[0].content" and "Unicode" in error["message"]
    assert "X-Chatbatch-Request-Id" not in refused.headers, "a refused body names no request"
    answered = httpx.post(f"{fleet.url}/v1/chat/completions", headers=headers, json=user("hello", max_tokens=2), timeout=120)
    assert answered.status_code == 200 and answered.headers["X-Chatbatch-Request-Id"] == answered.json()["id"]


# Callbacks cannot reach inside the network.


@dataclass
class Receiver:
    """A loopback HTTP receiver (at 127.0.0.1, which the fleet never allows): what arrives here
    is what must not."""

    calls: list[str]
    url: str


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    calls: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            calls.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield Receiver(calls=calls, url=f"http://127.0.0.1:{server.server_address[1]}/hook")
    server.shutdown()


def test_callback_urls_inside_the_network_are_refused_when_named(fleet: Fleet, receiver: Receiver) -> None:
    port = int(httpx.URL(receiver.url).port or 0)
    for url in (receiver.url, f"http://localhost:{port}/hook", f"http://2130706433:{port}/hook", f"http://[::ffff:127.0.0.1]:{port}/hook"):
        refused = httpx.post(
            f"{fleet.url}/v1/chat/completions", headers={**fleet.auth(BOB), "X-Chatbatch-Callback-Url": url, "X-Chatbatch-Async": "true"},
            json=user("hi", max_tokens=1),
        )
        assert refused.status_code == 400 and url in refused.json()["error"]["message"], refused.text
    uploaded = httpx.post(f"{fleet.url}/v1/files", headers=fleet.auth(BOB), files={"file": ("x.jsonl", b"{}\n")}, data={"purpose": "batch"}).json()
    body = {"input_file_id": uploaded["id"], "endpoint": "/v1/chat/completions"}
    for url in (receiver.url, "http://169.254.169.254/latest/meta-data/", "http://metadata.google.internal/computeMetadata/v1/"):
        refused = httpx.post(f"{fleet.url}/v1/batches", headers={**fleet.auth(BOB), "X-Chatbatch-Callback-Url": url}, json=body)
        assert refused.status_code == 400 and url in refused.json()["error"]["message"], refused.text
    assert receiver.calls == []


def test_a_callback_url_that_turns_internal_is_refused_at_send_and_tells_no_network_error(fleet: Fleet, receiver: Receiver) -> None:
    """A URL the producer let through (here: a producer that allows loopback, as a name whose
    DNS answer changes after the check would be) is checked again by the worker, which
    refuses it: nothing arrives. And what a key holder reads of any failed delivery says it
    failed, never how the network answered."""
    from chatbatch.callbacks import NOT_DELIVERED, REFUSED
    from chatbatch.settings import Settings
    from producer import Client
    from tests.conftest import CALLBACK_SECRET, LOOPBACK

    producer = Client(Settings(redis_url=fleet.redis.url, callback_secret=CALLBACK_SECRET, callback_allow=LOOPBACK))
    sent = producer.submit(user("call me", max_tokens=1), callback_url=receiver.url, owner=_owner_id(ALICE))

    def callback(request_id: str) -> dict[str, Any] | None:
        state = httpx.get(f"{fleet.url}/v1/chat/requests/{request_id}", headers=fleet.auth(ALICE)).json()["callback"]
        return dict(state) if state["last_error"] else None

    refused = wait_for(lambda: callback(sent.id), 120, "the refused callback")
    assert refused["status"] == "failed" and refused["last_error"] == REFUSED and refused["attempts"] == 1
    assert receiver.calls == []

    closed = f"http://{ALLOWED}:{free_port()}/hook"  # allowed, and nobody listens: a network error
    accepted = httpx.post(
        f"{fleet.url}/v1/chat/completions", headers={**fleet.auth(ALICE), "X-Chatbatch-Callback-Url": closed, "X-Chatbatch-Async": "true"},
        json=user("call me", max_tokens=1),
    )
    assert accepted.status_code == 202, accepted.text
    failed = wait_for(lambda: callback(accepted.json()["id"]), 120, "the failed attempt")
    assert failed["last_error"] == NOT_DELIVERED and "Connect" not in json.dumps(failed)


# One key's bad lines never fail another's requests.


def _hostile_lines(count: int) -> list[str]:
    """Bob's lines: every other one with text no tokenizer takes (an unpaired surrogate, which
    failed every request prepared beside it before validation refused it), the rest valid but
    heavy or odd: many choices, a long prompt, a thousand biased tokens, stop strings that are
    not ASCII, a nested schema, tools."""
    odd: list[dict[str, Any]] = [
        user("many", n=16, max_tokens=8),
        user("word " * 300, max_tokens=4),
        user("bias", max_tokens=4, logit_bias={str(t): -100 for t in range(1024)}),
        user("stops", max_tokens=8, stop=["🙂", "\u0000", "日本", "\\"]),
        user("json", max_tokens=8, response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": {
            "type": "object", "properties": {"a": {"type": "array", "items": {"type": "object", "properties": {"b": {"type": "string"}}}}}}}}),
        user("tools", max_tokens=8, tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}], tool_choice="required"),
    ]
    lines = []
    for i in range(count):
        body = user(f"bad {i} \udc80 text", max_tokens=4) if i % 2 else odd[(i // 2) % len(odd)]
        lines.append(batch_line(f"bob-{i}", body))  # json.dumps escapes the surrogate as \udc80
    return lines


def test_a_hostile_tenant_never_fails_another_tenants_lines_or_requests(fleet: Fleet) -> None:
    """Bob's batch of hostile lines and his hostile single requests run beside Alice's batch
    and single requests on the same worker: every line and request of Alice's is answered,
    and Bob's bad text is refused naming its field."""
    bobs = _batch(fleet, BOB, _hostile_lines(240))
    alices = _batch(fleet, ALICE, [batch_line(f"alice-{i}", user(f"question {i}", max_tokens=4)) for i in range(120)])
    statuses: list[int] = []
    bob_refusals: list[dict[str, Any]] = []

    def alice_asks(i: int) -> None:
        answer = httpx.post(f"{fleet.url}/v1/chat/completions", headers=fleet.auth(ALICE), json=user(f"single {i}", max_tokens=4), timeout=300)
        if answer.status_code == 200:
            ChatCompletion.model_validate(answer.json())
        statuses.append(answer.status_code)

    def bob_asks(i: int) -> None:
        raw = json.dumps(user(f"single {i} \udc80", max_tokens=4)).encode()
        answer = httpx.post(f"{fleet.url}/v1/chat/completions", headers={**fleet.auth(BOB), "Content-Type": "application/json"}, content=raw, timeout=300)
        bob_refusals.append({"status": answer.status_code, **answer.json()["error"]})

    threads = [threading.Thread(target=alice_asks, args=(i,)) for i in range(30)]
    threads += [threading.Thread(target=bob_asks, args=(i,)) for i in range(30)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    alice = _ended(fleet, ALICE, alices["id"])
    bob = _ended(fleet, BOB, bobs["id"])

    assert statuses == [200] * 30, "every single request of Alice's answered"
    assert alice["status"] == "completed" and alice["request_counts"] == {"total": 120, "completed": 120, "failed": 0}
    outputs = httpx.get(f"{fleet.url}/v1/files/{alice['output_file_id']}/content", headers=fleet.auth(ALICE)).text.splitlines()
    assert sorted(str(BatchRequestOutput.model_validate_json(line).custom_id) for line in outputs) == sorted(f"alice-{i}" for i in range(120))

    assert all(r["status"] == 400 and r["param"] == "messages[0].content" for r in bob_refusals) and len(bob_refusals) == 30
    assert bob["status"] == "completed" and bob["request_counts"]["total"] == 240
    errors = [BatchRequestOutput.model_validate_json(line) for line in
              httpx.get(f"{fleet.url}/v1/files/{bob['error_file_id']}/content", headers=fleet.auth(BOB)).text.splitlines()]
    refused = {e.custom_id for e in errors if e.error and e.error.code.value == "invalid_request" and "body.messages[0].content" in e.error.message}
    assert refused == {f"bob-{i}" for i in range(1, 240, 2)}


def test_the_api_port_shows_the_apis_description_and_nothing_of_the_fleet(fleet: Fleet) -> None:
    """/openapi.json and /docs describe the public API to anyone (as OpenAI publishes its own),
    and hold no key, secret or fleet data; the fleet's metrics are not on this port at all."""
    spec = httpx.get(f"{fleet.url}/openapi.json")
    assert spec.status_code == 200 and httpx.get(f"{fleet.url}/docs").status_code == 200
    text = spec.text
    for secret in (ALICE, BOB, fleet.env["CHATBATCH_CALLBACK_SECRET"], fleet.redis.url, str(fleet.files)):
        assert secret not in text
    upload = spec.json()["paths"]["/v1/files"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert upload["required"] == ["file", "purpose"]
    assert httpx.get(f"{fleet.url}/metrics", headers=fleet.auth(ALICE)).status_code == 404
