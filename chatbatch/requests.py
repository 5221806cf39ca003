"""The single-request lifecycle: record, deliveries, result, and the pending entry the recovery
sweep reads.

A request is recorded when it is enqueued: its record (queue, created_at, the HTTP API's owner,
a callback URL) and its pending entry (queue and body, kept until answered, so that a request
whose message the broker lost can be sent again). Its result is stored once, whichever delivery
comes first; the same step adds an entry to the request's ready stream (waiters block on it
with XREAD, which reads without consuming), publishes the request's id on the
`chatbatch:answered` channel (a gateway waits on many requests over one subscription), adds
the notification, and drops the pending entry.

A streamed request whose reader went away (the HTTP client disconnected, or `Client.stream`'s
iterator was closed early) is marked in its record (`disconnect`); the worker streaming it reads
the mark and cancels the request (worker/service/publisher.py), whose result is then a `cancelled`
error record.

Reads (`result`, `wait`, `get`) never write.
"""

from __future__ import annotations

import json
import time
from typing import Any, Final, cast

import redis

from chatbatch import keys
from chatbatch.callbacks import initial_fields
from chatbatch.events import LUA_PUBLISH
from chatbatch.redisconn import Fields, blocking_twin, maybe_text, text, texts

# KEYS: result, ready stream, record, pending hash, events, callbacks' outbox. ARGV: result
# JSON, TTL, status ("completed" or "failed"), request id, now, the answered channel. Stores
# the result once; 1 if this call stored it.
_STORE = """
redis.call('HDEL', KEYS[4], ARGV[4])
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then return 0 end
redis.call('XADD', KEYS[2], '*', 'status', ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('PUBLISH', ARGV[6], ARGV[4])
local events, record, due, kind, object_id, status, now = KEYS[5], KEYS[3], KEYS[6], 'chat.completion', ARGV[4], ARGV[3], tonumber(ARGV[5])
""" + LUA_PUBLISH + """
return 1
"""

# KEYS: the record. ARGV: now. Marks a recorded request disconnected (an expired record is not
# made again, without a TTL).
_DISCONNECT = """
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'disconnected', ARGV[1]) end
"""

#: Field of a request's record: unix seconds at which its stream's reader went away.
DISCONNECTED: Final = "disconnected"

#: Status of a request's record as the HTTP API shows it.
QUEUED: Final = "queued"
COMPLETED: Final = "completed"
FAILED: Final = "failed"


class Requests:
    """Single requests in Redis. Thread-safe.

    Args:
        client: the Redis connection (decoded replies or not).
        result_ttl: seconds a request's record and result stay readable.
    """

    def __init__(self, client: redis.Redis, *, result_ttl: int) -> None:
        self.redis = client
        self.result_ttl = result_ttl
        self._store = client.register_script(_STORE)
        self._disconnect = client.register_script(_DISCONNECT)
        self._blocking: redis.Redis | None = None

    @property
    def blocking(self) -> redis.Redis:
        """A connection of the same server for blocking reads (waits and streams), made on
        first use (chatbatch/redisconn.py)."""
        if self._blocking is None:
            self._blocking = blocking_twin(self.redis)
        return self._blocking

    # Writes.

    def record(
        self,
        request_id: str,
        *,
        queue: str,
        body: dict[str, Any],
        owner: str | None = None,
        callback_url: str | None = None,
    ) -> None:
        """Record a request about to be enqueued, with its pending entry."""
        now = int(time.time())
        fields: dict[str, Any] = {"id": request_id, "queue": queue, "created_at": now}
        if owner is not None:
            fields["owner"] = owner
        if callback_url:
            fields.update(initial_fields(callback_url))
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(keys.request(request_id), mapping=cast(Fields, fields))
        pipe.expire(keys.request(request_id), self.result_ttl)
        pipe.hset(keys.PENDING_REQUESTS, request_id, json.dumps([queue, body, now]))
        pipe.execute()

    def count_delivery(self, request_id: str) -> int:
        """Count one more delivery of the request's task; returns the count including it."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.incr(keys.request_deliveries(request_id))
        pipe.expire(keys.request_deliveries(request_id), self.result_ttl)
        return int(pipe.execute()[0])

    def uncount_delivery(self, request_id: str) -> None:
        """Take back the count of a delivery that handed the request back (worker stopping)."""
        self.redis.decr(keys.request_deliveries(request_id))

    def store_result(self, request_id: str, record: dict[str, Any]) -> bool:
        """Store the chat.completion (or `{"error": ...}`) once; later deliveries keep the first.
        Returns whether this call stored it."""
        status = FAILED if "error" in record else COMPLETED
        stored = self._store(
            keys=[keys.result(request_id), keys.result_ready(request_id), keys.request(request_id), keys.PENDING_REQUESTS,
                  keys.EVENTS, keys.CALLBACKS_DUE],
            args=[json.dumps(record), self.result_ttl, status, request_id, int(time.time()), keys.ANSWERED],
        )
        return bool(stored)

    def disconnect(self, request_id: str) -> None:
        """Mark a streamed request as no longer read: its worker cancels it."""
        self._disconnect(keys=[keys.request(request_id)], args=[int(time.time())])

    def resend(self, request_id: str, queue: str, body: dict[str, Any], sent: float) -> None:
        """Stamp a pending request as sent again at `sent` (the recovery sweep's next look is a
        stall period later)."""
        self.redis.hset(keys.PENDING_REQUESTS, request_id, json.dumps([queue, body, int(sent)]))

    def forget_pending(self, request_id: str) -> None:
        self.redis.hdel(keys.PENDING_REQUESTS, request_id)

    # Reads.

    def disconnected(self, request_id: str) -> bool:
        """Whether the client of a streamed request went away."""
        return bool(self.redis.hexists(keys.request(request_id), DISCONNECTED))

    def answered(self, request_id: str) -> bool:
        return bool(self.redis.exists(keys.result(request_id)))

    def result(self, request_id: str) -> dict[str, Any] | None:
        """The stored chat.completion or `{"error": ...}` record; None while unanswered."""
        raw = self.redis.get(keys.result(request_id))
        return None if raw is None else cast(dict[str, Any], json.loads(raw))

    def wait(self, request_id: str, timeout: float | None) -> dict[str, Any] | None:
        """The result, waiting up to `timeout` seconds (None: for ever) for it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            found = self.result(request_id)
            if found is not None:
                return found
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            # XREAD from the stream's start returns at once once the entry is there; the cap
            # makes a lost wake-up (the key expired and came back) cost at most a second.
            block = 1000 if left is None else max(1, min(1000, int(left * 1000)))
            try:
                self.blocking.xread({keys.result_ready(request_id): "0-0"}, count=1, block=block)
            except redis.ResponseError:  # a list, from a worker older than the ready stream
                time.sleep(block / 1000)

    def get(self, request_id: str) -> dict[str, str]:
        """The request's record fields (empty when unknown or expired)."""
        return texts(self.redis.hgetall(keys.request(request_id)))

    def owner(self, request_id: str) -> str | None:
        return maybe_text(self.redis.hget(keys.request(request_id), "owner"))

    def pending(self) -> dict[str, tuple[str, dict[str, Any], int]]:
        """Request id -> (queue, body, unix seconds sent) of the requests not yet answered."""
        requests: dict[str, tuple[str, dict[str, Any], int]] = {}
        for request_id, value in self.redis.hgetall(keys.PENDING_REQUESTS).items():
            queue, body, sent = json.loads(value)
            requests[text(request_id)] = (queue, body, sent)
        return requests
