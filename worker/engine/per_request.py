"""The per-request batch: a group of requests close in length runs as one batched generation
until its last row is done; nothing joins it. It is the `request` schedule, and it runs what a
continuous batch cannot hold (a suspect alone, a request longer than a slot).

A group that fails as a whole runs again in halves, down to the one request that fails alone.
"""

from __future__ import annotations

import logging

from schemas.chat import ChatCompletion
from schemas.errors import ErrorCode, RequestError
from worker.engine.interface import Runner
from worker.engine.pending import URGENCY, Pending

logger = logging.getLogger(__name__)


class PerRequestBatch:
    """Groups requests and runs each group on the runner.

    Args:
        runner: the model runner.
        max_batch_size: most sequences (requests times n) per group.
        max_batch_tokens: most padded prompt-plus-new tokens per group.
    """

    def __init__(self, runner: Runner, *, max_batch_size: int, max_batch_tokens: int) -> None:
        self.runner = runner
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens

    def choose(self, backlog: list[Pending]) -> tuple[list[Pending], list[Pending]]:
        """The next group and the rest: the oldest request of the most urgent service tier
        among single requests (else among batch lines), plus the requests nearest to it in
        length (length bucketing keeps padding low), within the limits. A suspect runs alone."""
        oldest = min(backlog, key=lambda item: (not item.interactive, URGENCY[item.request.tier], item.enqueued_at))
        if oldest.alone:
            return [oldest], [item for item in backlog if item is not oldest]
        by_length = sorted(backlog, key=lambda item: (abs(item.cost - oldest.cost), item.enqueued_at))
        batch: list[Pending] = []
        rows = 0
        longest = 0
        for item in by_length:
            if item.alone:
                continue
            new_rows = rows + item.rows
            new_longest = max(longest, item.cost)
            if batch and (
                new_rows > self.max_batch_size or new_rows * new_longest > self.max_batch_tokens
            ):
                continue
            batch.append(item)
            rows, longest = new_rows, new_longest
        chosen = {id(item) for item in batch}
        return batch, [item for item in backlog if id(item) not in chosen]

    def generate(self, batch: list[Pending]) -> list[ChatCompletion | RequestError]:
        """The runner's answers for a group; when the group fails as a whole, its requests run
        again apart (`isolate`)."""
        try:
            results = self.runner.run_batch(batch)
            if len(results) != len(batch):
                raise RuntimeError(f"runner returned {len(results)} results for {len(batch)} requests")
            return results
        except Exception as error:
            logger.exception("batch of %d requests failed", len(batch))
            return self.isolate(batch, RequestError(ErrorCode.internal_error, f"generation failed: {error}"))

    def isolate(self, batch: list[Pending], failure: RequestError) -> list[ChatCompletion | RequestError]:
        """Answers for the requests of a batch that failed with `failure`: they run again in
        halves, each half split again if it fails, so a request that breaks every batch it is
        in ends alone with its error, and the others are answered (a transient failure costs
        one rerun). A request alone, and a streamed one that has sent tokens, keep `failure`."""
        if len(batch) == 1:
            return [failure]
        again = [item for item in batch if item.restartable]
        results: dict[int, ChatCompletion | RequestError] = {id(item): failure for item in batch}
        if again:
            logger.warning("running %d requests of a failed batch again, in halves", len(again))
        half = (len(again) + 1) // 2
        for part in (again[:half], again[half:]):
            if part:
                results.update(zip(map(id, part), self.generate(part)))
        return [results[id(item)] for item in batch]
