"""The engine's counters and figures (docs/engine.md#engine-figures): written by the engine
thread, read from any thread (values may be a step apart)."""

from __future__ import annotations

from worker.engine.interface import ContinuousBatch


class Figures:
    """Totals since the start, and occupancy over the steps of a continuous batch (a step of
    the slot layout is up to SYNC_EVERY device steps, counted once)."""

    def __init__(self) -> None:
        self.stats: dict[str, float] = {
            "requests": 0,
            "batches": 0,
            "generated_tokens": 0,
            "largest_batch": 0,
            # Seconds the engine spent running batches: compared with wall time, how busy the
            # device was kept.
            "busy_seconds": 0.0,
            # Streamed requests ended because their client went away (rows freed, or never run).
            "cancelled": 0,
        }
        self.steps_waiting = 0
        self.occupancy_waiting = 0.0
        #: All steps, and their share of rows in use summed.
        self.steps = 0
        self.occupancy = 0.0
        #: The same at the last step that admitted requests: the steps after it only drain the
        #: batch (no work was left to give it), so "while work came" ends there.
        self.steps_fed = 0
        self.occupancy_fed = 0.0
        #: Requests in the engine's backlog (taken from the queue, not admitted yet).
        self.backlog = 0

    def step(self, rows: int, most: int, *, waiting: bool, admitted: bool) -> None:
        """A step of the continuous batch with `rows` of `most` rows in use."""
        if rows:  # (a batch with no rows runs no step)
            self.steps += 1
            self.occupancy += rows / most
        if waiting:
            self.steps_waiting += 1
            self.occupancy_waiting += rows / most
        if admitted:
            self.steps_fed, self.occupancy_fed = self.steps, self.occupancy

    def mean_occupancy(self) -> float:
        """Mean share of rows in use over the steps at which requests were waiting."""
        return self.occupancy_waiting / self.steps_waiting if self.steps_waiting else 0.0

    def mean_occupancy_fed(self) -> float:
        """Mean share of rows in use over every step up to the last that admitted requests,
        whether requests waited or not (a batch starved of work between two admissions
        counts, its drain at the end does not)."""
        return self.occupancy_fed / self.steps_fed if self.steps_fed else 0.0

    def report(self, schedule: str, running: ContinuousBatch | None, most: int, *, waiting: int, steps: int) -> dict[str, float | str]:
        """Rows running and most rows, requests waiting, occupancy (rows in use / most rows)
        now, averaged over the steps that had requests waiting, and over all decode steps
        (generated tokens per step / most rows); prompt tokens computed and taken from the
        prefix cache, the cache's hit rate, and generated tokens."""
        rows = len(running) if running is not None else 0
        prompt = running.prompt_tokens if running is not None else 0
        cached = running.cached_tokens if running is not None else 0
        generated = int(self.stats["generated_tokens"])
        return {
            "schedule": schedule,
            "requests_running": running.request_count if running is not None else 0,
            "rows_running": rows,
            "max_rows": most,
            "requests_waiting": waiting + self.backlog,
            "occupancy": round(rows / most, 4),
            "mean_occupancy_waiting": round(self.mean_occupancy(), 4),
            # Over every step of the continuous batch up to its last admission; and the sums:
            # steps and their occupancy, in all and up to the last admission (a job's own
            # figure: its fed sums at its end less the sums in all at its start).
            "mean_occupancy_fed": round(self.mean_occupancy_fed(), 4),
            "steps": self.steps,
            "occupancy_sum": round(self.occupancy, 4),
            "steps_fed": self.steps_fed,
            "occupancy_sum_fed": round(self.occupancy_fed, 4),
            # Tokens generated per decode step over most rows, in either schedule.
            "mean_occupancy": round(generated / (steps * most), 4) if steps else 0.0,
            "decode_steps": steps,
            "prompt_tokens": prompt,
            "cached_prompt_tokens": cached,
            "prefix_cache_hit_rate": round(cached / prompt, 4) if prompt else 0.0,
            "generated_tokens": generated,
        }
