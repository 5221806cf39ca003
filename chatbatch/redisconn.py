"""Redis connections, and URLs that are safe to print."""

from __future__ import annotations

import re

import redis

from chatbatch.exceptions import ConfigurationError


def redact(url: str) -> str:
    """The URL with its password replaced by ***, for logs and error messages."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def connect(url: str, *, check: bool = True) -> redis.Redis:
    """A Redis client for `url` (redis://, rediss:// for TLS, unix://).

    Raises:
        ConfigurationError: Redis cannot be reached or refuses the credentials (check=True).
    """
    client = redis.Redis.from_url(url, socket_connect_timeout=5, health_check_interval=30)
    if check:
        try:
            client.ping()
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
