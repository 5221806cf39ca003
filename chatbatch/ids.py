"""Opaque random ids (`chatcmpl-...`, `batch_req_...`): 128 random bits as 32 hex digits, from
a generator seeded by the OS once per process, so minting the ids of thousands of lines makes
no system call per id."""

from __future__ import annotations

import os
import random

_random = random.Random()
os.register_at_fork(after_in_child=_random.seed)


def new_id(prefix: str) -> str:
    return f"{prefix}{_random.getrandbits(128):032x}"
