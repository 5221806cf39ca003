"""Ids (chatbatch/ids.py) cannot be inferred from others: the attack that rebuilt a seeded
generator's state from the ids one key was given, and predicted another key's next id, fails."""

from __future__ import annotations

import random
from collections.abc import Callable

from chatbatch.ids import new_id


def _untemper(value: int) -> int:
    """The Mersenne Twister state word behind one 32-bit output."""
    value ^= value >> 18
    value ^= (value << 15) & 0xEFC60000
    result = value
    for _ in range(5):
        result = value ^ ((result << 7) & 0x9D2C5680)
    value = result
    for _ in range(3):
        result = value ^ (result >> 11)
    return result & 0xFFFFFFFF


def _predicts_the_next(mint: Callable[[str], str]) -> bool:
    """Rebuild a Mersenne Twister from 156 ids of 128 bits (624 outputs, its whole state) and
    say whether it predicts the next id exactly."""
    seen = [int(mint("file-").removeprefix("file-"), 16) for _ in range(156)]
    words = [(number >> (32 * k)) & 0xFFFFFFFF for number in seen for k in range(4)]
    rebuilt = random.Random()
    rebuilt.setstate((3, (*(_untemper(word) for word in words), 624), None))
    return f"file-{rebuilt.getrandbits(128):032x}" == mint("file-")


def test_ids_from_a_seeded_generator_give_the_next_away_and_chatbatch_ids_do_not() -> None:
    seeded = random.Random()
    assert _predicts_the_next(lambda prefix: f"{prefix}{seeded.getrandbits(128):032x}"), "the attack works on random.Random"
    assert not _predicts_the_next(new_id)
    ids = {new_id("batch_") for _ in range(10_000)}
    assert len(ids) == 10_000 and all(len(i) == len("batch_") + 32 for i in ids)
