"""chatbatch/celery_app.py: Celery's own tools (`celery inspect`, `celery control`, Flower)
against a live chatbatch worker."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from chatbatch.registry import live_models
from chatbatch.settings import Settings
from producer import Client
from tests.conftest import ROOT, RedisServer, Worker, batch_line, user, wait_for

CELERY = [sys.executable, "-m", "celery", "-A", "chatbatch.celery_app"]


def celery(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CELERY, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)


def worker_name(worker: Worker, server: RedisServer) -> str:
    """The Celery node name of a live worker, from its heartbeat."""
    return next(
        str(info["worker"]) for info in live_models(server.client())["tiny-llama-chat"] if info["pid"] == worker.process.pid
    )


def _replies(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """Node name -> its reply (`inspect` answers with one object, `control` with a list of
    one-node objects)."""
    assert done.returncode == 0, done.stderr
    replies = json.loads(done.stdout)
    return {name: reply for part in (replies if isinstance(replies, list) else [replies]) for name, reply in part.items()}


def test_inspect_shows_the_chunk_a_worker_runs_and_events_turn_on_and_off(
    tiny_worker: Worker, base_env: dict[str, str], redis_server: RedisServer, tmp_path: Path
) -> None:
    name = worker_name(tiny_worker, redis_server)
    assert name in _replies(celery(base_env, "inspect", "ping", "--json", "--timeout", "5", "-d", name))

    source = tmp_path / "slow.jsonl"
    source.write_text("".join(batch_line(f"s{i}", user(f"long {i}", max_tokens=200, temperature=0.9)) + "\n" for i in range(200)))
    handle = Client(Settings(redis_url=redis_server.url)).submit_file(str(source))
    try:

        def running_chunk() -> dict[str, Any] | None:
            active = _replies(celery(base_env, "inspect", "active", "--json", "--timeout", "5", "-d", name)).get(name, [])
            return next((task for task in active if handle.id in str(task.get("args"))), None)

        task = wait_for(running_chunk, 60, "the job's chunk in `inspect active`", interval=0.5)
        assert task["name"] == "chatbatch.chunk" and task["hostname"] == name
        # Its arguments show as the short form, not the lines' bodies.
        assert "lines>" in str(task["args"]) and "long 1" not in json.dumps(task)

        # Task events are off until a monitor (Flower) turns them on, and off again after.
        enabled = _replies(celery(base_env, "control", "enable_events", "--json", "--timeout", "5", "-d", name))
        assert enabled[name] == {"ok": "task events enabled"}
        disabled = _replies(celery(base_env, "control", "disable_events", "--json", "--timeout", "5", "-d", name))
        assert disabled[name] == {"ok": "task events disabled"}
    finally:
        handle.cancel()
