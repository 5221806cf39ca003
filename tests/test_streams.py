"""Following a streamed request's entries (chatbatch/streams.py): chunks passed through, the
end, errors, and a redelivery mid-stream."""

from __future__ import annotations

import json
from typing import Any

from chatbatch.streams import CHUNKS, END, ERROR, StreamFollower, completion_chunks, stopped_message


def _entry(delivery: int, kind: str, data: Any = None) -> dict[bytes, bytes]:
    fields = {b"delivery": str(delivery).encode(), b"kind": kind.encode()}
    if data is not None:
        fields[b"data"] = json.dumps(data).encode()
    return fields


def _chunk(text: str) -> dict[str, Any]:
    return {"id": "r", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}}]}


COMPLETION = {
    "id": "r", "object": "chat.completion", "created": 7, "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop", "logprobs": None}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}


def test_chunks_pass_through_until_the_end() -> None:
    follower = StreamFollower("r")
    assert follower.take(_entry(1, CHUNKS, [_chunk("a"), _chunk("b")])) == [_chunk("a"), _chunk("b")]
    assert not follower.ended
    assert follower.take(_entry(1, END)) == []
    assert follower.ended
    assert follower.take(_entry(1, CHUNKS, [_chunk("c")])) == []


def test_an_error_entry_ends_the_stream() -> None:
    follower = StreamFollower("r")
    error = {"code": "internal_error", "message": "boom", "param": None}
    assert follower.take(_entry(1, ERROR, error)) == [{"error": error}]
    assert follower.ended


def test_a_reader_that_passed_nothing_follows_the_newer_delivery() -> None:
    follower = StreamFollower("r")
    assert follower.take(_entry(1, CHUNKS, [])) == []
    assert follower.take(_entry(2, CHUNKS, [_chunk("x")])) == [_chunk("x")]
    assert follower.take(_entry(1, CHUNKS, [_chunk("late")])) == []  # the older delivery is left
    assert follower.delivery == 2


def test_a_reader_that_passed_content_of_a_dead_delivery_ends_with_an_error() -> None:
    follower = StreamFollower("r")
    follower.take(_entry(1, CHUNKS, [_chunk("a")]))
    events = follower.take(_entry(2, CHUNKS, [_chunk("a")]))
    assert events == [{"error": {"code": "internal_error", "message": stopped_message("r"), "param": None}}]
    assert "GET /v1/chat/completions/r" in stopped_message("r")
    assert follower.ended


def test_a_result_stored_without_a_stream_end() -> None:
    unread = StreamFollower("r", usage=True)
    chunks = unread.settle(COMPLETION)
    assert chunks == completion_chunks("r", COMPLETION, usage=True)
    assert [c["choices"][0]["delta"] for c in chunks[:3]] == [{"role": "assistant", "content": "", "refusal": None}, {"content": "hi"}, {}]
    assert chunks[2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == COMPLETION["usage"]
    assert all(c["usage"] is None for c in chunks[:-1])
    marked = completion_chunks("r", {**COMPLETION, "service_tier": "flex", "system_fingerprint": "fp_0123456789"}, usage=True)
    assert {(c["service_tier"], c["system_fingerprint"]) for c in marked} == {("flex", "fp_0123456789")}

    refused = StreamFollower("r")
    error = {"code": "context_length_exceeded", "message": "too long", "param": "messages"}
    assert refused.settle({"error": error}) == [{"error": error}]

    calls = [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    called = {**COMPLETION, "choices": [{"index": 0, "message": {"role": "assistant", "content": None, "tool_calls": calls},
                                         "finish_reason": "tool_calls", "logprobs": None}]}
    deltas = [c["choices"][0] for c in completion_chunks("r", called, usage=False)]
    assert deltas[1]["delta"] == {"tool_calls": [{"index": 0, **calls[0]}]}
    assert deltas[2]["finish_reason"] == "tool_calls"

    halfway = StreamFollower("r")
    halfway.take(_entry(1, CHUNKS, [_chunk("h")]))
    assert halfway.settle(COMPLETION)[0]["error"]["message"] == stopped_message("r")
