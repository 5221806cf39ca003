"""The model registry: which model names live workers serve, from their heartbeats."""

from __future__ import annotations

import json
import time

import redis

from chatbatch import keys
from chatbatch.redisconn import text

#: A model is live while some worker's heartbeat is younger than this many heartbeat intervals.
LIVE_INTERVALS = 3


def heartbeat(client: redis.Redis, model: str, worker: str, info: dict[str, object], interval: float) -> None:
    """Announce that `worker` serves `model` now."""
    now = time.time()
    pipe = client.pipeline()
    pipe.zadd(keys.MODELS, {model: now})
    pipe.hset(keys.model_workers(model), worker, json.dumps({**info, "seen": now, "interval": interval}))
    pipe.expire(keys.model_workers(model), int(interval * LIVE_INTERVALS * 4) + 1)
    pipe.execute()


def leave(client: redis.Redis, model: str, worker: str) -> None:
    """Remove a stopping worker; the model stays listed while other workers serve it."""
    client.hdel(keys.model_workers(model), worker)


def live_models(client: redis.Redis) -> dict[str, list[dict[str, object]]]:
    """Served model name -> the heartbeats of its live workers."""
    now = time.time()
    models: dict[str, list[dict[str, object]]] = {}
    for raw in client.zrange(keys.MODELS, 0, -1):
        name = text(raw)
        workers = []
        for worker, value in client.hgetall(keys.model_workers(name)).items():
            info = json.loads(value)
            if now - float(info["seen"]) <= float(info["interval"]) * LIVE_INTERVALS:
                workers.append({"worker": text(worker), **info})
        if workers:
            models[name] = workers
    return models


def is_served(client: redis.Redis, model: str) -> bool:
    return model in live_models(client)
