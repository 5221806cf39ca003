"""`chatbatch worker`: load the model once, start the engine, then consume with Celery.

Beside Celery's consumer, a worker runs a few threads of its own (`Background`): its registry
heartbeat, the sweeps (jobs past their window, stalled file writes, lost tasks), the callback
relay, the MLflow tracker of jobs (worker/service/tracking.py), and a watchdog that ends the process
when the engine thread dies; and, from the first
streamed request on, the stream publisher (worker/service/publisher.py).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

from celery import signals

from chatbatch import keys, registry
from chatbatch.ids import new_id
from chatbatch.logs import setup_logging
from chatbatch.queues import (
    DEFAULT_QUEUE,
    TASK_CHAT,
    TASK_CHUNK,
    chunk_argsrepr,
    model_queue,
    request_argsrepr,
    worker_queues,
)
from chatbatch.redisconn import connect
from chatbatch.settings import Settings
from worker.models import model as model_loading
from worker.models.model import build_engine, load_runner
from worker.service import callbacks, heap, kombu_mends, recovery, tracking
from worker.service.state import WorkerState
from worker.service.tasks import create_app

logger = logging.getLogger(__name__)

#: Exit status of a worker whose engine thread died: its supervisor restarts it.
EXIT_ENGINE_DIED = 70


class Background:
    """The worker's own threads, started once it is ready and stopped with it."""

    def __init__(self, state: WorkerState, app: Any, hostname: str, queues: list[str]) -> None:
        self.state = state
        self.app = app
        self.hostname = hostname
        self.queues = queues
        self.frozen = 0
        self.stop = threading.Event()

    def start(self, frozen: int) -> None:
        self.frozen = frozen
        for name, target in (
            ("heartbeat", self.heartbeats),
            ("sweeps", self.sweeps),
            ("callback-relay", self.relay),
            ("watchdog", self.watchdog),
            ("tracking", self.tracking),
        ):
            threading.Thread(target=target, name=f"chatbatch-{name}", daemon=True).start()

    def heartbeats(self) -> None:
        """Announce the model and queues every heartbeat interval, while the engine lives."""
        state = self.state
        served = state.engine.info
        while not self.stop.is_set() and not state.engine.died.is_set():
            try:
                info: dict[str, object] = {
                    "pid": os.getpid(),
                    "queues": self.queues,
                    "model_loads": model_loading.LOADS,
                    # Where the model runs: cpu, cuda:0, ... (a pyfunc model: pyfunc).
                    "device": served.device,
                    # What the model runs in: bfloat16, float32, ... (a pyfunc model: null).
                    "dtype": served.dtype,
                    # The URI served and, for models:/ URIs, the registered name and version loaded.
                    **(served.lineage or {}),
                    # The answers' system_fingerprint: workers that share it share a set-up.
                    "system_fingerprint": state.engine.fingerprint,
                    "frozen_objects": self.frozen,
                    **state.engine.counters(),
                    "engine": state.engine.figures(),
                }
                registry.heartbeat(state.redis, state.served_name, self.hostname, info, state.settings.heartbeat_interval)
            except Exception as error:  # Redis away: keep trying, Celery reconnects on its own
                logger.warning("heartbeat failed: %s", type(error).__name__)
            self.stop.wait(state.settings.heartbeat_interval)

    def sweeps(self) -> None:
        """The job sweep (expiry, stalled file writes) and the callback sweep every heartbeat
        interval, and the lost task sweep (worker/service/recovery.py) every half visibility timeout (1..60 s); each on one
        worker at a time, under a Redis lock."""
        settings = self.state.settings
        job_interval = settings.heartbeat_interval
        recovery_interval = min(60.0, max(1.0, settings.visibility_timeout / 2))
        next_recovery = time.monotonic() + recovery_interval
        while not self.stop.wait(job_interval):
            self._locked(keys.SWEEP_LOCK, job_interval, self._sweep_jobs)
            try:
                self._release()
            except Exception:  # Redis away: the next sweep tries again
                logger.warning("releasing chunks failed", exc_info=True)
            if time.monotonic() >= next_recovery:
                next_recovery = time.monotonic() + recovery_interval
                self._locked(keys.RECOVERY_LOCK, recovery_interval, self._recover)

    def _sweep_jobs(self) -> None:
        self.state.jobs.sweep()
        callbacks.send_due(self.state, self.app)

    def _release(self) -> None:
        """Release chunks into the windows of this worker's queues: those a worker that died
        did not release, and the room a worker that joined makes (chatbatch/dispatch.py)."""
        for queue in self.queues:
            self.state.dispatcher.dispatch(queue, self.app.send_task)

    def _locked(self, lock: str, seconds: float, work: Any) -> None:
        try:
            if self.state.redis.set(lock, self.hostname, nx=True, ex=max(1, int(seconds))):
                work()
        except Exception:  # Redis away, or a job that cannot be read: the next sweep tries again
            logger.warning("sweep under %s failed", lock, exc_info=True)

    def _recover(self) -> None:
        settings = self.state.settings
        stall = min(settings.visibility_timeout, 300)
        now = time.time()

        def send_chunk(job_id: str, chunk: str, queue: str, lines: str, count: int) -> None:
            self.app.send_task(TASK_CHUNK, args=[job_id, chunk, lines], queue=queue, argsrepr=chunk_argsrepr(job_id, chunk, count))

        def send_request(request_id: str, queue: str, body: dict[str, Any]) -> None:
            self.app.send_task(TASK_CHAT, args=[request_id, body], queue=queue, argsrepr=request_argsrepr(request_id))

        recovery.sweep(self.state, send_chunk, stall_seconds=stall, now=now)
        recovery.sweep_requests(self.state, send_request, stall_seconds=stall, now=now)

    def tracking(self) -> None:
        """The MLflow runs of jobs submitted with an experiment (worker/service/tracking.py)."""
        tracking.run(self.state.redis, self.hostname, self.state.settings.heartbeat_interval, self.stop)

    def relay(self) -> None:
        callbacks.relay(self.state, self.app, new_id(f"{self.hostname}-"), self.stop)

    def watchdog(self) -> None:
        """A worker whose engine thread died can no longer answer: leave the registry and exit
        at once, without acknowledging anything, so its supervisor restarts it and its tasks
        are delivered again (as after a crash)."""
        while not self.stop.is_set():
            if self.state.engine.died.wait(1.0):
                self.stop.set()
                try:
                    registry.leave(self.state.redis, self.state.served_name, self.hostname)
                except Exception:
                    logger.warning("could not leave the registry", exc_info=True)
                logger.critical("worker %s: the engine died (%r); exiting with status %d", self.hostname, self.state.engine.failure, EXIT_ENGINE_DIED)
                logging.shutdown()
                os._exit(EXIT_ENGINE_DIED)


def _celery_says_in_logs() -> None:
    """Celery writes a few lines straight to the terminal ("worker: Warm shutdown", in its
    signal handlers): with JSON logs they become log records of `celery.apps.worker`."""
    from celery.apps import worker as celery_worker

    say = logging.getLogger("celery.apps.worker")
    celery_worker.safe_say = lambda msg, f=None: say.warning("%s", msg.strip())  # type: ignore[assignment]


def run_worker(
    settings: Settings,
    *,
    model_uri: str = "",
    queues: list[str] | None = None,
    served_name: str | None = None,
    concurrency: int | None = None,
    hostname: str | None = None,
    loglevel: str = "INFO",
    metrics_port: int | None = None,
) -> None:
    """Run a worker until it is stopped (SIGTERM: unfinished work is handed back to the queue).

    Raises:
        ConfigurationError: Redis cannot be reached, or kombu is not a tested version.
    """
    kombu_mends.install()
    if settings.log_format == "json":
        # Progress bars (loading weights) are not log lines: JSON logs carry none.
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        _celery_says_in_logs()
    client = connect(settings.redis_url)
    runner = load_runner(model_uri, settings, served_name=served_name)
    engine = build_engine(runner, settings)
    engine.start()
    state = WorkerState(settings=settings, redis=client, engine=engine, served_name=runner.served_name)
    if added := state.jobs.backfill_open():
        logger.info("%d jobs created before the job sweep's set existed were added to it", added)
    app = create_app(settings, state)
    queues = worker_queues(list(queues or [model_queue(runner.served_name), DEFAULT_QUEUE]))
    port = metrics_port or settings.metrics_port
    if port:
        from worker.service.metrics import WorkerMetrics

        WorkerMetrics(engine, runner.served_name, settings.redis_url, queues, load_seconds=getattr(runner, "load_seconds", 0.0)).serve(port)
    hostname = hostname or f"chatbatch-{runner.served_name.replace('/', '_')}-{os.getpid()}@{socket.gethostname()}"
    # One thread per task that may wait on the engine: enough to fill a batch from single
    # requests, while prefetch (multiplier 1) keeps other workers fed.
    threads = concurrency or min(512, max(4, engine.max_batch_size))
    background = Background(state, app, hostname, queues)

    @signals.worker_shutting_down.connect(weak=False)
    def _draining(**_: Any) -> None:
        # SIGTERM (Celery's warm shutdown): consuming stops, and the engine starts no more
        # batches; each task hands what it has not answered back to the queue at once and
        # returns, so the worker exits once the batch running now ends (docs/reliability.md).
        engine.drain()

    @signals.setup_logging.connect(weak=False)
    def _logging(**_: Any) -> None:
        # A receiver keeps Celery from adding handlers of its own: its records go through
        # chatbatch's one handler (format, redaction) like every other record.
        setup_logging(settings, loglevel)

    @signals.worker_ready.connect(weak=False)
    def _ready(**_: Any) -> None:
        # Everything the worker keeps is loaded now (model, engine, Celery's consumer).
        background.start(heap.settle())
        logger.info("worker %s serves %r on queues %s (system_fingerprint %s)", hostname, runner.served_name, ",".join(queues), engine.fingerprint)

    try:
        # Celery prints its banner outside logging: JSON logs leave it out (the ready line
        # names the worker, its model and queues).
        quiet = ["--quiet"] if settings.log_format == "json" else []
        app.worker_main(
            [
                *quiet,
                "worker",
                "--pool=threads",
                f"--concurrency={threads}",
                f"--queues={','.join(queues)}",
                f"--hostname={hostname}",
                f"--loglevel={loglevel}",
                # Celery's event heartbeat stays on (one Redis PUBLISH every 2 s): with it the
                # worker has an event dispatcher, so Flower sees it live and can turn task
                # events on while it watches (`enable_events`; off otherwise: docs/observability.md).
                "--without-gossip",
                "--without-mingle",
            ]
        )
    finally:
        background.stop.set()
        try:
            registry.leave(client, runner.served_name, hostname)
        except Exception:
            logger.debug("could not leave the registry", exc_info=True)
        engine.stop()
