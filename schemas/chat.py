"""OpenAI chat completion request and response bodies (`POST /v1/chat/completions`)."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from schemas.errors import ErrorCode, RequestError
from schemas.strict import check_strict

#: Upper bounds that keep one request from occupying a worker; documented in docs/formats.md.
MAX_N = 16
MAX_MESSAGES = 2048
MAX_STOP = 4

#: Most token-id entries in `logit_bias`, and the most tools in `tools`.
MAX_LOGIT_BIAS = 1024
MAX_TOOLS = 128
#: Most alternatives per token in `top_logprobs` (OpenAI's limit).
MAX_TOP_LOGPROBS = 20

# Known OpenAI request fields that chatbatch does not honour. Each maps to the value that
# means "not used": a request that sends exactly that value is accepted, anything else is
# rejected with `unsupported_parameter` rather than silently ignored.
UNSUPPORTED_FIELDS: dict[str, Any] = {
    "functions": None,
    "function_call": None,
    "modalities": None,
    "audio": None,
    "prediction": None,
    "reasoning_effort": None,
    "verbosity": None,
    "web_search_options": None,
    # The SDKs' "off" is `store: false`.
    "store": False,
}
#: Why a known field is refused, for the error message.
UNSUPPORTED_WHY: dict[str, str] = {
    "functions": "it is the legacy form of 'tools': send 'tools' and 'tool_choice'",
    "function_call": "it is the legacy form of 'tool_choice': send 'tools' and 'tool_choice'",
    "modalities": "the models chatbatch serves answer in text only",
    "audio": "the models chatbatch serves answer in text only",
    "reasoning_effort": "the models chatbatch serves have no reasoning mode",
    "verbosity": "the models chatbatch serves have no verbosity setting",
    "store": "nothing keeps completions for evals or distillation; answers stay readable by id for CHATBATCH_RESULT_TTL",
}

#: A function or schema name, as OpenAI allows them.
NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextContentPart(_Strict):
    """A text part of a message's content."""

    type: Literal["text"]
    text: str


class MediaContentPart(BaseModel):
    """An image, audio or file part: recognised, so that it is refused with a clear message
    (the models chatbatch serves read text only)."""

    model_config = ConfigDict(extra="allow")

    type: Literal["image_url", "input_audio", "file"]


ContentPart = Annotated[TextContentPart | MediaContentPart, Field(discriminator="type")]


class FunctionCall(_Strict):
    """The function a tool call invokes."""

    # The function's name.
    name: str
    # Its arguments, as a JSON object in a string.
    arguments: str


class ToolCall(_Strict):
    """A tool call of an assistant message."""

    # The call's id, which the tool message answering it names in `tool_call_id`.
    id: str
    # Always "function".
    type: Literal["function"] = "function"
    # The function and its arguments.
    function: FunctionCall


class ChatMessage(_Strict):
    """One message of the conversation."""

    # Who wrote the message. `developer` is the newer name of `system`; `tool` answers a tool call.
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # The text, or a list of text parts that are joined in order; null (or left out) only on an
    # assistant message that carries tool calls.
    content: str | list[ContentPart] | None
    # An optional participant name, passed to the chat template.
    name: str | None = None
    # Assistant messages: the tool calls it made.
    tool_calls: list[ToolCall] | None = None
    # Tool messages: the id of the call this message answers.
    tool_call_id: str | None = None
    # The fields below are those of an answer's message (`message.model_dump()` of an SDK's
    # answer), accepted when it is sent back as an assistant message.
    # Assistant messages: a refusal the model gave; the model reads it as the message's text
    # when there is no content.
    refusal: str | None = None
    # Assistant messages: URL citations (OpenAI's web search); not used.
    annotations: list[dict[str, Any]] | None = None
    # Assistant messages: null (an audio answer, which chatbatch never gives, would be named here).
    audio: None = None
    # Assistant messages: null (the legacy form of `tool_calls`).
    function_call: None = None

    @field_validator("audio", "function_call", mode="before")
    @classmethod
    def _null(cls, value: Any, info: ValidationInfo) -> None:
        if value is not None:
            why = "audio answers are not supported" if info.field_name == "audio" else "it is the legacy form of 'tool_calls'"
            raise ValueError(f"only null is accepted here ({why}): send null or leave '{info.field_name}' out")
        return None

    @model_validator(mode="before")
    @classmethod
    def _content_of_an_answer(cls, data: Any) -> Any:
        if isinstance(data, dict) and "content" not in data and data.get("role") == "assistant" and (data.get("tool_calls") or data.get("refusal")):
            return {**data, "content": None}
        return data

    @model_validator(mode="after")
    def _fields_of_its_role(self) -> ChatMessage:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only assistant messages carry 'tool_calls'")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs 'tool_call_id', the id of the call it answers")
        if self.tool_call_id is not None and self.role != "tool":
            raise ValueError("only tool messages carry 'tool_call_id'")
        if (self.refusal is not None or self.annotations) and self.role != "assistant":
            raise ValueError("only assistant messages carry 'refusal' and 'annotations'")
        if self.content is None and not (self.role == "assistant" and (self.tool_calls or self.refusal is not None)):
            raise ValueError("'content' is required (only an assistant message with 'tool_calls' or a 'refusal' may leave it null)")
        return self

    def text(self) -> str:
        """The message content as one string (an answer that was a refusal: the refusal)."""
        if self.content is None:
            return self.refusal or ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content if isinstance(part, TextContentPart))


class FunctionDefinition(_Strict):
    """A function the model may call."""

    # Its name: letters, digits, _ and -, up to 64.
    name: str = Field(pattern=NAME_PATTERN)
    # What it does, for the model.
    description: str | None = None
    # Its arguments, as a JSON Schema object (none: an empty object).
    parameters: dict[str, Any] | None = None
    # OpenAI's strict mode: the parameters keep to its subset of JSON Schema (schemas/strict.py);
    # chatbatch enforces them with a grammar whenever it forces a call, strict or not.
    strict: bool | None = None


class ToolDefinition(_Strict):
    """A tool: a function."""

    type: Literal["function"]
    function: FunctionDefinition


class ChosenFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    """`tool_choice` naming the one function the model must call."""

    type: Literal["function"]
    function: ChosenFunction


class StreamOptions(_Strict):
    """`stream_options` of a streamed request."""

    # Add a last chunk with the request's usage (and `"usage": null` in every other chunk).
    include_usage: bool = False
    # OpenAI pads streamed deltas with random characters (an `obfuscation` field) against
    # side channels on event sizes; accepted either way, chatbatch sends no padding.
    include_obfuscation: bool | None = None


class JsonSchemaFormat(_Strict):
    """The schema of a `json_schema` response format."""

    model_config = ConfigDict(extra="forbid", serialize_by_alias=True)

    # The schema's name: letters, digits, _ and -, up to 64.
    name: str = Field(pattern=NAME_PATTERN)
    # What the answer is for, for the model.
    description: str | None = None
    # The JSON Schema every answer must validate against (none: any JSON object).
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    # OpenAI's strict mode: the schema keeps to its subset of JSON Schema (schemas/strict.py);
    # chatbatch enforces the schema with a grammar in either case.
    strict: bool | None = None


class TextFormat(_Strict):
    type: Literal["text"]


class JsonObjectFormat(_Strict):
    type: Literal["json_object"]


class JsonSchemaResponseFormat(_Strict):
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaResponseFormat, Field(discriminator="type")]


class ChatCompletionRequest(_Strict):
    """The body of an OpenAI chat completion request, as far as chatbatch honours it."""

    model_config = ConfigDict(extra="forbid", serialize_by_alias=True)

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
    # End-user identifier, for the caller's own bookkeeping (kept with the request).
    user: str | None = None
    # A stable identifier of the end user, for abuse detection; kept with the request, as `user`.
    safety_identifier: str | None = None
    # Groups requests that share a prompt prefix, for OpenAI's cache routing. Accepted and kept;
    # not needed here: every worker reuses the KV of any cached prompt prefix, whatever its key.
    prompt_cache_key: str | None = None
    # The processing tier: `auto` and `default` run as usual, `flex` at low priority, `priority`
    # at high; the answer's `service_tier` says which one it ran in.
    service_tier: Literal["auto", "default", "flex", "priority"] | None = None
    # Key-value pairs kept with the request (up to 16; keys 64, values 512 characters).
    metadata: dict[str, str] | None = None
    # The answer's format: text, any JSON object, or JSON that validates against a schema;
    # JSON formats are enforced by constraining every token to the grammar.
    response_format: ResponseFormat | None = None
    # Return the log probability of each output token.
    logprobs: bool = False
    # With logprobs: how many most likely alternatives to return per token (0 to 20).
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    # -2 to 2: lower (positive) or raise (negative) the odds of tokens already generated at all.
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    # -2 to 2: lower (positive) or raise the odds of tokens by how often they were generated.
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    # Token id (as a string) -> -100 to 100 added to its logit; -100 bans it, 100 forces it.
    logit_bias: dict[str, float] | None = None
    # Functions the model may call.
    tools: list[ToolDefinition] | None = Field(default=None, max_length=MAX_TOOLS)
    # "none", "auto" (the default with tools), "required", or a named function.
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    # Whether the model may call several tools in one answer (default true).
    parallel_tool_calls: bool | None = None
    # Send the answer as server-sent events of chat.completion.chunk objects as it is
    # generated (single requests only: batch lines are answered whole, as with OpenAI).
    stream: bool = False
    # Options of a streamed answer (only with stream: true).
    stream_options: StreamOptions | None = None

    @field_validator("temperature", "top_p", "presence_penalty", "frequency_penalty")
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

    @field_validator("logit_bias")
    @classmethod
    def _token_biases(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is None:
            return None
        if len(value) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} token ids may be biased, got {len(value)}")
        for token, bias in value.items():
            if not token.isdigit():
                raise ValueError(f"keys are token ids (as strings of digits), got {token[:20]!r}")
            if not (math.isfinite(bias) and -100 <= bias <= 100):
                raise ValueError(f"the bias of token {token} must be between -100 and 100, got {bias}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.max_tokens is not None and self.max_completion_tokens is not None and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens disagree; send only one of them")
        if self.top_logprobs is not None and self.top_logprobs > 0 and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.tool_choice is not None and not self.tools and self.tool_choice != "none":
            raise ValueError("tool_choice needs 'tools'")
        if isinstance(self.tool_choice, NamedToolChoice):
            names = [tool.function.name for tool in self.tools or []]
            if self.tool_choice.function.name not in names:
                raise ValueError(f"tool_choice names function {self.tool_choice.function.name!r}, which is not in 'tools' ({', '.join(names)})")
        if self.calls_tools and self.response_format is not None and not isinstance(self.response_format, TextFormat):
            raise ValueError("a forced tool call and a JSON response_format cannot go together: the answer is the call")
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

    @property
    def effective_tool_choice(self) -> str | NamedToolChoice:
        """`tool_choice`, with OpenAI's default: "auto" with tools, else "none"."""
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"

    @property
    def tier(self) -> Literal["default", "flex", "priority"]:
        """The service tier the request runs in, as its answer names it (`auto`: `default`)."""
        if self.service_tier == "flex" or self.service_tier == "priority":
            return self.service_tier
        return "default"

    @property
    def calls_tools(self) -> bool:
        """Whether the answer must be a tool call ("required" or a named function)."""
        choice = self.effective_tool_choice
        return choice == "required" or isinstance(choice, NamedToolChoice)


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
    # The text; null when the answer is tool calls.
    content: str | None
    # The tool calls the model made (then `content` is null and `finish_reason` "tool_calls").
    tool_calls: list[ToolCall] | None = None
    # A refusal: the models chatbatch serves refuse in `content`, so always null.
    refusal: str | None = None
    # URL citations (OpenAI's web search): always empty.
    annotations: list[dict[str, Any]] = Field(default_factory=list)


class TopLogprob(BaseModel):
    """One of the most likely tokens at a position."""

    token: str
    # Its log probability under the model (before temperature, top_p and penalties).
    logprob: float
    # The token's UTF-8 bytes (a token may hold part of a character).
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    """One output token, with the alternatives asked for."""

    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    """`choices[].logprobs`: one entry per token of the answer."""

    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class ChatCompletionChoice(BaseModel):
    """One generated answer."""

    index: int
    message: ChatCompletionMessage
    # With `logprobs`: the log probabilities of the answer's tokens.
    logprobs: ChoiceLogprobs | None = None
    # "stop": EOS, a stop sequence or the end of the JSON ended it; "length": max_tokens did;
    # "tool_calls": the answer is tool calls.
    finish_reason: Literal["stop", "length", "tool_calls"]


class PromptTokensDetails(BaseModel):
    #: Prompt tokens whose KV came from the worker's prefix cache instead of being computed.
    cached_tokens: int = 0
    #: Audio input: always 0 (the models read text).
    audio_tokens: int = 0


class CompletionTokensDetails(BaseModel):
    """What OpenAI counts apart in `completion_tokens`; the models chatbatch serves have no
    reasoning, audio or predicted output, so each is 0."""

    reasoning_tokens: int = 0
    audio_tokens: int = 0
    accepted_prediction_tokens: int = 0
    rejected_prediction_tokens: int = 0


class Usage(BaseModel):
    """Token counts, made with the model's own tokenizer."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)
    completion_tokens_details: CompletionTokensDetails = Field(default_factory=CompletionTokensDetails)


class ChatCompletion(BaseModel):
    """The `chat.completion` object, as OpenAI and MLflow's llm/v1/chat models return it."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice] = Field(min_length=1)
    usage: Usage
    # The tier the request ran in: `default`, `flex` or `priority`.
    service_tier: Literal["default", "flex", "priority"] | None = None
    # The worker's set-up (model version, dtype, engine settings, versions) as a digest: the
    # same fingerprint means the same set-up, so a seeded request gives the same answer.
    system_fingerprint: str | None = None


_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


#: Discriminated unions: the field (or list) holding them -> their tags, which pydantic puts in
#: the location after it.
_TAGGED = {"response_format": {"text", "json_object", "json_schema"}, "content": {"text", "image_url", "input_audio", "file"}}


def _is_union_tag(part: int | str) -> bool:
    # pydantic names the union member it tried ("str", "list[TextContentPart]") in the location.
    return isinstance(part, str) and (part in _UNION_TAGS or "[" in part or "(" in part)


def _without_tags(loc: tuple[int | str, ...]) -> tuple[int | str, ...]:
    """The location without the union members and tags pydantic adds to it."""
    parts = [part for part in loc if not _is_union_tag(part)]
    kept: list[int | str] = []
    for i, part in enumerate(parts):
        holder = parts[i - 2] if i > 1 and isinstance(parts[i - 1], int) else (parts[i - 1] if i else None)
        if isinstance(part, str) and isinstance(holder, str) and part in _TAGGED.get(holder, ()):
            continue
        kept.append(part)
    return tuple(kept)


def _field_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += ("." if path else "") + str(part)
    return path


def describe_validation_error(error: ValidationError, *, prefix: str = "") -> RequestError:
    """Turn pydantic's complaint into a RequestError that names the field and the fix. Of the
    complaints about one field's union members, the deepest is the telling one (a list of parts
    with a bad part, rather than "not a string")."""
    errors = error.errors(include_url=False)
    top = errors[0]["loc"][:1]
    first = max((e for e in errors if e["loc"][:1] == top), key=lambda e: len(e["loc"]))
    loc = _without_tags(tuple(first["loc"]))
    field = prefix + _field_path(loc) if loc else ""
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


def _refuse_unsupported(data: dict[str, Any], prefix: str) -> dict[str, Any]:
    """`data` without the known fields sent at their "unused" value; raises
    `unsupported_parameter` for one sent with another value."""
    if not data.keys() & UNSUPPORTED_FIELDS.keys():  # one set operation for the common case: none
        return data
    for name, harmless in UNSUPPORTED_FIELDS.items():
        if name in data and data[name] != harmless and data[name] is not None:
            why = UNSUPPORTED_WHY.get(name)
            raise RequestError(
                ErrorCode.unsupported_parameter,
                f"'{prefix}{name}' is not supported by chatbatch"
                + (f" ({why})" if why else "")
                + (f"; only {name}={harmless!r} is accepted" if harmless is not None else "")
                + f": remove '{name}' from the request",
                param=prefix + name,
            )
    return {k: v for k, v in data.items() if k not in UNSUPPORTED_FIELDS}


def _refuse_media(request: ChatCompletionRequest, prefix: str) -> None:
    """Image, audio and file parts are recognised and refused: the models read text only."""
    for m, message in enumerate(request.messages):
        if not isinstance(message.content, list):
            continue
        for p, part in enumerate(message.content):
            if isinstance(part, MediaContentPart):
                kind = {"image_url": "images", "input_audio": "audio", "file": "files"}[part.type]
                raise RequestError(
                    ErrorCode.invalid_request,
                    f"'{prefix}messages[{m}].content[{p}]': {kind} are not supported by this model, which "
                    "reads text only: send text parts",
                    param=f"{prefix}messages[{m}].content[{p}]",
                )


def _bad_text(value: str) -> int | None:
    """The index of the first character of `value` that UTF-8 cannot encode (an unpaired
    surrogate, which a JSON `\\udc80` escape decodes to), or None."""
    if value.isascii():
        return None
    try:
        value.encode()
    except UnicodeEncodeError as error:
        return error.start
    return None


def _has_bad_text(data: Any) -> bool:
    """Whether any string (key or value) in a decoded JSON value is not valid Unicode: one
    pass, without paths (the common case is none)."""
    stack = [data]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            if _bad_text(value) is not None:
                return True
        elif isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return False


def _bad_text_path(data: Any) -> tuple[str, str]:
    """The field path of the first string that is not valid Unicode, and where in it: "a key"
    (the path is then its object's) or "character N". Iterative: nesting depth costs no
    recursion."""
    stack: list[tuple[Any, str]] = [(data, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            index = _bad_text(value)
            if index is not None:
                return path, f"character {index}"
        elif isinstance(value, dict):
            for key in value:
                if isinstance(key, str) and _bad_text(key) is not None:
                    return path, "a key"
            stack.extend((item, f"{path}.{key}" if path else str(key)) for key, item in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend((item, f"{path}[{index}]") for index, item in reversed(list(enumerate(value))))
    return "", "a string"


def _refuse_unencodable(data: dict[str, Any], prefix: str) -> None:
    """Text that no tokenizer can take, nor Redis store, nor JSON carry as UTF-8 is refused
    here, naming its field, rather than failing later beside other requests."""
    if not _has_bad_text(data):
        return
    path, where = _bad_text_path(data)
    field = prefix + path if path else prefix.rstrip(".") or "body"
    raise RequestError(
        ErrorCode.invalid_request,
        f"'{field}': {where} is not valid Unicode (an unpaired surrogate, such as \\udc80): send UTF-8 text",
        param=field,
    )


def parse_chat_request(data: Any, *, prefix: str = "", streamable: bool = False) -> ChatCompletionRequest:
    """Validate a decoded request body.

    Args:
        data: the decoded JSON body.
        prefix: prepended to field names in messages, e.g. ``"body."`` for batch lines.
        streamable: the body is a single request, which may ask for `stream: true`; a batch
            line may not (as with OpenAI's Batch API).

    Raises:
        RequestError: with `unsupported_parameter` for a known OpenAI field chatbatch does not
            honour, else `invalid_request` naming the offending field.
    """
    if not isinstance(data, dict):
        raise RequestError(
            ErrorCode.invalid_request,
            f"'{prefix.rstrip('.') or 'body'}' must be a JSON object, got {type(data).__name__}",
        )
    _refuse_unencodable(data, prefix)
    body = _refuse_unsupported(data, prefix)
    try:
        request = ChatCompletionRequest.model_validate(body)
    except ValidationError as error:
        raise describe_validation_error(error, prefix=prefix) from None
    _refuse_media(request, prefix)
    _check_stream(request, prefix, streamable)
    _check_strict(request, prefix)
    return request


def _check_strict(request: ChatCompletionRequest, prefix: str = "") -> None:
    """Refuse a request whose `strict` schemas (its `response_format`, its tools' parameters,
    whether or not the call is forced) strict mode does not accept; `prefix` is prepended to
    the paths, e.g. ``"body."``."""
    fmt = getattr(request.response_format, "json_schema", None)
    if fmt is not None and fmt.strict:
        check_strict(fmt.schema_, f"{prefix}response_format.json_schema.schema")
    for index, tool in enumerate(request.tools or []):
        if tool.function.strict:
            check_strict(tool.function.parameters, f"{prefix}tools[{index}].function.parameters")


def _check_stream(request: ChatCompletionRequest, prefix: str, streamable: bool) -> None:
    """`stream: true` only where the answer can be streamed; `stream_options` only with it."""
    if request.stream and not streamable:
        raise RequestError(
            ErrorCode.unsupported_parameter,
            f"'{prefix}stream' is not supported in batch lines, which are answered whole; only "
            "stream=False is accepted: remove 'stream' from the request",
            param=prefix + "stream",
        )
    if request.stream_options is not None and not request.stream:
        raise RequestError(
            ErrorCode.invalid_request,
            f"'{prefix}stream_options' is only allowed when 'stream' is true: send stream: true or remove 'stream_options'",
            param=prefix + "stream_options",
        )
