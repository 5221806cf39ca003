"""MLflow tracking of jobs: each job submitted with an MLflow experiment is a run of it.

The workers keep the runs up to date from the job records, in a thread of their own and one
worker at a time (under `keys.TRACKING_LOCK`), every heartbeat interval: the job never waits for
MLflow, and a tracking server that is away only delays its run, which the next sweep that
reaches the server catches up (created, updated, ended). See docs/lineage.md.

Per job the record keeps what was done: `mlflow_run_id` (set with HSETNX, so two trackers never
keep two runs), `mlflow_params` and `mlflow_datasets` (what was logged), `mlflow_lines` (the
answered lines at the last metrics).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import warnings
from typing import Any

import redis

from chatbatch import keys
from chatbatch.redisconn import text, texts

logger = logging.getLogger(__name__)

#: Seconds one MLflow request may take, and its retries (the next sweep is the retry); set in
#: the worker's environment, where MLflow reads them, unless set there already.
HTTP_TIMEOUT = "5"
HTTP_RETRIES = "0"
#: The run's status for each final job status.
RUN_STATUS = {"completed": "FINISHED", "failed": "FAILED", "cancelled": "KILLED", "expired": "KILLED"}
#: Tag naming the job a run tracks.
JOB_TAG = "chatbatch.job_id"
#: Metadata of nightly jobs logged as params (producer/nightly.py).
METADATA_PARAMS = ("dataset", "day", "n", "seed")
#: Seconds the tracking lock lasts if its holder dies during a pass.
LOCK_SECONDS = 60
#: Consecutive failed MLflow calls after which a sweep stops (the server is away).
GIVE_UP_AFTER = 2


def digest(*parts: object) -> str:
    """A dataset's digest: sha256 of what names its content (job, file, line counts)."""
    return hashlib.sha256("\t".join(str(part) for part in parts).encode()).hexdigest()[:32]


def dataset_source(uri: str) -> Any:
    """The MLflow dataset source of a job's file: MLflow's own for the URIs it knows (s3://,
    local paths), else one that keeps the URI as it is (a job's `redis:` lines)."""
    from mlflow.data.dataset_source import DatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    class JobFileSource(DatasetSource):
        """A chatbatch job file, by URI."""

        def __init__(self, location: str) -> None:
            self.uri = location

        @staticmethod
        def _get_source_type() -> str:
            return "chatbatch"

        def load(self, **_: Any) -> Any:
            raise NotImplementedError(f"read {self.uri} with `chatbatch results`")

        @staticmethod
        def _can_resolve(raw_source: Any) -> bool:
            return False

        @classmethod
        def _resolve(cls, raw_source: Any) -> JobFileSource:
            return cls(str(raw_source))

        def to_dict(self) -> dict[str, Any]:
            return {"uri": self.uri}

        @classmethod
        def from_dict(cls, source_dict: dict[str, Any]) -> JobFileSource:
            return cls(str(source_dict["uri"]))

    if uri.startswith("s3://") or uri.startswith("/"):
        try:
            with warnings.catch_warnings():  # a local path "can be interpreted in multiple ways"
                warnings.simplefilter("ignore", UserWarning)
                return resolve_dataset_source(uri)
        except Exception:  # a source MLflow cannot resolve here: kept by URI
            logger.debug("MLflow cannot resolve %s as a dataset source", uri, exc_info=True)
    return JobFileSource(uri)


class Tracker:
    """Brings the MLflow runs of the tracked jobs up to date (one pass: `sweep`)."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._mlflow: Any = None
        self._experiments: dict[str, str] = {}

    @property
    def mlflow(self) -> Any:
        if self._mlflow is None:
            import mlflow

            self._mlflow = mlflow.MlflowClient()
        return self._mlflow

    def sweep(self) -> int:
        """One pass over the tracked jobs; returns how many runs it ended. Errors are logged,
        and the job is looked at again at the next sweep."""
        ended = failures = 0
        for member in sorted(self.redis.smembers(keys.TRACKED_JOBS)):
            job_id = text(member)
            try:
                ended += self.track(job_id)
                failures = 0
            except Exception as error:
                failures += 1
                logger.warning("job %s: MLflow tracking failed (%s: %s); retried at the next sweep",
                               job_id, type(error).__name__, str(error)[:300])
                if failures >= GIVE_UP_AFTER:
                    break
        return ended

    def track(self, job_id: str) -> bool:
        """Create, update or end the run of one job; True when it ended the run."""
        data = texts(self.redis.hgetall(keys.job(job_id)))
        if not data or not data.get("mlflow_experiment"):
            self.redis.srem(keys.TRACKED_JOBS, job_id)
            return False
        run_id = data.get("mlflow_run_id") or self._create(job_id, data)
        self._log(job_id, run_id, data)
        status = data.get("status", "")
        if status not in RUN_STATUS:
            return False
        self._log_dataset(job_id, run_id, data, "output")
        end = int(data.get(f"{status}_at") or time.time())
        self.mlflow.set_terminated(run_id, status=RUN_STATUS[status], end_time=end * 1000)
        self.redis.srem(keys.TRACKED_JOBS, job_id)
        logger.info("job %s: MLflow run %s ended %s", job_id, run_id, RUN_STATUS[status])
        return True

    def _experiment_id(self, name: str) -> str:
        if name not in self._experiments:
            found = self.mlflow.get_experiment_by_name(name)
            self._experiments[name] = found.experiment_id if found else self.mlflow.create_experiment(name)
        return self._experiments[name]

    def _create(self, job_id: str, data: dict[str, str]) -> str:
        """The job's run: one found by its tag (made by a try whose answer was lost), else a new
        one; the record keeps the first run id stored."""
        experiment = self._experiment_id(data["mlflow_experiment"])
        found = self.mlflow.search_runs([experiment], filter_string=f"tags.`{JOB_TAG}` = '{job_id}'", max_results=1)
        if found:
            run_id = str(found[0].info.run_id)
        else:
            started = int(data.get("created_at") or time.time()) * 1000
            run_id = str(self.mlflow.create_run(experiment, start_time=started, tags={JOB_TAG: job_id}, run_name=job_id).info.run_id)
        if not self.redis.hsetnx(keys.job(job_id), "mlflow_run_id", run_id):
            kept = text(self.redis.hget(keys.job(job_id), "mlflow_run_id"))
            if kept != run_id:
                self.mlflow.delete_run(run_id)
            run_id = kept
        logger.info("job %s: tracked as MLflow run %s", job_id, run_id)
        return run_id

    def _log(self, job_id: str, run_id: str, data: dict[str, str]) -> None:
        """Params not logged yet, the input dataset once the line count is known, and the
        metrics when lines were answered since the last ones (or the job ended)."""
        from mlflow.entities import Metric, Param

        logged = set(filter(None, data.get("mlflow_params", "").split(",")))
        params = {key: value for key, value in job_params(data).items() if key not in logged}
        done = int(data.get("completed") or 0) + int(data.get("failed") or 0)
        final = data.get("status") in RUN_STATUS
        metrics: list[Any] = []
        if final or str(done) != data.get("mlflow_lines"):
            now = int(time.time() * 1000)
            metrics = [Metric(key, value, now, done) for key, value in job_metrics(data).items()]
        if params or metrics:
            self.mlflow.log_batch(run_id, metrics=metrics, params=[Param(k, v) for k, v in params.items()])
            self.redis.hset(keys.job(job_id), mapping={"mlflow_params": ",".join(sorted(logged | set(params))), "mlflow_lines": done})
        if data.get("enqueued") == "1":
            self._log_dataset(job_id, run_id, data, "input")

    def _log_dataset(self, job_id: str, run_id: str, data: dict[str, str], context: str) -> None:
        """Log the job's input or output file as a dataset of the run, once."""
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        logged = set(filter(None, data.get("mlflow_datasets", "").split(",")))
        if context in logged:
            return
        counts: tuple[str, ...]
        if context == "input":
            uri, counts = data.get("input_file", ""), (data.get("total", "0"),)
        else:
            uri, counts = data.get("output_file", ""), (data.get("completed", "0"), data.get("failed", "0"))
        # MetaDataset is concrete (its `profile` is None); mypy reads the abstract property.
        dataset = MetaDataset(dataset_source(uri), name=f"{job_id}-{context}", digest=digest(job_id, uri, *counts))  # type: ignore[abstract]
        entity = DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])
        self.mlflow.log_inputs(run_id, datasets=[entity])
        self.redis.hset(keys.job(job_id), "mlflow_datasets", ",".join(sorted(logged | {context})))
        data["mlflow_datasets"] = ",".join(sorted(logged | {context}))


def job_params(data: dict[str, str]) -> dict[str, str]:
    """The run's params known from the job record now: the model the worker loaded (once a
    line is stored), the line count (once every line is enqueued), a nightly job's recipe."""
    params = {"input_file": data.get("input_file", ""), "output_file": data.get("output_file", "")}
    for key in ("model_uri", "model_name", "model_version"):
        if data.get(key):
            params[key] = data[key]
    if data.get("model"):
        params["served_model_name"] = data["model"]
    if data.get("enqueued") == "1":
        params["total_lines"] = data.get("total", "0")
    metadata = json.loads(data.get("metadata") or "{}")
    params.update({key: str(metadata[key]) for key in METADATA_PARAMS if key in metadata})
    return {key: value for key, value in params.items() if value}


def job_metrics(data: dict[str, str], now: float | None = None) -> dict[str, float]:
    """The run's metrics from the job record: lines, tokens, and time from its start (in
    progress) to its end (or now)."""
    prompt, generated = int(data.get("input_tokens") or 0), int(data.get("generated_tokens") or 0)
    status = data.get("status", "")
    start = int(data.get("in_progress_at") or data.get("created_at") or 0)
    end = float(data.get(f"{status}_at") or (time.time() if now is None else now))
    duration = max(0.0, end - start) if start else 0.0
    return {
        "completed_lines": float(data.get("completed") or 0),
        "failed_lines": float(data.get("failed") or 0),
        "input_tokens": float(prompt),
        "output_tokens": float(generated),
        "total_tokens": float(prompt + generated),
        "duration_seconds": duration,
        "tokens_per_second": generated / duration if duration else 0.0,
    }


def run(client: redis.Redis, hostname: str, interval: float, stop: threading.Event) -> None:
    """Keep the runs of tracked jobs up to date every `interval` seconds until `stop`, one
    worker at a time; a thread of its own, so that a slow tracking server delays nothing else."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", HTTP_TIMEOUT)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", HTTP_RETRIES)
    tracker = Tracker(client)
    while not stop.wait(interval):
        try:
            # Held for the pass (a minute at most, should the worker die in it), then let go.
            if client.scard(keys.TRACKED_JOBS) and client.set(keys.TRACKING_LOCK, hostname, nx=True, ex=LOCK_SECONDS):
                try:
                    tracker.sweep()
                finally:
                    if text(client.get(keys.TRACKING_LOCK) or b"") == hostname:
                        client.delete(keys.TRACKING_LOCK)
        except Exception:  # Redis away: the next pass tries again
            logger.warning("the MLflow tracking sweep failed", exc_info=True)
