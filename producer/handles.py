"""Narrow handles on submitted work: an id and a connection."""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from chatbatch import keys
from chatbatch.exceptions import ChatbatchError, RequestFailedError
from schemas.chat import ChatCompletion
from schemas.job import BatchJob, JobStatus

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
        return self._client.store.get(self.id)

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
        """Write the output and error lines to local files, each replaced atomically.

        Returns:
            (output lines, error lines) written.
        """
        writers = {}
        counts = {"output": 0, "error": 0}
        try:
            for kind, dest in (("output", output), ("error", errors)):
                if dest:
                    writers[kind] = _AtomicFile(Path(dest))
            for kind, line in self.lines():
                counts[kind] += 1
                if kind in writers:
                    writers[kind].write(line)
            for writer in writers.values():
                writer.commit()
        finally:
            for writer in writers.values():
                writer.discard()
        return counts["output"], counts["error"]

    def cancel(self) -> BatchJob:
        """Stop the job: lines not yet answered become `cancelled` error lines."""
        return self._client.cancel(self.id)

    def __repr__(self) -> str:
        return f"JobHandle({self.id!r})"


class _AtomicFile:
    """A file that appears at its path complete, or not at all."""

    def __init__(self, path: Path) -> None:
        path = path.expanduser()
        if path.parent and not path.parent.exists():
            raise ChatbatchError(f"cannot write {path}: its directory does not exist")
        self.path = path
        fd, self.tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or ".")
        self.file = os.fdopen(fd, "w", encoding="utf-8")

    def write(self, line: str) -> None:
        self.file.write(line)
        self.file.write("\n")

    def commit(self) -> None:
        self.file.close()
        os.replace(self.tmp, self.path)
        self.tmp = ""

    def discard(self) -> None:
        if not self.file.closed:
            self.file.close()
        if self.tmp and os.path.exists(self.tmp):
            os.unlink(self.tmp)
