"""Fair share between jobs: each job's chunks wait in its backlog, and a small window of them is
released to the broker at a time, in priority order, then by weighted fair share between
owners, then between an owner's jobs.

A producer puts a job's chunks in the job's backlog (one Redis list per job and queue) instead
of on the broker. `Dispatcher.dispatch(queue)` then releases chunks until the lines in flight on
that queue fill its window (`window`: twice the rows of the live workers that consume it, and
at least two chunks per worker), so the workers always have the next chunk at hand while most
of the job waits off the broker. A chunk in flight counts the lines it has not answered yet:
its worker takes its answers off as it stores them (`answered`), so a chunk whose last line is a
long answer holds one line of the window, not all of its lines, and the engine's rows do not sit
empty behind it. A release runs wherever a window may have room: after a producer adds chunks,
after a worker stores answers, and on every worker's sweep (a chunk finished by a worker that
died, a worker that joined). Each release is one Lua step:

- the in-flight set drops the chunks that are no longer pending (answered in full, or their job
  ended);
- while the window is full, an owner with no chunk in flight still gets one, if its job is of
  the highest priority waiting: a new owner's job starts at once, beside the others, instead of
  waiting for a chunk of theirs to finish (the engine then takes the chunks' lines in turn);
- the next job is chosen: the highest priority first (`high`, `normal`, `low`); among equals,
  the owner whose virtual time is least (start-time fair queueing: an owner's virtual time
  grows by the lines released to it over its weight, and an owner that comes back from idle
  starts at the queue's clock, with no credit for the time it was away); among that owner's
  jobs, the one with the fewest lines released, then the oldest;
- the chunk moves from the backlog to the chunk ledger's pending entries (`chatbatch/ledger.py`)
  in the same step, so from then on it is exactly as a chunk sent at submit always was: if its
  message is lost before or after it is sent, the recovery sweep sends it again.

A job that is no longer `validating` or `in_progress` (cancelled, expired, ended) has its
backlog dropped at its next look, and `drop` drops it at once when the job is cancelled or
expires (`Jobs.close`), so a stopped job leaves nothing queued behind it.

The Lua scripts read job keys they are not given (standalone Redis and Sentinel allow it; Redis
Cluster, which Celery's Redis transport does not support either, would not).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

import redis

from chatbatch import keys, registry
from chatbatch.queues import TASK_CHUNK, chunk_argsrepr
from chatbatch.redisconn import text

logger = logging.getLogger(__name__)

#: Job priorities, as `--priority` and the HTTP API name them, and their order.
PRIORITIES: Final = {"high": 2, "normal": 1, "low": 0}
DEFAULT_PRIORITY: Final = "normal"
#: The owner of jobs submitted without one (the CLI without --owner).
DEFAULT_OWNER: Final = "default"
_OWNER = re.compile(r"[A-Za-z0-9_.@:\-]{1,64}")
#: Rows assumed for a queue no live worker consumes (a worker's default on CPU).
IDLE_ROWS = 32
#: Seconds the live workers' figures are reused between windows.
_WINDOW_SECONDS = 1.0

# KEYS: the queue's backlogged jobs, its in-flight chunks, its shares, the pending-jobs set.
# ARGV: key prefix, queue, window lines, least chunks in flight, job TTL, the live workers'
# names (one per line). Returns job, chunk, line count, pending value for each chunk released.
_RELEASE = """
local prefix, queue = ARGV[1], ARGV[2]
local window, least, ttl = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local live = {}
for name in string.gmatch(ARGV[6], '[^\\n]+') do live[name] = true end
local function before(a, b)
  for i = 1, #a do
    if a[i] ~= b[i] then return a[i] < b[i] end
  end
  return false
end
local function forget(job)
  redis.call('HDEL', KEYS[1], job)
end
local lines, chunks, busy = 0, 0, {}
local flat = redis.call('HGETALL', KEYS[2])
for i = 1, #flat, 2 do
  local tab = string.find(flat[i], '\\t', 1, true)
  local job, chunk = string.sub(flat[i], 1, tab - 1), string.sub(flat[i], tab + 1)
  if redis.call('HEXISTS', prefix .. 'job:' .. job .. ':pending', chunk) == 1 then
    local count, owner, worker = string.match(flat[i + 1], '^([^\\t]*)\\t([^\\t]*)\\t?(.*)$')
    -- A chunk taken by a worker that is no longer live waits for the broker to give it back
    -- (after the visibility timeout): meanwhile it holds no room in the window.
    if worker == '' or live[worker] then
      lines = lines + tonumber(count)
      chunks = chunks + 1
      busy[owner] = true
    end
  else
    redis.call('HDEL', KEYS[2], flat[i])
  end
end
local clock = tonumber(redis.call('HGET', KEYS[3], '\\tclock') or '0')
local released = {}
local looks = 0
while looks < 10000 do
  looks = looks + 1
  -- A full window still takes one chunk for an owner with none in flight, of the highest
  -- priority waiting: a new owner's job starts at once, beside the others.
  local full = lines >= window and chunks >= least
  local best, best_key, top
  local jobs = redis.call('HGETALL', KEYS[1])
  for i = 1, #jobs, 2 do
    local job = jobs[i]
    local status = redis.call('HGET', prefix .. 'job:' .. job, 'status')
    if status ~= 'validating' and status ~= 'in_progress' then
      forget(job)
      redis.call('DEL', prefix .. 'job:' .. job .. ':backlog:' .. queue)
    else
      local priority, owner, weight, created = string.match(jobs[i + 1], '^([^\\t]*)\\t([^\\t]*)\\t([^\\t]*)\\t([^\\t]*)$')
      if top == nil or tonumber(priority) > top then top = tonumber(priority) end
      if not full or not busy[owner] then
        local start = math.max(tonumber(redis.call('HGET', KEYS[3], owner) or '0'), clock)
        local served = tonumber(redis.call('HGET', prefix .. 'job:' .. job, 'released_lines') or '0')
        local key = {-tonumber(priority), start, served, tonumber(created)}
        if best == nil or before(key, best_key) or (not before(best_key, key) and job < best[1]) then
          best, best_key = {job, owner, tonumber(weight), start}, key
        end
      end
    end
  end
  if best == nil or (full and -best_key[1] < top) then break end
  local job, owner, weight, start = best[1], best[2], best[3], best[4]
  local backlog = prefix .. 'job:' .. job .. ':backlog:' .. queue
  local entry = redis.call('LPOP', backlog)
  if not entry then
    forget(job)
  else
    local a = string.find(entry, '\\t', 1, true)
    local b = string.find(entry, '\\t', a + 1, true)
    local chunk, count, value = string.sub(entry, 1, a - 1), tonumber(string.sub(entry, a + 1, b - 1)), string.sub(entry, b + 1)
    local pending = prefix .. 'job:' .. job .. ':pending'
    redis.call('HSET', pending, chunk, value)
    redis.call('EXPIRE', pending, ttl)
    redis.call('SADD', KEYS[4], job)
    redis.call('HSET', KEYS[2], job .. '\\t' .. chunk, count .. '\\t' .. owner .. '\\t')
    busy[owner] = true
    clock = start
    redis.call('HSET', KEYS[3], owner, tostring(start + count / weight), '\\tclock', tostring(clock))
    redis.call('HINCRBY', prefix .. 'job:' .. job, 'released_lines', count)
    if redis.call('LLEN', backlog) == 0 then forget(job) end
    lines = lines + count
    chunks = chunks + 1
    table.insert(released, job)
    table.insert(released, chunk)
    table.insert(released, count)
    table.insert(released, value)
  end
end
return released
"""


# KEYS: the queue's in-flight chunks. ARGV: "job TAB chunk", the worker's name. Names the
# worker that runs a chunk in flight.
_STARTED = """
local value = redis.call('HGET', KEYS[1], ARGV[1])
if value then
  local count, owner = string.match(value, '^([^\\t]*)\\t([^\\t]*)')
  redis.call('HSET', KEYS[1], ARGV[1], count .. '\\t' .. owner .. '\\t' .. ARGV[2])
end
"""


# KEYS: the queue's in-flight chunks, its backlogged jobs. ARGV: "job TAB chunk", lines answered.
# Takes the answered lines off the chunk's count (never below 0); returns the jobs backlogged on
# the queue (0: no release can follow).
_ANSWERED = """
local value = redis.call('HGET', KEYS[1], ARGV[1])
if value then
  local count, rest = string.match(value, '^([^\t]*)(\t.*)$')
  local left = math.max(0, tonumber(count) - tonumber(ARGV[2]))
  redis.call('HSET', KEYS[1], ARGV[1], tostring(left) .. rest)
end
return redis.call('HLEN', KEYS[2])
"""


@dataclass(frozen=True)
class Share:
    """How a job takes its turns: its priority, its owner and the owner's weight."""

    priority: str = DEFAULT_PRIORITY
    owner: str = DEFAULT_OWNER
    weight: float = 1.0


def check_priority(value: str | None, *, option: str = "--priority") -> str:
    """The priority named, or `normal` for none.

    Raises:
        ValueError: not one of high, normal, low.
    """
    if value is None or value == "":
        return DEFAULT_PRIORITY
    if value not in PRIORITIES:
        raise ValueError(f"{option} must be one of high, normal, low, not {value!r}")
    return value


def check_owner(value: str | None) -> str:
    """The owner named, or `default` for none.

    Raises:
        ValueError: not 1 to 64 letters, digits and `_.@:-`.
    """
    if value is None or value == "":
        return DEFAULT_OWNER
    if not _OWNER.fullmatch(value):
        raise ValueError(f"--owner must be 1 to 64 letters, digits and _.@:- (got {value!r})")
    return value


def queue_figures(client: redis.Redis, queues: list[str]) -> dict[str, tuple[int, int, int]]:
    """Queue -> (messages on the broker's list, chunks in flight, chunks held in job backlogs),
    in two pipelined round trips for all the queues."""
    pipe = client.pipeline(transaction=False)
    for queue in queues:
        pipe.llen(queue)
        pipe.hlen(keys.queue_in_flight(queue))
        pipe.hkeys(keys.queue_backlogged(queue))
    replies: list[Any] = pipe.execute()
    lists = client.pipeline(transaction=False)
    for index, queue in enumerate(queues):
        for job in replies[3 * index + 2]:
            lists.llen(keys.job_backlog(text(job), queue))
    lengths: list[Any] = lists.execute()
    figures: dict[str, tuple[int, int, int]] = {}
    taken = 0
    for index, queue in enumerate(queues):
        jobs = len(replies[3 * index + 2])
        figures[queue] = (int(replies[3 * index]), int(replies[3 * index + 1]), sum(int(n) for n in lengths[taken : taken + jobs]))
        taken += jobs
    return figures


def window(heartbeats: Iterable[dict[str, Any]], *, idle_rows: int = IDLE_ROWS) -> tuple[int, int]:
    """(lines, chunks) a queue keeps in flight, from the heartbeats of the live workers that
    consume it: twice their rows (a batch running and the next one waiting on each worker),
    and at least two chunks per worker (one running, one at hand). With no live worker, the
    window of one worker of `idle_rows` rows: the first worker to start finds it full."""
    workers = list(heartbeats)
    rows = sum(int((info.get("engine") or {}).get("max_rows", 0)) for info in workers) if workers else idle_rows
    return 2 * rows, 2 * max(1, len(workers))


class Dispatcher:
    """The backlogs of jobs and their release to the broker. Thread-safe.

    Args:
        client: the Redis connection (decoded replies or not).
        job_ttl: seconds a job's backlog may outlive its last write.
    """

    def __init__(self, client: redis.Redis, *, job_ttl: int, idle_rows: int = IDLE_ROWS) -> None:
        self.redis = client
        self.job_ttl = job_ttl
        self.idle_rows = idle_rows
        self._release = client.register_script(_RELEASE)
        self._started = client.register_script(_STARTED)
        self._answered = client.register_script(_ANSWERED)
        #: The live workers' heartbeats, and when they were read.
        self._heartbeats: tuple[float, list[dict[str, Any]]] = (-_WINDOW_SECONDS, [])

    def hold(self, job_id: str, queue: str, chunk: str, lines: str, count: int, share: Share, created: int) -> None:
        """Put a chunk (its lines as one JSON string, `count` of them) at the end of the job's
        backlog for `queue`."""
        entry = f"{chunk}\t{count}\t{json.dumps([queue, lines])}"
        value = f"{PRIORITIES[share.priority]}\t{share.owner}\t{share.weight!r}\t{created}"
        pipe = self.redis.pipeline(transaction=True)
        pipe.rpush(keys.job_backlog(job_id, queue), entry)
        pipe.expire(keys.job_backlog(job_id, queue), self.job_ttl)
        pipe.hset(keys.queue_backlogged(queue), job_id, value)
        pipe.execute()

    def drop(self, job_id: str, queues: Iterable[str]) -> None:
        """Drop the job's backlog on these queues (it was cancelled, expired, or is resumed)."""
        pipe = self.redis.pipeline(transaction=True)
        for queue in queues:
            pipe.delete(keys.job_backlog(job_id, queue))
            pipe.hdel(keys.queue_backlogged(queue), job_id)
        pipe.execute()

    def backlog(self, job_id: str, queues: Iterable[str]) -> int:
        """Chunks of the job not released yet."""
        pipe = self.redis.pipeline(transaction=False)
        for queue in queues:
            pipe.llen(keys.job_backlog(job_id, queue))
        return sum(int(count) for count in pipe.execute())

    def window(self, queue: str) -> tuple[int, int, list[str]]:
        """`window()` of the queue's live consumers, and their names (the heartbeats are read at
        most once a second, for every queue)."""
        read_at, heartbeats = self._heartbeats
        if time.monotonic() - read_at > _WINDOW_SECONDS:
            heartbeats = [info for infos in registry.live_models(self.redis).values() for info in infos]
            self._heartbeats = (time.monotonic(), heartbeats)
        consumers = [info for info in heartbeats if queue in info.get("queues", ())]
        return (*window(consumers, idle_rows=self.idle_rows), [str(info["worker"]) for info in consumers])

    def started(self, queue: str, job_id: str, chunk: str, worker: str) -> None:
        """A worker took a chunk in flight: while that worker is live, the chunk holds room in
        the window; once it is not, its room goes to the live workers."""
        self._started(keys=[keys.queue_in_flight(queue)], args=[f"{job_id}\t{chunk}", worker])

    def answered(self, queue: str, job_id: str, chunk: str, lines: int, send: Callable[..., Any]) -> int:
        """A worker stored `lines` answers of a chunk in flight: they leave the queue's window,
        and what the window then has room for is released and sent (as `dispatch`); returns
        the chunks sent."""
        backlogged = self._answered(keys=[keys.queue_in_flight(queue), keys.queue_backlogged(queue)], args=[f"{job_id}\t{chunk}", lines])
        return self.dispatch(queue, send) if int(backlogged) else 0

    def release(self, queue: str) -> list[tuple[str, str, int, str]]:
        """Move chunks from the backlogs to the pending chunks until the queue's window is
        full; (job, chunk, line count, lines JSON) of each, to send."""
        lines, least, live = self.window(queue)
        flat = self._release(
            keys=[keys.queue_backlogged(queue), keys.queue_in_flight(queue), keys.queue_shares(queue), keys.PENDING_JOBS],
            args=[keys.PREFIX, queue, lines, least, self.job_ttl, "\n".join(live)],
        )
        released = []
        for index in range(0, len(flat), 4):
            job, chunk, count, value = text(flat[index]), text(flat[index + 1]), int(flat[index + 2]), text(flat[index + 3])
            released.append((job, chunk, count, json.loads(value)[1]))
        return released

    def dispatch(self, queue: str, send: Callable[..., Any]) -> int:
        """Release what the queue's window has room for and send it (`send` is Celery's
        `send_task`); returns the chunks sent. A chunk released but not sent (this process
        died in between) is pending, so the recovery sweep sends it."""
        released = self.release(queue)
        for job, chunk, count, lines in released:
            send(TASK_CHUNK, args=[job, chunk, lines], queue=queue, argsrepr=chunk_argsrepr(job, chunk, count))
        return len(released)
