"""What one worker process holds, set up once by worker/service/main.py before it consumes."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import redis

from chatbatch.callbacks import Callbacks
from chatbatch.dispatch import Dispatcher
from chatbatch.jobs import Jobs, StopReason
from chatbatch.ledger import Ledger
from chatbatch.requests import Requests
from chatbatch.settings import Settings
from worker.engine.interface import InferenceEngine
from worker.service.publisher import Publisher

#: How often a task waiting on the engine checks whether its job was cancelled or expired, or
#: its worker is stopping.
STOP_CHECK_SECONDS = 0.5


class StopReasons:
    """Each job's stop reason, read at most once per STOP_CHECK_SECONDS per process: the chunk
    tasks of one job share one Redis read per interval instead of one each."""

    def __init__(self, jobs: Jobs) -> None:
        self.jobs = jobs
        self._cache: dict[str, tuple[float, StopReason | None]] = {}
        self._lock = threading.Lock()

    def get(self, job_id: str) -> StopReason | None:
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(job_id)
            if cached is not None and now - cached[0] < STOP_CHECK_SECONDS:
                return cached[1]
        reason = self.jobs.stop_reason(job_id)
        with self._lock:
            if len(self._cache) > 1_000:
                self._cache.clear()
            self._cache[job_id] = (now, reason)
        return reason


class RunningChunks:
    """The chunks this process is running, by (job, chunk): a second delivery of one (kombu
    restores a message held past the visibility timeout, to this worker too) waits for the
    first run to end instead of running the same lines again."""

    def __init__(self) -> None:
        self._running: dict[tuple[str, str], threading.Event] = {}
        self._lock = threading.Lock()

    def enter(self, key: tuple[str, str]) -> threading.Event | None:
        """This run's event if it may run now, else None after waiting for the run before it."""
        with self._lock:
            earlier = self._running.get(key)
            if earlier is None:
                mine = self._running[key] = threading.Event()
                return mine
        earlier.wait()
        return None

    def leave(self, key: tuple[str, str], mine: threading.Event) -> None:
        with self._lock:
            del self._running[key]
        mine.set()


@dataclass
class WorkerState:
    """The worker process's stores, engine and name, shared by its tasks."""

    settings: Settings
    redis: redis.Redis
    engine: InferenceEngine
    served_name: str
    jobs: Jobs = field(init=False)
    requests: Requests = field(init=False)
    ledger: Ledger = field(init=False)
    callbacks: Callbacks = field(init=False)
    dispatcher: Dispatcher = field(init=False)
    stop_reasons: StopReasons = field(init=False)
    #: Writes streamed requests' chunks to Redis (its thread starts with the first stream).
    publisher: Publisher = field(init=False)
    running_chunks: RunningChunks = field(default_factory=RunningChunks)
    #: Suspect lines run one at a time per worker process, so a crash is charged to one line.
    alone: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        settings = self.settings
        self.jobs = Jobs(self.redis, job_ttl=settings.job_ttl, upload_retry_seconds=settings.s3_retry_seconds)
        self.requests = Requests(self.redis, result_ttl=settings.result_ttl)
        self.ledger = Ledger(self.redis, job_ttl=settings.job_ttl)
        self.callbacks = Callbacks(self.redis)
        self.dispatcher = Dispatcher(self.redis, job_ttl=settings.job_ttl)
        self.stop_reasons = StopReasons(self.jobs)
        self.publisher = Publisher(
            self.redis, self.engine.info.tokenizer, ttl=settings.result_ttl, fingerprint=self.engine.fingerprint
        )
