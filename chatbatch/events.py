"""Notifications on a Redis Stream: one entry when a single request is answered and one when
a job ends. Consumers read them with consumer groups (XREADGROUP, XACK); the HTTP gateway's
callback sender is one such consumer."""

from __future__ import annotations

from typing import Any

from chatbatch import keys

#: The stream keeps about this many entries (trimmed approximately, as XADD MAXLEN ~ does).
STREAM_LENGTH = 100_000

#: Lua fragment, used inside the job store's scripts at the moment a job ends.
LUA_PUBLISH_JOB = (
    "redis.call('XADD', '" + keys.EVENTS + "', 'MAXLEN', '~', " + str(STREAM_LENGTH)
    + ", '*', 'type', 'batch', 'id', redis.call('HGET', job, 'id'), 'status', {status})"
)


def publish(client: Any, kind: str, object_id: str, status: str) -> None:
    """Add one notification (`client` may be a pipeline)."""
    client.xadd(
        keys.EVENTS, {"type": kind, "id": object_id, "status": status}, maxlen=STREAM_LENGTH, approximate=True
    )
