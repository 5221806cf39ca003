"""Which JSON Schema a request's answer must follow: its `response_format`, or the call a
forced `tool_choice` asks for. Shared by the producer (which refuses a schema the grammar
library cannot compile before anything is enqueued) and the worker (which enforces it,
worker/decode/grammar.py).

An object schema that lists its properties generates those properties only, unless it allows
more (`additionalProperties` true or a schema): JSON Schema would let any other key through, and
a grammar that follows it to the letter lets a model invent keys ({"Jason": "25} ..."}), which
OpenAI's models never do and vLLM's default backend forbids. `closed` writes that reading into
the schema. An object schema that lists no properties (`{"type": "object"}`, `json_object`)
stays free: it declares nothing to keep to. Objects composed with `allOf`, or whose own
properties sit beside `anyOf`, `oneOf` or `$ref`, stay as written, as do their parts: the
grammar intersects the parts, and closing each would forbid the others' properties.
"""

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
        return closed(fmt.json_schema.schema_ or ANY_OBJECT), "response_format.json_schema.schema"
    return None


def _tool_index(request: ChatCompletionRequest, name: str) -> int:
    return next(i for i, tool in enumerate(request.tools or []) if tool.function.name == name)


def _parameters(request: ChatCompletionRequest, index: int) -> dict[str, Any]:
    return closed((request.tools or [])[index].function.parameters or {"type": "object", "properties": {}})


#: Keywords whose value is one schema, a list of schemas, or a map of names to schemas, that
#: describe values the answer holds. (Conditions, `not`, `if` and the like, stay as written:
#: closing a condition would change when it holds.)
_ONE = ("additionalProperties", "items", "additionalItems", "contains", "unevaluatedItems", "unevaluatedProperties")
_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
_MAPS = ("properties", "patternProperties", "$defs", "definitions")
#: Keywords whose schemas are the parts of a composition.
_PARTS = ("allOf", "anyOf", "oneOf")
#: Keywords that say which keys an object may have besides its properties.
_OPEN_ENDED = ("additionalProperties", "unevaluatedProperties")
#: Keywords that list an object's own properties.
_LISTED = ("properties", "patternProperties")


def closed(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of `schema` in which every object schema that lists properties and says nothing
    of other keys has `additionalProperties: false` (see the module's docstring for which
    objects stay as written)."""
    kept_open = _composed_refs(schema)
    return _close(schema, "#", kept_open, composed=False)  # type: ignore[no-any-return]


def _combines(node: dict[str, Any]) -> bool:
    """Whether an object schema is composed with others: allOf, or its own properties beside
    anyOf, oneOf or $ref (the grammar intersects them)."""
    return "allOf" in node or (any(key in node for key in _LISTED) and any(key in node for key in ("anyOf", "oneOf", "$ref")))


def _composed_refs(value: Any) -> set[str]:
    """The `$ref` targets that are parts of a composition (they stay open)."""
    found: set[str] = set()
    if isinstance(value, dict):
        if _combines(value):
            parts = [value, *(part for key in _PARTS for part in value.get(key) or [] if isinstance(part, dict))]
            found.update(part["$ref"] for part in parts if isinstance(part.get("$ref"), str))
        for item in value.values():
            found |= _composed_refs(item)
    elif isinstance(value, list):
        for item in value:
            found |= _composed_refs(item)
    return found


def _close(value: Any, pointer: str, kept_open: set[str], *, composed: bool) -> Any:
    """`closed` at one node, `pointer` its JSON pointer; `composed`: the node is a part of a
    composition."""
    if not isinstance(value, dict):
        return value
    combines = _combines(value)
    node: dict[str, Any] = {}
    for key, item in value.items():
        where = f"{pointer}/{key}"
        if key in _MAPS and isinstance(item, dict):
            node[key] = {name: _close(part, f"{where}/{name}", kept_open, composed=False) for name, part in item.items()}
        elif key in _LISTS and isinstance(item, list):
            part_of = combines and key in _PARTS
            node[key] = [_close(part, f"{where}/{i}", kept_open, composed=part_of) for i, part in enumerate(item)]
        elif key in _ONE:
            node[key] = _close(item, where, kept_open, composed=False)
        else:
            node[key] = item
    listed = any(key in node for key in _LISTED)
    if listed and not combines and not composed and pointer not in kept_open and not any(key in node for key in _OPEN_ENDED):
        node["additionalProperties"] = False
    return node


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
