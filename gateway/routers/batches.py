"""`/v1/batches`: jobs, with the lifecycle of `chatbatch submit`.

Creating a batch records the job (`validating`) and answers at once, as OpenAI does; the
uploaded file's lines are enqueued in the background by a worker thread the app's lifespan
owns. A gateway that stops meanwhile leaves the job for another gateway to resume.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Header, Query

from chatbatch import egress
from chatbatch.callbacks import check_url, initial_fields
from chatbatch.dispatch import PRIORITIES, check_priority
from chatbatch.idempotency import BATCHES, body_digest
from chatbatch.ids import new_id
from chatbatch.jobs import batch_object
from chatbatch.logs import set_log_ids
from gateway.bodies import BatchCreate, BatchList
from gateway.errors import ApiError, not_found
from gateway.routers.chat import CALLBACK_HEADER, IDEMPOTENCY_HEADER
from gateway.state import Gateway, gateway, owner
from schemas.batch import CHAT_COMPLETIONS_URL
from schemas.chat import check_metadata
from schemas.job import BatchJob

router = APIRouter(prefix="/v1/batches", tags=["batches"])

#: The batch's priority (`high`, `normal`, `low`); `metadata.priority` says the same.
PRIORITY_HEADER = "X-Chatbatch-Priority"


def owned_job(state: Gateway, job_id: str, who: str) -> BatchJob:
    """The job, if `who` owns it; else 404, as if absent."""
    set_log_ids(job_id=job_id)
    if state.client.jobs.field(job_id, "owner") != who:
        raise not_found("batch", job_id)
    return state.client.jobs.get(job_id)


@router.post("", response_model=BatchJob)
def create_batch(
    body: BatchCreate,
    state: Gateway = Depends(gateway),
    who: str = Depends(owner),
    callback: str | None = Header(default=None, alias=CALLBACK_HEADER),
    priority: str | None = Header(default=None, alias=PRIORITY_HEADER),
    idempotency_key: str | None = Header(default=None, alias=IDEMPOTENCY_HEADER),
) -> dict[str, Any]:
    url = check_url(callback, state.settings.callback_secret, option=CALLBACK_HEADER)
    if url:
        egress.check(url, state.settings.allowed_callbacks, option=CALLBACK_HEADER)
    # The header, else `metadata.priority` when it names a priority (any other value there is
    # the caller's own metadata, kept as it is).
    named = (body.metadata or {}).get("priority")
    try:
        priority = check_priority(priority if priority is not None else named if named in PRIORITIES else None, option=PRIORITY_HEADER)
    except ValueError as error:
        raise ApiError(400, str(error), param="priority", code="invalid_request") from None
    if body.endpoint != CHAT_COMPLETIONS_URL:
        raise ApiError(400, f"'endpoint' must be '{CHAT_COMPLETIONS_URL}'", param="endpoint", code="invalid_url")
    if body.metadata is not None:
        try:
            check_metadata(body.metadata)
        except ValueError as error:
            raise ApiError(400, f"'metadata': {error}", param="metadata", code="invalid_request") from None
    record = state.files.get(body.input_file_id)
    if record is None or record["owner"] != who:
        raise not_found("file", body.input_file_id)
    job_id = new_id("batch_")
    if idempotency_key is not None:  # a repeat gets the batch its key's first call made
        digest = body_digest([body.model_dump(), url, priority])
        earlier = state.client.idempotency.first(
            BATCHES, who, idempotency_key, digest=digest, object_id=job_id, find=lambda found: _made(state, found)
        )
        if earlier is not None:
            return earlier
    set_log_ids(job_id=job_id)
    # The owner (the API key) is the unit of fair share between jobs (docs/scheduling.md).
    extra = {"owner": who, "input_file_id": body.input_file_id, "priority": priority}
    if url:
        extra.update(initial_fields(url))
    try:
        state.client.create_job(
            job_id, source=body.input_file_id, metadata=body.metadata or None, completion_window=body.completion_window, extra=extra,
        )
    except BaseException:
        if idempotency_key is not None:  # nothing was made: a retry with the key may make it
            state.client.idempotency.release(BATCHES, who, idempotency_key, job_id)
        raise
    holder = new_id(f"{state.name}-")
    state.client.jobs.hold_enqueuer(job_id, holder)
    state.enqueue_in_background(job_id, body.input_file_id, holder)
    return batch_object(state.client.jobs.get(job_id))


def _made(state: Gateway, job_id: str) -> dict[str, Any] | None:
    """The batch object of a job whose record exists, else None."""
    return batch_object(state.client.jobs.get(job_id)) if state.client.jobs.exists(job_id) else None


@router.get("/{job_id}", response_model=BatchJob)
def get_batch(job_id: str, state: Gateway = Depends(gateway), who: str = Depends(owner)) -> dict[str, Any]:
    return batch_object(owned_job(state, job_id, who))


@router.post("/{job_id}/cancel", response_model=BatchJob)
def cancel_batch(job_id: str, state: Gateway = Depends(gateway), who: str = Depends(owner)) -> dict[str, Any]:
    owned_job(state, job_id, who)
    return batch_object(state.client.cancel(job_id))


@router.get("", response_model=BatchList)
def list_batches(
    state: Gateway = Depends(gateway),
    who: str = Depends(owner),
    limit: int = Query(default=20, ge=1, le=100),
    after: str | None = None,
) -> BatchList:
    jobs, more = state.client.jobs.page(who, limit=limit, after=after)
    data = [batch_object(job) for job in jobs]
    return BatchList(data=data, has_more=more, first_id=data[0]["id"] if data else None, last_id=data[-1]["id"] if data else None)
