"""Callbacks: a POST to the URL a request or a batch named, when it ends.

The sender reads the notification stream with a consumer group, so several gateways share the
work and a restarted gateway picks up where it stopped. Each callback is signed:

    X-Chatbatch-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(CHATBATCH_CALLBACK_SECRET, "<t>.<body>")>

Receivers recompute the HMAC over the timestamp, a dot and the raw body, compare in constant
time, and reject old timestamps (replays). Failed deliveries are retried with backoff up to
CHATBATCH_CALLBACK_MAX_ATTEMPTS; the delivery state is kept in the record.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis

from chatbatch import keys
from chatbatch.jobstore import JobStore
from chatbatch.redisconn import text
from chatbatch.settings import Settings
from schemas.job import BatchJob

logger = logging.getLogger(__name__)

GROUP = "chatbatch-callbacks"
SIGNATURE_HEADER = "X-Chatbatch-Signature"


def sign(secret: str, body: bytes, timestamp: int) -> str:
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify(secret: str, body: bytes, header: str, *, tolerance: float = 300) -> bool:
    """Check a signature header (for receivers written in Python)."""
    try:
        fields = dict(part.split("=", 1) for part in header.split(","))
        timestamp = int(fields["t"])
    except (ValueError, KeyError):
        return False
    if abs(time.time() - timestamp) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, body, timestamp), header)


def batch_body(job: BatchJob) -> dict[str, Any]:
    """The batch as the HTTP API shows it (the OpenAI Batch object, with file ids)."""
    return job.model_dump(exclude_none=False)


class CallbackSender:
    """Delivers callbacks in background threads of the gateway process."""

    def __init__(self, client: redis.Redis, settings: Settings, store: JobStore) -> None:
        self.redis = client
        self.settings = settings
        self.store = store
        self.consumer = f"{socket.gethostname()}-{os.getpid()}"
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="chatbatch-callback")
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        try:
            self.redis.xgroup_create(keys.EVENTS, GROUP, id="0", mkstream=True)
        except redis.ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise
        self._thread = threading.Thread(target=self._loop, name="chatbatch-callbacks", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _loop(self) -> None:
        backlog = True  # first our own unacknowledged entries (after a restart), then new ones
        while not self._stop.is_set():
            try:
                # redis-py types the reply as a union of every protocol's shape.
                answer: Any = self.redis.xreadgroup(
                    GROUP, self.consumer, {keys.EVENTS: "0" if backlog else ">"}, count=32, block=1000
                )
            except redis.RedisError as error:
                logger.warning("reading notifications failed (%s); retrying", type(error).__name__)
                time.sleep(1)
                continue
            entries = answer[0][1] if answer else []
            if backlog and not entries:
                backlog = False
            for entry_id, fields in entries:
                event = {text(k): text(v) for k, v in fields.items()}
                self._pool.submit(self._handle, entry_id, event)

    def _handle(self, entry_id: bytes, event: dict[str, str]) -> None:
        try:
            self.deliver(event)
        except Exception:
            logger.exception("callback for %s %s failed", event.get("type"), event.get("id"))
        finally:
            self.redis.xack(keys.EVENTS, GROUP, entry_id)

    def deliver(self, event: dict[str, str]) -> None:
        import httpx

        kind, object_id = event["type"], event["id"]
        record_key = keys.job(object_id) if kind == "batch" else keys.request(object_id)
        url = self.redis.hget(record_key, "callback_url")
        if not url or self.redis.hget(record_key, "callback_status") == b"delivered":
            return
        if kind == "batch":
            body = json.dumps(batch_body(self.store.get(object_id))).encode()
        else:
            raw = self.redis.get(keys.result(object_id))
            if raw is None:
                return
            body = raw if isinstance(raw, bytes) else raw.encode()
        pause = 1.0
        for attempt in range(1, self.settings.callback_max_attempts + 1):
            timestamp = int(time.time())
            headers = {
                "Content-Type": "application/json",
                SIGNATURE_HEADER: sign(self.settings.callback_secret, body, timestamp),
                "X-Chatbatch-Event": kind,
                "X-Chatbatch-Object-Id": object_id,
            }
            error = ""
            try:
                response = httpx.post(text(url), content=body, headers=headers, timeout=self.settings.callback_timeout)
                if 200 <= response.status_code < 300:
                    self.redis.hset(record_key, mapping={
                        "callback_status": "delivered", "callback_attempts": attempt,
                        "callback_delivered_at": int(time.time()), "callback_last_error": "",
                    })
                    logger.info("callback for %s %s delivered (attempt %d)", kind, object_id, attempt)
                    return
                error = f"HTTP {response.status_code}"
            except httpx.HTTPError as failure:
                error = type(failure).__name__
            final = attempt == self.settings.callback_max_attempts
            self.redis.hset(record_key, mapping={
                "callback_status": "failed" if final else "pending",
                "callback_attempts": attempt,
                "callback_last_error": error,
            })
            logger.warning("callback for %s %s: attempt %d failed (%s)", kind, object_id, attempt, error)
            if final or self._stop.wait(pause):
                return
            pause = min(pause * 2, 60.0)
