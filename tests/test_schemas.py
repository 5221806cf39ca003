"""Wire formats: validation errors carry the right code and name the field."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from schemas import (
    BatchJob,
    ChatCompletion,
    ErrorCode,
    LineError,
    RequestError,
    parse_batch_line,
    parse_chat_request,
)

MESSAGES = [{"role": "user", "content": "hi"}]


def _code(body: object) -> tuple[ErrorCode, str]:
    with pytest.raises(RequestError) as caught:
        parse_chat_request(body)
    return caught.value.code, caught.value.message


@pytest.mark.parametrize(
    ("body", "code", "names"),
    [
        ({"messages": []}, ErrorCode.invalid_request, "messages"),
        ({}, ErrorCode.invalid_request, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, ErrorCode.invalid_request, "messages[0].role"),
        ({"messages": [{"role": "user"}]}, ErrorCode.invalid_request, "messages[0].content"),
        ({"messages": MESSAGES, "max_tokens": 0}, ErrorCode.invalid_request, "max_tokens"),
        ({"messages": MESSAGES, "max_completion_tokens": -3}, ErrorCode.invalid_request, "max_completion_tokens"),
        ({"messages": MESSAGES, "temperature": -0.5}, ErrorCode.invalid_request, "temperature"),
        ({"messages": MESSAGES, "temperature": float("nan")}, ErrorCode.invalid_request, "temperature"),
        ({"messages": MESSAGES, "top_p": 0}, ErrorCode.invalid_request, "top_p"),
        ({"messages": MESSAGES, "n": 0}, ErrorCode.invalid_request, "n"),
        ({"messages": MESSAGES, "stop": ["a", "b", "c", "d", "e"]}, ErrorCode.invalid_request, "stop"),
        ({"messages": MESSAGES, "colour": "red"}, ErrorCode.invalid_request, "colour"),
        ({"messages": MESSAGES, "stream": True}, ErrorCode.unsupported_parameter, "stream"),
        ({"messages": MESSAGES, "stream_options": {"include_usage": True}}, ErrorCode.invalid_request, "stream_options"),
        ({"messages": MESSAGES, "functions": [{"name": "f"}]}, ErrorCode.unsupported_parameter, "functions"),
        ({"messages": MESSAGES, "modalities": ["audio"]}, ErrorCode.unsupported_parameter, "modalities"),
        ({"messages": MESSAGES, "tools": [{"type": "function"}]}, ErrorCode.invalid_request, "tools[0].function"),
        ({"messages": MESSAGES, "top_logprobs": 21, "logprobs": True}, ErrorCode.invalid_request, "top_logprobs"),
        ({"messages": MESSAGES, "top_logprobs": 2}, ErrorCode.invalid_request, "logprobs"),
        ({"messages": MESSAGES, "presence_penalty": 2.5}, ErrorCode.invalid_request, "presence_penalty"),
        ({"messages": MESSAGES, "logit_bias": {"x": 1}}, ErrorCode.invalid_request, "logit_bias"),
        ({"messages": MESSAGES, "logit_bias": {"5": 101}}, ErrorCode.invalid_request, "logit_bias"),
        ({"messages": MESSAGES, "response_format": {"type": "xml"}}, ErrorCode.invalid_request, "response_format"),
        ({"messages": MESSAGES, "response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, ErrorCode.invalid_request, "json_schema.name"),
        ({"messages": MESSAGES, "tool_choice": "required"}, ErrorCode.invalid_request, "tool_choice needs 'tools'"),
        ({"messages": [{"role": "tool", "content": "42"}]}, ErrorCode.invalid_request, "tool_call_id"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
         ErrorCode.invalid_request, "images are not supported by this model"),
        ({"messages": MESSAGES, "max_tokens": 5, "max_completion_tokens": 6}, ErrorCode.invalid_request, "max_completion_tokens"),
        ({"messages": MESSAGES, "metadata": {f"k{i}": "v" for i in range(17)}}, ErrorCode.invalid_request, "metadata"),
        ({"messages": MESSAGES, "store": True}, ErrorCode.unsupported_parameter, "'store' is not supported"),
        ({"messages": MESSAGES, "reasoning_effort": "low"}, ErrorCode.unsupported_parameter, "'reasoning_effort'"),
        ({"messages": MESSAGES, "verbosity": "low"}, ErrorCode.unsupported_parameter, "'verbosity'"),
        ({"messages": MESSAGES, "service_tier": "scale"}, ErrorCode.invalid_request, "service_tier"),
        ({"messages": MESSAGES, "stream": True, "stream_options": {"include_obfuscation": [1]}},
         ErrorCode.invalid_request, "stream_options.include_obfuscation"),
        ({"messages": [{"role": "assistant", "content": None, "audio": {"id": "audio_1"}}]}, ErrorCode.invalid_request, "messages[0].audio"),
        ({"messages": [{"role": "assistant", "content": "x", "function_call": {"name": "f", "arguments": "{}"}}]},
         ErrorCode.invalid_request, "messages[0].function_call"),
        ({"messages": [{"role": "user", "content": "x", "refusal": "no"}]}, ErrorCode.invalid_request, "only assistant messages carry 'refusal'"),
        ({"messages": [{"role": "assistant", "content": None}]}, ErrorCode.invalid_request, "messages[0]"),
        ([1, 2], ErrorCode.invalid_request, "JSON object"),
    ],
)
def test_bad_bodies_name_the_field(body: object, code: ErrorCode, names: str) -> None:
    got, message = _code(body)
    assert got is code
    assert names in message


def test_single_requests_may_stream() -> None:
    body = {"messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}}
    request = parse_chat_request(body, streamable=True)
    assert request.stream and request.stream_options is not None and request.stream_options.include_usage
    with pytest.raises(RequestError) as caught:
        parse_chat_request(body, prefix="body.")
    assert caught.value.code is ErrorCode.unsupported_parameter and caught.value.param == "body.stream"


def test_harmless_known_fields_and_content_parts_are_accepted() -> None:
    request = parse_chat_request(
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            ],
            "stream": False,
            "logprobs": False,
            "frequency_penalty": 0,
            "max_completion_tokens": 7,
            "stop": "\n",
            "seed": 3,
            "user": "u1",
            "metadata": {"k": "v"},
        }
    )
    assert request.messages[1].text() == "ab"
    assert request.max_new_tokens == 7
    assert request.stop_sequences == ["\n"]
    assert request.temperature == 1.0


def test_what_the_sdks_send_back_is_accepted() -> None:
    """An answer's message as the SDKs dump it (`message.model_dump()`) goes back in the
    conversation, and the fields the SDKs send by default or as "off" are accepted."""
    answer: dict[str, Any] = {"content": "4", "refusal": None, "role": "assistant", "annotations": [], "audio": None, "function_call": None, "tool_calls": None}
    call: dict[str, Any] = {
        "content": None, "refusal": None, "role": "assistant", "annotations": None, "audio": None, "function_call": None,
        "tool_calls": [{"id": "call_1", "function": {"arguments": '{"city": "Paris"}', "name": "weather"}, "type": "function"}],
    }
    refused = {"role": "assistant", "content": None, "refusal": "I cannot help with that."}
    request = parse_chat_request(
        {
            "messages": [
                {"role": "user", "content": "2+2?"}, answer, {"role": "user", "content": "and the weather?"}, call,
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}, refused, {"role": "user", "content": "thanks"},
            ],
            "store": False,
            "safety_identifier": "user-7f3a",
            "prompt_cache_key": "support-bot-v2",
            "service_tier": "auto",
            "stream": True,
            "stream_options": {"include_usage": True, "include_obfuscation": False},
        },
        streamable=True,
    )
    assert [m.text() for m in request.messages][:2] == ["2+2?", "4"]
    assert request.messages[5].text() == "I cannot help with that."
    assert request.safety_identifier == "user-7f3a" and request.prompt_cache_key == "support-bot-v2"
    assert "store" not in request.model_dump(exclude_none=True)
    assert request.tier == "default"


@pytest.mark.parametrize(("tier", "runs_in"), [(None, "default"), ("auto", "default"), ("default", "default"), ("flex", "flex"), ("priority", "priority")])
def test_a_service_tier_names_the_tier_a_request_runs_in(tier: str | None, runs_in: str) -> None:
    body = {"messages": MESSAGES, **({"service_tier": tier} if tier else {})}
    assert parse_chat_request(body).tier == runs_in
    assert parse_batch_line(json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": body}).encode(), 1).body.tier == runs_in


def _line(**fields: object) -> bytes:
    base: dict[str, object] = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": MESSAGES}}
    base.update(fields)
    return json.dumps(base).encode()


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"{not json", ErrorCode.invalid_json),
        (b"\xff\xfe{}", ErrorCode.invalid_json),
        (b"[" * 70 + b"]" * 70, ErrorCode.invalid_json),
        (b"[1, 2]", ErrorCode.invalid_request),
        (_line(url="/v1/embeddings"), ErrorCode.invalid_url),
        (_line(method="GET"), ErrorCode.invalid_request),
        (_line(body={"messages": MESSAGES, "stream": True}), ErrorCode.unsupported_parameter),
        (_line(extra=1), ErrorCode.invalid_request),
        (_line(body={"messages": MESSAGES}) + b" " * 100, ErrorCode.line_too_large),
    ],
)
def test_bad_lines_carry_code_and_line_number(raw: bytes, code: ErrorCode) -> None:
    with pytest.raises(LineError) as caught:
        parse_batch_line(raw, 42, max_line_bytes=150)
    assert caught.value.error.code is code
    assert caught.value.line == 42
    assert "line 42" in str(caught.value)


def test_good_line_keeps_custom_id_and_body() -> None:
    parsed = parse_batch_line(_line(custom_id="x-1", body={"messages": MESSAGES, "max_tokens": 3}), 1)
    assert parsed.custom_id == "x-1"
    assert parsed.body.max_tokens == 3


def test_completion_and_job_shapes() -> None:
    completion = ChatCompletion.model_validate(
        {
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
    )
    assert completion.choices[0].finish_reason == "stop"
    with pytest.raises(ValueError):
        ChatCompletion.model_validate({**completion.model_dump(), "choices": [{"index": 0, "message": {"content": "x"}, "finish_reason": "eos"}]})
    job = BatchJob.model_validate(
        {"id": "batch_1", "input_file": "in.jsonl", "status": "in_progress", "created_at": 1,
         "request_counts": {"total": 3, "completed": 1, "failed": 1}}
    )
    assert job.object == "batch" and job.endpoint == "/v1/chat/completions"
    assert not job.status.is_final


def test_schemas_import_pydantic_only() -> None:
    code = (
        "import sys, schemas, schemas.batch, schemas.chat, schemas.job, schemas.errors;"
        "bad = {'torch', 'mlflow', 'celery', 'redis', 'boto3', 'transformers'} & set(sys.modules);"
        "print(sorted(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_producer_imports_no_torch_or_mlflow() -> None:
    code = "import sys, producer, gateway, cli.main; print(sorted({'torch', 'mlflow', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_chunks_are_sized_to_the_file() -> None:
    from producer.enqueue import MAX_CHUNK_LINES, MIN_CHUNK_LINES, chunk_lines

    assert chunk_lines(None) == MIN_CHUNK_LINES
    assert chunk_lines(10) == MIN_CHUNK_LINES
    assert chunk_lines(6_400) == 100  # about 64 chunks
    assert chunk_lines(50_000) == MAX_CHUNK_LINES


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b'{"messages": [{"role": "user", "content": "ok"}, {"role": "user", "content": "a\\udc80"}]}', "body.messages[1].content"),
        (b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}', "body.messages[0].content[0].text"),
        (b'{"messages": [{"role": "user", "content": "x"}], "stop": ["\\udfff"]}', "body.stop[0]"),
        (b'{"messages": [{"role": "user", "content": "x"}], "metadata": {"\\udc80": "v"}}', "body.metadata"),
        (b'{"messages": [{"role": "user", "content": "x"}], "\\udc80": 1}', "body"),
    ],
)
def test_text_that_is_not_valid_unicode_is_refused_naming_its_field(raw: bytes, field: str) -> None:
    """An unpaired surrogate (a JSON escape no UTF-8 text can hold) is refused where it was
    named, in a batch line and in a single request, never passed on to fail in the engine;
    the message carries the field's path, not the text (which no JSON error line could hold)."""
    line = b'{"custom_id": "s", "method": "POST", "url": "/v1/chat/completions", "body": ' + raw + b"}"
    with pytest.raises(LineError) as caught:
        parse_batch_line(line, 5)
    error = caught.value.error
    assert error.code is ErrorCode.invalid_request and error.param == field and "not valid Unicode" in error.message
    json.dumps(error.message, ensure_ascii=False).encode()  # an error line can carry it
    with pytest.raises(RequestError) as single:
        parse_chat_request(json.loads(raw))
    assert single.value.param == ("body" if field == "body" else field.removeprefix("body."))


def test_any_valid_unicode_passes() -> None:
    text = "héllo wörld, 日本語, emoji 🙂, a lone backslash \\ud800 written out, and a NUL \x00"
    assert parse_chat_request({"messages": [{"role": "user", "content": text}], "metadata": {"ключ": "значение"}}).messages[0].content == text
