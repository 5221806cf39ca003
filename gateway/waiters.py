"""Waiting for many requests' answers over one Redis subscription.

A gateway may hold thousands of requests waiting for their answers. Each one holding a Redis
connection (an XREAD) would take thousands of connections; instead, one subscription to the
`chatbatch:answered` channel, on which the step that stores an answer publishes its request's
id, wakes the waiters of that id. A waiter registers before it reads the result, so an answer
stored in between still wakes it; and every few seconds a waiter reads the result again, so an
id published while the subscription was reconnecting costs a few seconds, never the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any, cast

import redis
import redis.asyncio

from chatbatch import keys
from chatbatch.redisconn import MAX_BLOCK_SECONDS, async_client, text

logger = logging.getLogger(__name__)

#: Longest a waiter waits for its wake-up before it reads the result again.
RECHECK_SECONDS = 5.0


class Waiters:
    """The waiters of one gateway. Start it in the app's lifespan, in its event loop.

    Args:
        url: the Redis URL.
        max_connections: most connections for the results' reads (a waiter holds one only
            while it reads).
    """

    def __init__(self, url: str, *, max_connections: int = 32) -> None:
        self.redis = async_client(url, max_connections=max_connections, pool_timeout=30, blocking=False)
        self._url = url
        self._waiting: dict[str, set[asyncio.Future[None]]] = {}
        self._listener: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._listener = asyncio.create_task(self._listen())

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        await self.redis.aclose()

    async def wait(self, request_id: str, timeout: float) -> dict[str, Any] | None:
        """The request's result (a chat.completion or an error record), or None after
        `timeout` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            woken: asyncio.Future[None] = loop.create_future()
            self._waiting.setdefault(request_id, set()).add(woken)
            try:
                raw = await self.redis.get(keys.result(request_id))
                if raw is not None:
                    return cast(dict[str, Any], json.loads(raw))
                left = deadline - loop.time()
                if left <= 0:
                    return None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken, min(left, RECHECK_SECONDS))
            finally:
                waiters = self._waiting.get(request_id)
                if waiters is not None:
                    waiters.discard(woken)
                    if not waiters:
                        del self._waiting[request_id]

    def _wake(self, request_id: str) -> None:
        for woken in self._waiting.get(request_id, ()):
            if not woken.done():
                woken.set_result(None)

    async def _listen(self) -> None:
        """Follow the answered channel for as long as the gateway runs, resubscribing after a
        lost connection (every waiter reads its result again then)."""
        while True:
            # Each read waits at most MAX_BLOCK_SECONDS, under the blocking socket timeout: an
            # idle channel is quiet, not a lost connection.
            subscriber = async_client(self._url, max_connections=1, pool_timeout=30, blocking=True)
            try:
                async with subscriber.pubsub() as pubsub:
                    await pubsub.subscribe(keys.ANSWERED)
                    for request_id in list(self._waiting):
                        self._wake(request_id)
                    while True:
                        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=MAX_BLOCK_SECONDS)
                        if message is not None and message["type"] == "message":
                            self._wake(text(message["data"]))
            except (redis.RedisError, OSError) as error:
                logger.warning("the gateway's subscription to answers was lost (%s); subscribing again", type(error).__name__)
                await asyncio.sleep(1.0)
            finally:
                await subscriber.aclose()
