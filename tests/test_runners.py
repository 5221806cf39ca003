"""The whole OpenAI chat request on a real worker (worker/models/runners.py and its sampler stage):
structured outputs, log probabilities, penalties and logit bias, the developer role, tools, and
images refused. Every feature runs in one batch beside requests that do not use it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch

from chatbatch.exceptions import RequestFailedError
from chatbatch.settings import Settings
from producer import Client
from schemas import BatchRequestOutput, ChatCompletion, ErrorCode, RequestError
from tests.conftest import RedisServer, Worker, batch_line, user

MODEL = "tiny-llama-chat"
#: Bounded fields, so that even a random model's answer ends well within max_tokens.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
    },
    "required": ["name", "age", "color", "tags"],
    "additionalProperties": False,
}
POINT = {"type": "object", "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9}, "ok": {"type": "boolean"}},
         "required": ["x", "ok"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"], "additionalProperties": False}}}


def _schema(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}


def _run_file(client: Client, tmp_path: Path, lines: list[str]) -> dict[str, BatchRequestOutput]:
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(lines) + "\n")
    job = client.submit_file(str(source)).wait(timeout=300)
    assert job.status.value == "completed"
    answered = [BatchRequestOutput.model_validate_json(line) for _, line in client.job(job.id).lines()]
    return {line.custom_id: line for line in answered if line.custom_id}


def _completion(line: BatchRequestOutput) -> ChatCompletion:
    assert line.response is not None and line.error is None, line
    return ChatCompletion.model_validate(line.response.body)


def test_json_mode_schemas_and_plain_lines_share_one_batch_and_every_json_answer_validates(
    tiny_worker: Worker, redis_server: RedisServer, tmp_path: Path
) -> None:
    client = Client(Settings(redis_url=redis_server.url, chunk_size=64))
    before = tiny_worker.info(redis_server.client(), MODEL)
    lines: list[str] = []
    for i in range(6):
        lines.append(batch_line(f"object-{i}", user(f"a JSON object {i}", response_format={"type": "json_object"}, max_tokens=180, temperature=0)))
        lines.append(batch_line(f"person-{i}", user(f"a person {i}", response_format=_schema("person", PERSON), max_tokens=180, temperature=1.0, seed=i)))
        lines.append(batch_line(f"point-{i}", user(f"a point {i}", response_format=_schema("point", POINT), max_tokens=60, temperature=0.7)))
        lines.append(batch_line(f"plain-{i}", user(f"plain text {i}", max_tokens=8, temperature=0.9)))
    answers = _run_file(client, tmp_path, lines)
    assert len(answers) == len(lines)
    for custom_id, line in answers.items():
        choice = _completion(line).choices[0]
        if custom_id.startswith("plain"):
            continue
        assert choice.finish_reason == "stop", (custom_id, choice)
        value = json.loads(choice.message.content or "")
        if custom_id.startswith("object"):
            assert isinstance(value, dict)
        else:
            jsonschema.validate(value, PERSON if custom_id.startswith("person") else POINT)
    after = tiny_worker.info(redis_server.client(), MODEL)
    assert int(after["batches"]) - int(before["batches"]) < len(lines) // 4, "the mixed settings shared batches"  # type: ignore[call-overload]


def test_an_answer_cut_by_max_tokens_mid_json_ends_length(tiny_worker: Worker, redis_server: RedisServer) -> None:
    client = Client(Settings(redis_url=redis_server.url))
    completion = client.chat(user("cut me", response_format=_schema("person", PERSON), max_tokens=4, temperature=0), timeout=120)
    choice = completion.choices[0]
    assert choice.finish_reason == "length" and (choice.message.content or "").startswith("{")
    with pytest.raises(ValueError):
        json.loads(choice.message.content or "")


def test_a_schema_the_grammar_cannot_compile_is_refused_never_run_free(redis_server: RedisServer, tmp_path: Path) -> None:
    client = Client(Settings(redis_url=redis_server.url))
    bad = _schema("bad", {"type": "object", "properties": {"a": {"$ref": "#/definitions/missing"}}})
    with pytest.raises(RequestError) as caught:
        client.submit(user("x", response_format=bad))
    assert caught.value.code is ErrorCode.invalid_request and "response_format.json_schema.schema" in caught.value.message


@pytest.fixture(scope="module")
def runner(tiny_model: Path) -> Any:
    """The tiny model, loaded in this process too: the reference for the worker's numbers."""
    from worker.models.model import load_runner

    return load_runner(str(tiny_model), Settings(redis_url="redis://127.0.0.1:1/0", dtype="float32"))


def _top_tokens(runner: Any, text: str, count: int) -> list[int]:
    """The `count` most likely first tokens of the answer to `text`, by the model itself."""
    prompt = runner.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    with torch.inference_mode():
        logits = runner.model(input_ids=torch.tensor([runner.tokenizer(prompt, add_special_tokens=False)["input_ids"]])).logits[0, -1]
    return [int(t) for t in logits.topk(count).indices.tolist()]


def test_logprobs_are_the_models_own_for_exactly_the_tokens_returned(tiny_worker: Worker, redis_server: RedisServer, runner: Any) -> None:
    client = Client(Settings(redis_url=redis_server.url))
    completion = client.chat(user("tell me", max_tokens=12, temperature=0, logprobs=True, top_logprobs=5), timeout=120)
    choice = completion.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    entries = choice.logprobs.content
    returned = completion.usage.completion_tokens - (1 if choice.finish_reason == "stop" else 0)
    assert len(entries) == returned, "one entry per token returned (an EOS that ended it is not returned)"
    assert b"".join(bytes(entry.bytes or []) for entry in entries).decode(errors="replace") == choice.message.content
    for entry in entries:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 5
        values = [top.logprob for top in entry.top_logprobs]
        assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)
        assert abs(entry.logprob - values[0]) < 1e-5, "greedy: the chosen token is the most likely one"
    # The same numbers from one direct forward pass of the model over the prompt and the answer.
    prompt = runner.tokenizer.apply_chat_template([{"role": "user", "content": "tell me"}], tokenize=False, add_generation_prompt=True)
    prompt_ids = runner.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        generated = runner.model.generate(torch.tensor([prompt_ids]), max_new_tokens=12, do_sample=False, pad_token_id=runner.pad_id)
        answer_ids = [t for t in generated[0, len(prompt_ids):].tolist() if t not in runner.eos_ids][: len(entries)]
        logits = runner.model(input_ids=torch.tensor([prompt_ids + answer_ids])).logits[0].float()
    assert runner.tokenizer.decode(answer_ids, skip_special_tokens=True) == choice.message.content
    expected = torch.log_softmax(logits[len(prompt_ids) - 1 : -1], dim=-1)
    for position, (entry, token) in enumerate(zip(entries, answer_ids)):
        assert abs(float(expected[position, token]) - entry.logprob) < 1e-3, position


def test_logit_bias_bans_and_forces_and_penalties_change_the_answer(tiny_worker: Worker, redis_server: RedisServer, runner: Any) -> None:
    client = Client(Settings(redis_url=redis_server.url))
    top = _top_tokens(runner, "repeat after me", 3)
    handles = {
        "free": client.submit(user("repeat after me", max_tokens=16, temperature=0, logprobs=True)),
        "banned": client.submit(user("repeat after me", max_tokens=16, temperature=0, logprobs=True, logit_bias={str(top[0]): -100})),
        "forced": client.submit(user("repeat after me", max_tokens=6, temperature=1.2, seed=3, logprobs=True, logit_bias={str(top[2]): 100})),
        # A bias of 20 makes greedy repeat one token; penalties grow with each repeat until they outweigh it.
        "repeating": client.submit(user("repeat after me", max_tokens=16, temperature=0, logprobs=True, logit_bias={str(top[1]): 20})),
        "penalized": client.submit(user("repeat after me", max_tokens=16, temperature=0, logprobs=True, logit_bias={str(top[1]): 20},
                                        presence_penalty=2, frequency_penalty=2)),
    }
    answers = {name: handle.result(timeout=120).choices[0] for name, handle in handles.items()}

    def tokens(name: str) -> list[bytes]:
        logprobs = answers[name].logprobs
        assert logprobs is not None and logprobs.content is not None
        return [bytes(entry.bytes or []) for entry in logprobs.content]

    assert tokens("free")[0] == runner.grammars.token_bytes(top[0]), "unbiased, greedy takes the most likely token"
    assert runner.grammars.token_bytes(top[0]) not in tokens("banned"), "a banned token never comes"
    assert tokens("forced") == [runner.grammars.token_bytes(top[2])] * 6, "a forced token always does"
    repeated = runner.grammars.token_bytes(top[1])
    assert tokens("repeating") == [repeated] * 16
    assert 1 <= tokens("penalized").count(repeated) < 12, "each repeat costs more, until other tokens win"


def test_the_developer_role_reaches_a_template_without_it_as_system(tiny_worker: Worker, redis_server: RedisServer) -> None:
    """The tiny model's ChatML template knows no `developer`: the message is the system prompt,
    so the greedy answer is the one a system message gets (and differs from none at all)."""
    client = Client(Settings(redis_url=redis_server.url))

    def answer(*first: dict[str, str]) -> str | None:
        body = {"messages": [*first, {"role": "user", "name": "ada", "content": "hi"}], "max_tokens": 8, "temperature": 0}
        return client.chat(body, timeout=120).choices[0].message.content

    developer = answer({"role": "developer", "content": "answer briefly"})
    assert developer == answer({"role": "system", "content": "answer briefly"})
    assert developer != answer()


def test_required_and_named_tool_choice_give_calls_whose_arguments_validate(tiny_worker: Worker, redis_server: RedisServer, tmp_path: Path) -> None:
    client = Client(Settings(redis_url=redis_server.url))
    lines = [
        # One call each: a random model would add calls to the list until max_tokens.
        batch_line(f"required-{i}", user(f"weather or time {i}", tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False,
                                         max_tokens=120, temperature=1.0, seed=i))
        for i in range(4)
    ] + [
        batch_line(f"named-{i}", user(f"weather {i}", tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                      max_tokens=120, temperature=0.5))
        for i in range(4)
    ] + [batch_line("parallel", user("several calls", tools=[WEATHER, TIME], tool_choice="required", max_tokens=160, temperature=0))]
    parameters = {tool["function"]["name"]: tool["function"]["parameters"] for tool in (WEATHER, TIME)}  # type: ignore[index]
    for custom_id, line in _run_file(client, tmp_path, lines).items():
        choice = _completion(line).choices[0]
        if custom_id == "parallel" and choice.finish_reason == "length":
            continue  # a list of calls the model did not end within max_tokens
        assert choice.finish_reason == "tool_calls" and choice.message.content is None, (custom_id, choice)
        calls = choice.message.tool_calls or []
        assert calls and all(call.id.startswith("call_") and call.type == "function" for call in calls)
        if custom_id != "parallel":
            assert len(calls) == 1
        if custom_id.startswith("named"):
            assert calls[0].function.name == "get_weather"
        for call in calls:
            jsonschema.validate(json.loads(call.function.arguments), parameters[call.function.name])


def test_an_image_part_is_refused_saying_the_model_reads_text_only(redis_server: RedisServer) -> None:
    client = Client(Settings(redis_url=redis_server.url))
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                                      {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]}
    with pytest.raises(RequestError) as caught:
        client.submit(body)
    assert caught.value.code is ErrorCode.invalid_request
    assert "images are not supported by this model" in caught.value.message and caught.value.param == "messages[0].content[1]"


def test_a_pyfunc_model_refuses_what_needs_the_decode_loop(aof_redis: RedisServer, base_env: dict[str, str], tmp_path: Path) -> None:
    import mlflow

    from tests.conftest import ROOT

    model = tmp_path / "reverse"
    mlflow.pyfunc.save_model(str(model), python_model=str(ROOT / "tests" / "data" / "reverse_chat_model.py"), pip_requirements=["mlflow"])
    worker = Worker({**base_env, "CHATBATCH_REDIS_URL": aof_redis.url}, tmp_path / "w.log", "--model", str(model), "--served-model-name", "reverse")
    try:
        worker.wait_ready("reverse", aof_redis.client())
        client = Client(Settings(redis_url=aof_redis.url))
        with pytest.raises(RequestFailedError) as caught:
            client.chat(user("abc", logprobs=True), timeout=120)
        assert caught.value.code == "unsupported_parameter" and "'reverse'" in caught.value.message and "logprobs" in caught.value.message
        assert client.chat(user("abc"), timeout=120).choices[0].message.content == "cba"
    finally:
        worker.stop()


def test_a_forced_call_cut_by_max_tokens_is_a_call_not_text(tiny_worker: Worker, redis_server: RedisServer, tmp_path: Path) -> None:
    """Greedy answers cut at several lengths: each is tool calls (never grammar text in
    `content`), finish_reason "length", and the arguments are the beginning of those of the
    same answer left to end."""
    client = Client(Settings(redis_url=redis_server.url))
    named = {"type": "function", "function": {"name": "get_weather"}}
    asks: dict[str, dict[str, Any]] = {"required": dict(tool_choice="required", parallel_tool_calls=False), "named": dict(tool_choice=named)}

    def body(ask: dict[str, Any], max_tokens: int) -> dict[str, object]:
        return user("weather?", tools=[WEATHER, TIME], max_tokens=max_tokens, temperature=0, **ask)

    wholes = {kind: _completion(line) for kind, line in _run_file(client, tmp_path, [batch_line(kind, body(ask, 120)) for kind, ask in asks.items()]).items()}
    cuts = {kind: sorted({1, *(whole.usage.completion_tokens * k // 5 for k in range(1, 5)), whole.usage.completion_tokens - 2}) for kind, whole in wholes.items()}
    lines = [batch_line(f"{kind}-{cut}", body(asks[kind], cut)) for kind in asks for cut in cuts[kind]]
    answers = {custom_id: _completion(line) for custom_id, line in _run_file(client, tmp_path, lines).items()}
    for kind, whole in wholes.items():
        assert whole.choices[0].finish_reason == "tool_calls" and len(whole.choices[0].message.tool_calls or []) == 1
        full = (whole.choices[0].message.tool_calls or [])[0].function
        with_name = 0
        for cut in cuts[kind]:
            answer = answers[f"{kind}-{cut}"]
            choice = answer.choices[0]
            assert choice.finish_reason == "length" and answer.usage.completion_tokens == cut, (kind, cut, choice)
            assert choice.message.content is None, (kind, cut, choice.message.content)
            for call in choice.message.tool_calls or []:
                assert call.id.startswith("call_") and call.type == "function"
                assert call.function.name == full.name and full.arguments.startswith(call.function.arguments), (kind, cut, call)
                with_name += 1
        assert with_name >= 3, f"{kind}: most cuts come after the call's name was written"
        if kind == "named":
            assert with_name == len(cuts[kind]), "a named call has its name from the first token"


def test_a_schema_without_additional_properties_generates_only_its_keys(tiny_worker: Worker, redis_server: RedisServer, tmp_path: Path) -> None:
    client = Client(Settings(redis_url=redis_server.url))
    open_point = {key: value for key, value in POINT.items() if key != "additionalProperties"}
    lines = [batch_line(f"p-{i}", user(f"a point {i}", response_format=_schema("point", open_point), max_tokens=60, temperature=1.0, seed=i))
             for i in range(8)]
    for custom_id, line in _run_file(client, tmp_path, lines).items():
        choice = _completion(line).choices[0]
        assert choice.finish_reason == "stop", (custom_id, choice)
        assert set(json.loads(choice.message.content or "")) == {"x", "ok"}, (custom_id, choice.message.content)
