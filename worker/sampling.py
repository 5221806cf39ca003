"""Per-row token choice, so requests with different sampling settings share one batch.

Every row of a batch is sampled at once, on the device, with no host round trip: each row draws
one uniform number per step from a counter-based hash of (its seed, the step) and picks its
token by inverse CDF. A seeded request therefore gets the same tokens whatever else is in its
batch, and no per-row generator or Python loop runs per token.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

_MASK = 0xFFFFFFFF


@dataclass
class SamplingParams:
    temperature: float
    top_p: float
    #: The row's random stream (31 bits); see `row_seed`.
    seed: int


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


class BatchSampler:
    """The sampling settings of a batch's rows as device tensors, built once per batch.

    Args:
        params: one entry per row; temperature 0 means greedy.
        device: where the logits live.
    """

    def __init__(self, params: list[SamplingParams], device: torch.device) -> None:
        self.greedy_only = all(p.temperature <= 0 for p in params)
        self.use_top_p = any(p.top_p < 1.0 for p in params if p.temperature > 0)
        self.greedy = torch.tensor([p.temperature <= 0 for p in params], device=device)
        self.temperatures = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], device=device)
        self.top_ps = torch.tensor([p.top_p for p in params], device=device)
        self.seeds = torch.tensor([p.seed for p in params], dtype=torch.long, device=device)

    def select(self, index: torch.Tensor) -> None:
        """Keep only these rows (rows that finished leave the batch)."""
        self.greedy = self.greedy[index]
        self.temperatures = self.temperatures[index]
        self.top_ps = self.top_ps[index]
        self.seeds = self.seeds[index]

    def choose(self, logits: torch.Tensor, step: int) -> torch.Tensor:
        """The next token of every row.

        Args:
            logits: (rows, vocab) float32 logits of the last position.
            step: how many tokens the rows have generated so far.

        Returns:
            (rows,) token ids on the logits' device.
        """
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
        bits = _mix((self.seeds * 0x27D4EB2F + step * 0x165667B1) & _MASK)
        uniform = (bits.to(cdf.dtype) + 0.5) * 2.0**-32
        # The first token whose cumulative mass exceeds the draw; tokens of zero mass never are.
        picked = torch.searchsorted(cdf, (uniform[:, None] * cdf[:, -1:]).contiguous(), right=True)
        picked = picked.clamp(max=logits.shape[-1] - 1)
        if order is not None:
            picked = order.gather(-1, picked)
        return torch.where(self.greedy, tokens, picked[:, 0])
