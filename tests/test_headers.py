"""The headers every answer of the HTTP API carries (gateway/headers.py): x-request-id (a chat
request's own id where it has one), openai-processing-ms, and Retry-After on 503 and 429."""

from __future__ import annotations

import asyncio
import time

from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.testclient import TestClient

from gateway.headers import ResponseHeaders


def _app() -> FastAPI:
    app = FastAPI()

    @app.get("/chat")
    def chat() -> JSONResponse:
        return JSONResponse({"ok": True}, headers={"X-Chatbatch-Request-Id": "chatcmpl-42"})

    @app.get("/slow")
    async def slow() -> dict[str, bool]:
        await asyncio.sleep(0.05)
        return {"ok": True}

    @app.get("/stopping")
    def stopping() -> JSONResponse:
        return JSONResponse({"error": {}}, status_code=503)

    @app.get("/busy")
    def busy() -> JSONResponse:
        return JSONResponse({"error": {}}, status_code=429, headers={"Retry-After": "7"})

    @app.get("/stream")
    def stream() -> StreamingResponse:
        def events():  # type: ignore[no-untyped-def]
            yield b"data: 1\n\n"
            time.sleep(1.0)
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"X-Chatbatch-Request-Id": "chatcmpl-7"})

    app.add_middleware(ResponseHeaders)
    return app


def test_every_answer_names_itself_and_its_time() -> None:
    api = TestClient(_app())
    chat = api.get("/chat")
    assert chat.headers["x-request-id"] == "chatcmpl-42" and chat.headers["openai-processing-ms"].isdigit()
    first, second = api.get("/slow"), api.get("/slow")
    assert first.headers["x-request-id"].startswith("req_") and first.headers["x-request-id"] != second.headers["x-request-id"]
    assert int(first.headers["openai-processing-ms"]) >= 50
    missing = api.get("/no-such-route")
    assert missing.status_code == 404 and missing.headers["x-request-id"].startswith("req_")
    assert "retry-after" not in missing.headers and "retry-after" not in chat.headers


def test_a_stream_gets_its_headers_with_its_start() -> None:
    with TestClient(_app()).stream("GET", "/stream") as answer:
        assert answer.headers["x-request-id"] == "chatcmpl-7"
        # Measured to the answer's start, not its end.
        assert int(answer.headers["openai-processing-ms"]) < 1000
        assert b"".join(answer.iter_bytes()) == b"data: 1\n\ndata: [DONE]\n\n"


def test_retry_after_on_503_and_429_unless_the_route_set_one() -> None:
    api = TestClient(_app())
    assert api.get("/stopping").headers["retry-after"] == "1"
    assert api.get("/busy").headers["retry-after"] == "7"


def test_an_unexpected_failure_names_itself_too() -> None:
    from gateway import errors

    app = _app()
    errors.install(app)

    @app.get("/broken")
    def broken() -> None:
        raise RuntimeError("boom")

    failed = TestClient(app, raise_server_exceptions=False).get("/broken")
    assert failed.status_code == 500 and failed.json()["error"]["code"] == "internal_error"
    assert failed.headers["x-request-id"].startswith("req_")
