"""Fixtures that start real servers: redis-server on a free port, chatbatch workers as
subprocesses. Nothing here downloads from a model hub."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

ROOT = Path(__file__).resolve().parent.parent
#: Signs callbacks; producers and workers share it.
CALLBACK_SECRET = "whsec-test-3c1f"
#: CHATBATCH_CALLBACK_ALLOW for tests whose callback receivers listen on loopback.
LOOPBACK = "127.0.0.1"
CHATBATCH = [sys.executable, "-m", "cli"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"gave up waiting for {what} after {timeout}s")


@dataclass
class RedisServer:
    port: int
    dir: Path
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)


def start_redis(directory: Path, *extra: str) -> RedisServer:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed: run `make test`, which installs it")
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(directory), *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = RedisServer(port=port, dir=directory, process=process)
    wait_for(lambda: pings(server), 10, f"redis-server on port {port}")
    return server


def pings(server: RedisServer) -> bool:
    try:
        return bool(server.client().ping())
    except (redis.AuthenticationError, redis.ResponseError):
        return True  # up, and asking for a password
    except redis.RedisError:
        return False


@pytest.fixture
def aof_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own, with AOF persistence (it survives a restart)."""
    server = start_redis(tmp_path / "redis", "--appendonly", "yes", "--appendfsync", "always")
    yield server
    if server.process.poll() is None:
        server.process.terminate()
        server.process.wait(10)


def restart_redis(server: RedisServer) -> None:
    """Start a killed AOF redis-server again on its port and directory."""
    server.process = subprocess.Popen(
        ["redis-server", "--port", str(server.port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "yes", "--appendfsync", "always", "--dir", str(server.dir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.process.terminate()
    server.process.wait(10)


@dataclass
class S3Server:
    """moto in server mode: a real HTTP endpoint that boto3 reaches like any S3."""

    port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        binary = Path(sys.executable).with_name("moto_server")
        self.process = subprocess.Popen(
            [str(binary), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(self._up, 20, f"moto server on port {self.port}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def _up(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def client(self):  # type: ignore[no-untyped-def]
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id="testing", aws_secret_access_key="testing",
        )


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    server = S3Server(port=free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def chatbatch_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="session")
def base_env(redis_server: RedisServer, chatbatch_home: Path, s3_server: S3Server) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHATBATCH_", "AWS_"))}
    env.update(
        AWS_ENDPOINT_URL=s3_server.endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_CONFIG_FILE="/dev/null",
        AWS_SHARED_CREDENTIALS_FILE="/dev/null",
        CHATBATCH_REDIS_URL=redis_server.url,
        CHATBATCH_HOME=str(chatbatch_home),
        CHATBATCH_CALLBACK_SECRET=CALLBACK_SECRET,
        CHATBATCH_CALLBACK_MAX_ATTEMPTS="4",
        # Tests compare greedy answers across batches, runs and paths: in float32 a request's
        # greedy answer does not depend on what shares its batch, in bfloat16 it may
        # (docs/engine.md). tests/test_dtypes.py runs the other dtypes and `auto`.
        CHATBATCH_DTYPE="float32",
        # Workers on CPU size their batches from a timed step (worker/models/sizing.py): tests run
        # them at a fixed size, as their windows and orders are written for;
        # tests/test_sizing.py runs the sizing.
        CHATBATCH_MAX_BATCH_SIZE="32",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        MLFLOW_TRACKING_URI=f"file://{chatbatch_home}/mlruns",
        PYTHONUNBUFFERED="1",
    )
    return env


def run_cli(env: dict[str, str], *args: str, timeout: float = 300, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run `chatbatch ARGS` as a subprocess; returns the completed process."""
    return subprocess.run(
        [*CHATBATCH, *args], env=env, capture_output=True, text=True, timeout=timeout, input=input, cwd=ROOT
    )


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, base_env: dict[str, str]) -> Path:
    out = tmp_path_factory.mktemp("models") / "tiny"
    done = run_cli(base_env, "model", "tiny", str(out))
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == out.resolve()
    return out


@pytest.fixture(scope="session")
def default_model(base_env: dict[str, str]) -> Path:
    done = run_cli(base_env, "model", "default", timeout=600)
    assert done.returncode == 0, done.stderr
    return Path(done.stdout.strip())


class Worker:
    """A `chatbatch worker` subprocess in its own process group."""

    def __init__(self, env: dict[str, str], log: Path, *args: str) -> None:
        self.log = log
        self.env = env
        self._log_file = log.open("wb")
        self.process = subprocess.Popen(
            [*CHATBATCH, "worker", *args], env=env, stdout=self._log_file, stderr=subprocess.STDOUT,
            cwd=ROOT, start_new_session=True,
        )

    def wait_ready(self, model: str, client: redis.Redis, timeout: float = 180) -> dict[str, object]:
        from chatbatch.registry import live_models

        def ready() -> dict[str, object] | None:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode}:\n{self.output()}")
            for info in live_models(client).get(model, []):
                if info["pid"] == self.process.pid:
                    return info
            return None

        return wait_for(ready, timeout, f"worker serving {model}", interval=0.2)

    def info(self, client: redis.Redis, model: str) -> dict[str, object]:
        from chatbatch import keys

        for value in client.hgetall(keys.model_workers(model)).values():
            item = json.loads(value)
            if item["pid"] == self.process.pid:
                return item
        raise KeyError(self.process.pid)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, sig)
                self.process.wait(timeout)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self._log_file.close()


@pytest.fixture(scope="session")
def tiny_worker(tiny_model: Path, base_env: dict[str, str], redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    # Loopback callback receivers: the tests' own (callbacks go to public addresses only
    # unless allowed).
    env = {**base_env, "CHATBATCH_BATCH_WAIT_MS": "50", "CHATBATCH_CALLBACK_ALLOW": LOOPBACK}
    worker = Worker(env, tmp_path_factory.mktemp("logs") / "tiny-worker.log", "--model", str(tiny_model))
    try:
        worker.wait_ready("tiny-llama-chat", redis_server.client())
        yield worker
    finally:
        worker.stop()


def last_event(client: redis.Redis) -> dict[str, str]:
    """The newest entry of the notification stream, as text."""
    from chatbatch import keys
    from chatbatch.redisconn import texts

    entries: Any = client.xrange(keys.EVENTS)
    return texts(entries[-1][1])


def batch_line(custom_id: str, body: dict[str, object], url: str = "/v1/chat/completions") -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def user(text: str, **extra: object) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": text}], **extra}


@contextmanager
def served_gateway(env: dict[str, str], log: Path) -> Iterator[str]:
    """`chatbatch serve` on a free port, without API keys, until the block ends; yields its URL."""
    import httpx

    port = free_port()
    with log.open("wb") as out:
        process = subprocess.Popen([*CHATBATCH, "serve", "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{url}/v1/models").status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, 60, "the gateway")
        yield url
    finally:
        process.terminate()
        process.wait(10)
