"""worker/decode/grammar.py and chatbatch/structured.py: schemas compiled once, refused clearly, and
masks that only let valid JSON through."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch

from chatbatch.structured import check_schema, schema_for
from schemas import ErrorCode, RequestError, parse_chat_request
from worker.decode.grammar import Grammars, apply_bitmask, cut_calls, forced_calls

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}, "c": {"enum": ["a", "b"]}},
          "required": ["n", "c"], "additionalProperties": False}


@pytest.fixture(scope="module")
def grammars(tiny_model: Path) -> Grammars:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model / "components" / "tokenizer"))
    return Grammars(tokenizer, len(tokenizer) + 3, {tokenizer.eos_token_id})


def _request(**fields: Any) -> Any:
    return parse_chat_request({"messages": [{"role": "user", "content": "x"}], **fields})


def test_random_logits_under_the_mask_give_valid_json(grammars: Grammars) -> None:
    torch.manual_seed(1)
    for _ in range(10):
        matcher = grammars.matcher(SCHEMA, "response_format")
        bitmask = torch.full((1, grammars.mask_width), -1, dtype=torch.int32)
        tokens: list[int] = []
        while not matcher.is_stopped():
            grammars.fill([(matcher, 0)], bitmask)
            logits = torch.randn(1, grammars.vocab_size)
            apply_bitmask(logits, bitmask)
            token = int(torch.argmax(logits))
            assert matcher.consume_token(token), matcher.get_error()
            tokens.append(token)
            assert len(tokens) < 100
        text = grammars.tokenizer.decode_str([t for t in tokens if t not in grammars.tokenizer.eos_tokens])
        jsonschema.validate(json.loads(text), SCHEMA)


def test_tokens_past_the_tokenizer_are_always_masked(grammars: Grammars) -> None:
    matcher = grammars.matcher(SCHEMA, "response_format")
    bitmask = torch.full((1, grammars.mask_width), -1, dtype=torch.int32)
    grammars.fill([(matcher, 0)], bitmask)
    logits = torch.zeros(1, grammars.vocab_size)
    apply_bitmask(logits, bitmask)
    assert torch.isinf(logits[0, -3:]).all(), "the padding of the logits beyond the vocabulary is never chosen"
    assert torch.isfinite(logits).sum() >= 1


def test_a_schema_that_cannot_be_compiled_is_refused_naming_the_field(grammars: Grammars) -> None:
    bad = _request(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}})
    with pytest.raises(RequestError) as caught:
        check_schema(bad, prefix="body.")
    assert caught.value.code is ErrorCode.invalid_request
    assert "'body.response_format.json_schema.schema'" in caught.value.message and "/nowhere" in caught.value.message
    with pytest.raises(RequestError, match="response_format.json_schema.schema"):
        grammars.matcher(*schema_for(bad))  # type: ignore[misc]


def test_one_compile_per_distinct_schema(grammars: Grammars) -> None:
    before = len(grammars._compiled)
    first, second = grammars.matcher({"type": "object", "properties": {"z": {"type": "boolean"}}}, "x"), grammars.matcher({"type": "object", "properties": {"z": {"type": "boolean"}}}, "x")
    assert first is not second, "each row has its own matcher"
    assert len(grammars._compiled) == before + 1


def test_forced_calls_follow_tool_choice() -> None:
    tools: list[dict[str, Any]] = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}},
             {"type": "function", "function": {"name": "g"}}]
    named = _request(tools=tools, tool_choice={"type": "function", "function": {"name": "f"}})
    assert schema_for(named) == ({**tools[0]["function"]["parameters"], "additionalProperties": False}, "tools[0].function.parameters")
    assert forced_calls('{"a":1}', named) == [("f", '{"a": 1}')]
    required = _request(tools=tools, tool_choice="required", parallel_tool_calls=False)
    schema, _ = schema_for(required)  # type: ignore[misc]
    assert schema["maxItems"] == 1 and [c["properties"]["name"]["const"] for c in schema["items"]["anyOf"]] == ["f", "g"]
    assert forced_calls('[{"name": "g", "arguments": {}}]', required) == [("g", "{}")]
    assert schema_for(_request(tools=tools)) is None, "auto: the model chooses"
    assert schema_for(_request(response_format={"type": "json_object"})) == ({"type": "object"}, "response_format")


def test_required_calls_keep_each_tools_defs_and_errors_name_the_tool(grammars: Grammars) -> None:
    with_defs = {"type": "function", "function": {"name": "a", "parameters": {
        "$defs": {"P": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["x"]}},
        "type": "object", "properties": {"p": {"$ref": "#/$defs/P"}}, "required": ["p"], "additionalProperties": False}}}
    plain = {"type": "function", "function": {"name": "b", "parameters": {"type": "object", "properties": {"y": {"type": "boolean"}}}}}
    request = _request(tools=[with_defs, plain], tool_choice="required", parallel_tool_calls=False)
    check_schema(request)
    schema, _ = schema_for(request)  # type: ignore[misc]
    assert schema["$defs"]["a"]["properties"]["p"]["$ref"] == "#/$defs/a/$defs/P"
    matcher = grammars.matcher(schema, "tools")
    assert matcher.consume_tokens(grammars.tokenizer.tokenize_str('[{"name": "a", "arguments": {"p": {"x": 3}}}]'))
    assert matcher.is_accepting()
    broken = {"type": "function", "function": {"name": "c", "parameters": {"type": "object", "properties": {"z": {"$ref": "#/missing"}}}}}
    with pytest.raises(RequestError, match=r"'tools\[1\]\.function\.parameters'"):
        check_schema(_request(tools=[plain, broken], tool_choice="required"))
    with pytest.raises(RequestError, match=r"'tools\[1\]\.function\.parameters'"):
        check_schema(_request(tools=[plain, broken], tool_choice={"type": "function", "function": {"name": "c"}}))


def _accepts(grammars: Grammars, schema: dict[str, Any], text: str) -> bool:
    matcher = grammars.matcher(schema, "response_format.json_schema.schema")
    return bool(matcher.consume_tokens(grammars.tokenizer.tokenize_str(text))) and bool(matcher.is_accepting())


def _format(schema: dict[str, Any]) -> Any:
    return _request(response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}})


def test_a_schema_generates_no_key_it_does_not_declare_unless_it_allows_more(grammars: Grammars) -> None:
    person: dict[str, Any] = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                               "pet": {"type": "object", "properties": {"kind": {"type": "string"}}}}}
    schema, _ = schema_for(_format(person))  # type: ignore[misc]
    assert _accepts(grammars, schema, '{"name": "Jason", "age": 25, "pet": {"kind": "cat"}}')
    assert _accepts(grammars, schema, '{"age": 25}'), "properties that are not required may still be left out"
    assert not _accepts(grammars, schema, '{"Jason": "25} Im safe now!"}')
    assert not _accepts(grammars, schema, '{"name": "J", "pet": {"kind": "cat", "legs": 4}}'), "nested objects too"
    assert person["properties"]["pet"] == {"type": "object", "properties": {"kind": {"type": "string"}}}, "the request is left as sent"

    allowed = {**person, "additionalProperties": True}
    assert _accepts(grammars, schema_for(_format(allowed))[0], '{"name": "J", "extra": [1]}')  # type: ignore[index]
    typed = {**person, "additionalProperties": {"type": "integer"}}
    assert _accepts(grammars, schema_for(_format(typed))[0], '{"name": "J", "extra": 1}')  # type: ignore[index]
    assert not _accepts(grammars, schema_for(_format(typed))[0], '{"name": "J", "extra": "x"}')  # type: ignore[index]
    free = {"type": "object", "properties": {"meta": {"type": "object"}}}
    assert _accepts(grammars, schema_for(_format(free))[0], '{"meta": {"any": 1}}'), "an object that lists no properties stays free"  # type: ignore[index]
    assert _accepts(grammars, schema_for(_request(response_format={"type": "json_object"}))[0], '{"any": 1}')  # type: ignore[index]

    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}}]
    named, _ = schema_for(_request(tools=tools, tool_choice={"type": "function", "function": {"name": "f"}}))  # type: ignore[misc]
    assert not _accepts(grammars, named, '{"a": 1, "b": 2}')
    required, _ = schema_for(_request(tools=tools, tool_choice="required"))  # type: ignore[misc]
    assert not _accepts(grammars, required, '[{"name": "f", "arguments": {"b": 2}}]')
    assert _accepts(grammars, required, '[{"name": "f", "arguments": {"a": 2}}]')


def test_composed_objects_keep_every_parts_properties(grammars: Grammars) -> None:
    """allOf parts, and properties beside anyOf or $ref, are intersected by the grammar: they
    stay as written (closing each part would make the whole unsatisfiable)."""
    base = {"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"]}
    inherited = {"$defs": {"Base": base},
                 "allOf": [{"$ref": "#/$defs/Base"}, {"properties": {"name": {"type": "string"}}, "required": ["name"]}]}
    request = _format(inherited)
    check_schema(request)
    assert _accepts(grammars, schema_for(request)[0], '{"id": 1, "name": "x"}')  # type: ignore[index]
    tagged = {"type": "object", "properties": {"kind": {"type": "integer"}}, "required": ["kind"],
              "anyOf": [{"properties": {"a": {"type": "integer"}}, "required": ["a"]}, {"properties": {"b": {"type": "integer"}}, "required": ["b"]}]}
    assert _accepts(grammars, schema_for(_format(tagged))[0], '{"kind": 1, "b": 2}')  # type: ignore[index]
    union = {"anyOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}, {"type": "null"}]}
    assert not _accepts(grammars, schema_for(_format(union))[0], '{"a": 1, "z": 2}'), "a plain union's objects are closed"  # type: ignore[index]
    named_property = {"type": "object", "properties": {"properties": {"type": "object", "properties": {"x": {"type": "integer"}}}}}
    assert _accepts(grammars, schema_for(_format(named_property))[0], '{"properties": {"x": 1}}')  # type: ignore[index]


@pytest.mark.parametrize(
    ("text", "calls"),
    [
        ("", []),
        ('[{"name": "get', []),
        ('[{"name": "get"', [("get", "")]),
        ('[{"name": "get_weather", "argu', [("get_weather", "")]),
        ('[{"name": "get_weather", "arguments": {"city": "Par', [("get_weather", '{"city": "Par')]),
        ('[{"name": "get_weather", "arguments": {"city": "Paris"}', [("get_weather", '{"city": "Paris"}')]),
        ('[{"name": "get", "arguments": {}}, {"name": "get_weather", "arguments": {"ci',
         [("get", "{}"), ("get_weather", '{"ci')]),
        ('[{"name": "get", "arguments": {}}, ', [("get", "{}")]),
    ],
)
def test_a_required_call_cut_by_max_tokens_is_the_calls_as_far_as_written(text: str, calls: list[tuple[str, str]]) -> None:
    tools = [{"type": "function", "function": {"name": "get"}}, {"type": "function", "function": {"name": "get_weather"}}]
    assert cut_calls(text, _request(tools=tools, tool_choice="required")) == calls


def test_a_named_call_cut_by_max_tokens_keeps_its_name_and_the_arguments_written() -> None:
    named = _request(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice={"type": "function", "function": {"name": "f"}})
    assert cut_calls("", named) == [("f", "")]
    assert cut_calls('{"a": [1, ', named) == [("f", '{"a": [1, ')]
    assert cut_calls('{"a":1}', named) == [("f", '{"a": 1}')]
