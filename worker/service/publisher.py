"""Streaming single requests' answers to Redis as they are generated.

The engine thread must stay fast: for a streamed request it only hands each generated token to
the request's `RequestStream` (an append to a deque). One publisher thread per worker process
(started with the first streamed request) drains that queue: it decodes each row's text
incrementally (worker/decode/detokenizer.py, stop strings held back), and adds the new text of every
open stream as chat.completion.chunk objects to the request's Redis stream
(`chatbatch:result:<id>:stream`), all streams in one pipelined round trip per cycle. The same
round trip reads the cancel marks of the open streams (`Requests.disconnect`; every
CANCEL_CHECK_SECONDS when idle): a cancelled stream makes the engine finish its rows at their
next token, or cancels its future when it has not started.

A single request that is not streamed gets a silent sink: nothing of it is written, but its
cancel mark is read like a stream's, so a waiting HTTP client that disconnects cancels it too.

When the request's answer is known, the task hands it to `RequestStream.finish`, which queues
it behind the request's tokens and waits until it is written: per choice the rest of the final
content (the text streamed so far is a prefix of it), the finish chunk, the usage chunk when
asked, then the end entry (or the error entry) — all before the result is stored.

Two choices, documented in docs/http-api.md: a request with tools holds its content until the
end (it may turn into tool calls, sent in one delta), and log probabilities, when asked, come
with each choice's last content chunk.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from typing import Any

import redis

from chatbatch import keys
from chatbatch.requests import DISCONNECTED
from chatbatch.streams import CHUNKS, DATA, DELIVERY, END, ERROR, KIND, choice_delta, chunk, final_delta, first_delta
from schemas.chat import ChatCompletionRequest
from worker.decode.detokenizer import Detokenizer

logger = logging.getLogger(__name__)

#: How often the cancel marks of open streams are read while no token comes.
CANCEL_CHECK_SECONDS = 0.5
#: The error entry of a stream whose text was lost: its result is still stored whole.
_LOST = {"code": "internal_error", "param": None,
         "message": "the worker could not stream this answer to the end; the whole answer is read by the request's id"}
#: Longest a task waits for its stream's last entries to be written before it stores the result
#: anyway (readers then answer from the stored result).
FINISH_SECONDS = 30.0


class RequestStream:
    """The sink of one streamed request: the engine thread's `put`, the task's `attach` and
    `finish`; everything else is the publisher thread's.

    Args:
        publisher: the worker's publisher.
        request_id: the request.
        delivery: the delivery of the task streaming it (written with every entry).
        request: the parsed request.
        model: the served model name.
    """

    def __init__(self, publisher: Publisher, request_id: str, delivery: int, request: ChatCompletionRequest, model: str) -> None:
        self._publisher = publisher
        self.request_id = request_id
        self.delivery = delivery
        self.model = model
        self.created = int(time.time())
        #: Not streamed: only the cancel mark is read; no entry is written.
        self.silent = not request.stream
        self.tier = request.tier
        self.usage = bool(request.stream_options and request.stream_options.include_usage)
        #: Content is held to the end: it may become tool calls.
        self.holds = bool(request.tools)
        self.stops = request.stop_sequences
        #: Set by the publisher when the client went away; the engine reads it at every token.
        self.cancelled = False
        #: Set by the engine thread with the first token it streams: from then on the request
        #: cannot be generated again from the start (its client has text already).
        self.sent = False
        #: Set by the publisher when this stream's text could not be made or written: it wrote
        #: (or tries to write) an error entry, and writes nothing more.
        self.broken = False
        self.future: Any = None
        # The publisher thread's own state, per choice: its text, what was released of it, and
        # whether its first (role) chunk went out.
        self.texts: dict[int, Detokenizer] = {}
        self.emitted: dict[int, str] = {}
        self.begun: set[int] = set()

    def put(self, choice: int, token: int) -> None:
        """Hand over a generated token of a choice (engine thread; cheap)."""
        if not self.silent:
            self.sent = True
            self._publisher.push((self, choice, token))

    def attach(self, future: Any) -> None:
        """The request's future in the engine, so that a cancel before it starts cancels it."""
        self.future = future
        if self.cancelled:
            future.cancel()

    def cancel(self) -> None:
        self.cancelled = True
        if self.future is not None:
            self.future.cancel()  # False once it runs: its rows then finish at their next token

    def close(self) -> None:
        """Forget the stream without writing its end (the request was handed back: the worker
        that takes it streams it)."""
        self._publisher.push((self, None, None))

    def finish(self, record: dict[str, Any]) -> None:
        """Write the end of the stream for the request's answer (a chat.completion or an error
        record), after every token it streamed; returns once written (or FINISH_SECONDS). A
        silent sink is only let go."""
        if self.silent:
            self.close()
            return
        done = threading.Event()
        self._publisher.push((self, record, done))
        if not done.wait(FINISH_SECONDS):
            logger.warning("request %s: its stream's end was not written within %.0fs", self.request_id, FINISH_SECONDS)

    def chunk(self, choices: list[dict[str, Any]], *, totals: dict[str, Any] | None = None) -> dict[str, Any]:
        """A chunk of this stream; with `totals`, its last chunk, with the usage."""
        return chunk(
            self.request_id, self.created, self.model, choices, usage=self.usage, totals=totals,
            tier=self.tier, fingerprint=self._publisher.fingerprint,
        )


class Publisher:
    """The worker's publisher thread and its queue.

    Args:
        client: the Redis connection.
        tokenizer: the model's tokenizer (None for a model without token access: its streams
            get the whole text at the end).
        ttl: seconds a stream stays readable (the result's TTL).
        fingerprint: the worker's system_fingerprint, in every chunk.
    """

    def __init__(self, client: redis.Redis, tokenizer: Any, *, ttl: int, fingerprint: str | None = None) -> None:
        self.redis = client
        self.tokenizer = tokenizer
        self.ttl = ttl
        self.fingerprint = fingerprint
        self._queue: deque[tuple[Any, ...]] = deque()
        self._wake = threading.Event()
        self._open: dict[str, RequestStream] = {}
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._checked = 0.0
        #: Streams whose entries a failed write lost: their error entry goes with the next write.
        self._lost: list[RequestStream] = []

    def open(self, request_id: str, delivery: int, request: ChatCompletionRequest, model: str) -> RequestStream:
        """A stream for a request about to be submitted (starts the thread the first time)."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="chatbatch-publisher", daemon=True)
                self._thread.start()
        stream = RequestStream(self, request_id, delivery, request, model)
        self.push((stream,))
        return stream

    def push(self, item: tuple[Any, ...]) -> None:
        self._queue.append(item)
        if not self._wake.is_set():
            self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait(CANCEL_CHECK_SECONDS)
            self._wake.clear()
            try:
                self.cycle()
            except Exception:  # one bad cycle must not end streaming for the process
                logger.exception("the stream publisher's cycle failed")

    def cycle(self) -> None:
        """Publish what is queued and read the cancel marks, in one round trip. A stream whose
        text fails, or whose entries a failed write lost, ends with an error entry; the others
        go on. Every finished task is let go, whatever happened."""
        finals: list[tuple[RequestStream, dict[str, Any], threading.Event]] = []
        try:
            self._publish(finals)
        finally:
            for _, _, done in finals:
                done.set()

    def _publish(self, finals: list[tuple[RequestStream, dict[str, Any], threading.Event]]) -> None:
        tokens: dict[tuple[RequestStream, int], list[int]] = {}
        while self._queue:
            item = self._queue.popleft()
            if len(item) == 1:
                self._open[item[0].request_id] = item[0]
            elif isinstance(item[1], int):
                tokens.setdefault((item[0], item[1]), []).append(item[2])
            elif item[1] is None:
                self._open.pop(item[0].request_id, None)
            else:
                finals.append(item)  # type: ignore[arg-type]
        entries: dict[RequestStream, list[tuple[str, Any]]] = {stream: [(ERROR, _LOST)] for stream in self._lost}
        self._lost = []
        for (stream, choice), taken in tokens.items():
            if not stream.broken:
                self._guarded(stream, entries, lambda s=stream, c=choice, t=taken: [(CHUNKS, self._deltas(s, c, t))])
        for stream, record, _ in finals:
            if not stream.broken:
                self._guarded(stream, entries, lambda s=stream, r=record: self._ending(s, r))
            self._open.pop(stream.request_id, None)
        # Every open sink's cancel mark is read each CANCEL_CHECK_SECONDS; a stream's also with
        # each write of its entries (free in the same round trip), a silent sink's never more
        # often: plain requests add no reads per token.
        due = time.monotonic() - self._checked >= CANCEL_CHECK_SECONDS
        if due:
            self._checked = time.monotonic()
        checking = [stream for stream in self._open.values() if due or (entries and not stream.silent)]
        try:
            self._write(entries, checking)
        except redis.RedisError as error:
            logger.warning("could not publish %d streams (%s): they end with an error", len(entries), type(error).__name__)
            for stream in entries:
                if not stream.broken:
                    stream.broken = True
                    self._lost.append(stream)

    @staticmethod
    def _guarded(stream: RequestStream, entries: dict[RequestStream, list[tuple[str, Any]]], make: Any) -> None:
        """Add a stream's entries from `make()`; an error there ends that stream alone."""
        try:
            added = [(kind, data) for kind, data in make() if kind != CHUNKS or data]
        except Exception:
            logger.exception("request %s: its stream failed; it ends with an error", stream.request_id)
            stream.broken = True
            entries[stream] = [(ERROR, _LOST)]
            return
        if added:
            entries.setdefault(stream, []).extend(added)

    def _write(self, entries: dict[RequestStream, list[tuple[str, Any]]], checking: list[RequestStream]) -> None:
        if not entries and not checking:
            return
        pipe = self.redis.pipeline(transaction=False)
        for stream, added in entries.items():
            key = keys.result_stream(stream.request_id)
            for kind, data in added:
                fields = {DELIVERY: stream.delivery, KIND: kind}
                if data is not None:
                    fields[DATA] = json.dumps(data)
                pipe.xadd(key, fields)  # type: ignore[arg-type]
            pipe.expire(key, self.ttl)
        for stream in checking:
            pipe.hexists(keys.request(stream.request_id), DISCONNECTED)
        replies = pipe.execute()
        if checking:
            for stream, gone in zip(checking, replies[-len(checking) :]):
                if gone and not stream.cancelled:
                    logger.info("request %s: its client disconnected; cancelling it", stream.request_id)
                    stream.cancel()

    def _deltas(self, stream: RequestStream, choice: int, tokens: list[int]) -> list[dict[str, Any]]:
        """The chunks of a choice's new tokens: its first chunk (the role), then its new text
        (none while the request holds its content)."""
        text = stream.texts.get(choice)
        if text is None:
            text = stream.texts[choice] = Detokenizer(self.tokenizer, stream.stops)
        piece = text.feed(tokens)
        chunks = self._begin(stream, choice)
        if piece and not stream.holds:
            stream.emitted[choice] = stream.emitted.get(choice, "") + piece
            chunks.append(stream.chunk([choice_delta(choice, {"content": piece})]))
        return chunks

    @staticmethod
    def _begin(stream: RequestStream, choice: int) -> list[dict[str, Any]]:
        if choice in stream.begun:
            return []
        stream.begun.add(choice)
        return [stream.chunk([choice_delta(choice, first_delta())])]

    def _ending(self, stream: RequestStream, record: dict[str, Any]) -> list[tuple[str, Any]]:
        """The last entries of a stream: the rest of each choice, its finish, the usage, the end."""
        if "error" in record:
            return [(ERROR, record["error"])]
        chunks: list[dict[str, Any]] = []
        for choice in record["choices"]:
            index, message = choice["index"], choice["message"]
            chunks += self._begin(stream, index)
            delta = final_delta(self._rest(stream, index, message.get("content")), message.get("tool_calls"))
            if delta or choice.get("logprobs"):
                chunks.append(stream.chunk([choice_delta(index, delta or {"content": ""}, logprobs=choice.get("logprobs"))]))
            chunks.append(stream.chunk([choice_delta(index, {}, choice["finish_reason"])]))
        if stream.usage:
            chunks.append(stream.chunk([], totals=record["usage"]))
        return [(CHUNKS, chunks), (END, None)]

    @staticmethod
    def _rest(stream: RequestStream, index: int, content: str | None) -> str | None:
        """What of a choice's final content was not streamed yet."""
        emitted = stream.emitted.get(index, "")
        if content is None or not emitted:
            return content
        if not content.startswith(emitted):
            logger.warning("request %s: choice %d streamed text that its answer does not begin with", stream.request_id, index)
            return ""
        return content[len(emitted) :]
