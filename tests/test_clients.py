"""Conformance: the clients people use drive the gateway as their own docs show them — the
`openai` package (its newest release, from the test environment, and the release instructor
allows, from .venv-clients), instructor, langchain-openai and litellm.

Their pins conflict with each other and with the test environment's, and they only speak HTTP:
they live in a virtual environment of their own, .venv-clients (requirements/clients.txt,
built by `make test`), and each runs as a subprocess, a script of tests/clients/ that runs its
scenarios against the gateway started here and writes what it saw as JSON. The tests below
check those results, one test per scenario. The gateway fronts a worker on the tiny model, and
one on the default model for the scenarios whose answer's content matters (JSON mode, where
the prompt alone names the keys; instructor's `create_iterable`, which extracts real objects).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from schemas import BatchRequestOutput, ChatCompletion
from tests.conftest import ROOT, RedisServer, Worker, served_gateway

CLIENTS = ROOT / "tests" / "clients"
CLIENTS_PYTHON = ROOT / ".venv-clients" / "bin" / "python"
TINY = "tiny-llama-chat"
DEFAULT = "SmolLM2-135M-Instruct"
FINGERPRINT = re.compile(r"^fp_[0-9a-f]{10}$")
NO_DETAILS = {"reasoning_tokens": 0, "audio_tokens": 0, "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}


@pytest.fixture(scope="module")
def base_url(tiny_worker: Worker, base_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with served_gateway(base_env, tmp_path_factory.mktemp("clients") / "gateway.log") as url:
        yield f"{url}/v1"


@pytest.fixture(scope="module")
def default_worker(
    default_model: Path, base_env: dict[str, str], redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Worker]:
    worker = Worker(base_env, tmp_path_factory.mktemp("clients") / "default-worker.log", "--model", str(default_model))
    try:
        worker.wait_ready(DEFAULT, redis_server.client())
        yield worker
    finally:
        worker.stop()


class Outcomes:
    """What a client script saw, by scenario; a scenario that raised fails the test that reads it."""

    def __init__(self, script: str, found: dict[str, dict[str, Any]]) -> None:
        self.script = script
        self.found = found

    def __getitem__(self, name: str) -> Any:
        outcome = self.found[name]
        if "error" in outcome:
            pytest.fail(f"{self.script} {name} raised in the client: {outcome['error']}\n{outcome['traceback']}")
        return outcome["result"]


def run_client(script: str, scenarios: list[str], base_url: str, scratch: Path, *, python: Path | str = CLIENTS_PYTHON) -> Outcomes:
    """Run a client script's scenarios with `python` against the gateway at `base_url`."""
    if not Path(python).exists():
        pytest.fail(f"{python} is missing: `make test` builds the clients' environment (scripts/bootstrap.sh --clients)")
    results = scratch / f"{script}.json"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(scratch), "CHATBATCH_BASE_URL": base_url,
        "CHATBATCH_TINY_MODEL": TINY, "CHATBATCH_DEFAULT_MODEL": DEFAULT, "CLIENT_RESULTS": str(results),
        # Nothing but the gateway is reachable: no client may fetch anything at start.
        "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LANGSMITH_TRACING": "false", "NO_PROXY": "127.0.0.1,localhost",
    }
    done = subprocess.run([str(python), script, *scenarios], env=env, cwd=CLIENTS, capture_output=True, text=True, timeout=900)
    if not results.exists():
        pytest.fail(f"{script} wrote no results (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return Outcomes(script, json.loads(results.read_text()))


# The openai package.

OPENAI_SCENARIOS = ["create", "send_back", "parse", "stream_helper", "function_tool", "files", "batches", "raw_response", "errors", "async_stream"]


@pytest.fixture(scope="module", params=["newest", "instructor's"])
def openai_sdk(request: pytest.FixtureRequest, base_url: str, tmp_path_factory: pytest.TempPathFactory) -> Outcomes:
    """The openai scenarios with the newest `openai` (the test environment's) and with the
    release instructor holds it to (.venv-clients)."""
    python = sys.executable if request.param == "newest" else CLIENTS_PYTHON
    return run_client("with_openai.py", OPENAI_SCENARIOS, base_url, tmp_path_factory.mktemp("openai"), python=python)


def test_openai_answers_carry_openais_fields(openai_sdk: Outcomes) -> None:
    seen = openai_sdk["create"]
    answer = seen["answer"]
    ChatCompletion.model_validate(answer)
    assert FINGERPRINT.match(answer["system_fingerprint"]) and answer["service_tier"] == "default"
    message = answer["choices"][0]["message"]
    assert message["refusal"] is None and message["annotations"] == []
    details = answer["usage"]["completion_tokens_details"]
    assert {name: details[name] for name in NO_DETAILS} == NO_DETAILS
    assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    # The SDK's `_request_id` reads x-request-id: a chat request's own id.
    assert seen["request_id"] == answer["id"]


def test_openai_sends_back_what_it_received(openai_sdk: Outcomes) -> None:
    seen = openai_sdk["send_back"]
    answers = [m for m in seen["sent"] if m["role"] == "assistant"]
    # The messages went back as the SDK dumps them: every answer field, null or not.
    assert all({"refusal", "annotations", "audio", "function_call", "tool_calls"} <= m.keys() for m in answers)
    assert answers[1]["tool_calls"] and answers[1]["tool_calls"][0]["function"]["name"] == "get_weather"
    answer = seen["answer"]
    ChatCompletion.model_validate(answer)
    assert answer["service_tier"] == "flex"


def test_openai_parse(openai_sdk: Outcomes) -> None:
    seen = openai_sdk["parse"]
    assert seen["finish_reason"] == "stop"
    assert seen["parsed"] == json.loads(seen["content"]) and set(seen["parsed"]) == {"x", "y", "visible"}


def test_openai_stream_helper(openai_sdk: Outcomes) -> None:
    seen = openai_sdk["stream_helper"]
    assert {"chunk", "content.delta", "content.done"} <= set(seen["kinds"])
    final = seen["final"]
    assert seen["text"] == final["choices"][0]["message"]["content"]
    assert seen["parsed"] == json.loads(seen["text"])
    assert final["usage"]["completion_tokens"] > 0 and FINGERPRINT.match(final["system_fingerprint"])


def test_openai_pydantic_function_tool(openai_sdk: Outcomes) -> None:
    seen = openai_sdk["function_tool"]
    assert seen["finish_reason"] == "tool_calls" and seen["content"] is None
    [call] = seen["calls"]
    assert call["name"] == "GetWeather"
    assert call["parsed"]["city"] in ("Paris", "Rome", "Oslo") and call["parsed"]["unit"] in ("celsius", "fahrenheit")


def test_openai_files(openai_sdk: Outcomes) -> None:
    seen = openai_sdk["files"]
    assert seen["uploaded"]["purpose"] == "batch" and seen["found"]["id"] == seen["uploaded"]["id"]
    assert seen["listed"] and seen["same_content"] and seen["deleted"] and seen["after_delete"] == 404


def test_openai_batches(openai_sdk: Outcomes) -> None:
    seen = openai_sdk["batches"]
    batch = seen["batch"]
    assert batch["status"] == "completed" and batch["request_counts"] == {"total": 3, "completed": 2, "failed": 1}
    assert batch["metadata"] == {"suite": "clients"} and seen["listed"]
    outputs = [BatchRequestOutput.model_validate(line) for line in seen["output"]]
    tiers = {o.custom_id: o.response.body["service_tier"] for o in outputs if o.response}
    assert tiers == {"plain": "default", "first": "priority"}
    assert all(FINGERPRINT.match(o.response.body["system_fingerprint"]) for o in outputs if o.response)
    [refused] = [BatchRequestOutput.model_validate(line) for line in seen["errors"]]
    assert refused.custom_id == "refused" and refused.error is not None and refused.error.code.value == "unsupported_parameter"


def test_openai_with_raw_response_headers(openai_sdk: Outcomes) -> None:
    seen = openai_sdk["raw_response"]
    headers, streamed = seen["headers"], seen["stream_headers"]
    assert headers["x-request-id"] == headers["x-chatbatch-request-id"] == seen["id"] == seen["request_id"]
    assert headers["openai-processing-ms"].isdigit()
    assert streamed["x-request-id"] == seen["stream_id"] and streamed["openai-processing-ms"].isdigit()
    assert seen["models_headers"]["x-request-id"].startswith("req_") and {TINY, DEFAULT} & set(seen["models"])


def test_openai_errors(openai_sdk: Outcomes) -> None:
    seen = openai_sdk["errors"]
    assert [(e["raised"], e["status"], e["code"], e["param"]) for e in seen] == [
        ("BadRequestError", 400, "invalid_request", "colour"),
        ("BadRequestError", 400, "unsupported_parameter", "reasoning_effort"),
        ("BadRequestError", 400, "unsupported_parameter", "store"),
        ("NotFoundError", 404, "model_not_found", "model"),
        ("BadRequestError", 400, "unsupported_parameter", "verbosity"),
        ("NotFoundError", 404, "not_found", None),
    ]
    assert all(e["request_id"] and e["request_id"] == e["header"] for e in seen)


def test_openai_async_stream(openai_sdk: Outcomes) -> None:
    chunks = openai_sdk["async_stream"]["chunks"]
    first = chunks[0]["choices"][0]["delta"]
    assert first["role"] == "assistant" and first["refusal"] is None
    assert {(c["service_tier"], c["system_fingerprint"]) for c in chunks} == {("priority", chunks[0]["system_fingerprint"])}
    assert FINGERPRINT.match(chunks[0]["system_fingerprint"])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    assert all(c["usage"] is None for c in chunks[:-1])


# instructor.


@pytest.fixture(scope="module")
def instructor_tiny(base_url: str, tmp_path_factory: pytest.TempPathFactory) -> Outcomes:
    return run_client("with_instructor.py", ["json_schema", "tools", "create_partial"], base_url, tmp_path_factory.mktemp("instructor"))


@pytest.mark.parametrize(("scenario", "finish"), [("json_schema", "stop"), ("tools", "tool_calls")])
def test_instructor_response_model(instructor_tiny: Outcomes, scenario: str, finish: str) -> None:
    seen = instructor_tiny[scenario]
    assert seen["finish_reason"] == finish
    assert isinstance(seen["user"]["name"], str) and len(seen["user"]["name"]) <= 10 and 0 <= seen["user"]["age"] <= 120


def test_instructor_create_partial(instructor_tiny: Outcomes) -> None:
    partials = instructor_tiny["create_partial"]["partials"]
    # Partial objects as the answer streamed in, the last one whole.
    assert len(partials) > 2 and partials[0]["age"] is None
    assert isinstance(partials[-1]["name"], str) and isinstance(partials[-1]["age"], int)


@pytest.mark.default_model
def test_instructor_create_iterable(default_worker: Worker, base_url: str, tmp_path: Path) -> None:
    users = run_client("with_instructor.py", ["create_iterable"], base_url, tmp_path)["create_iterable"]["users"]
    assert {"name": "Jason", "age": 10} in users and {"name": "John", "age": 30} in users


# langchain-openai.

LANGCHAIN_SCENARIOS = ["invoke", "stream", "batch", "structured_json_schema", "structured_function_calling", "bind_tools", "bind_tools_cut"]


@pytest.fixture(scope="module")
def langchain_tiny(base_url: str, tmp_path_factory: pytest.TempPathFactory) -> Outcomes:
    return run_client("with_langchain.py", LANGCHAIN_SCENARIOS, base_url, tmp_path_factory.mktemp("langchain"))


def test_langchain_invoke(langchain_tiny: Outcomes) -> None:
    seen = langchain_tiny["invoke"]
    assert isinstance(seen["content"], str) and seen["content"]
    metadata = seen["metadata"]
    assert metadata["finish_reason"] == "length" and metadata["model_name"] == TINY
    assert metadata["service_tier"] == "default" and FINGERPRINT.match(metadata["system_fingerprint"])
    assert seen["usage"]["output_tokens"] == 8 and seen["usage"]["output_token_details"]["reasoning"] == 0


def test_langchain_stream(langchain_tiny: Outcomes) -> None:
    seen = langchain_tiny["stream"]
    assert seen["chunks"] > 2 and seen["streamed"]["content"] == seen["invoked"]
    assert seen["streamed"]["usage"]["output_tokens"] == 8 and seen["streamed"]["metadata"]["finish_reason"] == "length"


def test_langchain_batch(langchain_tiny: Outcomes) -> None:
    answers = langchain_tiny["batch"]["answers"]
    assert len(answers) == 3 and len({a["metadata"]["id"] for a in answers}) == 3
    assert all(isinstance(a["content"], str) and a["content"] for a in answers)


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_with_structured_output(langchain_tiny: Outcomes, method: str) -> None:
    seen = langchain_tiny[f"structured_{method}"]
    assert seen["error"] is None and seen["parsed"] is not None
    assert set(seen["parsed"]) == {"name", "population"} and len(seen["parsed"]["name"]) <= 10


@pytest.mark.default_model
def test_langchain_with_structured_output_json_mode(default_worker: Worker, base_url: str, tmp_path: Path) -> None:
    seen = run_client("with_langchain.py", ["structured_json_mode"], base_url, tmp_path)["structured_json_mode"]
    assert seen["error"] is None and seen["parsed"] == {"name": "Paris", "population": 2_000_000}


def test_langchain_bind_tools(langchain_tiny: Outcomes) -> None:
    seen = langchain_tiny["bind_tools"]
    called = seen["called"]
    assert called["content"] == "" and called["metadata"]["finish_reason"] == "tool_calls" and called["invalid_tool_calls"] == []
    [call] = called["tool_calls"]
    assert call["name"] == "GetWeather" and call["args"]["city"] in ("Paris", "Rome", "Oslo")
    # The call and its result went back in the conversation, and were answered.
    assert isinstance(seen["answer"]["content"], str) and seen["answer"]["content"]


def test_langchain_bind_tools_cut_by_max_tokens(langchain_tiny: Outcomes) -> None:
    seen = langchain_tiny["bind_tools_cut"]
    assert seen["content"] == "" and seen["metadata"]["finish_reason"] == "length"
    calls = seen["tool_calls"] + seen["invalid_tool_calls"]
    assert [call["name"] for call in calls] == ["GetWeather"]


# litellm.


@pytest.fixture(scope="module")
def litellm_tiny(base_url: str, tmp_path_factory: pytest.TempPathFactory) -> Outcomes:
    return run_client("with_litellm.py", ["completion", "stream", "batches"], base_url, tmp_path_factory.mktemp("litellm"))


def test_litellm_completion(litellm_tiny: Outcomes) -> None:
    answer = litellm_tiny["completion"]["answer"]
    assert answer["model"] == TINY and FINGERPRINT.match(answer["system_fingerprint"])
    assert answer["choices"][0]["finish_reason"] == "length" and answer["usage"]["completion_tokens"] == 5


def test_litellm_stream(litellm_tiny: Outcomes) -> None:
    seen = litellm_tiny["stream"]
    assert seen["text"] == seen["whole"] and seen["finish_reasons"][-1] == "length"
    assert seen["usage"] is not None and seen["usage"]["completion_tokens"] == 5


def test_litellm_batch_helpers(litellm_tiny: Outcomes) -> None:
    seen = litellm_tiny["batches"]
    assert seen["file"]["purpose"] == "batch" and seen["batch"]["input_file_id"] == seen["file"]["id"]
    assert seen["batch"]["status"] == "completed" and seen["batch"]["request_counts"]["completed"] == 1
    [line] = [BatchRequestOutput.model_validate_json(x) for x in seen["output"].splitlines()]
    assert line.custom_id == "q1" and line.response is not None
    ChatCompletion.model_validate(line.response.body)
