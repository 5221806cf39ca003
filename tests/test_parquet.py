"""Parquet output (chatbatch/parquet.py): one row per choice in input order, matching the JSONL
lines, written locally and to the S3 server on loopback; error rows; nightly's --format."""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from chatbatch.settings import Settings
from producer import Client
from tests.conftest import RedisServer, S3Server, Worker, batch_line, run_cli, user


def _source(path: Path) -> Path:
    lines = [batch_line(f"c{i}", user(f"say {i}", max_tokens=4, temperature=0.7, seed=i, n=1 + i % 3)) for i in range(8)]
    lines.insert(3, "{broken")
    # A schema short enough that the random model always closes its object within max_tokens.
    schema = {"type": "object", "properties": {"word": {"enum": ["yes", "no"]}}, "required": ["word"], "additionalProperties": False}
    lines.append(batch_line("json", user("a json object", max_tokens=40, temperature=0,
                                         response_format={"type": "json_schema", "json_schema": {"name": "word", "schema": schema}})))
    path.write_text("\n".join(lines) + "\n")
    return path


def _expected(client: Client, job_id: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The rows the JSONL lines make: (output rows, error rows), in input order."""
    outputs, errors = [], []
    for number, kind, raw in client.jobs.iter_lines(job_id):
        line = json.loads(raw)
        if kind == "error":
            errors.append({"custom_id": line["custom_id"], "line": number, "code": line["error"]["code"]})
            continue
        body = line["response"]["body"]
        for choice in body["choices"]:
            outputs.append({
                "custom_id": line["custom_id"], "line": number, "choice": choice["index"], "content": choice["message"]["content"],
                "finish_reason": choice["finish_reason"], "prompt_tokens": body["usage"]["prompt_tokens"],
                "completion_tokens": body["usage"]["completion_tokens"], "model": body["model"],
            })
    return outputs, errors


def _check(table: Any, errors_table: Any, expected: tuple[list[dict[str, Any]], list[dict[str, Any]]]) -> None:
    rows = table.to_pylist()
    assert [{key: row[key] for key in expected[0][0]} for row in rows] == expected[0]
    assert len(rows) > 9, "one row per choice: several lines have n > 1"
    for row in rows:
        assert json.loads(row["response"])["choices"][row["choice"]]["message"]["content"] == row["content"]
    structured = [row for row in rows if row["custom_id"] == "json"]
    assert structured and json.loads(structured[0]["parsed"]) == json.loads(structured[0]["content"])
    assert all(row["parsed"] is None for row in rows if row["custom_id"] != "json" and not (row["content"] or "").lstrip().startswith(("{", "[")))
    errors = errors_table.to_pylist()
    assert [{key: row[key] for key in ("custom_id", "line", "code")} for row in errors] == expected[1]
    assert errors[0]["code"] == "invalid_json" and json.loads(errors[0]["error_line"])["error"]["line"] == 4


def test_parquet_files_locally_and_from_the_cli(tiny_worker: Worker, redis_server: RedisServer, base_env: dict[str, str], tmp_path: Path) -> None:
    client = Client(Settings(redis_url=redis_server.url))
    handle = client.submit_file(str(_source(tmp_path / "in.jsonl")))
    assert handle.wait(timeout=120).status.value == "completed"
    expected = _expected(client, handle.id)
    handle.write_results(str(tmp_path / "out.parquet"), str(tmp_path / "err.parquet"))
    _check(pq.read_table(tmp_path / "out.parquet"), pq.read_table(tmp_path / "err.parquet"), expected)

    done = run_cli(base_env, "results", handle.id, "--output", str(tmp_path / "cli.parquet"), "--errors", str(tmp_path / "cli-err.parquet"))
    assert done.returncode == 0, done.stderr
    _check(pq.read_table(tmp_path / "cli.parquet"), pq.read_table(tmp_path / "cli-err.parquet"), expected)


@pytest.fixture
def bucket(s3_server: S3Server) -> str:
    name = f"p-{uuid.uuid4().hex[:10]}"
    s3_server.client().create_bucket(Bucket=name)
    return name


def test_parquet_files_in_s3_and_nightly_format(tiny_worker: Worker, redis_server: RedisServer, base_env: dict[str, str], s3_server: S3Server, bucket: str, tmp_path: Path) -> None:
    client = Client(Settings(redis_url=redis_server.url))
    handle = client.submit_file(str(_source(tmp_path / "in.jsonl")), output=f"s3://{bucket}/out/output.parquet", errors=f"s3://{bucket}/out/errors.parquet")
    assert handle.wait(timeout=120).status.value == "completed"
    s3 = s3_server.client()

    def read(key: str) -> Any:
        return pq.read_table(io.BytesIO(s3.get_object(Bucket=bucket, Key=key)["Body"].read()))

    _check(read("out/output.parquet"), read("out/errors.parquet"), _expected(client, handle.id))

    prompts = [batch_line(f"p{i}", user(f"topic {i}", max_tokens=3, temperature=0.8)) for i in range(4)]
    s3.put_object(Bucket=bucket, Key="prompts/2026-11-26.jsonl", Body="\n".join(prompts).encode())
    done = run_cli(base_env, "nightly", "--prompts", f"s3://{bucket}/prompts", "--out", f"s3://{bucket}/datasets", "--date", "2026-11-26",
                   "--n", "2", "--name", f"pq-{bucket}", "--format", "parquet", "--wait")
    assert done.returncode == 0, done.stderr
    rows = read("datasets/2026-11-26/output.parquet").to_pylist()
    assert [(row["custom_id"], row["choice"]) for row in rows] == [(f"p{i}", c) for i in range(4) for c in range(2)]
    assert read("datasets/2026-11-26/errors.parquet").num_rows == 0


def test_a_parquet_file_that_fails_leaves_nothing_behind(tmp_path: Path) -> None:
    """A write that fails midway (here: a line that is not JSON) publishes nothing and leaves
    no temporary file."""
    from chatbatch.parquet import ParquetOutput

    out = ParquetOutput(str(tmp_path / "out.parquet"), "error", row_group=1)
    out.write(1, json.dumps({"custom_id": "a", "error": {"code": "invalid_json", "message": "m", "line": 1}, "response": None}))
    with pytest.raises(ValueError):
        out.write(2, "not json")
    out.discard()
    assert list(tmp_path.iterdir()) == []
