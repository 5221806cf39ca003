"""The sampler stage: every per-row step from a batch's logits to its next tokens, so that
requests with different settings share one batch.

Each step, for the rows that ask for them, in this order:
1. log probabilities, from the model's own log-softmax (before penalties, bias, grammar,
   temperature and top_p, as OpenAI and vLLM report them), kept on the device;
2. presence and frequency penalties, from each row's own generated-token counts (on the device);
3. logit bias;
4. grammar masks: each constrained row's matcher fills its token bitmask (llguidance, in
   parallel and without the GIL), and all masks are applied at once;
5. the token: greedy rows take the argmax; the others draw one uniform number per step from a
   counter-based hash of (their seed, the step) and take their token by inverse CDF, after
   their temperature and top_p. A seeded request therefore gets the same tokens whatever else
   is in its batch, and no per-row generator or Python loop runs per token;
6. the constrained rows' tokens start on their way to the host; their matchers take them at the
   next step, and fill the next masks, while the device runs the next forward pass.

Only constrained rows bring tokens to the host each step, and the host waits for that copy (right
after sampling), not for the next forward pass: rows without a grammar never wait for one. Log
probabilities stay on the device until the batch ends or `flush` brings them over (with
`host_logprobs`, every step: for a decode that checks every token on the host anyway).

Rows can join (`extend`) and leave (`select`, `forget`) a running batch; each row keeps its own
step count, so its random stream does not depend on when it joined.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch

_MASK = 0xFFFFFFFF


@dataclass
class SamplingParams:
    temperature: float
    top_p: float
    #: The row's random stream (31 bits); see `row_seed`.
    seed: int
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    #: Token id -> added to its logit.
    logit_bias: dict[int, float] | None = None
    #: None: no log probabilities; else how many alternatives to keep per token (0 to 20).
    logprobs: int | None = None
    #: The row's grammar matcher (llguidance), when its answer is constrained.
    matcher: Any = None


#: Streams of unseeded rows; seeded once from the OS (no per-row system call).
_unseeded = random.Random()


def row_seed(seed: int | None, choice: int) -> int:
    """The stream of one choice of one request: seeded requests get the same stream always,
    and the n choices of one request get distinct ones."""
    if seed is None:
        return _unseeded.getrandbits(31)
    return (seed * 1_000_003 + choice) % (2**31)


def _mix(h: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finalizer on int64 tensors holding 32-bit values (products wrap; only
    the low 32 bits are kept)."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _MASK
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _MASK
    return h ^ (h >> 16)


@dataclass
class Logprobs:
    """The log probabilities a batch kept for one step: for rows `rows` (batch positions at
    creation), the chosen token's, and the top alternatives (values and ids)."""

    rows: list[int]
    chosen: torch.Tensor
    top_values: torch.Tensor
    top_ids: torch.Tensor


@dataclass
class _Constraint:
    """The constrained rows of a batch: their matchers, the host bitmask they fill, and the
    tokens of the last step on their way to the host."""

    grammars: Any
    #: Batch position (at creation) -> matcher.
    matchers: dict[int, Any]
    device: torch.device
    bitmask: torch.Tensor = field(init=False)
    #: (batch positions, their tokens on the host, the event after which they are there).
    pending: tuple[list[int], torch.Tensor, Any] | None = None

    def __post_init__(self) -> None:
        self.bitmask = self._bitmask(len(self.matchers))

    def _bitmask(self, rows: int) -> torch.Tensor:
        # Pinned on CUDA, so that its copy to the device does not wait for the host.
        pinned = self.device.type == "cuda"
        return torch.full((rows, self.grammars.mask_width), -1, dtype=torch.int32, pin_memory=pinned)

    def grow(self) -> None:
        """Room in the bitmask for every matcher (after rows joined)."""
        if self.bitmask.shape[0] < len(self.matchers):
            self.bitmask = self._bitmask(max(len(self.matchers), 2 * self.bitmask.shape[0]))


class BatchSampler:
    """The sampling settings of a batch's rows as device tensors, built once per batch.

    Args:
        params: one entry per row; temperature 0 means greedy.
        device: where the logits live.
        vocab_size: the width of the logits (needed for penalties and bias).
        grammars: the runner's `worker.decode.grammar.Grammars`, when a row has a matcher.
    """

    def __init__(
        self,
        params: list[SamplingParams],
        device: torch.device,
        *,
        vocab_size: int = 0,
        grammars: Any = None,
        host_logprobs: bool = False,
        first_id: int = 0,
    ) -> None:
        self.device = device
        #: The id of each row still in the batch, in order: its position at creation, plus
        #: `first_id` (rows added by `extend` get ids after the ones before).
        self.ids = list(range(first_id, first_id + len(params)))
        self._next_id = first_id + len(params)
        #: Row id -> its settings, for the rows in the batch.
        self._params = dict(zip(self.ids, params))
        self.greedy_only = all(p.temperature <= 0 for p in params)
        self.use_top_p = any(p.top_p < 1.0 for p in params if p.temperature > 0)
        self.greedy = torch.tensor([p.temperature <= 0 for p in params], device=device)
        self.temperatures = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], device=device)
        self.top_ps = torch.tensor([p.top_p for p in params], device=device)
        self.seeds = torch.tensor([p.seed for p in params], dtype=torch.long, device=device)
        #: Tokens each row has drawn so far: a row's random stream depends on its own count, so
        #: rows that join a running batch draw as they would alone.
        self.row_steps = torch.zeros(len(params), dtype=torch.long, device=device)
        self.vocab_size = vocab_size
        self.grammars = grammars
        #: Bring log probabilities to the host every step (`logprobs_of` then reads what was
        #: kept, and `forget` drops a finished row's), instead of keeping them on the device
        #: until the batch ends: for a batch that never ends (continuous batching).
        self.host_logprobs = host_logprobs
        self._host_found: dict[int, list[tuple[float, list[tuple[int, float]]]]] = {}
        self._penalties(params, vocab_size)
        self.bias = self._bias(params, vocab_size)
        #: Batch position -> how many alternatives it wants, for the rows that want log probabilities.
        self.top_ks = {first_id + i: p.logprobs for i, p in enumerate(params) if p.logprobs is not None}
        self.logprob_rows = list(self.top_ks)
        self.top_k = max(self.top_ks.values(), default=0)
        #: Every step's log probabilities, for `logprobs_of`.
        self.steps: list[Logprobs] = []
        matchers = {first_id + i: p.matcher for i, p in enumerate(params) if p.matcher is not None}
        self.constraint = _Constraint(grammars, matchers, device) if matchers else None
        self._index_rows()

    def _penalties(self, params: list[SamplingParams], vocab_size: int, *, force: bool = False) -> None:
        self.penalized = force or any(p.presence_penalty or p.frequency_penalty for p in params)
        if not self.penalized:
            return
        self.presence = torch.tensor([p.presence_penalty for p in params], device=self.device)[:, None]
        self.frequency = torch.tensor([p.frequency_penalty for p in params], device=self.device)[:, None]
        self.counts = torch.zeros((len(params), vocab_size), dtype=torch.float32, device=self.device)

    def _bias(self, params: list[SamplingParams], vocab_size: int) -> torch.Tensor | None:
        entries = [(i, token, value) for i, p in enumerate(params) for token, value in (p.logit_bias or {}).items()]
        if not entries:
            return None
        rows, tokens, values = zip(*entries)
        bias = torch.zeros((len(params), vocab_size), dtype=torch.float32, device=self.device)
        index = (torch.tensor(rows, device=self.device), torch.tensor(tokens, device=self.device))
        return bias.index_put_(index, torch.tensor(values, dtype=torch.float32, device=self.device))

    def _index_rows(self) -> None:
        """The rows now in the batch that want log probabilities or follow a grammar, as lists
        and as device index tensors (built when rows change, never per step)."""
        self._logprob_ids = [row for row in self.ids if row in self.top_ks]
        self._logprob_index = self._positions(self._logprob_ids)
        matchers = self.constraint.matchers if self.constraint is not None else {}
        self._constrained_ids = [row for row in self.ids if row in matchers]
        self._constrained_index = self._positions(self._constrained_ids)

    def _positions(self, rows: list[int]) -> torch.Tensor | None:
        if not rows:
            return None
        where = {row: j for j, row in enumerate(self.ids)}
        return torch.tensor([where[row] for row in rows], device=self.device)

    def select(self, index: torch.Tensor, kept: list[int]) -> None:
        """Keep only these rows (rows that finished leave the batch): `index` on the device and
        `kept` on the host, the same positions."""
        self.ids = [self.ids[i] for i in kept]
        self.greedy = self.greedy[index]
        self.temperatures = self.temperatures[index]
        self.top_ps = self.top_ps[index]
        self.seeds = self.seeds[index]
        self.row_steps = self.row_steps[index]
        if self.penalized:
            self.presence, self.frequency, self.counts = self.presence[index], self.frequency[index], self.counts[index]
        if self.bias is not None:
            self.bias = self.bias[index]
        self._params = {row: self._params[row] for row in self.ids}
        self._refresh()
        self._index_rows()

    def _refresh(self) -> None:
        """Turn off the work no row left in the batch needs (a batch that never ends would
        otherwise sample, penalize and bias every row for ever after one row asked once)."""
        params = self._params.values()
        self.greedy_only = all(p.temperature <= 0 for p in params)
        self.use_top_p = any(p.top_p < 1.0 for p in params if p.temperature > 0)
        if self.penalized and not any(p.presence_penalty or p.frequency_penalty for p in params):
            self.penalized = False
            del self.presence, self.frequency, self.counts
        if self.bias is not None and not any(p.logit_bias for p in params):
            self.bias = None

    def extend(self, params: list[SamplingParams]) -> list[int]:
        """Add rows at the end of the batch (rows admitted into a running decode); returns
        their ids."""
        first = self._next_id
        other = BatchSampler(
            params, self.device, vocab_size=self.vocab_size, grammars=self.grammars, host_logprobs=self.host_logprobs, first_id=first
        )
        mine = len(self.ids)
        self.ids += other.ids
        self._next_id = other._next_id
        self._params.update(other._params)
        self.greedy_only = self.greedy_only and other.greedy_only
        self.use_top_p = self.use_top_p or other.use_top_p
        for name in ("greedy", "temperatures", "top_ps", "seeds", "row_steps"):
            setattr(self, name, torch.cat([getattr(self, name), getattr(other, name)]))
        if self.penalized or other.penalized:
            if not self.penalized:
                self._penalties([SamplingParams(0.0, 1.0, 0)] * mine, self.vocab_size, force=True)
            if not other.penalized:
                other._penalties([SamplingParams(0.0, 1.0, 0)] * len(params), self.vocab_size, force=True)
            self.presence = torch.cat([self.presence, other.presence])
            self.frequency = torch.cat([self.frequency, other.frequency])
            self.counts = torch.cat([self.counts, other.counts])
        if self.bias is not None or other.bias is not None:
            self.bias = torch.cat([
                self.bias if self.bias is not None else torch.zeros((mine, self.vocab_size), device=self.device),
                other.bias if other.bias is not None else torch.zeros((len(params), self.vocab_size), device=self.device),
            ])
        self.top_ks.update(other.top_ks)
        self.logprob_rows = list(self.top_ks)
        self.top_k = max(self.top_ks.values(), default=0)
        if other.constraint is not None:
            if self.constraint is None:
                self.constraint = other.constraint
            else:
                self.constraint.matchers.update(other.constraint.matchers)
                self.constraint.grow()
        self._index_rows()
        return other.ids

    def vacate(self, positions: list[int]) -> None:
        """Make the rows at these batch positions plain greedy rows (their places stay in the
        batch, unread, until a new row takes them), and turn off what no other row needs."""
        index = torch.tensor(positions, device=self.device)
        for position in positions:
            self._params[self.ids[position]] = SamplingParams(0.0, 1.0, 0)
        self.greedy[index] = True
        self.temperatures[index] = 1.0
        self.top_ps[index] = 1.0
        if self.penalized:
            self.presence[index] = 0.0
            self.frequency[index] = 0.0
        if self.bias is not None:
            self.bias[index] = 0.0
        self._refresh()

    def forget(self, rows: list[int]) -> None:
        """Drop what was kept for rows that left the batch for good (their matchers, their log
        probabilities): a batch that never ends must not keep its finished rows' state."""
        for row in rows:
            self.top_ks.pop(row, None)
            self._host_found.pop(row, None)
            if self.constraint is not None:
                self.constraint.matchers.pop(row, None)
        self.logprob_rows = list(self.top_ks)
        self.top_k = max(self.top_ks.values(), default=0)
        self._index_rows()

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token of every row (see the module's steps).

        Args:
            logits: (rows, vocab) float32 logits of the last position; changed in place.

        Returns:
            (rows,) token ids on the logits' device.
        """
        if self.constraint is not None:
            self._consume(self.constraint)
        logprobs = torch.log_softmax(logits.index_select(0, self._logprob_index), dim=-1) if self._logprob_index is not None else None
        if self.penalized:
            logits -= self.presence * (self.counts > 0) + self.frequency * self.counts
        if self.bias is not None:
            logits += self.bias
        if self.constraint is not None and self._constrained_index is not None:
            self._mask(self.constraint, self._constrained_index, logits)
        tokens = self._sample(logits)
        self.row_steps += 1
        if self.penalized:
            self.counts.scatter_add_(1, tokens[:, None], torch.ones_like(tokens[:, None], dtype=self.counts.dtype))
        if logprobs is not None and self._logprob_index is not None:
            chosen = logprobs.gather(1, tokens.index_select(0, self._logprob_index)[:, None])[:, 0]
            top_values, top_ids = logprobs.topk(self.top_k, dim=-1) if self.top_k else (logprobs[:, :0], logprobs[:, :0].long())
            self.steps.append(Logprobs(self._logprob_ids, chosen, top_values, top_ids))
            if self.host_logprobs:
                self._host_found = self._found(self._host_found)
                self.steps = []
        if self.constraint is not None and self._constrained_index is not None:
            self._send_to_host(self.constraint, self._constrained_index, tokens)
        return tokens

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        tokens = torch.argmax(logits, dim=-1)
        if self.greedy_only:
            return tokens
        probs = torch.softmax(logits / self.temperatures[:, None], dim=-1)
        order = None
        if self.use_top_p:
            probs, order = torch.sort(probs, dim=-1, descending=True)
            before = torch.cumsum(probs, dim=-1) - probs
            # Keep a token while the mass before it is under top_p (the first token always stays).
            probs = probs.masked_fill(before >= self.top_ps[:, None], 0.0)
        cdf = torch.cumsum(probs, dim=-1)
        bits = _mix((self.seeds * 0x27D4EB2F + self.row_steps * 0x165667B1) & _MASK)
        uniform = (bits.to(cdf.dtype) + 0.5) * 2.0**-32
        # The first token whose cumulative mass exceeds the draw; tokens of zero mass never are.
        picked = torch.searchsorted(cdf, (uniform[:, None] * cdf[:, -1:]).contiguous(), right=True)
        picked = picked.clamp(max=logits.shape[-1] - 1)
        if order is not None:
            picked = order.gather(-1, picked)
        return torch.where(self.greedy, tokens, picked[:, 0])

    def flush(self) -> None:
        """Bring the kept log probabilities to the host now (one transfer for all steps since
        the last flush), so that `forget` can drop a row's."""
        self._host_found = self._found(self._host_found)
        self.steps = []

    def logprobs_of(self) -> dict[int, list[tuple[float, list[tuple[int, float]]]]]:
        """Row id -> (chosen token's log probability, [(alternative id, its log
        probability)]) per step, most likely alternatives first; brought to the host at once."""
        return self._found(dict(self._host_found))

    def _found(
        self, found: dict[int, list[tuple[float, list[tuple[int, float]]]]]
    ) -> dict[int, list[tuple[float, list[tuple[int, float]]]]]:
        """`found` with the kept steps' log probabilities added."""
        if not self.steps:
            return found
        chosen = torch.cat([step.chosen for step in self.steps]).tolist()
        values = torch.cat([step.top_values for step in self.steps]).tolist()
        ids = torch.cat([step.top_ids for step in self.steps]).tolist()
        at = 0
        for step in self.steps:
            for row in step.rows:
                found.setdefault(row, []).append((chosen[at], list(zip(ids[at], values[at]))[: self.top_ks[row]]))
                at += 1
        return found

    # Grammars.

    def _mask(self, constraint: _Constraint, index: torch.Tensor, logits: torch.Tensor) -> None:
        from worker.decode.grammar import apply_bitmask

        rows = len(self._constrained_ids)
        constraint.grammars.fill([(constraint.matchers[row], k) for k, row in enumerate(self._constrained_ids)], constraint.bitmask)
        masks = constraint.bitmask[:rows].to(logits.device, non_blocking=True)
        chosen = logits.index_select(0, index)
        apply_bitmask(chosen, masks)
        logits.index_copy_(0, index, chosen)

    def _send_to_host(self, constraint: _Constraint, index: torch.Tensor, tokens: torch.Tensor) -> None:
        """Start copying the constrained rows' tokens to the host (the only transfer per step,
        of those rows' tokens only); the matchers take them at the next step, once the copy is
        done, while the device runs the next forward pass."""
        picked = tokens.index_select(0, index)
        if picked.device.type == "cuda":
            host = torch.empty(picked.shape, dtype=picked.dtype, pin_memory=True)
            host.copy_(picked, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            constraint.pending = (self._constrained_ids, host, done)
        else:
            constraint.pending = (self._constrained_ids, picked, None)

    def _consume(self, constraint: _Constraint) -> None:
        """Tell each constrained row's matcher the token it took at the last step."""
        if constraint.pending is None:
            return
        rows, host, done = constraint.pending
        constraint.pending = None
        if done is not None:
            done.synchronize()  # the copy, right after the last sampling: not the forward pass since
        for row, token in zip(rows, host.tolist()):
            matcher = constraint.matchers.get(row)
            if matcher is not None and not matcher.is_stopped():
                matcher.consume_token(token)

    def grammar_error(self, row: int) -> str | None:
        """The error of a row's matcher, when it failed."""
        matcher = self.constraint.matchers.get(row) if self.constraint is not None else None
        return matcher.get_error() if matcher is not None and matcher.is_error() else None

    def failed_grammars(self) -> dict[int, str]:
        """Batch position -> the error of each constrained row whose matcher failed (it then
        allowed only EOS: the row's answer is not to be trusted)."""
        if self.constraint is None:
            return {}
        return {row: matcher.get_error() for row, matcher in self.constraint.matchers.items() if matcher.is_error()}
