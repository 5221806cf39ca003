"""Wire formats of chatbatch: pure pydantic models, importable without torch, Redis or Celery."""

from schemas.batch import (
    CHAT_COMPLETIONS_URL,
    BatchError,
    BatchRequestInput,
    BatchRequestOutput,
    BatchResponse,
    LineError,
    ParsedLine,
    error_line,
    parse_batch_line,
)
from schemas.chat import (
    ChatCompletion,
    ChatCompletionChoice,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatMessage,
    Usage,
    check_metadata,
    parse_chat_request,
)
from schemas.errors import ErrorCode, RequestError
from schemas.job import BatchJob, JobStatus, RequestCounts

__all__ = [
    "CHAT_COMPLETIONS_URL",
    "BatchError",
    "BatchJob",
    "BatchRequestInput",
    "BatchRequestOutput",
    "BatchResponse",
    "ChatCompletion",
    "ChatCompletionChoice",
    "ChatCompletionMessage",
    "ChatCompletionRequest",
    "ChatMessage",
    "ErrorCode",
    "JobStatus",
    "LineError",
    "ParsedLine",
    "RequestCounts",
    "RequestError",
    "Usage",
    "check_metadata",
    "error_line",
    "parse_batch_line",
    "parse_chat_request",
]
