"""The slot layout of the `static` and `compiled` decodes: a continuous batch whose every
decode step has the same shapes (docs/engine.md#batching)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from worker.decode.sampling import SamplingParams
from worker.engine.continuous import ContinuousDecode
from worker.engine.interface import StepModel
from worker.engine.pending import Pending
from worker.engine.prefix_cache import PrefixCache
from worker.engine.rows import Row

if TYPE_CHECKING:
    import torch

#: Tokens generated between two host checks of a static decode (all rows done? a stop string?).
SYNC_EVERY = 16
#: The shortest slot of a static continuous batch, where the model's context allows: fewer,
#: longer slots rather than slots too short for common requests.
SLOT_TOKENS = 4_096


def slot_shape(max_rows: int, max_tokens: int, context: int) -> tuple[int, int]:
    """Slots and tokens per slot of a static continuous batch within `max_tokens` KV tokens:
    up to `max_rows` slots, each as long as the context where that fits, else halving the slots
    until each holds SLOT_TOKENS (or the context, when shorter); lengths in multiples of 256."""
    floor = min(context, SLOT_TOKENS)
    slots = max(1, max_rows)
    while slots > 1 and max_tokens // slots < floor:
        slots //= 2
    length = min(context, max_tokens // slots)
    if length >= 256:
        length -= length % 256
    return slots, max(1, length)


class SlotDecode(ContinuousDecode):
    """The running batch of the `static` and `compiled` decodes: a fixed number of slots in one
    StaticCache, so every decode step has the same shapes (and, compiled, replays one CUDA
    graph).

    All slots write their next token's KV at one shared column, which moves right by one each
    step. A request joins a free slot with its prefilled prompt copied just left of that column
    (the columns before it masked, and the columns after it written as it decodes); its
    position ids are its own. A request joins only where its prompt fits left of the column and
    its max_tokens right of it: when not, the columns every running row has left behind are
    shifted out first, and the column may jump right past a gap the running rows mask. A slot
    whose row finished is masked and free for the next request.

    The device runs up to SYNC_EVERY steps between two looks from the host, which then settles
    finished rows (EOS, stop strings, max_tokens) and frees their slots: a slot waits at most
    that many steps to be reused.
    """

    #: Slots are freed at host syncs, every SYNC_EVERY steps: they join then.
    hold_steps = 0

    def __init__(self, runner: StepModel, prefix_cache: PrefixCache, *, slots: int, length: int) -> None:
        import torch

        super().__init__(runner, prefix_cache, max_tokens=slots * length)
        device = runner.device
        self.capacity = self.slots = slots
        self.length = length
        self._slots: list[Row | None] = [None] * slots
        self._slot_ids = [-1] * slots
        #: First column each slot's row uses, and the shared column of the next token.
        self._starts = [0] * slots
        self._column = 0
        #: Times the columns were shifted left to make room.
        self.shifts = 0
        # Its own cache (not one of the runner's per-request shapes, which are reset for reuse).
        self._cache = runner.slot_cache(slots, length)
        self._mask = torch.ones((slots, length), dtype=torch.long, device=device)
        self._next_pos = torch.zeros((slots, 1), dtype=torch.long, device=device)
        self._logits = torch.zeros((slots, runner.vocab_size), device=device)

    def __len__(self) -> int:
        return sum(row is not None for row in self._slots)

    def _remaining(self) -> list[int]:
        """Tokens each running row may still generate (max_tokens less what it has)."""
        return [row.prepared.max_new - row.generated for row in self._slots if row is not None]

    def _plan(self, items: list[Pending]) -> tuple[int, int] | None:
        """Where requests would join: (columns to shift out first, the shared column after
        they join), or None when they cannot join now."""
        width = self.prefill_width(items)
        longest = max(item.prepared.max_new for item in items)
        remaining = self._remaining()
        running = [start for start, row in zip(self._starts, self._slots) if row is not None]
        for shift in (0, min(running, default=self._column)):
            column = max(self._column - shift, width)
            if column + longest <= self.length and all(column + left <= self.length for left in remaining):
                return shift, column
        return None

    def fits_ever(self, item: Pending) -> bool:
        return item.request.n <= self.slots and len(item.prepared.prompt_ids) + item.prepared.max_new <= self.length

    def fits(self, items: list[Pending]) -> bool:
        rows = sum(item.request.n for item in items)
        return rows <= self._slots.count(None) and self._plan(items) is not None

    def _admit(self, items: list[Pending]) -> None:
        plan = self._plan(items)
        if plan is None or sum(item.request.n for item in items) > self._slots.count(None):
            raise RuntimeError("admitted requests that do not fit the slots")  # the engine asks `fits` first
        shift, column = plan
        # Prefilled first, apart from the slots: a failure leaves them as they were.
        joining = self._prefilled(items)
        if shift:
            self._shift(shift)
        self._move_to(column)
        self._place(*joining)

    def _shift(self, count: int) -> None:
        """Move every slot's columns `count` to the left (the running rows left them all)."""
        if not len(self):
            self._set_column(self._column - count)  # nothing to keep
            return
        self.shifts += 1
        for layer in self._cache.layers:
            layer.keys[:, :, : self.length - count] = layer.keys[:, :, count:].clone()
            layer.values[:, :, : self.length - count] = layer.values[:, :, count:].clone()
        self._mask[:, : self.length - count] = self._mask[:, count:].clone()
        self._mask[:, self.length - count :] = 1
        self._starts = [max(0, start - count) for start in self._starts]
        self._set_column(self._column - count)

    def _move_to(self, column: int) -> None:
        """Jump the shared column right; the running rows mask the columns skipped."""
        if column > self._column:
            running = [j for j, row in enumerate(self._slots) if row is not None]
            if running:
                self._mask[running, self._column : column] = 0
            self._set_column(column)

    def _set_column(self, column: int) -> None:
        self._column = column
        for layer in self._cache.layers:
            layer.cumulative_length.fill_(column)

    def _place(self, rows: list[Row], prompts: list[list[int]], cache: Any, mask: torch.Tensor, logits: torch.Tensor) -> None:
        """Copy prefilled rows into free slots, their KV ending just left of the column."""
        import torch

        device = self.runner.device
        width, column = mask.shape[1], self._column
        free = [j for j, row in enumerate(self._slots) if row is None][: len(rows)]
        index = torch.tensor(free, device=device)
        for mine, theirs in zip(self._cache.layers, cache.layers):
            mine.keys[index, :, column - width : column] = theirs.keys
            mine.values[index, :, column - width : column] = theirs.values
        self._mask[index] = 1
        self._mask[index, :column] = 0
        self._mask[index, column - width : column] = mask
        self._next_pos[index, 0] = torch.tensor([len(prompt) for prompt in prompts], device=device)
        self._logits[index] = logits
        firsts = (mask != 0).int().argmax(dim=1).tolist()
        if self._sampler is None:
            filler = SamplingParams(0.0, 1.0, 0)
            # Log probabilities stay on the device between host syncs (`flush` brings them).
            self._sampler = self.runner.sampler([filler] * self.slots)
        ids = self._sampler.extend([row.params for row in rows])
        # Each new row's sampler state moves to its slot; the finished rows' there are dropped.
        order = list(range(self.slots))
        for k, slot in enumerate(free):
            order[slot] = self.slots + k
        self._sampler.select(torch.tensor(order, device=device), order)
        for k, (slot, row) in enumerate(zip(free, rows)):
            self._slots[slot], self._slot_ids[slot] = row, ids[k]
            self._starts[slot] = column - width + firsts[k]

    def _step(self) -> None:
        import torch

        runner = self.runner
        count = min(SYNC_EVERY, self.length - self._column, max(self._remaining(), default=0))
        produced = []
        for _ in range(count):
            tokens = self._sampler.choose(self._logits)
            produced.append(tokens)
            cache_position = torch.tensor([self._column], device=runner.device)
            self._logits = runner.decode_step(tokens[:, None], self._next_pos, cache_position, self._mask, self._cache)
            self._next_pos = self._next_pos + 1
            self._column += 1
        by_slot = torch.stack(produced, dim=1).tolist()
        self._sampler.flush()
        done = [slot for slot, row in enumerate(self._slots) if row is not None and self._advance(row, by_slot[slot])]
        if done:
            self._settle([(self._slots[slot], self._slot_ids[slot]) for slot in done])  # type: ignore[misc]
            for slot in done:
                self._free(slot)

    def _free(self, slot: int) -> None:
        self._slots[slot] = None
        self._mask[slot] = 1
        self._next_pos[slot] = 0

    def _reset(self) -> None:
        self._slots = [None] * self.slots
        self._mask.fill_(1)
        self._next_pos.zero_()
        self._sampler = None
        self._set_column(0)
