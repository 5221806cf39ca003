"""Error codes of chatbatch's error lines and error records (OpenAI-style `error.code`)."""

from __future__ import annotations

from enum import Enum


class ErrorCode(str, Enum):
    """Every code an error line or a failed request can carry."""

    invalid_json = "invalid_json"
    invalid_request = "invalid_request"
    unsupported_parameter = "unsupported_parameter"
    duplicate_custom_id = "duplicate_custom_id"
    invalid_url = "invalid_url"
    context_length_exceeded = "context_length_exceeded"
    model_not_found = "model_not_found"
    line_too_large = "line_too_large"
    internal_error = "internal_error"
    cancelled = "cancelled"
    expired = "expired"


#: HTTP-style status code that goes with each error code in a batch error line's `response`.
STATUS_CODES: dict[ErrorCode, int] = {
    ErrorCode.invalid_json: 400,
    ErrorCode.invalid_request: 400,
    ErrorCode.unsupported_parameter: 400,
    ErrorCode.duplicate_custom_id: 400,
    ErrorCode.invalid_url: 400,
    ErrorCode.context_length_exceeded: 400,
    ErrorCode.model_not_found: 404,
    ErrorCode.line_too_large: 413,
    ErrorCode.internal_error: 500,
    ErrorCode.cancelled: 499,
    ErrorCode.expired: 408,
}


class RequestError(Exception):
    """A problem with one request: becomes that request's error record, never the batch's."""

    def __init__(self, code: ErrorCode, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message
        self.param = param

    def to_dict(self) -> dict[str, str | None]:
        return {"code": self.code.value, "message": self.message, "param": self.param}

    def __repr__(self) -> str:
        return f"RequestError({self.code.value!r}, {self.message!r})"
