"""Streamed answers (`stream: true`) through `chatbatch serve` and a real worker
(gateway/streams.py, worker/publisher.py): the official openai package's stream, the same text
as the whole answer, usage, n > 1, stop strings, and a client that disconnects."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import openai
import pytest

from chatbatch import keys
from chatbatch.requests import Requests
from tests.conftest import RedisServer, Worker, served_gateway, wait_for

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
