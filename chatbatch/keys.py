"""Every Redis key chatbatch uses, one helper per key, with the module that owns it. Celery's
own keys (queues, kombu's `unacked` hash) are not listed here."""

from __future__ import annotations

PREFIX = "chatbatch:"

# The model registry (chatbatch/registry.py).

#: Sorted set: served model name -> last heartbeat (unix seconds).
MODELS = PREFIX + "models"


def model_workers(model: str) -> str:
    """Hash: worker hostname -> JSON heartbeat (pid, queues, engine figures)."""
    return f"{PREFIX}model:{model}:workers"


# Jobs (chatbatch/jobs.py).

#: Sorted set of job ids by creation time.
JOBS = PREFIX + "jobs"
#: Sorted set: job id -> unix seconds at which the sweep looks at it next (its completion
#: window's end; for a job in `finalizing`, when its writer's lease ends). Only jobs that have
#: not ended are in it.
OPEN_JOBS = PREFIX + "jobs:open"


def job(job_id: str) -> str:
    """Hash: the job record's fields."""
    return f"{PREFIX}job:{job_id}"


def job_lines(job_id: str) -> str:
    """Hash: input line number -> JSON {"kind": "output"|"error", "line": output line}."""
    return f"{PREFIX}job:{job_id}:lines"


def job_inputs(job_id: str) -> str:
    """Hash: input line number -> custom_id, for every valid line (resume and cancel use it)."""
    return f"{PREFIX}job:{job_id}:inputs"


def job_writer(job_id: str) -> str:
    """String with a TTL: held by the process writing an ended job's files to S3."""
    return f"{PREFIX}job:{job_id}:writer"


def job_enqueuer(job_id: str) -> str:
    """String with a TTL: held by the producer enqueueing the job's lines, renewed as it goes."""
    return f"{PREFIX}job:{job_id}:enqueuer"


#: Set of the jobs whose lines are being enqueued (each with its enqueuer's lease).
ENQUEUING = PREFIX + "jobs:enqueuing"


# The chunk ledger (chatbatch/ledger.py).


def job_deliveries(job_id: str) -> str:
    """Hash: chunk id -> times it was delivered to a worker."""
    return f"{PREFIX}job:{job_id}:deliveries"


def job_attempts(job_id: str) -> str:
    """Hash: input line number -> times it ran alone after its chunk was redelivered."""
    return f"{PREFIX}job:{job_id}:attempts"


def job_pending(job_id: str) -> str:
    """Hash: chunk id -> JSON [queue, lines] of each chunk not yet answered in full, so that a
    chunk whose message the broker lost can be sent again."""
    return f"{PREFIX}job:{job_id}:pending"


#: Set of the jobs that have pending chunks.
PENDING_JOBS = PREFIX + "jobs:pending"

# Fair share between jobs (chatbatch/dispatch.py).


def job_backlog(job_id: str, queue: str) -> str:
    """List: the job's chunks for `queue` not released to the broker yet, in order, each
    "chunk id TAB line count TAB JSON [queue, lines]"."""
    return f"{PREFIX}job:{job_id}:backlog:{queue}"


def queue_backlogged(queue: str) -> str:
    """Hash: job id -> "priority TAB owner TAB weight TAB created" of each job with chunks in
    its backlog for `queue`."""
    return f"{PREFIX}queue:{queue}:backlogged"


def queue_in_flight(queue: str) -> str:
    """Hash: "job TAB chunk" -> "line count TAB owner TAB worker running it (empty until one
    takes it)" of each chunk released to `queue` and not yet answered in full."""
    return f"{PREFIX}queue:{queue}:inflight"


def queue_shares(queue: str) -> str:
    """Hash: owner -> virtual time (lines released over the owner's weight); "\\tclock" -> the
    queue's virtual clock. (A job's lines released so far are its record's `released_lines`.)"""
    return f"{PREFIX}queue:{queue}:shares"


# Single requests (chatbatch/requests.py).


def request(request_id: str) -> str:
    """Hash: a single request's record (queue, created_at, owner, callback URL and state)."""
    return f"{PREFIX}request:{request_id}"


def result(request_id: str) -> str:
    """String: a single request's chat.completion or error record (JSON), with a TTL."""
    return f"{PREFIX}result:{request_id}"


def result_ready(request_id: str) -> str:
    """Stream: one entry added when the result is stored; waiters block on XREAD, which reads
    without consuming, so any number of them wake."""
    return f"{PREFIX}result:{request_id}:ready"


def result_stream(request_id: str) -> str:
    """Stream: a streamed request's chat.completion.chunk objects as they are generated, then
    its end or error entry, each entry with the delivery that wrote it; written by the worker
    (worker/service/publisher.py), read with blocking XREAD (chatbatch/streams.py), with the result's TTL."""
    return f"{PREFIX}result:{request_id}:stream"


def request_deliveries(request_id: str) -> str:
    """String counter: times a single request's task was delivered."""
    return f"{PREFIX}result:{request_id}:deliveries"


#: Hash: request id -> JSON [queue, body, unix seconds sent] of each single request not yet
#: answered, so that one whose message the broker lost can be sent again.
PENDING_REQUESTS = PREFIX + "requests:pending"
#: Pub/Sub channel (not a key): each answered request's id, for gateways that wait on many
#: requests over one subscription.
ANSWERED = PREFIX + "answered"

# Callbacks (chatbatch/callbacks.py); their state lives in the job or request record.


def callback_lease(kind: str, object_id: str) -> str:
    """String with a TTL: held by the one delivery of a callback under way."""
    return f"{PREFIX}callback:{kind}:{object_id}:lease"


#: Sorted set: "kind TAB object id" of every callback not settled yet -> unix seconds at which
#: the callback sweep sends its delivery again unless an attempt is under way (the outbox).
CALLBACKS_DUE = PREFIX + "callbacks:due"


# Notifications (chatbatch/events.py).

#: Stream of notifications: one entry per answered single request and per ended job.
EVENTS = PREFIX + "events"

# The recovery sweep (worker/service/recovery.py).

#: Hash: job id -> "answered lines:unix seconds" when the recovery sweep last saw it move.
RECOVERY_SEEN = PREFIX + "recovery:seen"
#: Set: "job\tchunk" and "\trequest id" found with no message by the last look; sent again
#: only when the next look (a stall period later) finds them missing again.
RECOVERY_SUSPECTS = PREFIX + "recovery:suspects"
#: String: held by the worker running the recovery sweep.
RECOVERY_LOCK = PREFIX + "recovery:lock"
#: String: held by the process running the job sweep (expiry, stalled writes).
SWEEP_LOCK = PREFIX + "sweep:lock"

# MLflow tracking of jobs (worker/service/tracking.py).

#: Set of the jobs with an MLflow experiment whose run has not been ended yet.
TRACKED_JOBS = PREFIX + "tracking:jobs"
#: String: held by the worker bringing the runs of tracked jobs up to date.
TRACKING_LOCK = PREFIX + "tracking:lock"

# Uploaded files (gateway/files.py).

#: Sorted set of uploaded file ids by creation time.
FILES = PREFIX + "files"


def file(file_id: str) -> str:
    """Hash: an uploaded file's object (id, bytes, filename, purpose, owner, created_at)."""
    return f"{PREFIX}file:{file_id}"


# Idempotency keys (chatbatch/idempotency.py).


def idempotency(scope: str, digest: str) -> str:
    """String: JSON {"id": the object the first call made, "body": the digest of its body},
    for IDEMPOTENCY_TTL; `digest` hashes the caller's owner and key (never stored as sent)."""
    return f"{PREFIX}idempotency:{scope}:{digest}"
