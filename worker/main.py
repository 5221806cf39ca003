"""`chatbatch worker`: load the model once, start the engine, then consume with Celery."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

from celery import signals

from chatbatch import keys, registry
from chatbatch.jobstore import JobStore
from chatbatch.queues import DEFAULT_QUEUE, TASK_CHAT, TASK_CHUNK, chunk_argsrepr, model_queue, request_argsrepr
from chatbatch.redisconn import RETRY, connect
from chatbatch.settings import Settings
from worker import app as worker_app
from worker import heap, recovery
from worker import model as model_loading
from worker.model import build_engine, load_runner

logger = logging.getLogger(__name__)


def _heartbeats(state: worker_app.WorkerState, hostname: str, frozen: int, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            registry.heartbeat(
                state.redis,
                state.served_name,
                hostname,
                {
                    "pid": os.getpid(),
                    "model_loads": model_loading.LOADS,
                    "frozen_objects": frozen,
                    **state.engine.stats,
                },
                state.settings.heartbeat_interval,
            )
        except Exception as error:  # Redis down: keep trying, Celery reconnects on its own
            logger.warning("heartbeat failed: %s", type(error).__name__)
        stop.wait(state.settings.heartbeat_interval)


def _recover_lost_tasks(state: worker_app.WorkerState, hostname: str, stop: threading.Event) -> None:
    """Sweep for chunks and single requests the broker lost (worker/recovery.py), one worker at a time: every half
    visibility timeout (1..60 s); a job is looked at once it has not moved for the visibility
    timeout (at most 5 minutes)."""
    settings = state.settings
    interval = min(60.0, max(1.0, settings.visibility_timeout / 2))

    def send(job_id: str, chunk: str, queue: str, lines: str, count: int) -> None:
        worker_app.app.send_task(TASK_CHUNK, args=[job_id, chunk, lines], queue=queue, argsrepr=chunk_argsrepr(job_id, chunk, count))

    def send_request(request_id: str, queue: str, body: dict[str, Any]) -> None:
        worker_app.app.send_task(TASK_CHAT, args=[request_id, body], queue=queue, argsrepr=request_argsrepr(request_id))

    while not stop.wait(interval):
        try:
            if state.redis.set(keys.RECOVERY_LOCK, hostname, nx=True, ex=max(1, int(interval))):
                stall = min(settings.visibility_timeout, 300)
                now = time.time()
                recovery.sweep(state.store, send, stall_seconds=stall, now=now)
                recovery.sweep_requests(state.store, send_request, stall_seconds=stall, now=now)
        except Exception as error:  # Redis away: the next sweep tries again
            logger.warning("sweep for lost chunks and requests failed: %s", type(error).__name__)


def _tolerate_acks_on_a_lost_connection() -> None:
    """Redis restarted while tasks were finishing: their acks reach kombu's Redis channel after
    it was closed, and kombu raises AttributeError (not one of the connection errors it already
    logs and skips). Raised while Celery restarts its consumer, that error stopped the restart
    and the worker never consumed again. Such an ack is now logged and skipped like any other
    failed ack: the message was already restored to its queue when the connection dropped, and
    its answers are stored, so its next delivery is a no-op."""
    from kombu.message import Message

    original = Message.ack_log_error
    if getattr(original, "_chatbatch", False):
        return

    def ack_log_error(self: Message, log: Any, errors: Any, multiple: bool = False) -> None:
        try:
            original(self, log, errors, multiple)
        except AttributeError as error:
            log.warning("could not acknowledge %r, the broker connection was lost: %r", self.delivery_tag, error)

    ack_log_error._chatbatch = True  # type: ignore[attr-defined]
    Message.ack_log_error = ack_log_error  # type: ignore[method-assign]


def _record_deliveries_across_a_redis_restart() -> None:
    """Kombu's Redis transport takes a message off its queue (BRPOP), then records it as
    unacknowledged in a second command. When Redis went away between the two, that command
    failed, and the message was on no queue and in no unacknowledged set: lost, and its job
    never ended (seen in a fresh-clone CI run of `test_redis_restart_mid_job`). The second
    command now retries while Redis is away, as the worker's own Redis commands do (about a
    minute): once Redis is back the message is recorded and delivered as usual."""
    from kombu.transport import redis as kombu_redis

    original = kombu_redis.QoS.append
    if getattr(original, "_chatbatch", False):
        return

    def append(self: Any, message: Any, delivery_tag: str) -> None:
        def failed(error: Exception, failures: int) -> None:
            if failures == 1:
                logger.warning("Redis went away as message %s was taken (%s): it is recorded once Redis is back", delivery_tag, type(error).__name__)

        RETRY.call_with_retry(lambda: original(self, message, delivery_tag), failed, with_failure_count=True)

    append._chatbatch = True  # type: ignore[attr-defined]
    kombu_redis.QoS.append = append  # type: ignore[method-assign]


def _restore_unacked_on_a_closed_connection() -> None:
    """When Celery drops a lost broker connection, kombu closes its channel and first pushes the
    messages it holds back onto their queues. Where the connection's transport was already
    cleared, kombu raised AttributeError there, which Celery treats as unrecoverable: the worker
    stopped consuming for good (seen once under load in `test_redis_restart_mid_job`). Such a
    restore is now skipped with a warning: the messages stay in Redis's unacknowledged set and
    return to their queue after the visibility timeout, the way a dead worker's do."""
    from kombu.transport import redis as kombu_redis

    original = kombu_redis.QoS.restore_unacked
    if getattr(original, "_chatbatch", False):
        return

    def restore_unacked(self: Any, client: Any = None) -> None:
        try:
            original(self, client)
        except AttributeError as error:
            logger.warning(
                "could not put %d unacknowledged messages back at once, the broker connection is closed (%r): "
                "they return to their queue after the visibility timeout", len(self._delivered), error,
            )
            self._delivered.clear()

    restore_unacked._chatbatch = True  # type: ignore[attr-defined]
    kombu_redis.QoS.restore_unacked = restore_unacked  # type: ignore[method-assign]


def _survive_redis_restarts() -> None:
    """Kombu's Redis transport, mended where a Redis restart made it lose a message or stop the
    worker (docs/reliability.md)."""
    _tolerate_acks_on_a_lost_connection()
    _record_deliveries_across_a_redis_restart()
    _restore_unacked_on_a_closed_connection()


def run_worker(
    settings: Settings,
    *,
    model_uri: str = "",
    queues: list[str] | None = None,
    served_name: str | None = None,
    concurrency: int | None = None,
    hostname: str | None = None,
    loglevel: str = "INFO",
) -> None:
    """Run a worker until it is stopped (SIGTERM: unfinished work is handed back to the queue)."""
    _survive_redis_restarts()
    client = connect(settings.redis_url)
    runner = load_runner(model_uri, settings, served_name=served_name)
    engine = build_engine(runner, settings)
    engine.start()
    state = worker_app.WorkerState(
        settings=settings,
        redis=client,
        store=JobStore(client, job_ttl=settings.job_ttl, upload_retry_seconds=settings.s3_retry_seconds),
        engine=engine,
        served_name=runner.served_name,
    )
    worker_app.install(state)
    if not queues:
        queues = [DEFAULT_QUEUE, model_queue(runner.served_name)]
    hostname = hostname or f"chatbatch-{runner.served_name.replace('/', '_')}-{os.getpid()}@{socket.gethostname()}"
    # One thread per task that may wait on the engine: enough to fill a batch from single
    # requests, while prefetch (multiplier 1) keeps other workers fed.
    threads = concurrency or min(512, max(4, engine.max_batch_size))
    stop = threading.Event()

    @signals.worker_shutting_down.connect(weak=False)
    def _draining(**_: Any) -> None:
        # SIGTERM (Celery's warm shutdown): consuming stops, and the engine starts no more
        # batches; each task hands what it has not answered back to the queue at once and
        # returns, so the worker exits once the batch running now ends (docs/reliability.md).
        engine.drain()

    @signals.worker_ready.connect(weak=False)
    def _ready(**_: Any) -> None:
        # Everything the worker keeps is loaded now (model, engine, Celery's consumer).
        frozen = heap.settle()
        threading.Thread(target=_heartbeats, args=(state, hostname, frozen, stop), daemon=True).start()
        threading.Thread(target=_recover_lost_tasks, args=(state, hostname, stop), daemon=True).start()
        logger.info("worker %s serves %r on queues %s", hostname, runner.served_name, ",".join(queues))

    try:
        worker_app.app.worker_main(
            [
                "worker",
                "--pool=threads",
                f"--concurrency={threads}",
                f"--queues={','.join(queues)}",
                f"--hostname={hostname}",
                f"--loglevel={loglevel}",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ]
        )
    finally:
        stop.set()
        try:
            registry.leave(client, runner.served_name, hostname)
        except Exception:
            pass
        engine.stop()
