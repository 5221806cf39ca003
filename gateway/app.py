"""The HTTP API's app factory.

Endpoints: `/v1/models`, `/v1/chat/completions` (waits, like OpenAI, or streams server-sent
events with `stream: true`; or answers at once with `X-Chatbatch-Async: true`), `/v1/chat/requests/{id}`, `/v1/files`, `/v1/batches`
(Prometheus metrics are served on a port of their own: gateway/metrics.py). Errors use
OpenAI's body. Auth: bearer keys from CHATBATCH_API_KEYS; each key sees only its own files,
batches and requests (another key's objects answer 404, as if absent).

The gateway is a producer like the CLI: besides uploaded files it keeps no state of its own.
Its lifespan runs the job sweep (shared with the workers, one at a time) and resumes batches
whose enqueueing another gateway left unfinished.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from chatbatch import __version__
from chatbatch.settings import Settings, get_settings
from gateway import errors
from gateway.headers import ResponseHeaders
from gateway.limits import MULTIPART_ROOM, BodyLimit
from gateway.metrics import GatewayMetrics, HttpMetrics
from gateway.routers import batches, chat, files, models
from gateway.state import Gateway

logger = logging.getLogger(__name__)


async def _sweeps(state: Gateway) -> None:
    while not state.stopping.is_set():
        try:
            await run_in_threadpool(state.sweep)
        except Exception:  # Redis away: the next sweep tries again
            logger.warning("the gateway's sweep failed", exc_info=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(state.stopping.wait(), state.settings.heartbeat_interval)


def create_app(settings: Settings | None = None, *, sweeps: bool = True) -> FastAPI:
    """The HTTP API.

    Args:
        settings: defaults to the environment's.
        sweeps: run the job sweep and resume stalled batches in the background.

    Raises:
        ConfigurationError: Redis cannot be reached.
    """
    settings = settings or get_settings()
    state = Gateway.create(settings)
    if not state.api_keys:
        logger.warning("CHATBATCH_API_KEYS is not set: the HTTP API accepts requests without a key")

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.begin()
        sweeper = asyncio.create_task(_sweeps(state)) if sweeps else None
        try:
            yield
        finally:
            await state.end()
            if sweeper is not None:
                sweeper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sweeper

    app = FastAPI(title="chatbatch", version=__version__, lifespan=lifespan)
    app.state.gateway = state
    errors.install(app)
    for router in (models.router, chat.router, files.router, batches.router):
        app.include_router(router)
    # Served on a port of its own by `chatbatch serve --metrics-port` (gateway/metrics.py).
    metrics = app.state.metrics = GatewayMetrics(settings.redis_url)
    # The last added is the outermost: every answer, a body limit's 413 included, is counted in
    # the metrics and carries the response headers.
    app.add_middleware(BodyLimit, limit=settings.max_line_bytes, routes={("POST", "/v1/files"): settings.max_file_bytes + MULTIPART_ROOM})
    app.add_middleware(HttpMetrics, metrics=metrics)
    app.add_middleware(ResponseHeaders)
    return app
