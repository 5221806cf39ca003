"""Per-row token choice, so requests with different sampling settings share one batch."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    temperature: float
    top_p: float
    generator: torch.Generator | None


def row_generator(device: torch.device, seed: int | None, choice: int) -> torch.Generator:
    """A generator for one choice of one request: seeded requests get the same stream always."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.manual_seed(secrets.randbits(63))
    else:
        # Distinct, reproducible streams for the n choices of one seeded request.
        generator.manual_seed((seed * 1_000_003 + choice) % (2**63))
    return generator


def choose_tokens(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Pick the next token of every row.

    Args:
        logits: (rows, vocab) float32 logits of the last position.
        params: one entry per row; temperature 0 means greedy.

    Returns:
        (rows,) token ids on the logits' device.
    """
    tokens = torch.argmax(logits, dim=-1)
    sampled = [i for i, p in enumerate(params) if p.temperature > 0]
    if not sampled:
        return tokens
    index = torch.tensor(sampled, device=logits.device)
    temps = torch.tensor([params[i].temperature for i in sampled], device=logits.device)
    top_ps = torch.tensor([params[i].top_p for i in sampled], device=logits.device)
    probs = torch.softmax(logits[index] / temps[:, None], dim=-1)
    if bool((top_ps < 1.0).any()):
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        # Keep a token while the mass before it is under top_p (the first token always stays).
        sorted_probs = sorted_probs.masked_fill(before >= top_ps[:, None], 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    for k, i in enumerate(sampled):
        choice = torch.multinomial(probs[k], 1, generator=params[i].generator)
        tokens[i] = choice[0]
    return tokens
