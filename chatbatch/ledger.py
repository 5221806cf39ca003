"""The chunk ledger: what the fleet keeps about a job's chunks while they are in flight.

- Pending chunks: the producer keeps each chunk's lines (as sent) until every line of it is
  answered, so that a chunk whose message the broker lost can be sent again (worker/service/recovery.py).
- Delivery counts: how many times each chunk reached a worker. A chunk delivered again after a
  worker died runs its lines one at a time, as suspects.
- Attempts: how many times a suspect line ran alone; past CHATBATCH_MAX_DELIVERIES it becomes an
  `internal_error` line instead of killing another worker.

Every key here has the job's TTL from its first write, so a ledger that nobody cleans up still
goes away.
"""

from __future__ import annotations

import json

import redis

from chatbatch import keys
from chatbatch.redisconn import text, texts


class Ledger:
    """Reads and writes the chunk ledger of jobs. Thread-safe.

    Args:
        client: the Redis connection (decoded replies or not).
        job_ttl: seconds the ledger of a job may outlive its last write.
    """

    def __init__(self, client: redis.Redis, *, job_ttl: int) -> None:
        self.redis = client
        self.job_ttl = job_ttl

    # Pending chunks.

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
        for chunk, value in texts(self.redis.hgetall(keys.job_pending(job_id))).items():
            queue, lines = json.loads(value)
            chunks[chunk] = (queue, lines)
        return chunks

    def pending_jobs(self) -> list[str]:
        """Jobs with chunks kept as pending."""
        return sorted(text(member) for member in self.redis.smembers(keys.PENDING_JOBS))

    def forget_chunk(self, job_id: str, chunk: str) -> None:
        """A chunk was answered in full."""
        self.redis.hdel(keys.job_pending(job_id), chunk)

    def forget_job(self, job_id: str) -> None:
        """The job ended: nothing of it is pending any more."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.delete(keys.job_pending(job_id))
        pipe.srem(keys.PENDING_JOBS, job_id)
        pipe.execute()

    # Deliveries and attempts.

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

    def count_attempt(self, job_id: str, line: int) -> int:
        """Count one more solo attempt at a line; returns the count including this one."""
        key = keys.job_attempts(job_id)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hincrby(key, str(line), 1)
        pipe.expire(key, self.job_ttl)
        return int(pipe.execute()[0])
