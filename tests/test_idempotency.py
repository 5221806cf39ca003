"""Idempotency keys (chatbatch/idempotency.py) on real Redis, through the Python API and a real
gateway and worker: a repeat gets the first call's request, stream, batch or file, and never
runs a second time; a key sent with another body is refused; a streamed call with a key that
disconnects is not cancelled, so its retry follows it from the start."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from chatbatch import keys
from chatbatch.exceptions import IdempotencyConflictError, IdempotencyKeyError
from chatbatch.idempotency import CHAT, Idempotency, body_digest
from chatbatch.requests import Requests
from chatbatch.settings import Settings
from producer.client import Client
from tests.conftest import RedisServer, Worker, batch_line, served_gateway, wait_for

MODEL = "tiny-llama-chat"


@pytest.fixture(scope="module")
def gateway(tiny_worker: Worker, base_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with served_gateway(base_env, tmp_path_factory.mktemp("gateway") / "gateway.log") as url:
        yield url


def _body(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], "temperature": 0, **extra}


def test_a_claim_names_the_first_calls_object_per_owner_and_kind(redis_server: RedisServer) -> None:
    claims = Idempotency(redis_server.client(), ttl=60)
    digest = body_digest({"b": 1, "a": [1, 2]})
    assert digest == body_digest({"a": [1, 2], "b": 1})  # the keys' order is not part of the intent
    assert claims.claim(CHAT, "alice", "key-1", digest=digest, object_id="first") == "first"
    assert claims.claim(CHAT, "alice", "key-1", digest=digest, object_id="second") == "first"
    # Another owner's, or another kind's, same key is another intent.
    assert claims.claim(CHAT, "bob", "key-1", digest=digest, object_id="bobs") == "bobs"
    assert claims.claim("batches", "alice", "key-1", digest=digest, object_id="batch") == "batch"
    with pytest.raises(IdempotencyConflictError, match="different body"):
        claims.claim(CHAT, "alice", "key-1", digest=body_digest({"a": 2}), object_id="third")
    with pytest.raises(IdempotencyKeyError, match="printable ASCII"):
        claims.claim(CHAT, "alice", "x" * 256, digest=digest, object_id="fourth")
    # A release drops only the claim of the object named.
    claims.release(CHAT, "alice", "key-1", "second")
    assert claims.claim(CHAT, "alice", "key-1", digest=digest, object_id="fifth") == "first"
    claims.release(CHAT, "alice", "key-1", "first")
    assert claims.claim(CHAT, "alice", "key-1", digest=digest, object_id="sixth") == "sixth"
    # The owner and key are kept only as a digest.
    assert not any(b"alice" in key or b"key-1" in key for key in redis_server.client().scan_iter(match="chatbatch:idempotency:*"))


def test_the_python_api_runs_a_keyed_request_once(tiny_worker: Worker, redis_server: RedisServer) -> None:
    client = Client(Settings(redis_url=redis_server.url))
    first = client.submit(_body("once, please", max_tokens=6), idempotency_key="api-once")
    again = client.submit(_body("once, please", max_tokens=6), idempotency_key="api-once")
    assert again.repeat and not first.repeat and again.id == first.id
    assert first.result(60).choices[0].message.content == again.result(60).choices[0].message.content
    assert int(redis_server.client().get(keys.request_deliveries(first.id)) or 0) == 1
    with pytest.raises(IdempotencyConflictError):
        client.submit(_body("another intent", max_tokens=6), idempotency_key="api-once")
    # An invalid body claims nothing: the corrected call with the same key runs.
    with pytest.raises(Exception, match="temperature"):
        client.submit(_body("fixed", temperature=9), idempotency_key="api-fixed")
    assert not client.submit(_body("fixed", max_tokens=4), idempotency_key="api-fixed").repeat


def test_concurrent_repeats_over_http_get_one_answer_from_one_run(gateway: str, redis_server: RedisServer) -> None:
    sdk = openai.OpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0)
    body = _body("tell me a long story", max_tokens=120)
    answers: list[Any] = []

    def call() -> None:
        answers.append(sdk.chat.completions.with_raw_response.create(**body, extra_headers={"Idempotency-Key": "http-once"}))

    threads = [threading.Thread(target=call) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    ids = {answer.headers["x-chatbatch-request-id"] for answer in answers}
    assert len(answers) == 3 and len(ids) == 1
    (request_id,) = ids
    assert {answer.parse().choices[0].message.content for answer in answers} == {answers[0].parse().choices[0].message.content}
    assert int(redis_server.client().get(keys.request_deliveries(request_id)) or 0) == 1

    reused = httpx.post(f"{gateway}/v1/chat/completions", json=_body("another", max_tokens=4), headers={"Idempotency-Key": "http-once"})
    assert reused.status_code == 422 and reused.json()["error"]["code"] == "idempotency_key_reused"
    malformed = httpx.post(f"{gateway}/v1/chat/completions", json=body, headers={"Idempotency-Key": "x" * 300})
    assert malformed.status_code == 400 and "Idempotency-Key" in malformed.json()["error"]["message"]


def test_a_keyed_stream_that_disconnects_goes_on_and_its_retry_follows_it(gateway: str, redis_server: RedisServer) -> None:
    sdk = openai.OpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0)
    body = _body("tell me a long story", max_tokens=150)
    whole = sdk.chat.completions.create(**body).choices[0].message.content
    headers = {"Idempotency-Key": "stream-retry"}
    stream = sdk.chat.completions.create(**body, stream=True, extra_headers=headers)
    chunks = iter(stream)
    request_id = next(chunks).id
    next(chunks)
    stream.close()  # the client's own timeout, say
    retried = list(sdk.chat.completions.create(**body, stream=True, extra_headers=headers))
    assert {chunk.id for chunk in retried} == {request_id}
    assert "".join(chunk.choices[0].delta.content or "" for chunk in retried if chunk.choices) == whole
    stored = Requests(redis_server.client(), result_ttl=60).wait(request_id, 60)
    assert stored is not None and "error" not in stored, stored
    assert not redis_server.client().hget(keys.request(request_id), "disconnected")


def test_a_repeated_upload_and_batch_make_one_file_and_one_batch(gateway: str, tmp_path: Path) -> None:
    sdk = openai.OpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0)
    content = (batch_line("a", _body("hi", max_tokens=3)) + "\n").encode()
    before = {item.id for item in sdk.files.list()}
    files = [sdk.files.create(file=("in.jsonl", content), purpose="batch", extra_headers={"Idempotency-Key": "upload-1"}) for _ in range(2)]
    assert files[0].id == files[1].id
    assert {item.id for item in sdk.files.list()} - before == {files[0].id}  # the repeat's copy was dropped
    other = b'{"custom_id": "b", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": []}}\n'
    refused = httpx.post(f"{gateway}/v1/files", files={"file": ("in.jsonl", other)}, data={"purpose": "batch"}, headers={"Idempotency-Key": "upload-1"})
    assert refused.status_code == 422, refused.text

    create = {"input_file_id": files[0].id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    batches = [sdk.batches.create(**create, extra_headers={"Idempotency-Key": "batch-1"}) for _ in range(2)]  # type: ignore[arg-type]
    assert batches[0].id == batches[1].id
    listed = [batch.id for batch in sdk.batches.list(limit=100)]
    assert listed.count(batches[0].id) == 1
    changed = httpx.post(f"{gateway}/v1/batches", json={**create, "metadata": {"run": "2"}}, headers={"Idempotency-Key": "batch-1"})
    assert changed.status_code == 422, changed.text
    wait_for(lambda: sdk.batches.retrieve(batches[0].id).status == "completed", 120, "the batch")


def test_repeats_that_find_the_first_object_gone_make_one_object_between_them(redis_server: RedisServer) -> None:
    """The key's first call claimed it and died before making its object: of two repeats that
    find it gone, one takes the claim and makes the object; the other gets that object."""
    claims = Idempotency(redis_server.client(), ttl=60)
    digest = body_digest({"file": "a"})
    claims.claim("files", "carol", "gone-1", digest=digest, object_id="never-made")
    made: dict[str, str] = {}
    outcomes: dict[str, Any] = {}

    def repeat(name: str) -> None:
        found = claims.first("files", "carol", "gone-1", digest=digest, object_id=name, find=made.get)
        if found is None:
            made[name] = f"object of {name}"
        outcomes[name] = found

    threads = [threading.Thread(target=repeat, args=(name,)) for name in ("second", "third")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(made) == 1, made
    (maker,) = made
    assert outcomes == {maker: None, ({"second", "third"} - {maker}).pop(): made[maker]}
