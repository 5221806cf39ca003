"""The producer's Python API: submit chat requests and JSONL jobs to Redis for the workers."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

import redis

from chatbatch import registry
from chatbatch.delivery import CANCELLED, close_unanswered, expire_if_due, finish, stop_reason
from chatbatch.exceptions import ConfigurationError, JobNotFoundError
from chatbatch.jobstore import JobStore
from chatbatch.queues import (
    DEFAULT_QUEUE,
    TASK_CHAT,
    TASK_CHUNK,
    chunk_argsrepr,
    make_celery,
    model_queue,
    request_argsrepr,
)
from chatbatch.redisconn import connect
from chatbatch.settings import Settings, get_settings
from chatbatch.storage import open_input
from producer.handles import JobHandle, RequestHandle
from producer.reader import check_lines, check_size, count_lines, iter_lines
from schemas.batch import LineError, error_line, line_too_large, parse_batch_line
from schemas.chat import ChatCompletion, check_metadata, parse_chat_request
from schemas.errors import ErrorCode, RequestError
from schemas.job import BatchJob, JobStatus

logger = logging.getLogger(__name__)

def _seconds(window: str) -> int:
    """'24h', '90m', '3600s' -> seconds."""
    units = {"h": 3600, "m": 60, "s": 1}
    if len(window) < 2 or window[-1] not in units or not window[:-1].isdigit() or int(window[:-1]) < 1:
        raise ConfigurationError(
            f"completion window {window!r} is not a duration: use e.g. 24h, 90m or 3600s"
        )
    return int(window[:-1]) * units[window[-1]]


#: A chunk is sent once its lines reach this many bytes, whatever its line count: Celery
#: messages stay small enough for Redis and for a worker to hold many.
CHUNK_BYTES = 4 * 1024 * 1024
#: Bounds of the automatic chunk size.
MIN_CHUNK_LINES = 32
MAX_CHUNK_LINES = 256


def chunk_lines(lines: int | None) -> int:
    """Lines per chunk when CHATBATCH_CHUNK_SIZE is unset: about 64 chunks per file, so that
    many workers share a job, within 32..256 lines. Each message costs the worker a few
    milliseconds of Celery and Redis work, so a 50,000-line file goes in 256-line chunks, not
    as 1,500 small ones; a file of unknown length gets the smallest chunks."""
    if lines is None:
        return MIN_CHUNK_LINES
    return max(MIN_CHUNK_LINES, min(MAX_CHUNK_LINES, -(-lines // 64)))


class Client:
    """Submits work and hands back handles.

    Args:
        settings: defaults to the environment's (`CHATBATCH_*`).
        redis_client: an existing connection to reuse.

    Raises:
        ConfigurationError: Redis cannot be reached.
    """

    def __init__(self, settings: Settings | None = None, *, redis_client: redis.Redis | None = None) -> None:
        self.settings = settings or get_settings()
        self.redis = redis_client or connect(self.settings.redis_url)
        self.store = JobStore(self.redis, job_ttl=self.settings.job_ttl, upload_retry_seconds=self.settings.s3_retry_seconds)
        self._celery: Any = None
        self._live: tuple[float, set[str]] = (0.0, set())

    @property
    def celery(self) -> Any:
        if self._celery is None:
            self._celery = make_celery(self.settings, name="chatbatch.producer")
        return self._celery

    def models(self) -> dict[str, list[dict[str, object]]]:
        """The model names live workers serve, with their workers' heartbeats."""
        return registry.live_models(self.redis)

    def _queue_for(self, model: str | None) -> str:
        if model is None:
            return DEFAULT_QUEUE
        fetched, live = self._live
        if model not in live or time.monotonic() - fetched > 5:
            live = set(registry.live_models(self.redis))
            self._live = (time.monotonic(), live)
        if model not in live:
            served = ", ".join(sorted(live)) or "none"
            raise RequestError(
                ErrorCode.model_not_found,
                f"no live worker serves model {model!r} (served now: {served}): start "
                f"`chatbatch worker --model URI --served-model-name {model}` or omit 'model'",
                param="model",
            )
        return model_queue(model)

    # Single requests.

    def submit(self, body: dict[str, Any], *, request_id: str | None = None) -> RequestHandle:
        """Enqueue one chat request (an OpenAI `/v1/chat/completions` body).

        Raises:
            RequestError: the body is invalid, or names a model no worker serves.
        """
        request = parse_chat_request(body)
        size = len(request.model_dump_json())
        if size > self.settings.max_line_bytes:
            raise RequestError(
                ErrorCode.line_too_large,
                f"the request is {size:,} bytes, over the limit of {self.settings.max_line_bytes:,}: "
                "shorten the messages or raise CHATBATCH_MAX_LINE_BYTES",
            )
        queue = self._queue_for(request.model)
        request_id = request_id or f"chatreq_{uuid.uuid4().hex}"
        sent = request.model_dump(exclude_none=True)
        # Kept until answered: a request whose message the broker loses is sent again.
        self.store.add_pending_request(request_id, queue, sent, time.time())
        self.celery.send_task(TASK_CHAT, args=[request_id, sent], queue=queue, argsrepr=request_argsrepr(request_id))
        return RequestHandle(request_id, self)

    def chat(self, body: dict[str, Any], *, timeout: float | None = None) -> ChatCompletion:
        """Submit one request and wait for its chat.completion."""
        return self.submit(body).result(timeout)

    def request(self, request_id: str) -> RequestHandle:
        return RequestHandle(request_id, self)

    # Batch jobs.

    def job(self, job_id: str) -> JobHandle:
        """A handle on an existing job.

        Raises:
            JobNotFoundError: no such job.
        """
        if not self.store.exists(job_id):
            raise JobNotFoundError(f"no job {job_id!r} in Redis: check the id")
        return JobHandle(job_id, self)

    def submit_file(
        self,
        source: str,
        *,
        job_id: str | None = None,
        metadata: dict[str, str] | None = None,
        output: str | None = None,
        errors: str | None = None,
        completion_window: str = "24h",
    ) -> JobHandle:
        """Validate a JSONL file of batch lines as a stream and enqueue its valid lines.

        Bad lines become error lines (with their line number and code) at once; the good lines
        run. Submitting again with the id of an unfinished job resumes it: only lines without an
        answer are enqueued again, and no line is ever answered twice.

        Raises:
            ConfigurationError: unreadable file, bad metadata, or the job already ended.
            InputTooLargeError: the file is over the byte or line limit.
        """
        settings = self.settings
        if metadata:
            try:
                check_metadata(metadata)
            except ValueError as error:
                raise ConfigurationError(f"--metadata: {error}") from None
        with open_input(source) as (stream, size, name):
            check_size(source, size, settings.max_file_bytes)
            lines = count_lines(stream)
            check_lines(source, lines, settings.max_file_lines)
            stream.seek(0)
            return self.submit_stream(
                stream,
                lines=lines,
                source=name,
                job_id=job_id or f"batch_{uuid.uuid4().hex}",
                metadata=metadata,
                output=output,
                errors=errors,
                completion_window=completion_window,
            )

    def submit_stream(
        self,
        stream: Any,
        *,
        source: str,
        job_id: str,
        metadata: dict[str, str] | None = None,
        output: str | None = None,
        errors: str | None = None,
        completion_window: str = "24h",
        extra: dict[str, str] | None = None,
        lines: int | None = None,
    ) -> JobHandle:
        """Enqueue batch lines from an open binary stream (what `submit_file` does once the
        file is open and within its limits); `source` is recorded as the job's input file, and
        `lines`, when known, sizes the chunks."""
        settings = self.settings
        per_chunk = settings.chunk_size or chunk_lines(lines)
        store = self.store
        created = store.create(
            job_id,
            input_file=source,
            completion_window=completion_window,
            expires_in=_seconds(completion_window),
            metadata=metadata,
            output_file=output,
            error_file=errors,
            extra=extra,
        )
        if not created:
            job = store.get(job_id)
            if job.input_file != source:
                raise ConfigurationError(
                    f"job {job_id} was submitted from {job.input_file}, not {source}: resume it "
                    "with the same file, or submit without --job-id for a new job"
                )
            if job.status.is_final or job.status == JobStatus.finalizing:
                # Submitting a job again is idempotent: an ended job is returned as it is.
                logger.info("job %s already %s: nothing to enqueue", job_id, job.status.value)
                return JobHandle(job_id, self)
            logger.info("resuming job %s", job_id)
        seen: dict[str, int] = {}
        # Per queue: (line number, custom_id, the line as the chunk carries it) for each line.
        chunks: dict[str, list[tuple[int, str, str]]] = {}
        chunk_bytes: dict[str, int] = {}
        chunk_number = 0
        total = 0
        # Chunks of a resumed submission get new ids, so their deliveries count afresh.
        submission = uuid.uuid4().hex[:12]

        def flush(queue: str) -> None:
            nonlocal chunk_number
            items = chunks.pop(queue, [])
            chunk_bytes.pop(queue, None)
            if not items:
                return
            answered = store.recorded(job_id, [number for number, _, _ in items])
            items = [item for item, done in zip(items, answered) if not done]
            chunk_number += 1
            if not items:
                return
            store.add_inputs(job_id, {number: custom_id for number, custom_id, _ in items})
            if stop_reason(store, job_id) is not None:
                return  # recorded as inputs; closed below with cancelled or expired lines
            chunk_id = f"{submission}-{chunk_number}"
            # The lines go as one JSON string: the worker's Celery thread then decodes one
            # string, not hundreds of small objects through kombu's per-object hook.
            payload = "[" + ",".join(text for _, _, text in items) + "]"
            # Kept until answered: a chunk whose message the broker loses is sent again.
            store.add_pending(job_id, chunk_id, queue, payload)
            self.celery.send_task(
                TASK_CHUNK,
                args=[job_id, chunk_id, payload],
                queue=queue,
                argsrepr=chunk_argsrepr(job_id, chunk_id, len(items)),
            )
            store.start(job_id)

        for number, raw, length in iter_lines(stream, max_line_bytes=settings.max_line_bytes):
            if raw is not None and not raw.strip():
                continue  # blank lines carry no request and get no answer
            total += 1
            try:
                if raw is None:
                    raise line_too_large(number, length, settings.max_line_bytes)
                parsed = parse_batch_line(raw, number, max_line_bytes=settings.max_line_bytes)
                if parsed.custom_id in seen:
                    raise LineError(
                        number,
                        RequestError(
                            ErrorCode.duplicate_custom_id,
                            f"line {number}: custom_id {parsed.custom_id!r} repeats line "
                            f"{seen[parsed.custom_id]}: give every line its own custom_id",
                        ),
                        parsed.custom_id,
                    )
                seen[parsed.custom_id] = number
                try:
                    queue = self._queue_for(parsed.body.model)
                except RequestError as error:
                    raise LineError(number, RequestError(error.code, f"line {number}: {error.message}"), parsed.custom_id) from None
            except LineError as problem:
                line = error_line(
                    line_id=f"batch_req_{uuid.uuid4().hex}",
                    custom_id=problem.custom_id,
                    code=problem.error.code,
                    message=problem.error.message,
                    line=number,
                )
                store.record_line(job_id, number, "error", line.model_dump())
                continue
            # The line as it came, with its number added: {"line", "custom_id", "method", "url",
            # "body"}. It passed validation, so it is one JSON object with no "line" key; the
            # worker validates its body again with the same function, so nothing is
            # re-serialized here.
            chunks.setdefault(queue, []).append((number, parsed.custom_id, f'{{"line":{number},' + raw.decode().strip()[1:]))
            chunk_bytes[queue] = chunk_bytes.get(queue, 0) + length
            if len(chunks[queue]) >= per_chunk or chunk_bytes[queue] >= CHUNK_BYTES:
                flush(queue)
        for queue in list(chunks):
            flush(queue)
        reason = stop_reason(store, job_id)
        if reason is not None:
            close_unanswered(store, job_id, reason)
        store.finish_enqueueing(job_id, total)
        status = finish(store, job_id)
        logger.info("job %s: %d lines enqueued from %s (%s)", job_id, total, source, status)
        return JobHandle(job_id, self)

    def cancel(self, job_id: str) -> BatchJob:
        """Cancel a job: no new line starts; unanswered lines become `cancelled` error lines.

        A batch already running on a worker finishes, and its answers are kept.
        """
        store = self.store
        job = store.get(job_id)
        if job.status.is_final or job.status == JobStatus.finalizing:
            return job
        store.set_status(job_id, JobStatus.cancelling)
        close_unanswered(store, job_id, CANCELLED)
        finish(store, job_id)
        return store.get(job_id)

    def refresh(self, job_id: str) -> BatchJob:
        """The job record, after expiring the job if its completion window has passed."""
        expire_if_due(self.store, job_id)
        return self.store.get(job_id)
