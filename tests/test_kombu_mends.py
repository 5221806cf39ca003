"""worker/service/kombu_mends.py: each mend of kombu's Redis transport, against a real redis-server
killed and restarted around the step it mends (each test fails without its mend), and the
shape check that refuses an untested kombu."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import ROOT, RedisServer, pings, restart_redis, wait_for


@pytest.fixture(autouse=True)
def unmended() -> Iterator[None]:
    """Each test installs what it tests; kombu is put back as it was after it."""
    from kombu.message import Message
    from kombu.transport import redis as kombu_redis

    saved = [(owner, name, owner.__dict__[name]) for owner, name in (
        (Message, "ack_log_error"), (kombu_redis.QoS, "append"), (kombu_redis.QoS, "restore_unacked"))]
    yield
    for owner, name, original in saved:
        setattr(owner, name, original)


def _message(channel: Any, tag: str) -> Any:
    """A message as kombu's Redis channel hands it to Celery."""
    raw = channel.prepare_message("a chunk")
    raw["properties"].update(delivery_info={"exchange": "", "routing_key": "chatbatch"}, delivery_tag=tag)
    return channel.Message(raw, channel=channel)


def test_a_channel_closed_after_its_connection_keeps_its_messages(aof_redis: RedisServer) -> None:
    """Celery drops a lost connection; kombu then closes the channel, putting back the messages
    it holds, after the connection's transport was cleared: that must not raise (Celery would
    stop the worker), and the messages stay unacknowledged in Redis, to come back after the
    visibility timeout."""
    from kombu import Connection

    from worker.service.kombu_mends import restore_on_a_closed_connection

    restore_on_a_closed_connection()
    with Connection(aof_redis.url) as connection:
        channel = connection.default_channel
        channel.qos.append(_message(channel, "tag-1"), "tag-1")
        aof_redis.process.kill()
        aof_redis.process.wait(10)
        connection.transport.client = None  # what kombu's Connection.collect leaves behind
        channel.close()
    restart_redis(aof_redis)
    wait_for(lambda: pings(aof_redis), 10, "redis-server back")
    assert aof_redis.client().hexists("unacked", "tag-1")


def test_a_message_taken_as_redis_goes_away_is_kept(aof_redis: RedisServer) -> None:
    """Kombu takes a message off its queue, then records it as unacknowledged: Redis going away
    in between must not lose it (the worker retries the second step until Redis is back)."""
    from kombu import Connection

    from worker.service.kombu_mends import record_taken_message

    record_taken_message()
    with Connection(aof_redis.url) as connection:
        channel = connection.default_channel
        message = _message(channel, "tag-1")
        aof_redis.process.kill()
        aof_redis.process.wait(10)
        taken = threading.Thread(target=channel.qos.append, args=(message, "tag-1"))
        taken.start()
        # Redis stays away for over a second: the step keeps retrying instead of giving up.
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            assert taken.is_alive(), "the unacknowledged record was given up while Redis was away"
            taken.join(0.1)
        restart_redis(aof_redis)
        taken.join(60)
        assert not taken.is_alive()
        wait_for(lambda: aof_redis.client().hexists("unacked", "tag-1"), 10, "the message recorded as unacknowledged")


def test_an_ack_on_a_dropped_connection_is_logged_not_raised(aof_redis: RedisServer, caplog: Any) -> None:
    """A task finishing after Celery dropped its broker connection acknowledges on a channel
    whose connection kombu cleared: kombu raises AttributeError there (not one of the connection
    errors it skips), which would stop Celery's consumer restart. The mend logs it instead."""
    from kombu import Connection

    from worker.service.kombu_mends import ack_on_a_lost_connection, restore_on_a_closed_connection

    restore_on_a_closed_connection()
    ack_on_a_lost_connection()
    with Connection(aof_redis.url) as connection:
        channel = connection.default_channel
        message = _message(channel, "tag-1")
        channel.qos.append(message, "tag-1")
        aof_redis.process.kill()
        aof_redis.process.wait(10)
        connection.transport.client = None
        channel.close()
        with caplog.at_level(logging.WARNING):
            message.ack_log_error(logging.getLogger("test"), connection.connection_errors + connection.channel_errors)
    assert "the broker connection was lost" in caplog.text


def test_an_untested_kombu_is_refused_with_a_clear_message() -> None:
    """A kombu whose mended method changed shape stops the worker before it consumes."""
    code = (
        "from kombu.transport import redis as r\n"
        "def append(self, message, delivery_tag, extra=None): pass\n"
        "r.QoS.append = append\n"
        "from chatbatch.exceptions import ConfigurationError\n"
        "from worker.service import kombu_mends\n"
        "try:\n"
        "    kombu_mends.install()\n"
        "except ConfigurationError as error:\n"
        "    print(error)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert "kombu.transport.redis.QoS.append" in done.stdout, done.stderr
    assert "(self, message, delivery_tag, extra)" in done.stdout and "pyproject.toml" in done.stdout


def test_installing_twice_wraps_once() -> None:
    from kombu.transport import redis as kombu_redis

    from worker.service import kombu_mends

    kombu_mends.install()
    once = kombu_redis.QoS.append
    kombu_mends.install()
    assert kombu_redis.QoS.append is once
    kombu_mends.check()  # the installed mends keep the shape the check expects
