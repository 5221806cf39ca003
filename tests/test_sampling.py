"""Batched per-row sampling: right distribution, top_p cut, and seeds independent of the batch."""

from __future__ import annotations

import torch

from worker.decode.sampling import BatchSampler, SamplingParams, row_seed

PROBS = torch.tensor([0.5, 0.3, 0.2, 0.0])
CPU = torch.device("cpu")


def _draw(params: list[SamplingParams], step: int = 3) -> torch.Tensor:
    logits = torch.log(PROBS).repeat(len(params), 1)
    sampler = BatchSampler(params, CPU)
    sampler.row_steps += step  # as if each row had drawn `step` tokens already
    return sampler.choose(logits)


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


def test_penalties_lower_the_odds_of_what_a_row_generated() -> None:
    """presence: minus p once a token appeared; frequency: minus f per time it appeared."""
    flat = torch.zeros((1, 4))
    sampler = BatchSampler([SamplingParams(0.0, 1.0, 0, presence_penalty=0.5, frequency_penalty=0.25)], CPU, vocab_size=4)
    first = flat.clone()
    first[0, 2] = 1.0
    assert sampler.choose(first).tolist() == [2]
    again = flat.clone()
    again[0, 2] = 1.0
    sampler.choose(again)  # token 2 once more: its count is 2 now
    assert torch.allclose(again, torch.tensor([[0.0, 0.0, 1.0 - 0.5 - 0.25, 0.0]]))
    third = flat.clone()
    third[0, 2] = 1.0
    sampler.choose(third)
    assert torch.allclose(third, torch.tensor([[0.0, 0.0, 1.0 - 0.5 - 2 * 0.25, 0.0]]))
    plain = BatchSampler([SamplingParams(0.0, 1.0, 0), SamplingParams(0.0, 1.0, 0, presence_penalty=2.0)], CPU, vocab_size=4)
    both = torch.tensor([[0.0, 0.0, 1.0, 0.0]] * 2)
    plain.choose(both)
    both = torch.tensor([[0.0, 0.0, 1.0, 0.9]] * 2)
    assert plain.choose(both).tolist() == [2, 3], "only the penalized row turns away from token 2"


def test_logit_bias_bans_and_forces_per_row() -> None:
    params = [SamplingParams(1.0, 1.0, seed, logit_bias={0: -100.0}) for seed in range(200)]
    params += [SamplingParams(1.0, 1.0, seed, logit_bias={3: 100.0}) for seed in range(200)]
    tokens = BatchSampler(params, CPU, vocab_size=4).choose(torch.log(torch.tensor([0.97, 0.01, 0.01, 0.01])).repeat(400, 1))
    assert 0 not in tokens[:200].tolist(), "a banned token never comes"
    assert set(tokens[200:].tolist()) == {3}, "a forced token always does"


def test_logprobs_come_from_the_models_own_distribution() -> None:
    """Before temperature, penalties and bias; the chosen token's, and the top alternatives
    sorted, for the rows that ask."""
    logits = torch.log(PROBS + 1e-9).repeat(3, 1)
    params = [
        SamplingParams(1.7, 1.0, 3, logprobs=2, logit_bias={3: 100.0}),
        SamplingParams(0.0, 1.0, 0),
        SamplingParams(0.0, 1.0, 0, logprobs=0),
    ]
    sampler = BatchSampler(params, CPU, vocab_size=4)
    tokens = sampler.choose(logits.clone()).tolist()
    found = sampler.logprobs_of()
    assert set(found) == {0, 2}
    chosen, top = found[0][0]
    assert tokens[0] == 3 and chosen < -15, "the forced token's own log probability is reported, not the biased one"
    assert [token for token, _ in top] == [0, 1]
    assert [round(value, 4) for _, value in top] == [round(float(torch.log(PROBS[0])), 4), round(float(torch.log(PROBS[1])), 4)]
    assert found[2] == [(found[2][0][0], [])] and abs(found[2][0][0] - float(torch.log(PROBS[0]))) < 1e-4


def test_rows_that_join_a_running_batch_draw_as_they_would_alone() -> None:
    """Continuous batching adds rows to a sampler mid-run: each keeps its own step count, so a
    seeded row's stream, its penalties, bias and log probabilities are its own."""
    seeded = SamplingParams(1.0, 1.0, row_seed(7, 0))
    alone = BatchSampler([seeded], CPU, vocab_size=4, host_logprobs=True)
    expected = [alone.choose(torch.log(PROBS).repeat(1, 1)).item() for _ in range(12)]
    running = BatchSampler([SamplingParams(0.0, 1.0, 0)], CPU, vocab_size=4, host_logprobs=True)
    for _ in range(5):
        running.choose(torch.log(PROBS).repeat(1, 1))
    joined = running.extend([seeded, SamplingParams(0.0, 1.0, 0, presence_penalty=2.0, logit_bias={1: 1.0}, logprobs=1)])
    assert joined == [1, 2] and running.ids == [0, 1, 2]
    drawn, penalized = [], []
    for _ in range(12):
        tokens = running.choose(torch.log(PROBS + 1e-9).repeat(3, 1)).tolist()
        drawn.append(tokens[1])
        penalized.append(tokens[2])
    assert drawn == expected
    assert penalized[0] == 1 and len(set(penalized[:3])) == 3, "the joined row's bias and penalty are its own"
    found = running.logprobs_of()
    assert set(found) == {2} and len(found[2]) == 12
    running.select(torch.tensor([1, 2]), [1, 2])
    running.forget([0])
    assert running.ids == [1, 2] and running.choose(torch.log(PROBS + 1e-9).repeat(2, 1)).shape == (2,)
    running.forget([2])
    assert running.logprobs_of() == {} and running.logprob_rows == []


def test_a_vacated_row_turns_off_what_only_it_needed() -> None:
    """A finished row whose place stays in a continuous batch samples greedily and unpenalized,
    so the rest of the batch goes back to the greedy path."""
    sampled = SamplingParams(1.0, 0.5, row_seed(3, 0), presence_penalty=1.0, logit_bias={2: 5.0})
    sampler = BatchSampler([SamplingParams(0.0, 1.0, 0), sampled], CPU, vocab_size=4)
    assert not sampler.greedy_only and sampler.penalized and sampler.bias is not None
    sampler.vacate([1])
    assert sampler.greedy_only and not sampler.use_top_p and not sampler.penalized and sampler.bias is None
    assert sampler.ids == [0, 1]
    logits = torch.log(PROBS + 1e-9).repeat(2, 1)
    assert sampler.choose(logits.clone()).tolist() == [int(PROBS.argmax())] * 2
