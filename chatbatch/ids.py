"""Opaque random ids (`chatcmpl-...`, `batch_req_...`): 128 bits from the OS's CSPRNG
(`secrets`), as 32 hex digits.

Ids name objects to the keys that own them, anchor idempotency and are callback event ids, so
none may be inferred from others: a seeded generator (`random.Random`) gives its state away
after a few hundred outputs, and with it every id it mints next. One `getrandom` call per id
costs about as much as the generator did (~0.5 µs), and needs no reseeding after a fork.
"""

from __future__ import annotations

import secrets


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(16)}"
