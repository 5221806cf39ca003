"""The producer's Python API (producer/client.py): `Client.stream` against a real worker."""

from __future__ import annotations

import pytest

from chatbatch.exceptions import RequestFailedError
from chatbatch.settings import Settings
from producer.client import Client
from schemas.errors import ErrorCode, RequestError
from tests.conftest import RedisServer, Worker, user


def test_stream_yields_the_answer_as_chunks(tiny_worker: Worker, redis_server: RedisServer) -> None:
    client = Client(Settings(redis_url=redis_server.url))
    body = user("hello there", max_tokens=40, temperature=0)
    whole = client.chat(body, timeout=60)
    chunks = list(client.stream(body, timeout=60))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    assert "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks) == whole.choices[0].message.content
    assert chunks[-1]["choices"][0]["finish_reason"] == whole.choices[0].finish_reason
    assert len({chunk["id"] for chunk in chunks}) == 1 and chunks[0]["object"] == "chat.completion.chunk"
    # The request is recorded as any single request: its result is read by id.
    assert client.request(chunks[0]["id"]).result(timeout=10).choices[0].message.content == whole.choices[0].message.content


def test_closing_the_stream_early_cancels_the_request(tiny_worker: Worker, redis_server: RedisServer) -> None:
    client = Client(Settings(redis_url=redis_server.url))
    chunks = client.stream(user("tell me a long story", max_tokens=200, temperature=0), timeout=60)
    request_id = next(chunks)["id"]
    chunks.close()
    with pytest.raises(RequestFailedError) as caught:
        client.request(request_id).result(timeout=60)
    assert caught.value.code == ErrorCode.cancelled.value


def test_stream_refuses_a_bad_body_at_once(redis_server: RedisServer) -> None:
    client = Client(Settings(redis_url=redis_server.url))
    with pytest.raises(RequestError) as caught:
        client.stream(user("x", n=0))
    assert caught.value.param == "n"
