"""Headers every answer of the HTTP API carries, as OpenAI's do.

- `x-request-id`: names the HTTP request (the SDKs read it: the `openai` package's
  `_request_id`, its errors' `request_id`). On `POST /v1/chat/completions` it is the chat
  request's own id, the one `X-Chatbatch-Request-Id` names and that it is read back by; on
  every other answer a new `req_...` id (a 5xx answer's is logged, to find it from a report;
  an unexpected failure's 500 is answered outside the middleware, and gateway/errors.py names
  it).
- `openai-processing-ms`: milliseconds from the request's arrival to the start of its answer
  (a stream's: to its first bytes, not its end).
- `Retry-After` on 503 and 429, where the route gave none: seconds before a retry is worth it.
  The SDKs honour it between their retries.
"""

from __future__ import annotations

import logging
import time

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatbatch.ids import new_id

logger = logging.getLogger(__name__)

REQUEST_ID = "x-request-id"
PROCESSING_MS = "openai-processing-ms"
RETRY_AFTER = "retry-after"
#: The chat request id header that `x-request-id` repeats (gateway/routers/chat.py).
CHAT_REQUEST_ID = "x-chatbatch-request-id"
#: Seconds a client waits before retrying a 503 (a gateway stopping: another one answers) or a
#: 429, unless the route said otherwise.
RETRY_SECONDS = 1


class ResponseHeaders:
    """ASGI middleware adding the headers above to every HTTP answer (streams too: the headers
    go with the answer's start; the body passes through untouched)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                request_id = headers.get(CHAT_REQUEST_ID) or new_id("req_")
                headers[REQUEST_ID] = request_id
                headers[PROCESSING_MS] = str(int((time.monotonic() - started) * 1000))
                status = int(message["status"])
                if status in (429, 503) and RETRY_AFTER not in headers:
                    headers[RETRY_AFTER] = str(RETRY_SECONDS)
                if status >= 500:
                    logger.info("%s %s answered %d (x-request-id %s)", scope.get("method"), scope.get("path"), status, request_id)
            await send(message)

        await self.app(scope, receive, sending)
