"""Every Redis key chatbatch uses, one helper per key. Celery's own keys are not listed here."""

from __future__ import annotations

PREFIX = "chatbatch:"

#: Sorted set: served model name -> last heartbeat (unix seconds).
MODELS = PREFIX + "models"


def model_workers(model: str) -> str:
    """Hash: worker hostname -> JSON heartbeat (pid, loads, requests served)."""
    return f"{PREFIX}model:{model}:workers"


def result(request_id: str) -> str:
    """String: a single request's chat.completion or error record (JSON), with a TTL."""
    return f"{PREFIX}result:{request_id}"


def result_ready(request_id: str) -> str:
    """List: one element pushed when the result is stored; lets the caller block on BLPOP."""
    return f"{PREFIX}result:{request_id}:ready"


def job(job_id: str) -> str:
    """Hash: the job record's fields."""
    return f"{PREFIX}job:{job_id}"


def job_lines(job_id: str) -> str:
    """Hash: input line number -> JSON {"kind": "output"|"error", "line": output line}."""
    return f"{PREFIX}job:{job_id}:lines"


def job_inputs(job_id: str) -> str:
    """Hash: input line number -> custom_id, for every valid line (resume and cancel use it)."""
    return f"{PREFIX}job:{job_id}:inputs"


def job_deliveries(job_id: str) -> str:
    """Hash: chunk number -> times it was delivered to a worker."""
    return f"{PREFIX}job:{job_id}:deliveries"


def job_attempts(job_id: str) -> str:
    """Hash: input line number -> times it ran alone after its chunk was redelivered."""
    return f"{PREFIX}job:{job_id}:attempts"


def job_pending(job_id: str) -> str:
    """Hash: chunk id -> JSON [queue, lines] of each chunk not yet answered in full, so that a
    chunk whose message the broker lost can be sent again."""
    return f"{PREFIX}job:{job_id}:pending"


#: Hash: request id -> JSON [queue, body, unix seconds sent] of each single request not yet
#: answered, so that one whose message the broker lost can be sent again.
PENDING_REQUESTS = PREFIX + "requests:pending"
#: Set of the jobs that have pending chunks.
PENDING_JOBS = PREFIX + "jobs:pending"
#: Hash: job id -> "answered lines:unix seconds" when the recovery sweep last saw it move.
RECOVERY_SEEN = PREFIX + "recovery:seen"
#: Set: "job\tchunk" and "\trequest id" found with no message by the last look; sent again
#: only when the next look (a stall period later) finds them missing again.
RECOVERY_SUSPECTS = PREFIX + "recovery:suspects"
#: String: held by the worker running the recovery sweep.
RECOVERY_LOCK = PREFIX + "recovery:lock"


def request_deliveries(request_id: str) -> str:
    """String counter: times a single request's task was delivered."""
    return f"{PREFIX}result:{request_id}:deliveries"


#: Sorted set of job ids by creation time.
JOBS = PREFIX + "jobs"


#: Stream of notifications: one entry per answered single request and per ended job.
EVENTS = PREFIX + "events"
#: Sorted set of uploaded file ids by creation time.
FILES = PREFIX + "files"


def file(file_id: str) -> str:
    """Hash: an uploaded file's object (id, bytes, filename, purpose, owner, created_at)."""
    return f"{PREFIX}file:{file_id}"


def request(request_id: str) -> str:
    """Hash: an HTTP request's record (owner, callback URL and delivery state)."""
    return f"{PREFIX}request:{request_id}"
