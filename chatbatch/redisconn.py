"""Redis connections, and URLs that are safe to print."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import redis
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


def connect(url: str, *, check: bool = True, retry: Retry | None = RETRY) -> redis.Redis:
    """A Redis client for `url` (redis://, rediss:// for TLS, unix://).

    Commands retry with exponential backoff on connection errors, so a Redis restart pauses
    the work instead of failing it (writes are idempotent, so a retried write is harmless).

    Raises:
        ConfigurationError: Redis cannot be reached or refuses the credentials (check=True).
    """
    client = redis.Redis.from_url(
        url,
        socket_connect_timeout=5,
        socket_keepalive=True,
        health_check_interval=30,
        retry=retry,
        retry_on_error=[redis.ConnectionError, redis.TimeoutError] if retry else None,
    )
    if check:
        try:
            # Fail fast at start-up: a wrong URL should not wait out the retries.
            redis.Redis.from_url(url, socket_connect_timeout=5).ping()
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
