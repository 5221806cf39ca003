"""Callbacks: their signature and delivery state (chatbatch/callbacks.py) on a real
redis-server, and delivery by the fleet (worker/service/callbacks.py) to a real local HTTP receiver
with no gateway running."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import redis

from chatbatch import callbacks
from chatbatch.callbacks import BUSY, NO_CALLBACK, SETTLED, Callbacks, check_url, sign, verify
from chatbatch.exceptions import ConfigurationError
from chatbatch.requests import Requests
from chatbatch.settings import Settings
from producer import Client
from schemas import BatchJob, ChatCompletion
from tests.conftest import CALLBACK_SECRET, LOOPBACK, RedisServer, Worker, batch_line, user, wait_for

MODEL = "tiny-llama-chat"


def test_a_signature_verifies_only_for_its_body_secret_and_time() -> None:
    now = int(time.time())
    header = sign("s3cret", b'{"a": 1}', now)
    assert verify("s3cret", b'{"a": 1}', header)
    assert not verify("s3cret", b'{"a": 2}', header)
    assert not verify("other", b'{"a": 1}', header)
    assert not verify("s3cret", b'{"a": 1}', sign("s3cret", b'{"a": 1}', now - 3600)), "an old timestamp is a replay"
    assert not verify("s3cret", b"x", "garbage")


def test_a_callback_url_needs_http_and_a_secret() -> None:
    assert check_url(None, "") is None
    assert check_url("https://example.test/hook", "s") == "https://example.test/hook"
    with pytest.raises(ConfigurationError, match="http"):
        check_url("ftp://example.test", "s")
    with pytest.raises(ConfigurationError, match="CHATBATCH_CALLBACK_SECRET"):
        check_url("https://example.test/hook", "")


@pytest.fixture(params=[False, True], ids=["bytes", "decoded"])
def states(request: pytest.FixtureRequest, aof_redis: RedisServer) -> tuple[Callbacks, Requests]:
    client = redis.Redis.from_url(aof_redis.url, decode_responses=request.param)
    return Callbacks(client), Requests(client, result_ttl=600)


def test_one_delivery_holds_an_event_at_a_time_and_a_settled_one_is_never_sent_again(states: tuple[Callbacks, Requests]) -> None:
    state, requests = states
    kind = callbacks.CHAT_COMPLETION
    requests.record("chatcmpl-none", queue="q", body={})
    assert state.claim(kind, "chatcmpl-none", "task-1", 0, lease_seconds=30) == NO_CALLBACK
    requests.record("chatcmpl-cb", queue="q", body={}, callback_url="http://127.0.0.1:9/hook")
    assert state.claim(kind, "chatcmpl-cb", "task-1", 0, lease_seconds=30) == 1
    assert state.claim(kind, "chatcmpl-cb", "task-2", 0, lease_seconds=30) == BUSY, "another task waits"
    assert state.claim(kind, "chatcmpl-cb", "task-1", 0, lease_seconds=30) == BUSY, "a second copy of the same attempt waits"
    state.failed(kind, "chatcmpl-cb", "task-1:0", "HTTP 500", final=False, keep_lease=30)
    assert requests.get("chatcmpl-cb")["callback_status"] == "pending"
    assert state.claim(kind, "chatcmpl-cb", "task-2", 0, lease_seconds=30) == BUSY, "the lease is kept through the backoff"
    assert state.claim(kind, "chatcmpl-cb", "task-1", 1, lease_seconds=30) == 2, "the task's retry goes on"
    state.delivered(kind, "chatcmpl-cb", "task-1:1")
    fields = requests.get("chatcmpl-cb")
    assert fields["callback_status"] == "delivered" and fields["callback_attempts"] == "2" and fields["callback_delivered_at"]
    assert state.claim(kind, "chatcmpl-cb", "task-2", 0, lease_seconds=30) == SETTLED
    requests.record("chatcmpl-gone", queue="q", body={}, callback_url="http://127.0.0.1:9/hook")
    assert state.claim(kind, "chatcmpl-gone", "task-3", 0, lease_seconds=30) == 1
    state.failed(kind, "chatcmpl-gone", "task-3:0", "ConnectError", final=True)
    assert requests.get("chatcmpl-gone")["callback_status"] == "failed"
    assert state.claim(kind, "chatcmpl-gone", "task-3", 1, lease_seconds=30) == SETTLED


def test_the_outbox_sends_again_only_what_is_neither_settled_nor_under_way(states: tuple[Callbacks, Requests]) -> None:
    state, requests = states
    kind = callbacks.CHAT_COMPLETION
    for request_id in ("chatcmpl-lost", "chatcmpl-busy", "chatcmpl-done"):
        requests.record(request_id, queue="q", body={}, callback_url="http://127.0.0.1:9/hook")
        requests.store_result(request_id, {"id": request_id})
    event = requests.get("chatcmpl-lost")["callback_event"]
    assert event and "-" in event, "the notification's id is kept as the event id"
    later = time.time() + 3600
    assert state.due(time.time()) == [], "the relay has its grace period first"
    state.claim(kind, "chatcmpl-busy", "task-b", 0, lease_seconds=30)
    state.claim(kind, "chatcmpl-done", "task-d", 0, lease_seconds=30)
    state.delivered(kind, "chatcmpl-done", "task-d:0")
    assert state.due(later) == [(kind, "chatcmpl-lost", event)]
    assert state.due(later) == [], "looked at again only after another grace period"
    requests.redis.delete("chatbatch:request:chatcmpl-lost")  # its record expired
    assert state.due(later + 3600) == [], "the busy one's attempt is under way, the lost one's record is gone"
    assert requests.redis.zcard("chatbatch:callbacks:due") == 1, "only the busy one is left to watch"
    state.failed(kind, "chatcmpl-lost", "task-x:0", "HTTP 500", final=True)
    assert requests.get("chatcmpl-lost") == {}, "settling never brings back an expired record"


@dataclass
class Receiver:
    """A real local HTTP receiver that answers 500 to the first call of each object."""

    calls: list[tuple[dict[str, str], bytes, int]] = field(default_factory=list)
    port: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def of(self, object_id: str) -> list[tuple[dict[str, str], bytes, int]]:
        with self.lock:
            return [call for call in self.calls if call[0]["X-Chatbatch-Object-Id"] == object_id]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers["Content-Length"]))
            headers = {k: v for k, v in self.headers.items()}
            with state.lock:
                first = not any(c[0]["X-Chatbatch-Object-Id"] == headers["X-Chatbatch-Object-Id"] for c in state.calls)
                status = 500 if first else 200
                state.calls.append((headers, body, status))
            self.send_response(status)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield state
    server.shutdown()


def _signed(headers: dict[str, str], body: bytes) -> bool:
    fields = dict(part.split("=", 1) for part in headers["X-Chatbatch-Signature"].split(","))
    expected = hmac.new(CALLBACK_SECRET.encode(), f"{fields['t']}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, fields["v1"])


def test_the_fleet_calls_back_a_request_and_a_batch_once_each_with_no_gateway(
    aof_redis: RedisServer, base_env: dict[str, str], tiny_model: Path, receiver: Receiver, tmp_path: Path
) -> None:
    env = {**base_env, "CHATBATCH_REDIS_URL": aof_redis.url, "CHATBATCH_HEARTBEAT_INTERVAL": "1", "CHATBATCH_CALLBACK_ALLOW": LOOPBACK}
    worker = Worker(env, tmp_path / "worker.log", "--model", str(tiny_model))
    try:
        worker.wait_ready(MODEL, aof_redis.client())
        client = Client(Settings(redis_url=aof_redis.url, callback_secret=CALLBACK_SECRET, callback_allow=LOOPBACK))
        hook = f"http://127.0.0.1:{receiver.port}/hook"
        request = client.submit(user("call me back", max_tokens=3), callback_url=hook)
        source = tmp_path / "in.jsonl"
        source.write_text("\n".join(batch_line(f"c{i}", user(f"line {i}", max_tokens=2)) for i in range(3)) + "\n")
        job = client.submit_file(str(source), callback_url=hook)

        def delivered(fields: dict[str, str]) -> bool:
            return fields.get("callback_status") == "delivered"

        wait_for(lambda: delivered(client.requests.get(request.id)), 60, "the request's callback")
        wait_for(lambda: job.status().callback is not None and job.status().callback.status == "delivered", 60, "the batch's callback")  # type: ignore[union-attr]
        # One more object through the same fleet: any repeat of the first two would have come by now.
        later = client.submit(user("and me", max_tokens=2), callback_url=hook)
        wait_for(lambda: delivered(client.requests.get(later.id)), 60, "the last callback")
    finally:
        worker.stop()

    for object_id in (request.id, job.id):
        calls = receiver.of(object_id)
        assert [status for _, _, status in calls] == [500, 200], "one failure, one retry, one success"
        (first, _, _), (second, body, _) = calls
        assert first["X-Chatbatch-Event-Id"] == second["X-Chatbatch-Event-Id"], "a retry carries its event's id"
        assert [first["X-Chatbatch-Attempt"], second["X-Chatbatch-Attempt"]] == ["1", "2"]
        assert _signed(first, calls[0][1]) and _signed(second, body)
        assert calls[0][1] == body, "the retry sends the same body"
    assert ChatCompletion.model_validate_json(receiver.of(request.id)[1][1]).id == request.id
    sent = BatchJob.model_validate(json.loads(receiver.of(job.id)[1][1]))
    assert sent.id == job.id and sent.status.value == "completed" and sent.request_counts.completed == 3
    assert receiver.of(request.id)[1][0]["X-Chatbatch-Event"] == "chat.completion"
    assert receiver.of(job.id)[1][0]["X-Chatbatch-Event"] == "batch"
    record = client.requests.get(request.id)
    assert record["callback_attempts"] == "2" and record["callback_last_error"] == ""
