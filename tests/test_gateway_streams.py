"""Streamed answers (`stream: true`) through `chatbatch serve` and a real worker
(gateway/streams.py, worker/service/publisher.py): the official openai package's stream, the same text
as the whole answer, usage, n > 1, stop strings, a client that disconnects, and streams and
waits that outlive a worker holding back its first token for longer than redis-py's default
socket timeout (5 s in redis-py 8), with keep-alive comments meanwhile."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis

from chatbatch import keys
from chatbatch.requests import Requests
from chatbatch.settings import Settings
from producer.client import Client
from tests.conftest import RedisServer, Worker, served_gateway, start_redis, wait_for

MODEL = "tiny-llama-chat"
#: Most of the tiny model's context (256 tokens) after a short prompt.
LONG = 200


@dataclass
class Gateway:
    url: str


@pytest.fixture(scope="module")
def gateway(tiny_worker: Worker, base_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with served_gateway(base_env, tmp_path_factory.mktemp("gateway") / "gateway.log") as url:
        yield Gateway(url=url)


def _sdk(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)


def _joined(chunks: list[Any]) -> dict[int, str]:
    texts: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
    return texts


def _body(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], "temperature": 0, **extra}


def test_chunks_come_as_generated_and_join_to_the_answer(gateway: Gateway, redis_server: RedisServer) -> None:
    sdk = _sdk(gateway)
    body = _body("tell me a long story", max_tokens=LONG)
    whole = sdk.chat.completions.create(**body)
    assert whole.usage is not None and whole.usage.completion_tokens == LONG  # no early EOS: a long answer

    stream = sdk.chat.completions.create(**body, stream=True)
    first = next(iter(stream))
    # The first chunk is here while the request is still unanswered (its result not stored).
    assert not redis_server.client().exists(keys.result(first.id))
    chunks = [first, *stream]
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert {chunk.id for chunk in chunks} == {first.id} and {chunk.model for chunk in chunks} == {MODEL}
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert _joined(chunks) == {0: whole.choices[0].message.content}
    # Many deltas: the text came as it was generated, not at the end.
    assert sum(1 for chunk in chunks if chunk.choices and chunk.choices[0].delta.content) > 10
    last = chunks[-1].choices[0]
    assert last.finish_reason == "length" and last.delta.content is None
    assert all(chunk.choices[0].finish_reason is None for chunk in chunks[:-1])
    # The stream's end is written just before the result is stored; the stored result is the answer.
    stored = Requests(redis_server.client(), result_ttl=60).wait(first.id, 30)
    assert stored is not None and stored["choices"][0]["message"]["content"] == whole.choices[0].message.content


def test_stop_strings_and_undecodable_bytes_stream_as_the_answer(gateway: Gateway) -> None:
    """The random model's byte tokens make text whose bytes only decode together, or never
    (U+FFFD in the answer): the stream must still join to the answer. (Multi-byte characters
    split over tokens: tests/test_detokenizer.py, with the same tokenizer.)"""
    sdk = _sdk(gateway)
    for prompt in ("hello", "tell me a long story", "question 3", "batch inference"):
        text = sdk.chat.completions.create(**_body(prompt, max_tokens=60)).choices[0].message.content or ""
        if any(ord(c) > 127 for c in text):
            break
    else:
        pytest.fail("none of the prompts gives a greedy answer with bytes outside ASCII")
    streamed = _joined(list(sdk.chat.completions.create(**_body(prompt, max_tokens=60), stream=True)))
    assert streamed == {0: text}

    stop = text[len(text) // 2 : len(text) // 2 + 3]
    stopped = sdk.chat.completions.create(**_body(prompt, max_tokens=60, stop=[stop]))
    assert stopped.choices[0].finish_reason == "stop" and stop not in (stopped.choices[0].message.content or "")
    chunks = list(sdk.chat.completions.create(**_body(prompt, max_tokens=60, stop=[stop]), stream=True))
    assert _joined(chunks) == {0: stopped.choices[0].message.content}
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_usage_and_two_choices(gateway: Gateway) -> None:
    sdk = _sdk(gateway)
    body = _body("hello", max_tokens=12, n=2, temperature=1.0, seed=5)
    whole = sdk.chat.completions.create(**body)
    chunks = list(sdk.chat.completions.create(**body, stream=True, stream_options={"include_usage": True}))
    assert _joined(chunks) == {choice.index: choice.message.content for choice in whole.choices}
    assert {chunk.choices[0].index for chunk in chunks if chunk.choices} == {0, 1}
    assert all(chunk.usage is None for chunk in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and whole.usage is not None
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert chunks[-1].usage.prompt_tokens_details is not None
    finishes = [choice for chunk in chunks for choice in chunk.choices if choice.finish_reason]
    assert sorted(choice.index for choice in finishes) == [0, 1]


def test_errors_before_the_stream_are_json(gateway: Gateway) -> None:
    sdk = _sdk(gateway)
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(**{**_body("x"), "model": "nobody-serves-this"}, stream=True)
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(**_body("x"), stream_options={"include_usage": True})
    assert "stream_options" in str(caught.value)


def test_a_client_that_disconnects_frees_its_row(gateway: Gateway, tiny_worker: Worker, redis_server: RedisServer) -> None:
    client = redis_server.client()
    before = tiny_worker.info(client, MODEL)
    sdk = _sdk(gateway)
    stream = sdk.chat.completions.create(**_body("tell me a long story", max_tokens=LONG), stream=True)
    chunks = iter(stream)
    request_id = next(chunks).id
    next(chunks)
    stream.close()
    result = Requests(client, result_ttl=60).wait(request_id, 60)
    assert result is not None and result["error"]["code"] == "cancelled", result
    generated = int(result["error"]["message"].split("(")[1].split()[0])
    assert generated < LONG // 2
    assert client.hget(keys.request(request_id), "disconnected")

    def counted() -> dict[str, Any] | None:
        info = tiny_worker.info(client, MODEL)
        return info if info["cancelled"] > before.get("cancelled", 0) else None  # type: ignore[operator]

    info = wait_for(counted, 30, "the engine's count of cancelled requests")
    assert info["engine"]["rows_running"] == 0


def test_tool_calls_and_logprobs_come_with_the_last_content(gateway: Gateway) -> None:
    sdk = _sdk(gateway)
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"], "additionalProperties": False}}}]
    body = _body("weather?", max_tokens=100, tools=tools, tool_choice="required", parallel_tool_calls=False)
    whole = sdk.chat.completions.create(**body)
    chunks = list(sdk.chat.completions.create(**body, stream=True))
    assert whole.choices[0].finish_reason == "tool_calls" and whole.choices[0].message.tool_calls
    calls = [call for chunk in chunks for choice in chunk.choices for call in choice.delta.tool_calls or []]
    assert [(c.index, c.function.name, c.function.arguments) for c in calls] == [  # type: ignore[union-attr]
        (i, c.function.name, c.function.arguments) for i, c in enumerate(whole.choices[0].message.tool_calls)  # type: ignore[union-attr]
    ]
    assert all(call.id and call.id.startswith("call_") and call.type == "function" for call in calls)
    assert not any(choice.delta.content for chunk in chunks for choice in chunk.choices)  # held, then none
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    body = _body("hello", max_tokens=10, logprobs=True, top_logprobs=2)
    whole = sdk.chat.completions.create(**body)
    chunks = list(sdk.chat.completions.create(**body, stream=True))
    with_logprobs = [choice for chunk in chunks for choice in chunk.choices if choice.logprobs is not None]
    assert len(with_logprobs) == 1 and whole.choices[0].logprobs is not None
    assert with_logprobs[0].logprobs.model_dump() == whole.choices[0].logprobs.model_dump()  # type: ignore[union-attr]
    assert _joined(chunks) == {0: whole.choices[0].message.content}


def test_multi_byte_characters_stream_as_the_answer(gateway: Gateway) -> None:
    """A schema's enum makes the random model write real multi-byte characters (whose bytes its
    byte-level tokens split): the stream joins to the same text, character for character."""
    sdk = _sdk(gateway)
    schema = {"type": "object", "properties": {"word": {"enum": ["日本語のテキスト", "Grüße aus Köln €"]}},
              "required": ["word"], "additionalProperties": False}
    body = _body("a word", max_tokens=80, response_format={"type": "json_schema", "json_schema": {"name": "word", "schema": schema}})
    whole = sdk.chat.completions.create(**body).choices[0].message.content or ""
    assert any(word in whole for word in ("日本語のテキスト", "Grüße aus Köln €")), whole
    chunks = list(sdk.chat.completions.create(**body, stream=True))
    assert _joined(chunks) == {0: whole}
    assert sum(1 for chunk in chunks if chunk.choices and chunk.choices[0].delta.content) > 3, "it came in pieces"


def test_a_forced_call_cut_by_max_tokens_streams_as_the_call_so_far(gateway: Gateway) -> None:
    sdk = _sdk(gateway)
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 40}}, "required": ["city"], "additionalProperties": False}}}]
    for choice, max_tokens in (({"type": "function", "function": {"name": "lookup"}}, 12), ("required", 40)):
        body = _body("weather?", max_tokens=max_tokens, tools=tools, tool_choice=choice)
        whole = sdk.chat.completions.create(**body).choices[0]
        assert whole.finish_reason == "length" and whole.message.content is None, whole
        assert [call.function.name for call in whole.message.tool_calls or []] == ["lookup"], whole  # type: ignore[union-attr]
        arguments = whole.message.tool_calls[0].function.arguments  # type: ignore[index, union-attr]
        assert arguments.startswith('{"city": "'), ("the arguments as far as they were written", whole)
        chunks = list(sdk.chat.completions.create(**body, stream=True))
        assert not any(c.delta.content for chunk in chunks for c in chunk.choices), "no grammar text as content"
        calls = [call for chunk in chunks for c in chunk.choices for call in c.delta.tool_calls or []]
        assert [(call.index, call.function.name, call.function.arguments) for call in calls] == [(0, "lookup", arguments)]  # type: ignore[union-attr]
        assert chunks[-1].choices[0].finish_reason == "length"


#: How long the stalled worker holds back every token: over twice redis-py 8's default socket
#: timeout.
STALL_SECONDS = 11.0


@dataclass
class Stalled:
    """A fleet of its own: Redis, a worker, stopped (SIGSTOP) while the test holds it, and three
    gateways: one with the default settings, one that sends keep-alive comments every second,
    and one that gives up waiting after 1 s."""

    redis: RedisServer
    worker: Worker
    url: str
    pinging_url: str
    impatient_url: str

    def hold(self) -> None:
        os.killpg(self.worker.process.pid, signal.SIGSTOP)

    def release(self) -> None:
        os.killpg(self.worker.process.pid, signal.SIGCONT)


@pytest.fixture(scope="module")
def stalled(tiny_model: Path, base_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stalled]:
    directory = tmp_path_factory.mktemp("stalled")
    server = start_redis(directory / "redis")
    env = {**base_env, "CHATBATCH_REDIS_URL": server.url}
    worker = Worker(env, directory / "worker.log", "--model", str(tiny_model))
    try:
        worker.wait_ready(MODEL, server.client())
        with served_gateway(env, directory / "gateway.log") as url, \
                served_gateway({**env, "CHATBATCH_STREAM_PING_SECONDS": "1"}, directory / "pinging.log") as pinging, \
                served_gateway({**env, "CHATBATCH_GATEWAY_TIMEOUT": "1"}, directory / "impatient.log") as impatient:
            yield Stalled(redis=server, worker=worker, url=url, pinging_url=pinging, impatient_url=impatient)
    finally:
        os.killpg(worker.process.pid, signal.SIGCONT)
        worker.stop()
        server.process.terminate()
        server.process.wait(10)


def _in_thread(target: Any) -> dict[str, Any]:
    """Run `target()` in a thread; the dict gets its "value" or "error", and "first" (seconds
    from the start to its first chunk) when target records it."""
    out: dict[str, Any] = {"started": time.monotonic()}

    def run() -> None:
        try:
            out["value"] = target(out)
        except Exception as error:  # reported by the test's assertions
            out["error"] = error

    out["thread"] = threading.Thread(target=run, daemon=True)
    out["thread"].start()
    return out


def test_streams_and_waits_outlive_a_first_token_held_back(stalled: Stalled) -> None:
    """While the fleet's only worker is stopped, an SDK stream and a plain SDK call (through a
    gateway whose reads block 5 s at a time, as long as redis-py 8's default socket timeout), a
    raw SSE reader (through the gateway that sends keep-alive comments) and the Python API's
    stream all wait over STALL_SECONDS for their first token; every one then ends with the
    whole answer."""
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "temperature": 0, "max_tokens": 8}
    sdk = openai.OpenAI(base_url=f"{stalled.url}/v1", api_key="unused", max_retries=0, timeout=120)
    whole = sdk.chat.completions.create(**body)
    stalled.hold()
    try:
        def sdk_stream(out: dict[str, Any]) -> list[Any]:
            chunks = []
            for chunk in sdk.chat.completions.create(**body, stream=True, stream_options={"include_usage": True}):
                out.setdefault("first", time.monotonic() - out["started"])
                chunks.append(chunk)
            return chunks

        def raw_stream(out: dict[str, Any]) -> list[str]:
            lines = []
            with httpx.stream("POST", f"{stalled.pinging_url}/v1/chat/completions", json={**body, "stream": True}, timeout=120) as answer:
                out["headers"] = answer.headers
                for line in answer.iter_lines():
                    if line.startswith("data:"):
                        out.setdefault("first", time.monotonic() - out["started"])
                    lines.append(line)
            return lines

        def api_stream(out: dict[str, Any]) -> list[dict[str, Any]]:
            chunks = []
            for chunk in Client(Settings(redis_url=stalled.redis.url)).stream(body, timeout=120):
                out.setdefault("first", time.monotonic() - out["started"])
                chunks.append(chunk)
            return chunks

        def plain(out: dict[str, Any]) -> Any:
            return sdk.chat.completions.create(**body)

        runs = {name: _in_thread(target) for name, target in
                (("sdk", sdk_stream), ("raw", raw_stream), ("api", api_stream), ("plain", plain))}
        time.sleep(STALL_SECONDS)  # the stall itself is what is tested: nothing to wait for
        assert all("first" not in run and "error" not in run for run in runs.values()), runs
    finally:
        stalled.release()
    for run in runs.values():
        run["thread"].join(60)
        assert "error" not in run, run.get("error")
    content = whole.choices[0].message.content
    chunks = runs["sdk"]["value"]
    assert runs["sdk"]["first"] > STALL_SECONDS
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]
    # Keep-alive comments came while no chunk did, and proxies are told not to buffer.
    raw = runs["raw"]["value"]
    before_data = raw[: next(i for i, line in enumerate(raw) if line.startswith("data:"))]
    assert before_data.count(": ping") >= STALL_SECONDS - 3, before_data
    assert raw[-1] == "data: [DONE]" or raw[-2] == "data: [DONE]"
    headers = runs["raw"]["headers"]
    assert headers["x-accel-buffering"] == "no" and headers["cache-control"] == "no-cache"
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in runs["api"]["value"] if c["choices"]) == content
    assert runs["plain"]["value"].choices[0].message.content == content


def test_a_waiting_client_that_leaves_cancels_its_request_and_a_504_is_not_retried(stalled: Stalled) -> None:
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "temperature": 0, "max_tokens": 8}
    client = stalled.redis.client()
    earlier = _request_ids(client)
    stalled.hold()
    try:
        # The SDK must not retry a 504 whose request goes on.
        impatient = httpx.post(f"{stalled.impatient_url}/v1/chat/completions", json=body, timeout=30)
        assert impatient.status_code == 504 and impatient.headers["x-should-retry"] == "false"
        ongoing = impatient.headers["x-chatbatch-request-id"]
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{stalled.url}/v1/chat/completions", json=body, timeout=2)
        left = _new_request(client, other_than=earlier | {ongoing})
        wait_for(lambda: client.hget(keys.request(left), "disconnected"), 10, "the disconnect mark")
    finally:
        stalled.release()
    requests = Requests(client, result_ttl=60)
    gone = requests.wait(left, 60)
    assert gone is not None and gone["error"]["code"] == "cancelled", gone
    kept = requests.wait(ongoing, 60)
    assert kept is not None and kept["choices"][0]["message"]["content"], kept


def _request_ids(client: redis.Redis) -> set[str]:
    return {key.decode().rsplit(":", 1)[-1] for key in client.scan_iter(match=keys.request("*"))}


def _new_request(client: redis.Redis, *, other_than: set[str]) -> str:
    def found() -> str | None:
        return next(iter(_request_ids(client) - other_than), None)

    return str(wait_for(found, 10, "the request's record"))


def test_thirty_concurrent_streams_beside_a_busy_batch_job_all_end_whole(gateway: Gateway, redis_server: RedisServer, tmp_path: Path) -> None:
    """30 streams at once (the official AsyncOpenAI client) while a 400-line job keeps the
    worker busy: every stream ends with its whole content, its finish and its usage."""
    import asyncio

    lines = [json.dumps({"custom_id": f"bulk-{i}", "method": "POST", "url": "/v1/chat/completions",
                         "body": _body(f"bulk line {i}", max_tokens=24)}) for i in range(400)]
    sdk = _sdk(gateway)
    upload = sdk.files.create(file=("bulk.jsonl", ("\n".join(lines) + "\n").encode()), purpose="batch")
    batch = sdk.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    wait_for(lambda: sdk.batches.retrieve(batch.id).request_counts.completed > 0, 120, "the job to run")  # type: ignore[union-attr]

    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[str, str, Any, Any]:
        text, finish, usage, request_id = "", None, None, ""
        stream = await client.chat.completions.create(
            **_body(f"stream {i}", max_tokens=16), stream=True, stream_options={"include_usage": True}
        )
        async for chunk in stream:
            request_id = chunk.id
            usage = chunk.usage or usage
            for choice in chunk.choices:
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
        return request_id, text, finish, usage

    async def all_streams() -> list[tuple[str, str, Any, Any]]:
        client = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=300)
        try:
            return await asyncio.gather(*(one(client, i) for i in range(30)))
        finally:
            await client.close()

    results = asyncio.run(all_streams())
    assert sdk.batches.retrieve(batch.id).status != "completed", "the job was still running beside the streams"
    stored = Requests(redis_server.client(), result_ttl=60)
    for request_id, text, finish, usage in results:
        answer = stored.wait(request_id, 60)
        assert answer is not None and "error" not in answer, answer
        assert text == answer["choices"][0]["message"]["content"] and finish == answer["choices"][0]["finish_reason"]
        assert usage is not None and usage.completion_tokens == answer["usage"]["completion_tokens"] > 0
    sdk.batches.cancel(batch.id)
