"""`/v1/chat/completions` and chatbatch's request records.

`POST /v1/chat/completions` waits for the answer, as OpenAI does, without holding a thread or a
Redis connection: the gateway's waiters share one subscription (gateway/waiters.py). With `X-Chatbatch-Async: true` it answers 202 at once
with the request record. When the gateway stops (SIGTERM), a waiting request answers 503 at
once; its work goes on in the fleet, and its result stays readable by id.

With `stream: true` it answers with server-sent events of chat.completion.chunk objects as
they are generated, ending with `data: [DONE]` (gateway/streams.py); a request refused before
the stream begins gets an ordinary JSON error, and an error after it began is sent as a
`data: {"error": ...}` event that ends the stream.

A client that disconnects, waiting or streaming, cancels its request — unless it sent an
`Idempotency-Key`: then the request goes on, and a repeat with the same key and body (the
client's retry) gets its answer, or follows its stream from the start, instead of running it
again (chatbatch/idempotency.py); a request that names a callback goes on too. A 504, and the
503 of a stopping gateway, say `x-should-retry: false` (unless the call has a key): the request
goes on, and a retry without a key would run it twice.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from chatbatch.callbacks import callback_state, check_url
from chatbatch.logs import set_log_ids
from chatbatch.requests import COMPLETED, FAILED, QUEUED
from gateway.bodies import RequestRecord
from gateway.errors import ApiError, from_request_error, not_found
from gateway.state import Gateway, gateway, owner
from schemas.errors import ErrorCode, RequestError
from schemas.job import CallbackState

router = APIRouter(prefix="/v1/chat", tags=["chat"])

ASYNC_HEADER = "X-Chatbatch-Async"
CALLBACK_HEADER = "X-Chatbatch-Callback-Url"
#: Names the request in every answer of `POST /v1/chat/completions`, errors included.
REQUEST_ID_HEADER = "X-Chatbatch-Request-Id"
#: Names the caller's intent: a repeat gets the first call's answer (chatbatch/idempotency.py).
IDEMPOTENCY_HEADER = "Idempotency-Key"
#: Status of an answer nobody reads: the client closed the connection first (as nginx logs it).
CLIENT_CLOSED = 499


def _record(state: Gateway, request_id: str) -> RequestRecord:
    requests = state.client.requests
    fields = requests.get(request_id)
    result = requests.result(request_id)
    state_ = callback_state(fields)
    record = RequestRecord(
        id=request_id, created_at=int(fields.get("created_at", 0)), status=QUEUED,
        callback=CallbackState.model_validate(state_) if state_ else None,
    )
    if result is None:
        queue = fields.get("queue")
        record.waiting = state.client.waiting_notice([queue]) if queue else None
    elif "error" in result:
        record.status, record.error = FAILED, result["error"]
    else:
        record.status, record.result = COMPLETED, result
    return record


def _owned(state: Gateway, request_id: str, who: str) -> None:
    set_log_ids(request_id=request_id)
    if state.client.requests.owner(request_id) != who:
        raise not_found("chat completion", request_id)


@router.post("/completions")
async def create_completion(
    body: dict[str, Any],
    request: Request,
    state: Gateway = Depends(gateway),
    who: str = Depends(owner),
    asynchronous: str | None = Header(default=None, alias=ASYNC_HEADER),
    callback: str | None = Header(default=None, alias=CALLBACK_HEADER),
    idempotency_key: str | None = Header(default=None, alias=IDEMPOTENCY_HEADER),
) -> Response:
    # The request's id is minted by `submit` once the body passed validation (a refused body
    # names no request); with a repeated idempotency key it is the first call's.
    try:
        url = check_url(callback, state.settings.callback_secret, option=CALLBACK_HEADER)
        handle = await run_in_threadpool(state.client.submit, body, callback_url=url, owner=who, idempotency_key=idempotency_key)
    except RequestError as error:
        refused = from_request_error(error)
        raise ApiError(refused.status, refused.message, kind=refused.kind, code=refused.code, param=refused.param) from None
    # Any other ChatbatchError (a bad callback URL, an idempotency key) is answered by the app's
    # handler (gateway/errors.py): 400, or 422 for a key sent with another body.
    request_id = handle.id
    set_log_ids(request_id=request_id)
    headers = {REQUEST_ID_HEADER: request_id}
    # A client that leaves cancels its request, unless someone else still wants the answer: its
    # retry (an idempotency key) or its callback.
    cancels = idempotency_key is None and url is None
    if asynchronous and asynchronous.lower() in ("1", "true", "yes"):
        record = await run_in_threadpool(_record, state, request_id)
        return JSONResponse(status_code=202, content=record.model_dump(), headers=headers)
    if body.get("stream") is True:  # (submit accepted it: a valid streamed request)
        return _stream(state, request_id, body, headers, cancels=cancels)
    return await _wait(state, request, request_id, headers, cancels=cancels, keyed=idempotency_key is not None)


async def _client_gone(request: Request) -> None:
    """Returns when the client closes its connection (the body was read: the server's next
    message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _wait(state: Gateway, request: Request, request_id: str, headers: dict[str, str], *, cancels: bool, keyed: bool) -> Response:
    """The answer of a waited-for request; a client gone first cancels it when `cancels`. A
    503 or 504 whose request goes on tells the SDKs not to retry it, unless the retry carries
    the same idempotency key (`keyed`), which finds the same request."""
    no_retry = {} if keyed else {"x-should-retry": "false"}
    if state.waiters is None:
        raise RuntimeError("the gateway's lifespan has not started")
    waiter = asyncio.ensure_future(state.waiters.wait(request_id, state.settings.gateway_timeout))
    stopper = asyncio.ensure_future(state.stopping.wait())
    gone = asyncio.ensure_future(_client_gone(request))
    try:
        done, _ = await asyncio.wait({waiter, stopper, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (stopper, gone, waiter):
            if not task.done():
                task.cancel()
    if waiter not in done and gone in done:
        if cancels:
            await run_in_threadpool(state.client.requests.disconnect, request_id)
        return Response(status_code=CLIENT_CLOSED, headers=headers)
    if waiter not in done:
        raise ApiError(
            503,
            f"the gateway is stopping; request {request_id} goes on: read it at /v1/chat/completions/{request_id}",
            kind="server_error", code="gateway_stopping", headers={**headers, **no_retry},
        )
    result = waiter.result()
    if result is None:
        raise ApiError(
            504, f"no answer within {state.settings.gateway_timeout:.0f}s; poll /v1/chat/completions/{request_id}",
            kind="server_error", code="timeout", headers={**headers, **no_retry},
        )
    if "error" in result:
        failed = from_request_error(RequestError(ErrorCode(result["error"]["code"]), result["error"]["message"]))
        raise ApiError(failed.status, failed.message, kind=failed.kind, code=failed.code, headers=headers)
    return JSONResponse(content=result, headers=headers)


def _stream(state: Gateway, request_id: str, body: dict[str, Any], headers: dict[str, str], *, cancels: bool) -> StreamingResponse:
    if state.streams is None:
        raise RuntimeError("the gateway's lifespan has not started")
    options = body.get("stream_options") or {}
    events = state.streams.events(
        request_id, usage=bool(options.get("include_usage")), timeout=state.settings.gateway_timeout, stopping=state.stopping,
        cancels=cancels,
    )
    # No caching and no buffering by proxies (nginx reads X-Accel-Buffering): chunks pass as sent.
    sse_headers = {**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events, media_type="text/event-stream", headers=sse_headers)


@router.get("/requests/{request_id}", response_model=RequestRecord)
def get_request(request_id: str, state: Gateway = Depends(gateway), who: str = Depends(owner)) -> RequestRecord:
    _owned(state, request_id, who)
    return _record(state, request_id)


@router.get("/completions/{request_id}")
def get_completion(request_id: str, state: Gateway = Depends(gateway), who: str = Depends(owner)) -> Any:
    _owned(state, request_id, who)
    record = _record(state, request_id)
    if record.status == QUEUED:
        return JSONResponse(status_code=202, content=record.model_dump())
    if record.status == FAILED and record.error is not None:
        error = from_request_error(RequestError(ErrorCode(record.error["code"]), record.error["message"]))
        raise ApiError(error.status, error.message, kind=error.kind, code=error.code)
    return record.result
