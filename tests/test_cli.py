"""End to end through a real redis-server and a real `chatbatch worker` on the tiny model."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import pytest

from chatbatch import keys
from chatbatch.settings import Settings
from producer import Client
from schemas import BatchJob, BatchRequestOutput, ChatCompletion, ErrorCode
from tests.conftest import CHATBATCH, ROOT, RedisServer, Worker, batch_line, run_cli, user, wait_for

MODEL = "tiny-llama-chat"


def _read_lines(path: Path) -> list[BatchRequestOutput]:
    return [BatchRequestOutput.model_validate_json(line) for line in path.read_text().splitlines()]


def test_chat_prints_a_chat_completion(tiny_worker: Worker, base_env: dict[str, str]) -> None:
    done = run_cli(base_env, "chat", "--max-tokens", "6", "--temperature", "0", "hello there")
    assert done.returncode == 0, done.stderr
    completion = ChatCompletion.model_validate_json(done.stdout)
    assert completion.model == MODEL
    assert completion.usage.completion_tokens <= 6
    assert completion.choices[0].finish_reason in ("stop", "length")
    # Greedy is deterministic: the same question gets the same answer.
    again = ChatCompletion.model_validate_json(
        run_cli(base_env, "chat", "--max-tokens", "6", "--temperature", "0", "hello there").stdout
    )
    assert again.choices[0].message.content == completion.choices[0].message.content
    assert again.id != completion.id


def test_chat_stream_prints_the_text_as_it_comes(tiny_worker: Worker, base_env: dict[str, str]) -> None:
    whole = ChatCompletion.model_validate_json(run_cli(base_env, "chat", "--max-tokens", "30", "--temperature", "0", "stream this").stdout)
    done = run_cli(base_env, "chat", "--stream", "--max-tokens", "30", "--temperature", "0", "stream this")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{whole.choices[0].message.content}\n"


def test_submit_wait_writes_one_output_line_per_input_line(tiny_worker: Worker, base_env: dict[str, str], tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    ids = [f"req-{i}" for i in range(40)]
    source.write_text(
        "\n".join(batch_line(cid, user("count " * (i % 7), max_tokens=3 + i % 5, temperature=0)) for i, cid in enumerate(ids)) + "\n"
    )
    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    done = run_cli(base_env, "submit", str(source), "--wait", "--output", str(out), "--errors", str(err), "--metadata", "team=test")
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip()
    lines = _read_lines(out)
    assert [line.custom_id for line in lines] == ids, "one line per input line, in input order"
    assert err.read_text() == ""
    for line in lines:
        assert line.error is None and line.response is not None and line.response.status_code == 200
        completion = ChatCompletion.model_validate(line.response.body)
        assert completion.model == MODEL
    assert len({line.id for line in lines}) == len(lines)

    job = BatchJob.model_validate_json(run_cli(base_env, "status", job_id).stdout)
    assert job.status.value == "completed"
    assert job.request_counts.model_dump() == {"total": 40, "completed": 40, "failed": 0}
    assert job.metadata == {"team": "test"}
    assert job.created_at <= job.in_progress_at <= job.completed_at  # type: ignore[operator]

    printed = run_cli(base_env, "results", job_id)
    assert printed.returncode == 0
    assert printed.stdout.splitlines() == out.read_text().splitlines()


BAD_LINES = {
    # line number (1-based) -> (raw line, expected code)
    2: ("{this is not json", ErrorCode.invalid_json),
    4: (batch_line("no-messages", {"max_tokens": 3}), ErrorCode.invalid_request),
    5: (batch_line("bad-role", {"messages": [{"role": "robot", "content": "x"}]}), ErrorCode.invalid_request),
    7: (batch_line("good-0", user("again")), ErrorCode.duplicate_custom_id),
    8: (batch_line("wrong-url", user("x"), url="/v1/completions"), ErrorCode.invalid_url),
    10: (batch_line("streaming", user("x", stream=True)), ErrorCode.unsupported_parameter),
    11: (batch_line("zero-tokens", user("x", max_tokens=0)), ErrorCode.invalid_request),
    13: (batch_line("too-long", user("word " * 400, max_tokens=8)), ErrorCode.context_length_exceeded),
    14: (batch_line("other-model", user("x", model="no-such-model")), ErrorCode.model_not_found),
}


def test_bad_lines_become_error_lines_and_good_lines_run(tiny_worker: Worker, base_env: dict[str, str], tmp_path: Path) -> None:
    raw: list[str] = []
    good: list[str] = []
    for number in range(1, 17):
        if number in BAD_LINES:
            raw.append(BAD_LINES[number][0])
        else:
            cid = f"good-{len(good)}"
            good.append(cid)
            raw.append(batch_line(cid, user(f"line {number}", max_tokens=4, temperature=0)))
    source = tmp_path / "mixed.jsonl"
    source.write_text("\n".join(raw) + "\n")
    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    done = run_cli(base_env, "submit", str(source), "--wait", "--output", str(out), "--errors", str(err))
    assert done.returncode == 0, done.stderr  # a job whose bad lines became error lines completed

    assert [line.custom_id for line in _read_lines(out)] == good
    errors = _read_lines(err)
    assert [e.error.line for e in errors if e.error] == sorted(BAD_LINES)
    for line in errors:
        assert line.error is not None
        expected = BAD_LINES[line.error.line][1]  # type: ignore[index]
        assert line.error.code is expected, line
        assert f"line {line.error.line}" in line.error.message or expected is ErrorCode.context_length_exceeded
    names = {e.error.line: e.custom_id for e in errors if e.error}
    assert names[2] is None and names[4] == "no-messages" and names[7] == "good-0"
    job = BatchJob.model_validate_json(run_cli(base_env, "status", done.stdout.strip()).stdout)
    assert job.request_counts.model_dump() == {"total": 16, "completed": len(good), "failed": len(BAD_LINES)}


def test_python_api_and_cross_task_batching(tiny_worker: Worker, redis_server: RedisServer, tmp_path: Path) -> None:
    client = Client(Settings(redis_url=redis_server.url, chunk_size=3))
    before = tiny_worker.info(redis_server.client(), MODEL)
    handles = [client.submit(user(f"q{i}", max_tokens=5, temperature=0)) for i in range(12)]
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(batch_line(f"c{i}", user("z" * i, max_tokens=5)) for i in range(30)))
    job = client.submit_file(str(source))
    for handle in handles:
        assert handle.result(timeout=120).model == MODEL
    record = job.wait(timeout=120)
    assert record.request_counts.completed == 30
    kinds = [kind for kind, _ in job.lines()]
    assert kinds == ["output"] * 30

    def after() -> dict[str, object] | None:
        info = tiny_worker.info(redis_server.client(), MODEL)
        return info if info["requests"] >= before["requests"] + 42 else None  # type: ignore[operator]

    info = wait_for(after, 30, "a heartbeat with the new requests")
    # Requests of different tasks met in one batch: chunks hold 3 lines, single requests 1.
    assert info["largest_batch"] > 3
    assert info["batches"] - before["batches"] < 42  # type: ignore[operator]


def test_model_is_loaded_once_per_worker_process(tiny_worker: Worker, base_env: dict[str, str], redis_server: RedisServer) -> None:
    for i in range(3):
        assert run_cli(base_env, "chat", "--max-tokens", "2", f"ping {i}").returncode == 0
    def beat() -> dict[str, object] | None:
        info = tiny_worker.info(redis_server.client(), MODEL)
        return info if info["requests"] >= 3 else None  # type: ignore[operator]

    info = wait_for(beat, 30, "a heartbeat with the requests")
    assert info["model_loads"] == 1
    assert tiny_worker.output().count("loaded model") == 1
    # Once ready, the worker froze what it loaded out of garbage collection (worker/service/heap.py).
    assert info["frozen_objects"] > 100_000  # type: ignore[operator]


def test_requests_route_by_model_name(tiny_worker: Worker, base_env: dict[str, str]) -> None:
    named = run_cli(base_env, "chat", "--model", MODEL, "--max-tokens", "3", "hi")
    assert named.returncode == 0, named.stderr
    assert ChatCompletion.model_validate_json(named.stdout).model == MODEL
    other = run_cli(base_env, "chat", "--model", "gpt-4o", "hi", timeout=60)
    assert other.returncode == 1
    assert "model_not_found" in other.stderr and "gpt-4o" in other.stderr
    listed = json.loads(run_cli(base_env, "models").stdout)
    assert MODEL in listed


def test_single_result_is_kept_with_a_ttl(tiny_worker: Worker, redis_server: RedisServer) -> None:
    from chatbatch import keys

    client = Client(Settings(redis_url=redis_server.url))
    handle = client.submit(user("ttl", max_tokens=2))
    handle.result(timeout=60)
    ttl = redis_server.client().ttl(keys.result(handle.id))
    assert 0 < ttl <= Settings().result_ttl
    assert client.request(handle.id).result(timeout=1).id == handle.result(timeout=1).id


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (["chat", "hi"], {"CHATBATCH_REDIS_URL": "redis://127.0.0.1:9/0"}, "cannot reach Redis"),
        (["chat", "hi"], {"CHATBATCH_REDIS_URL": "http://x"}, "CHATBATCH_REDIS_URL"),
        (["submit", "/no/such/file.jsonl"], {}, "cannot read /no/such/file.jsonl"),
        (["submit", "examples/sample.jsonl", "--output", "o.jsonl"], {}, "--wait"),
        (["submit", "examples/sample.jsonl"], {"CHATBATCH_MAX_FILE_BYTES": "10"}, "CHATBATCH_MAX_FILE_BYTES"),
        (["submit", "examples/sample.jsonl"], {"CHATBATCH_MAX_FILE_LINES": "1"}, "CHATBATCH_MAX_FILE_LINES"),
        (["submit", "examples/sample.jsonl", "--metadata", "novalue"], {}, "key=value"),
        (["status", "batch_missing"], {}, "no job 'batch_missing'"),
        (["chat"], {}, "Missing argument"),
    ],
)
def test_commands_that_cannot_start_exit_2_with_one_line(args: list[str], env: dict[str, str], needle: str, base_env: dict[str, str]) -> None:
    done = run_cli({**base_env, **env}, *args, timeout=60)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert needle in done.stderr
    assert "Traceback" not in done.stderr


def test_redis_password_never_printed(base_env: dict[str, str]) -> None:
    done = run_cli({**base_env, "CHATBATCH_REDIS_URL": "redis://user:s3cret-pw@127.0.0.1:9/0"}, "chat", "hi", timeout=60)
    assert done.returncode == 2
    assert "s3cret-pw" not in done.stderr + done.stdout
    assert "***" in done.stderr


def test_chat_with_no_live_worker_says_so_then_answers_once_one_starts(aof_redis: RedisServer, base_env: dict[str, str], tiny_model: Path, tmp_path: Path) -> None:
    env = {**base_env, "CHATBATCH_REDIS_URL": aof_redis.url}
    chat = subprocess.Popen([*CHATBATCH, "chat", "--max-tokens", "3", "anyone there?"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    said: list[tuple[float, str]] = []

    def read_stderr() -> None:
        assert chat.stderr is not None
        for line in chat.stderr:
            said.append((time.monotonic(), line))

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    r = aof_redis.client()
    enqueued = wait_for(lambda: r.hlen(keys.PENDING_REQUESTS) == 1 and time.monotonic(), 60, "the request to be enqueued", interval=0.01)
    wait_for(lambda: said, 5, "the notice on stderr", interval=0.01)
    at, line = said[0]
    assert at - enqueued < 1.0, f"the notice came {at - enqueued:.2f}s after the request was enqueued"
    assert "no live worker consumes 'chatbatch'" in line and "chatbatch worker --model" in line
    assert chat.poll() is None, "it still waits"
    worker = Worker(env, tmp_path / "worker.log", "--model", str(tiny_model))
    try:
        worker.wait_ready(MODEL, r)
        out, _ = chat.communicate(timeout=120)
        assert chat.returncode == 0
        assert ChatCompletion.model_validate_json(out).model == MODEL
    finally:
        worker.stop()


def test_submit_wait_with_no_live_worker_says_so(aof_redis: RedisServer, base_env: dict[str, str], tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text(batch_line("a", user("x", max_tokens=2)) + "\n")
    done = run_cli({**base_env, "CHATBATCH_REDIS_URL": aof_redis.url}, "submit", str(source), "--wait", "--timeout", "2", timeout=60)
    assert done.returncode == 1, done.stderr
    assert "no live worker consumes 'chatbatch'" in done.stderr and "still in_progress" in done.stderr


def test_chat_answers_json_by_a_schema_file_and_submit_runs_every_feature(tiny_worker: Worker, base_env: dict[str, str], tmp_path: Path) -> None:
    import jsonschema

    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}, "ok": {"type": "boolean"}},
              "required": ["n", "ok"], "additionalProperties": False}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    done = run_cli(base_env, "chat", "--schema", str(tmp_path / "schema.json"), "--logprobs", "2", "--max-tokens", "40", "--temperature", "0", "a number")
    assert done.returncode == 0, done.stderr
    choice = ChatCompletion.model_validate_json(done.stdout).choices[0]
    jsonschema.validate(json.loads(choice.message.content or ""), schema)
    assert choice.logprobs is not None and choice.logprobs.content
    tool = {"type": "function", "function": {"name": "f", "parameters": schema}}
    source = tmp_path / "features.jsonl"
    source.write_text("\n".join([
        batch_line("json", user("x", response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}, max_tokens=40)),
        batch_line("tool", user("x", tools=[tool], tool_choice={"type": "function", "function": {"name": "f"}}, max_tokens=40)),
        batch_line("scored", user("x", logprobs=True, top_logprobs=1, presence_penalty=1, logit_bias={"5": -100}, max_tokens=4)),
        batch_line("developer", {"messages": [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "x"}], "max_tokens": 4}),
        batch_line("image", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]}),
    ]) + "\n")
    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    done = run_cli(base_env, "submit", str(source), "--wait", "--output", str(out), "--errors", str(err))
    assert done.returncode == 0, done.stderr
    answers = {str(line.custom_id): line for line in _read_lines(out)}
    assert sorted(answers) == ["developer", "json", "scored", "tool"]
    tool_call = ChatCompletion.model_validate(answers["tool"].response.body).choices[0].message.tool_calls  # type: ignore[union-attr]
    assert tool_call and jsonschema.validate(json.loads(tool_call[0].function.arguments), schema) is None
    (refused,) = _read_lines(err)
    assert refused.custom_id == "image" and refused.error is not None and "images are not supported" in refused.error.message
