"""Chunks and single requests whose message the broker lost, sent again.

Kombu's Redis transport takes a message off its queue, then records it as unacknowledged in a
second step. A worker killed between the two (SIGKILL, the OOM killer, a preempted machine)
loses the message: it is on no queue and in no unacknowledged set, and its job would never end.
The producer keeps each chunk's lines until they are answered (`Ledger.add_pending`); one
worker at a time sweeps the jobs that have stopped moving, and sends again each of their
pending chunks whose message is nowhere in Redis at two looks a stall period apart (a message
is briefly in neither place while kombu moves it, which one look could mistake for a loss).
Single requests are kept the same way until
answered, and one that has waited as long with no message anywhere is sent again. What is
sent again without having been lost only costs time: each answer is stored once, whichever
copy comes first.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import redis

from chatbatch import keys
from chatbatch.redisconn import maybe_text, text

if TYPE_CHECKING:
    from worker.service.state import WorkerState

logger = logging.getLogger(__name__)

#: `chatbatch.queues.chunk_argsrepr`, which Celery puts in the message's headers.
_CHUNK_REPR = re.compile(rb"\('([^']+)', '([^']+)', <\d+ lines>\)")
#: `chatbatch.queues.request_argsrepr`.
_REQUEST_REPR = re.compile(rb"\('([^']+)', <request>\)")
#: Kombu's hash of unacknowledged messages (its default name).
UNACKED = "unacked"
#: Messages read per LRANGE while looking for a job's chunks on a queue.
_PAGE = 200


def tasks_with_a_message(client: redis.Redis, queues: Iterable[str]) -> set[tuple[str, ...]]:
    """(job, chunk) of every chunk message and (request id,) of every single request's message
    waiting on these queues or held unacknowledged."""
    found: set[tuple[str, ...]] = set()

    def scan(raw: object) -> None:
        message = text(raw).encode()
        match = _CHUNK_REPR.search(message) or _REQUEST_REPR.search(message)
        if match:
            found.add(tuple(group.decode() for group in match.groups()))

    for queue in queues:
        for start in range(0, int(client.llen(queue)), _PAGE):
            for raw in client.lrange(queue, start, start + _PAGE - 1):
                scan(raw)
    for _, raw in client.hscan_iter(UNACKED):
        scan(raw)
    return found


def _missing_twice(client: redis.Redis, suspect: str, missing: bool) -> bool:
    """Whether a task was missing at this look and the one before; remembers this look."""
    if not missing:
        client.srem(keys.RECOVERY_SUSPECTS, suspect)
        return False
    if client.sismember(keys.RECOVERY_SUSPECTS, suspect):
        client.srem(keys.RECOVERY_SUSPECTS, suspect)
        return True
    client.sadd(keys.RECOVERY_SUSPECTS, suspect)
    return False


def sweep(state: WorkerState, send: Callable[[str, str, str, str, int], None], *, stall_seconds: float, now: float) -> list[tuple[str, str]]:
    """One pass over the jobs with pending chunks; `send(job, chunk, queue, lines, count)`
    sends a chunk (its lines JSON and how many) again. Returns the (job, chunk) pairs sent
    again.

    A job is looked at once it is fully enqueued and no line of it was answered for
    `stall_seconds`; its pending chunks with no message anywhere are sent again, and it is
    given another `stall_seconds` before the next look.
    """
    client = state.redis
    resent: list[tuple[str, str]] = []
    for job_id in state.ledger.pending_jobs():
        status, enqueued, answered = state.jobs.progress(job_id)
        if status is None or status.is_final:
            _forget(state, job_id)
            continue
        if not enqueued:
            continue  # its producer is still sending chunks (or was stopped: a resume goes on)
        seen = maybe_text(client.hget(keys.RECOVERY_SEEN, job_id))
        last, since = (int(part) for part in seen.split(":")) if seen else (-1, 0)
        if answered != last:
            client.hset(keys.RECOVERY_SEEN, job_id, f"{answered}:{int(now)}")
            continue
        if now - since < stall_seconds:
            continue
        pending = state.ledger.pending(job_id)
        alive = tasks_with_a_message(client, {queue for queue, _ in pending.values()}) if pending else set()
        for chunk, (queue, lines) in pending.items():
            if not _missing_twice(client, f"{job_id}\t{chunk}", (job_id, chunk) not in alive):
                continue
            items = json.loads(lines)
            if all(state.jobs.recorded(job_id, [item["line"] for item in items])):
                state.ledger.forget_chunk(job_id, chunk)
                continue
            logger.warning("job %s chunk %s: its message was lost (a worker died as it took it); sending it again", job_id, chunk)
            send(job_id, chunk, queue, lines, len(items))
            resent.append((job_id, chunk))
        client.hset(keys.RECOVERY_SEEN, job_id, f"{answered}:{int(now)}")
    return resent


def _forget(state: WorkerState, job_id: str) -> None:
    """An ended job: its ledger and the sweep's notes on it go."""
    client = state.redis
    state.ledger.forget_job(job_id)
    client.hdel(keys.RECOVERY_SEEN, job_id)
    for suspect in client.sscan_iter(keys.RECOVERY_SUSPECTS, match=f"{job_id}\t*"):
        client.srem(keys.RECOVERY_SUSPECTS, suspect)


def sweep_requests(
    state: WorkerState, send: Callable[[str, str, dict[str, Any]], None], *, stall_seconds: float, now: float
) -> list[str]:
    """Single requests unanswered for `stall_seconds` with no message anywhere are sent again
    with `send(request id, queue, body)`; returns their ids."""
    client = state.redis
    requests = state.requests
    waiting = {rid: entry for rid, entry in requests.pending().items() if now - entry[2] >= stall_seconds}
    if not waiting:
        return []
    alive = tasks_with_a_message(client, {queue for queue, _, _ in waiting.values()})
    resent: list[str] = []
    for request_id, (queue, body, _) in waiting.items():
        if requests.answered(request_id):
            requests.forget_pending(request_id)
            client.srem(keys.RECOVERY_SUSPECTS, f"\t{request_id}")
            continue
        # Looked at again only after another `stall_seconds`, lost or not.
        requests.resend(request_id, queue, body, now)
        if _missing_twice(client, f"\t{request_id}", (request_id,) not in alive):
            logger.warning("request %s: its message was lost (a worker died as it took it); sending it again", request_id)
            send(request_id, queue, body)
            resent.append(request_id)
    return resent
