"""The deployment files: the Kubernetes manifests (deploy/k8s), the Grafana dashboard, and the
Prometheus and Grafana of docker-compose.yml. Neither Kubernetes nor Docker runs here, so the
files are parsed and checked against the code they deploy: the queues a worker consumes, the
settings it reads, the metrics the exporters publish."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from chatbatch.queues import DEFAULT_QUEUE, live_queue, model_queue, worker_queues
from chatbatch.settings import Settings
from tests.conftest import ROOT

K8S = ROOT / "deploy" / "k8s"
DASHBOARD = ROOT / "deploy" / "grafana" / "chatbatch-dashboard.json"

#: The apiVersion each kind of object in deploy/k8s is written for.
API_VERSIONS = {
    "Namespace": "v1",
    "Deployment": "apps/v1",
    "Service": "v1",
    "Secret": "v1",
    "ConfigMap": "v1",
    "StatefulSet": "apps/v1",
    "PersistentVolumeClaim": "v1",
    "ScaledObject": "keda.sh/v1alpha1",
    "TriggerAuthentication": "keda.sh/v1alpha1",
}

#: The metrics the worker and the gateway export (the exporters' contract). The metrics work
#: checks this same set against a real scrape of a worker and a gateway.
HISTOGRAMS = {
    "chatbatch_request_queue_seconds",
    "chatbatch_time_to_first_token_seconds",
    "chatbatch_request_latency_seconds",
    "chatbatch_http_request_duration_seconds",
}
EXPORTED = HISTOGRAMS | {
    "chatbatch_requests_running",
    "chatbatch_requests_waiting",
    "chatbatch_batch_rows",
    "chatbatch_batch_max_rows",
    "chatbatch_batch_occupancy",
    "chatbatch_prompt_tokens_total",
    "chatbatch_generation_tokens_total",
    "chatbatch_cached_prompt_tokens_total",
    "chatbatch_requests_finished_total",
    "chatbatch_request_errors_total",
    "chatbatch_model_load_seconds",
    "chatbatch_cuda_memory_used_bytes",
    "chatbatch_kv_budget_tokens",
    "chatbatch_queue_depth",
    "chatbatch_queue_backlog_chunks",
    "chatbatch_queue_in_flight_chunks",
    "chatbatch_jobs",
    "chatbatch_http_requests_total",
}
_HISTOGRAM_SERIES = re.compile(r"_(bucket|sum|count)$")

Manifest = dict[str, Any]


def _manifest_files() -> list[Path]:
    return sorted(path for path in K8S.iterdir() if path.suffix in {".yaml", ".yml"} and path.stem != "kustomization")


def _manifests() -> list[Manifest]:
    return [doc for path in _manifest_files() for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _objects(kind: str) -> dict[str, Manifest]:
    return {doc["metadata"]["name"]: doc for doc in _manifests() if doc["kind"] == kind}


def _pod(workload: Manifest) -> Manifest:
    return workload["spec"]["template"]  # type: ignore[no-any-return]


def _container(workload: Manifest) -> Manifest:
    """The workload's own container: the first one; sidecars (an exporter) follow it."""
    return _pod(workload)["spec"]["containers"][0]  # type: ignore[no-any-return]


def _chatbatch_deployments(command: str) -> list[Manifest]:
    """Deployments that run `chatbatch COMMAND`."""
    found = [d for d in _objects("Deployment").values() if _container(d)["command"][:2] == ["chatbatch", command]]
    assert found, f"no Deployment runs `chatbatch {command}`"
    return found


def _option(container: Manifest, name: str) -> str:
    command = container["command"]
    assert name in command, (name, command)
    return str(command[command.index(name) + 1])


def _env(container: Manifest) -> dict[str, str]:
    """The container's variables: plain values as they are, Secret references as
    `secret:NAME/KEY`, and the data of the ConfigMaps it takes whole."""
    configmaps = _objects("ConfigMap")
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(configmaps[source["configMapRef"]["name"]]["data"])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = f"secret:{ref['name']}/{ref['key']}"
    return env


def _secret_key_exists(reference: str) -> bool:
    name, key = reference.removeprefix("secret:").split("/")
    secret = _objects("Secret").get(name)
    return secret is not None and key in {**secret.get("stringData", {}), **secret.get("data", {})}


def _pre_stop_sleep(container: Manifest) -> int:
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep", command
    return int(command[1])


# Manifests and kustomize


def test_every_manifest_has_the_api_version_of_its_kind() -> None:
    manifests = _manifests()
    for doc in manifests:
        assert doc.get("kind") in API_VERSIONS, doc.get("kind")
        assert doc["apiVersion"] == API_VERSIONS[doc["kind"]], (doc["kind"], doc["metadata"]["name"])
        assert doc["metadata"]["name"]
    assert {doc["kind"] for doc in manifests} == set(API_VERSIONS)


def test_kustomization_lists_exactly_the_manifest_files_present() -> None:
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert len(listed) == len(set(listed)), listed
    assert sorted(listed) == [path.name for path in _manifest_files()]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_builds_every_object_into_the_chatbatch_namespace() -> None:
    built = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    objects = [doc for doc in yaml.safe_load_all(built.stdout) if doc is not None]
    assert sorted((d["kind"], d["metadata"]["name"]) for d in objects) == sorted(
        (d["kind"], d["metadata"]["name"]) for d in _manifests()
    )
    for doc in objects:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "chatbatch", (doc["kind"], doc["metadata"]["name"])


def test_every_service_selects_the_pods_of_a_workload_on_a_port_they_name() -> None:
    workloads = [*_objects("Deployment").values(), *_objects("StatefulSet").values()]
    for name, service in _objects("Service").items():
        selector = service["spec"]["selector"]
        pods = [w for w in workloads if selector.items() <= _pod(w)["metadata"]["labels"].items()]
        assert pods, f"Service {name} selects no pods"
        for port in service["spec"]["ports"]:
            for pod in pods:
                named = {p["name"] for c in _pod(pod)["spec"]["containers"] for p in c.get("ports", [])}
                assert port["targetPort"] in named, (name, port)


# Redis


def test_redis_persists_with_aof_never_evicts_and_keeps_its_data_on_a_volume() -> None:
    (redis,) = _objects("StatefulSet").values()
    container = _container(redis)
    args = " ".join(container["args"])
    assert "--appendonly yes" in args
    assert "--appendfsync everysec" in args
    assert "--maxmemory-policy noeviction" in args
    # noeviction acts only at maxmemory, which must sit below the container's limit.
    maxmemory = args.split("--maxmemory ")[1].split()[0]
    assert maxmemory.endswith("gb") and container["resources"]["limits"]["memory"].endswith("Gi")
    assert int(maxmemory.removesuffix("gb")) < int(container["resources"]["limits"]["memory"].removesuffix("Gi"))
    assert "--requirepass $(REDIS_PASSWORD)" in args
    assert _env(container)["REDIS_PASSWORD"] == "secret:redis-password/password"
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    data_dir = args.split("--dir ")[1].split()[0]
    assert {"name": claim["metadata"]["name"], "mountPath": data_dir} in container["volumeMounts"]
    assert redis["spec"]["replicas"] == 1


def test_every_chatbatch_pod_builds_its_redis_url_from_the_password_secret() -> None:
    for deployment in [*_chatbatch_deployments("worker"), *_chatbatch_deployments("serve")]:
        container = _container(deployment)
        names = [var["name"] for var in container["env"]]
        env = _env(container)
        assert env["REDIS_PASSWORD"] == "secret:redis-password/password"
        assert _secret_key_exists(env["REDIS_PASSWORD"])
        # Kubernetes expands $(VAR) only from variables declared earlier in the list.
        assert names.index("REDIS_PASSWORD") < names.index("CHATBATCH_REDIS_URL")
        assert env["CHATBATCH_REDIS_URL"] == "redis://:$(REDIS_PASSWORD)@redis:6379/0"
        assert Settings(redis_url=env["CHATBATCH_REDIS_URL"].replace("$(REDIS_PASSWORD)", "pw")).redis_url


def test_every_chatbatch_variable_of_the_pods_is_a_known_setting() -> None:
    known = {f"CHATBATCH_{name.upper()}" for name in Settings.model_fields}
    for deployment in [*_chatbatch_deployments("worker"), *_chatbatch_deployments("serve")]:
        env = _env(_container(deployment))
        used = {name for name in env if name.startswith("CHATBATCH_")}
        assert used <= known, (deployment["metadata"]["name"], used - known)
        for name, value in env.items():
            if value.startswith("secret:"):
                assert _secret_key_exists(value), (name, value)


# The gateway


def test_the_gateway_reads_its_keys_from_a_secret_is_probed_and_scraped_on_its_metrics_port() -> None:
    for gateway in _chatbatch_deployments("serve"):
        container = _container(gateway)
        assert _option(container, "--host") == "0.0.0.0"
        port = int(_option(container, "--port"))
        env = _env(container)
        assert env["CHATBATCH_API_KEYS"].startswith("secret:")
        assert env["CHATBATCH_CALLBACK_SECRET"].startswith("secret:")
        probe = container["readinessProbe"]
        named = {p["name"]: p["containerPort"] for p in container["ports"]}
        if "httpGet" in probe:
            assert probe["httpGet"]["path"] == "/v1/models"
        assert named.get(probe.get("httpGet", probe.get("tcpSocket", {})).get("port")) == port
        # Metrics on a port of their own, which the Service does not expose (docs/operations.md).
        metrics = Settings.model_validate({"metrics_port": env["CHATBATCH_METRICS_PORT"]}).metrics_port
        assert metrics != port and metrics in named.values()
        annotations = _pod(gateway)["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(metrics)
        assert annotations["prometheus.io/path"] == "/metrics"
        service = _objects("Service")[gateway["metadata"]["name"]]
        assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]
        assert gateway["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > _pre_stop_sleep(container)


# Workers


def test_workers_take_a_gpu_and_are_scraped_on_their_metrics_port() -> None:
    for worker in _chatbatch_deployments("worker"):
        container = _container(worker)
        env = _env(container)
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert env["CHATBATCH_MODEL_URI"], "the model URI comes from the worker's ConfigMap"
        port = Settings.model_validate({"metrics_port": env["CHATBATCH_METRICS_PORT"]}).metrics_port
        assert port in {p["containerPort"] for p in container["ports"]}
        annotations = _pod(worker)["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(port)
        assert annotations["prometheus.io/path"] == "/metrics"


def test_the_worker_grace_period_covers_its_pre_stop_sleep_and_a_running_batch() -> None:
    for worker in _chatbatch_deployments("worker"):
        grace = worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        sleep = _pre_stop_sleep(_container(worker))
        # The grace period counts from the start of preStop; after the sleep, SIGTERM leaves the
        # worker one running batch to finish, which needs a minute or more on a GPU.
        assert grace - sleep >= 60, (grace, sleep)
        assert sleep <= 5, "a worker fetches work until SIGTERM: a long preStop only delays the hand-back"


def test_each_scaled_object_watches_the_queues_its_workers_consume() -> None:
    workers = {d["metadata"]["name"]: d for d in _chatbatch_deployments("worker")}
    auths = _objects("TriggerAuthentication")
    scaled = _objects("ScaledObject").values()
    assert sorted(s["spec"]["scaleTargetRef"]["name"] for s in scaled) == sorted(workers), "one ScaledObject per model"
    for scaler in scaled:
        spec = scaler["spec"]
        assert spec["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
        served = _option(_container(workers[spec["scaleTargetRef"]["name"]]), "--served-model-name")
        batch_queue = model_queue(served)
        consumed = worker_queues([batch_queue, DEFAULT_QUEUE])
        assert spec["minReplicaCount"] == 0
        # A replica count in the Deployment would reset KEDA's at every apply.
        assert "replicas" not in workers[spec["scaleTargetRef"]["name"]]["spec"]
        lists = []
        for trigger in spec["triggers"]:
            if trigger["type"] == "redis":
                lists.append(trigger["metadata"]["listName"])
                host, port = trigger["metadata"]["address"].split(":")
                assert host.split(".")[0] in _objects("Service") and port == "6379", trigger["metadata"]["address"]
                auth = auths[trigger["authenticationRef"]["name"]]
                (password,) = [ref for ref in auth["spec"]["secretTargetRef"] if ref["parameter"] == "password"]
                assert _secret_key_exists(f"secret:{password['name']}/{password['key']}")
        assert set(lists) <= set(consumed), set(lists) - set(consumed)
        assert {live_queue(batch_queue), batch_queue} <= set(lists)
        (prometheus,) = [t for t in spec["triggers"] if t["type"] == "prometheus"]
        query = prometheus["metadata"]["query"]
        assert f'chatbatch_queue_backlog_chunks{{queue="{batch_queue}"}}' in query
        assert set(re.findall(r"chatbatch_[a-z_]+", query)) <= EXPORTED


# The dashboard


def _dashboard() -> Manifest:
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]


def _panels(panels: list[Manifest]) -> list[Manifest]:
    """Every panel, those inside collapsed rows too."""
    return [p for panel in panels for p in [panel, *_panels(panel.get("panels", []))]]


def _expressions() -> list[str]:
    return [target["expr"] for panel in _panels(_dashboard()["panels"]) for target in panel.get("targets", [])]


def _metric(series: str) -> str:
    """The metric a series name belongs to: a histogram's _bucket, _sum and _count are its own."""
    base = _HISTOGRAM_SERIES.sub("", series)
    return base if base in HISTOGRAMS else series


def test_the_dashboard_uses_only_exported_metrics_and_shows_each_of_them() -> None:
    expressions = _expressions()
    assert expressions
    used = {_metric(series) for expr in expressions for series in re.findall(r"chatbatch_[a-z_]+", expr)}
    assert used <= EXPORTED, used - EXPORTED
    assert used == EXPORTED, f"not shown: {EXPORTED - used}"


def test_the_dashboard_reads_histograms_by_bucket_and_keeps_le() -> None:
    for expr in _expressions():
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
        for histogram in HISTOGRAMS:
            # A histogram has no series under its bare name.
            assert not re.search(rf"{histogram}(?![a-z_])", expr), expr
        if "histogram_quantile" in expr:
            grouped = re.search(r"by \(([^)]*)\)", expr)
            assert grouped and "le" in [label.strip() for label in grouped.group(1).split(",")], expr
            assert "_bucket" in expr, expr


def test_the_dashboard_reads_prometheus_through_its_variables() -> None:
    dashboard = _dashboard()
    assert dashboard["schemaVersion"] >= 39
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert "model" in variables["model"]["query"]["query"]
    panels = [p for p in _panels(dashboard["panels"]) if p["type"] != "row"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for target in panel["targets"]:
            if 'model=~"' in target["expr"]:
                assert 'model=~"$model"' in target["expr"], target["expr"]


# Prometheus and Grafana in docker-compose.yml


def _compose_services() -> dict[str, Manifest]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]  # type: ignore[no-any-return]


def _bind_mounts(service: Manifest) -> dict[str, Path]:
    """Container path -> the repository file or folder mounted there."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("./"):
            path = ROOT / source
            assert path.exists(), source
            mounts[target] = path
    return mounts


def test_compose_prometheus_scrapes_the_worker_and_gateway_metrics_ports() -> None:
    services = _compose_services()
    prometheus = services["prometheus"]
    config_path = next(arg.split("=", 1)[1] for arg in prometheus["command"] if arg.startswith("--config.file="))
    config = yaml.safe_load(_bind_mounts(prometheus)[config_path].read_text())
    scraped = {
        (job.get("metrics_path", "/metrics"), target)
        for job in config["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    }
    worker_port = services["worker"]["environment"]["CHATBATCH_METRICS_PORT"]
    gateway_port = services["gateway"]["environment"]["CHATBATCH_METRICS_PORT"]
    assert ("/metrics", f"worker:{worker_port}") in scraped
    assert ("/metrics", f"gateway:{gateway_port}") in scraped
    assert all(not mapping.endswith(f":{gateway_port}") for mapping in services["gateway"]["ports"]), "metrics stay inside"


def test_compose_grafana_provisions_prometheus_and_the_dashboard() -> None:
    grafana = _compose_services()["grafana"]
    mounts = _bind_mounts(grafana)
    provisioning = mounts["/etc/grafana/provisioning"]
    (datasources,) = (provisioning / "datasources").glob("*.yml")
    (source,) = yaml.safe_load(datasources.read_text())["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    (dashboards,) = (provisioning / "dashboards").glob("*.yml")
    (provider,) = yaml.safe_load(dashboards.read_text())["providers"]
    folder = provider["options"]["path"]
    shown = [host for target, host in mounts.items() if target.startswith(folder + "/")]
    assert shown == [DASHBOARD]
    assert "prometheus" in grafana["depends_on"]


# The alerts of docs/operations.md


def test_the_alerts_in_the_operations_guide_use_exported_metrics() -> None:
    text = (ROOT / "docs" / "operations.md").read_text()
    rules = re.findall(r"```promql\n(.*?)```", text, flags=re.S)
    assert len(rules) >= 6
    used = {_metric(series) for rule in rules for series in re.findall(r"chatbatch_[a-z_]+", rule)}
    assert used <= EXPORTED, used - EXPORTED
    for rule in rules:
        assert rule.count("(") == rule.count(")") and rule.count("{") == rule.count("}"), rule
        assert re.search(r"chatbatch_|redis_", rule), rule
