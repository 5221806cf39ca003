"""One delivery of a chunk task: a job's lines run on the engine and their answers stored.

A first delivery hands all its lines to the engine at once and stores the answers as they come
(`ChunkRun.answer`: collect, store answers, check stop, hand back). A chunk delivered again after
its worker died runs its lines one at a time, each as a suspect (`ChunkRun.run_alone`). Every
answer is stored once, keyed by job and line, whichever delivery comes first.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import Future, wait
from typing import Any

from chatbatch.ids import new_id
from chatbatch.jobs import CANCELLED, EXPIRED, StopReason, Tokens
from chatbatch.queues import TASK_CHUNK, chunk_argsrepr
from schemas.batch import BatchRequestOutput, error_line
from schemas.chat import ChatCompletion, ChatCompletionRequest, parse_chat_request
from schemas.errors import ErrorCode, RequestError
from worker.engine.pending import Ticket
from worker.service.state import STOP_CHECK_SECONDS, WorkerState

logger = logging.getLogger(__name__)

#: Answers are stored as they come, this many at a time, or what has come after STORE_SECONDS
#: (and whatever is left at the end), so a job's progress moves within a chunk, a crash loses
#: little, and answered lines leave the queue's window (chatbatch/dispatch.py) while the chunk's
#: longer answers run on: the next chunk's lines reach the engine as its rows free up.
RECORD_EVERY = 32
STORE_SECONDS = 0.5

#: A stored line: (input line, "output" | "error", the BatchRequestOutput as a dict or JSON
#: text, its (prompt, generated, cached) tokens).
Entry = tuple[int, str, dict[str, Any] | str, Tokens]
Outcome = Future[ChatCompletion] | Ticket | RequestError
NO_TOKENS: Tokens = (0, 0, 0)


def check_model(request_model: str | None, served: str) -> None:
    """Refuse a request naming another model than the one this worker serves."""
    if request_model is not None and request_model != served:
        raise RequestError(
            ErrorCode.model_not_found,
            f"model {request_model!r} is not served here (this worker serves {served!r}): "
            "start a worker with that model, or omit 'model'",
            param="model",
        )


def send_back(task: Any, args: list[Any], argsrepr: str) -> None:
    """Put a copy of this task, with what is left of it, back on the queue it came from; the
    task then returns and its own message is acknowledged (the copy is queued first, so a
    crash in between leaves two deliveries, never none)."""
    queue = (task.request.delivery_info or {}).get("routing_key")
    if task.name == TASK_CHUNK:
        args = [*args[:2], json.dumps(args[2], separators=(",", ":"))]
    task.app.send_task(task.name, args=args, queue=queue, argsrepr=argsrepr)
    logger.info("worker stopping: task %s handed back to %s", task.request.id, queue)


def _output_line(custom_id: str, completion: ChatCompletion) -> str:
    """A BatchRequestOutput line as JSON text, assembled directly: this runs once per line on
    the hot path, and every part of it was validated when it was made (the completion is
    serialized by pydantic's own encoder)."""
    return (
        f'{{"id":"{new_id("batch_req_")}","custom_id":{json.dumps(custom_id)},'
        f'"response":{{"status_code":200,"request_id":"{new_id("req_")}","body":{completion.model_dump_json()}}},'
        '"error":null}'
    )


def _error(custom_id: str, line: int, error: RequestError, *, with_response: bool = True) -> BatchRequestOutput:
    return error_line(
        line_id=new_id("batch_req_"),
        custom_id=custom_id,
        code=error.code,
        message=error.message,
        line=line,
        request_id=new_id("req_") if with_response else None,
    )


def entry(item: dict[str, Any], outcome: Outcome, stopped: StopReason | None) -> Entry:
    """The stored line for one item: its output, or its error line."""
    try:
        if isinstance(outcome, RequestError):
            raise outcome
        if outcome.cancelled():
            error = RequestError(*(stopped or CANCELLED))
            return item["line"], "error", _error(item["custom_id"], item["line"], error, with_response=False).model_dump(), NO_TOKENS
        completion = outcome.result()
    except RequestError as error:
        return item["line"], "error", _error(item["custom_id"], item["line"], error).model_dump(), NO_TOKENS
    usage = completion.usage
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details is not None else 0
    return item["line"], "output", _output_line(item["custom_id"], completion), (usage.prompt_tokens, usage.completion_tokens, cached or 0)


class ChunkRun:
    """One delivery of a chunk task.

    Args:
        state: the worker's stores and engine.
        task: the running Celery task (for handing work back to its queue).
        job_id: the job.
        chunk: the chunk's id within the job (its deliveries are counted under it).
        items: {"line", "custom_id", "body"} for each valid input line of the chunk.
    """

    def __init__(self, state: WorkerState, task: Any, job_id: str, chunk: str, items: list[dict[str, Any]]) -> None:
        self.state = state
        self.task = task
        self.job_id = job_id
        self.chunk = chunk
        self.items = items
        # The answering state of `answer()`.
        self._ready: list[tuple[dict[str, Any], Outcome]] = []
        self._finished: list[Ticket] = []
        self._taken = 0
        self._woken = threading.Event()
        self._outstanding: dict[int, tuple[dict[str, Any], Ticket]] = {}
        self._stopped: StopReason | None = None
        self._handed_back = 0
        self._answered = 0
        self._errors = 0
        self._stored_at = time.monotonic()

    def run(self) -> None:
        """Answer what the chunk has left unanswered, once per (job, chunk) at a time in this
        process, and forget the chunk once all its lines are answered."""
        key = (self.job_id, self.chunk)
        while (mine := self.state.running_chunks.enter(key)) is None:
            # The chunk was delivered again while this worker runs it: that run has ended now;
            # this one answers only what it left (usually nothing). Not counted as a delivery.
            logger.info("job %s chunk %s was delivered again while this worker runs it: waiting for that run", self.job_id, self.chunk)
        try:
            self._in_window(lambda queue: self.state.dispatcher.started(queue, self.job_id, self.chunk, self.task.request.hostname))
            self._run()
            if all(self.state.jobs.recorded(self.job_id, [item["line"] for item in self.items])):
                self.state.ledger.forget_chunk(self.job_id, self.chunk)
                # The chunk left its queue's window: the next chunks of the jobs waiting there go.
                self._in_window(lambda queue: self.state.dispatcher.dispatch(queue, self.task.app.send_task))
        finally:
            self.state.running_chunks.leave(key, mine)

    def _in_window(self, step: Any) -> None:
        """Tell the dispatcher about this chunk's place in its queue's window (`step(queue)`);
        a failure only delays a release until the next sweep."""
        queue = (self.task.request.delivery_info or {}).get("routing_key")
        if not queue:
            return
        try:
            step(queue)
        except Exception:
            logger.warning("the window of %s could not be updated; the next sweep releases its chunks", queue, exc_info=True)

    def _run(self) -> None:
        jobs = self.state.jobs
        started = time.monotonic()
        done = jobs.recorded(self.job_id, [item["line"] for item in self.items])
        todo = [item for item, stored in zip(self.items, done) if not stored]
        if not todo:
            jobs.finalize(self.job_id)
            return
        deliveries = self.state.ledger.count_delivery(self.job_id, self.chunk)
        reason = jobs.stop_reason(self.job_id)
        if reason is not None:
            jobs.close_lines(self.job_id, [(item["line"], item["custom_id"]) for item in todo], reason)
            jobs.finalize(self.job_id)
            return
        if deliveries > 1:
            self.run_alone(todo)
            return
        self.answer(todo)
        status = jobs.finalize(self.job_id)
        logger.info(
            "job %s chunk %s: %d answered, %d errors, %d handed back in %.2fs (job %s)",
            self.job_id, self.chunk, self._answered, self._errors, self._handed_back, time.monotonic() - started, status,
        )

    # A first delivery: everything to the engine at once.

    def answer(self, items: list[dict[str, Any]]) -> None:
        """Run the lines on the engine and store each answer as it comes."""
        valid: list[tuple[dict[str, Any], ChatCompletionRequest]] = []
        for item in items:
            parsed = self._parse(item)
            if isinstance(parsed, RequestError):
                self._ready.append((item, parsed))
            else:
                valid.append((item, parsed))
        total = len(valid)

        def on_done(ticket: Ticket) -> None:
            # The engine thread appends each finished request and wakes this thread once a
            # group is ready (or the last one): one wake-up per group, not per line.
            self._finished.append(ticket)
            if len(self._finished) - self._taken >= RECORD_EVERY or len(self._finished) == total:
                self._woken.set()

        requests = [(request, f"{self.job_id}:{item['line']}") for item, request in valid]
        tickets = self.state.engine.submit_many(requests, on_done)
        self._outstanding = {id(ticket): (item, ticket) for (item, _), ticket in zip(valid, tickets)}
        next_check = time.monotonic() + STOP_CHECK_SECONDS
        while self._outstanding:
            self._woken.wait(max(0.0, next_check - time.monotonic()))
            self._woken.clear()
            self.collect()
            if self.hand_back():
                continue
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + STOP_CHECK_SECONDS
                self.check_stop()
            if len(self._ready) >= RECORD_EVERY or (self._ready and time.monotonic() - self._stored_at >= STORE_SECONDS):
                self.store_answers()
        self.store_answers()

    def collect(self) -> None:
        """Move the tickets the engine has finished since the last look to the answers ready to
        store (a ticket cancelled because the worker is draining stays, to be handed back)."""
        arrived = self._finished[self._taken :]
        self._taken += len(arrived)
        for ticket in arrived:
            found = self._outstanding.pop(id(ticket), None)
            if found is None:
                continue  # handed back already
            if ticket.cancelled() and self.state.engine.draining:
                self._outstanding[id(ticket)] = found
            else:
                self._ready.append(found)

    def store_answers(self) -> None:
        """Store the answers that are ready, in one Redis call."""
        entries = [entry(item, outcome, self._stopped) for item, outcome in self._ready]
        self._ready.clear()
        self._stored_at = time.monotonic()
        if not entries:
            return
        stored = self.state.jobs.record_lines(self.job_id, entries, model=self.state.served_name, lineage=self.state.engine.info.lineage)
        failed = sum(kind == "error" for _, kind, _, _ in entries)
        self._answered += len(entries) - failed
        self._errors += failed
        if stored:
            self._in_window(lambda queue: self.state.dispatcher.answered(queue, self.job_id, self.chunk, stored, self.task.app.send_task))

    def check_stop(self) -> None:
        """Once the job is cancelled or expired, cancel the lines that have not started (the
        running batch finishes, and its answers are kept)."""
        if self._stopped is not None:
            return
        self._stopped = self.state.stop_reasons.get(self.job_id)
        if self._stopped is not None:
            self._stopping(self._stopped)
            for _, pending in self._outstanding.values():
                pending.cancel()

    def hand_back(self) -> bool:
        """When the worker starts stopping, hand every line without an answer back to the
        queue at once, the running ones too: the other worker skips or discards whichever of
        them this one still answers before it exits. The delivery is uncounted first, so the
        copy runs batched, not as a suspect. True if it handed lines back now."""
        if not self.state.engine.draining or self._handed_back or not self._outstanding:
            return False
        rest = [item for item, _ in self._outstanding.values()]
        self.state.ledger.uncount_delivery(self.job_id, self.chunk)
        send_back(self.task, [self.job_id, self.chunk, rest], chunk_argsrepr(self.job_id, self.chunk, len(rest)))
        self._handed_back = len(rest)
        for _, pending in self._outstanding.values():
            pending.cancel()  # what has not started; the running batch finishes
        self._outstanding = {key: value for key, value in self._outstanding.items() if not value[1].cancelled()}
        return True

    def _stopping(self, reason: StopReason) -> None:
        """The job stops: an expiry marks it `expiring` first, so that the `expired` lines this
        run stores end it `expired`."""
        if reason == EXPIRED:
            self.state.jobs.expire(self.job_id)

    def _parse(self, item: dict[str, Any]) -> ChatCompletionRequest | RequestError:
        try:
            request = parse_chat_request(item["body"], prefix="body.")
            check_model(request.model, self.state.served_name)
        except RequestError as error:
            return error
        return request

    # A redelivery: suspects, one at a time.

    def run_alone(self, items: list[dict[str, Any]]) -> None:
        """A worker died while this chunk ran, and one of its lines may be the cause.

        Its lines run one at a time, each in a batch of its own and one suspect at a time in
        this process, with an attempt counted per line when its batch starts: a line that kills
        the worker every time becomes an `internal_error` line after CHATBATCH_MAX_DELIVERIES
        attempts, while the other lines are answered.
        """
        logger.warning("job %s chunk %s was redelivered: running its %d lines one at a time", self.job_id, self.chunk, len(items))
        for index, item in enumerate(items):
            if not self._run_suspect(item):
                rest = items[index:]
                # Still counted as a redelivery where it lands: the suspect keeps running alone.
                send_back(self.task, [self.job_id, self.chunk, rest], chunk_argsrepr(self.job_id, self.chunk, len(rest)))
                return
        self.state.jobs.finalize(self.job_id)

    def _run_suspect(self, item: dict[str, Any]) -> bool:
        """Run one suspect line and store its answer; False if the worker is stopping and the
        line is to be handed back."""
        state = self.state
        if state.engine.draining:
            return False
        line = item["line"]

        def attempt() -> RequestError | None:
            attempts = state.ledger.count_attempt(self.job_id, line)
            if attempts <= state.settings.max_deliveries:
                return None
            return RequestError(
                ErrorCode.internal_error,
                f"line {line} was tried {attempts - 1} times and the worker died each time; it was not retried again",
            )

        with state.alone:
            # Checked once this line's turn has come: another delivery of the chunk may have
            # answered it meanwhile.
            if state.jobs.recorded(self.job_id, [line])[0]:
                return True
            parsed = self._parse(item)
            stopped: StopReason | None = None
            if isinstance(parsed, RequestError):
                outcome: Outcome = parsed
            else:
                future = state.engine.submit(parsed, f"{self.job_id}:{line}", alone=True, on_start=attempt)
                outcome = future
                stopped = self._wait(future)
        if isinstance(outcome, Future) and outcome.cancelled() and state.engine.draining:
            return False
        state.jobs.record_lines(self.job_id, [entry(item, outcome, stopped)], model=state.served_name, lineage=state.engine.info.lineage)
        return True

    def _wait(self, future: Future[ChatCompletion]) -> StopReason | None:
        """Wait for the engine; if the job is cancelled or expires meanwhile, cancel the request
        unless it has started (its answer is then kept). Returns the stop reason, if any."""
        while not future.done():
            wait([future], timeout=STOP_CHECK_SECONDS)
            if future.done() or self.state.engine.draining:
                continue
            reason = self.state.stop_reasons.get(self.job_id)
            if reason is not None:
                self._stopping(reason)
                future.cancel()
                wait([future])
                return reason
        return None
