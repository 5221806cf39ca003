"""Which JSON Schema a request's answer must follow: its `response_format`, or the call a
forced `tool_choice` asks for. Shared by the producer (which refuses a schema the grammar
library cannot compile before anything is enqueued) and the worker (which enforces it,
worker/grammar.py)."""

from __future__ import annotations

import functools
import json
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
        index = _tool_index(request, choice.function.name)
        return _parameters(request, index), f"tools[{index}].function.parameters"
    if choice == "required":
        return calls_schema(request), "tools"
    fmt = request.response_format
    if isinstance(fmt, JsonObjectFormat):
        return ANY_OBJECT, "response_format"
    if isinstance(fmt, JsonSchemaResponseFormat):
        return fmt.json_schema.schema_ or ANY_OBJECT, "response_format.json_schema.schema"
    return None


def _tool_index(request: ChatCompletionRequest, name: str) -> int:
    return next(i for i, tool in enumerate(request.tools or []) if tool.function.name == name)


def _parameters(request: ChatCompletionRequest, index: int) -> dict[str, Any]:
    return (request.tools or [])[index].function.parameters or {"type": "object", "properties": {}}


def calls_schema(request: ChatCompletionRequest) -> dict[str, Any]:
    """`tool_choice: required`: a list of calls, each naming one of the tools with arguments
    that fit its parameters (one call when `parallel_tool_calls` is false). Each tool's
    parameters sit under `$defs` by the tool's name, their own root-relative `$ref`s rewritten to
    point there, so that tools using `$defs` keep working side by side."""
    definitions: dict[str, Any] = {}
    calls: list[dict[str, Any]] = []
    for index, tool in enumerate(request.tools or []):
        name = tool.function.name
        definitions[name] = _rebase(_parameters(request, index), f"#/$defs/{name}")
        calls.append({
            "type": "object",
            "properties": {"name": {"const": name}, "arguments": {"$ref": f"#/$defs/{name}"}},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        })
    schema: dict[str, Any] = {"type": "array", "items": {"anyOf": calls}, "minItems": 1, "$defs": definitions}
    if request.parallel_tool_calls is False:
        schema["maxItems"] = 1
    return schema


def _rebase(value: Any, root: str) -> Any:
    """A copy of a schema whose root-relative `$ref`s ("#...") point under `root` instead."""
    if isinstance(value, dict):
        return {key: (root + item[1:] if key == "$ref" and isinstance(item, str) and item.startswith("#") else _rebase(item, root))
                for key, item in value.items()}
    if isinstance(value, list):
        return [_rebase(item, root) for item in value]
    return value


def schemas_to_check(request: ChatCompletionRequest) -> list[tuple[dict[str, Any], str]]:
    """Every schema to compile for a request, each with the field it comes from: for
    `tool_choice: required`, each tool's parameters first (so that an error names the tool),
    then the list of calls."""
    found = schema_for(request)
    if found is None:
        return []
    if request.effective_tool_choice != "required":
        return [found]
    each = [(_parameters(request, i), f"tools[{i}].function.parameters") for i in range(len(request.tools or []))]
    return [*each, found]


@functools.lru_cache(maxsize=1024)
def _compile_error(canonical: str) -> str:
    """llguidance's complaint about a schema (given as canonical JSON text), or ''."""
    import llguidance

    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(canonical, overrides=JSON_OPTIONS)  # type: ignore[arg-type]
        return llguidance.LLMatcher.validate_grammar(grammar)
    except (ValueError, TypeError) as failure:
        return str(failure)


def check_schema(request: ChatCompletionRequest, *, prefix: str = "") -> None:
    """Refuse a request whose schema the grammar library cannot compile (checked without the
    model's tokenizer, once per distinct schema in this process; the worker checks again with
    the tokenizer).

    Raises:
        RequestError: invalid_request naming the field and the reason.
    """
    for schema, where in schemas_to_check(request):
        error = _compile_error(json.dumps(schema, sort_keys=True))
        if error:
            raise RequestError(
                ErrorCode.invalid_request, f"'{prefix}{where}' is not a JSON Schema chatbatch can enforce: {error}", param=prefix + where
            )
