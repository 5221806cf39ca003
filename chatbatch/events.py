"""Notifications on a Redis Stream: one entry when a single request is answered and one when a
job ends, `{"type": "chat.completion" | "batch", "id", "status"}` (plus `"callback": "1"` when
the object names a callback URL).

Entries are added inside the scripts that answer a request or end a job (`LUA_PUBLISH`), so an
answer and its notification are one atomic step. Consumers read them with consumer groups;
`Consumer` is the one way chatbatch reads them (the workers' callback relay uses it) and the
way offered to pull consumers: it claims entries left pending by a consumer that died, and hands
each entry to one delivery at a time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from chatbatch import keys
from chatbatch.ids import new_id
from chatbatch.redisconn import text, texts

logger = logging.getLogger(__name__)

#: The stream keeps about this many entries (trimmed approximately, as XADD MAXLEN ~ does).
STREAM_LENGTH = 100_000

#: Lua: add one notification. Expects `events` (the stream key), `kind`, `object_id`,
#: `status` and `callback` (true when the object names a callback URL) as locals.
LUA_PUBLISH = (
    "if callback then "
    "redis.call('XADD', events, 'MAXLEN', '~', " + str(STREAM_LENGTH) + ", '*', 'type', kind, 'id', object_id, "
    "'status', status, 'callback', '1') "
    "else "
    "redis.call('XADD', events, 'MAXLEN', '~', " + str(STREAM_LENGTH) + ", '*', 'type', kind, 'id', object_id, "
    "'status', status) "
    "end"
)

#: An event as read: entry id, and its fields as text.
Event = tuple[str, dict[str, str]]


class Consumer:
    """One consumer of a consumer group on the notification stream.

    Each `read()` first claims entries that another consumer of the group took and left
    unacknowledged for `min_idle` seconds (XAUTOCLAIM: that consumer died or hung), then reads
    new ones. An entry goes to one consumer at a time: a consumer that keeps an entry longer
    than `min_idle` calls `keep()` (or handles it through `handle()`, which does) so that no
    other consumer claims it meanwhile.

    Args:
        client: a Redis connection (decoded replies or not).
        group: the consumer group; created at the stream's start if missing, so entries added
            before any consumer ran are delivered too.
        name: this consumer's name; unique by default, so a restarted process never mistakes
            a dead one's entries for its own.
        min_idle: seconds an entry stays with a consumer that does not acknowledge it before
            another may claim it.
    """

    def __init__(self, client: redis.Redis, group: str, name: str | None = None, *, min_idle: float = 60.0) -> None:
        if min_idle <= 0:
            raise ValueError(f"min_idle must be positive, got {min_idle}")
        self.redis = client
        self.group = group
        self.name = name or new_id("consumer-")
        self.min_idle_ms = int(min_idle * 1000)
        self._claim_from = "0-0"
        # The entry a handler works on now; one keeper thread renews its claim.
        self._current: str | None = None
        self._keeper: threading.Thread | None = None
        self._keeper_lock = threading.Lock()
        self._next_tidy = 0.0

    def ensure_group(self) -> None:
        try:
            self.redis.xgroup_create(keys.EVENTS, self.group, id="0", mkstream=True)
        except redis.ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise

    def read(self, count: int = 32, block: float = 1.0) -> list[Event]:
        """Entries for this consumer: claimed ones first, else new ones (waiting up to `block`
        seconds for them)."""
        claimed = self._claim(count)
        if claimed:
            return claimed
        answer: Any = self.redis.xreadgroup(self.group, self.name, {keys.EVENTS: ">"}, count=count, block=max(1, int(block * 1000)))
        entries = answer[0][1] if answer else []
        return [(text(entry_id), texts(fields)) for entry_id, fields in entries]

    def _claim(self, count: int) -> list[Event]:
        answer: Any = self.redis.xautoclaim(keys.EVENTS, self.group, self.name, self.min_idle_ms, start_id=self._claim_from, count=count)
        self._claim_from = text(answer[0])
        events: list[Event] = []
        for entry_id, fields in answer[1]:
            if fields is None:  # trimmed from the stream while pending: nothing to deliver
                self.ack(text(entry_id))
                continue
            events.append((text(entry_id), texts(fields)))
        if events:
            logger.info("%s claimed %d notifications left by a consumer that stopped", self.name, len(events))
        return events

    def keep(self, entry_id: str) -> None:
        """Reset an entry's idle time, so no other consumer claims it while this one works."""
        self.redis.xclaim(keys.EVENTS, self.group, self.name, 0, [entry_id], justid=True)

    def ack(self, entry_id: str) -> None:
        self.redis.xack(keys.EVENTS, self.group, entry_id)

    def handle(self, event: Event, handler: Callable[[str, dict[str, str]], None]) -> None:
        """Run `handler(entry_id, fields)` for one entry and acknowledge it, keeping the entry
        claimed while the handler runs. A handler that raises leaves the entry pending: it is
        claimed again after `min_idle`."""
        entry_id, fields = event
        self._start_keeper()
        self._current = entry_id
        try:
            handler(entry_id, fields)
        finally:
            self._current = None
        self.ack(entry_id)

    def _start_keeper(self) -> None:
        with self._keeper_lock:
            if self._keeper is None:
                self._keeper = threading.Thread(target=self._keep_current, name=f"{self.name}-keeper", daemon=True)
                self._keeper.start()

    def _keep_current(self) -> None:
        """Renew the claim on the entry being handled, three times per `min_idle`."""
        interval = self.min_idle_ms / 3000
        while True:
            time.sleep(interval)
            current = self._current
            if current is None:
                continue
            try:
                self.keep(current)
            except redis.RedisError:
                logger.warning("could not keep notification %s claimed", current)

    def tidy(self, *, idle: float = 3600.0) -> list[str]:
        """Remove the group's consumers that hold nothing and have not read for `idle`
        seconds (consumers of stopped processes: every process names its own); their names."""
        removed: list[str] = []
        for info in self.redis.xinfo_consumers(keys.EVENTS, self.group):
            name = text(info["name"])
            if name != self.name and int(info["pending"]) == 0 and int(info["idle"]) > idle * 1000:
                self.redis.xgroup_delconsumer(keys.EVENTS, self.group, name)
                removed.append(name)
        return removed

    def run(self, handler: Callable[[str, dict[str, str]], None], stop: threading.Event, *, block: float = 1.0) -> None:
        """Handle entries one at a time until `stop` is set; Redis errors are logged and
        retried (redis-py's own backoff, then this loop's next turn)."""
        self.ensure_group()
        while not stop.is_set():
            try:
                if time.monotonic() >= self._next_tidy:
                    self._next_tidy = time.monotonic() + 600
                    self.tidy()
                events = self.read(block=block)
            except redis.RedisError as error:
                logger.warning("reading notifications failed (%s); trying again", type(error).__name__)
                stop.wait(block)
                continue
            for event in events:
                if stop.is_set():
                    return
                try:
                    self.handle(event, handler)
                except Exception:
                    logger.exception("notification %s could not be handled; it is claimed again later", event[0])
