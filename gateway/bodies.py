"""Request and response bodies of the HTTP API that are not chatbatch's wire formats (those are
in schemas/): OpenAI's list, model, file and batch-creation objects, and chatbatch's request
record."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from schemas.job import CallbackState


class ModelObject(BaseModel):
    """A model live workers serve."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "chatbatch"
    # chatbatch's own: the registered model versions its live workers loaded, as
    # models:/NAME/VERSION (docs/lineage.md); empty for models served from other URIs.
    model_versions: list[str] = []


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


class FileObject(BaseModel):
    """An uploaded file, or an ended batch's output or error file."""

    id: str
    object: Literal["file"] = "file"
    bytes: int | None
    created_at: int
    filename: str
    purpose: str
    status: str = "processed"
    # chatbatch's own: the lines of a batch's output or error file.
    lines: int | None = None


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool = False


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class BatchCreate(BaseModel):
    """The body of `POST /v1/batches`."""

    model_config = ConfigDict(extra="forbid")

    # The id of an uploaded file of batch lines (purpose "batch").
    input_file_id: str
    # The endpoint every line calls; chatbatch serves /v1/chat/completions.
    endpoint: str
    # How long the batch may take: "24h", or any duration such as "90m" or "3600s".
    completion_window: str = "24h"
    # Up to 16 key-value pairs kept with the batch.
    metadata: dict[str, str] | None = None
    # Accepted as OpenAI does; the output stays in Redis for CHATBATCH_JOB_TTL.
    output_expires_after: dict[str, Any] | None = None


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[dict[str, Any]]
    has_more: bool
    first_id: str | None
    last_id: str | None


class RequestRecord(BaseModel):
    """A single request submitted over HTTP (chatbatch's own object)."""

    id: str
    object: Literal["chat.completion.request"] = "chat.completion.request"
    created_at: int
    status: Literal["queued", "completed", "failed"]
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    callback: CallbackState | None = None
    # While queued: a sentence saying no live worker consumes the request's queue yet.
    waiting: str | None = None
