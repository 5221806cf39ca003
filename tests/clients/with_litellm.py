"""litellm against the gateway as an OpenAI-compatible provider (`openai/<model>` with
`api_base`), as its docs show it: completion, a stream, and the batch helpers (create_file,
create_batch, retrieve_batch, file_content)."""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any

# Its model price map ships with it: it must not try to fetch a newer one.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import litellm  # noqa: E402
from scenarios import API_KEY, BASE_URL, TIMEOUT, TINY, main, scenario  # noqa: E402

litellm.telemetry = False
SERVER: dict[str, Any] = {"api_base": BASE_URL, "api_key": API_KEY, "timeout": TIMEOUT}
FILES: dict[str, Any] = {**SERVER, "custom_llm_provider": "openai"}
HELLO = [{"role": "user", "content": "hello"}]


@scenario
def completion() -> dict[str, Any]:
    answer = litellm.completion(model=f"openai/{TINY}", messages=HELLO, max_tokens=5, temperature=0, **SERVER)
    return {"answer": answer.model_dump()}


@scenario
def stream() -> dict[str, Any]:
    chunks = list(litellm.completion(
        model=f"openai/{TINY}", messages=HELLO, max_tokens=5, temperature=0, stream=True, stream_options={"include_usage": True}, **SERVER,
    ))
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    usage = next((chunk.usage for chunk in reversed(chunks) if getattr(chunk, "usage", None)), None)
    whole = litellm.completion(model=f"openai/{TINY}", messages=HELLO, max_tokens=5, temperature=0, **SERVER)
    return {"text": text, "usage": usage.model_dump() if usage else None, "whole": whole.choices[0].message.content,
            "finish_reasons": [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices]}


@scenario
def batches() -> dict[str, Any]:
    line = {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions", "body": {"model": TINY, "messages": HELLO, "max_tokens": 3}}
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as out:
        out.write(json.dumps(line) + "\n")
    with open(out.name, "rb") as source:
        uploaded = litellm.create_file(file=source, purpose="batch", **FILES)
    os.unlink(out.name)
    batch = litellm.create_batch(completion_window="24h", endpoint="/v1/chat/completions", input_file_id=uploaded.id, **FILES)
    deadline = time.monotonic() + TIMEOUT
    while batch.status not in ("completed", "failed", "cancelled", "expired") and time.monotonic() < deadline:
        time.sleep(0.25)
        batch = litellm.retrieve_batch(batch_id=batch.id, **FILES)
    content = litellm.file_content(file_id=batch.output_file_id, **FILES) if batch.output_file_id else None
    return {"file": uploaded.model_dump(), "batch": batch.model_dump(), "output": content.content.decode() if content else None}


if __name__ == "__main__":
    main()
