"""Batched per-row sampling: right distribution, top_p cut, and seeds independent of the batch."""

from __future__ import annotations

import torch

from worker.sampling import BatchSampler, SamplingParams, row_seed

PROBS = torch.tensor([0.5, 0.3, 0.2, 0.0])
CPU = torch.device("cpu")


def _draw(params: list[SamplingParams], step: int = 3) -> torch.Tensor:
    logits = torch.log(PROBS).repeat(len(params), 1)
    return BatchSampler(params, CPU).choose(logits, step)


def test_draws_follow_the_distribution_and_never_pick_zero_mass() -> None:
    tokens = _draw([SamplingParams(1.0, 1.0, seed) for seed in range(8000)])
    freq = torch.bincount(tokens, minlength=4) / len(tokens)
    assert torch.allclose(freq, PROBS, atol=0.03), freq
    assert freq[3] == 0


def test_top_p_keeps_the_smallest_head_over_p() -> None:
    tokens = _draw([SamplingParams(1.0, 0.6, seed) for seed in range(8000)])
    freq = torch.bincount(tokens, minlength=4) / len(tokens)
    # 0.5 and 0.3 stay (the mass before 0.3 is under 0.6), renormalized; 0.2 is cut.
    assert torch.allclose(freq, torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.03), freq


def test_greedy_rows_and_seeded_rows_do_not_depend_on_their_neighbours() -> None:
    seeded = SamplingParams(1.0, 1.0, row_seed(42, 0))
    alone = [_draw([seeded], step)[0].item() for step in range(20)]
    for neighbours in ([SamplingParams(0.0, 1.0, 0)], [SamplingParams(1.5, 0.5, 7)] * 5):
        mixed = [_draw([*neighbours, seeded], step)[-1].item() for step in range(20)]
        assert mixed == alone
    assert len(set(alone)) > 1, "a seeded row draws anew at each step"
    assert _draw([SamplingParams(0.0, 1.0, 5)] * 3).tolist() == [0, 0, 0]
    assert row_seed(42, 0) != row_seed(42, 1), "the n choices of one request differ"
