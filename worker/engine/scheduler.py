"""The batching engine: one thread owns the model and runs the requests of many tasks together.

Celery task threads call `Engine.submit()` and wait on the returned future, or hand a chunk's
lines to `Engine.submit_many()` and take the answers as a callback delivers them. The engine
thread prepares what arrives, then either steps a continuous batch that requests join and leave
at every step (worker/engine/continuous.py, admitted by worker/engine/admission.py) or runs
groups of requests close in length, one group at a time (worker/engine/per_request.py). A
request's error resolves only its own handle.

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
from collections.abc import Callable, Iterable
from concurrent.futures import Future

from schemas.chat import ChatCompletion, ChatCompletionRequest
from schemas.errors import ErrorCode, RequestError
from worker.engine.admission import Admission
from worker.engine.figures import Figures
from worker.engine.interface import ContinuousBatch, ContinuousRunner, ModelInfo, Observer, Runner, describe
from worker.engine.pending import JoinRefused, Pending, Ticket, TokenSink
from worker.engine.per_request import PerRequestBatch
from worker.engine.waiting import Arrivals

logger = logging.getLogger(__name__)

#: What a batching step answers: each request that ended, with its answer or error.
Answers = list[tuple[Pending, ChatCompletion | RequestError]]


def _cancel(items: Iterable[Pending]) -> None:
    for item in items:
        item.cancel()


def _continuous_batch(runner: Runner, max_rows: int, max_tokens: int) -> ContinuousBatch | None:
    """The runner's continuous batch, where it offers one (checked to be a ContinuousBatch)."""
    if not isinstance(runner, ContinuousRunner):
        return None
    running = runner.continuous(max_rows, max_tokens)
    if running is not None and not isinstance(running, ContinuousBatch):
        raise TypeError(f"{type(runner).__name__}.continuous() gave a {type(running).__name__}, which is not a ContinuousBatch")
    return running


class Engine:
    """Collects requests from many threads into batches for one runner (an InferenceEngine).

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
        for name, value, least in (("max_batch_size", max_batch_size, 1), ("max_batch_tokens", max_batch_tokens, 1), ("max_prefill_tokens", max_prefill_tokens, 1)):
            if value < least:
                raise ValueError(f"{name} must be at least {least}, got {value}")
        if batch_wait < 0:
            raise ValueError(f"batch_wait must not be negative, got {batch_wait}")
        if schedule not in ("continuous", "request"):
            raise ValueError(f"schedule must be continuous or request, got {schedule!r}")
        self.runner = runner
        self.max_batch_size = max_batch_size if runner.batched else 1
        self.max_batch_tokens = max_batch_tokens
        self.batch_wait = batch_wait
        self.max_prefill_tokens = max_prefill_tokens
        self.per_request = PerRequestBatch(runner, max_batch_size=self.max_batch_size, max_batch_tokens=max_batch_tokens)
        #: The running batch, when this engine schedules continuously (only the engine thread
        #: changes it), and what admits requests into it.
        self.running = _continuous_batch(runner, self.max_batch_size, max_batch_tokens) if schedule == "continuous" else None
        self.admission = None if self.running is None else Admission(
            self.running, self.per_request, max_batch_size=self.max_batch_size,
            max_batch_tokens=max_batch_tokens, max_prefill_tokens=max_prefill_tokens,
        )
        #: The schedule in effect: `continuous` only where the runner can take rows in.
        self.schedule = "continuous" if self.running is not None else "request"
        if schedule != self.schedule:
            logger.info("this model and decode mode batch per request: the continuous schedule does not apply")
        # Requests looked at when choosing a batch: enough for length bucketing to find
        # similar lengths, few enough that choosing stays cheap.
        self._backlog_rows = 4 * self.max_batch_size
        self._arrivals = Arrivals()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._draining = threading.Event()
        #: Set when the engine thread ended on an error of its own (not a request's): the
        #: worker must stop saying it serves (worker/service/main.py exits, so its tasks come back).
        self.died = threading.Event()
        #: What ended the engine thread, once `died` is set.
        self.failure: BaseException | None = None
        self._figures = Figures()
        #: Totals since the start (`counters()`).
        self.stats = self._figures.stats
        #: Called in the engine thread with each request that ran or was refused, and its answer
        #: or error (the worker's metrics, worker/service/metrics.py); it must be quick.
        self.observer: Observer | None = None
        #: The worker's set-up as a digest (worker/models/model.py `fingerprint`), put in every
        #: answer as `system_fingerprint`.
        self.fingerprint: str | None = None

    @property
    def info(self) -> ModelInfo:
        return describe(self.runner)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="chatbatch-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        self._arrivals.put([None])
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def drain(self) -> None:
        """Start no more batches: every request not running yet is cancelled, now and as it
        arrives, so its task can hand it back to the queue; the batch running now finishes.

        Called when the worker is told to stop (SIGTERM); safe to call from a signal handler.
        """
        self._draining.set()
        self._arrivals.put([None])

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
        stream: TokenSink | None = None,
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
            _cancel(items)
        elif self.died.is_set() or self._stopping.is_set():
            why = "the worker's engine stopped on an error" if self.died.is_set() else "the worker is shutting down"
            for item in items:
                item.fail(RequestError(ErrorCode.internal_error, why))
        else:
            self._arrivals.put(items)

    def _prepare(self, items: list[Pending], backlog: list[Pending]) -> int:
        """Prepare requests in the engine thread, all at once (the tokenizer encodes them as
        one batch); good ones join the backlog, bad ones are answered at once. Returns the rows
        added."""
        rows = 0
        for item, error in zip(items, self._prepare_each(items)):
            if error is None:
                backlog.append(item)
                rows += item.rows
            else:
                self._observe(item, error)
                item.fail(error)
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
                _cancel(backlog)
                backlog = []
            if self.admission is not None:
                self._collect(backlog, wait=not self.admission.running)
                self._continue(self.admission, backlog)
                continue
            self._collect(backlog)
            if not backlog:
                continue
            batch, backlog = self.per_request.choose(backlog)
            self._run(batch)
        if self.running is not None and (self.running.requests or len(self.running)):
            self._answer(self.running.abandon(RequestError(ErrorCode.internal_error, "the worker stopped before this request finished")))
        # Everything not run gets an answer, what is still queued too: a task waiting on it
        # must not wait for ever (a request cancelled meanwhile keeps its cancellation).
        stopped = RequestError(ErrorCode.internal_error, "the worker stopped before this request ran")
        for item in [*backlog, *self._arrivals.clear()]:
            item.fail(stopped)

    def _collect(self, backlog: list[Pending], *, wait: bool = True) -> None:
        """Take waiting requests: with an empty backlog, wait for the first; then wait up to
        batch_wait for a full batch. What arrives is prepared together. With `wait` False (a
        continuous batch is running), take only what is there.

        The backlog holds at most a few batches' worth: the rest stays queued, so choosing a
        batch costs the same however many requests wait. Single requests have as much room
        again of their own, so a backlog full of batch lines still takes them.
        """
        rows = sum(item.rows for item in backlog)
        singles = self._backlog_rows - sum(1 for item in backlog if item.interactive)
        deadline: float | None = None
        while rows < self._backlog_rows or (self._arrivals.singles and singles > 0):
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
            taken = self._arrivals.take(self._backlog_rows - rows, timeout, singles=singles)
            if not taken:
                return
            fresh = [item for item in taken if item is not None and item.live()]
            singles -= sum(1 for item in fresh if item.interactive)
            if fresh:
                rows += self._prepare(fresh, backlog)
            if None in taken:
                if not self._draining.is_set() or self._stopping.is_set():
                    self._stopping.set()
                return
            if timeout == 0.0:
                return  # a full batch is here, and everything that was waiting was taken

    def _run(self, batch: list[Pending]) -> None:
        """Run a group per request, until its last row is done."""
        batch = self._begin(batch)
        if not batch:
            return
        started = time.monotonic()
        generated = self._answer(list(zip(batch, self.per_request.generate(batch))))
        rows = sum(item.rows for item in batch)
        self.stats["batches"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], rows)
        elapsed = time.monotonic() - started
        self.stats["busy_seconds"] = round(self.stats["busy_seconds"] + elapsed, 3)
        logger.debug("batch of %d requests (%d sequences): %d tokens in %.3fs", len(batch), rows, generated, elapsed)

    def _continue(self, admission: Admission, backlog: list[Pending]) -> None:
        """One step of the running batch: admit what fits, then decode one token for every
        row; answer the requests that finished. A request that fits no slot of the batch runs
        per request, alone, once the batch has emptied."""
        running = admission.running
        started = time.monotonic()
        admitted, apart = admission.choose(backlog) if not self._stopping.is_set() else ([], [])
        if admitted or apart:
            taken = {id(item) for item in [*admitted, *apart]}
            backlog[:] = [item for item in backlog if id(item) not in taken]
        if apart:
            self._run(apart)
        admitted = self._begin(admitted)
        self._figures.backlog = len(backlog)
        try:
            if admitted:
                admitted = self._join(running, admitted)
                self.stats["batches"] += 1
                self.stats["largest_batch"] = max(self.stats["largest_batch"], len(running))
            occupied = len(running)
            self._figures.step(occupied, admission.most_rows, waiting=bool(backlog or self._arrivals), admitted=bool(admitted))
            answers = running.step() if occupied else []
            # The step chose the first token of the rows that joined it.
            chosen = time.monotonic()
            for item in admitted:
                item.first_token_at = chosen
        except Exception as error:  # the batch failed as a whole: its requests run again apart
            answers = self._after_failure(running, error, admitted)
        self._answer(answers)
        self.stats["busy_seconds"] = round(self.stats["busy_seconds"] + time.monotonic() - started, 3)

    def _join(self, running: ContinuousBatch, items: list[Pending]) -> list[Pending]:
        """Admit requests into the running batch; when their prefill fails (the batch is as it
        was), each tries alone, and one that fails alone is answered with internal_error.
        Returns those admitted."""
        try:
            running.admit(items)
            return items
        except JoinRefused as refused:
            if len(items) == 1:
                logger.warning("request %s could not join the running batch: %s", items[0].request_id, refused.__cause__ or refused)
                self._answer([(items[0], RequestError(ErrorCode.internal_error, f"the request could not start: {refused}"))])
                return []
            logger.warning("%d requests could not join the running batch together (%s): each tries alone", len(items), refused)
        return [item for one in items for item in self._join(running, [one])]

    def _after_failure(self, running: ContinuousBatch, error: Exception, admitted: list[Pending]) -> Answers:
        """The running batch failed as a whole (its model, or a step no row can be blamed for):
        it is dropped; the answers it had settled stand, and the requests it held run again
        apart (`PerRequestBatch.isolate`), so that only a request that fails alone fails."""
        logger.exception("the running batch of %d requests failed: running them again apart", len(running.requests))
        failure = RequestError(ErrorCode.internal_error, f"generation failed: {error}")
        held = running.abandon(failure)
        answers = [(item, result) for item, result in held if result is not failure]
        failed = [item for item, result in held if result is failure]
        # Requests admitted this step that the batch had not taken in yet run again too.
        seen = {id(item) for item, _ in held}
        failed += [item for item in admitted if id(item) not in seen]
        return answers + list(zip(failed, self.per_request.isolate(failed, failure)))

    # Starting and answering requests: one path for both schedules.

    def _begin(self, items: list[Pending]) -> list[Pending]:
        """Start requests about to run: drop the cancelled (all of them while draining: their
        tasks hand them back), run start hooks (a refusal answers its request); from now on
        the others can no longer be cancelled."""
        if self._draining.is_set():
            _cancel(items)
            return []
        started = []
        for item in items:
            if not item.future.set_running_or_notify_cancel():
                self._count_cancelled(item)
                continue
            refusal = item.run_start_hook()
            if refusal is not None:
                self._observe(item, refusal)
                item.future.set_exception(refusal)
            else:
                item.started_at = time.monotonic()
                started.append(item)
        return started

    def _answer(self, answers: Answers) -> int:
        """Give requests their answers (with the worker's service tier and fingerprint) or
        errors; returns the tokens generated for them."""
        generated = 0
        for item, result in answers:
            self._observe(item, result)
            if isinstance(result, RequestError):
                if result.code is ErrorCode.cancelled:
                    self._count_cancelled(item)
                item.future.set_exception(result)
            else:
                generated += result.usage.completion_tokens
                self.stats["generated_tokens"] += result.usage.completion_tokens
                result.service_tier = item.request.tier
                result.system_fingerprint = self.fingerprint
                item.future.set_result(result)
            self.stats["requests"] += 1
        return generated

    def _observe(self, item: Pending, result: ChatCompletion | RequestError) -> None:
        if self.observer is not None:
            try:
                self.observer(item, result)
            except Exception:  # metrics must never fail a request
                logger.exception("observing request %s failed", item.request_id)

    def _count_cancelled(self, item: Pending) -> None:
        """Count a request ended because its stream's client went away."""
        if item.stream is not None and item.stream.cancelled:
            self.stats["cancelled"] += 1

    # Figures.

    def figures(self) -> dict[str, float | str]:
        """What the engine is doing (`Figures.report`); read from any thread."""
        most = self.admission.most_rows if self.admission is not None else self.max_batch_size
        # A runner that counts its decode steps says so (the transformers runner does).
        steps = getattr(self.runner, "decode_steps", 0)
        return self._figures.report(self.schedule, self.running, most, waiting=self._arrivals.count(), steps=steps)

    def counters(self) -> dict[str, float]:
        """Totals since the start: requests answered, batches, generated tokens, the largest
        batch, busy seconds, requests cancelled by their client."""
        return dict(self.stats)
