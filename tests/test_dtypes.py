"""CHATBATCH_DTYPE (worker/models/dtypes.py): what `auto` picks from the instruction sets torch
reports, the model run in the dtype asked for, greedy answers within a dtype, the dtype in the
heartbeat and `chatbatch models`, and a wrong value refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from chatbatch.settings import Settings
from producer import Client
from schemas import ChatCompletion, parse_chat_request
from tests.conftest import RedisServer, Worker, run_cli, user
from tests.test_engine import PROMPTS, _generate_alone, _run_together
from worker.models.dtypes import choose, cpu_capabilities, cpu_runs_bf16, dtype_name
from worker.models.model import build_engine, load_runner

CPU = torch.device("cpu")


def _settings(**extra: object) -> Settings:
    return Settings(redis_url="redis://127.0.0.1:1/0", **extra)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("capabilities", "native"),
    [
        ({"architecture": "x86_64", "avx512_f": True, "avx512_bf16": True, "amx_tile": True, "amx_bf16": True}, True),
        ({"architecture": "x86_64", "avx512_f": True, "avx512_bf16": True, "amx_bf16": False}, True),
        ({"architecture": "x86_64", "avx512_f": True, "avx512_bf16": False, "amx_bf16": False}, False),
        ({"architecture": "x86_64", "avx2": True}, False),
        ({"architecture": "aarch64", "neon": True}, False),
    ],
    ids=["amx", "avx512-bf16", "avx512-without-bf16", "avx2", "arm"],
)
def test_a_cpu_runs_bf16_natively_with_amx_or_avx512_bf16(capabilities: dict[str, object], native: bool) -> None:
    assert cpu_runs_bf16(capabilities) is native


def test_auto_on_this_cpu_is_what_the_instruction_sets_torch_reports_call_for() -> None:
    reported = torch.cpu.get_capabilities()
    assert dict(cpu_capabilities()) == dict(reported)
    native = bool(reported.get("amx_bf16") or reported.get("avx512_bf16")) and torch.backends.mkldnn.is_available()
    assert choose("auto", CPU) == (torch.bfloat16 if native else torch.float32)


@pytest.mark.parametrize("name", ["float32", "bfloat16", "float16"])
def test_the_model_runs_in_the_dtype_named(tiny_model: Path, name: str) -> None:
    runner = load_runner(str(tiny_model), _settings(dtype=name))
    assert runner.dtype == name
    assert {p.dtype for p in runner.model.parameters()} == {getattr(torch, name)}
    (answer,), _ = _run_together(runner, [parse_chat_request(user("hi", max_tokens=6, temperature=0))])
    assert isinstance(answer, ChatCompletion) and answer.usage.completion_tokens >= 1


def test_auto_loads_the_model_in_the_dtype_auto_picks_here(tiny_model: Path) -> None:
    runner = load_runner(str(tiny_model), _settings(dtype="auto"))
    assert runner.model.dtype == choose("auto", CPU)
    assert runner.dtype == dtype_name(choose("auto", CPU))


def test_the_system_fingerprint_differs_between_dtypes(tiny_model: Path) -> None:
    settings = {name: _settings(dtype=name) for name in ("float32", "bfloat16")}
    prints = {name: build_engine(load_runner(str(tiny_model), s), s).fingerprint for name, s in settings.items()}
    assert None not in prints.values() and prints["float32"] != prints["bfloat16"]


def test_bf16_greedy_alone_equals_generate_and_a_batch_answers_the_same_every_time(tiny_model: Path) -> None:
    """Within bf16: a request alone answers as transformers' generate does alone, and the same
    batch gives the same answers run after run. (A request's bf16 answer may still differ with
    what shares its batch: docs/engine.md.)"""
    runner = load_runner(str(tiny_model), _settings(dtype="bfloat16"))
    requests = [parse_chat_request(user(text, max_tokens=16, temperature=0)) for text in PROMPTS]
    for text, request in zip(PROMPTS, requests):
        (alone,), _ = _run_together(runner, [request])
        assert isinstance(alone, ChatCompletion)
        assert alone.choices[0].message.content == _generate_alone(runner, text, 16), text
    runs = []
    for _ in range(2):
        outcomes, stats = _run_together(runner, requests, max_batch_size=len(requests))
        assert stats["largest_batch"] == len(requests)
        runs.append([o.choices[0].message.content for o in outcomes if isinstance(o, ChatCompletion)])
    assert len(runs[0]) == len(requests) and runs[0] == runs[1]


def test_a_dtype_not_listed_is_refused_saying_which_are(base_env: dict[str, str]) -> None:
    with pytest.raises(ValidationError) as caught:
        _settings(dtype="fp8")
    assert "'bfloat16'" in str(caught.value)
    with pytest.raises(ValueError, match="CHATBATCH_DTYPE must be one of auto, float32, bfloat16, float16; got 'fp8'"):
        choose("fp8", CPU)
    done = run_cli({**base_env, "CHATBATCH_DTYPE": "fp8"}, "worker", timeout=120)
    assert done.returncode == 2
    assert "CHATBATCH_DTYPE: Input should be 'auto', 'float32', 'bfloat16' or 'float16'" in done.stderr


def test_the_heartbeat_and_chatbatch_models_name_the_dtype_auto_picked(
    tiny_model: Path, base_env: dict[str, str], aof_redis: RedisServer, tmp_path: Path
) -> None:
    env = {k: v for k, v in base_env.items() if k != "CHATBATCH_DTYPE"} | {"CHATBATCH_REDIS_URL": aof_redis.url}
    worker = Worker(env, tmp_path / "worker.log", "--model", str(tiny_model))
    try:
        info = worker.wait_ready("tiny-llama-chat", aof_redis.client())
        picked = dtype_name(choose("auto", CPU))
        assert (info["device"], info["dtype"]) == ("cpu", picked)
        listed = json.loads(run_cli(env, "models").stdout)
        assert [entry["dtype"] for entry in listed["tiny-llama-chat"]] == [picked]
        answer = Client(Settings(redis_url=aof_redis.url)).chat(user("hi", max_tokens=4, temperature=0), timeout=120)
        assert answer.usage.completion_tokens >= 1
        assert f"transformers (cpu, {picked})" in worker.output()
    finally:
        worker.stop()
