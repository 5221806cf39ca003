"""How many rows a batch runs on a CPU: sized from memory and the measured cost of a step.

A decode step on a CPU costs the weights' pass once plus a share per row, so tokens per second
grow with the rows until the matrix units are busy, then flatten while each step (every row's
latency) keeps growing. At worker start the model runs a few decode steps at 16, 32, 64, ...
rows over a KV cache of `CONTEXT` tokens filled with noise (no prefill: a step costs the same
whatever the values), and the rows double while tokens per second still gain `GAIN` or more,
up to `MOST_ROWS` and to what memory holds. On CUDA the rows stay fixed and the KV tokens come
from free device memory (worker/models/runners.py).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

#: Rows tried, doubling from the first, at most.
FIRST_ROWS = 16
MOST_ROWS = 256
#: Tokens of KV each row holds while its step is timed: a prompt and an answer of a typical line.
CONTEXT = 256
#: Least gain in tokens per second that doubling the rows must bring.
GAIN = 1.15
#: Share of available memory the KV of a full batch may take, and the KV tokens a row may hold
#: on average (prompt plus answer) when the tokens bound is derived from the rows.
MEMORY_SHARE = 0.4
TOKENS_PER_ROW = 2_048


@dataclass(frozen=True)
class Sizing:
    """Rows and KV tokens of a batch, and the tokens per second measured at each row count."""

    rows: int
    tokens: int
    rates: dict[int, float]


def kv_bytes_per_token(model: Any) -> int:
    """Bytes of keys and values one token takes in every layer of the model's cache."""
    import torch

    config = model.config
    config = getattr(config, "get_text_config", lambda: config)()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * (torch.finfo(model.dtype).bits // 8)


def available_memory() -> int:
    """Bytes of memory available to new allocations (MemAvailable), else all of it."""
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def size_for_cpu(model: Any, step: Any, *, max_rows: int | None = None, max_tokens: int | None = None) -> Sizing:
    """Rows and KV tokens for batches on a CPU; a configured value is kept as it is.

    Args:
        model: the loaded model (its config and dtype give the KV size).
        step: `step(rows, cache_width)`: one timed decode step, in seconds (`time_step` of a
            runner).
        max_rows: rows configured (`CHATBATCH_MAX_BATCH_SIZE`), or None to size them.
        max_tokens: KV tokens configured (`CHATBATCH_MAX_BATCH_TOKENS`), or None.
    """
    memory = int(available_memory() * MEMORY_SHARE)
    fits = max(4_096, memory // kv_bytes_per_token(model))
    if max_rows is not None:
        return Sizing(max_rows, max_tokens or min(fits, max_rows * TOKENS_PER_ROW), {})
    most = max(FIRST_ROWS, min(MOST_ROWS, (max_tokens or fits) // CONTEXT))
    rows, rates = FIRST_ROWS, {}
    rates[rows] = rows / step(rows, CONTEXT)
    while 2 * rows <= most:
        rates[2 * rows] = 2 * rows / step(2 * rows, CONTEXT)
        if rates[2 * rows] < GAIN * rates[rows]:
            break
        rows *= 2
    tokens = max_tokens or min(fits, rows * TOKENS_PER_ROW)
    logger.info(
        "batches of %d rows and %d KV tokens on this CPU (decode tokens/s by rows: %s)",
        rows, tokens, ", ".join(f"{r}: {rate:.0f}" for r, rate in rates.items()),
    )
    return Sizing(rows, tokens, rates)


def timed(run: Any, repeat: int = 2) -> float:
    """Seconds of the fastest of `repeat` calls of `run()`, after one call to warm up."""
    run()
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best
