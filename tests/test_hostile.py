"""Hostile input: every line ends as exactly one output or error line, and nothing crashes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatbatch.exceptions import RequestFailedError
from chatbatch.settings import Settings
from producer import Client
from schemas import BatchRequestOutput, ErrorCode, LineError, ParsedLine, RequestError, parse_batch_line
from tests.conftest import RedisServer, Worker, batch_line, run_cli, user

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
roles = st.sampled_from(["system", "user", "assistant", "tool", "", "robot"])
messages = st.lists(
    st.fixed_dictionaries({"role": roles, "content": st.text(max_size=30) | json_values}), max_size=3
)
bodies = st.fixed_dictionaries(
    {"messages": messages},
    optional={
        "max_tokens": st.integers(-2, 40) | json_values,
        "temperature": st.floats(-1, 3) | st.just(float("nan")) | json_values,
        "top_p": st.floats(-0.5, 1.5),
        "n": st.integers(-1, 20),
        "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=6),
        "seed": st.integers(),
        "stream": st.booleans(),
        "model": st.sampled_from(["tiny-llama-chat", "missing-model"]),
        "surprise": json_values,
    },
)


def _line(custom_id: str, body: object) -> bytes:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}).encode()


raw_lines = st.one_of(
    st.builds(lambda body: _line("x", body), bodies),
    st.builds(lambda value: json.dumps(value).encode(), json_values),
    st.binary(max_size=60),
    st.builds(lambda depth: b"[" * depth + b"]" * depth, st.integers(1, 200)),
)


@settings(max_examples=400, deadline=None)
@given(raw_lines)
def test_any_line_parses_or_fails_with_a_code(raw: bytes) -> None:
    try:
        parsed = parse_batch_line(raw, 3)
    except LineError as error:
        assert isinstance(error.error.code, ErrorCode)
        assert "line 3" in str(error)
    else:
        assert isinstance(parsed, ParsedLine)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(st.tuples(st.booleans(), bodies, raw_lines), min_size=1, max_size=6))
def test_every_line_ends_as_exactly_one_line(tiny_worker: Worker, redis_server: RedisServer, tmp_path: Path, lines: list[tuple[bool, dict, bytes]]) -> None:  # type: ignore[type-arg]
    source = tmp_path / "fuzz.jsonl"
    raw: list[bytes] = []
    for i, (as_body, body, junk) in enumerate(lines):
        if as_body:
            body = {**body, "max_tokens": 2} if isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 2 else body
            raw.append(_line(f"id-{i}", body))
        else:
            raw.append(junk.replace(b"\n", b" ").replace(b"\r", b" "))
    source.write_bytes(b"\n".join(raw) + b"\n")
    expected = sum(1 for line in raw if line.strip())
    client = Client(Settings(redis_url=redis_server.url))
    job = client.submit_file(str(source)).wait(timeout=120)
    assert job.status.value == "completed"
    answered = [BatchRequestOutput.model_validate_json(line) for _, line in client.job(job.id).lines()]
    assert len(answered) == expected == job.request_counts.total
    assert job.request_counts.completed + job.request_counts.failed == expected
    numbers = [a.error.line for a in answered if a.error]
    assert len(numbers) == len(set(numbers))


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (user("x" * 10_000_000), ErrorCode.line_too_large),
        (user("x", n=17), ErrorCode.invalid_request),
        ({"messages": [{"role": "user", "content": "x"}] * 2049}, ErrorCode.invalid_request),
        (user("x", temperature=-1), ErrorCode.invalid_request),
        ({"messages": []}, ErrorCode.invalid_request),
        (user("an unpaired surrogate \udc80"), ErrorCode.invalid_request),
    ],
)
def test_single_requests_over_the_limits_are_refused_at_submit(redis_server: RedisServer, body: dict, code: ErrorCode) -> None:  # type: ignore[type-arg]
    client = Client(Settings(redis_url=redis_server.url))
    with pytest.raises(RequestError) as caught:
        client.submit(body)
    assert caught.value.code is code


def test_huge_and_hostile_lines_in_a_file(tiny_worker: Worker, base_env: dict[str, str], tmp_path: Path) -> None:
    lines = [
        batch_line("ok", user("fine", max_tokens=2)).encode(),
        batch_line("huge", user("x" * 10_000_000)).encode(),
        b'{"custom_id": "bytes", "body": "\xff\xfe\xfa"}',
        b"[" * 5000 + b"]" * 5000,
        batch_line("nan", user("x", temperature=float("nan"))).encode(),
        batch_line("neg", user("x", temperature=-0.5)).encode(),
        batch_line("empty", {"messages": []}).encode(),
        batch_line("too-many-tokens", user("x", max_tokens=10**9)).encode(),
        batch_line("ok2", user("fine too", max_tokens=2)).encode(),
    ]
    source = tmp_path / "hostile.jsonl"
    source.write_bytes(b"\n".join(lines) + b"\n")
    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    done = run_cli(base_env, "submit", str(source), "--wait", "--output", str(out), "--errors", str(err))
    assert done.returncode == 0, done.stderr
    assert [BatchRequestOutput.model_validate_json(x).custom_id for x in out.read_text().splitlines()] == ["ok", "ok2"]
    errors = {e.error.line: e.error.code for e in map(BatchRequestOutput.model_validate_json, err.read_text().splitlines()) if e.error}
    assert errors == {
        2: ErrorCode.line_too_large,
        3: ErrorCode.invalid_json,  # not UTF-8
        4: ErrorCode.invalid_json,  # nested 5,000 deep
        5: ErrorCode.invalid_request,
        6: ErrorCode.invalid_request,
        7: ErrorCode.invalid_request,
        8: ErrorCode.context_length_exceeded,
    }


def test_request_failed_error_for_context(tiny_worker: Worker, redis_server: RedisServer) -> None:
    client = Client(Settings(redis_url=redis_server.url))
    with pytest.raises(RequestFailedError) as caught:
        client.chat(user("word " * 400, max_tokens=4), timeout=60)
    assert caught.value.code == "context_length_exceeded"
