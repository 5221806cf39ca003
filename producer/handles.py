"""Narrow handles on submitted work: an id and a connection."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Protocol

from chatbatch.exceptions import RequestFailedError
from chatbatch.jobs import Jobs
from chatbatch.requests import Requests
from schemas.chat import ChatCompletion
from schemas.job import BatchJob


class Connection(Protocol):
    """What a handle uses of the client that made it (producer/client.py `Client`)."""

    requests: Requests
    jobs: Jobs

    def waiting_notice(self, queues: list[str]) -> str | None: ...

    def cancel(self, job_id: str) -> BatchJob: ...


class RequestHandle:
    """One submitted chat request."""

    __slots__ = ("id", "queue", "repeat", "_client")

    def __init__(self, request_id: str, client: Connection, *, queue: str | None = None, repeat: bool = False) -> None:
        self.id = request_id
        self._client = client
        #: True when an idempotency key named an earlier call: this is that call's request.
        self.repeat = repeat
        #: The queue it went to (None for a handle made from an id: read from its record).
        self.queue = queue or client.requests.get(request_id).get("queue")

    def done(self) -> bool:
        return self._client.requests.answered(self.id)

    def waiting_notice(self) -> str | None:
        """A sentence for people while no live worker consumes the request's queue."""
        if self.queue is None or self.done():
            return None
        return self._client.waiting_notice([self.queue])

    def result(self, timeout: float | None = None) -> ChatCompletion:
        """Wait for the answer.

        Raises:
            RequestFailedError: the request ended as an error record (its code and message).
            TimeoutError: no answer within `timeout` seconds.
        """
        record = self._client.requests.wait(self.id, timeout)
        if record is None:
            raise TimeoutError(f"request {self.id} has no answer after {timeout}s")
        if "error" in record:
            raise RequestFailedError(record["error"]["code"], record["error"]["message"])
        return ChatCompletion.model_validate(record)

    def __repr__(self) -> str:
        return f"RequestHandle({self.id!r})"


class JobHandle:
    """One batch job."""

    __slots__ = ("id", "_client")

    def __init__(self, job_id: str, client: Connection) -> None:
        self.id = job_id
        self._client = client

    def status(self) -> BatchJob:
        """The job record (the OpenAI Batch object); reading never changes it."""
        return self._client.jobs.get(self.id)

    def waiting_notice(self) -> str | None:
        """A sentence for people while a queue the job's lines went to has no live worker."""
        return self._client.waiting_notice(self._client.jobs.queues(self.id))

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
        for _, kind, line in self._client.jobs.iter_lines(self.id):
            yield kind, line

    def write_results(self, output: str | None, errors: str | None) -> tuple[int, int]:
        """Write the output and error lines to local files or `s3://` objects; each appears
        complete or not at all.

        Returns:
            (output lines, error lines) of the job.
        """
        return self._client.jobs.write_files(self.id, output, errors)

    def cancel(self) -> BatchJob:
        """Stop the job: lines not yet answered become `cancelled` error lines."""
        return self._client.cancel(self.id)

    def __repr__(self) -> str:
        return f"JobHandle({self.id!r})"
