"""OpenAI chat completion request and response bodies (`POST /v1/chat/completions`)."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from schemas.errors import ErrorCode, RequestError

#: Upper bounds that keep one request from occupying a worker; documented in docs/formats.md.
MAX_N = 16
MAX_MESSAGES = 2048
MAX_STOP = 4

# Known OpenAI request fields that the engine cannot honour. Each maps to the value that means
# "not used": a request that sends exactly that value is accepted, anything else is rejected
# with `unsupported_parameter` rather than silently ignored.
UNSUPPORTED_FIELDS: dict[str, Any] = {
    "stream": False,
    "stream_options": None,
    "tools": None,
    "tool_choice": None,
    "parallel_tool_calls": None,
    "functions": None,
    "function_call": None,
    "logprobs": False,
    "top_logprobs": None,
    "response_format": None,
    "logit_bias": None,
    "frequency_penalty": 0,
    "presence_penalty": 0,
    "modalities": None,
    "audio": None,
    "prediction": None,
    "reasoning_effort": None,
    "web_search_options": None,
    "service_tier": None,
    "store": None,
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextContentPart(_Strict):
    """One part of a multi-part message content; only text parts are supported."""

    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    """One message of the conversation."""

    # Who wrote the message: system, user or assistant.
    role: Literal["system", "user", "assistant"]
    # The text, or a list of text parts that are joined in order.
    content: str | list[TextContentPart]
    # Optional participant name; passed to nothing, kept for compatibility.
    name: str | None = None

    def text(self) -> str:
        """The message content as one string."""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Strict):
    """The body of an OpenAI chat completion request, as far as chatbatch honours it."""

    # ID of the model to use; omitted means "whichever model serves the default queue".
    model: str | None = None
    # The conversation so far.
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    # Maximum number of tokens to generate (legacy name).
    max_tokens: int | None = Field(default=None, ge=1)
    # Maximum number of tokens to generate (current name; same meaning as max_tokens).
    max_completion_tokens: int | None = Field(default=None, ge=1)
    # Sampling temperature, 0 to 2; 0 means greedy decoding.
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    # Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p.
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    # How many choices to generate.
    n: int = Field(default=1, ge=1, le=MAX_N)
    # Up to 4 sequences where generation stops; the stop sequence is not returned.
    stop: str | list[str] | None = None
    # Makes sampling reproducible: the same seed and request give the same answer.
    seed: int | None = None
    # End-user identifier, for the caller's own bookkeeping.
    user: str | None = None
    # Key-value pairs kept with the request (up to 16; keys 64, values 512 characters).
    metadata: dict[str, str] | None = None

    @field_validator("temperature", "top_p")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> str | list[str] | None:
        items = [value] if isinstance(value, str) else (value or [])
        if len(items) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are allowed, got {len(items)}")
        if any(item == "" for item in items):
            raise ValueError("stop sequences must not be empty strings")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata_limits(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None:
            check_metadata(value)
        return value

    @model_validator(mode="after")
    def _one_max_tokens(self) -> ChatCompletionRequest:
        if (
            self.max_tokens is not None
            and self.max_completion_tokens is not None
            and self.max_tokens != self.max_completion_tokens
        ):
            raise ValueError(
                "max_tokens and max_completion_tokens disagree; send only one of them"
            )
        return self

    @property
    def max_new_tokens(self) -> int | None:
        """The requested generation limit under either of its names."""
        return self.max_completion_tokens or self.max_tokens

    @property
    def stop_sequences(self) -> list[str]:
        """`stop` as a list."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


def check_metadata(value: dict[str, str]) -> None:
    """OpenAI's metadata limits: 16 pairs, keys up to 64 and values up to 512 characters."""
    if len(value) > 16:
        raise ValueError(f"at most 16 metadata pairs are allowed, got {len(value)}")
    for key, item in value.items():
        if len(key) > 64:
            raise ValueError(f"metadata key {key[:20]!r}... is longer than 64 characters")
        if len(item) > 512:
            raise ValueError(f"metadata value of {key!r} is longer than 512 characters")


class ChatCompletionMessage(BaseModel):
    """The assistant's answer in one choice."""

    role: Literal["assistant"] = "assistant"
    content: str


class ChatCompletionChoice(BaseModel):
    """One generated answer."""

    index: int
    message: ChatCompletionMessage
    # "stop": EOS or a stop sequence ended it; "length": max_tokens did.
    finish_reason: Literal["stop", "length"]


class Usage(BaseModel):
    """Token counts, made with the model's own tokenizer."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    """The `chat.completion` object, as OpenAI and MLflow's llm/v1/chat models return it."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice] = Field(min_length=1)
    usage: Usage


_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _is_union_tag(part: int | str) -> bool:
    # pydantic names the union member it tried ("str", "list[TextContentPart]") in the location.
    return isinstance(part, str) and (part in _UNION_TAGS or "[" in part or "(" in part)


def _field_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += ("." if path else "") + str(part)
    return path


def describe_validation_error(error: ValidationError, *, prefix: str = "") -> RequestError:
    """Turn pydantic's first complaint into a RequestError that names the field and the fix."""
    first = error.errors(include_url=False)[0]
    # pydantic adds the union member or tagged type to the location; drop those parts.
    loc = tuple(p for p in first["loc"] if not _is_union_tag(p))
    field = prefix + _field_path(loc)
    kind = first["type"]
    if kind == "extra_forbidden":
        return RequestError(
            ErrorCode.invalid_request,
            f"unknown field '{field}': remove it (see the OpenAI chat completion request body)",
            param=field,
        )
    if kind == "missing":
        return RequestError(
            ErrorCode.invalid_request, f"'{field}' is required but missing", param=field
        )
    message = first["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    where = f"'{field}'" if field else "the body"
    return RequestError(ErrorCode.invalid_request, f"{where}: {message}", param=field or None)


def parse_chat_request(data: Any, *, prefix: str = "") -> ChatCompletionRequest:
    """Validate a decoded request body.

    Args:
        data: the decoded JSON body.
        prefix: prepended to field names in messages, e.g. ``"body."`` for batch lines.

    Raises:
        RequestError: with `unsupported_parameter` for a known OpenAI field the engine cannot
            honour, else `invalid_request` naming the offending field.
    """
    if not isinstance(data, dict):
        raise RequestError(
            ErrorCode.invalid_request,
            f"'{prefix.rstrip('.') or 'body'}' must be a JSON object, got {type(data).__name__}",
        )
    body = data
    if data.keys() & UNSUPPORTED_FIELDS.keys():  # one set operation for the common case: none
        for name, harmless in UNSUPPORTED_FIELDS.items():
            if name in data and data[name] != harmless and data[name] is not None:
                raise RequestError(
                    ErrorCode.unsupported_parameter,
                    f"'{prefix}{name}' is not supported by chatbatch"
                    + (f" (only {name}={harmless!r} is accepted)" if harmless is not None else "")
                    + f": remove '{name}' from the request",
                    param=prefix + name,
                )
        body = {k: v for k, v in data.items() if k not in UNSUPPORTED_FIELDS}
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as error:
        raise describe_validation_error(error, prefix=prefix) from None
