"""Request bodies counted before anything parses them (ASGI middleware, for every route).

A body whose `Content-Length` is over its route's limit is answered 413 without a byte of it
read; any other body is counted as it arrives and cut off with 413 the moment it passes the
limit, so neither a huge JSON body (parsed whole by FastAPI) nor a chunked upload of unknown
length can fill the gateway's memory or disk. The limit is CHATBATCH_MAX_LINE_BYTES (one
request), and for `POST /v1/files` CHATBATCH_MAX_FILE_BYTES plus room for the multipart
framing (the file's own bytes are counted again, exactly, as they are written:
gateway/uploads.py).
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import error_response

#: Bytes of multipart framing (boundaries, part headers, the purpose field) allowed on top of
#: the file size limit.
MULTIPART_ROOM = 64 * 1024


class BodyTooLarge(HTTPException):
    """A request body passed its route's limit (an HTTPException, so that FastAPI's body
    reading passes it on rather than calling the body unparseable)."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            status_code=413,
            detail=f"the request body is over the limit of {limit:,} bytes for this route: send less "
            "(the limits are CHATBATCH_MAX_LINE_BYTES per request, CHATBATCH_MAX_FILE_BYTES per file)",
        )


class BodyLimit:
    """ASGI middleware: each request body cut off at `limit` bytes, or at the limit given for
    its (method, path) in `routes`."""

    def __init__(self, app: ASGIApp, *, limit: int, routes: dict[tuple[str, str], int]) -> None:
        self.app = app
        self.limit = limit
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.routes.get((scope["method"], scope["path"].rstrip("/")), self.limit)
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _refuse(BodyTooLarge(limit), scope, receive, send)
            return
        received = 0
        started = False

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def sending(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, sending)
        except BodyTooLarge as error:  # (FastAPI's handlers answer it first where they see it)
            if started:
                raise
            await _refuse(error, scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _refuse(error: BodyTooLarge, scope: Scope, receive: Receive, send: Send) -> None:
    # The connection is closed after the answer: the rest of the body is never read.
    response = error_response(413, str(error.detail), "invalid_request_error", "request_too_large", headers={"Connection": "close"})
    await response(scope, receive, send)
