"""Every error the HTTP API answers has OpenAI's body,
`{"error": {"message", "type", "param", "code"}}`, with the matching status: chatbatch's own
errors, invalid bodies, unparseable JSON, unknown routes and methods, and unexpected failures."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from chatbatch.exceptions import ChatbatchError, IdempotencyConflictError, InputTooLargeError
from chatbatch.ids import new_id
from schemas.errors import STATUS_CODES, RequestError

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answered as OpenAI does: status, message, type, code and param."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param
        self.headers = headers


def error_response(
    status: int, message: str, kind: str, code: str | None = None, param: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(status_code=status, content=body, headers=headers)


def not_found(what: str, object_id: str) -> ApiError:
    return ApiError(404, f"No {what} found with id '{object_id}'.", code="not_found")


def from_request_error(error: RequestError) -> ApiError:
    status = STATUS_CODES[error.code]
    return ApiError(status, error.message, kind="invalid_request_error" if status < 500 else "server_error", code=error.code.value, param=error.param)


def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    if error.status_code == 404:
        return error_response(404, f"Invalid URL ({request.method} {request.url.path}): no such route", "invalid_request_error", "not_found")
    if error.status_code == 405:
        return error_response(405, f"Method {request.method} is not allowed on {request.url.path}", "invalid_request_error", "method_not_allowed")
    if error.status_code == 413:
        return error_response(413, str(error.detail), "invalid_request_error", "request_too_large", headers={"Connection": "close"})
    if error.status_code == 400:
        message = f"the request body could not be parsed ({error.detail}): check its format and Content-Type"
        return error_response(400, message, "invalid_request_error", "invalid_request")
    kind = "server_error" if error.status_code >= 500 else "invalid_request_error"
    return error_response(error.status_code, str(error.detail), kind)


def _validation_error(error: RequestValidationError) -> JSONResponse:
    first = error.errors()[0]
    if first.get("type") == "json_invalid":
        message = f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')}): send one JSON object"
        return error_response(400, message, "invalid_request_error", "invalid_json")
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
    if first.get("type") == "extra_forbidden":
        return error_response(400, f"unknown field '{where}': remove it", "invalid_request_error", "invalid_request", where or None)
    if first.get("type") == "missing":
        return error_response(400, f"'{where}' is required", "invalid_request_error", "invalid_request", where or None)
    return error_response(400, f"'{where or 'body'}': {first.get('msg')}", "invalid_request_error", "invalid_request", where or None)


def install(app: FastAPI) -> None:
    """Answer every error with OpenAI's error body."""

    @app.exception_handler(ApiError)
    async def _api(_: Request, error: ApiError) -> JSONResponse:
        return error_response(error.status, error.message, error.kind, error.code, error.param, error.headers)

    @app.exception_handler(RequestError)
    async def _request(_: Request, error: RequestError) -> JSONResponse:
        mapped = from_request_error(error)
        return error_response(mapped.status, mapped.message, mapped.kind, mapped.code, mapped.param)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, error: RequestValidationError) -> JSONResponse:
        return _validation_error(error)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, error: HTTPException) -> JSONResponse:
        return _http_error(request, error)

    @app.exception_handler(ChatbatchError)
    async def _chatbatch(_: Request, error: ChatbatchError) -> JSONResponse:
        if isinstance(error, IdempotencyConflictError):
            return error_response(422, str(error), "invalid_request_error", "idempotency_key_reused", "Idempotency-Key")
        status = 413 if isinstance(error, InputTooLargeError) else 400
        return error_response(status, str(error), "invalid_request_error", "invalid_request")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        # Answered outside the app's middleware (Starlette's last resort): it names itself here.
        request_id = new_id("req_")
        logger.exception("%s %s failed (x-request-id %s)", request.method, request.url.path, request_id)
        return error_response(500, f"the server failed: {type(error).__name__}", "server_error", "internal_error", headers={"x-request-id": request_id})
