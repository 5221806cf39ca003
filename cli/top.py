"""`chatbatch top`: the fleet at a glance, read from Redis alone (no worker needs a port).

Three tables: the live workers (from their registry heartbeats: batch rows, occupancy, requests
waiting, tokens per second), the queues they consume (messages waiting in the broker, chunks in
flight, chunks still in the jobs' backlogs), and the jobs that have not ended (progress and an
estimate of the time left). Reads never write.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import redis
from rich import box
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from chatbatch import keys, registry
from chatbatch.dispatch import queue_figures
from chatbatch.exceptions import JobNotFoundError
from chatbatch.jobs import Jobs
from chatbatch.redisconn import text
from schemas.job import BatchJob

#: Most jobs listed (the oldest open jobs first).
MOST_JOBS = 20


@dataclass
class Snapshot:
    """One read of the fleet."""

    at: float
    #: (model, heartbeat) of each live worker; a heartbeat names its worker under "worker".
    workers: list[tuple[str, dict[str, Any]]]
    #: queue -> (messages waiting in the broker, chunks in flight, chunks in job backlogs).
    queues: dict[str, tuple[int, int, int]]
    jobs: list[BatchJob]
    open_jobs: int


def read(client: redis.Redis, jobs: Jobs, *, now: float | None = None) -> Snapshot:
    """Read the workers' heartbeats, their queues and the open jobs."""
    now = time.time() if now is None else now
    workers = [(model, info) for model, infos in sorted(registry.live_models(client, now=now).items()) for info in infos]
    names = sorted({queue for _, info in workers for queue in info.get("queues", ())})
    queues = queue_figures(client, names)
    open_ids = [text(member) for member in client.zrange(keys.OPEN_JOBS, 0, -1)]
    found = []
    for job_id in open_ids[:MOST_JOBS]:
        try:
            found.append(jobs.get(job_id, now=now))
        except JobNotFoundError:  # it ended and expired between the two reads
            continue
    found.sort(key=lambda job: job.created_at)
    return Snapshot(at=now, workers=workers, queues=queues, jobs=found, open_jobs=len(open_ids))


@dataclass
class Rates:
    """Tokens per second of each worker, from the change of its generated tokens between two
    heartbeats (a heartbeat is written every CHATBATCH_HEARTBEAT_INTERVAL seconds)."""

    #: worker -> (heartbeat time, generated tokens) of the last two distinct heartbeats.
    seen: dict[str, list[tuple[float, int]]] = field(default_factory=dict)

    def update(self, snapshot: Snapshot) -> None:
        for _, info in snapshot.workers:
            sample = (float(info["seen"]), int(info.get("generated_tokens", 0)))
            history = self.seen.setdefault(str(info["worker"]), [])
            if not history or history[-1][0] != sample[0]:
                history[:] = [*history[-1:], sample]

    def rate(self, info: dict[str, Any]) -> float | None:
        """Tokens per second over the last heartbeat interval; without two heartbeats yet, the
        average over the time the engine was busy; None when it never was."""
        history = self.seen.get(str(info["worker"]), [])
        if len(history) == 2 and history[1][0] > history[0][0]:
            return (history[1][1] - history[0][1]) / (history[1][0] - history[0][0])
        busy = float(info.get("busy_seconds", 0.0))
        return int(info.get("generated_tokens", 0)) / busy if busy > 0 else None


def render(snapshot: Snapshot, rates: Rates) -> Group:
    """The three tables of one snapshot."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(snapshot.at))
    title = Text(f"chatbatch top  {stamp}  {len(snapshot.workers)} workers, {snapshot.open_jobs} open jobs", style="bold")
    return Group(title, _workers(snapshot, rates), _queues(snapshot), _jobs(snapshot))


def _table(title: str, names: int, *columns: str) -> Table:
    """A table whose first `names` columns are text and the rest figures."""
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, expand=False)
    for index, name in enumerate(columns):
        table.add_column(name, no_wrap=True, justify="left" if index < names else "right")
    return table


def _workers(snapshot: Snapshot, rates: Rates) -> Table:
    table = _table("Workers", 3, "worker", "model", "device", "pid", "rows", "occupancy", "waiting", "tok/s", "generated", "requests")
    for model, info in snapshot.workers:
        engine = info.get("engine", {})
        rate = rates.rate(info)
        table.add_row(
            str(info["worker"]),
            model,
            str(info.get("device", "")),
            str(info.get("pid", "")),
            f"{engine.get('rows_running', 0)}/{engine.get('max_rows', 0)}",
            f"{100 * float(engine.get('occupancy', 0.0)):.0f}%",
            str(engine.get("requests_waiting", 0)),
            "-" if rate is None else f"{rate:,.0f}",
            f"{int(info.get('generated_tokens', 0)):,}",
            f"{int(info.get('requests', 0)):,}",
        )
    return table


def _queues(snapshot: Snapshot) -> Table:
    table = _table("Queues", 1, "queue", "messages", "chunks in flight", "chunks in backlog")
    for name, (waiting, in_flight, backlog) in snapshot.queues.items():
        table.add_row(name, str(waiting), str(in_flight), str(backlog))
    return table


def _jobs(snapshot: Snapshot) -> Table:
    shown = len(snapshot.jobs)
    more = f" (oldest {shown} of {snapshot.open_jobs})" if snapshot.open_jobs > shown else ""
    table = _table(f"Open jobs{more}", 2, "job", "status", "done", "failed", "total", "progress", "lines/s", "ETA")
    for job in snapshot.jobs:
        counts = job.request_counts
        done = counts.completed + counts.failed
        rate, eta = _pace(job, done, snapshot.at)
        table.add_row(
            job.id,
            job.status.value,
            str(counts.completed),
            str(counts.failed),
            str(counts.total),
            f"{100 * done / counts.total:.0f}%" if counts.total else "-",
            "-" if rate is None else f"{rate:,.1f}",
            eta,
        )
    return table


def _pace(job: BatchJob, done: int, now: float) -> tuple[float | None, str]:
    """Lines answered per second since the job went in progress, and the time left at that
    rate."""
    if not job.in_progress_at or done == 0:
        return None, "-"
    rate = done / max(1e-3, now - job.in_progress_at)
    left = max(0, job.request_counts.total - done)
    seconds = int(left / rate)
    return rate, f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def once(client: redis.Redis, jobs: Jobs, console: Console) -> None:
    """Print one frame."""
    snapshot = read(client, jobs)
    rates = Rates()
    rates.update(snapshot)
    console.print(render(snapshot, rates))


def live(client: redis.Redis, jobs: Jobs, console: Console, *, interval: float = 1.0) -> None:
    """Redraw every `interval` seconds until Ctrl-C."""
    from rich.live import Live

    rates = Rates()
    snapshot = read(client, jobs)
    rates.update(snapshot)
    with Live(render(snapshot, rates), console=console, auto_refresh=False, screen=False) as view:
        try:
            while True:
                time.sleep(interval)
                snapshot = read(client, jobs)
                rates.update(snapshot)
                view.update(render(snapshot, rates), refresh=True)
        except KeyboardInterrupt:
            return
