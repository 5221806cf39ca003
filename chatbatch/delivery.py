"""Ending jobs: writing their output and error files, cancelling and expiring them.

Shared by the producer and the worker: whichever side answers a job's last line ends the job.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from chatbatch.ids import new_id
from chatbatch.jobstore import DELIVER, JobStore
from chatbatch.storage import OutputFile, StorageError, is_remote
from schemas.batch import error_line
from schemas.errors import ErrorCode
from schemas.job import JobError, JobStatus

logger = logging.getLogger(__name__)


def write_job_files(
    store: JobStore, job_id: str, output: str | None, errors: str | None, *, client: Any = None
) -> tuple[int, int]:
    """Write a job's output and error lines, in input order, to local files or S3 objects.

    Each file appears complete or not at all.

    Returns:
        (output lines, error lines) of the job.

    Raises:
        StorageError: an upload failed after boto3's retries.
    """
    if not output and not errors:
        # Nothing to write (the lines stay in Redis): the counts come from the job record, and
        # the lines are not read back.
        recorded = store.get(job_id).request_counts
        return recorded.completed, recorded.failed
    files: dict[str, OutputFile] = {}
    counts = {"output": 0, "error": 0}
    try:
        for kind, dest in (("output", output), ("error", errors)):
            if dest:
                files[kind] = OutputFile(dest, client=client)
        for _, kind, line in store.iter_lines(job_id):
            counts[kind] += 1
            if kind in files:
                files[kind].write_line(line)
        for file in files.values():
            file.commit()
    finally:
        for file in files.values():
            file.discard()
    return counts["output"], counts["error"]


def finish(store: JobStore, job_id: str) -> str | None:
    """End the job if its last line is answered; the caller that ends it uploads its files.

    Uploads are retried with backoff for up to `store.upload_retry_seconds` (boto3 retries
    each try too); then the job fails with an error that names the destination and the cause.
    """
    retry_seconds = store.upload_retry_seconds
    outcome = store.maybe_finalize(job_id)
    if outcome != DELIVER:
        return outcome
    job = store.get(job_id)
    remote = [dest if is_remote(dest) else None for dest in (job.output_file, job.error_file)]
    deadline = time.monotonic() + retry_seconds
    pause = 1.0
    while True:
        try:
            written = write_job_files(store, job_id, remote[0], remote[1])
            break
        except StorageError as error:
            if not error.transient or time.monotonic() + pause > deadline:
                logger.error("job %s: %s; giving up", job_id, error)
                message = f"{error}; gave up after retrying for {retry_seconds:.0f}s" if error.transient else str(error)
                return store.end(job_id, JobError(code="output_upload_failed", message=message)).value
            logger.warning("job %s: %s; retrying in %.0fs", job_id, error, pause)
            time.sleep(pause)
            pause = min(pause * 2, 10.0)
    status = store.end(job_id)
    logger.info("job %s %s: %d output and %d error lines", job_id, status.value, *written)
    return status.value


#: Why lines of a job that will not run get their error lines: (code, message).
CANCELLED = (ErrorCode.cancelled, "the job was cancelled before this line ran")
EXPIRED = (ErrorCode.expired, "the job's completion window ended before this line ran")


def stop_reason(store: JobStore, job_id: str) -> tuple[ErrorCode, str] | None:
    """CANCELLED or EXPIRED when the job's lines should no longer run (expiring it if its
    completion window has just passed), else None."""
    status, expires_at, expiring = store.stop_state(job_id)
    if status in (JobStatus.cancelling, JobStatus.cancelled):
        return CANCELLED
    if expiring:
        return EXPIRED
    due = status is not None and not status.is_final and expires_at is not None and expires_at <= time.time()
    if due and (expire_if_due(store, job_id) or store.is_expiring(job_id)):
        return EXPIRED
    return None


def close_unanswered(store: JobStore, job_id: str, reason: tuple[ErrorCode, str]) -> int:
    """Give every enqueued line without an answer an error line; returns how many."""
    code, message = reason
    inputs = store.inputs(job_id)
    numbers = sorted(inputs)
    closed = 0
    for start in range(0, len(numbers), 1000):
        batch = numbers[start : start + 1000]
        for number, done in zip(batch, store.recorded(job_id, batch)):
            if done:
                continue
            line = error_line(
                line_id=new_id("batch_req_"),
                custom_id=inputs[number],
                code=code,
                message=message,
                line=number,
            )
            closed += store.record_line(job_id, number, "error", line.model_dump())
    return closed


def expire_if_due(store: JobStore, job_id: str) -> bool:
    """Expire a job past its completion window: unanswered lines get `expired` error lines,
    answered ones are kept and delivered."""
    if not store.mark_expiring(job_id):
        return False
    closed = close_unanswered(store, job_id, EXPIRED)
    logger.info("job %s expired: %d lines closed", job_id, closed)
    finish(store, job_id)
    return True
