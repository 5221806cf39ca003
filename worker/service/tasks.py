"""The worker's Celery app and its tasks: a single chat request, a chunk of a job's lines, and a
callback delivery.

Tasks run in Celery's threads pool: each task thread hands its requests to the process's one
engine and waits, so the requests of many tasks meet in one batch (docs/engine.md). The app is
built from the settings the worker was started with, and its tasks close over the worker's
state: nothing is read from the environment or a module global.
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import wait
from typing import Any

from celery import Celery
from celery.worker.request import Request

from chatbatch.callbacks import BATCH
from chatbatch.logs import log_context
from chatbatch.queues import TASK_CALLBACK, TASK_CHAT, TASK_CHUNK, make_celery, request_argsrepr
from chatbatch.settings import Settings
from schemas.chat import parse_chat_request
from schemas.errors import ErrorCode, RequestError
from worker.service import callbacks
from worker.service.chunks import ChunkRun, check_model, send_back
from worker.service.publisher import RequestStream
from worker.service.state import WorkerState

logger = logging.getLogger(__name__)


class ShownRequest(Request):
    """Celery's request, shown to remote control (`celery inspect active`, `reserved`, Flower)
    by its short argument form (`chunk_argsrepr`, `request_argsrepr`): never the lines' and
    requests' bodies, which Celery would otherwise send to whoever asks."""

    def info(self, safe: bool = False) -> dict[str, Any]:
        return dict(super().info(safe=True))


def create_app(settings: Settings, state: WorkerState) -> Celery:
    """The worker's Celery app, configured from `settings`, with its tasks bound to `state`."""
    app = make_celery(settings, name="chatbatch.worker")

    @app.task(name=TASK_CHAT, bind=True, Request=ShownRequest)
    def chat(self: Any, request_id: str, body: dict[str, Any]) -> None:
        """Answer one chat request; the result goes to Redis under the request id."""
        with log_context(request_id=request_id):
            answer_request(self, state, request_id, body)

    @app.task(name=TASK_CHUNK, bind=True, Request=ShownRequest)
    def chunk(self: Any, job_id: str, number: str, lines: str | list[dict[str, Any]]) -> None:
        """Answer a chunk of a job's lines; each answer is stored once, keyed by line number.

        Args:
            job_id: the job.
            number: the chunk's id within the job (its deliveries are counted under it).
            lines: {"line", "custom_id", "body"} for each valid input line of the chunk (the
                producer sends each input line as it came, with its "line" added), as a JSON
                string (or as a list).
        """
        items: list[dict[str, Any]] = json.loads(lines) if isinstance(lines, str) else lines
        with log_context(job_id=job_id, chunk=number):
            ChunkRun(state, self, job_id, number, items).run()

    @app.task(
        name=TASK_CALLBACK,
        bind=True,
        Request=ShownRequest,
        autoretry_for=(callbacks.AttemptFailed,),
        retry_backoff=1,
        retry_backoff_max=callbacks.BACKOFF_MAX,
        retry_jitter=False,
        max_retries=None,
    )
    def callback(self: Any, kind: str, object_id: str, event_id: str) -> None:
        """Deliver the callback of an answered request or an ended job (retried by Celery)."""
        ids = {"job_id": object_id} if kind == BATCH else {"request_id": object_id}
        with log_context(**ids):
            callbacks.deliver(self, state, kind, object_id, event_id)

    return app


def answer_request(task: Any, state: WorkerState, request_id: str, body: dict[str, Any]) -> None:
    """Run one chat request on the engine and store its result once."""
    requests = state.requests
    if requests.answered(request_id):
        return
    deliveries = requests.count_delivery(request_id)
    if deliveries > state.settings.max_deliveries:
        error = RequestError(
            ErrorCode.internal_error,
            f"the request was delivered {deliveries - 1} times and its worker died each time; it was not retried again",
        )
        requests.store_result(request_id, {"error": error.to_dict()})
        return
    started = time.monotonic()
    stream: RequestStream | None = None
    try:
        request = parse_chat_request(body, streamable=True)
        check_model(request.model, state.served_name)
        if requests.disconnected(request_id):  # its client went away while it was queued
            raise RequestError(ErrorCode.cancelled, "the client disconnected")
        # Streamed or not, the sink's cancel mark is read while it runs (worker/service/publisher.py).
        stream = state.publisher.open(request_id, deliveries, request, state.served_name)
        future = state.engine.submit(request, request_id, stream=stream)
        stream.attach(future)
        wait([future])
        if future.cancelled() and stream.cancelled:  # its client went away before it ran
            raise RequestError(ErrorCode.cancelled, "the client disconnected")
        if future.cancelled():  # the worker is draining: another worker answers it
            if stream is not None:
                stream.close()
            requests.uncount_delivery(request_id)
            send_back(task, [request_id, body], request_argsrepr(request_id))
            return
        # The completion carries the request's id, the one its caller polls and is called back with.
        record: dict[str, Any] = future.result().model_dump() | {"id": request_id}
    except RequestError as error:
        record = {"error": error.to_dict()}
    except BaseException:  # the task fails (and is delivered again): its stream is let go
        if stream is not None:
            stream.close()
        raise
    if stream is not None:
        stream.finish(record)
    requests.store_result(request_id, record)
    logger.info("request %s answered in %.2fs", request_id, time.monotonic() - started)
