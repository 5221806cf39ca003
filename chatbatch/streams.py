"""Reading a streamed request's chunks: the entries of its Redis stream, as the worker wrote
them, turned into what a reader passes on (chat.completion.chunk objects, then an end or an
error).

The worker (worker/service/publisher.py) adds to `chatbatch:result:<id>:stream` one entry per batch of
chunks it publishes, an end entry, and an error entry when the request fails; each entry
carries the delivery of the task that wrote it. If a worker dies mid-stream, Celery delivers
the request again and the new delivery streams from its start: a reader that has passed
nothing yet follows the newer delivery; one that has passed chunks of an earlier delivery ends
with an error (its result is still stored, and read by id).

`StreamFollower` holds that logic, free of I/O, for the sync reader here (`follow`, behind
`Client.stream`) and the gateway's async one (gateway/streams.py). Both block on XREAD over the
request's stream and its ready stream (written when the result is stored, after the stream's
last entry): a result stored without a stream end (a request refused before it ran, or a worker
that did not stream it) is answered from the stored result.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import redis

from chatbatch import keys
from chatbatch.redisconn import block_ms, text
from chatbatch.requests import Requests

#: Fields of a stream entry: the delivery that wrote it, its kind, its JSON data.
DELIVERY, KIND, DATA = "delivery", "kind", "data"
#: Kinds of entries: a JSON list of chunks, the end (no data), an error record.
CHUNKS, END, ERROR = "chunks", "end", "error"


def stopped_message(request_id: str) -> str:
    return (
        f"the worker answering this request stopped; its result is read at "
        f"GET /v1/chat/completions/{request_id}"
    )


def chunk(
    request_id: str,
    created: int,
    model: str,
    choices: list[dict[str, Any]],
    *,
    usage: bool,
    totals: dict[str, Any] | None = None,
    tier: str | None = None,
    fingerprint: str | None = None,
) -> dict[str, Any]:
    """A chat.completion.chunk object, with the request's service tier and the worker's
    system_fingerprint, as OpenAI's; with `usage` (include_usage) it has a usage field, null
    but in the last chunk, which carries `totals`."""
    found: dict[str, Any] = {
        "id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
        "service_tier": tier, "system_fingerprint": fingerprint, "choices": choices,
    }
    if usage:
        found["usage"] = totals
    return found


def first_delta() -> dict[str, Any]:
    """The delta of a choice's first chunk: its role, as OpenAI's (no refusal: always null)."""
    return {"role": "assistant", "content": "", "refusal": None}


def choice_delta(index: int, delta: dict[str, Any], finish_reason: str | None = None, logprobs: Any = None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def completion_chunks(request_id: str, completion: dict[str, Any], *, usage: bool) -> list[dict[str, Any]]:
    """A whole chat.completion as the chunks of a stream: per choice, the role, the content
    (or tool calls) with the log probabilities, the finish; then the usage when asked."""
    created, model = int(completion.get("created", 0)), str(completion.get("model", ""))
    marks = {"tier": completion.get("service_tier"), "fingerprint": completion.get("system_fingerprint")}
    chunks = []
    for choice in completion["choices"]:
        index, message = choice["index"], choice["message"]
        chunks.append(chunk(request_id, created, model, [choice_delta(index, first_delta())], usage=usage, **marks))
        delta = final_delta(message.get("content"), message.get("tool_calls"))
        if delta:
            chunks.append(chunk(request_id, created, model, [choice_delta(index, delta, logprobs=choice.get("logprobs"))], usage=usage, **marks))
        chunks.append(chunk(request_id, created, model, [choice_delta(index, {}, choice["finish_reason"])], usage=usage, **marks))
    if usage:
        chunks.append(chunk(request_id, created, model, [], usage=True, totals=completion["usage"], **marks))
    return chunks


def final_delta(content: str | None, tool_calls: list[dict[str, Any]] | None) -> dict[str, Any]:
    """The delta of a choice's last content: its text, and its tool calls in one delta (each
    with its index, as OpenAI streams them)."""
    delta: dict[str, Any] = {"content": content} if content else {}
    if tool_calls:
        delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(tool_calls)]
    return delta


class StreamFollower:
    """Turns a request's stream entries into what its reader passes on. Pure: no I/O.

    `take` and `settle` return events: chunk dicts, or one `{"error": {...}}` record (after
    which the stream has ended). `ended` tells when the reader stops.

    Args:
        request_id: the request.
        usage: whether the request asked for include_usage (for a stream made from a stored
            result).
    """

    def __init__(self, request_id: str, *, usage: bool = False) -> None:
        self.request_id = request_id
        self.usage = usage
        #: The delivery whose entries are followed (None until the first entry).
        self.delivery: int | None = None
        #: Chunks passed on so far.
        self.passed = 0
        self.ended = False

    def take(self, fields: dict[Any, Any]) -> list[dict[str, Any]]:
        """The events of one stream entry (its fields as Redis returns them)."""
        if self.ended:
            return []
        entry = {text(key): text(value) for key, value in fields.items()}
        delivery = int(entry.get(DELIVERY, 0))
        if self.delivery is not None and delivery < self.delivery:
            return []  # left by a delivery this reader no longer follows
        if self.delivery is not None and delivery > self.delivery and self.passed:
            return self._error({"code": "internal_error", "message": stopped_message(self.request_id), "param": None})
        self.delivery = delivery
        kind = entry.get(KIND)
        if kind == END:
            self.ended = True
            return []
        if kind == ERROR:
            return self._error(json.loads(entry[DATA]))
        chunks: list[dict[str, Any]] = json.loads(entry[DATA])
        self.passed += len(chunks)
        return chunks

    def settle(self, result: dict[str, Any] | None) -> list[dict[str, Any]]:
        """The events once the request's result is stored (None: it was not found) and its
        stream has no end: the error, or the whole answer when nothing was passed yet."""
        if self.ended:
            return []
        if result is None:
            return self._error({"code": "internal_error", "message": stopped_message(self.request_id), "param": None})
        if "error" in result:
            return self._error(result["error"])
        if self.passed:
            return self._error({"code": "internal_error", "message": stopped_message(self.request_id), "param": None})
        self.ended = True
        return completion_chunks(self.request_id, result, usage=self.usage)

    def timeout(self, seconds: float) -> list[dict[str, Any]]:
        return self._error({
            "code": "timeout", "param": None,
            "message": f"no end of the stream within {seconds:.0f}s; poll /v1/chat/completions/{self.request_id}",
        })

    def _error(self, error: dict[str, Any]) -> list[dict[str, Any]]:
        self.ended = True
        return [{"error": error}]


def follow(requests: Requests, request_id: str, *, usage: bool = False, timeout: float | None = None) -> Iterator[dict[str, Any]]:
    """The events of a streamed request as they come (see StreamFollower), read with blocking
    XREAD on the blocking connection of `requests`; stops after `timeout` seconds (None: never) with a
    timeout error event."""
    follower = StreamFollower(request_id, usage=usage)
    stream, ready = keys.result_stream(request_id), keys.result_ready(request_id)
    last = "0-0"
    deadline = None if timeout is None else time.monotonic() + timeout
    while not follower.ended:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            yield from follower.timeout(timeout or 0)
            return
        replies: Any
        try:
            replies = requests.blocking.xread({stream: last, ready: "0-0"}, count=100, block=block_ms(left))
        except redis.ResponseError:  # a key of another type: read the result, as after the end
            replies = [(ready, [])]
        events, last, answered = _read(follower, replies, last)
        yield from events
        if answered and not follower.ended:
            # Entries written before the result was stored are all in by now: read them first.
            rest: Any = requests.redis.xrange(stream, min=f"({last}")
            for entry_id, fields in rest:
                last = text(entry_id)
                yield from follower.take(fields)
            yield from follower.settle(requests.result(request_id))


def _read(follower: StreamFollower, replies: Any, last: str) -> tuple[list[dict[str, Any]], str, bool]:
    """The events of an XREAD reply, the last stream entry id read, and whether the ready
    stream (the result stored) was in it."""
    events: list[dict[str, Any]] = []
    answered = False
    for key, entries in replies or []:
        if text(key).endswith(":ready"):
            answered = True
            continue
        for entry_id, fields in entries:
            last = text(entry_id)
            events += follower.take(fields)
    return events, last, answered
