"""Model handling: the seed tutorial's save flow, registry URIs, and the pyfunc fallback."""

from __future__ import annotations

from pathlib import Path

import pytest

from chatbatch.settings import Settings
from schemas import ChatCompletion, parse_chat_request
from tests.conftest import ROOT, run_cli
from worker.engine.scheduler import Engine
from worker.models.builders import tiny_hf_model
from worker.models.model import build_engine, load_runner, registered_version
from worker.models.runners import PyfuncRunner, TransformersRunner

SETTINGS = Settings(redis_url="redis://127.0.0.1:1/0")


def _ask(runner, text: str, **extra: object) -> ChatCompletion:  # type: ignore[no-untyped-def]
    engine = Engine(runner, batch_wait=0)
    engine.start()
    try:
        request = parse_chat_request({"messages": [{"role": "user", "content": text}], **extra})
        return engine.submit(request, "t").result(timeout=120)
    finally:
        engine.stop()


def test_save_hf_from_a_local_directory_follows_the_tutorial_flow(tmp_path: Path, base_env: dict[str, str]) -> None:
    import mlflow

    source = tiny_hf_model(tmp_path / "my-chat-model")
    out = tmp_path / "saved"
    done = run_cli(base_env, "model", "save", "--hf", str(source), "--out", str(out))
    assert done.returncode == 0, done.stderr
    model = mlflow.models.Model.load(str(out / "MLmodel"))
    assert model.metadata is not None and model.metadata["task"] == "llm/v1/chat"
    assert model.flavors["transformers"]["task"] == "text-generation"
    # MLflow's own pyfunc serves it as a chat model (the path `mlflow models serve` takes) ...
    answer = mlflow.pyfunc.load_model(str(out)).predict(
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0.5}
    )
    assert answer[0]["object"] == "chat.completion"
    # ... and chatbatch unwraps it into a batched runner, named after the source directory.
    runner = load_runner(str(out), SETTINGS)
    assert isinstance(runner, TransformersRunner)
    assert runner.served_name == "my-chat-model"
    assert _ask(runner, "hi", max_tokens=3).model == "my-chat-model"


def test_save_refuses_an_occupied_directory_and_a_missing_model(tmp_path: Path, base_env: dict[str, str], tiny_model: Path) -> None:
    taken = run_cli(base_env, "model", "save", "--hf", str(tmp_path / "nope"), "--out", str(tiny_model))
    assert taken.returncode == 2
    assert "Traceback" not in taken.stderr


def test_registry_uri_serves_under_the_registered_name(tmp_path: Path, tiny_model: Path) -> None:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    try:
        with mlflow.start_run() as run:
            mlflow.log_artifacts(str(tiny_model), artifact_path="model")
        version = mlflow.register_model(f"runs:/{run.info.run_id}/model", "support-bot")
        runner = load_runner(f"models:/support-bot/{version.version}", SETTINGS)
        assert runner.served_name == "support-bot"
        assert _ask(runner, "hello", max_tokens=2).model == "support-bot"
        by_run = load_runner(f"runs:/{run.info.run_id}/model", SETTINGS)
        assert by_run.served_name == "tiny-llama-chat"
    finally:
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]  # None restores the default store


def test_other_pyfunc_chat_models_fall_back_to_predict(tmp_path: Path) -> None:
    import mlflow

    out = tmp_path / "reverse"
    mlflow.pyfunc.save_model(
        str(out), python_model=str(ROOT / "tests" / "data" / "reverse_chat_model.py"), pip_requirements=["mlflow"]
    )
    runner = load_runner(str(out), SETTINGS, served_name="reverse")
    assert isinstance(runner, PyfuncRunner) and not runner.batched
    answer = _ask(runner, "hello", max_tokens=3)
    assert answer.choices[0].message.content == "oll"
    assert answer.model == "reverse"


def test_missing_model_path_is_a_clear_error() -> None:
    with pytest.raises(FileNotFoundError, match="MLmodel"):
        load_runner("/no/such/model", SETTINGS)


def test_registry_uris_load_the_version_they_name_now(tiny_model: Path, tmp_path: Path) -> None:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    try:
        with mlflow.start_run() as run:
            mlflow.log_artifacts(str(tiny_model), artifact_path="model")
        for _ in range(3):
            mlflow.register_model(f"runs:/{run.info.run_id}/model", "lineage-bot")
        mlflow.MlflowClient().set_registered_model_alias("lineage-bot", "champion", "2")
        assert registered_version("models:/lineage-bot@champion") == ("lineage-bot", "2")
        assert registered_version("models:/lineage-bot/latest") == ("lineage-bot", "3")
        assert registered_version("models:/lineage-bot/1") == ("lineage-bot", "1")
        assert registered_version(str(tiny_model)) is None
        with pytest.raises(FileNotFoundError, match="lineage-bot@nobody"):
            registered_version("models:/lineage-bot@nobody")
        runner = load_runner("models:/lineage-bot@champion", SETTINGS)
        assert runner.registered == ("lineage-bot", "2")
        assert runner.lineage == {"model_uri": "models:/lineage-bot@champion", "model_name": "lineage-bot", "model_version": "2"}
        assert load_runner(str(tiny_model), SETTINGS).lineage == {"model_uri": str(tiny_model), "model_name": "", "model_version": ""}
    finally:
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]  # None restores the default store


def test_the_system_fingerprint_names_the_set_up(tiny_model: Path) -> None:
    """Workers with the same model and settings share a fingerprint, and every answer carries
    it; another batch limit or another saved model gives another."""
    runner = load_runner(str(tiny_model), SETTINGS)
    engine = build_engine(runner, SETTINGS)
    same = build_engine(runner, SETTINGS).fingerprint
    assert engine.fingerprint == same and same is not None and same.startswith("fp_")
    assert build_engine(runner, Settings(redis_url=SETTINGS.redis_url, max_batch_size=4)).fingerprint != same
    saved_as, runner.model_id = runner.model_id, "models:/tiny/2"
    assert build_engine(runner, SETTINGS).fingerprint != same
    runner.model_id = saved_as

    engine.start()
    try:
        answer = engine.submit(parse_chat_request({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}), "t").result(timeout=120)
    finally:
        engine.stop()
    assert answer.system_fingerprint == same and answer.service_tier == "default"
