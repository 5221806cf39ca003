"""What a gateway process holds: the producer client, the waiters of requests, the file
store, and the background work its lifespan owns."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from fastapi import Header, Request

from chatbatch import keys
from chatbatch.ids import new_id
from chatbatch.jobs import JobError
from chatbatch.settings import Settings
from gateway.errors import ApiError
from gateway.files import FileStore
from gateway.streams import Streams
from gateway.waiters import Waiters
from producer.client import Client
from producer.enqueue import Interrupted

logger = logging.getLogger(__name__)

#: The owner of every object when the API runs without keys.
PUBLIC = "public"


@dataclass
class Gateway:
    """One gateway process's state (`app.state.gateway`)."""

    settings: Settings
    client: Client
    files: FileStore
    #: Bearer key -> owner id (a digest of the key, so keys are never stored).
    api_keys: dict[str, str]
    #: Set when the gateway starts stopping: waiting requests answer 503 at once.
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    #: Set with `stopping`, for enqueueing threads: they stop at the next line.
    stop_enqueueing: threading.Event = field(default_factory=threading.Event)
    waiters: Waiters | None = None
    #: The open streams of `stream: true` requests (each with its own Redis connection).
    streams: Streams | None = None
    executor: ThreadPoolExecutor | None = None
    name: str = field(default_factory=lambda: new_id("gateway-"))
    #: Enqueueing under way or queued here, by job id.
    enqueues: dict[str, Future[None]] = field(default_factory=dict)

    @classmethod
    def create(cls, settings: Settings) -> Gateway:
        client = Client(settings)
        files = FileStore(client.redis, settings.files_path, max_bytes=settings.max_file_bytes)
        api_keys = {key: hashlib.sha256(key.encode()).hexdigest()[:16] for key in settings.api_key_list}
        return cls(settings=settings, client=client, files=files, api_keys=api_keys)

    def begin(self) -> None:
        """Start what the lifespan owns (called in the app's event loop)."""
        self.stopping = asyncio.Event()
        self.waiters = Waiters(self.settings.redis_url)
        self.waiters.start()
        self.streams = Streams(self.settings.redis_url, self.client.requests, ping_seconds=self.settings.stream_ping_seconds)
        self.executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="chatbatch-enqueue")

    def begin_stopping(self) -> None:
        """SIGTERM: waiting requests answer 503 now, enqueueing stops at the next line."""
        self.stopping.set()
        self.stop_enqueueing.set()

    async def end(self) -> None:
        self.begin_stopping()
        if self.executor is not None:
            await asyncio.to_thread(self.executor.shutdown, wait=True, cancel_futures=True)
            for job_id, enqueue in list(self.enqueues.items()):
                if enqueue.cancelled():  # never started: another gateway resumes it at once
                    self.client.jobs.release_enqueuer(job_id, unfinished=True)
        if self.waiters is not None:
            await self.waiters.close()
        if self.streams is not None:
            await self.streams.close()

    # Enqueueing uploaded files, in the background.

    def enqueue_in_background(self, job_id: str, file_id: str, holder: str) -> None:
        """Enqueue a batch's file in a thread the lifespan owns. The caller holds the job's
        enqueuer lease under `holder` already, so that a gateway that dies before the thread
        starts leaves the batch for another to resume."""
        if self.executor is None:
            raise RuntimeError("the gateway's lifespan has not started")
        enqueue = self.executor.submit(self._enqueue, job_id, file_id, holder)
        self.enqueues[job_id] = enqueue
        enqueue.add_done_callback(lambda _: self.enqueues.pop(job_id, None))

    def _enqueue(self, job_id: str, file_id: str, holder: str) -> None:
        jobs = self.client.jobs
        try:
            with self.files.path(file_id).open("rb") as stream:
                self.client.enqueue(stream, job_id=job_id, stop=self.stop_enqueueing, holder=holder)
        except Interrupted:
            jobs.release_enqueuer(job_id, unfinished=True)
            logger.info("batch %s: enqueueing stopped with the gateway; another gateway resumes it", job_id)
        except FileNotFoundError:
            jobs.fail(job_id, JobError(code="input_file_missing", message=f"the input file {file_id} is gone from CHATBATCH_FILES_DIR"))
        except Exception:  # left to the resume sweep: its lease runs out and it is enqueued again
            logger.exception("batch %s: enqueueing failed", job_id)

    def resume_stalled(self) -> list[str]:
        """Batches whose gateway stopped while enqueueing them (no lease left): enqueued again
        here, from their uploaded file. Returns their ids."""
        jobs = self.client.jobs
        resumed: list[str] = []
        for job_id in jobs.enqueuing():
            if jobs.enqueuer_alive(job_id):
                continue
            file_id = jobs.field(job_id, "input_file_id")
            if not file_id or not jobs.exists(job_id) or jobs.get(job_id).status.is_final:
                continue
            holder = new_id(f"{self.name}-")
            if jobs.take_enqueuer(job_id, holder):
                logger.warning("batch %s: its enqueueing stopped; resuming it", job_id)
                self.enqueue_in_background(job_id, file_id, holder)
                resumed.append(job_id)
        return resumed

    def sweep(self) -> None:
        """One sweep, under the fleet's lock: jobs past their window, stalled writes, stalled
        enqueueing."""
        redis_client = self.client.redis
        interval = self.settings.heartbeat_interval
        if redis_client.set(keys.SWEEP_LOCK, self.name, nx=True, ex=max(1, int(interval))):
            # S3 files are the workers' to write: a gateway has no credentials for them.
            self.client.jobs.sweep(write_files=False)
        self.resume_stalled()


def gateway(request: Request) -> Gateway:
    """The dependency that hands a handler its gateway."""
    state: Gateway = request.app.state.gateway
    return state


def owner(request: Request, authorization: str | None = Header(default=None)) -> str:
    """The caller's owner id, from `Authorization: Bearer KEY` (the scheme in any case)."""
    keys_ = gateway(request).api_keys
    if not keys_:
        return PUBLIC
    scheme, _, token = (authorization or "").strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or token not in keys_:
        raise ApiError(401, "Incorrect API key provided.", kind="authentication_error", code="invalid_api_key")
    return keys_[token]
