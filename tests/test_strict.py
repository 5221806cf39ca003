"""schemas/strict.py: `strict: true` schemas keep to OpenAI's strict mode, or the request is
refused naming the rule and the path in the schema; without `strict` any schema passes."""

from __future__ import annotations

import json
from typing import Any

import pytest

from schemas import ErrorCode, LineError, RequestError, parse_batch_line, parse_chat_request
from schemas.strict import MAX_DEPTH, MAX_PROPERTIES
from tests.conftest import ROOT as ROOT_DIR

MESSAGES = [{"role": "user", "content": "x"}]
ROOT = "response_format.json_schema.schema"


def _closed(properties: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False, **extra}


def _format(schema: Any, *, strict: bool | None = True) -> dict[str, Any]:
    return {"messages": MESSAGES, "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema, "strict": strict}}}


def _refusal(body: dict[str, Any]) -> RequestError:
    with pytest.raises(RequestError) as caught:
        parse_chat_request(body)
    assert caught.value.code is ErrorCode.invalid_request
    return caught.value


#: What the openai SDK sends for a pydantic model in strict mode: $defs, a nullable field, a
#: recursive $ref, enums, the string formats and number bounds, descriptions and defaults.
SDK_SCHEMA = {
    "$defs": {
        "Node": _closed({"label": {"type": "string", "pattern": "^[a-z]+$"}, "children": {"type": "array", "items": {"$ref": "#/$defs/Node"}, "maxItems": 4}}),
        "Color": {"type": "string", "enum": ["red", "green"], "title": "Color"},
    },
    **_closed({
        "name": {"type": "string", "description": "a name", "title": "Name"},
        "born": {"type": "string", "format": "date"},
        "id": {"anyOf": [{"type": "string", "format": "uuid"}, {"type": "null"}], "default": None},
        "age": {"type": "integer", "minimum": 0, "exclusiveMaximum": 150, "multipleOf": 1},
        "color": {"$ref": "#/$defs/Color"},
        "tree": {"$ref": "#/$defs/Node"},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "kind": {"const": "person"},
    }),
    "title": "Person",
}


def test_a_schema_in_strict_mode_is_accepted_as_openai_accepts_it() -> None:
    request = parse_chat_request(_format(SDK_SCHEMA))
    assert request.response_format.json_schema.schema_ == SDK_SCHEMA  # type: ignore[union-attr]
    example = next(line for line in (ROOT_DIR / "README.md").read_text().splitlines() if line.startswith('{"custom_id": "p-1"'))
    assert json.loads(example)["body"]["response_format"]["json_schema"]["strict"] is True
    parse_batch_line(example.encode(), 1)  # the README's strict example


@pytest.mark.parametrize(
    ("schema", "path", "words"),
    [
        ({"anyOf": [_closed({}), {"type": "null"}]}, "", "root must be an object"),
        ({"type": "array", "items": {"type": "string"}}, "", "root must be an object"),
        ({"type": "object", "properties": {"age": {"type": "integer"}}, "required": []}, ".additionalProperties", "must be false"),
        (_closed({"inner": {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}}),
         ".properties.inner.additionalProperties", "must be false"),
        ({**_closed({"age": {"type": "integer"}, "name": {"type": "string"}}), "required": ["name"]}, ".properties.age",
         "'required' must list every property in strict mode: add 'age'"),
        ({**_closed({"a": {"type": "string"}}), "required": ["a", "b"]}, ".required", "lists 'b'"),
        (_closed({"name": {"type": "string", "maxLength": 5}}), ".properties.name", "'maxLength' is not supported in strict mode"),
        (_closed({"n": {"type": "integer"}}, allOf=[{"type": "object"}]), "", "'allOf' is not supported"),
        (_closed({"n": {"oneOf": [{"type": "integer"}, {"type": "string"}]}}), ".properties.n", "'oneOf' is not supported"),
        (_closed({"n": {"type": "object", "patternProperties": {"^x": {"type": "string"}}, "additionalProperties": False}}),
         ".properties.n", "'patternProperties' is not supported"),
        (_closed({"t": {"type": "array", "items": {"type": "string"}, "uniqueItems": True}}), ".properties.t", "'uniqueItems' is not supported"),
        (_closed({"u": {"type": "string", "format": "uri"}}), ".properties.u.format", "format 'uri' is not supported"),
        (_closed({"u": {"type": "text"}}), ".properties.u.type", "'text' is not a JSON Schema type"),
        (_closed({"pair": {"type": "array", "items": [{"type": "string"}, {"type": "integer"}]}}), ".properties.pair.items", "must be one schema"),
        (_closed({"c": {"anyOf": [{"type": "string"}, {"type": "object", "properties": {"x": {"type": "string"}}, "required": ["x"]}]}}),
         ".properties.c.anyOf[1].additionalProperties", "must be false"),
        ({**_closed({"a": {"$ref": "#/$defs/A"}}), "$defs": {"A": {"type": "object", "properties": {}, "not": {}}}}, ".$defs.A", "'not' is not supported"),
    ],
)
def test_a_strict_schema_that_breaks_a_rule_is_refused_naming_it_and_its_path(schema: dict[str, Any], path: str, words: str) -> None:
    refused = _refusal(_format(schema))
    assert refused.param == ROOT + path
    assert refused.message.startswith(f"'{ROOT + path}': ") and words in refused.message, refused.message
    parse_chat_request(_format(schema, strict=False))  # not strict: accepted (the grammar enforces it as written)
    parse_chat_request(_format(schema, strict=None))


def test_the_size_limits_of_strict_mode() -> None:
    deep: dict[str, Any] = _closed({"leaf": {"type": "string"}})
    for _ in range(MAX_DEPTH - 1):
        deep = _closed({"child": deep})
    parse_chat_request(_format(deep))  # exactly MAX_DEPTH levels of objects
    refused = _refusal(_format(_closed({"child": deep})))
    assert f"nest {MAX_DEPTH + 1} levels deep" in refused.message
    assert refused.param == ROOT + ".properties.child" * MAX_DEPTH

    wide = _closed({f"p{i}": _closed({f"q{j}": {"type": "integer"} for j in range(50)}) for i in range(MAX_PROPERTIES // 51 + 1)})
    refused = _refusal(_format(wide))
    assert refused.param == ROOT and f"at most {MAX_PROPERTIES}" in refused.message

    many = _closed({f"e{i}": {"enum": list(range(101))} for i in range(10)})
    assert "1010 enum values in all" in _refusal(_format(many)).message
    long_enum = _closed({"e": {"enum": [f"{i:03d}" + "x" * 60 for i in range(251)]}})
    assert _refusal(_format(long_enum)).param == ROOT + ".properties.e.enum"
    huge_names = _closed({"n" * 1000 + str(i): {"type": "boolean"} for i in range(121)})
    assert "characters of property names" in _refusal(_format(huge_names)).message


def test_strict_tools_are_checked_whether_or_not_the_call_is_forced() -> None:
    loose = {"type": "object", "properties": {"city": {"type": "string"}}}
    tools = [{"type": "function", "function": {"name": "ok", "strict": True, "parameters": _closed({"a": {"type": "integer"}})}},
             {"type": "function", "function": {"name": "bad", "strict": True, "parameters": loose}}]
    for choice in ("auto", "none", "required"):
        refused = _refusal({"messages": MESSAGES, "tools": tools, "tool_choice": choice})
        assert refused.param == "tools[1].function.parameters.additionalProperties", refused.message
    tools[1]["function"]["strict"] = False  # type: ignore[index]
    parse_chat_request({"messages": MESSAGES, "tools": tools, "tool_choice": "required"})
    no_parameters = [{"type": "function", "function": {"name": "now", "strict": True}}]
    parse_chat_request({"messages": MESSAGES, "tools": no_parameters})


def test_a_batch_line_with_a_broken_strict_schema_becomes_its_error_line() -> None:
    line = json.dumps({"custom_id": "s-1", "method": "POST", "url": "/v1/chat/completions",
                       "body": _format({"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": False})})
    with pytest.raises(LineError) as caught:
        parse_batch_line(line.encode(), 7)
    assert caught.value.custom_id == "s-1"
    assert caught.value.error.param == "body.response_format.json_schema.schema.properties.a"
    assert caught.value.error.message.startswith("line 7: 'body.response_format.json_schema.schema.properties.a': 'required' must list")
