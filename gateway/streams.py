"""Streamed answers of `POST /v1/chat/completions` (`stream: true`) as server-sent events.

Each open stream reads its request's Redis stream with blocking XREAD (chatbatch/streams.py
holds what the entries mean) and so holds one Redis connection for as long as it is open,
taken from a pool of its own (`MAX_CONNECTIONS`), apart from the waiters' shared
subscription: a stream past the pool's size waits for a connection. When the client goes away,
Starlette cancels the response's generator; the request is then marked disconnected in its
record, and the worker cancels it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import anyio
import redis
import redis.asyncio
from starlette.concurrency import run_in_threadpool

from chatbatch import keys
from chatbatch.redisconn import async_client, block_ms, text
from chatbatch.requests import Requests
from chatbatch.streams import StreamFollower
from gateway.errors import from_request_error
from schemas.errors import ErrorCode, RequestError

logger = logging.getLogger(__name__)

#: Most streams open at once per gateway process (each holds a Redis connection while open).
MAX_CONNECTIONS = 1_024
#: Longest an open stream waits for a free connection of the pool.
POOL_TIMEOUT = 30


#: A keep-alive comment: SSE readers skip it, proxies see bytes flow.
PING = b": ping\n\n"


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event: `data: JSON` and a blank line."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


def openai_error(error: dict[str, Any]) -> dict[str, Any]:
    """An error record (`{code, message, param}`) in OpenAI's error body."""
    try:
        refused = from_request_error(RequestError(ErrorCode(error.get("code")), str(error.get("message")), param=error.get("param")))
        return {"error": {"message": refused.message, "type": refused.kind, "param": refused.param, "code": refused.code}}
    except ValueError:  # a code of the stream's own (timeout)
        return {"error": {"message": error.get("message"), "type": "server_error", "param": None, "code": error.get("code")}}


class Streams:
    """The open streams of one gateway; made in the app's lifespan, in its event loop.

    Args:
        url: the Redis URL.
        requests: the request records (to mark a request whose client went away).
    """

    def __init__(self, url: str, requests: Requests, *, ping_seconds: float = 15.0) -> None:
        self.redis = async_client(url, max_connections=MAX_CONNECTIONS, pool_timeout=POOL_TIMEOUT, blocking=True)
        self.requests = requests
        self.ping_seconds = ping_seconds

    async def close(self) -> None:
        await self.redis.aclose()
        await self.redis.connection_pool.disconnect()

    async def events(
        self, request_id: str, *, usage: bool, timeout: float, stopping: asyncio.Event, cancels: bool = True
    ) -> AsyncIterator[bytes]:
        """The request's events as SSE bytes, ending with `data: [DONE]` (or after an error
        event), with a keep-alive comment every `ping_seconds` without one; a client that goes
        away marks the request disconnected when `cancels`. Redis lost mid-stream ends the
        stream with an error event; the request goes on, readable by id."""
        follower = StreamFollower(request_id, usage=usage)
        failed = False
        try:
            try:
                async for event in self._follow(follower, timeout, stopping):
                    if event is None:
                        yield PING
                        continue
                    failed = "error" in event
                    yield sse(openai_error(event["error"]) if failed else event)
            except redis.RedisError as error:
                follower.ended = failed = True
                logger.warning("request %s: its stream was lost (%s)", request_id, type(error).__name__)
                yield sse(openai_error({
                    "code": "stream_unavailable", "param": None,
                    "message": f"the gateway lost Redis while streaming; request {request_id} goes on: read it at /v1/chat/completions/{request_id}",
                }))
            if not failed:
                yield sse("[DONE]")
        finally:
            if not follower.ended and cancels:
                # Cancelled (the client went away): the mark is written shielded from the cancel.
                with anyio.CancelScope(shield=True):
                    try:
                        await run_in_threadpool(self.requests.disconnect, request_id)
                    except redis.RedisError:
                        logger.warning("request %s: could not mark it disconnected", request_id)

    async def _follow(self, follower: StreamFollower, timeout: float, stopping: asyncio.Event) -> AsyncIterator[dict[str, Any] | None]:
        """The stream's events, and None each `ping_seconds` in which no event came."""
        request_id = follower.request_id
        stream, ready = keys.result_stream(request_id), keys.result_ready(request_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        ping_at = loop.time() + self.ping_seconds
        last = "0-0"
        async with self.redis.client() as connection:  # one connection for the stream's life
            while not follower.ended:
                left = deadline - loop.time()
                if left <= 0 or stopping.is_set():
                    for event in follower.timeout(timeout) if left <= 0 else [self._stopping(follower)]:
                        yield event
                    return
                if loop.time() >= ping_at:
                    ping_at = loop.time() + self.ping_seconds
                    yield None
                block = block_ms(min(left, max(0.001, ping_at - loop.time())))
                replies: Any = await connection.xread({stream: last, ready: "0-0"}, count=100, block=block)
                events, last = await self._read(connection, follower, replies, last)
                if events:
                    ping_at = loop.time() + self.ping_seconds
                for event in events:
                    yield event

    @staticmethod
    async def _read(connection: Any, follower: StreamFollower, replies: Any, last: str) -> tuple[list[dict[str, Any]], str]:
        """The events of an XREAD reply (and, once the result is stored, of the stream's rest
        and the result), with the last stream entry id read."""
        request_id = follower.request_id
        stream, ready = keys.result_stream(request_id), keys.result_ready(request_id)
        events: list[dict[str, Any]] = []
        answered = False
        for key, entries in replies or []:
            if text(key) == ready:
                answered = True
                continue
            for entry_id, fields in entries:
                last = text(entry_id)
                events += follower.take(fields)
        if answered and not follower.ended:
            rest: Any = await connection.xrange(stream, min=f"({last}")
            for entry_id, fields in rest:
                last = text(entry_id)
                events += follower.take(fields)
            raw = await connection.get(keys.result(request_id))
            events += follower.settle(None if raw is None else json.loads(raw))
        return events, last

    @staticmethod
    def _stopping(follower: StreamFollower) -> dict[str, Any]:
        follower.ended = True
        return {"error": {
            "code": "gateway_stopping", "param": None,
            "message": f"the gateway is stopping; request {follower.request_id} goes on: read it at /v1/chat/completions/{follower.request_id}",
        }}
