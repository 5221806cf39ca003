"""The job record: the OpenAI Batch object."""

from __future__ import annotations

from enum import Enum
from typing import Literal

from pydantic import BaseModel


class JobStatus(str, Enum):
    """Lifecycle of a batch job, as in the OpenAI Batch API."""

    validating = "validating"
    in_progress = "in_progress"
    finalizing = "finalizing"
    completed = "completed"
    failed = "failed"
    cancelling = "cancelling"
    cancelled = "cancelled"
    # chatbatch's own, as `cancelling` is to `cancelled`: past its completion window, its
    # unanswered lines being closed.
    expiring = "expiring"
    expired = "expired"

    @property
    def is_final(self) -> bool:
        return self in (JobStatus.completed, JobStatus.failed, JobStatus.cancelled, JobStatus.expired)


class RequestCounts(BaseModel):
    """How many lines the job has, and how many ended as results and as errors."""

    total: int = 0
    completed: int = 0
    failed: int = 0


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class BatchUsage(BaseModel):
    """The job's tokens, as OpenAI's Batch object has them: each line's usage summed once, as
    lines finish (error lines count none)."""

    input_tokens: int = 0
    input_tokens_details: InputTokensDetails = InputTokensDetails()
    output_tokens: int = 0
    output_tokens_details: OutputTokensDetails = OutputTokensDetails()
    total_tokens: int = 0


class JobError(BaseModel):
    """A problem with the job as a whole (not one line)."""

    code: str
    message: str
    line: int | None = None
    param: str | None = None


class JobErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobError] = []


class CallbackState(BaseModel):
    """Delivery of the callback a job or request named (chatbatch's own field, not OpenAI's)."""

    url: str
    status: Literal["pending", "delivered", "failed"] = "pending"
    attempts: int = 0
    last_error: str | None = None
    delivered_at: int | None = None


class BatchJob(BaseModel):
    """The OpenAI Batch object, as `chatbatch status` prints it."""

    id: str
    object: Literal["batch"] = "batch"
    endpoint: str = "/v1/chat/completions"
    errors: JobErrors | None = None
    input_file: str
    completion_window: str = "24h"
    status: JobStatus
    output_file: str | None = None
    error_file: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts
    metadata: dict[str, str] | None = None
    #: The model that answered the job's lines (the first, if its lines name several).
    model: str | None = None
    usage: BatchUsage = BatchUsage()
    #: chatbatch's own: the job's turn between jobs (docs/scheduling.md).
    priority: Literal["high", "normal", "low"] = "normal"

    # Not in chatbatch's core contract: jobs created through the HTTP API also carry OpenAI's
    # file ids, and the state of their callback.
    input_file_id: str | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    callback: CallbackState | None = None
