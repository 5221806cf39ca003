"""`chatbatch serve`: an OpenAI-compatible HTTP API in front of the queue.

Endpoints: `/v1/models`, `/v1/chat/completions` (waits, like OpenAI; or returns at once with
`X-Chatbatch-Async: true`), `/v1/chat/requests/{id}`, `/v1/files`, `/v1/batches`. Errors use
OpenAI's body, `{"error": {"message", "type", "param", "code"}}`, with the matching status.
Auth: bearer keys from CHATBATCH_API_KEYS; each key sees only its own files, batches and
requests (other keys' objects answer 404, as if absent).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast

from fastapi import Depends, FastAPI, File, Form, Header, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from chatbatch import keys
from chatbatch.exceptions import ChatbatchError, InputTooLargeError, RequestFailedError
from chatbatch.jobstore import callback_state
from chatbatch.redisconn import Fields, text
from chatbatch.settings import Settings, get_settings
from producer.callbacks import CallbackSender, batch_body
from producer.client import Client
from producer.files import FileStore
from schemas.chat import check_metadata
from schemas.errors import STATUS_CODES, ErrorCode, RequestError
from schemas.job import BatchJob

logger = logging.getLogger(__name__)

ASYNC_HEADER = "X-Chatbatch-Async"
CALLBACK_HEADER = "X-Chatbatch-Callback-Url"


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error", code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param


def _error_response(status: int, message: str, kind: str, code: str | None = None, param: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": param, "code": code}})


def _not_found(what: str, object_id: str) -> ApiError:
    return ApiError(404, f"No {what} found with id '{object_id}'.", kind="invalid_request_error", code="not_found")


def create_app(settings: Settings | None = None, *, callbacks: bool = True) -> FastAPI:
    """The HTTP API; `callbacks` starts the callback sender with the app."""
    settings = settings or get_settings()
    client = Client(settings)
    files = FileStore(client.redis, settings.files_path, max_bytes=settings.max_file_bytes)
    sender = CallbackSender(client.redis, settings, client.store) if callbacks else None
    api_keys = {key: hashlib.sha256(key.encode()).hexdigest()[:16] for key in settings.api_key_list}
    if not api_keys:
        logger.warning("CHATBATCH_API_KEYS is not set: the HTTP API accepts requests without a key")

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if sender is not None:
            sender.start()
        yield
        if sender is not None:
            sender.stop()

    app = FastAPI(title="chatbatch", version="0.1.0", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, error: ApiError) -> JSONResponse:
        return _error_response(error.status, error.message, error.kind, error.code, error.param)

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, error: RequestError) -> JSONResponse:
        status = STATUS_CODES[error.code]
        kind = "invalid_request_error" if status < 500 else "server_error"
        return _error_response(status, error.message, kind, error.code.value, error.param)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error_response(400, f"'{where}': {first.get('msg')}", "invalid_request_error", "invalid_request", where or None)

    @app.exception_handler(ChatbatchError)
    async def _chatbatch_error(_: Request, error: ChatbatchError) -> JSONResponse:
        status = 413 if isinstance(error, InputTooLargeError) else 400
        return _error_response(status, str(error), "invalid_request_error", "invalid_request")

    def owner(authorization: str | None = Header(default=None)) -> str:
        if not api_keys:
            return "public"
        token = (authorization or "").removeprefix("Bearer ").strip()
        if token not in api_keys:
            raise ApiError(401, "Incorrect API key provided.", kind="authentication_error", code="invalid_api_key")
        return api_keys[token]

    def callback_url(value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(("http://", "https://")):
            raise ApiError(400, f"{CALLBACK_HEADER} must be an http(s) URL", param=CALLBACK_HEADER)
        if not settings.callback_secret:
            raise ApiError(400, "callbacks need CHATBATCH_CALLBACK_SECRET set on the gateway to sign them", param=CALLBACK_HEADER)
        return value

    # Models.

    @app.get("/v1/models")
    def list_models(_: str = Depends(owner)) -> dict[str, Any]:
        live = client.models()
        now = int(time.time())
        return {"object": "list", "data": [{"id": name, "object": "model", "created": now, "owned_by": "chatbatch"} for name in sorted(live)]}

    # Chat completions.

    @app.post("/v1/chat/completions")
    def chat_completions(
        body: dict[str, Any],
        who: str = Depends(owner),
        asynchronous: str | None = Header(default=None, alias=ASYNC_HEADER),
        callback: str | None = Header(default=None, alias=CALLBACK_HEADER),
    ) -> Any:
        url = callback_url(callback)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        record: dict[str, Any] = {"id": request_id, "owner": who, "created_at": int(time.time())}
        if url:
            record.update(callback_url=url, callback_status="pending", callback_attempts=0)
        client.redis.hset(keys.request(request_id), mapping=cast(Fields, record))
        client.redis.expire(keys.request(request_id), settings.result_ttl)
        handle = client.submit(body, request_id=request_id)
        if asynchronous and asynchronous.lower() in ("1", "true", "yes"):
            return JSONResponse(status_code=202, content=_request_object(request_id))
        try:
            completion = handle.result(timeout=settings.gateway_timeout)
        except TimeoutError:
            raise ApiError(504, f"no answer within {settings.gateway_timeout:.0f}s; poll /v1/chat/requests/{request_id}", kind="server_error", code="timeout") from None
        except RequestFailedError as error:
            code = ErrorCode(error.code)
            raise ApiError(STATUS_CODES[code], error.message, code=code.value) from None
        return completion.model_dump()

    def _request_object(request_id: str) -> dict[str, Any]:
        raw = client.redis.hgetall(keys.request(request_id))
        data = {text(k): text(v) for k, v in raw.items()}
        result = client.redis.get(keys.result(request_id))
        record: dict[str, Any] = {"id": request_id, "object": "chat.completion.request", "created_at": int(data.get("created_at", 0))}
        if result is None:
            record.update(status="queued", result=None, error=None)
        else:
            parsed = json.loads(result)
            failed = "error" in parsed
            record.update(status="failed" if failed else "completed", result=None if failed else parsed, error=parsed.get("error"))
        state = callback_state(data)
        if state is not None:
            record["callback"] = state
        return record

    def _owned_request(request_id: str, who: str) -> None:
        if client.redis.hget(keys.request(request_id), "owner") != who.encode():
            raise _not_found("chat completion", request_id)

    @app.get("/v1/chat/requests/{request_id}")
    def get_request(request_id: str, who: str = Depends(owner)) -> dict[str, Any]:
        _owned_request(request_id, who)
        return _request_object(request_id)

    @app.get("/v1/chat/completions/{request_id}")
    def get_completion(request_id: str, who: str = Depends(owner)) -> Any:
        _owned_request(request_id, who)
        record = _request_object(request_id)
        if record["status"] == "queued":
            return JSONResponse(status_code=202, content=record)
        if record["status"] == "failed":
            error = record["error"]
            raise ApiError(STATUS_CODES[ErrorCode(error["code"])], error["message"], code=error["code"])
        return record["result"]

    # Files.

    def _owned_file(file_id: str, who: str) -> dict[str, Any]:
        if file_id.startswith("file-batch_"):
            job_id, _, kind = file_id.removeprefix("file-").rpartition("-")
            job = _owned_job(job_id, who)
            if kind not in ("output", "errors"):
                raise _not_found("file", file_id)
            count = job.request_counts.completed if kind == "output" else job.request_counts.failed
            return {"id": file_id, "object": "file", "bytes": None, "created_at": job.created_at,
                    "filename": f"{job_id}_{kind}.jsonl", "purpose": "batch_output", "status": "processed",
                    "lines": count, "_job": job_id, "_kind": kind}
        record = files.get(file_id)
        if record is None or record["owner"] != who:
            raise _not_found("file", file_id)
        return record

    def _public_file(record: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in record.items() if k not in ("owner", "_job", "_kind")}

    @app.post("/v1/files")
    def create_file(file: UploadFile = File(...), purpose: str = Form(...), who: str = Depends(owner)) -> dict[str, Any]:
        if purpose != "batch":
            raise ApiError(400, f"purpose '{purpose}' is not supported; use 'batch'", param="purpose")
        record = files.create(file.file, filename=file.filename or "upload.jsonl", purpose=purpose, owner=who)
        return _public_file(record)

    @app.get("/v1/files")
    def list_files(who: str = Depends(owner)) -> dict[str, Any]:
        return {"object": "list", "data": [_public_file(r) for r in files.list(who)], "has_more": False}

    @app.get("/v1/files/{file_id}")
    def get_file(file_id: str, who: str = Depends(owner)) -> dict[str, Any]:
        return _public_file(_owned_file(file_id, who))

    @app.get("/v1/files/{file_id}/content")
    def file_content(file_id: str, who: str = Depends(owner)) -> Response:
        record = _owned_file(file_id, who)
        if "_job" in record:
            wanted = "output" if record["_kind"] == "output" else "error"
            lines = [line for _, kind, line in client.store.iter_lines(record["_job"]) if kind == wanted]
            content = "".join(line + "\n" for line in lines).encode()
        else:
            content = files.path(file_id).read_bytes()
        return Response(content=content, media_type="application/jsonl")

    @app.delete("/v1/files/{file_id}")
    def delete_file(file_id: str, who: str = Depends(owner)) -> dict[str, Any]:
        record = _owned_file(file_id, who)
        if "_job" in record:
            raise ApiError(400, "batch output files are deleted with their batch's records", param="file_id")
        files.delete(file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    # Batches.

    def _owned_job(job_id: str, who: str) -> BatchJob:
        if client.store.field(job_id, "owner") != who:
            raise _not_found("batch", job_id)
        return client.refresh(job_id)

    def _batch(job: BatchJob) -> dict[str, Any]:
        body = batch_body(job)
        if job.status.is_final:
            body["output_file_id"] = f"file-{job.id}-output"
            body["error_file_id"] = f"file-{job.id}-errors"
        return body

    @app.post("/v1/batches")
    def create_batch(
        body: dict[str, Any],
        who: str = Depends(owner),
        callback: str | None = Header(default=None, alias=CALLBACK_HEADER),
    ) -> dict[str, Any]:
        url = callback_url(callback)
        allowed = {"input_file_id", "endpoint", "completion_window", "metadata", "output_expires_after"}
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise ApiError(400, f"unknown field '{unknown[0]}'", param=unknown[0], code="invalid_request")
        file_id = body.get("input_file_id")
        if not isinstance(file_id, str):
            raise ApiError(400, "'input_file_id' is required", param="input_file_id", code="invalid_request")
        if body.get("endpoint") != "/v1/chat/completions":
            raise ApiError(400, "'endpoint' must be '/v1/chat/completions'", param="endpoint", code="invalid_url")
        metadata = body.get("metadata") or None
        if metadata is not None:
            try:
                if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
                    raise ValueError("metadata must map strings to strings")
                check_metadata(metadata)
            except ValueError as error:
                raise ApiError(400, f"'metadata': {error}", param="metadata", code="invalid_request") from None
        record = _owned_file(file_id, who)
        if "_job" in record:
            raise ApiError(400, "a batch's output file cannot be the input of another batch", param="input_file_id")
        job_id = f"batch_{uuid.uuid4().hex}"
        extra = {"owner": who, "input_file_id": file_id}
        if url:
            extra.update(callback_url=url, callback_status="pending", callback_attempts="0")
        failure: list[BaseException] = []

        def enqueue() -> None:
            try:
                with files.path(file_id).open("rb") as stream:
                    client.submit_stream(
                        stream, source=file_id, job_id=job_id, metadata=metadata,
                        completion_window=str(body.get("completion_window") or "24h"), extra=extra,
                    )
            except BaseException as error:  # reported below or logged; the job record says failed
                failure.append(error)
                logger.exception("batch %s: enqueueing failed", job_id)

        # Large files are validated and enqueued in the background; the batch is returned as
        # soon as its record exists (status "validating"), as OpenAI does.
        worker = threading.Thread(target=enqueue, name=f"enqueue-{job_id}", daemon=True)
        worker.start()
        deadline = time.monotonic() + 10
        while not client.store.exists(job_id):
            if failure:
                raise failure[0]
            if time.monotonic() > deadline or not worker.is_alive() and not client.store.exists(job_id):
                raise ApiError(500, "the batch could not be created", kind="server_error", code="internal_error")
            time.sleep(0.01)
        return _batch(client.store.get(job_id))

    @app.get("/v1/batches/{job_id}")
    def get_batch(job_id: str, who: str = Depends(owner)) -> dict[str, Any]:
        return _batch(_owned_job(job_id, who))

    @app.post("/v1/batches/{job_id}/cancel")
    def cancel_batch(job_id: str, who: str = Depends(owner)) -> dict[str, Any]:
        _owned_job(job_id, who)
        return _batch(client.cancel(job_id))

    @app.get("/v1/batches")
    def list_batches(who: str = Depends(owner), limit: int = 20, after: str | None = None) -> dict[str, Any]:
        limit = max(1, min(limit, 100))
        data: list[dict[str, Any]] = []
        passed = after is None
        more = False
        for raw in client.redis.zrevrange(keys.JOBS, 0, -1):
            job_id = text(raw)
            if not passed:
                passed = job_id == after
                continue
            if client.store.field(job_id, "owner") != who:
                continue
            if len(data) == limit:
                more = True
                break
            data.append(_batch(client.store.get(job_id)))
        return {
            "object": "list", "data": data, "has_more": more,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None,
        }

    return app


def serve(settings: Settings, host: str, port: int) -> None:
    import uvicorn

    uvicorn.run(create_app(settings), host=host, port=port, log_level="warning")
