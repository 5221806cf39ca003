"""`chatbatch serve`: the HTTP API on uvicorn, stopping within seconds on SIGTERM.

On SIGTERM (or Ctrl-C) the gateway stops accepting connections and answers every request
still waiting for a worker with 503 and OpenAI's error body at once (their work goes on in the
fleet, readable by id); enqueueing in the background stops at the next line, for another
gateway to resume. uvicorn then closes what is left within its graceful-shutdown timeout.
"""

from __future__ import annotations

from types import FrameType
from typing import Any

import uvicorn

from chatbatch.exceptions import ConfigurationError
from chatbatch.settings import Settings
from gateway.app import create_app
from gateway.state import Gateway

#: Seconds uvicorn waits for open connections after SIGTERM before it closes them.
GRACEFUL_SECONDS = 5


class _Server(uvicorn.Server):
    """uvicorn's server, telling the gateway as soon as a stop signal arrives."""

    def __init__(self, config: uvicorn.Config, state: Gateway) -> None:
        super().__init__(config)
        self.gateway = state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        loop: Any = getattr(self, "_loop", None)
        if loop is not None:
            loop.call_soon_threadsafe(self.gateway.begin_stopping)
        super().handle_exit(sig, frame)

    async def serve(self, sockets: Any = None) -> None:
        import asyncio

        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)


def serve(settings: Settings, host: str, port: int, metrics_port: int | None = None) -> None:
    """Serve the API on `port`, and its Prometheus metrics on `metrics_port` (default:
    CHATBATCH_METRICS_PORT; none when neither is set), both on `host`'s interface."""
    app = create_app(settings)
    metrics_port = metrics_port or settings.metrics_port
    if metrics_port:
        try:
            app.state.metrics.serve(metrics_port, host)
        except OSError as error:
            raise ConfigurationError(
                f"cannot serve the gateway's metrics on {host}:{metrics_port} ({error.strerror}): "
                "choose a free port with --metrics-port or CHATBATCH_METRICS_PORT"
            ) from None
    # log_config=None: uvicorn's records go to chatbatch's handler (chatbatch/logs.py), not to
    # handlers of its own.
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", log_config=None, timeout_graceful_shutdown=GRACEFUL_SECONDS
    )
    _Server(config, app.state.gateway).run()
