"""Nightly dataset generation: the day's prompts from S3, n seeded samples each, the day's
output under a dated prefix. Rerunning the same day never duplicates anything: the job id is
derived from the day, so a rerun resumes the unfinished job or returns the finished one.

Cron (02:15 every night):

    15 2 * * * chatbatch nightly --prompts s3://corpus/prompts --out s3://corpus/datasets --n 4

reads s3://corpus/prompts/YYYY-MM-DD.jsonl (OpenAI batch lines) and writes
s3://corpus/datasets/YYYY-MM-DD/output.jsonl and errors.jsonl (with `--format parquet`,
output.parquet and errors.parquet).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import tempfile

from chatbatch.storage import open_input
from producer.client import Client, tracking_fields
from producer.handles import JobHandle
from producer.reader import check_lines, check_size, count_lines, iter_lines


def line_seed(base: int, day: dt.date, custom_id: str) -> int:
    """A stable seed per line and day: a rerun samples the same text."""
    digest = hashlib.sha256(f"{base}:{day.isoformat()}:{custom_id}".encode()).digest()
    return int.from_bytes(digest[:6], "big")


def _with_sampling(raw: bytes, *, n: int, base_seed: int, day: dt.date) -> bytes:
    """Set n and a per-line seed on a batch line; lines that are not batch lines pass unchanged
    (they become error lines with their own line numbers)."""
    try:
        data = json.loads(raw)
    except ValueError:
        return raw
    if not isinstance(data, dict) or not isinstance(data.get("body"), dict):
        return raw
    body = data["body"]
    body["n"] = n
    body.setdefault("seed", line_seed(base_seed, day, str(data.get("custom_id"))))
    return json.dumps(data).encode()


def submit_day(
    client: Client,
    *,
    prompts: str,
    out: str,
    day: dt.date,
    n: int = 1,
    seed: int = 0,
    name: str = "nightly",
    fmt: str = "jsonl",
    mlflow_experiment: str | None = None,
) -> JobHandle:
    """Submit (or resume, or return) the job of one day.

    Args:
        prompts: prefix of the daily prompt files, e.g. s3://corpus/prompts
        out: prefix of the daily outputs, e.g. s3://corpus/datasets
        day: which day's file to run.
        n: samples per prompt.
        seed: base of the per-line seeds.
        name: job id prefix, so several nightly datasets can share a Redis.
        fmt: `jsonl` or `parquet`: the files written (output.jsonl / output.parquet, ...).
        mlflow_experiment: track the job as a run of this MLflow experiment (default:
            CHATBATCH_MLFLOW_EXPERIMENT; docs/lineage.md).
    """
    source = f"{prompts.rstrip('/')}/{day.isoformat()}.jsonl"
    target = f"{out.rstrip('/')}/{day.isoformat()}"
    settings = client.settings
    with open_input(source) as (stream, size, canonical):
        check_size(source, size, settings.max_file_bytes)
        check_lines(source, count_lines(stream), settings.max_file_lines)
        stream.seek(0)
        with tempfile.TemporaryFile() as staged:
            for _, raw, _ in iter_lines(stream, max_line_bytes=settings.max_line_bytes):
                if raw is not None:
                    staged.write(_with_sampling(raw, n=n, base_seed=seed, day=day))
                else:
                    staged.write(b"x" * (settings.max_line_bytes + 1))  # stays too large
                staged.write(b"\n")
            staged.seek(0)
            return client.submit_stream(
                staged,
                source=canonical,
                job_id=f"{name}-{day.isoformat()}",
                metadata={"dataset": name, "day": day.isoformat(), "n": str(n), "seed": str(seed)},
                output=f"{target}/output.{fmt}",
                errors=f"{target}/errors.{fmt}",
                extra=tracking_fields(mlflow_experiment),
            )
