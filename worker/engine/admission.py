"""Which waiting requests join a continuous batch at a step (docs/engine.md#batching)."""

from __future__ import annotations

from worker.engine.interface import ContinuousBatch
from worker.engine.pending import URGENCY, Pending
from worker.engine.per_request import PerRequestBatch


class Admission:
    """The admission policy of a continuous batch; only the engine thread uses it.

    Args:
        running: the continuous batch.
        per_request: what runs the requests the batch cannot hold.
        max_batch_size: most rows, as configured (the batch may have fewer slots).
        max_batch_tokens: most prompt-plus-max_tokens tokens of the rows in flight.
        max_prefill_tokens: most prompt tokens computed per step.
    """

    def __init__(
        self,
        running: ContinuousBatch,
        per_request: PerRequestBatch,
        *,
        max_batch_size: int,
        max_batch_tokens: int,
        max_prefill_tokens: int,
    ) -> None:
        self.running = running
        self.per_request = per_request
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_prefill_tokens = max_prefill_tokens
        #: Most rows in the running batch: the configured bound, or fewer slots.
        self.most_rows = min(max_batch_size, running.capacity or max_batch_size)
        #: Steps joinable requests have waited for rows to free up (`_holds`).
        self._held = 0

    def choose(self, backlog: list[Pending]) -> tuple[list[Pending], list[Pending]]:
        """The waiting requests to admit now, in `_order`. Admission stops at the first
        request that does not fit the rows or KV tokens left, so a large request is not passed
        for ever (a batch line that does not fit the cache's shape now is passed, up to
        `max_batch_size` steps that admitted others); prompt tokens to compute are bounded per
        step (a prompt over the bound is admitted alone); of waiting prompts that share a
        first block nobody has computed yet, one goes first and the others follow once its
        blocks are cached; and batch lines may wait a few steps for more free rows (`_holds`).

        A request the batch cannot take (a suspect to run alone, or one no slot can hold) runs
        per request once the batch is empty: the others go on beside the batch until it has
        waited `max_batch_size` admitting steps, then nothing is admitted until the batch has
        emptied. Returns the requests to admit, and those to run per request now."""
        running = self.running
        rows = len(running)
        if not backlog or rows >= self.most_rows or any(item.alone for item in running.requests):
            self._held = 0
            return [], []
        apart = [item for item in backlog if item.alone or not running.fits_ever(item)]
        if apart and not rows:
            return [], self._apart_batch(apart)
        if any(item.passed >= self.max_batch_size for item in apart):
            return [], []  # the batch drains for them
        joinable = [item for item in backlog if not (item.alone or not running.fits_ever(item))]
        if self._holds(joinable, rows):
            return [], []
        cached = {id(item): running.cached_prefix(item) for item in backlog}
        order = self._order(joinable, cached)
        chosen: list[Pending] = []
        prefill = 0
        tokens = sum(item.rows * item.cost for item in running.requests)
        first_blocks: set[bytes] = set()
        for item in order:
            verdict = self._admissible(item, chosen, (rows, tokens, prefill), cached[id(item)])
            if verdict == "stop":
                break
            block = running.first_block(item) if verdict == "admit" and not cached[id(item)] else None
            if verdict == "skip" or (block is not None and block in first_blocks):
                continue
            if block is not None:
                first_blocks.add(block)
            chosen.append(item)
            rows += item.rows
            tokens += item.rows * item.cost
            prefill += self._to_compute(item, cached[id(item)])
        self._count_passed([*order, *apart], chosen)
        return chosen, []

    def _holds(self, joinable: list[Pending], rows: int) -> bool:
        """Whether the waiting requests that can join wait, this step, for more rows of the
        running batch to free up.

        Each join prefills in a forward pass of its own, which costs about as much as a decode
        step of the whole batch however few rows it brings; a free row left for a step costs
        one row of that step. So requests join once an eighth of the rows is free (or all that
        wait fit), or after the batch's `hold_steps` steps, as TGI's router does with its
        waiting-served ratio. Single requests wait too: with every row busy they arrive about
        one per freed row, and joining each alone would add a prefill pass per request to the
        decode of every line beside them (a wait of at most `hold_steps` steps)."""
        most = self.running.hold_steps
        if not rows or not most or not joinable:
            self._held = 0
            return False
        wanted = min(max(1, self.most_rows // 8), sum(item.rows for item in joinable))
        if self.most_rows - rows >= wanted or self._held >= most:
            self._held = 0
            return False
        self._held += 1
        return True

    def _apart_batch(self, apart: list[Pending]) -> list[Pending]:
        """What runs per request now: the oldest suspect alone, else the requests no slot can
        hold, together as one per-request batch."""
        suspects = [item for item in apart if item.alone]
        if suspects:
            return [min(suspects, key=lambda item: item.enqueued_at)]
        batch, _ = self.per_request.choose(apart)
        return batch

    def _order(self, backlog: list[Pending], cached: dict[int, int]) -> list[Pending]:
        """Single requests first; among single requests and among batch lines, by service tier
        (`priority`, then `default`, then `flex`); then batch lines whose prompt prefix is
        cached (a line passed over `max_batch_size` times goes first all the same); then by
        place in their chunk, so that chunks go in turn (a chunk that came later does not wait
        for the whole of an earlier one); then the oldest."""
        return sorted(
            backlog,
            key=lambda item: (
                not item.interactive,
                URGENCY[item.request.tier],
                not (cached[id(item)] or item.passed >= self.max_batch_size),
                item.rank,
                item.enqueued_at,
            ),
        )

    @staticmethod
    def _to_compute(item: Pending, cached: int) -> int:
        """Prompt tokens a request's prefill computes."""
        return item.rows * (len(item.prepared.prompt_ids) - cached)

    def _admissible(self, item: Pending, chosen: list[Pending], taken: tuple[int, int, int], cached: int) -> str:
        """`admit`, `skip` (it waits; later ones may go) or `stop` (nothing more this step),
        given the rows, tokens and prompt tokens to compute already `taken`."""
        running = self.running
        rows, tokens, prefill = taken
        if not rows and not chosen:
            return "admit" if running.fits([item]) else "stop"  # an empty batch takes its first request
        if rows + item.rows > self.most_rows or tokens + item.rows * item.cost > self.max_batch_tokens:
            return "stop"
        if chosen and prefill + self._to_compute(item, cached) > self.max_prefill_tokens:
            return "stop"  # (a prompt over the bound joins alone)
        if not running.fits([*chosen, item]):
            # A single request, or a line passed over long enough, is not passed again.
            return "stop" if item.interactive or item.passed >= self.max_batch_size else "skip"
        return "admit"

    @staticmethod
    def _count_passed(waiting: list[Pending], chosen: list[Pending]) -> None:
        """One more pass for each request left waiting while others were admitted ahead of it
        (after it in the order, or while it has to run apart)."""
        if not chosen:
            return
        taken = {id(item) for item in chosen}
        for item in waiting:
            if id(item) not in taken:
                item.passed += 1
