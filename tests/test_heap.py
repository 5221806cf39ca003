"""The worker's garbage collector settings (worker/service/heap.py)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from worker.service import heap


@pytest.fixture
def settled() -> Iterator[int]:
    threshold = gc.get_threshold()
    frozen = heap.settle()
    try:
        yield frozen
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def test_settle_freezes_what_is_loaded_and_spaces_out_young_collections(settled: int) -> None:
    assert settled >= gc.get_freeze_count() > 1_000  # frozen objects that die leave the count
    assert gc.get_threshold()[0] == heap.YOUNG_THRESHOLD
    # What exists now is outside every generation: a collection does not walk it.
    assert sum(gc.get_count()) < heap.YOUNG_THRESHOLD


def test_garbage_made_after_settling_is_still_collected(settled: int) -> None:
    first, second = Node(), Node()
    first.other, second.other = second, first  # a cycle: only the collector frees it
    gone = weakref.ref(first)
    del first, second
    gc.collect()
    assert gone() is None
