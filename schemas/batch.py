"""Lines of OpenAI Batch API files: the input line, the output line and the error line."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from schemas.chat import ChatCompletionRequest, describe_validation_error, parse_chat_request
from schemas.errors import STATUS_CODES, ErrorCode, RequestError

CHAT_COMPLETIONS_URL = "/v1/chat/completions"
#: OpenAI's limit for one input line; a larger line becomes a `line_too_large` error line.
DEFAULT_MAX_LINE_BYTES = 1_000_000
#: The deepest JSON nesting a line may have (guards the parser against hostile input).
MAX_JSON_DEPTH = 64


class BatchRequestInput(BaseModel):
    """One input line: `{"custom_id", "method", "url", "body"}`."""

    model_config = ConfigDict(extra="forbid")

    # The caller's id for this line; unique within the file.
    custom_id: str
    # HTTP method; always POST.
    method: Literal["POST"]
    # The endpoint; chatbatch serves /v1/chat/completions.
    url: str
    # The request body of that endpoint.
    body: dict[str, Any]


class BatchResponse(BaseModel):
    """The `response` of an output line."""

    status_code: int
    request_id: str
    body: dict[str, Any]


class BatchError(BaseModel):
    """The `error` of an error line: the code, a message naming the fix, the input line number."""

    code: ErrorCode
    message: str
    line: int | None = None


class BatchRequestOutput(BaseModel):
    """One line of the output file or the error file."""

    id: str
    custom_id: str | None
    response: BatchResponse | None
    error: BatchError | None


class ParsedLine(BaseModel):
    """An input line that passed validation, with its 1-based line number."""

    line: int
    custom_id: str
    body: ChatCompletionRequest


class LineError(Exception):
    """An input line that failed validation; `custom_id` is kept when it could be read."""

    def __init__(self, line: int, error: RequestError, custom_id: str | None = None) -> None:
        super().__init__(f"line {line}: {error.message}")
        self.line = line
        self.error = error
        self.custom_id = custom_id


def _depth(text: str) -> int:
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def line_too_large(line: int, size: int, limit: int) -> LineError:
    """The error of a line over the size limit (the line itself need not be in memory)."""
    return LineError(
        line,
        RequestError(
            ErrorCode.line_too_large,
            f"line {line} is {size:,} bytes, over the limit of {limit:,}: shorten it or raise "
            "CHATBATCH_MAX_LINE_BYTES",
        ),
    )


def parse_batch_line(raw: bytes, line: int, *, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> ParsedLine:
    """Validate one JSONL input line.

    Raises:
        LineError: naming the line number, with the error code and a message with the fix.
    """
    if len(raw) > max_line_bytes:
        raise line_too_large(line, len(raw), max_line_bytes)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise LineError(
            line,
            RequestError(
                ErrorCode.invalid_json,
                f"line {line} is not valid UTF-8 (byte {error.start}): save the file as UTF-8",
            ),
        ) from None
    # Count brackets first (fast, in C); walk the text only when it could nest too deep.
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and _depth(text) > MAX_JSON_DEPTH:
        raise LineError(
            line,
            RequestError(
                ErrorCode.invalid_json,
                f"line {line} nests JSON deeper than {MAX_JSON_DEPTH} levels: flatten it",
            ),
        )
    try:
        data = json.loads(text)
    except ValueError as error:
        raise LineError(
            line,
            RequestError(
                ErrorCode.invalid_json,
                f"line {line} is not valid JSON ({error}): write one JSON object per line",
            ),
        ) from None
    if not isinstance(data, dict):
        raise LineError(
            line,
            RequestError(
                ErrorCode.invalid_request,
                f"line {line} must be a JSON object with custom_id, method, url and body",
            ),
        )
    custom_id = data.get("custom_id") if isinstance(data.get("custom_id"), str) else None
    try:
        item = BatchRequestInput.model_validate(data)
    except ValidationError as error:
        raise LineError(line, _line_problem(describe_validation_error(error), line), custom_id) from None
    if item.url != CHAT_COMPLETIONS_URL:
        raise LineError(
            line,
            RequestError(
                ErrorCode.invalid_url,
                f"line {line}: url {item.url!r} is not served; use {CHAT_COMPLETIONS_URL!r}",
                param="url",
            ),
            custom_id,
        )
    try:
        body = parse_chat_request(item.body, prefix="body.")
    except RequestError as error:
        raise LineError(line, _line_problem(error, line), custom_id) from None
    return ParsedLine(line=line, custom_id=item.custom_id, body=body)


def _line_problem(error: RequestError, line: int) -> RequestError:
    return RequestError(error.code, f"line {line}: {error.message}", param=error.param)


def error_line(
    *,
    line_id: str,
    custom_id: str | None,
    code: ErrorCode,
    message: str,
    line: int | None,
    request_id: str | None = None,
) -> BatchRequestOutput:
    """An error-file line; 4xx/5xx errors also carry a `response` with the status code."""
    status = STATUS_CODES[ErrorCode(code)]
    error = BatchError(code=code, message=message, line=line)
    response = None
    if request_id is not None:
        response = BatchResponse(
            status_code=status,
            request_id=request_id,
            body={"error": {"code": ErrorCode(code).value, "message": message, "type": "invalid_request_error" if status < 500 else "server_error"}},
        )
    return BatchRequestOutput(id=line_id, custom_id=custom_id, response=response, error=error)
