"""The gateway's Prometheus metrics: HTTP requests by method, route and status, their duration,
and the fleet's queue and job gauges read from Redis at scrape time (chatbatch/metrics.py).

They are served on a port of their own (`chatbatch serve --metrics-port`, or
CHATBATCH_METRICS_PORT), never on the API's: they describe the whole fleet (served models,
queue depths, jobs by status), which no tenant's key should read, and a scraper needs no key on
a port the cluster keeps to itself, as the workers' metrics port and Envoy's or TGI's metrics
listeners do (docs/operations.md#what-is-exposed).
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatbatch.metrics import FleetCollector, fleet_queues, scrape_client

#: Seconds: quick reads to answers that wait for a long generation.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class GatewayMetrics:
    """The gateway's registry and its HTTP series."""

    def __init__(self, redis_url: str) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "chatbatch_http_requests", "HTTP requests answered, by method, route and status.", ["method", "route", "status"], registry=self.registry
        )
        self.duration = Histogram(
            "chatbatch_http_request_duration_seconds", "Seconds from a request's arrival to the end of its answer (a stream's end).",
            ["method", "route"], buckets=DURATION_BUCKETS, registry=self.registry,
        )
        client = scrape_client(redis_url)
        self.registry.register(FleetCollector(client, lambda: fleet_queues(client)))

    def serve(self, port: int, host: str) -> None:
        """Serve `/metrics` on `port` of `host`'s interface, in a thread of its own (the scrape
        reads Redis there, off the event loop)."""
        start_http_server(port, addr=host, registry=self.registry)


class HttpMetrics:
    """ASGI middleware counting each HTTP request once its answer has been sent, under its
    route's template (`/v1/batches/{job_id}`, never the id), so series stay few; a path no route
    matches counts as `unmatched`."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            method = scope.get("method", "")
            self.metrics.requests.labels(method, route, str(status)).inc()
            self.metrics.duration.labels(method, route).observe(time.monotonic() - started)
