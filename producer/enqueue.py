"""Enqueueing a job's lines: read them as a stream, turn each bad one into its error line, and
put the good ones in chunks, one queue per model, in the job's backlog, from which the
dispatcher releases them to the workers a window at a time (chatbatch/dispatch.py)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

from chatbatch.dispatch import Dispatcher, Share
from chatbatch.ids import new_id
from chatbatch.jobs import Jobs, StopReason
from chatbatch.settings import Settings
from chatbatch.structured import check_schema
from producer.reader import iter_lines
from schemas.batch import LineError, error_line, line_too_large, parse_batch_line
from schemas.errors import ErrorCode, RequestError

logger = logging.getLogger(__name__)

#: A chunk is sent once its lines reach this many bytes, whatever its line count: Celery
#: messages stay small enough for Redis and for a worker to hold many.
CHUNK_BYTES = 4 * 1024 * 1024
#: Bounds of the automatic chunk size.
MIN_CHUNK_LINES = 32
MAX_CHUNK_LINES = 256
#: Seconds between renewals of the enqueuer's lease (which lasts four times as long).
LEASE_RENEW_SECONDS = 15


def chunk_lines(lines: int | None) -> int:
    """Lines per chunk when CHATBATCH_CHUNK_SIZE is unset: about 64 chunks per file, so that
    many workers share a job, within 32..256 lines. Each message costs the worker a few
    milliseconds of Celery and Redis work, so a 50,000-line file goes in 256-line chunks, not
    as 1,500 small ones; a file of unknown length gets the smallest chunks."""
    if lines is None:
        return MIN_CHUNK_LINES
    return max(MIN_CHUNK_LINES, min(MAX_CHUNK_LINES, -(-lines // 64)))


class Interrupted(Exception):
    """Enqueueing was told to stop before the end of the file (the job can be resumed)."""


@dataclass
class _Chunk:
    #: (line number, custom_id, the line as the chunk carries it)
    items: list[tuple[int, str, str]] = field(default_factory=list)
    size: int = 0


class Enqueuer:
    """Reads one job's lines and enqueues them; one instance per submission.

    Args:
        jobs: the job store.
        dispatcher: holds the job's chunks and releases them to the broker.
        send: sends a Celery task by name (`celery.send_task`).
        share: the job's priority, owner and weight.
        queue_for: the queue of a request naming a model (None: the default queue); raises
            RequestError(model_not_found) for a model no worker serves.
        stop: set to stop at the next line (SIGTERM on a gateway); the job can be resumed.
        holder: this enqueuer's name in its lease (default: a new one).
    """

    def __init__(
        self,
        settings: Settings,
        jobs: Jobs,
        dispatcher: Dispatcher,
        send: Callable[..., Any],
        queue_for: Callable[[str | None], str],
        *,
        job_id: str,
        share: Share,
        per_chunk: int,
        stop: threading.Event | None = None,
        holder: str | None = None,
    ) -> None:
        self.settings = settings
        self.jobs = jobs
        self.dispatcher = dispatcher
        self.send = send
        self.share = share
        self.queue_for = queue_for
        self.job_id = job_id
        self.per_chunk = per_chunk
        self.stop = stop
        self.holder = holder or new_id("enqueuer-")
        self.total = 0
        self._seen: dict[str, int] = {}
        self._chunks: dict[str, _Chunk] = {}
        self._queues: set[str] = set()
        self._chunk_number = 0
        self._renewed = 0.0
        # Chunks of a resumed submission get new ids, so their deliveries count afresh.
        self._submission = new_id("")[:12]
        self._created = 0

    def run(self, stream: IO[bytes]) -> str | None:
        """Enqueue every line of `stream`, then record the total; returns the job's status.

        Raises:
            Interrupted: `stop` was set; what was enqueued stays, and a resume goes on.
        """
        self._renew()
        # A resumed job's chunks still held are made again from the file, with the lines that
        # have no answer yet.
        self.dispatcher.drop(self.job_id, self.jobs.queues(self.job_id))
        self._created = int(self.jobs.field(self.job_id, "created_at") or time.time())
        for number, raw, length in iter_lines(stream, max_line_bytes=self.settings.max_line_bytes):
            if raw is not None and not raw.strip():
                continue  # blank lines carry no request and get no answer
            if self.stop is not None and self.stop.is_set():
                self._flush_all()
                raise Interrupted(f"job {self.job_id}: enqueueing stopped at line {number}")
            self.total += 1
            self._line(number, raw, length)
            if time.monotonic() - self._renewed > LEASE_RENEW_SECONDS:
                self._renew()
        self._flush_all()
        reason = self.jobs.stop_reason(self.job_id)
        if reason is not None:
            self.jobs.close(self.job_id, reason)
        return self.jobs.finish_enqueueing(self.job_id, self.total)

    def _renew(self) -> None:
        self.jobs.hold_enqueuer(self.job_id, self.holder, seconds=4 * LEASE_RENEW_SECONDS)
        self._renewed = time.monotonic()

    def _line(self, number: int, raw: bytes | None, length: int) -> None:
        try:
            custom_id, queue, good = self._validate(number, raw, length)
        except LineError as problem:
            line = error_line(
                line_id=new_id("batch_req_"),
                custom_id=problem.custom_id,
                code=problem.error.code,
                message=problem.error.message,
                line=number,
            )
            self.jobs.record_line(self.job_id, number, "error", line.model_dump())
            return
        # The line as it came, with its number added: {"line", "custom_id", "method", "url",
        # "body"}. It passed validation, so it is one JSON object with no "line" key; the
        # worker validates its body again with the same function, so nothing is re-serialized.
        chunk = self._chunks.setdefault(queue, _Chunk())
        chunk.items.append((number, custom_id, f'{{"line":{number},' + good.decode().strip()[1:]))
        chunk.size += length
        if len(chunk.items) >= self.per_chunk or chunk.size >= CHUNK_BYTES:
            self._flush(queue)

    def _validate(self, number: int, raw: bytes | None, length: int) -> tuple[str, str, bytes]:
        """(custom_id, queue, raw line) of a good line; raises LineError for a bad one."""
        if raw is None:
            raise line_too_large(number, length, self.settings.max_line_bytes)
        parsed = parse_batch_line(raw, number, max_line_bytes=self.settings.max_line_bytes)
        if parsed.custom_id in self._seen:
            raise LineError(
                number,
                RequestError(
                    ErrorCode.duplicate_custom_id,
                    f"line {number}: custom_id {parsed.custom_id!r} repeats line "
                    f"{self._seen[parsed.custom_id]}: give every line its own custom_id",
                ),
                parsed.custom_id,
            )
        self._seen[parsed.custom_id] = number
        try:
            check_schema(parsed.body, prefix="body.")
            return parsed.custom_id, self.queue_for(parsed.body.model), raw
        except RequestError as error:
            raise LineError(number, RequestError(error.code, f"line {number}: {error.message}"), parsed.custom_id) from None

    def _flush_all(self) -> None:
        for queue in list(self._chunks):
            self._flush(queue)

    def _flush(self, queue: str) -> None:
        chunk = self._chunks.pop(queue)
        self._chunk_number += 1
        answered = self.jobs.recorded(self.job_id, [number for number, _, _ in chunk.items])
        items = [item for item, done in zip(chunk.items, answered) if not done]
        if not items:
            return
        self._queues.add(queue)
        self.jobs.add_inputs(self.job_id, {number: custom_id for number, custom_id, _ in items}, queues=self._queues)
        reason: StopReason | None = self.jobs.stop_reason(self.job_id)
        if reason is not None:
            return  # recorded as inputs; closed at the end with cancelled or expired lines
        chunk_id = f"{self._submission}-{self._chunk_number}"
        # The lines go as one JSON string: the worker's Celery thread then decodes one string,
        # not hundreds of small objects through kombu's per-object hook.
        payload = "[" + ",".join(text for _, _, text in items) + "]"
        # Held in the job's backlog, then released as the queue's window has room; once
        # released, kept until answered (a chunk whose message the broker loses is sent again).
        self.dispatcher.hold(self.job_id, queue, chunk_id, payload, len(items), self.share, self._created)
        self.jobs.start(self.job_id)
        self.dispatcher.dispatch(queue, self.send)
