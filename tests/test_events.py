"""chatbatch/events.py on a real redis-server: a pull consumer of the notification stream
claims what a dead consumer held, and never hands one entry to two deliveries."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import redis

from chatbatch.events import Consumer
from chatbatch.redisconn import text
from chatbatch.requests import Requests
from tests.conftest import ROOT, RedisServer, wait_for

GROUP = "test-pull"

#: A consumer that takes every entry, starts handling the first, and hangs there.
DOOMED = """
import sys, time
import redis
from chatbatch.events import Consumer

consumer = Consumer(redis.Redis.from_url(sys.argv[1]), sys.argv[2], "doomed", min_idle=1.0)
consumer.ensure_group()
events = consumer.read(count=100, block=5)
print(len(events), "taken", flush=True)

def hang(entry_id, fields):
    print("handling", entry_id, flush=True)
    time.sleep(3600)

consumer.handle(events[0], hang)
"""


def _notify(server: RedisServer, count: int) -> list[str]:
    """Answer `count` requests: one notification each."""
    requests = Requests(server.client(), result_ttl=600)
    ids = [f"chatcmpl-ev{i}" for i in range(count)]
    for request_id in ids:
        requests.record(request_id, queue="q", body={})
        requests.store_result(request_id, {"id": request_id})
    return ids


def test_entries_a_killed_consumer_held_are_delivered_by_another_once_each(aof_redis: RedisServer) -> None:
    ids = _notify(aof_redis, 5)
    doomed = subprocess.Popen([sys.executable, "-c", DOOMED, aof_redis.url, GROUP], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                              start_new_session=True)
    try:
        assert doomed.stdout is not None
        assert doomed.stdout.readline().strip() == "5 taken"
        assert doomed.stdout.readline().startswith("handling")
        client = aof_redis.client()
        assert client.xpending("chatbatch:events", GROUP)["pending"] == 5
    finally:
        os.killpg(doomed.pid, signal.SIGKILL)
        doomed.wait(10)
    delivered: list[str] = []
    stop = threading.Event()
    survivor = Consumer(aof_redis.client(), GROUP, "survivor", min_idle=1.0)
    runner = threading.Thread(target=survivor.run, args=(lambda _, event: delivered.append(event["id"]), stop), kwargs={"block": 0.2})
    runner.start()
    try:
        wait_for(lambda: len(delivered) >= 5, 30, "the survivor to deliver what the dead consumer held")
        wait_for(lambda: aof_redis.client().xpending("chatbatch:events", GROUP)["pending"] == 0, 10, "every entry acknowledged")
    finally:
        stop.set()
        runner.join(10)
    assert sorted(delivered) == sorted(ids), "each entry once"


def test_an_entry_being_handled_is_not_claimed_by_another_consumer(aof_redis: RedisServer) -> None:
    (request_id,) = _notify(aof_redis, 1)
    slow = Consumer(aof_redis.client(), GROUP, "slow", min_idle=0.5)
    slow.ensure_group()
    (event,) = slow.read(block=1)
    release = threading.Event()
    handled: list[str] = []

    def handler(_: str, fields: dict[str, str]) -> None:
        release.wait(30)
        handled.append(fields["id"])

    handling = threading.Thread(target=slow.handle, args=(event, handler))
    handling.start()
    other = Consumer(redis.Redis.from_url(aof_redis.url, decode_responses=True), GROUP, "other", min_idle=0.5)
    # For three times the idle time, the other consumer finds nothing to claim: the slow one
    # keeps its entry while it works on it.
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        assert other.read(block=0.1) == []
    release.set()
    handling.join(10)
    assert handled == [request_id]
    assert aof_redis.client().xpending("chatbatch:events", GROUP)["pending"] == 0


def test_consumers_of_stopped_processes_that_hold_nothing_are_removed(aof_redis: RedisServer) -> None:
    _notify(aof_redis, 3)
    done, holding = (Consumer(aof_redis.client(), GROUP, name, min_idle=1.0) for name in ("done", "holding"))
    done.ensure_group()
    for event in done.read(count=2, block=1):
        done.handle(event, lambda *_: None)
    assert len(holding.read(count=1, block=1)) == 1  # taken, never acknowledged
    live = Consumer(aof_redis.client(), GROUP, "live", min_idle=1.0)
    assert live.tidy(idle=3600) == [], "not idle long enough yet"
    assert live.tidy(idle=0) == ["done"], "a consumer holding an entry stays, for its entry to be claimed"
    names = [text(info["name"]) for info in aof_redis.client().xinfo_consumers("chatbatch:events", GROUP)]
    assert names == ["holding"]


def test_an_entry_whose_handler_always_fails_is_dropped_after_its_deliveries(aof_redis: RedisServer) -> None:
    _notify(aof_redis, 1)
    attempts: list[str] = []

    def failing(entry_id: str, _: dict[str, str]) -> None:
        attempts.append(entry_id)
        raise RuntimeError("the receiving side is broken")

    stop = threading.Event()
    consumer = Consumer(aof_redis.client(), GROUP, "stubborn", min_idle=0.2, max_deliveries=3)
    consumer.ensure_group()  # before the thread starts: the wait below reads the group
    runner = threading.Thread(target=consumer.run, args=(failing, stop), kwargs={"block": 0.1})
    runner.start()
    try:
        wait_for(lambda: aof_redis.client().xpending("chatbatch:events", GROUP)["pending"] == 0 and attempts, 30, "the entry to be dropped")
    finally:
        stop.set()
        runner.join(10)
    assert len(attempts) == 3 and len(set(attempts)) == 1, attempts
