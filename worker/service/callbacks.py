"""Callback delivery by the fleet.

Every worker runs a relay: a consumer of the notification stream's `chatbatch-callbacks` group
that turns each notification of an object with a callback URL into a `chatbatch.callback` task
on the callbacks queue, which every worker consumes. The task POSTs the signed body once per
attempt, and Celery retries it with exponential backoff (1 s, 2 s, 4 s, ... 60 s) after a
failure or a timeout, up to CHATBATCH_CALLBACK_MAX_ATTEMPTS attempts. The delivery state lives
in the record (chatbatch/callbacks.py), so a relayed duplicate or a redelivered task never
delivers twice.

Each attempt resolves the URL's host afresh and checks every address (chatbatch/egress.py): a
destination that is, or has come to resolve to, a non-public address is refused for good; the
POST connects to a checked address (the name is not resolved again), follows no redirect and
ignores proxy variables. The record keeps only whether it was delivered (`shown_error`); the
cause of a failure goes to the logs.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

from celery.utils.time import get_exponential_backoff_interval

from chatbatch import callbacks, egress
from chatbatch.events import Consumer
from chatbatch.exceptions import RefusedDestination, UnresolvedDestination
from chatbatch.jobs import batch_object
from chatbatch.queues import CALLBACK_QUEUE, TASK_CALLBACK
from chatbatch.redisconn import text
from worker.service.state import WorkerState

logger = logging.getLogger(__name__)

#: Most seconds between two attempts.
BACKOFF_MAX = 60
#: Seconds a relay's notification may stay unacknowledged before another worker's relay takes
#: it over (the relay acknowledges as soon as it has queued the task).
RELAY_MIN_IDLE = 30.0


class AttemptFailed(Exception):
    """One attempt failed; Celery retries the task after its backoff."""


def backoff(retries: int) -> int:
    """Celery's own backoff for the retry after `retries` earlier retries."""
    return int(get_exponential_backoff_interval(factor=1, retries=retries, maximum=BACKOFF_MAX, full_jitter=False))


def body(state: WorkerState, kind: str, object_id: str) -> bytes | None:
    """What is sent: the batch object, or the stored chat.completion (or error record) as it
    is; None when the object is gone from Redis."""
    if kind == callbacks.BATCH:
        if not state.jobs.exists(object_id):
            return None
        return json.dumps(batch_object(state.jobs.get(object_id), with_callback=False)).encode()
    record = state.requests.result(object_id)
    return None if record is None else json.dumps(record).encode()


def deliver(task: Any, state: WorkerState, kind: str, object_id: str, event_id: str) -> None:
    """One attempt at delivering a callback (the body of the `chatbatch.callback` task).

    Raises:
        AttemptFailed: the attempt failed and another is due (Celery retries the task).
    """
    settings = state.settings
    task_id, retries = str(task.request.id), int(task.request.retries or 0)
    attempt = state.callbacks.claim(kind, object_id, task_id, retries, lease_seconds=settings.callback_timeout + 30)
    if attempt < 0:
        logger.debug("callback for %s %s: nothing to do (%d)", kind, object_id, attempt)
        return
    holder = f"{task_id}:{retries}"
    event_id = state.callbacks.event_id(kind, object_id) or event_id
    try:
        error, final = _attempt(state, kind, object_id, event_id, attempt)
    except Exception as failure:  # whatever it is, the attempt failed and is counted so
        logger.exception("callback for %s %s: attempt %d failed", kind, object_id, attempt)
        error, final = type(failure).__name__, attempt >= settings.callback_max_attempts
    if not error:
        state.callbacks.delivered(kind, object_id, holder)
        logger.info("callback for %s %s delivered (attempt %d)", kind, object_id, attempt)
        return
    wait = backoff(retries)
    state.callbacks.failed(kind, object_id, holder, callbacks.shown_error(error), final=final, keep_lease=wait + settings.callback_timeout + 30)
    if final:
        logger.error("callback for %s %s failed for good after %d attempts (%s)", kind, object_id, attempt, error)
        return
    logger.warning("callback for %s %s: attempt %d failed (%s); retrying in %ds", kind, object_id, attempt, error, wait)
    raise AttemptFailed(f"callback for {kind} {object_id}: {error}")


def _attempt(state: WorkerState, kind: str, object_id: str, event_id: str, attempt: int) -> tuple[str, bool]:
    """POST the signed body once: ("", _) when the receiver took it, else (the error, whether
    it is final)."""
    settings = state.settings
    url = state.callbacks.url(kind, object_id)
    payload = body(state, kind, object_id)
    if not settings.callback_secret:
        return callbacks.NO_SECRET, True
    if url is None or payload is None:
        return callbacks.EXPIRED, True
    final = attempt >= settings.callback_max_attempts
    try:
        destination = egress.check(url, settings.allowed_callbacks)
    except UnresolvedDestination as unresolved:
        return str(unresolved), final
    except RefusedDestination as refused:
        logger.warning("callback for %s %s refused: %s", kind, object_id, refused)
        return callbacks.REFUSED, True
    headers = {
        "Content-Type": "application/json",
        callbacks.SIGNATURE_HEADER: callbacks.sign(settings.callback_secret, payload, int(time.time())),
        callbacks.EVENT_HEADER: kind,
        callbacks.OBJECT_HEADER: object_id,
        callbacks.EVENT_ID_HEADER: event_id,
        callbacks.ATTEMPT_HEADER: str(attempt),
    }
    return post(destination, payload, headers, timeout=settings.callback_timeout), final


def post(destination: egress.Destination, payload: bytes, headers: dict[str, str], *, timeout: float) -> str:
    """POST to the destination's checked addresses in turn (the next one only when one cannot
    be connected to), with the URL's own host in `Host` and as the TLS server name; never
    resolving the host again, following no redirect and ignoring proxy variables. Returns ""
    when the receiver took it (2xx), else what went wrong (for the logs)."""
    import httpx

    headers = {**headers, "Host": destination.host_header}
    extensions = {"sni_hostname": destination.url.raw_host.decode("ascii")} if destination.url.scheme == "https" else {}
    error = "no address to connect to"
    with httpx.Client(trust_env=False, follow_redirects=False, timeout=timeout) as client:
        for address in destination.addresses:
            try:
                response = client.post(destination.target(address), content=payload, headers=headers, extensions=extensions)
            except httpx.ConnectError as failure:
                error = f"ConnectError: {failure}"
                continue
            except httpx.HTTPError as failure:
                return f"{type(failure).__name__}: {failure}"
            return "" if 200 <= response.status_code < 300 else f"HTTP {response.status_code}"
    return error


def send_due(state: WorkerState, app: Any) -> int:
    """Send again the deliveries of callbacks the outbox says are due (the callback sweep);
    returns how many."""
    due = state.callbacks.due()
    for kind, object_id, event_id in due:
        logger.warning("callback for %s %s was not under way; sending it again", kind, object_id)
        app.send_task(TASK_CALLBACK, args=[kind, object_id, event_id], queue=CALLBACK_QUEUE)
    return len(due)


def relay(state: WorkerState, app: Any, consumer_name: str, stop: threading.Event) -> None:
    """Turn notifications of objects with a callback into callback tasks, until `stop`: the
    fast path (the callback sweep is the sure one)."""

    def handle(entry_id: str, event: dict[str, str]) -> None:
        if event.get("callback") != "1":
            return
        app.send_task(TASK_CALLBACK, args=[event["type"], event["id"], text(entry_id)], queue=CALLBACK_QUEUE)

    consumer = Consumer(state.redis, callbacks.GROUP, consumer_name, min_idle=RELAY_MIN_IDLE)
    consumer.run(handle, stop)
