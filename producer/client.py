"""The producer's Python API: submit chat requests and JSONL jobs to Redis for the workers."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Generator
from typing import IO, Any

import redis

from chatbatch import egress, keys, registry
from chatbatch.callbacks import check_url, initial_fields
from chatbatch.dispatch import (
    DEFAULT_OWNER,
    DEFAULT_PRIORITY,
    Dispatcher,
    Share,
    check_owner,
    check_priority,
)
from chatbatch.exceptions import ConfigurationError, JobNotFoundError, RequestFailedError
from chatbatch.idempotency import CHAT, Idempotency, body_digest
from chatbatch.ids import new_id
from chatbatch.jobs import Jobs
from chatbatch.ledger import Ledger
from chatbatch.queues import DEFAULT_QUEUE, TASK_CHAT, live_queue, make_celery, model_queue, request_argsrepr
from chatbatch.redisconn import connect, maybe_text
from chatbatch.requests import Requests
from chatbatch.settings import Settings, get_settings, parse_weights
from chatbatch.storage import open_input
from chatbatch.streams import follow
from chatbatch.structured import check_schema
from producer.enqueue import Enqueuer, chunk_lines
from producer.handles import JobHandle, RequestHandle
from producer.reader import check_lines, check_size, count_lines
from schemas.chat import ChatCompletion, check_metadata, parse_chat_request
from schemas.errors import ErrorCode, RequestError
from schemas.job import BatchJob, JobStatus

logger = logging.getLogger(__name__)


def share_fields(priority: str | None, owner: str | None) -> dict[str, str]:
    """The job record's fields for its turn between jobs.

    Raises:
        ConfigurationError: an unknown priority or a malformed owner.
    """
    try:
        return {"priority": check_priority(priority), "owner": check_owner(owner)}
    except ValueError as error:
        raise ConfigurationError(str(error)) from None


def tracking_fields(experiment: str | None) -> dict[str, str]:
    """The job record's field naming the MLflow experiment that tracks it (none: untracked)."""
    return {"mlflow_experiment": experiment} if experiment else {}


def window_seconds(window: str) -> int:
    """'24h', '90m', '3600s' -> seconds.

    Raises:
        ConfigurationError: not such a duration.
    """
    units = {"h": 3600, "m": 60, "s": 1}
    if len(window) < 2 or window[-1] not in units or not window[:-1].isdigit() or int(window[:-1]) < 1:
        raise ConfigurationError(f"completion window {window!r} is not a duration: use e.g. 24h, 90m or 3600s")
    return int(window[:-1]) * units[window[-1]]


def _chunks(requests: Requests, request_id: str, *, usage: bool, timeout: float | None) -> Generator[dict[str, Any], None, None]:
    """A streamed request's chunks; an error event raises RequestFailedError, and closing the
    iterator early marks the request disconnected (its worker cancels it)."""
    ended = False
    try:
        for event in follow(requests, request_id, usage=usage, timeout=timeout):
            if "error" in event:
                ended = True
                raise RequestFailedError(str(event["error"].get("code")), str(event["error"].get("message")))
            yield event
        ended = True
    finally:
        if not ended:
            requests.disconnect(request_id)


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
        self.jobs = Jobs(self.redis, job_ttl=self.settings.job_ttl, upload_retry_seconds=self.settings.s3_retry_seconds)
        self.requests = Requests(self.redis, result_ttl=self.settings.result_ttl)
        self.ledger = Ledger(self.redis, job_ttl=self.settings.job_ttl)
        self.dispatcher = Dispatcher(self.redis, job_ttl=self.settings.job_ttl)
        self.idempotency = Idempotency(self.redis)
        self._weights = parse_weights(self.settings.owner_weights)
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

    def waiting_notice(self, queues: list[str]) -> str | None:
        """A sentence for people when one of these queues has no live worker, else None."""
        return registry.nobody_serves(self.redis, queues)

    def queue_for(self, model: str | None) -> str:
        """The queue of requests naming `model` (None: the default queue).

        Raises:
            RequestError: model_not_found, when no live worker serves it.
        """
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

    def submit(
        self,
        body: dict[str, Any],
        *,
        request_id: str | None = None,
        callback_url: str | None = None,
        owner: str | None = None,
        idempotency_key: str | None = None,
    ) -> RequestHandle:
        """Enqueue one chat request (an OpenAI `/v1/chat/completions` body).

        Args:
            request_id: the id to give it (default: a new `chatcmpl-...` id).
            callback_url: POSTed the signed chat.completion when it is answered.
            owner: the HTTP API's key owner, kept with the record.
            idempotency_key: names the caller's intent (chatbatch/idempotency.py): a repeat of
                the same body with the same key and owner within 24 h gets the first call's
                request (`handle.repeat`), which is not enqueued again.

        Raises:
            RequestError: the body is invalid, or names a model no worker serves.
            ConfigurationError: a callback URL that cannot be used (RefusedDestination: one
                that is, or resolves to, an address callbacks may not go to).
            IdempotencyKeyError: a malformed key, or one first sent with another body.
        """
        callback_url = check_url(callback_url, self.settings.callback_secret)
        request = parse_chat_request(body, streamable=True)
        check_schema(request)
        if callback_url:
            egress.check(callback_url, self.settings.allowed_callbacks)
        size = len(request.model_dump_json())
        if size > self.settings.max_line_bytes:
            raise RequestError(
                ErrorCode.line_too_large,
                f"the request is {size:,} bytes, over the limit of {self.settings.max_line_bytes:,}: "
                "shorten the messages or raise CHATBATCH_MAX_LINE_BYTES",
            )
        # Someone waits on it: it goes to the queue workers take from first.
        queue = live_queue(self.queue_for(request.model))
        request_id = request_id or new_id("chatcmpl-")
        sent = request.model_dump(exclude_none=True)
        if idempotency_key is not None:
            digest = body_digest([sent, callback_url])
            earlier = self.idempotency.first(
                CHAT, owner or "", idempotency_key, digest=digest, object_id=request_id,
                find=lambda found: found if self.requests.get(found) else None,
            )
            if earlier is not None:
                return RequestHandle(earlier, self, queue=queue, repeat=True)
        try:
            self.requests.record(request_id, queue=queue, body=sent, owner=owner, callback_url=callback_url)
        except BaseException:
            if idempotency_key is not None:  # nothing was recorded: a retry with the key may run it
                self.idempotency.release(CHAT, owner or "", idempotency_key, request_id)
            raise
        # Once recorded, the request runs even if this send fails: the recovery sweep sends
        # pending requests whose message is missing.
        self.celery.send_task(TASK_CHAT, args=[request_id, sent], queue=queue, argsrepr=request_argsrepr(request_id))
        return RequestHandle(request_id, self, queue=queue)

    def stream(
        self, body: dict[str, Any], *, timeout: float | None = None, callback_url: str | None = None
    ) -> Generator[dict[str, Any], None, None]:
        """Submit one request with `stream: true` and iterate over its chat.completion.chunk
        objects as they are generated (read from Redis with blocking XREAD). Closing the
        iterator before its end (`break`, `close()`) cancels the request.

        Raises:
            RequestError: the body is invalid, or names a model no worker serves (at once).
            RequestFailedError: while iterating: the request failed, or its stream had no end
                within `timeout` seconds (code `timeout`).
        """
        handle = self.submit({**body, "stream": True}, callback_url=callback_url)
        options = body.get("stream_options") or {}
        return _chunks(self.requests, handle.id, usage=bool(options.get("include_usage")), timeout=timeout)

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
        if not self.jobs.exists(job_id):
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
        callback_url: str | None = None,
        priority: str | None = None,
        owner: str | None = None,
        mlflow_experiment: str | None = None,
    ) -> JobHandle:
        """Validate a JSONL file of batch lines as a stream and enqueue its valid lines.

        Bad lines become error lines (with their line number and code) at once; the good lines
        run. Submitting again with the id of an unfinished job resumes it: only lines without an
        answer are enqueued again, and no line is ever answered twice.

        Args:
            callback_url: POSTed the signed batch object when the job ends.
            priority: `high`, `normal` (default) or `low`: higher jobs' chunks go first.
            owner: whose job it is: jobs of different owners share the workers fairly
                (docs/scheduling.md).
            mlflow_experiment: track the job as a run of this MLflow experiment (default:
                CHATBATCH_MLFLOW_EXPERIMENT; docs/lineage.md).

        Raises:
            ConfigurationError: unreadable file, bad metadata or callback URL, or a resumed job
                from another file.
            InputTooLargeError: the file is over the byte or line limit.
        """
        settings = self.settings
        if metadata:
            try:
                check_metadata(metadata)
            except ValueError as error:
                raise ConfigurationError(f"--metadata: {error}") from None
        callback_url = check_url(callback_url, settings.callback_secret, option="--callback-url")
        if callback_url:
            egress.check(callback_url, settings.allowed_callbacks, option="--callback-url")
        extra = share_fields(priority, owner)
        extra.update(tracking_fields(mlflow_experiment))
        if callback_url:
            extra.update(initial_fields(callback_url))
        with open_input(source) as (stream, size, name):
            check_size(source, size, settings.max_file_bytes)
            lines = count_lines(stream)
            check_lines(source, lines, settings.max_file_lines)
            stream.seek(0)
            return self.submit_stream(
                stream,
                lines=lines,
                source=name,
                job_id=job_id or new_id("batch_"),
                metadata=metadata,
                output=output,
                errors=errors,
                completion_window=completion_window,
                extra=extra,
            )

    def create_job(
        self,
        job_id: str,
        *,
        source: str,
        metadata: dict[str, str] | None = None,
        output: str | None = None,
        errors: str | None = None,
        completion_window: str = "24h",
        extra: dict[str, str] | None = None,
    ) -> BatchJob | None:
        """Create the job record, or find the job to resume: None when its lines are to be
        enqueued (new or unfinished), else the ended job, returned as it is.

        Raises:
            ConfigurationError: a job with this id was submitted from another file.
        """
        # Every producer's jobs (the HTTP API's too) are tracked in CHATBATCH_MLFLOW_EXPERIMENT
        # unless they name an experiment.
        extra = {**tracking_fields(self.settings.mlflow_experiment), **(extra or {})}
        created = self.jobs.create(
            job_id,
            input_file=source,
            completion_window=completion_window,
            expires_in=window_seconds(completion_window),
            metadata=metadata,
            output_file=output,
            error_file=errors,
            extra=extra,
        )
        if created:
            if extra.get("mlflow_experiment"):
                # The workers' tracker makes and keeps its MLflow run (worker/service/tracking.py).
                self.redis.sadd(keys.TRACKED_JOBS, job_id)
            return None
        job = self.jobs.get(job_id)
        if job.input_file != source:
            raise ConfigurationError(
                f"job {job_id} was submitted from {job.input_file}, not {source}: resume it "
                "with the same file, or submit without --job-id for a new job"
            )
        if job.status.is_final or job.status == JobStatus.finalizing:
            logger.info("job %s already %s: nothing to enqueue", job_id, job.status.value)
            return job
        logger.info("resuming job %s", job_id)
        return None

    def submit_stream(
        self,
        stream: IO[bytes],
        *,
        source: str,
        job_id: str,
        metadata: dict[str, str] | None = None,
        output: str | None = None,
        errors: str | None = None,
        completion_window: str = "24h",
        extra: dict[str, str] | None = None,
        lines: int | None = None,
        stop: threading.Event | None = None,
    ) -> JobHandle:
        """Enqueue batch lines from an open binary stream (what `submit_file` does once the
        file is open and within its limits); `source` is recorded as the job's input file,
        `lines`, when known, sizes the chunks, and `stop` interrupts (see `Enqueuer`)."""
        ended = self.create_job(
            job_id, source=source, metadata=metadata, output=output, errors=errors,
            completion_window=completion_window, extra=extra,
        )
        if ended is None:
            self.enqueue(stream, job_id=job_id, lines=lines, stop=stop)
        return JobHandle(job_id, self)

    def enqueue(
        self,
        stream: IO[bytes],
        *,
        job_id: str,
        lines: int | None = None,
        stop: threading.Event | None = None,
        holder: str | None = None,
    ) -> str | None:
        """Enqueue the lines of an existing job's input; returns the job's status after it.
        `holder` names the enqueuer's lease (one taken to resume the job).

        Raises:
            producer.enqueue.Interrupted: `stop` was set before the end.
        """
        enqueuer = Enqueuer(
            self.settings, self.jobs, self.dispatcher, self.celery.send_task, self.queue_for,
            job_id=job_id, share=self.share(job_id), per_chunk=self.settings.chunk_size or chunk_lines(lines), stop=stop,
            holder=holder,
        )
        status = enqueuer.run(stream)
        logger.info("job %s: %d lines enqueued (%s)", job_id, enqueuer.total, status)
        return status

    def share(self, job_id: str) -> Share:
        """The job's priority, owner and the owner's weight (CHATBATCH_OWNER_WEIGHTS)."""
        priority, owner = (maybe_text(value) for value in self.redis.hmget(keys.job(job_id), ["priority", "owner"]))
        owner = owner or DEFAULT_OWNER
        return Share(priority=priority or DEFAULT_PRIORITY, owner=owner, weight=self._weights.get(owner, 1.0))

    def cancel(self, job_id: str) -> BatchJob:
        """Cancel a job: no new line starts; unanswered lines become `cancelled` error lines.
        A batch already running on a worker finishes, and its answers are kept.

        Raises:
            JobNotFoundError: no such job.
        """
        return self.jobs.cancel(job_id)

    def status(self, job_id: str) -> BatchJob:
        """The job record (reading never changes it).

        Raises:
            JobNotFoundError: no such job.
        """
        return self.jobs.get(job_id)
