"""Idempotency keys: one run per intent.

A call that sends an `Idempotency-Key` (`POST /v1/chat/completions`, `/v1/batches`,
`/v1/files`, or `Client.submit(idempotency_key=...)`) claims the key, for its owner and its kind
of call, for IDEMPOTENCY_TTL. The claim names the object the first call made (a request, a
batch, a file) and a digest of the call's body. A repeat with the same key gets that object —
the first call's answer, waited for if it still runs — never a second run; a repeat with
another body is refused, since the key names one intent. A call refused before it made anything
(an invalid body) claims nothing, so a corrected call may use the same key.

This module is the only writer of the claims (`chatbatch:idempotency:*`). The owner and the key
are stored only as a digest.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from typing import Any, Final, TypeVar

import redis

from chatbatch import keys
from chatbatch.exceptions import IdempotencyConflictError, IdempotencyKeyError
from chatbatch.redisconn import text

#: How long a key names its first call's object (OpenAI's and Stripe's window: 24 h).
IDEMPOTENCY_TTL: Final = 86_400
#: Longest key accepted (Stripe's limit).
MAX_KEY_LENGTH: Final = 255

#: Longest a repeat waits for the object its key's first call is making (a few Redis writes).
MADE_WITHIN_SECONDS: Final = 5.0

T = TypeVar("T")

#: Kinds of calls; a key is claimed per owner and kind, so one key may name a chat request and a
#: batch at once.
CHAT: Final = "chat"
BATCHES: Final = "batches"
FILES: Final = "files"

# KEYS: the claim. ARGV: the claim's JSON, TTL. Claims the key when free; returns the claim in
# force (this one when it was free).
_CLAIM = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then return ARGV[1] end
return redis.call('GET', KEYS[1])
"""
# KEYS: the claim. ARGV: the object id it names now, the new claim's JSON, TTL. Points the claim at
# the new object if it still names the old one (or is gone); returns the claim in force.
_REPLACE = """
local claim = redis.call('GET', KEYS[1])
if claim and cjson.decode(claim)['id'] ~= ARGV[1] then return claim end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
return ARGV[2]
"""
# KEYS: the claim. ARGV: the object id it must name. Drops the claim if it names that object.
_RELEASE = """
local claim = redis.call('GET', KEYS[1])
if claim and cjson.decode(claim)['id'] == ARGV[1] then redis.call('DEL', KEYS[1]) return 1 end
return 0
"""


def check_key(key: str) -> str:
    """The key as sent, if usable: 1 to MAX_KEY_LENGTH printable ASCII characters.

    Raises:
        IdempotencyKeyError: another key.
    """
    if not 1 <= len(key) <= MAX_KEY_LENGTH or not all(" " <= char <= "~" for char in key):
        raise IdempotencyKeyError(
            f"the Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable ASCII characters (e.g. a UUID)"
        )
    return key


def body_digest(body: Any) -> str:
    """A digest of a call's body, the same for the same JSON whatever its keys' order."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


class Idempotency:
    """The claims of idempotency keys in Redis.

    Args:
        client: the Redis connection.
        ttl: seconds a claim lasts.
    """

    def __init__(self, client: redis.Redis, *, ttl: int = IDEMPOTENCY_TTL) -> None:
        self.redis = client
        self.ttl = ttl
        self._claim = client.register_script(_CLAIM)
        self._release = client.register_script(_RELEASE)
        self._replace = client.register_script(_REPLACE)

    @staticmethod
    def _key(kind: str, owner: str, key: str) -> str:
        return keys.idempotency(kind, hashlib.sha256(f"{owner}\0{key}".encode()).hexdigest())

    def claim(self, kind: str, owner: str, key: str, *, digest: str, object_id: str) -> str:
        """Claim `key` for the call about to make `object_id`; returns the object the key names:
        `object_id` when this call claimed it, else the first call's.

        Raises:
            IdempotencyKeyError: the key is malformed.
            IdempotencyConflictError: the key was first sent with another body.
        """
        claim = json.dumps({"id": object_id, "body": digest})
        found = json.loads(text(self._claim(keys=[self._key(kind, owner, check_key(key))], args=[claim, self.ttl])))
        if found["body"] != digest:
            raise IdempotencyConflictError(
                f"Idempotency-Key {key!r} was first sent with a different body (it names {found['id']}): "
                "send the same body to get that call's result, or use a new key for a new call"
            )
        return str(found["id"])

    def release(self, kind: str, owner: str, key: str, object_id: str) -> None:
        """Drop the claim of `key` if it names `object_id` (its call failed before making it)."""
        self._release(keys=[self._key(kind, owner, key)], args=[object_id])

    def replace(self, kind: str, owner: str, key: str, *, gone: str, digest: str, object_id: str) -> str:
        """Point `key` at `object_id` if it still names `gone` (an object that is no more);
        returns the object the key names then: `object_id`, or what another call put there
        first."""
        claim = json.dumps({"id": object_id, "body": digest})
        found = json.loads(text(self._replace(keys=[self._key(kind, owner, key)], args=[gone, claim, self.ttl])))
        return str(found["id"])

    def first(
        self, kind: str, owner: str, key: str, *, digest: str, object_id: str, find: Callable[[str], T | None]
    ) -> T | None:
        """For a call about to make `object_id`: None when it claimed `key` (it goes on and
        makes the object); else the object the key's first call made (`find(id)`), waited
        for while that call is still making it. A first object that is gone (deleted, expired,
        or never made) gives its claim to one of the calls that find it gone, which goes on
        (None); the others get that one's object.

        Raises:
            IdempotencyKeyError: the key is malformed.
            IdempotencyConflictError: the key was first sent with another body.
        """
        named = self.claim(kind, owner, key, digest=digest, object_id=object_id)
        while named != object_id:
            deadline = time.monotonic() + MADE_WITHIN_SECONDS
            while (found := find(named)) is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if found is not None:
                return found
            named = self.replace(kind, owner, key, gone=named, digest=digest, object_id=object_id)
        return None
