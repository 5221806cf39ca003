"""Job records and job lines in Redis, shared by the producer and the worker.

Every write of a line is idempotent: a line is stored once, keyed by job and input line number
(one custom_id per line), and the job's counts move only when a line is stored for the first
time. A redelivered task therefore never duplicates a line or a count.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any, cast

import redis

from chatbatch import keys
from chatbatch.events import LUA_PUBLISH_JOB, publish
from chatbatch.exceptions import JobNotFoundError
from chatbatch.redisconn import Fields, text
from schemas.job import BatchJob, JobError, JobErrors, JobStatus, RequestCounts

# KEYS: lines hash, job hash. ARGV[1]: one entry per text line, "line number TAB count field
# ("completed" or "failed") TAB generated tokens TAB stored JSON". A line already stored is left
# as it is, uncounted.
_RECORD_LINES = """
local stored = 0
for entry in string.gmatch(ARGV[1], '[^\\n]+') do
  local a = string.find(entry, '\\t', 1, true)
  local b = string.find(entry, '\\t', a + 1, true)
  local c = string.find(entry, '\\t', b + 1, true)
  if redis.call('HSETNX', KEYS[1], string.sub(entry, 1, a - 1), string.sub(entry, c + 1)) == 1 then
    redis.call('HINCRBY', KEYS[2], string.sub(entry, a + 1, b - 1), 1)
    redis.call('HINCRBY', KEYS[2], 'generated_tokens', string.sub(entry, b + 1, c - 1))
    stored = stored + 1
  end
end
return stored
"""

# KEYS: lines hash. ARGV: line numbers. 1 for each line with a stored answer, else 0: answers
# are checked without sending them back.
_RECORDED = """
local found = {}
for i, line in ipairs(ARGV) do
  found[i] = redis.call('HEXISTS', KEYS[1], line)
end
return found
"""

# KEYS: job hash. ARGV: now. Ends a job once every line is answered and every line enqueued.
# Returns the status, or "deliver" to the one caller that must upload the job's files first
# (the job waits in "finalizing", its final status kept in "final_status").
_MAYBE_FINALIZE = """
local job = KEYS[1]
local status = redis.call('HGET', job, 'status')
if status == false or status == 'completed' or status == 'failed' or status == 'cancelled'
   or status == 'expired' or status == 'finalizing' then
  return status
end
if redis.call('HGET', job, 'enqueued') ~= '1' then return status end
local total = tonumber(redis.call('HGET', job, 'total') or '0')
local done = tonumber(redis.call('HGET', job, 'completed') or '0')
           + tonumber(redis.call('HGET', job, 'failed') or '0')
if done < total then return status end
local final = 'completed'
if redis.call('HGET', job, 'expire') == '1' then
  final = 'expired'
elseif status == 'cancelling' then
  final = 'cancelled'
end
if redis.call('HGET', job, 'deliver') == '1' then
  redis.call('HSET', job, 'status', 'finalizing', 'finalizing_at', ARGV[1], 'final_status', final)
  return 'deliver'
end
if final == 'completed' then
  redis.call('HSET', job, 'status', 'completed', 'finalizing_at', ARGV[1], 'completed_at', ARGV[1])
else
  redis.call('HSET', job, 'status', final, final .. '_at', ARGV[1])
end
""" + LUA_PUBLISH_JOB.format(status="final") + """
return final
"""

# KEYS: job hash. ARGV: field, value, ... Creates the record whole, or not at all if the id is taken.
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""

#: maybe_finalize's answer to the caller that must write the job's files and then end it.
DELIVER = "deliver"

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


def callback_state(fields: dict[str, str]) -> dict[str, Any] | None:
    """The delivery state of a callback, from the `callback_*` fields of a job or request
    record; None when the record names no callback."""
    if not fields.get("callback_url"):
        return None
    return {
        "url": fields["callback_url"],
        "status": fields.get("callback_status", "pending"),
        "attempts": int(fields.get("callback_attempts", 0)),
        "last_error": fields.get("callback_last_error") or None,
        "delivered_at": int(fields["callback_delivered_at"]) if fields.get("callback_delivered_at") else None,
    }


class JobStore:
    """Reads and writes job records and lines. Thread-safe (redis-py pools connections)."""

    def __init__(self, client: redis.Redis, *, job_ttl: int, upload_retry_seconds: float = 120.0) -> None:
        self.redis = client
        self.job_ttl = job_ttl
        #: How long ending a job retries writing its S3 files (see chatbatch.delivery.finish).
        self.upload_retry_seconds = upload_retry_seconds
        self._record_lines = client.register_script(_RECORD_LINES)
        self._create = client.register_script(_CREATE)
        self._finalize = client.register_script(_MAYBE_FINALIZE)
        self._recorded = client.register_script(_RECORDED)

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

        `extra` fields are kept with the record (the HTTP API's owner, file ids, callback URL).
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
            "deliver": int(any(str(d).startswith("s3://") for d in (output_file, error_file) if d)),
            **(extra or {}),
        }
        args = [item for pair in fields.items() for item in pair]
        if not self._create(keys=[keys.job(job_id)], args=args):
            return False
        self.redis.zadd(keys.JOBS, {job_id: now})
        return True

    def exists(self, job_id: str) -> bool:
        return bool(self.redis.exists(keys.job(job_id)))

    def get(self, job_id: str) -> BatchJob:
        """The job record.

        Raises:
            JobNotFoundError: no such job (or it expired from Redis).
        """
        raw = self.redis.hgetall(keys.job(job_id))
        if not raw:
            raise JobNotFoundError(
                f"no job {job_id!r} in Redis: check the id (chatbatch prints it at submit)"
            )
        data = {text(k): text(v) for k, v in raw.items()}
        record: dict[str, Any] = {
            "id": data["id"],
            "input_file": data.get("input_file", ""),
            "completion_window": data.get("completion_window", "24h"),
            "status": data["status"],
            "output_file": data.get("output_file"),
            "error_file": data.get("error_file"),
            "request_counts": RequestCounts(
                total=int(data.get("total", 0)),
                completed=int(data.get("completed", 0)),
                failed=int(data.get("failed", 0)),
            ),
            "metadata": json.loads(data.get("metadata", "{}")) or None,
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
        value = self.redis.hget(keys.job(job_id), name)
        return text(value) if value is not None else None

    def generated_tokens(self, job_id: str) -> int:
        """Tokens generated for the job's answered lines so far (for progress displays)."""
        return int(self.redis.hget(keys.job(job_id), "generated_tokens") or 0)

    def status(self, job_id: str) -> JobStatus | None:
        value = self.redis.hget(keys.job(job_id), "status")
        return JobStatus(text(value)) if value else None

    def set_status(self, job_id: str, status: JobStatus, **fields: Any) -> None:
        mapping: dict[str, Any] = {"status": status.value, f"{status.value}_at": int(time.time()), **fields}
        self.redis.hset(keys.job(job_id), mapping=cast(Fields, mapping))

    def start(self, job_id: str) -> None:
        """validating -> in_progress, once; atomic, so a cancel that lands meanwhile is never
        overwritten."""
        self.redis.eval(
            "if redis.call('HGET', KEYS[1], 'status') == 'validating' then "
            "redis.call('HSET', KEYS[1], 'status', 'in_progress', 'in_progress_at', ARGV[1]) end",
            1, keys.job(job_id), int(time.time()),
        )

    def add_inputs(self, job_id: str, lines: dict[Any, str]) -> None:
        """Remember the valid lines (number -> custom_id) before they are enqueued."""
        if lines:
            self.redis.hset(keys.job_inputs(job_id), mapping=lines)

    def finish_enqueueing(self, job_id: str, total: int) -> str | None:
        """Record the line count once every line was enqueued or answered; may end the job."""
        self.redis.hset(keys.job(job_id), mapping={"total": total, "enqueued": 1})
        self.start(job_id)
        return self.maybe_finalize(job_id)

    def record_line(
        self, job_id: str, line: int, kind: str, payload: dict[str, Any] | str, *, tokens: int = 0
    ) -> bool:
        """Store the output or error line of input line `line`; False if it was stored before.

        Args:
            kind: "output" or "error".
            payload: the BatchRequestOutput as a dict.
        """
        return self.record_lines(job_id, [(line, kind, payload, tokens)]) == 1

    def record_lines(self, job_id: str, entries: list[tuple[int, str, dict[str, Any] | str, int]]) -> int:
        """Store many lines in one call: (line, kind, payload, tokens) each, the payload a dict
        or its JSON text; returns how many were stored for the first time."""
        if not entries:
            return 0
        # One argument for all: "line TAB counter TAB tokens TAB stored-JSON" per entry, one
        # entry per text line (JSON text holds no raw newline or tab).
        parts: list[str] = []
        for line, kind, payload, tokens in entries:
            text = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
            value = f'{{"kind":"{kind}","line":{text}}}'
            if "\n" in value or "\t" in value:
                raise ValueError(f"line {line}: its JSON holds a raw newline or tab")
            parts.append(f"{int(line)}\t{'completed' if kind == 'output' else 'failed'}\t{int(tokens)}\t{value}")
        return int(self._record_lines(keys=[keys.job_lines(job_id), keys.job(job_id)], args=["\n".join(parts)]))

    def recorded(self, job_id: str, lines: list[int]) -> list[bool]:
        """Which of these input lines already have an output or error line."""
        if not lines:
            return []
        return [bool(v) for v in self._recorded(keys=[keys.job_lines(job_id)], args=lines)]

    def maybe_finalize(self, job_id: str) -> str | None:
        """End the job if every line is answered.

        Returns:
            The job's status, or DELIVER for the one caller that must write the job's files
            and then call `end()`.
        """
        value = self._finalize(keys=[keys.job(job_id)], args=[int(time.time())])
        if value is None:
            return None
        outcome = value.decode() if isinstance(value, bytes) else str(value)
        if outcome != DELIVER and JobStatus(outcome).is_final:
            self._expire_keys(job_id)
        return outcome

    def end(self, job_id: str, error: JobError | None = None) -> JobStatus:
        """Finish a job left in `finalizing` by DELIVER: its final status, or `failed`."""
        now = int(time.time())
        if error is not None:
            self.redis.hset(
                keys.job(job_id),
                mapping={"status": "failed", "failed_at": now, "errors": JobErrors(data=[error]).model_dump_json()},
            )
            status = JobStatus.failed
        else:
            raw = self.redis.hget(keys.job(job_id), "final_status")
            status = JobStatus(text(raw) if raw else "completed")
            self.redis.hset(keys.job(job_id), mapping={"status": status.value, f"{status.value}_at": now})
        publish(self.redis, "batch", job_id, status.value)
        self._expire_keys(job_id)
        return status

    def mark_expiring(self, job_id: str) -> bool:
        """Flag a job whose completion window has passed; True if it is due now."""
        raw = self.redis.hmget(keys.job(job_id), ["expires_at", "status"])
        if raw[0] is None or raw[1] is None:
            return False
        if JobStatus(text(raw[1])).is_final or int(raw[0]) > time.time():
            return False
        self.redis.hset(keys.job(job_id), "expire", 1)
        return True

    def stop_state(self, job_id: str) -> tuple[JobStatus | None, int | None, bool]:
        """(status, expires_at, expiring flag) in one read: what `stop_reason` decides on."""
        status, expires_at, expire = self.redis.hmget(keys.job(job_id), ["status", "expires_at", "expire"])
        return (
            JobStatus(text(status)) if status else None,
            int(expires_at) if expires_at else None,
            expire == b"1",
        )

    def is_expiring(self, job_id: str) -> bool:
        return self.redis.hget(keys.job(job_id), "expire") == b"1"

    def inputs(self, job_id: str) -> dict[int, str]:
        """Every enqueued line: number -> custom_id."""
        return {int(k): text(v) for k, v in self.redis.hgetall(keys.job_inputs(job_id)).items()}

    def _expire_keys(self, job_id: str) -> None:
        for key in (
            keys.job(job_id),
            keys.job_lines(job_id),
            keys.job_inputs(job_id),
            keys.job_deliveries(job_id),
            keys.job_attempts(job_id),
        ):
            self.redis.expire(key, self.job_ttl)

    def count_delivery(self, job_id: str, chunk: str) -> int:
        """Count one more delivery of a chunk task; returns the count including this one."""
        key = keys.job_deliveries(job_id)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hincrby(key, chunk, 1)
        pipe.expire(key, self.job_ttl)
        return int(pipe.execute()[0])

    def uncount_delivery(self, job_id: str, chunk: str) -> None:
        """Take back the count of a delivery that ended cleanly by handing its chunk back."""
        self.redis.hincrby(keys.job_deliveries(job_id), chunk, -1)

    def add_pending(self, job_id: str, chunk: str, queue: str, lines: str) -> None:
        """Keep a chunk's lines until they are answered (`lines` as sent, a JSON string)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(keys.job_pending(job_id), chunk, json.dumps([queue, lines]))
        pipe.expire(keys.job_pending(job_id), self.job_ttl)
        pipe.sadd(keys.PENDING_JOBS, job_id)
        pipe.execute()

    def pending(self, job_id: str) -> dict[str, tuple[str, str]]:
        """Chunk id -> (queue, lines JSON) of the job's chunks not yet answered in full."""
        chunks: dict[str, tuple[str, str]] = {}
        for chunk, value in self.redis.hgetall(keys.job_pending(job_id)).items():
            queue, lines = json.loads(value)
            chunks[text(chunk)] = (queue, lines)
        return chunks

    def forget_pending(self, job_id: str, chunk: str | None = None) -> None:
        """A chunk answered in full; or, without `chunk`, the job ended."""
        if chunk is not None:
            self.redis.hdel(keys.job_pending(job_id), chunk)
            return
        pipe = self.redis.pipeline(transaction=False)
        pipe.delete(keys.job_pending(job_id))
        pipe.srem(keys.PENDING_JOBS, job_id)
        pipe.hdel(keys.RECOVERY_SEEN, job_id)
        pipe.execute()

    def add_pending_request(self, request_id: str, queue: str, body: dict[str, Any], sent: float) -> None:
        """Keep a single request until it is answered."""
        self.redis.hset(keys.PENDING_REQUESTS, request_id, json.dumps([queue, body, int(sent)]))

    def pending_requests(self) -> dict[str, tuple[str, dict[str, Any], int]]:
        """Request id -> (queue, body, unix seconds sent) of the single requests not yet answered."""
        requests: dict[str, tuple[str, dict[str, Any], int]] = {}
        for request_id, value in self.redis.hgetall(keys.PENDING_REQUESTS).items():
            queue, body, sent = json.loads(value)
            requests[text(request_id)] = (queue, body, sent)
        return requests

    def forget_pending_request(self, request_id: str) -> None:
        self.redis.hdel(keys.PENDING_REQUESTS, request_id)

    def count_attempt(self, job_id: str, line: int) -> int:
        """Count one more solo attempt at a line; returns the count including this one."""
        key = keys.job_attempts(job_id)
        count = int(self.redis.hincrby(key, str(line), 1))
        self.redis.expire(key, self.job_ttl)
        return count

    def iter_lines(self, job_id: str) -> Iterator[tuple[int, str, str]]:
        """(input line, kind, JSON line) for every stored line, in input order."""
        numbers = sorted(int(k) for k in self.redis.hkeys(keys.job_lines(job_id)))
        for start in range(0, len(numbers), 1000):
            batch = numbers[start : start + 1000]
            for number, raw in zip(batch, self.redis.hmget(keys.job_lines(job_id), batch)):
                if raw is None:
                    continue
                item = json.loads(raw)
                yield number, item["kind"], json.dumps(item["line"], separators=(",", ":"))
