"""Mends to kombu's Redis transport, where a Redis restart made a worker lose a message or stop
consuming (docs/reliability.md). Each replaces one kombu method with a wrapper around the
original; `install()` first checks that every method still has the shape the mend was written
and tested for (pyproject.toml pins the kombu versions they are tested with), and refuses to
start the worker otherwise. Each mend has a test in tests/test_kombu_mends.py that fails
without it.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

from chatbatch.exceptions import ConfigurationError
from chatbatch.redisconn import RETRY

logger = logging.getLogger(__name__)

#: Marks a method already replaced, so that installing twice wraps once.
_MARK = "_chatbatch_mend"


def _targets() -> dict[str, tuple[Any, str, tuple[str, ...]]]:
    """Mend name -> (owner class, method name, the parameters the mend expects)."""
    from kombu.message import Message
    from kombu.transport import redis as kombu_redis

    return {
        "ack_on_a_lost_connection": (Message, "ack_log_error", ("self", "logger", "errors", "multiple")),
        "record_taken_message": (kombu_redis.QoS, "append", ("self", "message", "delivery_tag")),
        "restore_on_a_closed_connection": (kombu_redis.QoS, "restore_unacked", ("self", "client")),
    }


def check() -> None:
    """Raise ConfigurationError unless every mended kombu method has the expected shape."""
    import kombu

    for name, (owner, method, expected) in _targets().items():
        function = getattr(owner, method, None)
        if function is None:
            found = "no such method"
        else:
            original = getattr(function, "__wrapped__", function)
            found = ", ".join(inspect.signature(original).parameters)
            if tuple(inspect.signature(original).parameters) == expected:
                continue
        raise ConfigurationError(
            f"kombu {kombu.__version__} changed {owner.__module__}.{owner.__name__}.{method} "
            f"(the {name} mend expects ({', '.join(expected)}), found ({found})): install a kombu "
            "version that pyproject.toml allows"
        )


def _replace(owner: Any, method: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    original = getattr(owner, method)
    if getattr(original, _MARK, False):
        return
    mended = make(original)
    mended.__wrapped__ = original  # type: ignore[attr-defined]
    setattr(mended, _MARK, True)
    setattr(owner, method, mended)


def ack_on_a_lost_connection() -> None:
    """Tasks that finish just as Redis goes away acknowledge on a channel kombu has already
    closed, and kombu raises AttributeError there, not one of the connection errors it logs and
    skips. Raised while Celery restarts its consumer, that error stops the restart and the
    worker never consumes again. Such an ack is logged and skipped like any failed ack: the
    message was restored to its queue when the connection dropped and its answers are stored,
    so its next delivery is a no-op."""
    from kombu.message import Message

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def ack_log_error(self: Any, log: Any, errors: Any, multiple: bool = False) -> None:
            try:
                original(self, log, errors, multiple)
            except AttributeError as error:
                log.warning("could not acknowledge %r, the broker connection was lost: %r", self.delivery_tag, error)

        return ack_log_error

    _replace(Message, "ack_log_error", make)


def record_taken_message() -> None:
    """Kombu's Redis transport takes a message off its queue (BRPOP), then records it as
    unacknowledged in a second command. When Redis goes away between the two, that command
    fails and the message is on no queue and in no unacknowledged set: lost. The second command
    retries while Redis is away, as the worker's own Redis commands do (about a minute): once
    Redis is back the message is recorded and delivered as usual."""
    from kombu.transport import redis as kombu_redis

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def append(self: Any, message: Any, delivery_tag: str) -> None:
            def failed(error: Exception, failures: int) -> None:
                if failures == 1:
                    logger.warning("Redis went away as message %s was taken (%s): it is recorded once Redis is back", delivery_tag, type(error).__name__)

            RETRY.call_with_retry(lambda: original(self, message, delivery_tag), failed, with_failure_count=True)

        return append

    _replace(kombu_redis.QoS, "append", make)


def restore_on_a_closed_connection() -> None:
    """When Celery drops a lost broker connection, kombu closes its channel and first pushes the
    messages it holds back onto their queues. Where the connection's transport was already
    cleared, kombu raises AttributeError there, which Celery treats as unrecoverable: the worker
    stops consuming for good. Such a restore is skipped with a warning: the messages stay in
    Redis's unacknowledged set and return to their queue after the visibility timeout, the way
    a dead worker's do."""
    from kombu.transport import redis as kombu_redis

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def restore_unacked(self: Any, client: Any = None) -> None:
            try:
                original(self, client)
            except AttributeError as error:
                logger.warning(
                    "could not put %d unacknowledged messages back at once, the broker connection is closed (%r): "
                    "they return to their queue after the visibility timeout", len(self._delivered), error,
                )
                self._delivered.clear()

        return restore_unacked

    _replace(kombu_redis.QoS, "restore_unacked", make)


def install() -> None:
    """Check kombu's shape, then install every mend (once per process).

    Raises:
        ConfigurationError: the installed kombu is not one the mends were tested with.
    """
    check()
    ack_on_a_lost_connection()
    record_taken_message()
    restore_on_a_closed_connection()
