"""docker-compose.yml describes the production shape; Docker does not run here, so parse it."""

from __future__ import annotations

import yaml

from chatbatch.settings import Settings
from tests.conftest import ROOT


def _compose() -> dict:  # type: ignore[type-arg]
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_redis_persists_with_aof_and_never_evicts() -> None:
    command = _compose()["services"]["redis"]["command"]
    text = " ".join(str(part) for part in command)
    assert "--appendonly yes" in text
    assert "--appendfsync everysec" in text
    assert "--maxmemory-policy noeviction" in text
    assert "--requirepass" in text


def test_worker_reserves_a_gpu_and_reads_chatbatch_settings() -> None:
    worker = _compose()["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert worker["command"][:2] == ["chatbatch", "worker"]
    env = worker["environment"]
    known = {f"CHATBATCH_{name.upper()}" for name in Settings.model_fields}
    chatbatch_vars = {name for name in env if name.startswith("CHATBATCH_")}
    assert chatbatch_vars <= known, chatbatch_vars - known
    assert {"CHATBATCH_REDIS_URL", "CHATBATCH_MODEL_URI"} <= chatbatch_vars
    assert env["CHATBATCH_REDIS_URL"].startswith("redis://") and "@redis:6379" in env["CHATBATCH_REDIS_URL"]
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"


def test_named_volumes_are_declared_and_bind_mounts_name_repository_files() -> None:
    compose = _compose()
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            name = volume.split(":")[0]
            if name.startswith("./"):
                assert (ROOT / name).exists(), name
            else:
                assert name in compose["volumes"], name


def test_published_ports_are_bound_to_loopback() -> None:
    for name, service in _compose()["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)


def test_the_gateway_shares_its_files_and_the_callback_secret_with_the_workers() -> None:
    services = _compose()["services"]
    gateway = services["gateway"]
    assert gateway["command"][:2] == ["chatbatch", "serve"]
    assert gateway["environment"]["CHATBATCH_FILES_DIR"] in " ".join(gateway["volumes"])
    for name in ("gateway", "worker"):
        assert "CHATBATCH_CALLBACK_SECRET" in services[name]["environment"], name


def test_the_image_copies_every_package_it_installs() -> None:
    import tomllib

    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    copied = {line.split()[1] for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("COPY ")}
    assert {package.split(".")[0] for package in packages} <= copied
