"""`/v1/files`: uploaded batch input files, and the output and error files of ended batches
(`file-<batch id>-output`, `file-<batch id>-errors`). Content is streamed, never built whole in
memory."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import FileResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from chatbatch.idempotency import FILES, body_digest
from chatbatch.jobs import error_file_id, output_file_id
from gateway import uploads
from gateway.bodies import FileDeleted, FileList, FileObject
from gateway.errors import ApiError, not_found
from gateway.routers.batches import owned_job
from gateway.routers.chat import IDEMPOTENCY_HEADER
from gateway.state import Gateway, gateway, owner

router = APIRouter(prefix="/v1/files", tags=["files"])

_KINDS = {"output": "output", "errors": "error"}


def _batch_file(state: Gateway, file_id: str, who: str) -> tuple[str, str, FileObject] | None:
    """(job id, line kind, file object) of an ended batch's output or error file; None for an
    uploaded file's id."""
    if not file_id.startswith("file-batch_"):
        return None
    job_id, _, suffix = file_id.removeprefix("file-").rpartition("-")
    if suffix not in _KINDS:
        raise not_found("file", file_id)
    job = owned_job(state, job_id, who)
    if file_id not in (output_file_id(job.id), error_file_id(job.id)) or not job.status.is_final:
        raise not_found("file", file_id)
    kind = _KINDS[suffix]
    count = job.request_counts.completed if kind == "output" else job.request_counts.failed
    found = FileObject(
        id=file_id, bytes=None, created_at=job.created_at, filename=f"{job_id}_{suffix}.jsonl",
        purpose="batch_output", lines=count,
    )
    return job_id, kind, found


def owned_file(state: Gateway, file_id: str, who: str) -> dict[str, Any]:
    record = state.files.get(file_id)
    if record is None or record["owner"] != who:
        raise not_found("file", file_id)
    return record


def _public(record: dict[str, Any]) -> FileObject:
    return FileObject.model_validate({k: v for k, v in record.items() if k != "owner"})


#: The body `create_file` reads itself (gateway/uploads.py), described for /openapi.json.
_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "purpose"],
                    "properties": {"file": {"type": "string", "format": "binary"}, "purpose": {"type": "string", "enum": ["batch"]}},
                }
            }
        },
    }
}


@router.post("", response_model=FileObject, openapi_extra=_UPLOAD_BODY)
async def create_file(
    request: Request,
    state: Gateway = Depends(gateway),
    who: str = Depends(owner),
    idempotency_key: str | None = Header(default=None, alias=IDEMPOTENCY_HEADER),
) -> FileObject:
    # The body is parsed as it streams in, the file counted against CHATBATCH_MAX_FILE_BYTES
    # before each block is written (FastAPI's UploadFile would spool it whole first).
    upload, fields = await uploads.receive(request, state.files)
    purpose = fields.get("purpose")
    if purpose != "batch":
        upload.discard()
        if purpose is None:
            raise ApiError(400, "'purpose' is required: send purpose=batch", param="purpose", code="invalid_request")
        raise ApiError(400, f"purpose '{purpose[:40]}' is not supported; use 'batch'", param="purpose", code="invalid_request")
    record = await run_in_threadpool(upload.keep, purpose=purpose, owner=who)
    if idempotency_key is not None:
        return await run_in_threadpool(_once, state, who, idempotency_key, record)
    return _public(record)


def _once(state: Gateway, who: str, key: str, record: dict[str, Any]) -> FileObject:
    """The file an idempotency key's first upload made (this upload, stored a second time, is
    dropped), or this one when the key is new. The upload's content is part of its intent."""
    digest = body_digest([record["purpose"], record["filename"], _sha256(state.files.path(record["id"]))])
    try:
        earlier = state.client.idempotency.first(
            FILES, who, key, digest=digest, object_id=record["id"], find=state.files.get
        )
    except Exception:
        state.files.delete(record["id"])
        raise
    if earlier is None:
        return _public(record)
    state.files.delete(record["id"])
    return _public(earlier)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stored:
        while block := stored.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


@router.get("", response_model=FileList)
def list_files(state: Gateway = Depends(gateway), who: str = Depends(owner)) -> FileList:
    return FileList(data=[_public(record) for record in state.files.list(who)])


@router.get("/{file_id}", response_model=FileObject)
def get_file(file_id: str, state: Gateway = Depends(gateway), who: str = Depends(owner)) -> FileObject:
    batch = _batch_file(state, file_id, who)
    return batch[2] if batch else _public(owned_file(state, file_id, who))


@router.get("/{file_id}/content")
def file_content(file_id: str, state: Gateway = Depends(gateway), who: str = Depends(owner)) -> Response:
    batch = _batch_file(state, file_id, who)
    if batch is None:
        owned_file(state, file_id, who)
        return FileResponse(state.files.path(file_id), media_type="application/jsonl")
    job_id, kind, _ = batch

    def lines() -> Iterator[bytes]:
        for _, _, line in state.client.jobs.iter_lines(job_id, kind):
            yield line.encode() + b"\n"

    return StreamingResponse(lines(), media_type="application/jsonl")


@router.delete("/{file_id}", response_model=FileDeleted)
def delete_file(file_id: str, state: Gateway = Depends(gateway), who: str = Depends(owner)) -> FileDeleted:
    if _batch_file(state, file_id, who) is not None:
        raise ApiError(400, "batch output files are deleted with their batch's records", param="file_id", code="invalid_request")
    owned_file(state, file_id, who)
    state.files.delete(file_id)
    return FileDeleted(id=file_id)
