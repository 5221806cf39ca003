"""A request's life in the engine: `Pending` (a request waiting or running, with what the
runner prepared for it), its handle (`Ticket`, or a `concurrent.futures.Future`), and the sink
a streamed request's tokens go to (`TokenSink`)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any, Protocol

from schemas.chat import ChatCompletion, ChatCompletionRequest
from schemas.errors import ErrorCode, RequestError

logger = logging.getLogger(__name__)


_PENDING, _RUNNING, _CANCELLED, _NOTIFIED, _FINISHED = range(5)
#: A request's place by its service tier (`service_tier`), among requests of its kind.
URGENCY = {"priority": 0, "default": 1, "flex": 2}
#: Guards the state of every Ticket: a change is a few attribute writes, so one lock for all of
#: them costs less than the Condition a Future makes for itself.
_tickets_lock = threading.Lock()


class TokenSink(Protocol):
    """Where a streamed request's tokens go as they are generated (worker/service/publisher.py
    `RequestStream`): the engine thread calls `put` for each token, which must be quick."""

    #: Set by the sink's owner when the client went away: the engine ends the request's rows at
    #: their next token, and its answer is a `cancelled` error.
    cancelled: bool
    #: Set by `put` once a token went out: from then on the request cannot be generated again
    #: from the start.
    sent: bool

    def put(self, choice: int, token: int) -> None:
        """Take a token generated for one choice of the request."""


class Handle(Protocol):
    """What `submit` and `submit_many` return for a request: `concurrent.futures.Future` or
    `Ticket`."""

    def cancel(self) -> bool:
        """Cancel the request unless it has started; True if it is cancelled."""

    def cancelled(self) -> bool: ...

    def done(self) -> bool: ...


class Ticket:
    """A request queued with `Engine.submit_many`: the part of `concurrent.futures.Future` the
    engine and a chunk task use, at a fraction of its cost per request (a Future makes a
    Condition, and each callback and state change takes it: ~11 µs a line, and about a quarter
    of the time a worker's task threads held the GIL in a sampled end-to-end run).

    One callback, given at creation and called once, with the ticket, when it gets its outcome
    or is cancelled (in the thread that does so: usually the engine thread, so it must be
    quick). There is no blocking `result()`: the callback says when to call it.
    """

    __slots__ = ("_state", "_outcome", "_on_done")

    def __init__(self, on_done: Callable[[Ticket], None]) -> None:
        self._state = _PENDING
        self._outcome: ChatCompletion | BaseException | None = None
        self._on_done: Callable[[Ticket], None] | None = on_done

    def cancel(self) -> bool:
        """Cancel it unless its batch has started or it has its outcome; True if cancelled."""
        with _tickets_lock:
            if self._state in (_RUNNING, _FINISHED):
                return False
            if self._state != _PENDING:
                return True
            self._state = _CANCELLED
        self._done()
        return True

    def cancelled(self) -> bool:
        return self._state in (_CANCELLED, _NOTIFIED)

    def done(self) -> bool:
        return self._state in (_CANCELLED, _NOTIFIED, _FINISHED)

    def set_running_or_notify_cancel(self) -> bool:
        """As `Future`'s: False if it was cancelled (once), else it can no longer be cancelled."""
        with _tickets_lock:
            if self._state == _PENDING:
                self._state = _RUNNING
                return True
            if self._state == _CANCELLED:
                self._state = _NOTIFIED
                return False
        raise RuntimeError(f"ticket in unexpected state {self._state}")

    def set_result(self, result: ChatCompletion) -> None:
        self._finish(result)

    def set_exception(self, exception: BaseException) -> None:
        self._finish(exception)

    def result(self) -> ChatCompletion:
        """The completion, once done; raises the request's error, or CancelledError."""
        if self.cancelled():
            raise CancelledError()
        if self._state != _FINISHED:
            raise InvalidStateError("the ticket has no outcome yet: wait for its callback")
        if isinstance(self._outcome, BaseException):
            raise self._outcome
        return self._outcome  # type: ignore[return-value]

    def _finish(self, outcome: ChatCompletion | BaseException) -> None:
        with _tickets_lock:
            if self._state in (_CANCELLED, _NOTIFIED, _FINISHED):
                raise InvalidStateError(f"ticket in state {self._state} cannot take an outcome")
            self._outcome = outcome
            self._state = _FINISHED
        self._done()

    def _done(self) -> None:
        # Dropped once called: the callback usually holds the list its tickets go to, and this
        # reference would close a cycle that keeps every answer of the chunk alive until the
        # collector's next full pass (tens of MB per 20,000 lines), not just until the task ends.
        on_done, self._on_done = self._on_done, None
        try:
            on_done(self)  # type: ignore[misc]
        except Exception:  # as Future does: a failing callback must not stop the engine thread
            logger.exception("a ticket's callback failed")


@dataclass
class Pending:
    """A request waiting for the engine, with what the runner prepared for it."""

    request: ChatCompletionRequest
    request_id: str
    future: Future[ChatCompletion] | Ticket
    #: What the runner prepared (worker/engine/rows.py `Prepared` for the transformers runner).
    prepared: Any = None
    #: Rows this request occupies in a batch (its `n`).
    rows: int = 1
    #: Prompt tokens plus new tokens of one row; used to size batches.
    cost: int = 0
    enqueued_at: float = field(default_factory=time.monotonic)
    #: Run in a batch of its own (a suspect after a worker crash).
    alone: bool = False
    #: Called by the engine thread just before the request's batch runs; an error it returns
    #: answers the request instead of running it.
    on_start: Callable[[], RequestError | None] | None = None
    #: Someone waits on it (a single request): it goes ahead of batch-file lines.
    interactive: bool = False
    #: Admitting steps of a continuous batch that left it waiting while others went in.
    passed: int = 0
    #: Its place among the requests queued with it (a chunk's lines: 0, 1, 2, ...): batch lines
    #: of different chunks are admitted in turn, by place, not chunk after chunk.
    rank: int = 0
    #: When its batch took it in, and when its first token was chosen (monotonic seconds; 0:
    #: not yet, or not known in this schedule).
    started_at: float = 0.0
    first_token_at: float = 0.0
    #: A streamed request's sink: the runner hands it each generated token, and ends the
    #: request's rows at their next token once its `cancelled` is set (the client went away).
    stream: TokenSink | None = None

    @property
    def restartable(self) -> bool:
        """Whether it can be generated again from the start (nothing of it was streamed)."""
        return self.stream is None or not self.stream.sent

    def run_start_hook(self) -> RequestError | None:
        """Run its `on_start` hook, if it has one: its refusal, or an internal_error when the
        hook itself fails (it runs Redis commands, which may fail)."""
        if self.on_start is None:
            return None
        try:
            return self.on_start()
        except Exception as error:
            logger.exception("the start hook of %s failed", self.request_id)
            return RequestError(ErrorCode.internal_error, f"the worker could not start this request: {error}")

    def fail(self, error: RequestError) -> None:
        """Answer it with an error, unless it was cancelled meanwhile (then only its waiters
        are notified)."""
        try:
            self.future.set_exception(error)
        except InvalidStateError:
            self.live()

    def cancel(self) -> None:
        """Cancel it unless it has started (its waiters are notified)."""
        self.future.cancel()
        self.live()

    def live(self) -> bool:
        """False for a request cancelled while it was queued; its waiters are woken (a
        cancelled future counts as done for `concurrent.futures.wait` only once notified)."""
        if self.future.cancelled():
            try:
                self.future.set_running_or_notify_cancel()
            except RuntimeError:  # already notified
                pass
            return False
        return True


class JoinRefused(Exception):
    """Requests could not join a running batch (their prefill failed), and the batch is as it
    was: the engine tries them one at a time."""

