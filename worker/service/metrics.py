"""A worker's Prometheus metrics, served on `--metrics-port` (`CHATBATCH_METRICS_PORT`), off by
default.

Counters and histograms are updated by the engine thread as each request ends (`observe`, the
engine's observer: a few dictionary updates per request); gauges are read at scrape time from
the engine's figures and from Redis (chatbatch/metrics.py). Every series of the worker's own is
labelled by the model it serves. docs/observability.md lists them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from chatbatch.metrics import FleetCollector, scrape_client
from schemas.chat import ChatCompletion
from schemas.errors import RequestError
from worker.engine.interface import InferenceEngine
from worker.engine.pending import Pending

logger = logging.getLogger(__name__)

#: Seconds: from a few milliseconds (a queued request taken at once) to an hour-long answer.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0)


class EngineCollector(Collector):
    """Gauges of the engine, read at scrape time."""

    def __init__(self, engine: InferenceEngine, model: str) -> None:
        self.engine = engine
        self.model = model

    def collect(self) -> Iterator[GaugeMetricFamily]:
        figures = self.engine.figures()
        for name, key, doc in (
            ("chatbatch_requests_running", "requests_running", "Requests in the running batch."),
            ("chatbatch_requests_waiting", "requests_waiting", "Requests the engine holds that have not joined the batch yet."),
            ("chatbatch_batch_rows", "rows_running", "Rows (sequences) in the running batch."),
            ("chatbatch_batch_max_rows", "max_rows", "Most rows the running batch may hold."),
            ("chatbatch_batch_occupancy", "occupancy", "Rows in use over most rows, now."),
        ):
            family = GaugeMetricFamily(name, doc, labels=["model"])
            family.add_metric([self.model], float(figures[key]))
            yield family
        yield from self._device()

    def _device(self) -> Iterator[GaugeMetricFamily]:
        """The KV budget in tokens; on CUDA, the memory allocated on the device too."""
        budget = GaugeMetricFamily("chatbatch_kv_budget_tokens", "Most prompt-plus-new tokens the batch may hold (its KV budget).", labels=["model"])
        budget.add_metric([self.model], float(self.engine.max_batch_tokens))
        yield budget
        device = self.engine.info.device
        if not device.startswith("cuda"):
            return
        import torch

        memory = GaugeMetricFamily("chatbatch_cuda_memory_used_bytes", "Memory allocated by torch on the worker's GPU.", labels=["model"])
        memory.add_metric([self.model], float(torch.cuda.memory_allocated(device)))
        yield memory


class WorkerMetrics:
    """The metrics of one worker process, in a registry of their own.

    Args:
        engine: the worker's engine (its observer is set here).
        model: the served model name.
        redis_url: for the fleet's queue and job gauges.
        queues: the queues this worker consumes.
        load_seconds: how long the model took to load.
    """

    def __init__(self, engine: InferenceEngine, model: str, redis_url: str, queues: list[str], *, load_seconds: float) -> None:
        self.registry = CollectorRegistry()
        self.model = model
        labels = ["model"]
        r = self.registry
        self.prompt_tokens = Counter("chatbatch_prompt_tokens", "Prompt tokens of the requests answered.", labels, registry=r).labels(model)
        self.generation_tokens = Counter("chatbatch_generation_tokens", "Tokens generated for the requests answered.", labels, registry=r).labels(model)
        self.cached_tokens = Counter(
            "chatbatch_cached_prompt_tokens", "Prompt tokens of the requests answered that came from the prefix cache.", labels, registry=r
        ).labels(model)
        self.finished = Counter("chatbatch_requests_finished", "Requests answered, by the finish reason of their first choice.", ["model", "finish_reason"], registry=r)
        self.errors = Counter("chatbatch_request_errors", "Requests that ended with an error, by code.", ["model", "code"], registry=r)
        self.queue_time = Histogram(
            "chatbatch_request_queue_seconds", "Seconds from the engine receiving a request to its batch taking it in.", labels,
            buckets=LATENCY_BUCKETS, registry=r,
        ).labels(model)
        self.first_token = Histogram(
            "chatbatch_time_to_first_token_seconds", "Seconds from the engine receiving a request to its first token (continuous schedule).",
            labels, buckets=LATENCY_BUCKETS, registry=r,
        ).labels(model)
        self.latency = Histogram(
            "chatbatch_request_latency_seconds", "Seconds from the engine receiving a request to its answer.", labels,
            buckets=LATENCY_BUCKETS, registry=r,
        ).labels(model)
        Gauge("chatbatch_model_load_seconds", "Seconds the served model took to load.", labels, registry=r).labels(model).set(load_seconds)
        r.register(EngineCollector(engine, model))
        r.register(FleetCollector(scrape_client(redis_url), lambda: queues))
        engine.observer = self.observe

    def observe(self, item: Pending, result: ChatCompletion | RequestError) -> None:
        """One request ended (engine thread)."""
        import time

        now = time.monotonic()
        if isinstance(result, RequestError):
            self.errors.labels(self.model, result.code.value).inc()
        else:
            usage = result.usage
            self.prompt_tokens.inc(usage.prompt_tokens)
            self.generation_tokens.inc(usage.completion_tokens)
            details = usage.prompt_tokens_details
            if details is not None and details.cached_tokens:
                self.cached_tokens.inc(details.cached_tokens)
            reason = result.choices[0].finish_reason if result.choices else "stop"
            self.finished.labels(self.model, reason).inc()
        if item.started_at:
            self.queue_time.observe(item.started_at - item.enqueued_at)
            if item.first_token_at:
                self.first_token.observe(item.first_token_at - item.enqueued_at)
            self.latency.observe(now - item.enqueued_at)

    def serve(self, port: int) -> None:
        """Serve `/metrics` on `port` (all interfaces), in a thread of its own."""
        start_http_server(port, registry=self.registry)
        logger.info("metrics on :%d/metrics", port)
