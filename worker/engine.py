"""The batching engine: one thread owns the model and runs the requests of many tasks together.

Celery task threads call `Engine.submit()` and wait on the returned future, or hand a chunk's
lines to `Engine.submit_many()` and take the answers as a callback delivers them. The engine
thread collects pending requests until `max_batch_size` sequences or the `batch_wait` deadline,
groups them by prompt length (length bucketing keeps padding low), and hands each group to the
runner as one batched generation. A request's error resolves only its own future.

A request that breaks fails alone, whatever the reason: preparing many at once falls back to
one at a time when it raises; a batch that fails as a whole runs again in halves, down to the
one request that fails alone (a streamed request that has sent tokens cannot start again: it
fails with its batch); requests whose prefill fails as they join a running batch join one at a
time; and a running batch that fails is dropped, its requests run again apart.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import CancelledError, Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any, Protocol

from schemas.chat import ChatCompletion, ChatCompletionRequest
from schemas.errors import ErrorCode, RequestError

logger = logging.getLogger(__name__)


_PENDING, _RUNNING, _CANCELLED, _NOTIFIED, _FINISHED = range(5)
#: A request's place by its service tier (`service_tier`), among requests of its kind.
_URGENCY = {"priority": 0, "default": 1, "flex": 2}
#: Guards the state of every Ticket: a change is a few attribute writes, so one lock for all of
#: them costs less than the Condition a Future makes for itself.
_tickets_lock = threading.Lock()


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
    #: A streamed request's sink (worker/publisher.py RequestStream): the runner hands it each
    #: generated token (`put(choice, token)`, which sets its `sent`), and ends the request's
    #: rows at their next token once its `cancelled` is set (the client went away).
    stream: Any = None

    @property
    def restartable(self) -> bool:
        """Whether it can be generated again from the start (nothing of it was streamed)."""
        return self.stream is None or not self.stream.sent


class JoinRefused(Exception):
    """Requests could not join a running batch (their prefill failed), and the batch is as it
    was: the engine tries them one at a time."""


class _Figures:
    """Occupancy over the steps of a continuous batch (a step of the slot layout is up to
    SYNC_EVERY device steps, counted once); written by the engine thread only."""

    def __init__(self) -> None:
        self.steps_waiting = 0
        self.occupancy_waiting = 0.0
        #: All steps, and their share of rows in use summed.
        self.steps = 0
        self.occupancy = 0.0
        #: The same at the last step that admitted requests: the steps after it only drain the
        #: batch (no work was left to give it), so "while work came" ends there.
        self.steps_fed = 0
        self.occupancy_fed = 0.0
        #: Requests in the engine's backlog (taken from the queue, not admitted yet).
        self.backlog = 0

    def step(self, rows: int, most: int, *, waiting: bool, admitted: bool) -> None:
        if rows:  # (a batch with no rows runs no step)
            self.steps += 1
            self.occupancy += rows / most
        if waiting:
            self.steps_waiting += 1
            self.occupancy_waiting += rows / most
        if admitted:
            self.steps_fed, self.occupancy_fed = self.steps, self.occupancy

    def mean_occupancy(self) -> float:
        """Mean share of rows in use over the steps at which requests were waiting."""
        return self.occupancy_waiting / self.steps_waiting if self.steps_waiting else 0.0

    def mean_occupancy_fed(self) -> float:
        """Mean share of rows in use over every step up to the last that admitted requests,
        whether requests waited or not (a batch starved of work between two admissions
        counts, its drain at the end does not)."""
        return self.occupancy_fed / self.steps_fed if self.steps_fed else 0.0


class Runner(Protocol):
    """Model-specific hooks: set up once per process, then prepare and run batches."""

    #: The name the worker serves, reported as `model` in every completion.
    served_name: str
    #: Whether `run_batch` benefits from many requests at once.
    batched: bool

    def prepare_many(self, items: list[Pending]) -> list[RequestError | None]:
        """Tokenize and check requests (set each one's `prepared`, `rows` and `cost`); one
        error, or None, per item, in order."""

    def run_batch(self, items: list[Pending]) -> list[ChatCompletion | RequestError]:
        """Generate for all items; one result or error per item, in order."""

    # A runner that can batch continuously also has `continuous()`: a running batch that
    # requests join and leave at every step (see worker/continuous.py), or None where its
    # current mode batches per request only.


class Engine:
    """Collects requests from many threads into batches for one runner.

    Args:
        runner: the model runner; only the engine thread calls it.
        max_batch_size: most sequences (requests times n) per batch.
        max_batch_tokens: most padded prompt-plus-new tokens per batch (in the continuous
            schedule: most prompt-plus-max_tokens tokens of the rows in flight).
        batch_wait: seconds to wait for more requests before running a partial batch; 0 runs
            whatever is pending at once.
        schedule: `continuous` (requests join the running batch at every step, where the runner
            can) or `request` (a group of requests runs until the group is done).
        max_prefill_tokens: most prompt tokens computed per step when requests join a
            continuous batch.
    """

    def __init__(
        self,
        runner: Runner,
        *,
        max_batch_size: int = 32,
        max_batch_tokens: int = 65_536,
        batch_wait: float = 0.02,
        schedule: str = "continuous",
        max_prefill_tokens: int = 2_048,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be at least 1, got {max_batch_tokens}")
        if batch_wait < 0:
            raise ValueError(f"batch_wait must not be negative, got {batch_wait}")
        if schedule not in ("continuous", "request"):
            raise ValueError(f"schedule must be continuous or request, got {schedule!r}")
        if max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be at least 1, got {max_prefill_tokens}")
        self.runner = runner
        self.max_batch_size = max_batch_size if runner.batched else 1
        self.max_batch_tokens = max_batch_tokens
        self.batch_wait = batch_wait
        self.max_prefill_tokens = max_prefill_tokens
        #: The running batch, when this engine schedules continuously (only the engine thread
        #: changes it).
        make = getattr(runner, "continuous", None)
        self.running: Any = make(self.max_batch_size, max_batch_tokens) if schedule == "continuous" and make is not None else None
        #: The schedule in effect: `continuous` only where the runner can take rows in.
        self.schedule = "continuous" if self.running is not None else "request"
        if schedule != self.schedule:
            logger.info("this model and decode mode batch per request: the continuous schedule does not apply")
        # Requests looked at when choosing a batch: enough for length bucketing to find
        # similar lengths, few enough that choosing stays cheap.
        self._backlog_rows = 4 * self.max_batch_size
        # Requests waiting for the engine thread, a group per `submit_many` (a chunk's lines),
        # taken from the groups in turn, so that a small job's chunk does not wait behind a
        # large one's (docs/scheduling.md); a group [None] wakes the thread (to stop, or to
        # drain). One lock for many requests at a time: a chunk's lines go in, and a batch's
        # worth comes out, in one acquisition each.
        self._waiting: deque[deque[Pending | None]] = deque()
        #: Single requests (someone waits on each): taken before `_waiting`.
        self._waiting_now: deque[Pending] = deque()
        self._arrived = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._draining = threading.Event()
        #: Set when the engine thread ended on an error of its own (not a request's): the
        #: worker must stop saying it serves (worker/main.py exits, so its tasks come back).
        self.died = threading.Event()
        #: What ended the engine thread, once `died` is set.
        self.failure: BaseException | None = None
        self.stats: dict[str, float] = {
            "requests": 0,
            "batches": 0,
            "generated_tokens": 0,
            "largest_batch": 0,
            # Seconds the engine spent running batches: compared with wall time, how busy the
            # device was kept.
            "busy_seconds": 0.0,
            # Streamed requests ended because their client went away (rows freed, or never run).
            "cancelled": 0,
        }
        self._figures = _Figures()
        #: Steps batch lines have waited for rows to free up (`_holds`).
        self._held = 0
        #: Called in the engine thread with each request that ran or was refused, and its answer
        #: or error (the worker's metrics, worker/metrics.py); it must be quick.
        self.observer: Callable[[Pending, ChatCompletion | RequestError], None] | None = None
        #: The worker's set-up as a digest (worker/model.py `fingerprint`), put in every answer
        #: as `system_fingerprint`.
        self.fingerprint: str | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="chatbatch-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        self._put([None])
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def drain(self) -> None:
        """Start no more batches: every request not running yet is cancelled, now and as it
        arrives, so its task can hand it back to the queue; the batch running now finishes.

        Called when the worker is told to stop (SIGTERM); safe to call from a signal handler.
        """
        self._draining.set()
        self._put([None])

    @property
    def draining(self) -> bool:
        return self._draining.is_set()

    def submit(
        self,
        request: ChatCompletionRequest,
        request_id: str,
        *,
        alone: bool = False,
        on_start: Callable[[], RequestError | None] | None = None,
        stream: Any = None,
    ) -> Future[ChatCompletion]:
        """Queue one request; the future holds its ChatCompletion or raises RequestError.

        `alone` runs it in a batch of its own; `on_start` runs in the engine thread right
        before its batch does; `stream` is a streamed request's sink (see `Pending.stream`).
        A request of the `flex` tier waits as batch lines do, behind the other single requests.

        The engine thread prepares it (chat template, tokenization, context check) when it
        takes it from the queue: preparing in many task threads at once would interleave with
        the decode loop under the GIL and slow every batch down.
        """
        future: Future[ChatCompletion] = Future()
        interactive = request.tier != "flex"
        self._enqueue([Pending(request=request, request_id=request_id, future=future, alone=alone, on_start=on_start, interactive=interactive, stream=stream)])
        return future

    def submit_many(
        self, requests: list[tuple[ChatCompletionRequest, str]], on_done: Callable[[Ticket], None]
    ) -> list[Ticket]:
        """Queue (request, request_id) pairs at once, for a task that takes their answers as
        they come: one Ticket each, in order, and `on_done(ticket)` once each has its outcome
        or is cancelled (see Ticket; it may be called before this returns)."""
        tickets = [Ticket(on_done) for _ in requests]
        self._enqueue(
            [
                Pending(request=request, request_id=request_id, future=ticket, rank=rank)
                for rank, ((request, request_id), ticket) in enumerate(zip(requests, tickets))
            ]
        )
        return tickets

    def _enqueue(self, items: list[Pending]) -> None:
        if self._draining.is_set():
            self._cancel(items)
        elif self.died.is_set():
            dead = RequestError(ErrorCode.internal_error, "the worker's engine stopped on an error")
            for item in items:
                self._fail(item, dead)
        elif self._stopping.is_set():
            shutting_down = RequestError(ErrorCode.internal_error, "the worker is shutting down")
            for item in items:
                self._fail(item, shutting_down)
        else:
            self._put(items)

    def _put(self, items: Iterable[Pending | None]) -> None:
        with self._arrived:
            group: deque[Pending | None] = deque()
            for item in items:
                if item is not None and item.interactive:
                    self._waiting_now.append(item)
                elif item is None:
                    self._waiting.append(deque([None]))
                else:
                    group.append(item)
            if group:
                self._waiting.append(group)
            self._arrived.notify()

    def _take(self, limit: int, timeout: float | None, *, singles: int = 0) -> list[Pending | None]:
        """Up to `singles` waiting single requests, then up to `limit` items in all (more
        when the singles alone pass it), after waiting up to `timeout` seconds (None: for
        ever) for the first."""
        with self._arrived:
            if not self._waiting and not self._waiting_now and timeout != 0:
                self._arrived.wait_for(lambda: self._waiting or self._waiting_now, timeout)
            taken: list[Pending | None] = []
            while self._waiting_now and len(taken) < max(limit, singles):
                taken.append(self._waiting_now.popleft())
            groups = self._waiting
            while groups and len(taken) < limit:
                # One from each group in turn.
                taken.append(groups[0].popleft())
                if groups[0]:
                    groups.rotate(-1)
                else:
                    groups.popleft()
            return taken

    def _prepare(self, items: list[Pending], backlog: list[Pending]) -> int:
        """Prepare requests in the engine thread, all at once (the tokenizer encodes them as
        one batch); good ones join the backlog, bad ones are answered at once. Returns the rows
        added."""
        errors = self._prepare_each(items)
        rows = 0
        for item, error in zip(items, errors):
            if error is None:
                backlog.append(item)
                rows += item.rows
            else:
                self._observe(item, error)
                self._fail(item, error)
        return rows

    def _prepare_each(self, items: list[Pending]) -> list[RequestError | None]:
        """The runner's `prepare_many`; when it raises, each request is prepared alone, so
        that only a request that fails alone fails (with internal_error), not its neighbours."""
        try:
            return self.runner.prepare_many(items)
        except Exception as failure:
            if len(items) == 1:
                logger.exception("preparing request %s failed", items[0].request_id)
                return [RequestError(ErrorCode.internal_error, f"could not prepare the request: {failure}")]
            logger.warning("preparing %d requests together failed (%s): preparing each alone", len(items), failure)
        return [error for item in items for error in self._prepare_each([item])]

    @classmethod
    def _fail(cls, item: Pending, error: RequestError) -> None:
        """Answer a request with an error, unless it was cancelled meanwhile (then only its
        waiters are notified)."""
        try:
            item.future.set_exception(error)
        except InvalidStateError:
            cls._live(item)

    # The engine thread.

    def _loop(self) -> None:
        """The engine thread. An error of one request fails that request (see `_run`,
        `_prepare`); an error of the engine's own ends the thread with `died` set, leaving the
        requests it held unanswered: the worker exits and their tasks are delivered again."""
        try:
            self._serve()
        except BaseException as error:  # the thread must not end silently, whatever ended it
            self.failure = error
            logger.critical("the engine thread stopped on an error: this worker can no longer serve", exc_info=True)
            self.died.set()

    def _serve(self) -> None:
        backlog: list[Pending] = []
        while not self._stopping.is_set():
            if self._draining.is_set():
                self._cancel(backlog)
                backlog = []
            if self.running is not None:
                self._collect(backlog, wait=not self.running)
                self._continue(backlog)
                continue
            self._collect(backlog)
            if not backlog:
                continue
            batch, backlog = self._choose_batch(backlog)
            self._run(batch)
        if self.running is not None and (self.running.requests or len(self.running)):
            self._answer(self.running.abandon(RequestError(ErrorCode.internal_error, "the worker stopped before this request finished")))
        # Everything not run gets an answer, what is still queued too: a task waiting on it
        # must not wait for ever (a request cancelled meanwhile keeps its cancellation).
        with self._arrived:
            queued = [item for item in [*self._waiting_now, *(item for group in self._waiting for item in group)] if item is not None]
            self._waiting_now.clear()
            self._waiting.clear()
        stopped = RequestError(ErrorCode.internal_error, "the worker stopped before this request ran")
        for item in [*backlog, *queued]:
            self._fail(item, stopped)

    def _collect(self, backlog: list[Pending], *, wait: bool = True) -> None:
        """Take waiting requests: with an empty backlog, wait for the first; then wait up to
        batch_wait for a full batch. What arrives is prepared together. With `wait` False (a
        continuous batch is running), take only what is there.

        The backlog holds at most a few batches' worth: the rest stays queued, so choosing a
        batch costs the same however many requests wait. Single requests have as much room
        again of their own, so a backlog full of batch lines still takes them.
        """
        rows = sum(item.rows for item in backlog)
        # Single requests have room of their own: a backlog full of batch lines still takes them.
        singles = self._backlog_rows - sum(1 for item in backlog if item.interactive)
        deadline: float | None = None
        while rows < self._backlog_rows or (self._waiting_now and singles > 0):
            timeout: float | None
            if not wait:
                timeout = 0.0
            elif not backlog:
                timeout = None
            elif rows >= self.max_batch_size:
                timeout = 0.0
            else:
                if deadline is None:
                    deadline = time.monotonic() + self.batch_wait
                timeout = max(0.0, deadline - time.monotonic())
            taken = self._take(self._backlog_rows - rows, timeout, singles=singles)
            if not taken:
                return
            fresh = [item for item in taken if item is not None and self._live(item)]
            singles -= sum(1 for item in fresh if item.interactive)
            if fresh:
                rows += self._prepare(fresh, backlog)
            if None in taken:
                if not self._draining.is_set() or self._stopping.is_set():
                    self._stopping.set()
                return
            if timeout == 0.0:
                return  # a full batch is here, and everything that was waiting was taken

    # The continuous schedule.

    def _continue(self, backlog: list[Pending]) -> None:
        """One step of the running batch: admit what fits, then decode one token for every
        row; answer the requests that finished. A request that fits no slot of the batch runs
        per request, alone, once the batch has emptied."""
        running = self.running
        started = time.monotonic()
        admitted, alone = self._admissions(backlog) if not self._stopping.is_set() else ([], [])
        if admitted or alone:
            taken = {id(item) for item in [*admitted, *alone]}
            backlog[:] = [item for item in backlog if id(item) not in taken]
        if alone:
            self._run(alone)
        admitted = self._begin(admitted)
        self._figures.backlog = len(backlog)
        try:
            if admitted:
                admitted = self._join(admitted)
                self.stats["batches"] += 1
                self.stats["largest_batch"] = max(self.stats["largest_batch"], len(running))
            occupied = len(running)
            self._figures.step(occupied, self._most_rows(), waiting=bool(backlog or self._waiting or self._waiting_now), admitted=bool(admitted))
            answers = running.step() if occupied else []
            # The step chose the first token of the rows that joined it.
            chosen = time.monotonic()
            for item in admitted:
                item.first_token_at = chosen
        except Exception as error:  # the batch failed as a whole: its requests run again apart
            answers = self._after_failure(error, admitted)
        self._answer(answers)
        self.stats["busy_seconds"] = round(self.stats["busy_seconds"] + time.monotonic() - started, 3)

    def _join(self, items: list[Pending]) -> list[Pending]:
        """Admit requests into the running batch; when their prefill fails (the batch is as it
        was), each tries alone, and one that fails alone is answered with internal_error.
        Returns those admitted."""
        try:
            self.running.admit(items)
            return items
        except JoinRefused as refused:
            if len(items) == 1:
                logger.warning("request %s could not join the running batch: %s", items[0].request_id, refused.__cause__ or refused)
                self._answer([(items[0], RequestError(ErrorCode.internal_error, f"the request could not start: {refused}"))])
                return []
            logger.warning("%d requests could not join the running batch together (%s): each tries alone", len(items), refused)
        return [item for one in items for item in self._join([one])]

    def _after_failure(self, error: Exception, admitted: list[Pending]) -> list[tuple[Pending, ChatCompletion | RequestError]]:
        """The running batch failed as a whole (its model, or a step no row can be blamed for):
        it is dropped; the answers it had settled stand, and the requests it held run again
        apart (`_isolate`), so that only a request that fails alone fails."""
        running = self.running
        logger.exception("the running batch of %d requests failed: running them again apart", len(running.requests))
        failure = RequestError(ErrorCode.internal_error, f"generation failed: {error}")
        held = running.abandon(failure)
        answers = [(item, result) for item, result in held if result is not failure]
        failed = [item for item, result in held if result is failure]
        # Requests admitted this step that the batch had not taken in yet run again too.
        seen = {id(item) for item, _ in held}
        failed += [item for item in admitted if id(item) not in seen]
        return answers + list(zip(failed, self._isolate(failed, failure)))

    def _admissions(self, backlog: list[Pending]) -> tuple[list[Pending], list[Pending]]:
        """The waiting requests to admit now, in `_order`. Admission stops at the first
        request that does not fit the rows or KV tokens left, so a large request is not passed
        for ever (a batch line that does not fit the cache's shape now is passed, up to
        `max_batch_size` steps that admitted others); prompt tokens to compute are bounded per
        step (a prompt over the bound is admitted alone); of waiting prompts that share a
        first block nobody has computed yet, one goes first and the others follow once its
        blocks are cached; and batch lines may wait a few steps for more free rows (`_holds`).

        A request the batch cannot take (a suspect to run alone, or one no slot can hold) runs
        per request once the batch is empty: the others go on beside the batch until it has
        waited `max_batch_size` admitting steps, then nothing is admitted until the batch has
        emptied. Returns the requests to admit, and those to run per request now."""
        running = self.running
        rows = len(running)
        if not backlog or rows >= self._most_rows() or any(item.alone for item in running.requests):
            self._held = 0
            return [], []
        apart = [item for item in backlog if item.alone or not running.fits_ever(item)]
        if apart and not rows:
            return [], self._apart_batch(apart)
        if any(item.passed >= self.max_batch_size for item in apart):
            return [], []  # the batch drains for them
        if self._holds([item for item in backlog if not (item.alone or not running.fits_ever(item))], rows):
            return [], []
        cached = {id(item): running.cached_prefix(item) for item in backlog}
        order = self._order([item for item in backlog if not (item.alone or not running.fits_ever(item))], cached)
        chosen: list[Pending] = []
        prefill = 0
        tokens = sum(item.rows * item.cost for item in running.requests)
        first_blocks: set[bytes] = set()
        for item in order:
            verdict = self._admissible(item, chosen, (rows, tokens, prefill), cached[id(item)])
            if verdict == "stop":
                break
            block = running.first_block(item) if verdict == "admit" and not cached[id(item)] else None
            if verdict == "skip" or (block is not None and block in first_blocks):
                continue
            if block is not None:
                first_blocks.add(block)
            chosen.append(item)
            rows += item.rows
            tokens += item.rows * item.cost
            prefill += self._to_compute(item, cached[id(item)])
        self._count_passed([*order, *apart], chosen)
        return chosen, []

    def _holds(self, joinable: list[Pending], rows: int) -> bool:
        """Whether the waiting requests that can join wait, this step, for more rows of the
        running batch to free up.

        Each join prefills in a forward pass of its own, which costs about as much as a decode
        step of the whole batch however few rows it brings; a free row left for a step costs
        one row of that step. So requests join once an eighth of the rows is free (or all that
        wait fit), or after the decode's `hold_steps` steps, as TGI's router does with its
        waiting-served ratio. Single requests wait too: with every row busy they arrive about
        one per freed row, and joining each alone would add a prefill pass per request to the
        decode of every line beside them (a wait of at most `hold_steps` steps)."""
        most = getattr(self.running, "hold_steps", 0)
        if not rows or not most or not joinable:
            self._held = 0
            return False
        wanted = min(max(1, self._most_rows() // 8), sum(item.rows for item in joinable))
        if self._most_rows() - rows >= wanted or self._held >= most:
            self._held = 0
            return False
        self._held += 1
        return True

    def _apart_batch(self, apart: list[Pending]) -> list[Pending]:
        """What runs per request now: the oldest suspect alone, else the requests no slot can
        hold, together as one per-request batch (`_choose_batch`)."""
        suspects = [item for item in apart if item.alone]
        if suspects:
            return [min(suspects, key=lambda item: item.enqueued_at)]
        batch, _ = self._choose_batch(apart)
        return batch

    def _order(self, backlog: list[Pending], cached: dict[int, int]) -> list[Pending]:
        """Single requests first; among single requests and among batch lines, by service tier
        (`priority`, then `default`, then `flex`); then batch lines whose prompt prefix is
        cached (a line passed over `max_batch_size` times goes first all the same); then by
        place in their chunk, so that chunks go in turn (a chunk that came later does not wait
        for the whole of an earlier one); then the oldest."""
        return sorted(
            backlog,
            key=lambda item: (
                not item.interactive,
                _URGENCY[item.request.tier],
                not (cached[id(item)] or item.passed >= self.max_batch_size),
                item.rank,
                item.enqueued_at,
            ),
        )

    @staticmethod
    def _to_compute(item: Pending, cached: int) -> int:
        """Prompt tokens a request's prefill computes."""
        return item.rows * (len(item.prepared.prompt_ids) - cached)

    def _admissible(self, item: Pending, chosen: list[Pending], taken: tuple[int, int, int], cached: int) -> str:
        """`admit`, `skip` (it waits; later ones may go) or `stop` (nothing more this step),
        given the rows, tokens and prompt tokens to compute already `taken`."""
        running = self.running
        rows, tokens, prefill = taken
        if not rows and not chosen:
            return "admit" if running.fits([item]) else "stop"  # an empty batch takes its first request
        if rows + item.rows > self._most_rows() or tokens + item.rows * item.cost > self.max_batch_tokens:
            return "stop"
        if chosen and prefill + self._to_compute(item, cached) > self.max_prefill_tokens:
            return "stop"  # (a prompt over the bound joins alone)
        if not running.fits([*chosen, item]):
            # A single request, or a line passed over long enough, is not passed again.
            return "stop" if item.interactive or item.passed >= self.max_batch_size else "skip"
        return "admit"

    @staticmethod
    def _count_passed(waiting: list[Pending], chosen: list[Pending]) -> None:
        """One more pass for each request left waiting while others were admitted ahead of it
        (after it in the order, or while it has to run apart)."""
        if not chosen:
            return
        taken = {id(item) for item in chosen}
        for item in waiting:
            if id(item) not in taken:
                item.passed += 1

    def _begin(self, items: list[Pending]) -> list[Pending]:
        """Start requests about to join the batch: drop the cancelled, run start hooks."""
        if self._draining.is_set():
            self._cancel(items)
            return []
        started = []
        for item in items:
            if not item.future.set_running_or_notify_cancel():
                self._count_cancelled(item)
                continue
            refusal = self._start(item) if item.on_start is not None else None
            if refusal is not None:
                self._observe(item, refusal)
                item.future.set_exception(refusal)
            else:
                item.started_at = time.monotonic()
                started.append(item)
        return started

    def _observe(self, item: Pending, result: ChatCompletion | RequestError) -> None:
        if self.observer is not None:
            try:
                self.observer(item, result)
            except Exception:  # metrics must never fail a request
                logger.exception("observing request %s failed", item.request_id)

    def _answer(self, answers: list[tuple[Pending, ChatCompletion | RequestError]]) -> None:
        for item, result in answers:
            self._observe(item, result)
            if isinstance(result, RequestError):
                if result.code is ErrorCode.cancelled:
                    self._count_cancelled(item)
                item.future.set_exception(result)
            else:
                self.stats["generated_tokens"] += result.usage.completion_tokens
                result.service_tier = item.request.tier
                result.system_fingerprint = self.fingerprint
                item.future.set_result(result)
            self.stats["requests"] += 1

    def _count_cancelled(self, item: Pending) -> None:
        """Count a request ended because its stream's client went away."""
        if item.stream is not None and item.stream.cancelled:
            self.stats["cancelled"] += 1

    def _most_rows(self) -> int:
        """Most rows in the running batch: the configured bound, or fewer slots."""
        capacity = self.running.capacity if self.running is not None else None
        return min(self.max_batch_size, capacity or self.max_batch_size)

    def figures(self) -> dict[str, float | str]:
        """What the engine is doing: rows running and most rows, requests waiting, occupancy
        (rows in use / most rows) now, averaged over the steps that had requests waiting, and
        over all decode steps (generated tokens per step / most rows); prompt tokens computed
        and taken from the prefix cache, the cache's hit rate, and generated tokens. Read from
        any thread (values may be a step apart)."""
        running = self.running
        rows = len(running) if running is not None else 0
        with self._arrived:
            waiting = len(self._waiting_now) + sum(len(group) for group in self._waiting if group[0] is not None)
        prompt = running.prompt_tokens if running is not None else 0
        cached = running.cached_tokens if running is not None else 0
        steps = getattr(self.runner, "decode_steps", 0)
        generated = int(self.stats["generated_tokens"])
        return {
            "schedule": self.schedule,
            "requests_running": running.request_count if running is not None else 0,
            "rows_running": rows,
            "max_rows": self._most_rows(),
            "requests_waiting": waiting + self._figures.backlog,
            "occupancy": round(rows / self._most_rows(), 4),
            "mean_occupancy_waiting": round(self._figures.mean_occupancy(), 4),
            # Over every step of the continuous batch up to its last admission; and the sums:
            # steps and their occupancy, in all and up to the last admission (a job's own
            # figure: its fed sums at its end less the sums in all at its start).
            "mean_occupancy_fed": round(self._figures.mean_occupancy_fed(), 4),
            "steps": self._figures.steps,
            "occupancy_sum": round(self._figures.occupancy, 4),
            "steps_fed": self._figures.steps_fed,
            "occupancy_sum_fed": round(self._figures.occupancy_fed, 4),
            # Tokens generated per decode step over most rows, in either schedule.
            "mean_occupancy": round(generated / (steps * self._most_rows()), 4) if steps else 0.0,
            "decode_steps": steps,
            "prompt_tokens": prompt,
            "cached_prompt_tokens": cached,
            "prefix_cache_hit_rate": round(cached / prompt, 4) if prompt else 0.0,
            "generated_tokens": generated,
        }

    @staticmethod
    def _start(item: Pending) -> RequestError | None:
        """Run a request's `on_start` hook: its refusal, or an internal_error when the hook
        itself fails (it runs Redis commands, which may fail)."""
        try:
            return item.on_start()  # type: ignore[misc]
        except Exception as error:
            logger.exception("the start hook of %s failed", item.request_id)
            return RequestError(ErrorCode.internal_error, f"the worker could not start this request: {error}")

    def _cancel(self, items: list[Pending]) -> None:
        for item in items:
            item.future.cancel()
            self._live(item)

    @staticmethod
    def _live(item: Pending) -> bool:
        """False for a request cancelled while it was queued; its waiters are woken (a
        cancelled future counts as done for `concurrent.futures.wait` only once notified)."""
        if item.future.cancelled():
            try:
                item.future.set_running_or_notify_cancel()
            except RuntimeError:  # already notified
                pass
            return False
        return True

    def _choose_batch(self, backlog: list[Pending]) -> tuple[list[Pending], list[Pending]]:
        """The oldest request of the most urgent service tier among single requests (else among
        batch lines), plus the requests nearest to it in length, within the limits."""
        oldest = min(backlog, key=lambda item: (not item.interactive, _URGENCY[item.request.tier], item.enqueued_at))
        if oldest.alone:
            return [oldest], [item for item in backlog if item is not oldest]
        by_length = sorted(backlog, key=lambda item: (abs(item.cost - oldest.cost), item.enqueued_at))
        batch: list[Pending] = []
        rows = 0
        longest = 0
        for item in by_length:
            if item.alone:
                continue
            new_rows = rows + item.rows
            new_longest = max(longest, item.cost)
            if batch and (
                new_rows > self.max_batch_size or new_rows * new_longest > self.max_batch_tokens
            ):
                continue
            batch.append(item)
            rows, longest = new_rows, new_longest
        chosen = {id(item) for item in batch}
        return batch, [item for item in backlog if id(item) not in chosen]

    def _run(self, batch: list[Pending]) -> None:
        # A request cancelled while it waited (its job was cancelled, or the worker is
        # draining) is dropped here; from now on the others can no longer be cancelled.
        if self._draining.is_set():
            self._cancel(batch)
            return
        running = []
        for item in batch:
            if item.future.set_running_or_notify_cancel():
                running.append(item)
            else:
                self._count_cancelled(item)
        batch = running
        for item in [item for item in batch if item.on_start is not None]:
            refusal = self._start(item)
            if refusal is not None:
                self._observe(item, refusal)
                item.future.set_exception(refusal)
                batch.remove(item)
        if not batch:
            return
        started = time.monotonic()
        for item in batch:
            item.started_at = started
        results = self._generate(batch)
        generated = 0
        for item, result in zip(batch, results):
            self._observe(item, result)
            if isinstance(result, RequestError):
                if result.code is ErrorCode.cancelled:
                    self._count_cancelled(item)
                item.future.set_exception(result)
            else:
                generated += result.usage.completion_tokens
                item.future.set_result(result)
        rows = sum(item.rows for item in batch)
        self.stats["requests"] += len(batch)
        self.stats["batches"] += 1
        self.stats["generated_tokens"] += generated
        self.stats["largest_batch"] = max(self.stats["largest_batch"], rows)
        elapsed = time.monotonic() - started
        self.stats["busy_seconds"] = round(self.stats["busy_seconds"] + elapsed, 3)
        logger.debug(
            "batch of %d requests (%d sequences): %d tokens in %.3fs", len(batch), rows, generated, elapsed
        )

    def _generate(self, batch: list[Pending]) -> list[ChatCompletion | RequestError]:
        """The runner's answers for a batch; when the batch fails as a whole, its requests run
        again apart (`_isolate`)."""
        try:
            results = self.runner.run_batch(batch)
            if len(results) != len(batch):
                raise RuntimeError(f"runner returned {len(results)} results for {len(batch)} requests")
            return results
        except Exception as error:
            logger.exception("batch of %d requests failed", len(batch))
            return self._isolate(batch, RequestError(ErrorCode.internal_error, f"generation failed: {error}"))

    def _isolate(self, batch: list[Pending], failure: RequestError) -> list[ChatCompletion | RequestError]:
        """Answers for the requests of a batch that failed with `failure`: they run again in
        halves, each half split again if it fails, so a request that breaks every batch it is
        in ends alone with its error, and the others are answered (a transient failure costs
        one rerun). A request alone, and a streamed one that has sent tokens, keep `failure`."""
        if len(batch) == 1:
            return [failure]
        again = [item for item in batch if item.restartable]
        results: dict[int, ChatCompletion | RequestError] = {id(item): failure for item in batch}
        if again:
            logger.warning("running %d requests of a failed batch again, in halves", len(again))
        half = (len(again) + 1) // 2
        for part in (again[:half], again[half:]):
            if part:
                results.update(zip(map(id, part), self._generate(part)))
        return [results[id(item)] for item in batch]
