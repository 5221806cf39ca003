"""The HTTP API, driven by the official openai package, unmodified; callbacks; the stream."""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Annotated, Any

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from chatbatch import keys
from schemas import BatchRequestOutput, ChatCompletion
from tests.conftest import (
    CALLBACK_SECRET,
    CHATBATCH,
    LOOPBACK,
    ROOT,
    RedisServer,
    Worker,
    batch_line,
    free_port,
    user,
    wait_for,
)

KEY_A, KEY_B = "sk-test-alpha", "sk-test-bravo"
SECRET = CALLBACK_SECRET
MODEL = "tiny-llama-chat"


@dataclass
class Gateway:
    url: str
    process: subprocess.Popen[bytes]
    log: Path


@pytest.fixture(scope="module")
def gateway(tiny_worker: Worker, base_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    port = free_port()
    log = tmp_path_factory.mktemp("gateway") / "gateway.log"
    env = {**base_env, "CHATBATCH_API_KEYS": f"{KEY_A},{KEY_B}", "CHATBATCH_CALLBACK_SECRET": SECRET,
           "CHATBATCH_CALLBACK_MAX_ATTEMPTS": "4", "CHATBATCH_CALLBACK_ALLOW": LOOPBACK}
    with log.open("wb") as out:
        process = subprocess.Popen([*CHATBATCH, "serve", "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY_A}"}).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, 60, "the gateway")
    yield Gateway(url=url, process=process, log=log)
    process.terminate()
    process.wait(10)


def _sdk(gateway: Gateway, key: str = KEY_A) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0)


def _batch_file(lines: list[str]) -> bytes:
    return ("\n".join(lines) + "\n").encode()


def test_openai_sdk_end_to_end(gateway: Gateway) -> None:
    sdk = _sdk(gateway)
    assert MODEL in [m.id for m in sdk.models.list()]

    completion = sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=4, temperature=0)
    assert completion.object == "chat.completion" and completion.model == MODEL
    assert completion.usage is not None and completion.usage.completion_tokens <= 4

    lines = [batch_line(f"r{i}", user(f"question {i}", max_tokens=3)) for i in range(6)] + ["{broken"]
    uploaded = sdk.files.create(file=("requests.jsonl", _batch_file(lines)), purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes == len(_batch_file(lines))
    batch = sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"run": "sdk-test"})
    assert batch.metadata == {"run": "sdk-test"} and batch.input_file_id == uploaded.id
    deadline = time.monotonic() + 120
    while batch.status not in ("completed", "failed", "cancelled", "expired"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
        batch = sdk.batches.retrieve(batch.id)
    assert batch.status == "completed"
    assert batch.request_counts is not None and batch.request_counts.completed == 6 and batch.request_counts.failed == 1
    assert batch.output_file_id and batch.error_file_id
    outputs = [BatchRequestOutput.model_validate_json(x) for x in sdk.files.content(batch.output_file_id).text.splitlines()]
    assert [o.custom_id for o in outputs] == [f"r{i}" for i in range(6)]
    for output in outputs:
        assert output.response is not None
        ChatCompletion.model_validate(output.response.body)
    errors = [BatchRequestOutput.model_validate_json(x) for x in sdk.files.content(batch.error_file_id).text.splitlines()]
    assert [(e.error.code.value, e.error.line) for e in errors if e.error] == [("invalid_json", 7)]

    assert batch.id in [b.id for b in sdk.batches.list(limit=100)]
    assert uploaded.id in [f.id for f in sdk.files.list()]

    slow = sdk.files.create(file=("slow.jsonl", _batch_file([batch_line(f"s{i}", user("long", max_tokens=200, temperature=0.9)) for i in range(300)])), purpose="batch")
    second = sdk.batches.create(input_file_id=slow.id, endpoint="/v1/chat/completions", completion_window="24h")
    cancelled = sdk.batches.cancel(second.id)
    assert cancelled.status in ("cancelling", "cancelled")
    wait_for(lambda: sdk.batches.retrieve(second.id).status == "cancelled", 60, "the cancel")
    final = sdk.batches.retrieve(second.id)
    assert final.request_counts is not None and final.request_counts.total == 300
    assert final.request_counts.completed + final.request_counts.failed == 300

    assert sdk.files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        sdk.files.retrieve(uploaded.id)

    with pytest.raises(openai.AuthenticationError):
        _sdk(gateway, "sk-wrong").models.list()
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], stream=False, modalities=["text", "audio"])
    assert caught.value.code == "unsupported_parameter"
    with pytest.raises(openai.NotFoundError) as missing:
        sdk.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert missing.value.code == "model_not_found"


class Point(BaseModel):
    x: Annotated[int, Field(ge=-9, le=9)]
    ok: bool


WEATHER_TOOL: Any = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"], "additionalProperties": False}}}


def test_the_openai_package_drives_every_request_feature(gateway: Gateway) -> None:
    sdk = _sdk(gateway)
    messages: Any = [{"role": "developer", "content": "answer briefly"}, {"role": "user", "content": "a point"}]
    parsed = sdk.chat.completions.parse(model=MODEL, messages=messages, response_format=Point, max_tokens=60, temperature=0)
    assert isinstance(parsed.choices[0].message.parsed, Point)

    scored = sdk.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2,
                                         presence_penalty=0.5, frequency_penalty=0.5, logit_bias={"7": -100})
    logprobs = scored.choices[0].logprobs
    assert logprobs is not None and logprobs.content
    assert all(entry.logprob <= 0 and len(entry.top_logprobs) == 2 for entry in logprobs.content)

    required = sdk.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL], tool_choice="required",
                                           parallel_tool_calls=False, max_tokens=60, temperature=0)
    call = (required.choices[0].message.tool_calls or [])[0]
    assert required.choices[0].finish_reason == "tool_calls" and call.type == "function"
    assert call.function.name == "get_weather" and "city" in json.loads(call.function.arguments)  # type: ignore[union-attr]
    named = sdk.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL], max_tokens=60, temperature=0,
                                        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert (named.choices[0].message.tool_calls or [])[0].function.name == "get_weather"  # type: ignore[union-attr]

    with pytest.raises(openai.BadRequestError) as refused:
        sdk.chat.completions.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": [
            {"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}])
    assert refused.value.code == "invalid_request" and "images are not supported by this model" in str(refused.value)


def test_one_key_cannot_see_another_keys_objects(gateway: Gateway) -> None:
    alpha, bravo = _sdk(gateway, KEY_A), _sdk(gateway, KEY_B)
    uploaded = alpha.files.create(file=("a.jsonl", _batch_file([batch_line("a", user("hi", max_tokens=2))])), purpose="batch")
    batch = alpha.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        bravo.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        bravo.files.retrieve(uploaded.id)
    with pytest.raises(openai.NotFoundError):
        bravo.files.content(uploaded.id)
    with pytest.raises(openai.NotFoundError):
        bravo.batches.cancel(batch.id)
    with pytest.raises(openai.NotFoundError):
        bravo.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert batch.id not in [b.id for b in bravo.batches.list(limit=100)]
    assert uploaded.id not in [f.id for f in bravo.files.list()]
    assert alpha.batches.retrieve(batch.id).id == batch.id


@dataclass
class Receiver:
    """A real local HTTP receiver that fails its first call with 500."""

    calls: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    fail_first: int = 1
    port: int = 0


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers["Content-Length"]))
            state.calls.append(({k: v for k, v in self.headers.items()}, body))
            self.send_response(500 if len(state.calls) <= state.fail_first else 200)
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
    expected = hmac.new(SECRET.encode(), f"{fields['t']}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, fields["v1"]) and abs(time.time() - int(fields["t"])) < 300


def test_async_request_callback_is_signed_and_retried(gateway: Gateway, receiver: Receiver) -> None:
    headers = {"Authorization": f"Bearer {KEY_A}", "X-Chatbatch-Async": "true",
               "X-Chatbatch-Callback-Url": f"http://127.0.0.1:{receiver.port}/hook"}
    answer = httpx.post(f"{gateway.url}/v1/chat/completions", json=user("call me back", max_tokens=3), headers=headers)
    assert answer.status_code == 202
    request_id = answer.json()["id"]
    wait_for(lambda: len(receiver.calls) >= 2, 60, "the retried callback")
    first, second = receiver.calls[:2]
    assert first[1] == second[1], "the retry sends the same body"
    body = ChatCompletion.model_validate_json(second[1])
    assert body.id.startswith("chatcmpl-")
    assert _signed(second[0], second[1]) and second[0]["X-Chatbatch-Event"] == "chat.completion"
    assert not _signed({"X-Chatbatch-Signature": second[0]["X-Chatbatch-Signature"]}, second[1] + b" ")

    auth = {"Authorization": f"Bearer {KEY_A}"}
    wait_for(lambda: httpx.get(f"{gateway.url}/v1/chat/requests/{request_id}", headers=auth).json()["callback"]["status"] == "delivered", 30, "the delivery state")
    record = httpx.get(f"{gateway.url}/v1/chat/requests/{request_id}", headers=auth).json()
    assert record["status"] == "completed" and record["callback"]["attempts"] == 2
    assert record["callback"]["delivered_at"] is not None
    polled = httpx.get(f"{gateway.url}/v1/chat/completions/{request_id}", headers=auth)
    assert polled.status_code == 200 and polled.json() == json.loads(second[1])
    other = httpx.get(f"{gateway.url}/v1/chat/requests/{request_id}", headers={"Authorization": f"Bearer {KEY_B}"})
    assert other.status_code == 404 and other.json()["error"]["code"] == "not_found"


def test_batch_callback_and_delivery_state(gateway: Gateway, receiver: Receiver) -> None:
    sdk = _sdk(gateway)
    uploaded = sdk.files.create(file=("cb.jsonl", _batch_file([batch_line("a", user("hi", max_tokens=2))])), purpose="batch")
    batch = sdk.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h",
        extra_headers={"X-Chatbatch-Callback-Url": f"http://127.0.0.1:{receiver.port}/batches"},
    )
    wait_for(lambda: len(receiver.calls) >= 2, 60, "the batch callback")
    headers, body = receiver.calls[1]
    assert _signed(headers, body) and headers["X-Chatbatch-Event"] == "batch"
    sent = json.loads(body)
    assert sent["id"] == batch.id and sent["status"] == "completed" and sent["object"] == "batch"
    wait_for(lambda: (sdk.batches.retrieve(batch.id).model_extra or {}).get("callback", {}).get("status") == "delivered", 30, "the delivery state")
    state = (sdk.batches.retrieve(batch.id).model_extra or {})["callback"]
    assert state["attempts"] == 2 and state["url"].endswith("/batches")


def test_notifications_reach_a_consumer_group(gateway: Gateway, redis_server: RedisServer) -> None:
    r = redis_server.client()
    group = "test-consumers"
    try:
        r.xgroup_create(keys.EVENTS, group, id="$", mkstream=True)
    except Exception:  # the group is left from an earlier run of this test
        pass
    sdk = _sdk(gateway)
    completion = sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "stream me"}], max_tokens=2)
    uploaded = sdk.files.create(file=("n.jsonl", _batch_file([batch_line("n", user("hi", max_tokens=2))])), purpose="batch")
    batch = sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    seen: dict[str, dict[str, str]] = {}

    def read() -> bool:
        answer: Any = r.xreadgroup(group, "c1", {keys.EVENTS: ">"}, count=100, block=500)
        for _, entries in answer or []:
            for entry_id, fields in entries:
                event = {k.decode(): v.decode() for k, v in fields.items()}
                seen[event["id"]] = event
                r.xack(keys.EVENTS, group, entry_id)
        return batch.id in seen

    wait_for(read, 60, "the batch notification")
    assert seen[batch.id] == {"type": "batch", "id": batch.id, "status": "completed"}
    assert any(e["type"] == "chat.completion" and e["status"] == "completed" for e in seen.values())
    assert r.xpending(keys.EVENTS, group)["pending"] == 0
    assert completion.id  # answered through the same queue


def test_every_error_has_openais_body_and_the_auth_scheme_is_any_case(gateway: Gateway) -> None:
    auth = {"Authorization": f"Bearer {KEY_A}"}

    def openai_error(answer: httpx.Response, status: int) -> dict[str, Any]:
        assert answer.status_code == status, answer.text
        error = answer.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        return dict(error)

    broken = httpx.post(f"{gateway.url}/v1/chat/completions", content=b"{not json", headers={**auth, "Content-Type": "application/json"})
    assert openai_error(broken, 400)["code"] == "invalid_json"
    not_an_object = httpx.post(f"{gateway.url}/v1/chat/completions", content=b"[1, 2]", headers={**auth, "Content-Type": "application/json"})
    assert openai_error(not_an_object, 400)["type"] == "invalid_request_error"
    plain_text = httpx.post(f"{gateway.url}/v1/chat/completions", content=b"hello", headers={**auth, "Content-Type": "text/plain"})
    assert openai_error(plain_text, 400)["type"] == "invalid_request_error"
    unknown = httpx.get(f"{gateway.url}/v1/no/such/route", headers=auth)
    assert "/v1/no/such/route" in openai_error(unknown, 404)["message"]
    wrong_method = httpx.delete(f"{gateway.url}/v1/batches", headers=auth)
    assert openai_error(wrong_method, 405)["code"] == "method_not_allowed"
    unknown_field = httpx.post(f"{gateway.url}/v1/batches", json={"input_file_id": "file-x", "endpoint": "/v1/chat/completions", "extra": 1}, headers=auth)
    assert openai_error(unknown_field, 400)["param"] == "extra"
    assert openai_error(httpx.get(f"{gateway.url}/v1/models", headers={"Authorization": "Bearer sk-wrong"}), 401)["type"] == "authentication_error"
    for scheme in ("bearer", "BEARER", "Bearer"):
        assert httpx.get(f"{gateway.url}/v1/models", headers={"Authorization": f"{scheme} {KEY_A}"}).status_code == 200, scheme
    assert httpx.get(f"{gateway.url}/v1/models/{MODEL}", headers=auth).json()["id"] == MODEL


def _serve(env: dict[str, str], log: Path) -> tuple[str, subprocess.Popen[bytes]]:
    port = free_port()
    with log.open("wb") as out:
        process = subprocess.Popen([*CHATBATCH, "serve", "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"the gateway exited:\n{log.read_text()}")
        try:
            return httpx.get(f"{url}/v1/models").status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, 60, "the gateway")
    return url, process


def test_sigterm_answers_a_waiting_request_503_and_its_result_stays_readable(
    aof_redis: RedisServer, base_env: dict[str, str], tiny_model: Path, tmp_path: Path
) -> None:
    """No worker at first: a synchronous request waits; SIGTERM stops the gateway within 10 s
    with a 503, and once a worker starts the answer is readable by the request's id."""
    env = {**base_env, "CHATBATCH_REDIS_URL": aof_redis.url}
    url, process = _serve(env, tmp_path / "gateway.log")
    answers: list[httpx.Response] = []
    waiting = threading.Thread(target=lambda: answers.append(httpx.post(f"{url}/v1/chat/completions", json=user("wait for me", max_tokens=3), timeout=60)))
    waiting.start()
    r = aof_redis.client()
    wait_for(lambda: r.hlen(keys.PENDING_REQUESTS) == 1, 30, "the request to be enqueued")
    stopped = time.monotonic()
    process.terminate()
    process.wait(10)
    assert time.monotonic() - stopped < 10, "the gateway stopped within 10 s"
    waiting.join(10)
    (answer,) = answers
    assert answer.status_code == 503
    assert answer.headers["x-should-retry"] == "false", "the request goes on: a retry would run it twice"
    error = answer.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "gateway_stopping"
    request_id = answer.headers["X-Chatbatch-Request-Id"]
    assert request_id in error["message"]
    worker = Worker(env, tmp_path / "worker.log", "--model", str(tiny_model))
    try:
        worker.wait_ready(MODEL, r)
        from chatbatch.settings import Settings
        from producer import Client

        completion = Client(Settings(redis_url=aof_redis.url)).request(request_id).result(timeout=60)
        assert completion.id == request_id and completion.choices[0].message.content is not None
    finally:
        worker.stop()


def test_an_async_request_with_no_worker_says_so_in_its_record(aof_redis: RedisServer, base_env: dict[str, str], tmp_path: Path) -> None:
    url, process = _serve({**base_env, "CHATBATCH_REDIS_URL": aof_redis.url}, tmp_path / "gateway.log")
    try:
        answer = httpx.post(f"{url}/v1/chat/completions", json=user("anyone?", max_tokens=2), headers={"X-Chatbatch-Async": "true"})
        assert answer.status_code == 202
        record = answer.json()
        assert record["status"] == "queued" and "no live worker consumes 'chatbatch'" in record["waiting"]
        assert "chatbatch worker" in record["waiting"]
        again = httpx.get(f"{url}/v1/chat/requests/{record['id']}").json()
        assert again["waiting"] == record["waiting"]
    finally:
        process.terminate()
        process.wait(10)


def test_a_batch_whose_gateway_stopped_mid_enqueue_is_resumed_by_another(
    aof_redis: RedisServer, base_env: dict[str, str], tiny_model: Path, tmp_path: Path
) -> None:
    env = {**base_env, "CHATBATCH_REDIS_URL": aof_redis.url, "CHATBATCH_HEARTBEAT_INTERVAL": "1", "CHATBATCH_CHUNK_SIZE": "1"}
    r = aof_redis.client()
    worker = Worker(env, tmp_path / "worker.log", "--model", str(tiny_model))
    try:
        worker.wait_ready(MODEL, r)
        url, first = _serve(env, tmp_path / "first.log")
        ids = [f"g{i}" for i in range(3000)]
        content = _batch_file([batch_line(cid, user("x", max_tokens=1)) for cid in ids])
        uploaded = httpx.post(f"{url}/v1/files", files={"file": ("big.jsonl", content)}, data={"purpose": "batch"}).json()
        batch = httpx.post(f"{url}/v1/batches", json={"input_file_id": uploaded["id"], "endpoint": "/v1/chat/completions"}).json()
        wait_for(lambda: r.hlen(keys.job_inputs(batch["id"])) > 20, 60, "enqueueing to be under way", interval=0.01)
        first.terminate()
        first.wait(10)
        assert r.hget(keys.job(batch["id"]), "enqueued") == b"0", "stopped before it enqueued everything"
        url, second = _serve(env, tmp_path / "second.log")
        try:
            wait_for(lambda: httpx.get(f"{url}/v1/batches/{batch['id']}").json()["status"] == "completed", 180, "the resumed batch")
            final = httpx.get(f"{url}/v1/batches/{batch['id']}").json()
            assert final["request_counts"] == {"total": 3000, "completed": 3000, "failed": 0}
            lines = [BatchRequestOutput.model_validate_json(x) for x in httpx.get(f"{url}/v1/files/{final['output_file_id']}/content").text.splitlines()]
            assert [line.custom_id for line in lines] == ids
        finally:
            second.terminate()
            second.wait(10)
    finally:
        worker.stop()


def test_a_batch_takes_its_priority_from_the_header_or_its_metadata(gateway: Gateway) -> None:
    sdk = _sdk(gateway)
    uploaded = sdk.files.create(file=("p.jsonl", _batch_file([batch_line("p0", user("hi", max_tokens=2))])), purpose="batch")

    def create(**extra: Any) -> Any:
        return sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h", **extra)

    def priority(batch: Any) -> str:
        return str((batch.model_extra or {})["priority"])

    assert priority(create(extra_headers={"X-Chatbatch-Priority": "high"})) == "high"
    assert priority(create(metadata={"priority": "low"})) == "low"
    # Another value there is the caller's own metadata.
    mine = create(metadata={"priority": "urgent"})
    assert priority(mine) == "normal" and mine.metadata == {"priority": "urgent"}
    with pytest.raises(openai.BadRequestError) as caught:
        create(extra_headers={"X-Chatbatch-Priority": "urgent"})
    assert "X-Chatbatch-Priority" in str(caught.value)


def test_a_strict_schema_outside_openais_subset_is_a_400_naming_the_rule(gateway: Gateway) -> None:
    sdk = _sdk(gateway)
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}, "required": ["name"], "additionalProperties": False}
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=5,
                                    response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema, "strict": True}})
    error = caught.value.body
    assert isinstance(error, dict) and error["code"] == "invalid_request"
    assert error["param"] == "response_format.json_schema.schema.properties.age"
    assert "'required' must list every property in strict mode" in error["message"]
    answer = sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=40, temperature=0,
                                         response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}})
    assert answer.choices[0].finish_reason in ("stop", "length"), "the same schema without strict is served"
