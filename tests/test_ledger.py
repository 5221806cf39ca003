"""chatbatch/ledger.py on a real redis-server: pending chunks, delivery and attempt counts."""

from __future__ import annotations

import pytest
import redis

from chatbatch import keys
from chatbatch.ledger import Ledger
from tests.conftest import RedisServer


@pytest.fixture(params=[False, True], ids=["bytes", "decoded"])
def ledger(request: pytest.FixtureRequest, aof_redis: RedisServer) -> Ledger:
    return Ledger(redis.Redis.from_url(aof_redis.url, decode_responses=request.param), job_ttl=600)


def test_pending_chunks_are_kept_until_forgotten(ledger: Ledger) -> None:
    ledger.add_pending("batch_1", "s-1", "chatbatch", '[{"line": 1}]')
    ledger.add_pending("batch_1", "s-2", "chatbatch.model.m", '[{"line": 2}]')
    assert ledger.pending("batch_1") == {"s-1": ("chatbatch", '[{"line": 1}]'), "s-2": ("chatbatch.model.m", '[{"line": 2}]')}
    assert ledger.pending_jobs() == ["batch_1"]
    assert 0 < ledger.redis.ttl(keys.job_pending("batch_1")) <= 600
    ledger.forget_chunk("batch_1", "s-1")
    assert list(ledger.pending("batch_1")) == ["s-2"]
    ledger.forget_job("batch_1")
    assert ledger.pending("batch_1") == {} and ledger.pending_jobs() == []


def test_deliveries_and_attempts_are_counted_per_chunk_and_line(ledger: Ledger) -> None:
    assert [ledger.count_delivery("batch_2", "s-1") for _ in range(3)] == [1, 2, 3]
    ledger.uncount_delivery("batch_2", "s-1")
    assert ledger.count_delivery("batch_2", "s-1") == 3, "a delivery handed back is not counted"
    assert [ledger.count_attempt("batch_2", 7) for _ in range(2)] == [1, 2]
    assert ledger.count_attempt("batch_2", 8) == 1
    for key in (keys.job_deliveries("batch_2"), keys.job_attempts("batch_2")):
        assert 0 < ledger.redis.ttl(key) <= 600, "a ledger nobody cleans up still goes away"
