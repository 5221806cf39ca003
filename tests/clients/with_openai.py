"""The official `openai` package against the gateway, as its README shows it: chat (plain,
`parse`, the `stream()` helper, `pydantic_function_tool`), an answer's message sent back,
files, batches, `with_raw_response`, errors, and the async client's stream."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Literal

import openai
from pydantic import BaseModel, Field
from scenarios import API_KEY, BASE_URL, TIMEOUT, TINY, main, scenario

HELLO: Any = [{"role": "user", "content": "hello"}]


class Point(BaseModel):
    """A point on a small grid."""

    x: int = Field(ge=-9, le=9)
    y: int = Field(ge=-9, le=9)
    visible: bool


class GetWeather(BaseModel):
    """The weather in a city."""

    city: Literal["Paris", "Rome", "Oslo"]
    unit: Literal["celsius", "fahrenheit"]


#: A tool written as a JSON schema, as in OpenAI's function calling guide.
WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
            "required": ["city"], "additionalProperties": False,
        },
    },
}


def client() -> openai.OpenAI:
    return openai.OpenAI(base_url=BASE_URL, api_key=API_KEY, max_retries=0, timeout=TIMEOUT)


@scenario
def create() -> dict[str, Any]:
    answer = client().chat.completions.create(model=TINY, messages=HELLO, max_tokens=4, temperature=0)
    return {"answer": answer.model_dump(), "request_id": answer._request_id}


@scenario
def send_back() -> dict[str, Any]:
    """A conversation that carries earlier answers' messages as the SDK dumps them, with the
    fields the SDK sends by default or as "off"."""
    sdk = client()
    first = sdk.chat.completions.create(model=TINY, messages=HELLO, max_tokens=4, temperature=0)
    question: Any = [*HELLO, first.choices[0].message.model_dump(), {"role": "user", "content": "and the weather in Paris?"}]
    called = sdk.chat.completions.create(
        model=TINY, messages=question, tools=[WEATHER_TOOL], tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=30, temperature=0,
    )
    call = called.choices[0].message
    conversation: Any = [
        *question, call.model_dump(),
        *({"role": "tool", "tool_call_id": tool_call.id, "content": "sunny"} for tool_call in call.tool_calls or []),
        {"role": "user", "content": "thanks"},
    ]
    answer = sdk.chat.completions.create(
        model=TINY, messages=conversation, max_tokens=4, temperature=0, store=False, safety_identifier="user-7f3a",
        prompt_cache_key="conformance", service_tier="flex", user="someone", metadata={"suite": "clients"},
    )
    return {"sent": conversation, "answer": answer.model_dump()}


@scenario
def parse() -> dict[str, Any]:
    done = client().chat.completions.parse(model=TINY, messages=[{"role": "user", "content": "a point"}], response_format=Point, max_tokens=40, temperature=0)
    message = done.choices[0].message
    return {"parsed": message.parsed.model_dump() if message.parsed else None, "content": message.content, "finish_reason": done.choices[0].finish_reason}


@scenario
def stream_helper() -> dict[str, Any]:
    """The `stream()` helper: its events, the text they add up to, and the final completion,
    parsed. (A structured answer: its grammar ends it, and the helper refuses a final
    completion that max_tokens cut.)"""
    with client().chat.completions.stream(
        model=TINY, messages=[{"role": "user", "content": "a point"}], response_format=Point, max_tokens=40, temperature=0,
        stream_options={"include_usage": True},
    ) as stream:
        kinds, text = set(), ""
        for event in stream:
            kinds.add(event.type)
            if event.type == "content.delta":
                text += event.delta
        final = stream.get_final_completion()
    parsed = final.choices[0].message.parsed
    return {"kinds": sorted(kinds), "text": text, "final": final.model_dump(exclude={"choices": {0: {"message": {"parsed"}}}}),
            "parsed": parsed.model_dump() if parsed else None}


@scenario
def function_tool() -> dict[str, Any]:
    done = client().chat.completions.parse(
        model=TINY, messages=[{"role": "user", "content": "weather in Oslo?"}], tools=[openai.pydantic_function_tool(GetWeather)],
        tool_choice={"type": "function", "function": {"name": "GetWeather"}}, max_tokens=40, temperature=0,
    )
    choice = done.choices[0]
    calls: list[Any] = choice.message.tool_calls or []
    return {
        "finish_reason": choice.finish_reason, "content": choice.message.content,
        "calls": [{"name": c.function.name, "parsed": c.function.parsed_arguments.model_dump() if c.function.parsed_arguments else None} for c in calls],
    }


@scenario
def files() -> dict[str, Any]:
    sdk = client()
    body = b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "hi"}]}}\n'
    uploaded = sdk.files.create(file=("lines.jsonl", body), purpose="batch")
    found = sdk.files.retrieve(uploaded.id)
    listed = [f.id for f in sdk.files.list()]
    content = sdk.files.content(uploaded.id).read()
    deleted = sdk.files.delete(uploaded.id)
    try:
        sdk.files.retrieve(uploaded.id)
        gone = None
    except openai.NotFoundError as error:
        gone = error.status_code
    return {
        "uploaded": uploaded.model_dump(), "found": found.model_dump(), "listed": uploaded.id in listed,
        "same_content": content == body, "deleted": deleted.deleted, "after_delete": gone,
    }


@scenario
def batches() -> dict[str, Any]:
    sdk = client()
    lines = [
        {"custom_id": "plain", "method": "POST", "url": "/v1/chat/completions", "body": {"model": TINY, "messages": HELLO, "max_tokens": 3}},
        {"custom_id": "first", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": TINY, "messages": HELLO, "max_tokens": 3, "service_tier": "priority", "store": False}},
        {"custom_id": "refused", "method": "POST", "url": "/v1/chat/completions", "body": {"model": TINY, "messages": HELLO, "store": True}},
    ]
    uploaded = sdk.files.create(file=("batch.jsonl", "".join(json.dumps(line) + "\n" for line in lines).encode()), purpose="batch")
    batch = sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"suite": "clients"})
    deadline = time.monotonic() + TIMEOUT
    while batch.status not in ("completed", "failed", "cancelled", "expired") and time.monotonic() < deadline:
        time.sleep(0.25)
        batch = sdk.batches.retrieve(batch.id)
    output = sdk.files.content(batch.output_file_id).text.splitlines() if batch.output_file_id else []
    errors = sdk.files.content(batch.error_file_id).text.splitlines() if batch.error_file_id else []
    listed = batch.id in [b.id for b in sdk.batches.list(limit=100)]
    return {"batch": batch.model_dump(), "output": [json.loads(x) for x in output], "errors": [json.loads(x) for x in errors], "listed": listed}


@scenario
def raw_response() -> dict[str, Any]:
    sdk = client()
    raw = sdk.chat.completions.with_raw_response.create(model=TINY, messages=HELLO, max_tokens=2)
    answer = raw.parse()
    streamed = sdk.chat.completions.with_raw_response.create(model=TINY, messages=HELLO, max_tokens=2, stream=True)
    chunks = list(streamed.parse())
    models = sdk.models.with_raw_response.list()
    return {
        "headers": dict(raw.headers), "id": answer.id, "request_id": answer._request_id,
        "stream_headers": dict(streamed.headers), "stream_id": chunks[0].id,
        "models_headers": dict(models.headers), "models": [m.id for m in models.parse().data],
    }


@scenario
def errors() -> list[dict[str, Any]]:
    """What the SDK raises for refused requests: the status, OpenAI's error fields, the request id."""
    sdk = client()
    attempts: list[Any] = [
        lambda: sdk.chat.completions.create(model=TINY, messages=HELLO, extra_body={"colour": "red"}),
        lambda: sdk.chat.completions.create(model=TINY, messages=HELLO, reasoning_effort="low"),
        lambda: sdk.chat.completions.create(model=TINY, messages=HELLO, store=True),
        lambda: sdk.chat.completions.create(model="gpt-4o", messages=HELLO),
        lambda: sdk.chat.completions.create(model=TINY, messages=HELLO, stream=True, verbosity="low"),
        lambda: sdk.batches.retrieve("batch_missing"),
    ]
    seen: list[dict[str, Any]] = []
    for attempt in attempts:
        try:
            attempt()
            seen.append({"raised": None})
        except openai.APIStatusError as error:
            seen.append({
                "raised": type(error).__name__, "status": error.status_code, "code": error.code, "param": error.param,
                "type": error.type, "request_id": error.request_id, "header": error.response.headers.get("x-request-id"),
            })
    return seen


@scenario
def async_stream() -> dict[str, Any]:
    async def run() -> dict[str, Any]:
        sdk = openai.AsyncOpenAI(base_url=BASE_URL, api_key=API_KEY, max_retries=0, timeout=TIMEOUT)
        stream = await sdk.chat.completions.create(
            model=TINY, messages=HELLO, max_tokens=6, temperature=0, stream=True, stream_options={"include_usage": True}, service_tier="priority",
        )
        chunks = [chunk.model_dump() async for chunk in stream]
        await sdk.close()
        return {"chunks": chunks}

    return asyncio.run(run())


if __name__ == "__main__":
    main()
