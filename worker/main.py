"""`chatbatch worker`: load the model once, start the engine, then consume with Celery."""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Any

from celery import signals

from chatbatch import registry
from chatbatch.jobstore import JobStore
from chatbatch.queues import DEFAULT_QUEUE, model_queue
from chatbatch.redisconn import connect
from chatbatch.settings import Settings
from worker import app as worker_app
from worker import model as model_loading
from worker.model import build_engine, load_runner

logger = logging.getLogger(__name__)


def _heartbeats(state: worker_app.WorkerState, hostname: str, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            registry.heartbeat(
                state.redis,
                state.served_name,
                hostname,
                {
                    "pid": os.getpid(),
                    "model_loads": model_loading.LOADS,
                    **state.engine.stats,
                },
                state.settings.heartbeat_interval,
            )
        except Exception as error:  # Redis down: keep trying, Celery reconnects on its own
            logger.warning("heartbeat failed: %s", type(error).__name__)
        stop.wait(state.settings.heartbeat_interval)


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
        threading.Thread(target=_heartbeats, args=(state, hostname, stop), daemon=True).start()
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
