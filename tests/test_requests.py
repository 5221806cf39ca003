"""chatbatch/requests.py on a real redis-server: a single request's record, deliveries, result
and waits."""

from __future__ import annotations

import threading

import pytest
import redis

from chatbatch import keys
from chatbatch.redisconn import text
from chatbatch.requests import Requests
from tests.conftest import RedisServer, last_event


@pytest.fixture(params=[False, True], ids=["bytes", "decoded"])
def requests(request: pytest.FixtureRequest, aof_redis: RedisServer) -> Requests:
    return Requests(redis.Redis.from_url(aof_redis.url, decode_responses=request.param), result_ttl=600)


def test_a_result_is_stored_once_and_drops_the_pending_entry(requests: Requests) -> None:
    requests.record("chatcmpl-1", queue="chatbatch", body={"messages": []}, owner="team-a")
    assert set(requests.pending()) == {"chatcmpl-1"}
    assert requests.get("chatcmpl-1")["queue"] == "chatbatch" and requests.owner("chatcmpl-1") == "team-a"
    assert requests.count_delivery("chatcmpl-1") == 1 and requests.count_delivery("chatcmpl-1") == 2
    requests.uncount_delivery("chatcmpl-1")
    assert requests.count_delivery("chatcmpl-1") == 2
    assert requests.result("chatcmpl-1") is None and not requests.answered("chatcmpl-1")
    assert requests.store_result("chatcmpl-1", {"id": "chatcmpl-1", "first": True})
    assert not requests.store_result("chatcmpl-1", {"id": "chatcmpl-1", "first": False}), "a later delivery keeps the first"
    assert requests.result("chatcmpl-1") == {"id": "chatcmpl-1", "first": True}
    assert requests.pending() == {}
    assert 0 < requests.redis.ttl(keys.result("chatcmpl-1")) <= 600
    assert last_event(requests.redis) == {"type": "chat.completion", "id": "chatcmpl-1", "status": "completed"}


def test_an_error_record_and_a_callback_show_in_the_notification(requests: Requests) -> None:
    requests.record("chatcmpl-2", queue="q", body={}, callback_url="http://127.0.0.1:9/hook")
    fields = requests.get("chatcmpl-2")
    assert fields["callback_url"] == "http://127.0.0.1:9/hook" and fields["callback_status"] == "pending"
    requests.store_result("chatcmpl-2", {"error": {"code": "internal_error", "message": "x"}})
    assert last_event(requests.redis) == {"type": "chat.completion", "id": "chatcmpl-2", "status": "failed", "callback": "1"}


def test_every_waiter_wakes_when_the_result_is_stored(requests: Requests) -> None:
    requests.record("chatcmpl-3", queue="q", body={})
    seen: list[object] = []
    waiters = [threading.Thread(target=lambda: seen.append(requests.wait("chatcmpl-3", 30))) for _ in range(3)]
    for waiter in waiters:
        waiter.start()
    requests.store_result("chatcmpl-3", {"id": "chatcmpl-3"})
    for waiter in waiters:
        waiter.join(30)
    assert seen == [{"id": "chatcmpl-3"}] * 3
    assert requests.wait("chatcmpl-missing", 0.2) is None


def test_waiting_reads_without_consuming(requests: Requests) -> None:
    requests.record("chatcmpl-4", queue="q", body={})
    requests.store_result("chatcmpl-4", {"id": "chatcmpl-4"})
    before = requests.redis.xlen(keys.result_ready("chatcmpl-4"))
    assert requests.wait("chatcmpl-4", 1) == requests.wait("chatcmpl-4", 1) == {"id": "chatcmpl-4"}
    assert requests.redis.xlen(keys.result_ready("chatcmpl-4")) == before == 1
    assert text(requests.redis.type(keys.result_ready("chatcmpl-4"))) == "stream"
