"""Prometheus metrics shared by workers and gateways: what the fleet's Redis says, read at scrape
time (broker queue depth, chunks waiting in job backlogs and in flight, open jobs by status).

Every name starts with `chatbatch_`; docs/observability.md lists them all. A worker's own
metrics are in worker/service/metrics.py, the gateway's HTTP metrics in gateway/metrics.py.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator

import prometheus_client
import redis
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from redis.backoff import NoBackoff
from redis.retry import Retry

from chatbatch import keys, registry
from chatbatch.dispatch import queue_figures
from chatbatch.queues import DEFAULT_QUEUE, live_queue, model_queue
from chatbatch.redisconn import text

logger = logging.getLogger(__name__)

# No `_created` series beside every counter and histogram: Prometheus does not need them, and
# they double the series a scrape carries.
prometheus_client.disable_created_metrics()

#: Job statuses that are not final: a job is in one of them until it ends.
OPEN_STATUSES = ("validating", "in_progress", "finalizing", "cancelling", "expiring")


#: Seconds a scrape's fleet figures are reused: every worker and gateway reads the same ones.
CACHE_SECONDS = 5.0


def fleet_queues(client: redis.Redis) -> list[str]:
    """Every queue a live worker consumes, the default queue, and the queues of every model a
    worker ever served (so that a model whose workers are all gone still shows its queues)."""
    found = {DEFAULT_QUEUE}
    for raw in client.zrange(keys.MODELS, 0, -1):
        found.update((model_queue(text(raw)), live_queue(model_queue(text(raw)))))
    for workers in registry.live_models(client).values():
        for info in workers:
            found.update(info.get("queues", ()))
    return sorted(found)


def scrape_client(url: str) -> redis.Redis:
    """A connection for scrapes: short timeouts and no retries, so a scrape with Redis away
    answers at once (without fleet figures) instead of waiting for it."""
    return redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2, retry=Retry(NoBackoff(), 0))


class FleetCollector(Collector):
    """Gauges read from Redis, in a few pipelined round trips, at most once per CACHE_SECONDS.

    Args:
        client: the Redis connection (`scrape_client`).
        queues: the queues to report (called at each read).
    """

    def __init__(self, client: redis.Redis, queues: Callable[[], Iterable[str]]) -> None:
        self.redis = client
        self.queues = queues
        self._lock = threading.Lock()
        self._read: tuple[float, list[GaugeMetricFamily]] = (0.0, [])

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._lock:
            read_at, families = self._read
            if time.monotonic() - read_at >= CACHE_SECONDS:
                try:
                    families = [*self._queue_families(list(self.queues())), self._jobs()]
                except Exception as error:  # Redis away, or a record it cannot read: no fleet figures now
                    logger.warning("metrics: the fleet's figures could not be read (%s)", type(error).__name__)
                    families = []
                self._read = (time.monotonic(), families)
        yield from families

    def _queue_families(self, queues: list[str]) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily("chatbatch_queue_depth", "Messages waiting on the broker's list of a queue.", labels=["queue"])
        backlog = GaugeMetricFamily(
            "chatbatch_queue_backlog_chunks", "Chunks of jobs held in backlogs for a queue, not released to the broker yet.", labels=["queue"]
        )
        flight = GaugeMetricFamily(
            "chatbatch_queue_in_flight_chunks", "Chunks released to a queue and not answered in full yet.", labels=["queue"]
        )
        for queue, (waiting, in_flight, held) in queue_figures(self.redis, queues).items():
            depth.add_metric([queue], waiting)
            flight.add_metric([queue], in_flight)
            backlog.add_metric([queue], held)
        yield from (depth, backlog, flight)

    def _jobs(self) -> GaugeMetricFamily:
        jobs = GaugeMetricFamily("chatbatch_jobs", "Jobs that have not ended, by status.", labels=["status"])
        ids = self.redis.zrange(keys.OPEN_JOBS, 0, -1)
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hget(keys.job(text(job_id)), "status")
        counts = dict.fromkeys(OPEN_STATUSES, 0)
        for status in pipe.execute() if ids else []:
            if status is not None and text(status) in counts:
                counts[text(status)] += 1
        for status, count in counts.items():
            jobs.add_metric([status], count)
        return jobs
