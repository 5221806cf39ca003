"""Requests handed to the engine that its thread has not taken yet."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable

from worker.engine.pending import Pending


class Arrivals:
    """The engine's inbox: single requests (someone waits on each), taken first, and a group
    per `submit_many` (a chunk's lines), taken from the groups in turn, so that a small job's
    chunk does not wait behind a large one's (docs/scheduling.md). A None wakes the engine
    thread (to stop, or to drain). One lock for many requests at a time: a chunk's lines go in,
    and a batch's worth comes out, in one acquisition each.
    """

    def __init__(self) -> None:
        self._groups: deque[deque[Pending | None]] = deque()
        self._singles: deque[Pending] = deque()
        self._arrived = threading.Condition(threading.Lock())

    def __bool__(self) -> bool:
        """Whether anything waits (a read without the lock: it may be a moment old)."""
        return bool(self._groups or self._singles)

    @property
    def singles(self) -> bool:
        """Whether single requests wait (a read without the lock)."""
        return bool(self._singles)

    def put(self, items: Iterable[Pending | None]) -> None:
        with self._arrived:
            group: deque[Pending | None] = deque()
            for item in items:
                if item is not None and item.interactive:
                    self._singles.append(item)
                elif item is None:
                    self._groups.append(deque([None]))
                else:
                    group.append(item)
            if group:
                self._groups.append(group)
            self._arrived.notify()

    def take(self, limit: int, timeout: float | None, *, singles: int = 0) -> list[Pending | None]:
        """Up to `singles` waiting single requests, then up to `limit` items in all (more
        when the singles alone pass it), after waiting up to `timeout` seconds (None: for
        ever) for the first."""
        with self._arrived:
            if not self._groups and not self._singles and timeout != 0:
                self._arrived.wait_for(lambda: self._groups or self._singles, timeout)
            taken: list[Pending | None] = []
            while self._singles and len(taken) < max(limit, singles):
                taken.append(self._singles.popleft())
            groups = self._groups
            while groups and len(taken) < limit:
                # One from each group in turn.
                taken.append(groups[0].popleft())
                if groups[0]:
                    groups.rotate(-1)
                else:
                    groups.popleft()
            return taken

    def count(self) -> int:
        """Requests waiting."""
        with self._arrived:
            return len(self._singles) + sum(len(group) for group in self._groups if group[0] is not None)

    def clear(self) -> list[Pending]:
        """Take every request still waiting."""
        with self._arrived:
            queued = [item for item in [*self._singles, *(item for group in self._groups for item in group)] if item is not None]
            self._singles.clear()
            self._groups.clear()
        return queued
