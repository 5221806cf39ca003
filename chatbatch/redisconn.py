"""Redis connections, and URLs that are safe to print.

Every connection chatbatch opens is made here, with an explicit socket timeout: redis-py 8
gives a socket 5 s by default, which is exactly as long as a blocking read may wait, so a read
that waits its full time would fail as the socket gives up. Two kinds are handed out:

- plain connections (`connect`), for commands that answer at once (the longest Lua step
  included): `SOCKET_TIMEOUT`;
- blocking connections (`connect(..., blocking=True)`, `blocking_twin`, `async_client(...,
  blocking=True)`), for XREAD, XREADGROUP, BLPOP and pub/sub reads: `BLOCKING_SOCKET_TIMEOUT`,
  well above `MAX_BLOCK_SECONDS`, the longest any reader blocks in one call (`block_ms` caps a
  read's block at it). Readers that wait longer loop on reads of at most that long.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import redis
import redis.asyncio
from redis.backoff import ExponentialBackoff
from redis.retry import Retry
from redis.typing import EncodableT

from chatbatch.exceptions import ConfigurationError

#: A hash's fields as redis-py's `hset(mapping=...)` types them (its keys are invariant, so a
#: `dict[str, ...]` record is cast to it).
Fields = Mapping[EncodableT, EncodableT]


def text(value: object) -> str:
    """A Redis string reply as text, whether the client decodes replies or not. Every reply
    chatbatch reads goes through this helper (or `maybe_text`, `texts`), so a client made with
    `decode_responses=True` works as well as one without."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    raise TypeError(f"expected a Redis string reply, got {type(value).__name__}")


def maybe_text(value: object) -> str | None:
    """`text(value)`, or None for a missing value (a nil reply)."""
    return None if value is None else text(value)


def texts(mapping: Mapping[Any, Any]) -> dict[str, str]:
    """A hash reply (HGETALL) with text keys and values."""
    return {text(key): text(value) for key, value in mapping.items()}


def redact(url: str) -> str:
    """The URL with its password replaced by ***, for logs and error messages."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


#: How long a command keeps retrying while Redis is away (a restart, a failover): about a minute.
RETRY = Retry(ExponentialBackoff(cap=4.0, base=0.1), retries=20)


#: The longest one blocking read waits in Redis (XREAD, XREADGROUP, BLPOP, a pub/sub read).
MAX_BLOCK_SECONDS = 5.0
#: Socket timeout of connections that block: the longest block plus a margin for a loaded
#: Redis or network, so an empty read returns long before the socket gives up.
BLOCKING_SOCKET_TIMEOUT = MAX_BLOCK_SECONDS + 10.0
#: Socket timeout of plain commands: none of chatbatch's takes a second; a stalled server or a
#: half-open socket is noticed after this long (and the command retried, see RETRY).
SOCKET_TIMEOUT = 30.0
#: How long opening a connection may take.
CONNECT_TIMEOUT = 5.0


def block_ms(left: float | None) -> int:
    """The block time of one blocking read, in milliseconds: what is left of the wait (None:
    no end), capped at MAX_BLOCK_SECONDS, at least 1 ms (0 would block for ever)."""
    longest = int(MAX_BLOCK_SECONDS * 1000)
    return longest if left is None else max(1, min(longest, int(left * 1000)))


def socket_timeout(blocking: bool) -> float:
    """The socket timeout of a plain or a blocking connection."""
    return BLOCKING_SOCKET_TIMEOUT if blocking else SOCKET_TIMEOUT


def connect(url: str, *, check: bool = True, retry: Retry | None = RETRY, blocking: bool = False) -> redis.Redis:
    """A Redis client for `url` (redis://, rediss:// for TLS, unix://).

    Commands retry with exponential backoff on connection errors, so a Redis restart pauses
    the work instead of failing it (writes are idempotent, so a retried write is harmless).
    `blocking=True` gives a client for blocking reads (see the module's docstring).

    Raises:
        ConfigurationError: Redis cannot be reached or refuses the credentials (check=True).
    """
    client = redis.Redis.from_url(
        url,
        socket_timeout=socket_timeout(blocking),
        socket_connect_timeout=CONNECT_TIMEOUT,
        socket_keepalive=True,
        health_check_interval=30,
        retry=retry,
        retry_on_error=[redis.ConnectionError, redis.TimeoutError] if retry else None,
    )
    if check:
        try:
            # Fail fast at start-up: a wrong URL should not wait out the retries.
            redis.Redis.from_url(url, socket_timeout=SOCKET_TIMEOUT, socket_connect_timeout=CONNECT_TIMEOUT).ping()
        except redis.AuthenticationError:
            raise ConfigurationError(
                f"Redis at {redact(url)} refused the credentials: fix the password or user in "
                "CHATBATCH_REDIS_URL"
            ) from None
        except redis.RedisError as error:
            raise ConfigurationError(
                f"cannot reach Redis at {redact(url)} ({type(error).__name__}): start redis-server "
                "or point CHATBATCH_REDIS_URL at a running one"
            ) from None
    return client


def blocking_twin(client: redis.Redis) -> redis.Redis:
    """A client for blocking reads on the same server, with the same credentials, options and
    retries as `client` (which may have been made by the caller), and the blocking socket
    timeout. Its connections are its own: a blocking read never holds one of `client`'s."""
    pool = client.connection_pool
    kwargs = {**pool.connection_kwargs, "socket_timeout": BLOCKING_SOCKET_TIMEOUT}
    twin_pool = pool.__class__(connection_class=pool.connection_class, max_connections=pool.max_connections, **kwargs)
    return redis.Redis(connection_pool=twin_pool)


def async_client(url: str, *, max_connections: int, pool_timeout: float, blocking: bool) -> redis.asyncio.Redis:
    """An asyncio client for `url` whose pool holds at most `max_connections`; a caller past
    that waits up to `pool_timeout` seconds for a free one. `blocking`: for blocking reads."""
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=pool_timeout,
        socket_timeout=socket_timeout(blocking), socket_connect_timeout=CONNECT_TIMEOUT,
    )
    return redis.asyncio.Redis(connection_pool=pool)
