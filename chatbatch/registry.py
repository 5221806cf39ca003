"""The model registry: which models live workers serve and which queues they consume, from
their heartbeats."""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from chatbatch import keys
from chatbatch.redisconn import text, texts

#: A worker is live while its last heartbeat is younger than this many heartbeat intervals.
LIVE_INTERVALS = 3


def heartbeat(client: redis.Redis, model: str, worker: str, info: dict[str, object], interval: float) -> None:
    """Announce that `worker` serves `model` now (`info` names its `queues`)."""
    now = time.time()
    pipe = client.pipeline()
    pipe.zadd(keys.MODELS, {model: now})
    pipe.hset(keys.model_workers(model), worker, json.dumps({**info, "seen": now, "interval": interval}))
    pipe.expire(keys.model_workers(model), int(interval * LIVE_INTERVALS * 4) + 1)
    pipe.execute()


def leave(client: redis.Redis, model: str, worker: str) -> None:
    """Remove a stopping worker; the model stays listed while other workers serve it."""
    client.hdel(keys.model_workers(model), worker)


def live_models(client: redis.Redis, *, now: float | None = None) -> dict[str, list[dict[str, Any]]]:
    """Served model name -> the heartbeats of its live workers."""
    now = time.time() if now is None else now
    models: dict[str, list[dict[str, Any]]] = {}
    for raw in client.zrange(keys.MODELS, 0, -1):
        name = text(raw)
        workers = []
        for worker, value in texts(client.hgetall(keys.model_workers(name))).items():
            info = json.loads(value)
            if now - float(info["seen"]) <= float(info["interval"]) * LIVE_INTERVALS:
                workers.append({"worker": worker, **info})
        if workers:
            models[name] = workers
    return models


def consumers(client: redis.Redis, queue: str) -> list[str]:
    """The live workers that consume `queue`."""
    return [
        str(info["worker"])
        for workers in live_models(client).values()
        for info in workers
        if queue in info.get("queues", ())
    ]


def nobody_serves(client: redis.Redis, queues: list[str]) -> str | None:
    """A sentence for people when some of these queues has no live worker, else None."""
    idle = [queue for queue in queues if not consumers(client, queue)]
    if not idle:
        return None
    return (
        f"no live worker consumes {', '.join(repr(q) for q in idle)} yet: waiting (a worker may be loading its model); "
        "start one with `chatbatch worker --model URI`"
    )
