"""Queue and task names, and the Celery configuration both sides share."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from chatbatch.redisconn import BLOCKING_SOCKET_TIMEOUT

if TYPE_CHECKING:
    from celery import Celery

    from chatbatch.settings import Settings

#: Consumed by every worker unless it is started with --queue; takes requests without a model
#: (single requests and batch lines alike).
DEFAULT_QUEUE = "chatbatch"
#: Consumed by every worker, whatever its other queues: callback deliveries.
CALLBACK_QUEUE = "chatbatch.callbacks"
#: Task names: the producer sends by name and never imports the worker.
TASK_CHAT = "chatbatch.chat"
TASK_CHUNK = "chatbatch.chunk"
TASK_CALLBACK = "chatbatch.callback"
_MODEL_PREFIX = "chatbatch.model."


def model_queue(model: str) -> str:
    """The queue of requests that name `model`."""
    safe = re.sub(r"[^A-Za-z0-9_.\-/]", "_", model)
    return f"{_MODEL_PREFIX}{safe}"


def live_queue(queue: str) -> str:
    """The queue of single requests (someone waits on each) beside a model's batch queue: a
    worker consumes it first (`worker_queues`). Other queues have none: requests without a
    model share the default queue with batch lines without one, where the dispatcher's window
    keeps few chunks ahead of them (docs/scheduling.md)."""
    if queue.startswith(_MODEL_PREFIX):
        return "chatbatch.live." + queue.removeprefix(_MODEL_PREFIX)
    return queue


def worker_queues(batch_queues: list[str]) -> list[str]:
    """The queues a worker consumes, in the order it takes from them: the single requests'
    queues, then callbacks (quick), then the batch queues given (the broker is asked for them in
    this order, `queue_order_strategy` "priority")."""
    ordered = [live_queue(queue) for queue in batch_queues if live_queue(queue) != queue]
    ordered += [CALLBACK_QUEUE, *batch_queues]
    return list(dict.fromkeys(ordered))


def chunk_argsrepr(job_id: str, chunk: str, lines: int) -> str:
    """How a chunk task shows in its message (Celery would otherwise render every line into it);
    worker/service/recovery.py finds chunks on the queues by it."""
    return f"({job_id!r}, {chunk!r}, <{lines} lines>)"


def request_argsrepr(request_id: str) -> str:
    """How a single request's task shows in its message (not its whole body)."""
    return f"({request_id!r}, <request>)"


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings; the reasons are in docs/reliability.md and docs/engine.md."""
    transport = {
        # Longer than the longest task, or Redis hands the task to a second worker meanwhile.
        "visibility_timeout": settings.visibility_timeout,
        # Sweep for messages of dead workers often enough that they come back soon after the
        # visibility timeout (kombu's default sweep runs only every ~100 s).
        "unacked_restore_interval": max(1, min(30, settings.visibility_timeout // 4)),
        "unacked_restore_throttle": 1,
        # The lock a worker holds while it restores: a worker killed holding it would stop
        # every restore for kombu's default of 300 s (restores take milliseconds).
        "unacked_mutex_expire": max(5, min(30, settings.visibility_timeout)),
        # A broker that vanishes without closing the connection (failover, NAT) must not hang a
        # publish for ever (kombu's default); its BRPOP blocks 1 s, far under this.
        "socket_timeout": BLOCKING_SOCKET_TIMEOUT,
    }
    return {
        "broker_url": settings.redis_url,
        # A worker asks for its queues in the order it lists them (single requests first),
        # not in kombu's default round robin (docs/scheduling.md).
        "broker_transport_options": {**transport, "queue_order_strategy": "priority"},
        "result_backend_transport_options": transport,
        # JSON only: a pickled message is refused by the worker, never run.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "event_serializer": "json",
        # Results are written by the tasks themselves, keyed by request and line.
        "task_ignore_result": True,
        # At-least-once: ack after the work is stored; requeue if the worker dies mid-task.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "task_default_queue": DEFAULT_QUEUE,
        "task_create_missing_queues": True,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
    }


def make_celery(settings: Settings, name: str = "chatbatch") -> Celery:
    """A Celery app configured for chatbatch (no tasks registered)."""
    from celery import Celery

    app = Celery(name)
    app.conf.update(celery_config(settings))
    return app
