"""Callbacks: a signed POST to the URL a request or a batch named, when it ends.

The workers send them (worker/service/callbacks.py), as Celery tasks with retry and backoff, whether or
not a gateway runs. This module owns what both sides share: the signature, and the delivery
state kept in the job or request record (`callback_status`, `callback_attempts`,
`callback_last_error`, `callback_delivered_at`), changed only here, each change atomic.

One delivery of an event runs at a time: an attempt first takes the event's lease, held by the
Celery task (whose retries keep its id) through the attempt and the backoff after a failure.
A second task for the same event (a notification relayed twice) finds the lease held, or the
callback delivered, and stops. The only repeat a receiver sees is a retry after a failure or a
timeout, with the same `X-Chatbatch-Event-Id`.

Signature:

    X-Chatbatch-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(CHATBATCH_CALLBACK_SECRET, "<t>.<body>")>

Receivers recompute the HMAC over the timestamp, a dot and the raw body, compare in constant
time, and reject old timestamps (replays); `verify` does this.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Any

import redis

from chatbatch import keys
from chatbatch.events import CALLBACK_GRACE
from chatbatch.exceptions import ConfigurationError
from chatbatch.redisconn import maybe_text, text

#: The consumer group of the workers' callback relay on the notification stream.
GROUP = "chatbatch-callbacks"
SIGNATURE_HEADER = "X-Chatbatch-Signature"
EVENT_HEADER = "X-Chatbatch-Event"
OBJECT_HEADER = "X-Chatbatch-Object-Id"
EVENT_ID_HEADER = "X-Chatbatch-Event-Id"
ATTEMPT_HEADER = "X-Chatbatch-Attempt"
#: Event types, by what they notify of.
BATCH, CHAT_COMPLETION = "batch", "chat.completion"

# KEYS: record, lease, outbox. ARGV: task id, retries (the task's earlier retries), lease
# seconds, now, outbox member. The attempt number this delivery may make, or -1 (no callback),
# -2 (already delivered or failed for good), -3 (another delivery holds the lease). A task
# takes over the lease its own earlier attempt kept through the backoff; a second copy of the
# same attempt (a message kombu restored after the visibility timeout) does not.
_CLAIM = """
if not redis.call('HGET', KEYS[1], 'callback_url') then return -1 end
local status = redis.call('HGET', KEYS[1], 'callback_status')
if status == 'delivered' or status == 'failed' then return -2 end
local holder = redis.call('GET', KEYS[2])
if holder then
  local task, retries = string.match(holder, '^(.*):(%d+)$')
  if task ~= ARGV[1] or tonumber(retries) >= tonumber(ARGV[2]) then return -3 end
end
redis.call('SET', KEYS[2], ARGV[1] .. ':' .. ARGV[2], 'EX', ARGV[3])
redis.call('ZADD', KEYS[3], tonumber(ARGV[4]) + tonumber(ARGV[3]) + GRACE, ARGV[5])
return redis.call('HINCRBY', KEYS[1], 'callback_attempts', 1)
""".replace("GRACE", str(CALLBACK_GRACE))

# KEYS: record, lease, outbox. ARGV: holder, status, last error, delivered_at ('' if none),
# lease seconds to keep ('0' to release), now, outbox member. A record that expired meanwhile
# is not brought back.
_SETTLE = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('ZREM', KEYS[3], ARGV[7])
  return 0
end
local fields = {'callback_status', ARGV[2], 'callback_last_error', ARGV[3]}
if ARGV[4] ~= '' then
  table.insert(fields, 'callback_delivered_at')
  table.insert(fields, ARGV[4])
end
redis.call('HSET', KEYS[1], unpack(fields))
local mine = redis.call('GET', KEYS[2]) == ARGV[1]
if ARGV[5] == '0' then
  if mine then redis.call('DEL', KEYS[2]) end
  redis.call('ZREM', KEYS[3], ARGV[7])
else
  if mine then redis.call('EXPIRE', KEYS[2], ARGV[5]) end
  redis.call('ZADD', KEYS[3], tonumber(ARGV[6]) + tonumber(ARGV[5]) + GRACE, ARGV[7])
end
return 1
""".replace("GRACE", str(CALLBACK_GRACE))

#: What a key holder reads of a failed attempt (`callback_last_error`): whether it was sent,
#: never how the network answered (a scanner's signal); the workers' logs have the cause.
NOT_DELIVERED = "not delivered: the receiver did not answer 2xx in time (the workers' logs have the cause)"
REFUSED = "not sent: the URL's host is, or resolves to, an address callbacks may not go to (CHATBATCH_CALLBACK_ALLOW)"
NO_SECRET = "not sent: CHATBATCH_CALLBACK_SECRET is not set on the worker"
EXPIRED = "not sent: the object expired from Redis"


def shown_error(error: str) -> str:
    """The delivery error kept in the record for key holders to read: chatbatch's own
    sentences as they are, any network or HTTP error as NOT_DELIVERED."""
    return error if error in (REFUSED, NO_SECRET, EXPIRED) else NOT_DELIVERED


#: What `claim` answers instead of an attempt number.
NO_CALLBACK, SETTLED, BUSY = -1, -2, -3


def sign(secret: str, body: bytes, timestamp: int) -> str:
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify(secret: str, body: bytes, header: str, *, tolerance: float = 300) -> bool:
    """Check a signature header (for receivers written in Python)."""
    try:
        fields = dict(part.split("=", 1) for part in header.split(","))
        timestamp = int(fields["t"])
    except (ValueError, KeyError):
        return False
    if abs(time.time() - timestamp) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, body, timestamp), header)


def check_url(url: str | None, secret: str, *, option: str = "callback_url") -> str | None:
    """A callback URL a producer may record: http(s), with a secret configured to sign it.

    Raises:
        ConfigurationError: naming `option` and the fix.
    """
    if url is None:
        return None
    if not url.startswith(("http://", "https://")):
        raise ConfigurationError(f"{option} must be an http:// or https:// URL, got {url[:60]!r}")
    if not secret:
        raise ConfigurationError(
            f"{option} needs CHATBATCH_CALLBACK_SECRET, which signs callbacks: set it for producers and workers alike"
        )
    return url


def record_key(kind: str, object_id: str) -> str:
    if kind == BATCH:
        return keys.job(object_id)
    if kind == CHAT_COMPLETION:
        return keys.request(object_id)
    raise ValueError(f"unknown event type {kind!r}")


def member(kind: str, object_id: str) -> str:
    """An object's entry in the callbacks' outbox."""
    return f"{kind}\t{object_id}"


def initial_fields(url: str) -> dict[str, str]:
    """The callback fields a record starts with when it names `url`."""
    return {"callback_url": url, "callback_status": "pending", "callback_attempts": "0"}


def callback_state(fields: dict[str, str]) -> dict[str, Any] | None:
    """The delivery state of a callback, from the `callback_*` fields of a job or request
    record; None when the record names no callback."""
    if not fields.get("callback_url"):
        return None
    return {
        "url": fields["callback_url"],
        "status": fields.get("callback_status", "pending"),
        "attempts": int(fields.get("callback_attempts", 0)),
        "last_error": fields.get("callback_last_error") or None,
        "delivered_at": int(fields["callback_delivered_at"]) if fields.get("callback_delivered_at") else None,
    }


class Callbacks:
    """The delivery state of callbacks, and their outbox. Thread-safe.

    Args:
        client: the Redis connection (decoded replies or not).
    """

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._claim = client.register_script(_CLAIM)
        self._settle = client.register_script(_SETTLE)

    def url(self, kind: str, object_id: str) -> str | None:
        return maybe_text(self.redis.hget(record_key(kind, object_id), "callback_url"))

    def event_id(self, kind: str, object_id: str) -> str | None:
        """The id of the notification the callback is for (the same on every attempt)."""
        return maybe_text(self.redis.hget(record_key(kind, object_id), "callback_event"))

    def claim(self, kind: str, object_id: str, task_id: str, retries: int, *, lease_seconds: float) -> int:
        """Take the event's lease for this attempt of a task and count the attempt: its number,
        or NO_CALLBACK, SETTLED or BUSY (then make no attempt)."""
        lease = max(1, int(lease_seconds))
        keys_ = [record_key(kind, object_id), keys.callback_lease(kind, object_id), keys.CALLBACKS_DUE]
        return int(self._claim(keys=keys_, args=[task_id, retries, lease, int(time.time()), member(kind, object_id)]))

    def delivered(self, kind: str, object_id: str, holder: str) -> None:
        """The receiver took it: settled for good, lease released, out of the outbox."""
        self._settle_state(kind, object_id, holder, "delivered", "", str(int(time.time())), 0)

    def failed(self, kind: str, object_id: str, holder: str, error: str, *, final: bool, keep_lease: float = 0) -> None:
        """An attempt failed: `failed` for good when `final`, else still `pending`, the lease
        kept for `keep_lease` seconds (the backoff before the retry, and its attempt)."""
        status = "failed" if final else "pending"
        self._settle_state(kind, object_id, holder, status, error, "", 0 if final else max(1, int(keep_lease)))

    def _settle_state(self, kind: str, object_id: str, holder: str, status: str, error: str, at: str, lease: int) -> None:
        keys_ = [record_key(kind, object_id), keys.callback_lease(kind, object_id), keys.CALLBACKS_DUE]
        args: list[Any] = [holder, status, error, at, lease, int(time.time()), member(kind, object_id)]
        self._settle(keys=keys_, args=args)

    def due(self, now: float | None = None, *, limit: int = 100) -> list[tuple[str, str, str]]:
        """(kind, object id, event id) of the callbacks whose delivery must be sent again: not
        settled, no attempt under way, and past their time in the outbox (the relay missed
        them, or a task was lost). Each is given another CALLBACK_GRACE before the next look;
        settled and vanished ones leave the outbox."""
        now = time.time() if now is None else now
        found: list[tuple[str, str, str]] = []
        for raw in self.redis.zrangebyscore(keys.CALLBACKS_DUE, "-inf", now, start=0, num=limit):
            entry = text(raw)
            kind, _, object_id = entry.partition("\t")
            status, event = (maybe_text(v) for v in self.redis.hmget(record_key(kind, object_id), ["callback_status", "callback_event"]))
            if status in (None, "delivered", "failed") or event is None:
                self.redis.zrem(keys.CALLBACKS_DUE, entry)
                continue
            self.redis.zadd(keys.CALLBACKS_DUE, {entry: now + CALLBACK_GRACE})
            if not self.redis.exists(keys.callback_lease(kind, object_id)):
                found.append((kind, object_id, event))
        return found
