"""The worker process's garbage collector: the loaded model is frozen out of it, and young
collections are spaced out.

A worker holds a large, permanent heap (torch, transformers, MLflow, Celery: over half a
million objects with the default model) and thousands of short-lived ones per second (a chunk's
requests, futures and answers). With CPython's defaults every full collection walks the whole
permanent heap while holding the GIL, so the engine thread stalls for hundreds of milliseconds
at a time; on a 20,000-line job on two CPU cores that was about a fifth of the run
(docs/benchmarks.md).
"""

from __future__ import annotations

import gc
import logging

logger = logging.getLogger(__name__)

#: Container allocations (net of frees) between young-generation collections; CPython's default
#: is 700. Requests in flight then cross into the older generations far less often, and each
#: collection still looks at a bounded number of objects.
YOUNG_THRESHOLD = 20_000


def settle() -> int:
    """Collect once, then freeze everything alive now (the model and the libraries, loaded
    once per process and kept for its life) so that later collections never walk it, and space
    out young collections. Call it once the process has loaded all it keeps; objects made
    later are collected as usual.

    Returns:
        the number of frozen objects. Keep it rather than asking again: `gc.get_freeze_count()`
        walks the whole frozen list with the GIL held (several milliseconds for a worker).
    """
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
    frozen = gc.get_freeze_count()
    logger.info("heap settled: %d objects frozen out of garbage collection", frozen)
    return frozen
