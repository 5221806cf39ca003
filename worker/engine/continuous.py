"""Continuous batching: one decode that rows join and leave at every step (the `dynamic`
decode mode; the slot layout of the other modes is worker/engine/slots.py).

The batch's KV lives in one DynamicCache, one row per sequence, left-padded to a common width,
with an attention mask and explicit positions per row, so a row's answer does not depend on
what else is in the batch. Between two steps:
- rows that finished leave their place vacant (it decodes on, unread, greedy and at position
  0, until a row takes it),
  and leading columns every running row masks are cut off;
- waiting requests join: their prompts are prefilled together in a cache of their own (the
  blocks of their prompts found in the prefix cache are put in place first, and only the rest
  is computed), whose rows are written into vacant places, left-padded to the batch's width
  (the batch's columns are widened first when a prompt is wider), or appended when no place is
  vacant;
- when a quarter of the places stay vacant after the requests that could join have joined, the
  batch is compacted.

Changing the batch in place keeps its cost to the joining rows: appending rows or dropping
finished ones copies the whole cache, which for short answers joining every few steps costs
more than the steps themselves.

A request is answered as soon as its last row finishes; nothing waits for the batch to end.

A request breaks alone: its prefill failing as it joins leaves the batch as it was
(`JoinRefused`: the engine tries the joining requests one at a time), and a row whose own
per-token work fails (its stop strings, its stream, its text) finishes at once with
internal_error while the other rows decode on.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from schemas.chat import ChatCompletion, PromptTokensDetails
from schemas.errors import ErrorCode, RequestError
from worker.engine.interface import StepModel
from worker.engine.kvcache import left_padded, pad_left
from worker.engine.pending import JoinRefused, Pending
from worker.engine.prefix_cache import BLOCK, PrefixCache, block_keys, reusable_blocks
from worker.engine.rows import Row

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


@dataclass
class _Admitted:
    """A request in the running batch."""

    item: Pending
    rows: list[Row]
    #: Rows not finished yet.
    left: int
    #: Prompt tokens whose KV came from the prefix cache.
    cached: int = 0
    started: float = field(default_factory=time.monotonic)


def prefix_keys(item: Pending) -> list[bytes]:
    """The block keys of a prepared request's prompt that the prefix cache may serve (hashed
    once per request)."""
    prepared = item.prepared
    if prepared.prefix_keys is None:
        prepared.prefix_keys = block_keys(prepared.prompt_ids, reusable_blocks(len(prepared.prompt_ids)))
    return prepared.prefix_keys


class ContinuousDecode:
    """The running batch of the `dynamic` decode mode (a ContinuousBatch). Only the engine
    thread uses it.

    Args:
        runner: the runner whose forward passes, rows, sampler and answers this decode uses.
        prefix_cache: where prompt blocks are found and kept.
        max_tokens: most KV tokens the batch may hold, padding included.
    """

    def __init__(self, runner: StepModel, prefix_cache: PrefixCache, *, max_tokens: int) -> None:
        self.runner = runner
        self.prefix_cache = prefix_cache
        self.max_tokens = max_tokens
        #: Answers of the step running now, kept here until it returns them: if the step fails
        #: after they were settled, `abandon` still gives them out.
        self._settled: list[tuple[Pending, ChatCompletion | RequestError]] = []
        self._keys = itertools.count()
        self._requests: dict[int, _Admitted] = {}
        #: The rows in the batch, in cache order (None where a place is vacant), and their ids
        #: in the sampler.
        self.rows: list[Row | None] = []
        self._ids: list[int] = []
        # Set while rows are in the batch (torch tensors; Any, as they are None between runs).
        self._cache: Any = None
        self._mask: Any = None
        self._next_pos: Any = None
        #: Each row's logits for its next token.
        self._logits: Any = None
        self._sampler: Any = None
        #: Prompt tokens computed and taken from the prefix cache, since the start.
        self.prompt_tokens = 0
        self.cached_tokens = 0
        #: Rows that joined into a vacant place, and times the vacant places were dropped.
        self.joined_in_place = 0
        self.compactions = 0

    @property
    def requests(self) -> list[Pending]:
        return [entry.item for entry in self._requests.values()]

    @property
    def request_count(self) -> int:
        """Requests in the batch (a length: safe to read from another thread)."""
        return len(self._requests)

    def __len__(self) -> int:
        """Rows running in the batch."""
        return sum(row is not None for row in self.rows)

    def _running(self) -> list[Row]:
        return [row for row in self.rows if row is not None]

    def cached_prefix(self, item: Pending) -> int:
        """Prompt tokens of a prepared request the prefix cache holds now (a read)."""
        if not self.prefix_cache.enabled:
            return 0
        return self.prefix_cache.matched(prefix_keys(item)) * BLOCK

    def first_block(self, item: Pending) -> bytes | None:
        """The key of a prompt's first reusable block, if it has one."""
        if not self.prefix_cache.enabled:
            return None
        keys = prefix_keys(item)
        return keys[0] if keys else None

    # Joining.

    #: Most rows this batch can hold, when it has a fixed number of slots.
    capacity: int | None = None
    #: Most steps waiting requests wait for an eighth of the rows to be free before they join
    #: (each join is a prefill forward pass of its own, costing about one decode step however
    #: few rows it brings; worker/engine/admission.py `_holds`).
    hold_steps = 8

    def fits_ever(self, item: Pending) -> bool:
        """Whether a request can join this batch at all (else it runs per request)."""
        return True

    def fits(self, items: list[Pending]) -> bool:
        """Whether these requests can join the batch together now: the cache, padded to its
        widest row and grown by every row's max_tokens, stays within `max_tokens`."""
        running = self._running()
        rows = max(len(self.rows), len(running) + sum(item.request.n for item in items))
        longest = max(item.prepared.max_new for item in items)
        if not running:  # an empty batch takes any one request
            return len(items) == 1 or rows * (self.prefill_width(items) + longest) <= self.max_tokens
        remaining = max(row.prepared.max_new - row.generated for row in running)
        width = max(self._mask.shape[1] + remaining, self.prefill_width(items) + longest)
        return rows * width <= self.max_tokens

    def prefill_width(self, items: list[Pending]) -> int:
        """How wide these requests' prefill is: the longest cached prefix, then the longest
        rest of a prompt (see `_prefill`)."""
        cached = [self.cached_prefix(item) for item in items]
        return max(cached) + max(len(item.prepared.prompt_ids) - c for item, c in zip(items, cached))

    def admit(self, items: list[Pending]) -> None:
        """Prefill these requests and add their rows to the batch.

        Raises:
            JoinRefused: their rows or their prefill failed; the batch is as it was.
        """
        import torch

        with torch.inference_mode():
            self._admit(items)

    def _prefilled(self, items: list[Pending]) -> tuple[list[Row], list[list[int]], Any, torch.Tensor, torch.Tensor]:
        """Take requests in and compute their prompts' KV, changing nothing of the running
        batch: their rows, each row's prompt, and the prefill's cache, mask and logits.

        Raises:
            JoinRefused: any failure (the requests are let go again).
        """
        requests, counts = set(self._requests), (self.prompt_tokens, self.cached_tokens)
        try:
            rows, prompts, prefixes = self._register(items)
            cache, mask, logits, starts = self._prefill(prompts, prefixes)
            self._keep_blocks(cache, prompts, prefixes, starts)
        except Exception as error:
            for key in set(self._requests) - requests:
                del self._requests[key]
            self.prompt_tokens, self.cached_tokens = counts
            raise JoinRefused(f"{type(error).__name__}: {error}") from error
        return rows, prompts, cache, mask, logits

    def step(self) -> list[tuple[Pending, ChatCompletion | RequestError]]:
        """Choose every row's next token (in the slot layout: for up to SYNC_EVERY steps), let
        finished rows go, and run the model for the rest; returns the requests whose last row
        finished, with their answers."""
        import torch

        with torch.inference_mode():
            self._step()
        answers, self._settled = self._settled, []
        return answers

    def _admit(self, items: list[Pending]) -> None:
        self._place(*self._prefilled(items))

    def _register(self, items: list[Pending]) -> tuple[list[Row], list[list[int]], list[list[list[tuple[Any, Any]]]]]:
        """Take requests in: their rows, each row's prompt, and the cached blocks each starts with."""
        new_rows: list[Row] = []
        prompts: list[list[int]] = []
        prefixes: list[list[list[tuple[Any, Any]]]] = []
        for item in items:
            key = next(self._keys)
            prompt = item.prepared.prompt_ids
            blocks = self.prefix_cache.take(prefix_keys(item), len(prompt)) if self.prefix_cache.enabled else []
            rows = [self.runner.row(key, choice, item) for choice in range(item.request.n)]
            self._requests[key] = _Admitted(item, rows, left=len(rows), cached=len(blocks) * BLOCK)
            self.prompt_tokens += len(prompt)
            self.cached_tokens += len(blocks) * BLOCK
            new_rows += rows
            prompts += [prompt] * len(rows)
            prefixes += [blocks] * len(rows)
        return new_rows, prompts, prefixes

    def _place(self, rows: list[Row], prompts: list[list[int]], cache: Any, mask: torch.Tensor, logits: torch.Tensor) -> None:
        """Put prefilled rows in the batch: into vacant places first, then at the end."""
        import torch

        positions = torch.tensor([len(prompt) for prompt in prompts], device=self.runner.device)
        params = [row.params for row in rows]
        if self._sampler is None or not self.rows:
            self._sampler = self.runner.sampler(params, host_logprobs=True)
            self._cache, self._mask, self._next_pos, self._logits = cache, mask, positions, logits
            self.rows, self._ids = list(rows), list(self._sampler.ids)
            return
        vacant = [j for j, row in enumerate(self.rows) if row is None][: len(rows)]
        ids = self._sampler.extend(params)
        # Each new row's sampler state moves to its place (the vacant row's there is dropped).
        order = list(range(len(self.rows)))
        for k, place in enumerate(vacant):
            order[place] = len(self.rows) + k
        order += [len(self.rows) + k for k in range(len(vacant), len(rows))]
        self._sampler.select(torch.tensor(order, device=self.runner.device), order)
        self._join(vacant, cache, mask, positions, logits)
        for k, place in enumerate(vacant):
            self.rows[place], self._ids[place] = rows[k], ids[k]
        self.rows += rows[len(vacant) :]
        self._ids += ids[len(vacant) :]

    def _prefill(
        self, prompts: list[list[int]], prefixes: list[list[list[tuple[Any, Any]]]]
    ) -> tuple[Any, torch.Tensor, torch.Tensor, list[int]]:
        """Compute the new rows' KV: each row is [padding][its cached prefix][padding][the rest
        of its prompt], the gaps masked. Returns the cache, the mask, the last position's
        logits, and the column where each row's computed part starts."""
        import torch

        runner = self.runner
        device = runner.device
        cached = [len(blocks) * BLOCK for blocks in prefixes]
        width_p = max(cached)
        rest = [prompt[c:] for prompt, c in zip(prompts, cached)]
        width_s = max(len(r) for r in rest)
        input_ids, suffix_mask = left_padded(rest, len(rest), width_s, runner.pad_id)
        prefix_mask = torch.zeros((len(rest), width_p), dtype=torch.long)
        for i, c in enumerate(cached):
            if c:
                prefix_mask[i, width_p - c :] = 1
        mask = torch.cat([prefix_mask, suffix_mask], dim=1).to(device)
        input_ids, suffix_mask = input_ids.to(device), suffix_mask.to(device)
        positions = (suffix_mask.cumsum(-1) - 1).clamp(min=0) + torch.tensor(cached, device=device)[:, None]
        cache = runner.new_cache()
        if width_p:
            self._put_prefixes(cache, prefixes, width_p)
        logits = runner.last_logits(input_ids, mask, positions, cache, logits_to_keep=1)
        starts = [width_p + width_s - len(r) for r in rest]
        return cache, mask, logits, starts

    def _put_prefixes(self, cache: Any, prefixes: list[list[list[tuple[Any, Any]]]], width: int) -> None:
        """Fill the first `width` columns of a new cache with each row's cached blocks,
        right-aligned (zeros, masked, before them)."""
        import torch

        first = next(blocks for blocks in prefixes if blocks)[0]
        for layer, (k0, v0) in enumerate(first):
            keys = k0.new_zeros((len(prefixes), k0.shape[0], width, k0.shape[2]))
            values = v0.new_zeros((len(prefixes), v0.shape[0], width, v0.shape[2]))
            for i, blocks in enumerate(prefixes):
                if blocks:
                    length = len(blocks) * BLOCK
                    keys[i, :, width - length :] = torch.cat([block[layer][0] for block in blocks], dim=1)
                    values[i, :, width - length :] = torch.cat([block[layer][1] for block in blocks], dim=1)
            cache.update(keys, values, layer)

    def _keep_blocks(self, cache: Any, prompts: list[list[int]], prefixes: list[list[Any]], starts: list[int]) -> None:
        """Copy the whole blocks just computed into the prefix cache (once per distinct
        block), the last blocks of every prompt first and the first ones last, so that a
        shared first block outlives the blocks that follow it (see worker/engine/prefix_cache.py)."""
        if not self.prefix_cache.enabled:
            return
        layers = cache.layers
        keys = [block_keys(prompt) for prompt in prompts]
        seen: set[bytes] = set()
        for j in reversed(range(max(len(mine) for mine in keys))):
            for i, mine in enumerate(keys):
                if j >= len(mine) or mine[j] in seen:
                    continue
                seen.add(mine[j])
                done = len(prefixes[i])
                if j < done or mine[j] in self.prefix_cache:
                    self.prefix_cache.touch(mine[j])
                    continue
                # Prompt token t (t >= the cached prefix) sits at column starts[i] + t - cached.
                column = starts[i] + (j - done) * BLOCK
                self.prefix_cache.put(
                    mine[j],
                    [(layer.keys[i, :, column : column + BLOCK].clone(), layer.values[i, :, column : column + BLOCK].clone()) for layer in layers],
                )

    def _join(self, places: list[int], cache: Any, mask: torch.Tensor, positions: torch.Tensor, logits: torch.Tensor) -> None:
        """Write prefilled rows' KV, mask, positions and logits into these vacant places and
        append the rest; the batch is widened on the left first when they are wider."""
        import torch

        widen = mask.shape[1] - self._mask.shape[1]
        if widen > 0:
            for layer in self._cache.layers:
                layer.widen(widen)  # every layer is a GrowingLayer (the runner's `new_cache`)
            self._mask = pad_left(self._mask, widen, dim=1)
        pad = self._mask.shape[1] - mask.shape[1]
        mask = pad_left(mask, pad, dim=1)
        placed = len(places)
        self.joined_in_place += placed
        index = torch.tensor(places, device=self.runner.device, dtype=torch.long)
        for mine, theirs in zip(self._cache.layers, cache.layers):
            keys, values = pad_left(theirs.keys, pad), pad_left(theirs.values, pad)
            if placed:
                mine.keys[index] = keys[:placed]
                mine.values[index] = values[:placed]
            if placed < len(mask):
                _replace(mine, torch.cat([mine.keys, keys[placed:]]), torch.cat([mine.values, values[placed:]]))
        self._mask[index] = mask[:placed]
        self._next_pos[index] = positions[:placed]
        self._logits[index] = logits[:placed]
        if placed < len(mask):
            self._mask = torch.cat([self._mask, mask[placed:]])
            self._next_pos = torch.cat([self._next_pos, positions[placed:]])
            self._logits = torch.cat([self._logits, logits[placed:]])

    # Stepping.

    def _step(self) -> None:
        import torch

        runner = self.runner
        self._compact()
        tokens = self._sampler.choose(self._logits)
        finished: list[int] = []
        for j, token in enumerate(tokens.tolist()):
            row = self.rows[j]
            if row is not None and self._advance(row, (token,)):
                finished.append(j)
        if finished:
            self._settle([(self.rows[j], self._ids[j]) for j in finished])  # type: ignore[misc]
            for j in finished:
                self.rows[j] = None
            if not len(self):
                self._reset()
                return
            self._sampler.vacate(finished)
            self._trim()
        vacant = [j for j, row in enumerate(self.rows) if row is None]
        if vacant:
            # A vacant place decodes on, unread, at position 0 (never past the model's positions).
            self._next_pos[torch.tensor(vacant, device=runner.device)] = 0
        self._mask = torch.cat([self._mask, self._mask.new_ones((self._mask.shape[0], 1))], dim=1)
        runner.decode_steps += 1
        self._logits = runner.last_logits(tokens[:, None], self._mask, self._next_pos[:, None], self._cache)
        self._next_pos = self._next_pos + 1

    def _advance(self, row: Row, tokens: tuple[int, ...] | list[int]) -> bool:
        """Give a row its new tokens (`runner.advance`, up to the one that finishes it); True
        once it is finished. A row whose own work fails (its stop strings, its stream) is
        finished with that failure, and the batch goes on without it."""
        try:
            for token in tokens:
                if self.runner.advance(row, token):
                    return True
            return False
        except Exception as error:
            logger.exception("a row of request %s failed; its neighbours go on", self._requests[row.item].item.request_id)
            row.failure = f"{type(error).__name__}: {error}"
            return True

    def _compact(self) -> None:
        """Drop the vacant places when a quarter of the batch or more is vacant (no waiting
        request took them): each costs a row of every step, dropping them copies the cache once."""
        import torch

        keep = [j for j, row in enumerate(self.rows) if row is not None]
        vacant = len(self.rows) - len(keep)
        if not vacant or 4 * vacant < len(self.rows):
            return
        self.compactions += 1
        index = torch.tensor(keep, device=self.runner.device)
        self._cache.batch_select_indices(index)
        self._sampler.select(index, keep)
        self._mask, self._next_pos, self._logits = self._mask[index], self._next_pos[index], self._logits[index]
        self.rows = [self.rows[j] for j in keep]
        self._ids = [self._ids[j] for j in keep]

    def _trim(self) -> None:
        """Cut the leading columns every running row masks (left by rows that went)."""
        import torch

        running = torch.tensor([row is not None for row in self.rows], device=self._mask.device)
        used = self._mask[running].any(dim=0)
        first = int(used.int().argmax())
        if first:
            self._mask = self._mask[:, first:]
            for layer in self._cache.layers:
                layer.drop_leading(first)

    def _settle(self, finished: list[tuple[Row, int]]) -> None:
        """Give finished rows (with their sampler ids) their text, log probabilities and
        grammar state; answer each request whose rows have all finished (into `_settled`)."""
        sampler = self._sampler
        found = sampler.logprobs_of() if sampler.logprob_rows else {}
        created = int(time.time())
        for row, row_id in finished:
            if row.text is None and row.failure is None:
                try:
                    row.text = self.runner.text_of(row)
                except Exception as error:  # this row's text; its neighbours' stand
                    logger.exception("the text of a row of request %s could not be made", self._requests[row.item].item.request_id)
                    row.failure = f"{type(error).__name__}: {error}"
            if row.params.logprobs is not None:
                row.logprobs = found.get(row_id, [])
            row.grammar_error = sampler.grammar_error(row_id)
            entry = self._requests[row.item]
            entry.left -= 1
            if entry.left == 0:
                del self._requests[row.item]
                self._settled.append((entry.item, self._answer(entry, created)))
        sampler.forget([row_id for _, row_id in finished])

    def _answer(self, entry: _Admitted, created: int) -> ChatCompletion | RequestError:
        try:
            completion = self.runner.completion(entry.item, entry.rows, created)
        except RequestError as error:
            return error
        except Exception as error:  # this request's answer cannot be built; the batch goes on
            logger.exception("building the answer of %s failed", entry.item.request_id)
            return RequestError(ErrorCode.internal_error, f"the answer could not be built: {error}")
        completion.usage.prompt_tokens_details = PromptTokensDetails.model_construct(cached_tokens=entry.cached)
        return completion

    def _reset(self) -> None:
        self.rows, self._ids = [], []
        self._cache = self._mask = self._next_pos = self._logits = self._sampler = None

    def abandon(self, failure: RequestError) -> list[tuple[Pending, ChatCompletion | RequestError]]:
        """Drop the whole batch (after a failure of the model, or when the engine stops): the
        answers settled before the failure, and `failure` for every other request it held."""
        import torch

        answers = [*self._settled, *((item, failure) for item in self.requests)]
        self._settled = []
        self._requests.clear()
        with torch.inference_mode():
            self._reset()
        return answers


def _replace(layer: Any, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Give a cache layer new keys and values (a growing layer lets go of its buffers now)."""
    replace = getattr(layer, "replace", None)
    if replace is not None:
        replace(keys, values)
    else:
        layer.keys, layer.values = keys, values
