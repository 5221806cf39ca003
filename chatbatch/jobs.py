"""The job lifecycle: every change of a job's status happens here, each in one atomic step.

    validating -> in_progress -> finalizing -> completed | failed
                     |  \\-> cancelling -> cancelled
                      \\--> expiring   -> expired

A job is created in `validating`, moves to `in_progress` with its first enqueued chunk, and ends
once every line has an output or error line and every line was enqueued. `cancel()` and
`expire()` stop it: the lines without an answer get `cancelled` or `expired` error lines, and
it ends `cancelled` or `expired` with its finished lines kept. A job whose files go to S3 waits
in `finalizing` while one process (holding a lease) writes them, then ends; its end adds a
notification to the event stream in the same step.

Every write of a line is idempotent: a line is stored once, keyed by job and input line number,
and the job's counts move only when a line is stored for the first time. A redelivered task
therefore never duplicates a line or a count.

Reads (`get`, `stop_reason`, `iter_lines`, ...) never write. A job past its completion window
that the sweep has not reached yet reads as `expiring`; `sweep()`, run by workers and gateways,
expires it, and takes over writing the files of a job whose writer died.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

import redis
from tenacity import Retrying, retry_if_exception, stop_before_delay, wait_exponential

from chatbatch import keys
from chatbatch.callbacks import callback_state
from chatbatch.dispatch import DEFAULT_PRIORITY, Dispatcher
from chatbatch.events import LUA_PUBLISH
from chatbatch.exceptions import JobNotFoundError
from chatbatch.ids import new_id
from chatbatch.parquet import ParquetOutput
from chatbatch.redisconn import maybe_text, text, texts
from chatbatch.storage import OutputFile, StorageError, is_remote
from schemas.batch import error_line
from schemas.errors import ErrorCode
from schemas.job import BatchJob, BatchUsage, InputTokensDetails, JobError, JobErrors, JobStatus, RequestCounts

logger = logging.getLogger(__name__)

#: A line's tokens: (prompt, generated, cached prompt).
Tokens = tuple[int, int, int]
#: Why lines of a job that will not run get error lines: (code, message).
StopReason = tuple[ErrorCode, str]
CANCELLED: StopReason = (ErrorCode.cancelled, "the job was cancelled before this line ran")
EXPIRED: StopReason = (ErrorCode.expired, "the job's completion window ended before this line ran")

#: `finalize()`'s answer to the one caller that must write the job's files (see `deliver`).
DELIVER = "deliver"
#: Seconds after a cancel at which the sweep closes the job, if its canceller has not.
CLOSE_GRACE = 30

# Lua: end a job whose final status is in `final` (KEYS[1] job, KEYS[2] open jobs, KEYS[3]
# events, KEYS[4] lines, KEYS[5] inputs, KEYS[7] callbacks' outbox; ARGV[1] now, ARGV[2] job
# id, ARGV[3] TTL).
_LUA_END = """
redis.call('ZREM', KEYS[2], ARGV[2])
local events, record, due, kind, object_id, status, now = KEYS[3], KEYS[1], KEYS[7], 'batch', ARGV[2], final, tonumber(ARGV[1])
""" + LUA_PUBLISH + """
for i = 1, 5 do
  if i ~= 2 and i ~= 3 then redis.call('EXPIRE', KEYS[i], ARGV[3]) end
end
"""

# KEYS: job, JOBS, OPEN_JOBS. ARGV: job id, now, expires_at, then field, value, ... Creates the
# record whole, or not at all if the id is taken.
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
return 1
"""

# KEYS: job. ARGV: now. validating -> in_progress, once.
_START = """
if redis.call('HGET', KEYS[1], 'status') == 'validating' then
  redis.call('HSET', KEYS[1], 'status', 'in_progress', 'in_progress_at', ARGV[1])
end
"""

# KEYS: lines hash, job hash. ARGV[1]: one entry per text line, "line number TAB count field
# ("completed" or "failed") TAB prompt,generated,cached tokens TAB stored JSON"; ARGV[2]: the
# model that answered ('' for none); ARGV[3..]: field, value, ... of the model's lineage, kept
# like the model (the first to store an output line). A line already stored is left as it is,
# uncounted: the job's token totals sum each line once, whichever delivery stores it.
_RECORD_LINES = """
local stored, answered = 0, false
for entry in string.gmatch(ARGV[1], '[^\\n]+') do
  local a = string.find(entry, '\\t', 1, true)
  local b = string.find(entry, '\\t', a + 1, true)
  local c = string.find(entry, '\\t', b + 1, true)
  if redis.call('HSETNX', KEYS[1], string.sub(entry, 1, a - 1), string.sub(entry, c + 1)) == 1 then
    redis.call('HINCRBY', KEYS[2], string.sub(entry, a + 1, b - 1), 1)
    local prompt, generated, cached = string.match(string.sub(entry, b + 1, c - 1), '^(%d+),(%d+),(%d+)$')
    redis.call('HINCRBY', KEYS[2], 'input_tokens', prompt)
    redis.call('HINCRBY', KEYS[2], 'generated_tokens', generated)
    redis.call('HINCRBY', KEYS[2], 'cached_tokens', cached)
    stored = stored + 1
    if string.sub(entry, a + 1, b - 1) == 'completed' then answered = true end
  end
end
if answered and ARGV[2] ~= '' then redis.call('HSETNX', KEYS[2], 'model', ARGV[2]) end
if answered then
  for i = 3, #ARGV - 1, 2 do redis.call('HSETNX', KEYS[2], ARGV[i], ARGV[i + 1]) end
end
return stored
"""

# KEYS: lines hash. ARGV: line numbers. 1 for each line with a stored answer, else 0.
_RECORDED = """
local found = {}
for i, line in ipairs(ARGV) do
  found[i] = redis.call('HEXISTS', KEYS[1], line)
end
return found
"""

# KEYS: job, open jobs, events, lines, inputs, writer lease, callbacks' outbox. ARGV: now, job
# id, TTL, lease seconds. Ends a job once every line is answered and every line enqueued. Returns the status,
# or "deliver" to the one caller that must write the job's files first (the job waits in
# "finalizing", its final status kept in "final_status", the caller holding the lease).
_FINALIZE = """
local status = redis.call('HGET', KEYS[1], 'status')
if status == false or status == 'completed' or status == 'failed' or status == 'cancelled'
   or status == 'expired' or status == 'finalizing' then
  return status
end
if redis.call('HGET', KEYS[1], 'enqueued') ~= '1' then return status end
local total = tonumber(redis.call('HGET', KEYS[1], 'total') or '0')
local done = tonumber(redis.call('HGET', KEYS[1], 'completed') or '0')
           + tonumber(redis.call('HGET', KEYS[1], 'failed') or '0')
if done < total then return status end
local final = 'completed'
if status == 'expiring' then final = 'expired' elseif status == 'cancelling' then final = 'cancelled' end
if redis.call('HGET', KEYS[1], 'deliver') == '1' then
  redis.call('HSET', KEYS[1], 'status', 'finalizing', 'finalizing_at', ARGV[1], 'final_status', final)
  redis.call('SET', KEYS[6], ARGV[1], 'EX', ARGV[4])
  redis.call('ZADD', KEYS[2], ARGV[1] + ARGV[4], ARGV[2])
  return 'deliver'
end
if final == 'completed' then
  redis.call('HSET', KEYS[1], 'status', 'completed', 'finalizing_at', ARGV[1], 'completed_at', ARGV[1])
else
  redis.call('HSET', KEYS[1], 'status', final, final .. '_at', ARGV[1])
end
""" + _LUA_END + """
return final
"""

# KEYS: job, open jobs, events, lines, inputs, writer lease, callbacks' outbox. ARGV: now, job
# id, TTL, the job's errors as JSON ('' when the files were written). Ends a job left in `finalizing`, once.
_END = """
if redis.call('HGET', KEYS[1], 'status') ~= 'finalizing' then
  return redis.call('HGET', KEYS[1], 'status')
end
local final
if ARGV[4] ~= '' then
  final = 'failed'
  redis.call('HSET', KEYS[1], 'status', 'failed', 'failed_at', ARGV[1], 'errors', ARGV[4])
else
  final = redis.call('HGET', KEYS[1], 'final_status') or 'completed'
  redis.call('HSET', KEYS[1], 'status', final, final .. '_at', ARGV[1])
end
redis.call('DEL', KEYS[6])
""" + _LUA_END + """
return final
"""

# KEYS: job, open jobs. ARGV: now, the new status ('cancelling' or 'expiring'), job id,
# seconds until the sweep looks at a cancelled job (in case its canceller stops before
# closing it). Stops a job that is validating or in progress (an expiry only once its window
# has passed); 1 if it did.
_STOP = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'validating' and status ~= 'in_progress' then return 0 end
if ARGV[2] == 'expiring' and tonumber(redis.call('HGET', KEYS[1], 'expires_at')) > tonumber(ARGV[1]) then
  return 0
end
if ARGV[2] == 'cancelling' then
  redis.call('HSET', KEYS[1], 'status', 'cancelling', 'cancelling_at', ARGV[1])
  redis.call('ZADD', KEYS[2], ARGV[1] + ARGV[4], ARGV[3])
else
  redis.call('HSET', KEYS[1], 'status', 'expiring')
end
return 1
"""

# KEYS: job, lines, enqueuer lease, the enqueuing set. ARGV: job id. A job whose producer
# stopped before it enqueued every line (no lease left) takes the lines it has as its total,
# so that a stopped job can end; 1 if it did.
_ABANDON = """
if redis.call('HGET', KEYS[1], 'enqueued') == '1' or redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'enqueued', 1, 'total', redis.call('HLEN', KEYS[2]))
redis.call('SREM', KEYS[4], ARGV[1])
return 1
"""

# KEYS: as `_END`'s. ARGV: now, job id, TTL, the job's errors as JSON. Fails a job that has not
# ended; its status, after.
_FAIL = """
local status = redis.call('HGET', KEYS[1], 'status')
if status == false or status == 'completed' or status == 'failed' or status == 'cancelled' or status == 'expired' then
  return status
end
local final = 'failed'
redis.call('HSET', KEYS[1], 'status', 'failed', 'failed_at', ARGV[1], 'errors', ARGV[4])
""" + _LUA_END + """
return final
"""

_INT_FIELDS = (
    "created_at",
    "in_progress_at",
    "expires_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)


def output_file_id(job_id: str) -> str:
    """The file id of an ended job's output lines on the HTTP API."""
    return f"file-{job_id}-output"


def error_file_id(job_id: str) -> str:
    """The file id of an ended job's error lines on the HTTP API."""
    return f"file-{job_id}-errors"


def batch_object(job: BatchJob, *, with_callback: bool = True) -> dict[str, Any]:
    """The batch as the HTTP API and callbacks show it: the OpenAI Batch object, with the ids
    of its output and error files once it has ended."""
    body = job.model_dump(exclude={"callback"} if not with_callback else None)
    if job.status.is_final:
        body["output_file_id"] = output_file_id(job.id)
        body["error_file_id"] = error_file_id(job.id)
    return body


def job_usage(data: dict[str, str]) -> BatchUsage:
    """The job's token totals from its record's fields (each line counted once)."""
    prompt, generated, cached = (int(data.get(name) or 0) for name in ("input_tokens", "generated_tokens", "cached_tokens"))
    return BatchUsage(
        input_tokens=prompt, output_tokens=generated, total_tokens=prompt + generated,
        input_tokens_details=InputTokensDetails(cached_tokens=cached),
    )


class Jobs:
    """Job records and lines in Redis. Thread-safe (redis-py pools connections).

    Args:
        client: the Redis connection (decoded replies or not).
        job_ttl: seconds a job's record and lines stay after it ends.
        upload_retry_seconds: how long writing an ended job's S3 files retries before the job
            fails (boto3 retries each try too).
    """

    def __init__(self, client: redis.Redis, *, job_ttl: int, upload_retry_seconds: float = 120.0) -> None:
        self.redis = client
        self.job_ttl = job_ttl
        self.upload_retry_seconds = upload_retry_seconds
        #: How long a writer holds an ended job's files before the sweep may take over.
        self.writer_lease = int(upload_retry_seconds) + 120
        self._create = client.register_script(_CREATE)
        self._start = client.register_script(_START)
        self._record_lines = client.register_script(_RECORD_LINES)
        self._finalize = client.register_script(_FINALIZE)
        self._end = client.register_script(_END)
        self._stop = client.register_script(_STOP)
        self._abandon = client.register_script(_ABANDON)
        self._fail = client.register_script(_FAIL)
        self._dispatcher = Dispatcher(client, job_ttl=job_ttl)

    def _end_keys(self, job_id: str) -> list[str]:
        return [
            keys.job(job_id), keys.OPEN_JOBS, keys.EVENTS, keys.job_lines(job_id), keys.job_inputs(job_id),
            keys.job_writer(job_id), keys.CALLBACKS_DUE,
        ]

    # Writes.

    def create(
        self,
        job_id: str,
        *,
        input_file: str,
        completion_window: str = "24h",
        expires_in: int = 86_400,
        metadata: dict[str, str] | None = None,
        output_file: str | None = None,
        error_file: str | None = None,
        extra: dict[str, str] | None = None,
    ) -> bool:
        """Create the job record in `validating`; returns False if the id is taken.

        `extra` fields are kept with the record (the HTTP API's owner and file ids, a callback
        URL).
        """
        now = int(time.time())
        fields: dict[str, Any] = {
            "id": job_id,
            "input_file": input_file,
            "completion_window": completion_window,
            "status": JobStatus.validating.value,
            "created_at": now,
            "expires_at": now + expires_in,
            "total": 0,
            "completed": 0,
            "failed": 0,
            "enqueued": 0,
            "metadata": json.dumps(metadata or {}),
            "output_file": output_file or f"redis:{job_id}/output",
            "error_file": error_file or f"redis:{job_id}/errors",
            # Files in object storage are written by whoever ends the job (any worker).
            "deliver": int(any(is_remote(d) for d in (output_file, error_file))),
            **(extra or {}),
        }
        args = [job_id, now, now + expires_in, *(item for pair in fields.items() for item in pair)]
        return bool(self._create(keys=[keys.job(job_id), keys.JOBS, keys.OPEN_JOBS], args=args))

    def hold_enqueuer(self, job_id: str, holder: str, *, seconds: int = 60) -> None:
        """Take or renew the enqueuer's lease: while it is held, a stopped job waits for its
        producer to finish enqueueing before it ends."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(keys.job_enqueuer(job_id), holder, ex=seconds)
        pipe.sadd(keys.ENQUEUING, job_id)
        pipe.execute()

    def release_enqueuer(self, job_id: str, *, unfinished: bool = False) -> None:
        """Give the enqueuer's lease up: for good, or, `unfinished`, so that another producer
        resumes the job at once (a gateway that stops hands its batches to the others)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.delete(keys.job_enqueuer(job_id))
        if not unfinished:
            pipe.srem(keys.ENQUEUING, job_id)
        pipe.execute()

    def start(self, job_id: str) -> None:
        """validating -> in_progress, once; a cancel that lands meanwhile is never overwritten."""
        self._start(keys=[keys.job(job_id)], args=[int(time.time())])

    def add_inputs(self, job_id: str, lines: dict[int, str], *, queues: set[str] | None = None) -> None:
        """Remember the valid lines (number -> custom_id) before they are enqueued, and the
        queues the job's chunks go to (so that a watcher can say when none has a worker)."""
        pipe = self.redis.pipeline(transaction=False)
        if lines:
            pipe.hset(keys.job_inputs(job_id), mapping=lines)  # type: ignore[arg-type]
        if queues:
            pipe.hset(keys.job(job_id), "queues", ",".join(sorted(queues)))
        pipe.execute()

    def finish_enqueueing(self, job_id: str, total: int) -> str | None:
        """Record the line count once every line was enqueued or answered, and release the
        enqueuer's lease; may end the job."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(keys.job(job_id), mapping={"total": total, "enqueued": 1})
        pipe.delete(keys.job_enqueuer(job_id))
        pipe.srem(keys.ENQUEUING, job_id)
        pipe.execute()
        self.start(job_id)
        return self.finalize(job_id)

    def record_line(self, job_id: str, line: int, kind: str, payload: dict[str, Any] | str, *, tokens: int | Tokens = 0) -> bool:
        """Store the output or error line of input line `line`; False if it was stored before.

        Args:
            kind: "output" or "error".
            payload: the BatchRequestOutput as a dict or as JSON text.
            tokens: the line's (prompt, generated, cached) tokens, or its generated tokens alone.
        """
        return self.record_lines(job_id, [(line, kind, payload, tokens)]) == 1

    def record_lines(
        self, job_id: str, entries: Sequence[tuple[int, str, dict[str, Any] | str, int | Tokens]], *,
        model: str | None = None, lineage: dict[str, str] | None = None,
    ) -> int:
        """Store many lines in one call: (line, kind, payload, tokens) each, the payload a dict
        or its JSON text and the tokens as in `record_line`; returns how many were stored for
        the first time. `model` names the model that answered and `lineage` where it came from
        (`model_uri`, `model_name`, `model_version`); the job keeps the first of each."""
        if not entries:
            return 0
        # One argument for all: "line TAB counter TAB tokens TAB stored-JSON" per entry, one
        # entry per text line (JSON text holds no raw newline or tab).
        parts: list[str] = []
        for line, kind, payload, tokens in entries:
            body = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
            value = f'{{"kind":"{kind}","line":{body}}}'
            if "\n" in value or "\t" in value:
                raise ValueError(f"line {line}: its JSON holds a raw newline or tab")
            prompt, generated, cached = (max(0, int(n)) for n in ((0, tokens, 0) if isinstance(tokens, int) else tokens))
            parts.append(f"{int(line)}\t{'completed' if kind == 'output' else 'failed'}\t{int(prompt)},{int(generated)},{int(cached)}\t{value}")
        return int(self._record_lines(keys=[keys.job_lines(job_id), keys.job(job_id)], args=["\n".join(parts), model or "", *(item for pair in (lineage or {}).items() for item in pair)]))

    def close_lines(self, job_id: str, lines: list[tuple[int, str | None]], reason: StopReason, *, now: float | None = None) -> int:
        """Give these lines (number, custom_id) error lines for `reason`, unless answered
        already; an expiry first marks the job `expiring`, so that it ends `expired`. Returns
        how many were stored."""
        if reason == EXPIRED:
            self.expire(job_id, now=now)
        code, message = reason
        stored = 0
        for start in range(0, len(lines), 1000):
            entries: list[tuple[int, str, dict[str, Any] | str, int]] = [
                (number, "error", error_line(line_id=new_id("batch_req_"), custom_id=custom_id, code=code,
                                             message=message, line=number).model_dump(), 0)
                for number, custom_id in lines[start : start + 1000]
            ]
            stored += self.record_lines(job_id, entries)
        return stored

    def close(self, job_id: str, reason: StopReason, *, now: float | None = None, write_files: bool = True) -> str | None:
        """Give every enqueued line without an answer an error line for `reason`, then end the
        job if it can end (see `finalize` for `write_files`). Returns the job's status after it.
        The job's chunks not released to the broker yet are dropped first: a stopped job leaves
        nothing queued."""
        self._dispatcher.drop(job_id, self.queues(job_id))
        inputs = self.inputs(job_id)
        numbers = sorted(inputs)
        open_lines: list[tuple[int, str | None]] = []
        for start in range(0, len(numbers), 1000):
            batch = numbers[start : start + 1000]
            open_lines += [(n, inputs[n]) for n, done in zip(batch, self.recorded(job_id, batch)) if not done]
        closed = self.close_lines(job_id, open_lines, reason, now=now)
        if closed:
            logger.info("job %s: %d lines closed (%s)", job_id, closed, reason[0].value)
        keys_ = [keys.job(job_id), keys.job_lines(job_id), keys.job_enqueuer(job_id), keys.ENQUEUING]
        if self._abandon(keys=keys_, args=[job_id]):
            logger.warning("job %s: its producer stopped before enqueueing every line; it ends with the lines it has", job_id)
        return self.finalize(job_id, write_files=write_files)

    def cancel(self, job_id: str) -> BatchJob:
        """Stop the job: no new line starts, unanswered lines become `cancelled` error lines.
        A batch already running on a worker finishes, and its answers are kept. An ended (or
        ending) job is returned as it is.

        Raises:
            JobNotFoundError: no such job.
        """
        self.get(job_id)
        if self._stop(keys=[keys.job(job_id), keys.OPEN_JOBS], args=[int(time.time()), JobStatus.cancelling.value, job_id, CLOSE_GRACE]):
            self.close(job_id, CANCELLED)
        return self.get(job_id)

    def expire(self, job_id: str, *, now: float | None = None) -> bool:
        """Mark a job past its completion window `expiring`; True if this call did. The caller
        closes its lines (`close`, `close_lines`)."""
        when = int(time.time() if now is None else now)
        return bool(self._stop(keys=[keys.job(job_id), keys.OPEN_JOBS], args=[when, JobStatus.expiring.value, job_id, CLOSE_GRACE]))

    def fail(self, job_id: str, error: JobError) -> JobStatus:
        """End a job that cannot go on (its input cannot be read) as `failed`, with `error`;
        an ended job keeps its status. Lines answered meanwhile are kept."""
        errors = JobErrors(data=[error]).model_dump_json()
        status = self._fail(keys=self._end_keys(job_id), args=[int(time.time()), job_id, self.job_ttl, errors])
        self.release_enqueuer(job_id)
        return JobStatus(text(status))

    def take_enqueuer(self, job_id: str, holder: str, *, seconds: int = 60) -> bool:
        """Take the enqueuer's lease of a job whose producer stopped (to resume it); False if
        another holds it."""
        return bool(self.redis.set(keys.job_enqueuer(job_id), holder, nx=True, ex=seconds))

    def finalize(self, job_id: str, *, write_files: bool = True) -> str | None:
        """End the job if every line is answered; the caller that ends a job whose files go to
        S3 writes them (with retries) before the job ends, unless `write_files` is False: then
        it leaves the job `finalizing` for the next sweep of a worker. Returns the job's status."""
        outcome = maybe_text(
            self._finalize(keys=self._end_keys(job_id), args=[int(time.time()), job_id, self.job_ttl, self.writer_lease])
        )
        if outcome != DELIVER:
            return outcome
        if not write_files:
            pipe = self.redis.pipeline(transaction=False)
            pipe.delete(keys.job_writer(job_id))
            pipe.zadd(keys.OPEN_JOBS, {job_id: int(time.time())})
            pipe.execute()
            return JobStatus.finalizing.value
        return self.deliver(job_id).value

    def deliver(self, job_id: str) -> JobStatus:
        """Write the files of a job in `finalizing` (the caller holds the writer's lease), then
        end it: with its final status, or `failed` naming the destination and the cause when
        the store refuses or stays away for `upload_retry_seconds`."""
        job = self.get(job_id)
        remote = [dest if is_remote(dest) else None for dest in (job.output_file, job.error_file)]
        error: JobError | None = None
        try:
            for attempt in Retrying(
                retry=retry_if_exception(lambda e: isinstance(e, StorageError) and e.transient),
                stop=stop_before_delay(self.upload_retry_seconds),
                wait=wait_exponential(multiplier=1, max=10),
                before_sleep=lambda state: logger.warning(
                    "job %s: %s; retrying in %.0fs", job_id, state.outcome.exception() if state.outcome else "",
                    state.upcoming_sleep,
                ),
                reraise=True,
            ):
                with attempt:
                    written = self.write_files(job_id, remote[0], remote[1])
        except StorageError as failure:
            logger.error("job %s: %s; giving up", job_id, failure)
            message = f"{failure}; gave up after retrying for {self.upload_retry_seconds:.0f}s" if failure.transient else str(failure)
            error = JobError(code="output_upload_failed", message=message)
        errors = JobErrors(data=[error]).model_dump_json() if error else ""
        status = JobStatus(text(self._end(keys=self._end_keys(job_id), args=[int(time.time()), job_id, self.job_ttl, errors])))
        if error is None:
            logger.info("job %s %s: %d output and %d error lines", job_id, status.value, *written)
        return status

    def sweep(self, now: float | None = None, *, limit: int = 100, write_files: bool = True) -> list[str]:
        """Act on the jobs whose time has come: expire those past their completion window,
        close a cancelled one whose canceller stopped, and take over writing the files of one
        whose writer's lease ended. A process without the store's credentials (a gateway)
        sweeps with `write_files=False`: a job it ends that has files to write is left in
        `finalizing` for a worker's sweep. Returns the ids it acted on."""
        now = time.time() if now is None else now
        acted: list[str] = []
        for member in self.redis.zrangebyscore(keys.OPEN_JOBS, "-inf", now, start=0, num=limit):
            job_id = text(member)
            try:
                if self._sweep_job(job_id, now, write_files):
                    acted.append(job_id)
            except Exception:  # one job that cannot be handled must not stop the others
                logger.exception("job %s: the sweep could not act on it; it looks again in %ds", job_id, CLOSE_GRACE)
                self.redis.zadd(keys.OPEN_JOBS, {job_id: now + CLOSE_GRACE})
        self._forget_gone(limit)
        return acted

    def _sweep_job(self, job_id: str, now: float, write_files: bool) -> bool:
        status, expires_at = (maybe_text(v) for v in self.redis.hmget(keys.job(job_id), ["status", "expires_at"]))
        if status is None or JobStatus(status).is_final:
            self.redis.zrem(keys.OPEN_JOBS, job_id)
            return False
        if status == JobStatus.finalizing.value:
            if not write_files:
                return False
            if not self.redis.set(keys.job_writer(job_id), int(now), nx=True, ex=self.writer_lease):
                self.redis.zadd(keys.OPEN_JOBS, {job_id: now + 30})  # its writer is still at work
                return False
            logger.warning("job %s: its files were not written in time; writing them here", job_id)
            self.redis.zadd(keys.OPEN_JOBS, {job_id: now + self.writer_lease})
            self.deliver(job_id)
            return True
        if status == JobStatus.cancelling.value:
            outcome = self.close(job_id, CANCELLED, now=now, write_files=write_files)
        elif expires_at is not None and int(expires_at) <= now:
            outcome = self.close(job_id, EXPIRED, now=now, write_files=write_files)
        else:  # not due yet: looked at again at the end of its window
            self.redis.zadd(keys.OPEN_JOBS, {job_id: int(expires_at or now)})
            return False
        if outcome in (JobStatus.cancelling.value, JobStatus.expiring.value):
            # It cannot end yet (its producer still enqueues): looked at again in a while.
            self.redis.zadd(keys.OPEN_JOBS, {job_id: now + CLOSE_GRACE})
        return True

    def _forget_gone(self, count: int) -> None:
        """Drop the oldest ids of the job list whose records expired from Redis."""
        oldest = [text(member) for member in self.redis.zrange(keys.JOBS, 0, count - 1)]
        pipe = self.redis.pipeline(transaction=False)
        for job_id in oldest:
            pipe.exists(keys.job(job_id))
        gone = [job_id for job_id, exists in zip(oldest, pipe.execute()) if not exists]
        if gone:
            self.redis.zrem(keys.JOBS, *gone)

    # Reads.

    def exists(self, job_id: str) -> bool:
        return bool(self.redis.exists(keys.job(job_id)))

    def get(self, job_id: str, *, now: float | None = None) -> BatchJob:
        """The job record. A job past its completion window that has not been expired yet reads
        as `expiring`.

        Raises:
            JobNotFoundError: no such job (or it expired from Redis).
        """
        data = texts(self.redis.hgetall(keys.job(job_id)))
        if not data:
            raise JobNotFoundError(f"no job {job_id!r} in Redis: check the id (chatbatch prints it at submit)")
        status = data["status"]
        now = time.time() if now is None else now
        if status in ("validating", "in_progress") and int(data.get("expires_at") or now + 1) <= now:
            status = JobStatus.expiring.value
        record: dict[str, Any] = {
            "id": data["id"],
            "input_file": data.get("input_file", ""),
            "completion_window": data.get("completion_window", "24h"),
            "status": status,
            "output_file": data.get("output_file"),
            "error_file": data.get("error_file"),
            "request_counts": RequestCounts(
                total=int(data.get("total", 0)),
                completed=int(data.get("completed", 0)),
                failed=int(data.get("failed", 0)),
            ),
            "metadata": json.loads(data.get("metadata", "{}")) or None,
            "priority": data.get("priority") or DEFAULT_PRIORITY,
            "model": data.get("model"),
            "usage": job_usage(data),
        }
        for name in _INT_FIELDS:
            if data.get(name):
                record[name] = int(data[name])
        if data.get("errors"):
            record["errors"] = JobErrors.model_validate_json(data["errors"])
        for name in ("input_file_id", "output_file_id", "error_file_id"):
            if data.get(name):
                record[name] = data[name]
        record["callback"] = callback_state(data)
        return BatchJob.model_validate(record)

    def field(self, job_id: str, name: str) -> str | None:
        return maybe_text(self.redis.hget(keys.job(job_id), name))

    def progress(self, job_id: str) -> tuple[JobStatus | None, bool, int]:
        """(status as stored, whether every line was enqueued, lines answered) in one read."""
        status, enqueued, completed, failed = (
            maybe_text(v) for v in self.redis.hmget(keys.job(job_id), ["status", "enqueued", "completed", "failed"])
        )
        return (JobStatus(status) if status else None), enqueued == "1", int(completed or 0) + int(failed or 0)

    def page(self, owner: str, *, limit: int, after: str | None = None) -> tuple[list[BatchJob], bool]:
        """The jobs of `owner` (the HTTP API's key owner), newest first, after the job `after`:
        up to `limit`, and whether there are more. A cursor that is not one of `owner`'s jobs
        reads as an unknown one (an empty page): another owner's job id gives nothing away."""
        found: list[BatchJob] = []
        passed = after is None
        for start in range(0, self.redis.zcard(keys.JOBS), 500):
            ids = [text(member) for member in self.redis.zrevrange(keys.JOBS, start, start + 499)]
            pipe = self.redis.pipeline(transaction=False)
            for job_id in ids:
                pipe.hget(keys.job(job_id), "owner")
            for job_id, job_owner in zip(ids, pipe.execute()):
                mine = maybe_text(job_owner) == owner
                if not passed:
                    passed = job_id == after and mine
                    continue
                if not mine:
                    continue
                if len(found) == limit:
                    return found, True
                found.append(self.get(job_id))
        return found, False

    def backfill_open(self) -> int:
        """Put every job that has not ended into the sweep's set (jobs created before the set
        existed); returns how many were missing. Safe to run again."""
        added = 0
        for start in range(0, self.redis.zcard(keys.JOBS), 1000):
            ids = [text(member) for member in self.redis.zrange(keys.JOBS, start, start + 999)]
            pipe = self.redis.pipeline(transaction=False)
            for job_id in ids:
                pipe.hmget(keys.job(job_id), ["status", "expires_at"])
            for job_id, (status, expires_at) in zip(ids, pipe.execute()):
                if status is None or JobStatus(text(status)).is_final:
                    continue
                added += 1 if self.redis.zadd(keys.OPEN_JOBS, {job_id: int(text(expires_at or 0))}, nx=True) else 0
        return added

    def enqueuing(self) -> list[str]:
        """Jobs whose producer registered as enqueueing their lines and has not finished."""
        return sorted(text(member) for member in self.redis.smembers(keys.ENQUEUING))

    def enqueuer_alive(self, job_id: str) -> bool:
        return bool(self.redis.exists(keys.job_enqueuer(job_id)))

    def queues(self, job_id: str) -> list[str]:
        """The queues the job's chunks were sent to."""
        value = self.field(job_id, "queues")
        return value.split(",") if value else []

    def generated_tokens(self, job_id: str) -> int:
        """Tokens generated for the job's answered lines so far (for progress displays)."""
        return int(self.field(job_id, "generated_tokens") or 0)

    def stop_reason(self, job_id: str, *, now: float | None = None) -> StopReason | None:
        """CANCELLED or EXPIRED when the job's lines should no longer run (cancelled, or past
        its completion window), else None."""
        status, expires_at = (maybe_text(v) for v in self.redis.hmget(keys.job(job_id), ["status", "expires_at"]))
        if status in ("cancelling", "cancelled"):
            return CANCELLED
        if status in ("expiring", "expired"):
            return EXPIRED
        now = time.time() if now is None else now
        if status in ("validating", "in_progress") and expires_at is not None and int(expires_at) <= now:
            return EXPIRED
        return None

    def recorded(self, job_id: str, lines: list[int]) -> list[bool]:
        """Which of these input lines already have an output or error line: checked without
        sending the answers back, in one read-only script (EVAL_RO; five times quicker than a
        pipeline of HEXISTS for a chunk of 256 lines)."""
        if not lines:
            return []
        return [bool(v) for v in self.redis.eval_ro(_RECORDED, 1, keys.job_lines(job_id), *lines)]

    def inputs(self, job_id: str) -> dict[int, str]:
        """Every enqueued line: number -> custom_id."""
        return {int(k): v for k, v in texts(self.redis.hgetall(keys.job_inputs(job_id))).items()}

    def iter_lines(self, job_id: str, kind: str | None = None) -> Iterator[tuple[int, str, str]]:
        """(input line, kind, JSON line) for every stored line (of one kind, if given), in
        input order, read a thousand at a time."""
        numbers = sorted(int(text(k)) for k in self.redis.hkeys(keys.job_lines(job_id)))
        for start in range(0, len(numbers), 1000):
            batch = numbers[start : start + 1000]
            for number, raw in zip(batch, self.redis.hmget(keys.job_lines(job_id), batch)):
                if raw is None:
                    continue
                item = json.loads(raw)
                if kind is None or item["kind"] == kind:
                    yield number, item["kind"], json.dumps(item["line"], separators=(",", ":"))

    def write_files(self, job_id: str, output: str | None, errors: str | None, *, client: Any = None) -> tuple[int, int]:
        """Write a job's output and error lines, in input order, to local files or S3 objects,
        as JSONL, or as Parquet for a destination ending in `.parquet`; each file appears
        complete or not at all.

        Returns:
            (output lines, error lines) of the job.

        Raises:
            StorageError: an upload failed after boto3's retries.
        """
        if not output and not errors:
            # Nothing to write (the lines stay in Redis): the counts come from the record.
            counts = self.get(job_id).request_counts
            return counts.completed, counts.failed
        files: dict[str, OutputFile | ParquetOutput] = {}
        counts_by_kind = {"output": 0, "error": 0}
        try:
            for kind, dest in (("output", output), ("error", errors)):
                if dest:
                    # A destination ending in .parquet is written as Parquet (chatbatch/parquet.py).
                    files[kind] = ParquetOutput(dest, kind, client=client) if dest.endswith(".parquet") else OutputFile(dest, client=client)
            for number, kind, line in self.iter_lines(job_id):
                counts_by_kind[kind] += 1
                if kind in files:
                    files[kind].write(number, line)
            for file in files.values():
                file.commit()
        finally:
            for file in files.values():
                file.discard()
        return counts_by_kind["output"], counts_by_kind["error"]
