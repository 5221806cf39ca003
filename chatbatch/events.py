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
from chatbatch.redisconn import block_ms, blocking_twin, text, texts

logger = logging.getLogger(__name__)

#: The stream keeps about this many entries (trimmed approximately, as XADD MAXLEN ~ does).
STREAM_LENGTH = 100_000

#: Seconds after an object with a callback ends before the callback sweep sends its delivery
#: itself, if the relay has not (chatbatch/callbacks.py).
CALLBACK_GRACE = 60

#: Lua: add one notification. Expects as locals `events` (the stream key), `record` (the
#: object's record key), `due` (the callbacks' outbox key), `kind`, `object_id`, `status` and
#: `now` (unix seconds). An object naming a callback URL also gets `"callback": "1"` in its
#: notification, the notification's id in its record (`callback_event`, the event id every
#: attempt carries), and an entry in the outbox.
LUA_PUBLISH = (
    "if redis.call('HGET', record, 'callback_url') then "
    "local event = redis.call('XADD', events, 'MAXLEN', '~', " + str(STREAM_LENGTH) + ", '*', 'type', kind, "
    "'id', object_id, 'status', status, 'callback', '1') "
    "redis.call('HSET', record, 'callback_event', event) "
    "redis.call('ZADD', due, now + " + str(CALLBACK_GRACE) + ", kind .. '\t' .. object_id) "
    "else "
    "redis.call('XADD', events, 'MAXLEN', '~', " + str(STREAM_LENGTH) + ", '*', 'type', kind, 'id', object_id, "
    "'status', status) "
    "end"
)

#: An event as read: entry id, and its fields as text.
Event = tuple[str, dict[str, str]]

# KEYS: stream. ARGV: group, consumer, entry id. Resets the entry's idle time if this consumer
# still holds it (another may have claimed it while this one stalled); 1 if it did.
_KEEP = """
local held = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if held[1] == nil or held[1][2] ~= ARGV[2] then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
return 1
"""

# KEYS: stream. ARGV: group, the calling consumer, idle milliseconds. Removes the consumers that
# hold nothing and have been idle that long, in the same step as it looks (a consumer that read
# in between would lose what it took); their names.
_TIDY = """
local removed = {}
for _, info in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local fields = {}
  for i = 1, #info, 2 do fields[info[i]] = info[i + 1] end
  if fields['name'] ~= ARGV[2] and tonumber(fields['pending']) == 0 and tonumber(fields['idle']) > tonumber(ARGV[3]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], fields['name'])
    table.insert(removed, fields['name'])
  end
end
return removed
"""


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
        max_deliveries: an entry delivered this many times without being acknowledged (its
            handler fails every time) is logged and acknowledged, not claimed again for ever.
    """

    def __init__(
        self, client: redis.Redis, group: str, name: str | None = None, *, min_idle: float = 60.0, max_deliveries: int = 10
    ) -> None:
        if min_idle <= 0:
            raise ValueError(f"min_idle must be positive, got {min_idle}")
        if max_deliveries < 1:
            raise ValueError(f"max_deliveries must be at least 1, got {max_deliveries}")
        self.redis = client
        # XREADGROUP blocks: on a connection of its own, with the blocking socket timeout.
        self._blocking = blocking_twin(client)
        self.group = group
        self.name = name or new_id("consumer-")
        self.min_idle_ms = int(min_idle * 1000)
        self.max_deliveries = max_deliveries
        self._claim_from = "0-0"
        self._keep_script = client.register_script(_KEEP)
        self._tidy_script = client.register_script(_TIDY)
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
        answer: Any = self._blocking.xreadgroup(self.group, self.name, {keys.EVENTS: ">"}, count=count, block=block_ms(block))
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
        if not events:
            return events
        logger.info("%s claimed %d notifications left by a consumer that stopped", self.name, len(events))
        return self._drop_undeliverable(events)

    def _drop_undeliverable(self, events: list[Event]) -> list[Event]:
        """Acknowledge, with an error in the log, the claimed entries already delivered
        `max_deliveries` times."""
        pending: Any = self.redis.xpending_range(keys.EVENTS, self.group, events[0][0], events[-1][0], len(events), self.name)
        times = {text(item["message_id"]): int(item["times_delivered"]) for item in pending}
        kept: list[Event] = []
        for event in events:
            if times.get(event[0], 0) > self.max_deliveries:
                logger.error("notification %s %s failed %d deliveries; it is dropped", event[0], event[1], times[event[0]] - 1)
                self.ack(event[0])
            else:
                kept.append(event)
        return kept

    def keep(self, entry_id: str) -> bool:
        """Reset an entry's idle time, so no other consumer claims it while this one works;
        False if this consumer no longer holds it."""
        return bool(self._keep_script(keys=[keys.EVENTS], args=[self.group, self.name, entry_id]))

    def ack(self, entry_id: str) -> None:
        self.redis.xack(keys.EVENTS, self.group, entry_id)

    def handle(self, event: Event, handler: Callable[[str, dict[str, str]], None]) -> None:
        """Run `handler(entry_id, fields)` for one entry and acknowledge it, keeping the entry
        claimed while the handler runs. A handler that raises leaves the entry pending: it is
        claimed again after `min_idle`."""
        entry_id, fields = event
        with self._keeper_lock:
            self._current = entry_id
        self._start_keeper()
        try:
            handler(entry_id, fields)
        finally:
            with self._keeper_lock:
                self._current = None
        self.ack(entry_id)

    def _start_keeper(self) -> None:
        with self._keeper_lock:
            if self._keeper is None:
                self._keeper = threading.Thread(target=self._keep_current, name=f"{self.name}-keeper", daemon=True)
                self._keeper.start()

    def _keep_current(self) -> None:
        """Renew the claim on the entry being handled, three times per `min_idle`; the thread
        ends once no entry is being handled."""
        interval = self.min_idle_ms / 3000
        while True:
            time.sleep(interval)
            with self._keeper_lock:
                current = self._current
                if current is None:
                    self._keeper = None
                    return
            try:
                if not self.keep(current):
                    logger.warning("%s no longer holds notification %s: another consumer claimed it", self.name, current)
            except redis.RedisError:
                logger.warning("could not keep notification %s claimed", current)

    def tidy(self, *, idle: float = 3600.0) -> list[str]:
        """Remove the group's consumers that hold nothing and have not read for `idle`
        seconds (consumers of stopped processes: every process names its own); their names."""
        removed = self._tidy_script(keys=[keys.EVENTS], args=[self.group, self.name, int(idle * 1000)])
        return [text(name) for name in removed]

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
