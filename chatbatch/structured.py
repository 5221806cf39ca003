"""Which JSON Schema a request's answer must follow: its `response_format`, or the call a
forced `tool_choice` asks for. Shared by the producer (which refuses a schema the grammar
library cannot compile before anything is enqueued) and the worker (which enforces it,
worker/grammar.py)."""

from __future__ import annotations

from typing import Any

from schemas.chat import ChatCompletionRequest, JsonObjectFormat, JsonSchemaResponseFormat, NamedToolChoice
from schemas.errors import ErrorCode, RequestError

#: How JSON is laid out: compact, no free whitespace.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
#: The schema of `json_object` mode: any JSON object.
ANY_OBJECT: dict[str, Any] = {"type": "object"}


def schema_for(request: ChatCompletionRequest) -> tuple[dict[str, Any], str] | None:
    """The JSON Schema a request's answer must follow, and the request field it comes from (for
    error messages); None for free text."""
    choice = request.effective_tool_choice
    if isinstance(choice, NamedToolChoice):
        tool = next(t for t in request.tools or [] if t.function.name == choice.function.name)
        return tool.function.parameters or {"type": "object", "properties": {}}, "tools.function.parameters"
    if choice == "required":
        return calls_schema(request), "tools"
    fmt = request.response_format
    if isinstance(fmt, JsonObjectFormat):
        return ANY_OBJECT, "response_format"
    if isinstance(fmt, JsonSchemaResponseFormat):
        return fmt.json_schema.schema_ or ANY_OBJECT, "response_format.json_schema.schema"
    return None


def calls_schema(request: ChatCompletionRequest) -> dict[str, Any]:
    """`tool_choice: required`: a list of calls, each naming one of the tools with arguments
    that fit its parameters (one call when `parallel_tool_calls` is false)."""
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"const": tool.function.name},
                "arguments": tool.function.parameters or {"type": "object", "properties": {}},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for tool in request.tools or []
    ]
    schema: dict[str, Any] = {"type": "array", "items": {"anyOf": calls}, "minItems": 1}
    if request.parallel_tool_calls is False:
        schema["maxItems"] = 1
    return schema


def check_schema(request: ChatCompletionRequest, *, prefix: str = "") -> None:
    """Refuse a request whose schema the grammar library cannot compile (checked without the
    model's tokenizer; the worker checks again with it).

    Raises:
        RequestError: invalid_request naming the field and the reason.
    """
    found = schema_for(request)
    if found is None:
        return
    import llguidance

    schema, where = found
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)  # type: ignore[arg-type]
        error = llguidance.LLMatcher.validate_grammar(grammar)
    except (ValueError, TypeError) as failure:
        error = str(failure)
    if error:
        raise RequestError(
            ErrorCode.invalid_request, f"'{prefix}{where}' is not a JSON Schema chatbatch can enforce: {error}", param=prefix + where
        )
