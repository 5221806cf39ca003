"""S3 in and out, against moto's S3 server over HTTP (the same calls boto3 makes to AWS)."""

from __future__ import annotations

import json
import uuid

import pytest

from chatbatch.storage import OutputFile, StorageError
from schemas import BatchJob, BatchRequestOutput, ChatCompletion, ErrorCode
from tests.conftest import S3Server, Worker, batch_line, run_cli, user


@pytest.fixture
def bucket(s3_server: S3Server) -> str:
    name = f"b-{uuid.uuid4().hex[:10]}"
    s3_server.client().create_bucket(Bucket=name)
    return name


def _get_lines(s3_server: S3Server, bucket: str, key: str) -> list[BatchRequestOutput]:
    body = s3_server.client().get_object(Bucket=bucket, Key=key)["Body"].read().decode()
    return [BatchRequestOutput.model_validate_json(line) for line in body.splitlines()]


def test_s3_input_output_and_errors(tiny_worker: Worker, base_env: dict[str, str], s3_server: S3Server, bucket: str) -> None:
    lines = [batch_line(f"q{i}", user(f"question {i}", max_tokens=3)) for i in range(12)]
    lines.insert(4, "{broken")
    lines.insert(8, batch_line("q1", user("repeat")))
    s3_server.client().put_object(Bucket=bucket, Key="in/day.jsonl", Body="\n".join(lines).encode())
    done = run_cli(
        base_env, "submit", f"s3://{bucket}/in/day.jsonl",
        "--output", f"s3://{bucket}/out/output.jsonl", "--errors", f"s3://{bucket}/out/errors.jsonl", "--wait",
    )
    assert done.returncode == 0, done.stderr
    outputs = _get_lines(s3_server, bucket, "out/output.jsonl")
    assert [o.custom_id for o in outputs] == [f"q{i}" for i in range(12)]
    for line in outputs:
        assert line.response is not None
        ChatCompletion.model_validate(line.response.body)
    errors = _get_lines(s3_server, bucket, "out/errors.jsonl")
    assert [(e.error.code, e.error.line) for e in errors if e.error] == [
        (ErrorCode.invalid_json, 5), (ErrorCode.duplicate_custom_id, 9)
    ]
    job = BatchJob.model_validate_json(run_cli(base_env, "status", done.stdout.strip()).stdout)
    assert job.status.value == "completed"
    assert job.input_file == f"s3://{bucket}/in/day.jsonl"
    assert job.output_file == f"s3://{bucket}/out/output.jsonl"
    assert job.finalizing_at is not None and job.completed_at is not None

    again = run_cli(base_env, "results", job.id, "--output", f"s3://{bucket}/copy/output.jsonl", "--errors", f"s3://{bucket}/copy/errors.jsonl")
    assert again.returncode == 0, again.stderr
    assert _get_lines(s3_server, bucket, "copy/output.jsonl") == outputs


def test_missing_s3_input_is_a_clear_error(base_env: dict[str, str], bucket: str) -> None:
    done = run_cli(base_env, "submit", f"s3://{bucket}/nope.jsonl")
    assert done.returncode == 2
    assert f"s3://{bucket}/nope.jsonl" in done.stderr and "Traceback" not in done.stderr


def test_failed_multipart_upload_leaves_no_partial_object(s3_server: S3Server, bucket: str) -> None:
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="out/output.jsonl", Body=b"yesterday\n")
    parts = []

    def fail_second_part(**kwargs: object) -> None:
        parts.append(kwargs)
        if len(parts) == 2:
            raise ConnectionError("network cut during upload")

    client.meta.events.register("before-call.s3.UploadPart", fail_second_part)
    out = OutputFile(f"s3://{bucket}/out/output.jsonl", client=client, multipart_threshold=5 * 1024 * 1024)
    line = json.dumps({"text": "x" * 1000})
    for _ in range(12_000):  # about 12 MB: three parts
        out.write_line(line)
    with pytest.raises((StorageError, ConnectionError)):
        out.commit()
    out.discard()
    assert len(parts) >= 2, "the upload was multipart"
    # The old object is untouched and no multipart upload is left open.
    assert client.get_object(Bucket=bucket, Key="out/output.jsonl")["Body"].read() == b"yesterday\n"
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_job_fails_clearly_when_its_output_cannot_be_written(tiny_worker: Worker, base_env: dict[str, str], s3_server: S3Server, bucket: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(batch_line(f"q{i}", user("hi", max_tokens=2)) for i in range(3)))
    done = run_cli(base_env, "submit", str(source), "--output", "s3://no-such-bucket-here/output.jsonl", "--wait", timeout=200)
    assert done.returncode == 1
    assert "no-such-bucket-here" in done.stderr and "NoSuchBucket" in done.stderr
    job = BatchJob.model_validate_json(run_cli(base_env, "status", done.stdout.strip()).stdout)
    assert job.status.value == "failed" and job.failed_at is not None
    assert job.errors is not None and job.errors.data[0].code == "output_upload_failed"


def test_nightly_rerun_of_the_same_day_duplicates_nothing(tiny_worker: Worker, base_env: dict[str, str], s3_server: S3Server, bucket: str) -> None:
    client = s3_server.client()
    prompts = [batch_line(f"p{i}", user(f"topic {i}", max_tokens=4, temperature=0.8)) for i in range(5)]
    client.put_object(Bucket=bucket, Key="prompts/2026-11-25.jsonl", Body="\n".join(prompts).encode())
    args = ["nightly", "--prompts", f"s3://{bucket}/prompts", "--out", f"s3://{bucket}/datasets", "--date", "2026-11-25", "--n", "2", "--seed", "3", "--wait"]
    first = run_cli(base_env, *args)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "nightly-2026-11-25"
    key = "datasets/2026-11-25/output.jsonl"
    lines = _get_lines(s3_server, bucket, key)
    assert [line.custom_id for line in lines] == [f"p{i}" for i in range(5)]
    for line in lines:
        assert line.response is not None and len(line.response.body["choices"]) == 2
    etag = client.head_object(Bucket=bucket, Key=key)["ETag"]

    rerun = run_cli(base_env, *args)
    assert rerun.returncode == 0, rerun.stderr
    assert rerun.stdout.strip() == "nightly-2026-11-25"
    assert client.head_object(Bucket=bucket, Key=key)["ETag"] == etag
    assert len(_get_lines(s3_server, bucket, key)) == 5
    job = BatchJob.model_validate_json(run_cli(base_env, "status", "nightly-2026-11-25").stdout)
    assert job.request_counts.total == 5 and job.request_counts.completed == 5
    assert job.metadata == {"dataset": "nightly", "day": "2026-11-25", "n": "2", "seed": "3"}
