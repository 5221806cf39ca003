"""Redis connections (chatbatch/redisconn.py): blocking reads on connections whose socket
timeout outlives the longest block, on a real redis-server with a password."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
import redis

from chatbatch.redisconn import (
    BLOCKING_SOCKET_TIMEOUT,
    MAX_BLOCK_SECONDS,
    SOCKET_TIMEOUT,
    async_client,
    block_ms,
    blocking_twin,
    connect,
)
from tests.conftest import RedisServer, start_redis


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server: RedisServer = start_redis(tmp_path_factory.mktemp("redis"), "--requirepass", "s3cret")
    yield f"redis://:s3cret@127.0.0.1:{server.port}/0"
    server.process.terminate()
    server.process.wait(10)


def test_blocks_are_capped_below_the_blocking_socket_timeout() -> None:
    assert BLOCKING_SOCKET_TIMEOUT >= MAX_BLOCK_SECONDS + 5
    assert block_ms(None) == block_ms(3600) == int(MAX_BLOCK_SECONDS * 1000)
    assert block_ms(0.25) == 250
    assert block_ms(0) == block_ms(-1) == 1  # never 0: that blocks for ever


def test_a_full_block_returns_empty_on_a_blocking_connection(locked: str) -> None:
    plain = connect(locked)
    twin = blocking_twin(plain)
    assert plain.connection_pool.connection_kwargs["socket_timeout"] == SOCKET_TIMEOUT
    assert twin.connection_pool.connection_kwargs["socket_timeout"] == BLOCKING_SOCKET_TIMEOUT
    assert twin.connection_pool.connection_kwargs["password"] == "s3cret"  # the credentials came along
    started = time.monotonic()
    assert twin.xread({"chatbatch:test:nothing": "0-0"}, block=block_ms(None)) == []
    assert time.monotonic() - started >= MAX_BLOCK_SECONDS - 0.1
    # redis-py 8's own default (5 s) gives up exactly as such a read would return.
    bare = redis.Redis.from_url(locked, socket_timeout=MAX_BLOCK_SECONDS, retry=None)
    with pytest.raises(redis.TimeoutError):
        bare.xread({"chatbatch:test:nothing": "0-0"}, block=int(MAX_BLOCK_SECONDS * 1000) + 500)


def test_an_async_blocking_client_outlives_its_block(locked: str) -> None:
    async def read() -> object:
        client = async_client(locked, max_connections=2, pool_timeout=5, blocking=True)
        try:
            return await client.xread({"chatbatch:test:nothing": "0-0"}, block=block_ms(None))
        finally:
            await client.aclose()

    assert asyncio.run(read()) == []


def test_every_connection_sets_its_socket_timeout() -> None:
    """redis-py's default socket timeout changes between releases (none, then 5 s in 8.x): every
    connection of chatbatch's sets its own, so none blocks longer than its socket allows."""
    from tests.conftest import ROOT

    made_elsewhere = []
    for package in ("chatbatch", "gateway", "producer", "worker", "cli"):
        for path in (ROOT / package).rglob("*.py"):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if ("from_url(" in line or "redis.Redis(" in line) and "socket_timeout" not in line and path.name != "redisconn.py":
                    made_elsewhere.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert made_elsewhere == [], "make connections with chatbatch.redisconn (connect, blocking_twin, async_client)"
