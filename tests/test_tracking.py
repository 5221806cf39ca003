"""worker/service/tracking.py and model aliases: a worker serving `models:/name@alias` from a real
`mlflow server` reports the version it loaded, and jobs submitted with an MLflow experiment
become runs of it (params, metrics, dataset inputs, end status), caught up when the server
was away."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chatbatch import keys
from chatbatch.queues import model_queue
from tests.conftest import (
    CHATBATCH,
    ROOT,
    RedisServer,
    S3Server,
    Worker,
    batch_line,
    free_port,
    run_cli,
    user,
    wait_for,
)

REGISTERED = "tiny-registered"
SERVED = "tiny-lineage"
EXPERIMENT = "lineage-test"


class MlflowServer:
    """`mlflow server` on loopback with a sqlite store; stopped and started again on the same
    port and store."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.log = (self.dir / "server.log").open("ab")
        self.process = subprocess.Popen(
            [str(Path(sys.executable).with_name("mlflow")), "server",
             "--backend-store-uri", f"sqlite:///{self.dir}/mlflow.db",
             "--default-artifact-root", str(self.dir / "artifacts"),
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        wait_for(self.healthy, 120, f"mlflow server on port {self.port}", interval=0.5)

    def healthy(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"mlflow server exited:\n{(self.dir / 'server.log').read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as answer:
                return bool(answer.status == 200)
        except OSError:
            return False

    def stop(self) -> None:
        import os
        import signal

        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(30)
        self.log.close()

    def client(self) -> Any:
        import mlflow

        return mlflow.MlflowClient(tracking_uri=self.url)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def lineage_env(base_env: dict[str, str], mlflow_server: MlflowServer) -> dict[str, str]:
    return {**base_env, "MLFLOW_TRACKING_URI": mlflow_server.url, "CHATBATCH_HEARTBEAT_INTERVAL": "1"}


@pytest.fixture(scope="module")
def registered_worker(
    tiny_model: Path, lineage_env: dict[str, str], mlflow_server: MlflowServer, redis_server: RedisServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Worker]:
    """A worker serving `models:/tiny-registered@champion`: the registry holds versions 1 and
    2, and the alias names 1 (so `latest` would be another)."""
    client = mlflow_server.client()
    experiment = client.create_experiment("models")
    run = client.create_run(experiment)
    client.log_artifacts(run.info.run_id, str(tiny_model), "model")
    client.create_registered_model(REGISTERED)
    for _ in range(2):
        client.create_model_version(REGISTERED, f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    client.set_registered_model_alias(REGISTERED, "champion", "1")
    env = {**lineage_env, "CHATBATCH_MAX_BATCH_SIZE": "2"}
    worker = Worker(env, tmp_path_factory.mktemp("logs") / "lineage-worker.log", "--model", f"models:/{REGISTERED}@champion",
                    "--served-model-name", SERVED, "--queue", model_queue(SERVED))
    try:
        worker.wait_ready(SERVED, redis_server.client())
        yield worker
    finally:
        worker.stop()


def _submit(env: dict[str, str], path: Path, lines: int, max_tokens: int, *extra: str) -> str:
    path.write_text("".join(batch_line(f"r{i}", user(f"line {i}", model=SERVED, max_tokens=max_tokens)) + "\n" for i in range(lines)))
    done = run_cli(env, "submit", str(path), "--mlflow-experiment", EXPERIMENT, *extra)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[0]


def _get_json(url: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return dict(json.loads(answer.read()))
    except OSError:
        return None


def _job(env: dict[str, str], job_id: str) -> dict[str, Any]:
    done = run_cli(env, "status", job_id)
    return dict(json.loads(done.stdout))


def _run(server: MlflowServer, job_id: str, status: str | None = None) -> Any:
    """The job's run (found by its tag), once it has `status` (any, if None)."""
    try:
        experiment = server.client().get_experiment_by_name(EXPERIMENT)
        if experiment is None:
            return None
        runs = server.client().search_runs([experiment.experiment_id], filter_string=f"tags.`chatbatch.job_id` = '{job_id}'")
    except Exception:
        return None
    if len(runs) > 1:
        raise AssertionError(f"{len(runs)} runs for job {job_id}")
    if runs and (status is None or runs[0].info.status == status):
        return runs[0]
    return None


def _check_final_metrics(run: Any, job: dict[str, Any]) -> None:
    metrics = run.data.metrics
    counts, usage = job["request_counts"], job["usage"]
    assert metrics["completed_lines"] == counts["completed"]
    assert metrics["failed_lines"] == counts["failed"]
    assert metrics["input_tokens"] == usage["input_tokens"] > 0
    assert metrics["output_tokens"] == usage["output_tokens"] > 0
    assert metrics["total_tokens"] == usage["total_tokens"]
    end = job.get("completed_at") or job.get("cancelled_at")
    assert metrics["duration_seconds"] == end - job["in_progress_at"]
    assert metrics["tokens_per_second"] == pytest.approx(usage["output_tokens"] / metrics["duration_seconds"] if metrics["duration_seconds"] else 0.0)


def test_alias_model_job_becomes_a_finished_run_with_lineage(
    registered_worker: Worker, lineage_env: dict[str, str], mlflow_server: MlflowServer, redis_server: RedisServer, tmp_path: Path,
) -> None:
    info = registered_worker.info(redis_server.client(), SERVED)
    assert (info["model_uri"], info["model_name"], info["model_version"]) == (f"models:/{REGISTERED}@champion", REGISTERED, "1")
    listed = json.loads(run_cli(lineage_env, "models").stdout)
    assert [w["model_version"] for w in listed[SERVED]] == ["1"]
    port = free_port()
    gateway = subprocess.Popen([*CHATBATCH, "serve", "--port", str(port)], env=lineage_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        body = wait_for(lambda: _get_json(f"http://127.0.0.1:{port}/v1/models/{SERVED}"), 60, "the gateway")
        assert body["model_versions"] == [f"models:/{REGISTERED}/1"]
    finally:
        gateway.terminate()
        gateway.wait(10)

    source = tmp_path / "in.jsonl"
    job_id = _submit(lineage_env, source, 3, 4, "--wait")
    job = _job(lineage_env, job_id)
    assert job["status"] == "completed" and job["request_counts"] == {"total": 3, "completed": 3, "failed": 0}

    run = wait_for(lambda: _run(mlflow_server, job_id, "FINISHED"), 30, f"the run of {job_id} to finish")
    assert run.info.run_name == job_id
    assert run.data.tags["chatbatch.job_id"] == job_id
    assert redis_server.client().hget(keys.job(job_id), "mlflow_run_id") == run.info.run_id.encode()
    params = run.data.params
    assert params["model_uri"] == f"models:/{REGISTERED}@champion"
    assert (params["model_name"], params["model_version"], params["total_lines"]) == (REGISTERED, "1", "3")
    _check_final_metrics(run, job)

    datasets = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs if i.tags}
    assert set(datasets) == {"input", "output"}
    assert str(source) in datasets["input"].source
    assert job["output_file"] in datasets["output"].source

    def digest(*parts: object) -> str:
        return hashlib.sha256("\t".join(str(p) for p in parts).encode()).hexdigest()[:32]

    assert datasets["input"].digest == digest(job_id, job["input_file"], 3)
    assert datasets["output"].digest == digest(job_id, job["output_file"], 3, 0)
    assert not redis_server.client().sismember(keys.TRACKED_JOBS, job_id)


def test_cancelled_job_run_is_killed(
    registered_worker: Worker, lineage_env: dict[str, str], mlflow_server: MlflowServer, redis_server: RedisServer, tmp_path: Path,
) -> None:
    job_id = _submit(lineage_env, tmp_path / "slow.jsonl", 200, 200)
    wait_for(lambda: _run(mlflow_server, job_id, "RUNNING"), 30, f"the run of {job_id}")
    done = run_cli(lineage_env, "cancel", job_id)
    assert done.returncode == 0, done.stderr
    wait_for(lambda: _job(lineage_env, job_id)["status"] == "cancelled", 60, f"{job_id} cancelled")
    run = wait_for(lambda: _run(mlflow_server, job_id, "KILLED"), 30, f"the run of {job_id} to be killed")
    job = _job(lineage_env, job_id)
    assert run.data.metrics["failed_lines"] == job["request_counts"]["failed"] > 0


def test_run_is_caught_up_after_the_server_was_away(
    registered_worker: Worker, lineage_env: dict[str, str], mlflow_server: MlflowServer, redis_server: RedisServer, tmp_path: Path,
) -> None:
    job_id = _submit(lineage_env, tmp_path / "away.jsonl", 12, 80)
    wait_for(lambda: _run(mlflow_server, job_id, "RUNNING"), 30, f"the run of {job_id}")
    mlflow_server.stop()
    try:
        job = wait_for(lambda: (j := _job(lineage_env, job_id))["status"] in ("completed", "failed") and j, 120, f"{job_id} to end")
        assert job["status"] == "completed" and job["request_counts"]["completed"] == 12
        assert redis_server.client().sismember(keys.TRACKED_JOBS, job_id)  # its run not ended yet
    finally:
        mlflow_server.start()
    run = wait_for(lambda: _run(mlflow_server, job_id, "FINISHED"), 60, f"the run of {job_id} to be caught up")
    _check_final_metrics(run, job)
    assert {i.tags[0].value for i in run.inputs.dataset_inputs} == {"input", "output"}


def test_nightly_job_in_the_setting_experiment_logs_its_recipe_and_s3_datasets(
    registered_worker: Worker, lineage_env: dict[str, str], mlflow_server: MlflowServer, s3_server: S3Server,
) -> None:
    bucket = "lineage-nightly"
    s3_server.client().create_bucket(Bucket=bucket)
    prompts = "".join(batch_line(f"p{i}", user(f"prompt {i}", model=SERVED, max_tokens=3)) + "\n" for i in range(2))
    s3_server.client().put_object(Bucket=bucket, Key="prompts/2026-11-30.jsonl", Body=prompts.encode())
    env = {**lineage_env, "CHATBATCH_MLFLOW_EXPERIMENT": EXPERIMENT}
    done = run_cli(env, "nightly", "--prompts", f"s3://{bucket}/prompts", "--out", f"s3://{bucket}/datasets",
                   "--date", "2026-11-30", "--n", "2", "--seed", "5", "--name", "lineage", "--wait")
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip().splitlines()[0]
    run = wait_for(lambda: _run(mlflow_server, job_id, "FINISHED"), 30, f"the run of {job_id} to finish")
    params = run.data.params
    assert (params["n"], params["seed"], params["dataset"], params["day"]) == ("2", "5", "lineage", "2026-11-30")
    assert (params["model_version"], params["total_lines"]) == ("1", "2")
    sources = {i.tags[0].value: (i.dataset.source_type, json.loads(i.dataset.source)["uri"]) for i in run.inputs.dataset_inputs}
    assert sources == {
        "input": ("s3", f"s3://{bucket}/prompts/2026-11-30.jsonl"),
        "output": ("s3", f"s3://{bucket}/datasets/2026-11-30/output.jsonl"),
    }
