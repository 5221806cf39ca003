"""Loading the served model from an MLflow URI, once per worker process."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from pathlib import Path
from typing import Any

from chatbatch import __version__
from chatbatch.settings import Settings
from worker.engine.scheduler import Engine
from worker.models.builders import default_model
from worker.models.dtypes import dtype_name

logger = logging.getLogger(__name__)

#: How many times this process loaded a model; the worker reports it in its heartbeat.
LOADS = 0
_lock = threading.Lock()


def resolve_uri(uri: str, settings: Settings) -> str:
    """The URI to load: `uri`, else CHATBATCH_MODEL_URI, else the default model (built once)."""
    uri = uri or settings.model_uri
    if uri:
        return uri
    return str(default_model(settings.model_cache))


def local_path(uri: str) -> Path:
    """A local directory holding the model: local paths as they are, other URIs downloaded.

    `runs:/`, `models:/` and `s3://` go through MLflow's artifact download (S3 through boto3's
    own credential chain).
    """
    path = Path(uri.removeprefix("file://")).expanduser()
    if path.exists():
        return path.resolve()
    if "://" not in uri and not uri.startswith(("runs:/", "models:/")):
        raise FileNotFoundError(
            f"no model at {uri}: give a directory holding an MLmodel file, or a runs:/, "
            "models:/ or s3:// URI"
        )
    import mlflow

    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))


def registered_version(uri: str) -> tuple[str, str] | None:
    """(registered name, version) that a `models:/` URI names now, else None.

    `models:/name@alias` is resolved through the alias, `models:/name/latest` and
    `models:/name/Stage` through the newest version (in that stage), `models:/name/3` is
    version 3 as it is. The worker then loads that version, so what it reports is what it
    serves even if the alias moves meanwhile.

    Raises:
        FileNotFoundError: no such registered model, alias, stage or version.
    """
    match = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/([^/]+))/?", uri)
    if match is None:
        return None
    name, alias, rest = match.groups()
    if rest is not None and rest.isdigit():
        return name, rest
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    try:
        if alias is not None:
            return name, str(client.get_model_version_by_alias(name, alias).version)
        if rest.lower() == "latest":
            versions = client.search_model_versions(f"name = '{name}'")
        else:  # a stage (MLflow keeps stages for registries that still use them)
            versions = client.get_latest_versions(name, stages=[rest])
    except MlflowException as error:
        raise FileNotFoundError(f"{uri}: {error.message}; check the name, alias or stage in the MLflow registry") from None
    if not versions:
        raise FileNotFoundError(f"{uri}: the registered model {name!r} has no version in {rest!r}")
    return name, str(max(int(v.version) for v in versions))


def served_name_for(uri: str, path: Path, mlmodel: Any) -> str:
    """The name MLflow records for the model, else `default`."""
    match = re.match(r"models:/([^/@]+)", uri)
    if match:
        return match.group(1)
    name = (mlmodel.metadata or {}).get("served_model_name")
    if name:
        return str(name)
    source = (mlmodel.flavors.get("transformers") or {}).get("source_model_name")
    if source and not source.startswith(("/", ".")) and not Path(source).exists():
        return str(source)
    return "default"


def load_runner(uri: str, settings: Settings, *, served_name: str | None = None) -> Any:
    """Load the model behind `uri` and wrap it in the runner that fits it.

    A transformers llm/v1/chat model is unwrapped into its components so that requests run as
    one batched decode; any other pyfunc chat model falls back to `pyfunc.predict`.
    """
    global LOADS
    from mlflow.models import Model

    from worker.models.runners import PyfuncRunner, TransformersRunner

    with _lock:
        started = time.monotonic()
        uri = resolve_uri(uri, settings)
        registered = registered_version(uri)
        path = local_path(f"models:/{registered[0]}/{registered[1]}" if registered else uri)
        mlmodel = Model.load(str(path / "MLmodel"))
        name = served_name or served_name_for(uri, path, mlmodel)
        transformers_flavor = mlmodel.flavors.get("transformers")
        task = (mlmodel.metadata or {}).get("task") or (transformers_flavor or {}).get("inference_task")
        runner: Any
        if transformers_flavor is not None:
            import mlflow.transformers

            components = mlflow.transformers.load_model(str(path), return_type="components")
            runner = TransformersRunner(
                components["model"],
                components["tokenizer"],
                served_name=name,
                default_max_tokens=settings.default_max_tokens,
                device=settings.device,
                decode=settings.decode,
                prefix_cache_bytes=settings.prefix_cache_mb * 1024 * 1024,
                dtype=settings.dtype,
            )
            #: The dtype the model runs in (CHATBATCH_DTYPE, `auto` resolved), for the heartbeat.
            runner.dtype = dtype_name(runner.model.dtype)
            kind = f"transformers ({runner.device}, {runner.dtype})"
        else:
            import mlflow.pyfunc

            if task not in (None, "llm/v1/chat", "agent/v1/chat"):
                raise ValueError(f"{uri} is a {task} model; chatbatch serves llm/v1/chat models")
            runner = PyfuncRunner(mlflow.pyfunc.load_model(str(path)), served_name=name)
            runner.dtype = None  # whatever the model's own predict uses
            kind = "pyfunc predict, one request at a time"
        LOADS += 1
        #: Seconds the load took (the worker's `chatbatch_model_load_seconds`).
        runner.load_seconds = time.monotonic() - started
        #: The registered model and version loaded, for a `models:/` URI (else None).
        runner.registered = registered
        #: What the worker records on the jobs it answers and in its heartbeat.
        runner.lineage = {"model_uri": uri, "model_name": registered[0] if registered else "",
                          "model_version": registered[1] if registered else ""}
        #: Which saved model this is: its registered version, else the id MLflow gave it when it
        #: was saved (a model saved again is another model).
        runner.model_id = f"models:/{registered[0]}/{registered[1]}" if registered else (mlmodel.model_uuid or uri)
        logger.info(
            "loaded model %s from %s as %r: %s in %.1fs",
            name, uri, name, kind, time.monotonic() - started,
        )
        return runner


def build_engine(runner: Any, settings: Settings) -> Engine:
    """The engine for a runner, with the batch limits of the settings (or the runner's
    defaults: on CUDA, from free device memory)."""
    size, tokens = runner.batch_limits(settings.max_batch_size, settings.max_batch_tokens)
    prefill = settings.max_prefill_tokens or getattr(runner, "default_prefill_tokens", tokens)
    engine = Engine(
        runner,
        max_batch_size=size,
        max_batch_tokens=tokens,
        batch_wait=settings.batch_wait_ms / 1000,
        schedule=settings.schedule,
        max_prefill_tokens=prefill,
    )
    engine.fingerprint = fingerprint(runner, engine, settings)
    return engine


def fingerprint(runner: Any, engine: Engine, settings: Settings) -> str:
    """The answers' `system_fingerprint`: a digest of what decides how a request is answered —
    the model (its registered version, or the id of the saved model), the runner, device kind
    and dtype, the decode mode and batch limits as configured, the prefix cache, the default max_tokens, and
    the versions of chatbatch, torch and transformers. Workers with the same fingerprint answer
    a seeded request alike; a change of any of these changes it."""
    import importlib.metadata

    def version(package: str) -> str:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return ""

    model = getattr(runner, "model", None)
    device = getattr(runner, "device", None)
    setup = {
        "chatbatch": __version__,
        "torch": version("torch"),
        "transformers": version("transformers"),
        "model": getattr(runner, "model_id", ""),
        "runner": type(runner).__name__,
        "device": getattr(device, "type", str(device or "")),
        "dtype": str(getattr(model, "dtype", "")),
        "decode": getattr(runner, "decode", ""),
        "schedule": engine.schedule,
        # As configured: where unset they are measured at start (rows on a CPU from a timed
        # step, KV tokens on CUDA from free memory), which varies between starts of the same
        # set-up while answers do not.
        "max_batch_size": settings.max_batch_size or "auto",
        "max_batch_tokens": settings.max_batch_tokens or "auto",
        "max_prefill_tokens": engine.max_prefill_tokens,
        "prefix_cache_mb": settings.prefix_cache_mb,
        "default_max_tokens": settings.default_max_tokens,
    }
    digest = hashlib.sha256(json.dumps(setup, sort_keys=True).encode()).hexdigest()
    return f"fp_{digest[:10]}"
