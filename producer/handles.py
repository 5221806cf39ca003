"""Narrow handles on submitted work: an id and a connection."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from chatbatch import keys
from chatbatch.delivery import write_job_files
from chatbatch.exceptions import RequestFailedError
from schemas.chat import ChatCompletion
from schemas.job import BatchJob

if TYPE_CHECKING:
    from producer.client import Client


class RequestHandle:
    """One submitted chat request."""

    __slots__ = ("id", "_client")

    def __init__(self, request_id: str, client: Client) -> None:
        self.id = request_id
        self._client = client

    def done(self) -> bool:
        return bool(self._client.redis.exists(keys.result(self.id)))

    def result(self, timeout: float | None = None) -> ChatCompletion:
        """Wait for the answer.

        Raises:
            RequestFailedError: the request ended as an error record (its code and message).
            TimeoutError: no answer within `timeout` seconds.
        """
        redis = self._client.redis
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            raw = redis.get(keys.result(self.id))
            if raw is not None:
                record = json.loads(raw)
                if "error" in record:
                    raise RequestFailedError(record["error"]["code"], record["error"]["message"])
                return ChatCompletion.model_validate(record)
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(f"request {self.id} has no answer after {timeout}s")
            # BLPOP wakes as soon as the worker stores the answer; the short cap re-checks the key.
            wait = 1.0 if left is None else max(0.01, min(1.0, left))
            redis.blpop([keys.result_ready(self.id)], timeout=wait)


class JobHandle:
    """One batch job."""

    __slots__ = ("id", "_client")

    def __init__(self, job_id: str, client: Client) -> None:
        self.id = job_id
        self._client = client

    def status(self) -> BatchJob:
        """The job record (the OpenAI Batch object)."""
        return self._client.refresh(self.id)

    def wait(
        self,
        timeout: float | None = None,
        *,
        poll: float = 0.25,
        on_progress: Callable[[BatchJob], None] | None = None,
    ) -> BatchJob:
        """Block until the job ends; `on_progress` sees the record at each poll.

        Raises:
            TimeoutError: the job did not end within `timeout` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.status()
            if on_progress is not None:
                on_progress(job)
            if job.status.is_final:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {self.id} is still {job.status.value} after {timeout}s")
            time.sleep(poll)

    def lines(self) -> Iterator[tuple[str, str]]:
        """("output" | "error", JSON line) for every answered line, in input order."""
        for _, kind, line in self._client.store.iter_lines(self.id):
            yield kind, line

    def write_results(self, output: str | None, errors: str | None) -> tuple[int, int]:
        """Write the output and error lines to local files or `s3://` objects; each appears
        complete or not at all.

        Returns:
            (output lines, error lines) of the job.
        """
        return write_job_files(self._client.store, self.id, output, errors)

    def cancel(self) -> BatchJob:
        """Stop the job: lines not yet answered become `cancelled` error lines."""
        return self._client.cancel(self.id)

    def __repr__(self) -> str:
        return f"JobHandle({self.id!r})"
