"""Batches on a CPU sized from memory and the measured cost of a step (worker/models/sizing.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from chatbatch.settings import Settings
from worker.models import sizing
from worker.models.model import build_engine, load_runner
from worker.models.sizing import size_for_cpu

GiB = 1024**3


class _Model:
    """What sizing reads of a model: its config and dtype (a 30-layer model, 3 KV heads of 64)."""

    def __init__(self) -> None:
        import torch

        class Config:
            num_attention_heads = 9
            num_key_value_heads = 3
            hidden_size = 576
            num_hidden_layers = 30

        self.config = Config()
        self.dtype = torch.float32


def _step(fixed: float, per_row: float) -> tuple[list[int], object]:
    """A step costing `fixed` seconds plus `per_row` a row; the rows it was timed at."""
    timed: list[int] = []

    def step(rows: int, width: int) -> float:
        assert width == sizing.CONTEXT
        timed.append(rows)
        return fixed + per_row * rows

    return timed, step


def test_rows_double_while_tokens_per_second_still_gain(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sizing, "available_memory", lambda: 16 * GiB)
    # Tokens/s by rows: 16: 8.9, 32: 12.3, 64: 15.2, 128: 17.3 (+14%: not worth its latency).
    timed, step = _step(1.0, 0.05)
    chosen = size_for_cpu(_Model(), step)
    assert chosen.rows == 64
    assert timed == [16, 32, 64, 128]
    assert chosen.tokens == 64 * sizing.TOKENS_PER_ROW
    # A step whose cost is mostly the weights' pass gains up to the most rows tried.
    assert size_for_cpu(_Model(), _step(1.0, 0.0001)[1]).rows == sizing.MOST_ROWS


def test_memory_bounds_the_rows_and_the_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    per_token = sizing.kv_bytes_per_token(_Model())
    assert per_token == 2 * 30 * 3 * 64 * 4
    # Room for 40 rows of CONTEXT tokens in the memory share: 32 rows at most are tried.
    monkeypatch.setattr(sizing, "available_memory", lambda: int(40 * sizing.CONTEXT * per_token / sizing.MEMORY_SHARE))
    timed, step = _step(1.0, 0.0001)
    chosen = size_for_cpu(_Model(), step)
    assert (chosen.rows, timed) == (32, [16, 32])
    assert chosen.tokens <= 40 * sizing.CONTEXT


def test_configured_limits_are_kept_without_timing_a_step(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sizing, "available_memory", lambda: 16 * GiB)
    timed, step = _step(1.0, 0.05)
    assert (size_for_cpu(_Model(), step, max_rows=24, max_tokens=9_000).rows, timed) == (24, [])
    assert size_for_cpu(_Model(), step, max_rows=24, max_tokens=9_000).tokens == 9_000
    assert size_for_cpu(_Model(), step, max_rows=24).tokens == 24 * sizing.TOKENS_PER_ROW


def test_a_worker_on_cpu_times_its_steps_and_sizes_its_batches(tiny_model: Path) -> None:
    settings = Settings(redis_url="redis://127.0.0.1:1/0", dtype="float32")
    runner = load_runner(str(tiny_model), settings)
    assert 0 < runner.time_step(4, 32) < 10
    engine = build_engine(runner, settings)
    assert engine.max_batch_size in (16, 32, 64, 128, 256)
    assert engine.max_batch_tokens >= engine.max_batch_size * sizing.CONTEXT
    pinned = build_engine(runner, Settings(redis_url=settings.redis_url, dtype="float32", max_batch_size=32))
    assert pinned.max_batch_size == 32 and pinned.fingerprint != engine.fingerprint
    assert build_engine(runner, settings).fingerprint == engine.fingerprint, "a measured size does not change the fingerprint"
