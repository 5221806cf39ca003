"""worker/decode/chat_format.py: roles and tools as templates take them, and tool calls parsed back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from schemas import parse_chat_request
from worker.decode.chat_format import ChatFormat, parse_hermes

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


@pytest.fixture(scope="module")
def chatml(tiny_model: Path) -> Any:
    """The tiny model's tokenizer: a ChatML template that knows neither tools nor developer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model / "components" / "tokenizer"))


def test_developer_becomes_system_for_a_template_that_does_not_know_it(chatml: Any) -> None:
    fmt = ChatFormat(chatml, "tiny")
    assert not fmt.knows_developer
    text = fmt.render(parse_chat_request({"messages": [{"role": "developer", "content": "be terse"}, {"role": "user", "content": "hi"}]}))
    assert "<|im_start|>system\nbe terse<|im_end|>" in text and "developer" not in text


def test_a_template_that_knows_developer_gets_it(chatml: Any) -> None:
    chatml.chat_template = chatml.chat_template.replace("{% for message", "{# developer #}{% for message")
    try:
        fmt = ChatFormat(chatml, "tiny")
        text = fmt.render(parse_chat_request({"messages": [{"role": "developer", "content": "be terse"}, {"role": "user", "content": "hi"}]}))
        assert fmt.knows_developer and "<|im_start|>developer\nbe terse" in text
    finally:
        chatml.chat_template = chatml.chat_template.replace("{# developer #}", "")


def test_a_template_without_tools_is_taught_them_the_hermes_way(chatml: Any) -> None:
    fmt = ChatFormat(chatml, "tiny")
    assert not fmt.native_tools and fmt.hermes
    request = parse_chat_request({
        "messages": [
            {"role": "user", "content": "weather in Paris?"},
            {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
        ],
        "tools": TOOLS,
    })
    text = fmt.render(request)
    assert '<tools>[{"name":"get_weather"' in text and "<tool_call>" in text
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in text
    assert "<|im_start|>tool\n<tool_response>\n18C\n</tool_response>" in text
    forced = fmt.render(parse_chat_request({"messages": [{"role": "user", "content": "x"}], "tools": TOOLS, "tool_choice": "required"}))
    assert "<tools>" not in forced and "Answer with a call of: get_weather (Weather now)." in forced, "a forced call: the names only"


def test_a_template_with_its_own_tool_format_refuses_auto(chatml: Any) -> None:
    chatml.chat_template = "{% if tools %}[TOOLS]{{ tools | tojson }}[/TOOLS]{% endif %}" + chatml.chat_template
    try:
        fmt = ChatFormat(chatml, "some-model")
        assert fmt.native_tools and not fmt.hermes
        error = fmt.check(parse_chat_request({"messages": [{"role": "user", "content": "x"}], "tools": TOOLS}))
        assert error is not None and error.code.value == "unsupported_parameter" and "'some-model'" in error.message
        assert fmt.check(parse_chat_request({"messages": [{"role": "user", "content": "x"}], "tools": TOOLS, "tool_choice": "required"})) is None
        assert '[TOOLS][{"type": "function"' in fmt.render(parse_chat_request({"messages": [{"role": "user", "content": "x"}], "tools": TOOLS, "tool_choice": "required"}))
    finally:
        chatml.chat_template = chatml.chat_template.split("{% endif %}", 1)[1]


def test_hermes_calls_are_parsed_and_the_rest_is_kept() -> None:
    text = 'Let me look.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n<tool_call>not json</tool_call>'
    content, calls = parse_hermes(text)
    assert calls == [("get_weather", '{"city": "Paris"}')]
    assert content == "Let me look.\n\n<tool_call>not json</tool_call>"
    assert parse_hermes('<tool_call>{"name": "f", "arguments": {}}</tool_call>') == (None, [("f", "{}")])
    assert parse_hermes("just text") == ("just text", [])
    assert json.loads(calls[0][1]) == {"city": "Paris"}


def test_an_auto_call_cut_by_max_tokens_ends_the_answer_as_a_call() -> None:
    names = {"get_weather"}
    cut = 'Let me look. <tool_call>{"name": "get_weather", "arguments": {"city": "Par'
    assert parse_hermes(cut, names, cut=True) == ("Let me look.", [("get_weather", '{"city": "Par')])
    assert parse_hermes(cut, names) == (cut, []), "an answer that ended by itself keeps an open block as text"
    assert parse_hermes('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}', names, cut=True) == (
        None, [("get_weather", '{"city": "Paris"}')]), "complete arguments come as JSON, without the block's own brace"
    assert parse_hermes('<tool_call>{"name": "get_weather"', names, cut=True) == (None, [("get_weather", "")])
    after_one = '<tool_call>{"name": "get_weather", "arguments": {}}</tool_call> and <tool_call>{"name": "get_weather", "parameters": {"d'
    assert parse_hermes(after_one, names, cut=True) == ("and", [("get_weather", "{}"), ("get_weather", '{"d')])
    for stays_text in ('Sure <tool_call>{"name": "get_wea', '<tool_call>{"name": "other", "arguments": {', "<tool_call>{"):
        assert parse_hermes(stays_text, names, cut=True) == (stays_text, []), "no call without one of the tools' names written whole"
