"""Prometheus metrics (worker/service/metrics.py, gateway/metrics.py, chatbatch/metrics.py), scraped from
a real worker and a real gateway and parsed with prometheus-client's own parser: counters grow by
a job's exact counts, histograms by as many observations."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from chatbatch.queues import model_queue
from chatbatch.settings import Settings
from producer import Client
from schemas import BatchRequestOutput
from tests.conftest import RedisServer, Worker, batch_line, free_port, served_gateway, user

MODEL = "metered"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    """Every sample of a /metrics page: (name, labels) -> value."""
    samples: Samples = {}
    for family in text_string_to_metric_families(httpx.get(url, timeout=10).text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include these."""
    wanted = set(labels.items())
    return sum(value for (found, have), value in samples.items() if found == name and wanted <= have)


@pytest.fixture(scope="module")
def metered(tiny_model: Path, base_env: dict[str, str], redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Worker, str]]:
    port = free_port()
    env = {**base_env, "CHATBATCH_BATCH_WAIT_MS": "0", "CHATBATCH_METRICS_PORT": str(port)}
    worker = Worker(env, tmp_path_factory.mktemp("logs") / "metered.log", "--model", str(tiny_model),
                    "--served-model-name", MODEL, "--queue", model_queue(MODEL))
    try:
        worker.wait_ready(MODEL, redis_server.client())
        yield worker, f"http://127.0.0.1:{port}/metrics"
    finally:
        worker.stop()


def test_a_workers_counters_and_histograms_grow_by_a_jobs_exact_counts(metered: tuple[Worker, str], redis_server: RedisServer, tmp_path: Path) -> None:
    _, url = metered
    before = scrape(url)
    source = tmp_path / "in.jsonl"
    lines = [batch_line(f"m{i}", user(f"count {i}", model=MODEL, max_tokens=3 + i % 4, temperature=0)) for i in range(10)]
    lines.append(batch_line("too-long", user("word " * 400, model=MODEL, max_tokens=8)))
    source.write_text("\n".join(lines) + "\n")
    client = Client(Settings(redis_url=redis_server.url))
    handle = client.submit_file(str(source))
    job = handle.wait(timeout=120)
    assert job.request_counts.completed == 10 and job.request_counts.failed == 1
    after = scrape(url)

    outputs = [BatchRequestOutput.model_validate_json(line) for kind, line in handle.lines() if kind == "output"]
    bodies = [output.response.body for output in outputs if output.response is not None]
    grew = {name: total(after, name, model=MODEL) - total(before, name, model=MODEL) for name in (
        "chatbatch_prompt_tokens_total", "chatbatch_generation_tokens_total", "chatbatch_requests_finished_total",
        "chatbatch_request_queue_seconds_count", "chatbatch_time_to_first_token_seconds_count", "chatbatch_request_latency_seconds_count",
    )}
    assert grew["chatbatch_prompt_tokens_total"] == sum(body["usage"]["prompt_tokens"] for body in bodies)
    assert grew["chatbatch_generation_tokens_total"] == sum(body["usage"]["completion_tokens"] for body in bodies)
    assert grew["chatbatch_requests_finished_total"] == 10
    reasons = {body["choices"][0]["finish_reason"] for body in bodies}
    for reason in reasons:
        expected = sum(body["choices"][0]["finish_reason"] == reason for body in bodies)
        assert total(after, "chatbatch_requests_finished_total", model=MODEL, finish_reason=reason) - total(
            before, "chatbatch_requests_finished_total", model=MODEL, finish_reason=reason) == expected
    for histogram in ("chatbatch_request_queue_seconds_count", "chatbatch_time_to_first_token_seconds_count", "chatbatch_request_latency_seconds_count"):
        assert grew[histogram] == 10, histogram
    errors = "chatbatch_request_errors_total"
    assert total(after, errors, model=MODEL, code="context_length_exceeded") - total(before, errors, model=MODEL, code="context_length_exceeded") == 1
    assert total(after, "chatbatch_model_load_seconds", model=MODEL) > 0
    assert total(after, "chatbatch_batch_max_rows", model=MODEL) >= 1
    assert ("chatbatch_queue_depth", frozenset({("queue", model_queue(MODEL))})) in after
    assert ("chatbatch_jobs", frozenset({("status", "in_progress")})) in after


@pytest.fixture(scope="module")
def gateway_url(base_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """The gateway's API URL, and its metrics URL on a port of their own."""
    port = free_port()
    with served_gateway({**base_env, "CHATBATCH_METRICS_PORT": str(port)}, tmp_path_factory.mktemp("gateway") / "gateway.log") as url:
        yield url, f"http://127.0.0.1:{port}/metrics"


def test_the_gateway_counts_requests_by_route_template_and_status(gateway_url: tuple[str, str]) -> None:
    api_url, metrics_url = gateway_url
    assert httpx.get(f"{api_url}/metrics").status_code == 404, "the API's port serves no fleet metrics"
    before = scrape(metrics_url)
    for _ in range(2):
        assert httpx.get(f"{api_url}/v1/models").status_code == 200
    assert httpx.get(f"{api_url}/v1/batches/batch_nobody").status_code == 404
    assert httpx.post(f"{api_url}/v1/chat/completions", content=json.dumps({"messages": "no"}),
                      headers={"Content-Type": "application/json"}).status_code == 400
    after = scrape(metrics_url)

    def grew(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert grew("chatbatch_http_requests_total", method="GET", route="/v1/models", status="200") == 2
    assert grew("chatbatch_http_requests_total", method="GET", route="/v1/batches/{job_id}", status="404") == 1
    assert grew("chatbatch_http_requests_total", method="POST", route="/v1/chat/completions", status="400") == 1
    assert grew("chatbatch_http_request_duration_seconds_count", method="GET", route="/v1/models") == 2
    assert not any(name == "chatbatch_http_requests_total" and "batch_nobody" in str(labels) for name, labels in after)
    assert ("chatbatch_queue_depth", frozenset({("queue", "chatbatch")})) in after
    assert any(name == "chatbatch_jobs" for name, _ in after)


def test_the_metrics_exported_are_those_the_dashboard_and_alerts_name(metered: tuple[Worker, str], gateway_url: tuple[str, str]) -> None:
    """tests/test_deploy.py checks the dashboard, the KEDA triggers and the alerts against
    EXPORTED; here EXPORTED is checked against real scrapes of a worker and a gateway."""
    from tests.test_deploy import EXPORTED, HISTOGRAMS

    found: set[str] = set()
    for url in (metered[1], gateway_url[1]):
        for family in text_string_to_metric_families(httpx.get(url, timeout=10).text):
            if family.name.startswith("chatbatch_"):
                found.add(family.name + "_total" if family.type == "counter" else family.name)
    assert found <= EXPORTED, found - EXPORTED
    # The one metric a CPU worker does not have.
    assert EXPORTED - found == {"chatbatch_cuda_memory_used_bytes"}
    assert HISTOGRAMS <= found
