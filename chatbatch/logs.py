"""Logging for every chatbatch process (worker, gateway, CLI): one handler on the root logger,
in readable text or one JSON object per line (`CHATBATCH_LOG_FORMAT`), with secrets redacted
in both.

Lines name the request, job and chunk they concern when the code that logs runs inside
`log_context(...)` (the worker's tasks, the gateway's request handlers): the ids live in
context variables, so threads of the engine or of sweeps that serve many requests log none.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:
    from chatbatch.settings import Settings

#: What a secret is replaced by.
MASK = "***"
#: The ids a line may carry, in the order they are shown.
CONTEXT_FIELDS = ("request_id", "job_id", "chunk")
_CONTEXT: dict[str, ContextVar[str | None]] = {name: ContextVar(f"chatbatch_{name}", default=None) for name in CONTEXT_FIELDS}
#: Libraries whose INFO lines say nothing an operator needs.
_NOISY = ("mlflow", "transformers", "urllib3", "botocore", "httpx", "httpcore")

# The password of a URL's user info: scheme://user:PASSWORD@host (redis, rediss, http, ...).
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^:/@\s]*:)(?P<secret>[^@/\s]+)(?=@)")
# The query of a URL; a presigned one (S3, or any signed with AWS-style parameters) is masked whole.
_URL_QUERY = re.compile(r"(?P<head>\bhttps?://[^\s?#\"'<>]+\?)(?P<query>[^\s#\"'<>]+)")
_SIGNED_QUERY = re.compile(r"(?i)signature|x-amz-|awsaccesskeyid|security-token")
# Signing parameters seen outside a whole URL (a query string alone, a header dump).
_SIGNING_PARAMETER = re.compile(
    r"(?i)(?P<head>\b(?:X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|Signature|AWSAccessKeyId)=)(?P<secret>[^&\s\"'<>]+)"
)


@contextmanager
def log_context(**ids: str | None) -> Iterator[None]:
    """Within the block, log lines of this thread (or task) carry these ids (`request_id`,
    `job_id`, `chunk`)."""
    tokens = [(_CONTEXT[name], _CONTEXT[name].set(value)) for name, value in ids.items()]
    try:
        yield
    finally:
        for variable, token in reversed(tokens):
            variable.reset(token)


def set_log_ids(**ids: str | None) -> None:
    """From now on in the current context, log lines carry these ids: for code that runs in a
    context of its own, such as an HTTP request's handler (uvicorn runs each request in its
    own task; a sync handler runs in a copy of it), where no block encloses the work."""
    for name, value in ids.items():
        _CONTEXT[name].set(value)


def context_ids() -> dict[str, str]:
    """The ids set by the enclosing `log_context` blocks."""
    return {name: value for name, variable in _CONTEXT.items() if (value := variable.get()) is not None}


def known_secrets(settings: Settings) -> list[str]:
    """The secret values in the settings: the Redis password (as written in the URL and
    decoded), the API keys and the callback secret."""
    found = [*settings.api_key_list, settings.callback_secret]
    try:
        password = urlsplit(settings.redis_url).password
    except ValueError:
        password = None
    if password:
        found += [password, unquote(password)]
    return [value for value in found if value]


class Redactor:
    """Replaces secrets in text by `***`: the given values, URL passwords and presigned
    queries."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        # Longest first, so that a secret containing another is masked whole.
        values = sorted({value for value in secrets if value}, key=len, reverse=True)
        self._values = re.compile("|".join(re.escape(value) for value in values)) if values else None

    def __call__(self, text: str) -> str:
        if self._values is not None:
            text = self._values.sub(MASK, text)
        text = _URL_PASSWORD.sub(lambda m: m["head"] + MASK, text)
        text = _URL_QUERY.sub(lambda m: m["head"] + MASK if _SIGNED_QUERY.search(m["query"]) else m[0], text)
        return _SIGNING_PARAMETER.sub(lambda m: m["head"] + MASK, text)


class RedactFilter(logging.Filter):
    """A handler filter: the record's message, traceback and stack are rendered once and
    redacted before any formatter sees them (the formatters use `exc_text` as given)."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redact = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        # A log call whose arguments do not fit its format must not raise into its caller (the
        # engine thread logs too): it is logged as its format and arguments.
        try:
            message = record.getMessage()
        except Exception:
            message = f"{record.msg!r} with arguments {record.args!r}"
        record.msg = self.redact(message)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        return True


class ContextFilter(logging.Filter):
    """Puts the ids of the enclosing `log_context` on the record."""

    def filter(self, record: logging.LogRecord) -> bool:
        ids = context_ids()
        for name in CONTEXT_FIELDS:
            if not hasattr(record, name):
                setattr(record, name, ids.get(name))
        return True


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message [request_id=... job_id=... chunk=...]`."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        line = super().formatMessage(record)
        ids = " ".join(f"{name}={value}" for name in CONTEXT_FIELDS if (value := getattr(record, name, None)))
        return f"{line} [{ids}]" if ids else line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: `time` (ISO 8601, UTC), `level`, `logger`, `message`, the ids
    known (`request_id`, `job_id`, `chunk`), `exc_info` and `stack_info` when present."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            if (value := getattr(record, name, None)) is not None:
                line[name] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exc_info"] = record.exc_text
        if record.stack_info:
            line["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """chatbatch's handler: known to `setup_logging`, which replaces it when called again."""


def setup_logging(settings: Settings, level: str | int = "INFO") -> logging.Handler:
    """Send every log record of the process (Celery's and uvicorn's too, which propagate to the
    root logger) to stderr in the configured format, with secrets redacted; Python warnings
    become log records as well. Called again, it replaces its handler.

    Returns:
        The handler installed on the root logger.
    """
    root = logging.getLogger()
    for old in [handler for handler in root.handlers if isinstance(handler, _Handler)]:
        root.removeHandler(old)
    handler = _Handler(sys.stderr)
    handler.addFilter(ContextFilter())
    handler.addFilter(RedactFilter(Redactor(known_secrets(settings))))
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else TextFormatter())
    root.addHandler(handler)
    numeric = level if isinstance(level, int) else logging.getLevelName(level.upper())
    root.setLevel(numeric if isinstance(numeric, int) else logging.INFO)
    for noisy in _NOISY:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    logging.captureWarnings(True)
    return handler
