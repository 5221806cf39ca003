"""A job's output and error lines as Parquet (pyarrow), for pipelines that train on them.

An `--output`/`--errors` destination ending in `.parquet` gets one of these instead of JSONL:

- output rows, one per choice: `custom_id`, `line` (the input line number), `model`, `choice`,
  `content`, `finish_reason`, `tool_calls` (JSON), the request's `prompt_tokens`,
  `completion_tokens` and `cached_tokens` (repeated on each of its choices), `parsed` (the
  content as compact JSON where it is a JSON object or array, as structured outputs are; else
  null) and `response` (the whole chat.completion as JSON);
- error rows, one per error line: `custom_id`, `line`, `code`, `message`, `status_code` and
  `request_id` (when the line got a response), and `error_line` (the whole line as JSON).

Rows come in input order and are written in row groups as lines come, so memory stays flat
however large the job. The file goes through `OutputFile`: it appears whole, or not at all.
"""

from __future__ import annotations

import json
from typing import Any

from chatbatch.storage import OutputFile

#: Rows per row group: a few MB of text at most, read back in slices this size.
ROW_GROUP = 4096


def _schemas() -> dict[str, Any]:
    import pyarrow as pa

    return {
        "output": pa.schema([
            ("custom_id", pa.string()), ("line", pa.int64()), ("model", pa.string()), ("choice", pa.int32()),
            ("content", pa.string()), ("finish_reason", pa.string()), ("tool_calls", pa.string()),
            ("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64()), ("cached_tokens", pa.int64()),
            ("parsed", pa.string()), ("response", pa.string()),
        ]),
        "error": pa.schema([
            ("custom_id", pa.string()), ("line", pa.int64()), ("code", pa.string()), ("message", pa.string()),
            ("status_code", pa.int32()), ("request_id", pa.string()), ("error_line", pa.string()),
        ]),
    }


def _parsed(content: str | None) -> str | None:
    """The content as compact JSON when it is a JSON object or array."""
    if not content or content.lstrip()[:1] not in ("{", "["):
        return None
    try:
        value = json.loads(content)
    except ValueError:
        return None
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")) if isinstance(value, dict | list) else None


def output_rows(number: int, line: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of one output line: one per choice."""
    body = line["response"]["body"]
    usage = body.get("usage") or {}
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    response = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    rows = []
    for choice in body.get("choices", []):
        message = choice.get("message") or {}
        calls = message.get("tool_calls")
        rows.append({
            "custom_id": line.get("custom_id"), "line": number, "model": body.get("model"), "choice": choice.get("index", 0),
            "content": message.get("content"), "finish_reason": choice.get("finish_reason"),
            "tool_calls": json.dumps(calls, ensure_ascii=False, separators=(",", ":")) if calls else None,
            "prompt_tokens": usage.get("prompt_tokens", 0), "completion_tokens": usage.get("completion_tokens", 0),
            "cached_tokens": cached, "parsed": _parsed(message.get("content")), "response": response,
        })
    return rows


def error_rows(number: int, line: dict[str, Any]) -> list[dict[str, Any]]:
    """The row of one error line."""
    error = line.get("error") or {}
    response = line.get("response") or {}
    return [{
        "custom_id": line.get("custom_id"), "line": number, "code": error.get("code"), "message": error.get("message"),
        "status_code": response.get("status_code"), "request_id": response.get("request_id"),
        "error_line": json.dumps(line, ensure_ascii=False, separators=(",", ":")),
    }]


class ParquetOutput:
    """A Parquet file of a job's output or error lines, written as they come.

    Args:
        dest: a local path or an s3:// URL ending in `.parquet`.
        kind: "output" or "error".
        client: the boto3 S3 client to upload with.
    """

    def __init__(self, dest: str, kind: str, *, client: Any = None, row_group: int = ROW_GROUP) -> None:
        import pyarrow.parquet as pq

        self.kind = kind
        self.schema = _schemas()[kind]
        self.sink = OutputFile(dest, client=client)
        try:
            self.writer = pq.ParquetWriter(self.sink.stream, self.schema, compression="zstd")
        except BaseException:
            self.sink.discard()
            raise
        self.row_group = row_group
        self._rows: list[dict[str, Any]] = []

    def write(self, number: int, line: str) -> None:
        """Add one output or error line (its JSON text) of input line `number`."""
        data = json.loads(line)
        self._rows += output_rows(number, data) if self.kind == "output" else error_rows(number, data)
        if len(self._rows) >= self.row_group:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self._rows:
            self.writer.write_table(pa.Table.from_pylist(self._rows, schema=self.schema))
            self._rows = []

    def commit(self) -> None:
        """Write what is left and publish the file (see `OutputFile.commit`)."""
        self._flush()
        self.writer.close()
        self.sink.commit()

    def discard(self) -> None:
        """Drop the file (after a failure, or once published); never raises for the writer's
        own failure (a full disk fails its footer too): the temporary file goes all the same."""
        try:
            if self.writer.is_open:
                self.writer.close()
        except Exception:
            pass
        finally:
            self.sink.discard()
