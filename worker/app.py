"""The Celery app of the worker, and its two tasks.

Tasks run in Celery's threads pool: each task thread hands its requests to the process's one
engine and waits, so the requests of many tasks meet in one batch (docs/engine.md).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import Future, wait
from dataclasses import dataclass
from typing import Any

import redis

from chatbatch import events, keys
from chatbatch.delivery import CANCELLED, finish, stop_reason
from chatbatch.ids import new_id
from chatbatch.jobstore import JobStore
from chatbatch.queues import TASK_CHAT, TASK_CHUNK, chunk_argsrepr, make_celery, request_argsrepr
from chatbatch.settings import Settings, get_settings
from schemas.batch import BatchRequestOutput, error_line
from schemas.chat import ChatCompletion, ChatCompletionRequest, parse_chat_request
from schemas.errors import ErrorCode, RequestError
from worker.engine import Engine, Ticket

logger = logging.getLogger(__name__)

app = make_celery(get_settings(), name="chatbatch.worker")


@dataclass
class WorkerState:
    """What one worker process holds: set up once by worker.main before consuming."""

    settings: Settings
    redis: redis.Redis
    store: JobStore
    engine: Engine
    served_name: str


_state: WorkerState | None = None


def install(state: WorkerState) -> None:
    global _state
    _state = state


def state() -> WorkerState:
    if _state is None:
        raise RuntimeError("the worker's model is not loaded: start workers with `chatbatch worker`")
    return _state


def _check_model(request_model: str | None, served: str) -> None:
    if request_model is not None and request_model != served:
        raise RequestError(
            ErrorCode.model_not_found,
            f"model {request_model!r} is not served here (this worker serves {served!r}): "
            "start a worker with that model, or omit 'model'",
            param="model",
        )


def _store_result(s: WorkerState, request_id: str, record: dict[str, Any]) -> None:
    """Store a single request's result once; later deliveries of the same request keep it."""
    ttl = s.settings.result_ttl
    if s.redis.set(keys.result(request_id), json.dumps(record), nx=True, ex=ttl):
        pipe = s.redis.pipeline()
        pipe.rpush(keys.result_ready(request_id), 1)
        pipe.expire(keys.result_ready(request_id), ttl)
        events.publish(pipe, "chat.completion", request_id, "failed" if "error" in record else "completed")
        pipe.execute()
    s.store.forget_pending_request(request_id)


@app.task(name=TASK_CHAT, bind=True)
def chat(self: Any, request_id: str, body: dict[str, Any]) -> None:
    """Answer one chat request; the result goes to Redis under the request id."""
    s = state()
    if s.redis.exists(keys.result(request_id)):
        return
    deliveries = int(s.redis.incr(keys.request_deliveries(request_id)))
    s.redis.expire(keys.request_deliveries(request_id), s.settings.result_ttl)
    if deliveries > s.settings.max_deliveries:
        error = RequestError(
            ErrorCode.internal_error,
            f"the request was delivered {deliveries - 1} times and its worker died each time; "
            "it was not retried again",
        )
        _store_result(s, request_id, {"error": error.to_dict()})
        return
    started = time.monotonic()
    try:
        request = parse_chat_request(body)
        _check_model(request.model, s.served_name)
        future = s.engine.submit(request, request_id)
        wait([future])
        if future.cancelled():  # the worker is draining: another worker answers it
            s.redis.decr(keys.request_deliveries(request_id))
            _send_back(self, [request_id, body], request_argsrepr(request_id))
            return
        record: dict[str, Any] = future.result().model_dump()
    except RequestError as error:
        record = {"error": error.to_dict()}
    _store_result(s, request_id, record)
    logger.info("request %s answered in %.2fs", request_id, time.monotonic() - started)


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


@app.task(name=TASK_CHUNK, bind=True)
def chunk(self: Any, job_id: str, number: str, lines: str | list[dict[str, Any]]) -> None:
    """Answer a chunk of a job's lines; each answer is stored once, keyed by line number.

    Args:
        job_id: the job.
        number: the chunk's id within the job (its deliveries are counted under it).
        lines: {"line", "custom_id", "body"} for each valid input line of the chunk (the
            producer sends each input line as it came, with its "line" added), as a JSON string
            (or as a list).
    """
    items: list[dict[str, Any]] = json.loads(lines) if isinstance(lines, str) else lines
    s = state()
    key = (job_id, number)
    while True:
        with _running_lock:
            earlier = _running.get(key)
            if earlier is None:
                mine = _running[key] = threading.Event()
                break
        # Kombu restored this chunk's message after the visibility timeout while this process
        # still runs it: wait for that run, then answer only what it left (usually nothing).
        # Not counted as a delivery: the run it waits for is alive.
        logger.info("job %s chunk %s was delivered again while this worker runs it: waiting for that run", job_id, number)
        earlier.wait()
    try:
        _chunk(self, s, job_id, number, items)
        if all(s.store.recorded(job_id, [item["line"] for item in items])):
            s.store.forget_pending(job_id, number)
    finally:
        with _running_lock:
            del _running[key]
        mine.set()


#: The chunks this process is running, by (job, chunk): a second delivery of one waits for it.
_running: dict[tuple[str, str], threading.Event] = {}
_running_lock = threading.Lock()


def _chunk(self: Any, s: WorkerState, job_id: str, number: str, items: list[dict[str, Any]]) -> None:
    store = s.store
    started = time.monotonic()
    done = store.recorded(job_id, [item["line"] for item in items])
    todo = [item for item, stored in zip(items, done) if not stored]
    if not todo:
        finish(store, job_id)
        return
    deliveries = store.count_delivery(job_id, number)
    reason = stop_reason(store, job_id)
    if reason is not None:
        _close(store, job_id, todo, reason)
        return
    if deliveries > 1:
        _run_alone(self, s, job_id, number, todo)
        return
    counts = _answer_chunk(self, s, job_id, number, todo)
    status = finish(store, job_id)
    logger.info(
        "job %s chunk %s: %d answered, %d errors, %d handed back in %.2fs (job %s)",
        job_id, number, *counts, time.monotonic() - started, status,
    )


#: Answers are stored as they come, this many at a time (and whatever is left at the end), so
#: a job's progress moves within a chunk and a crash loses little.
_RECORD_EVERY = 32


def _answer_chunk(task: Any, s: WorkerState, job_id: str, number: str, items: list[dict[str, Any]]) -> tuple[int, int, int]:
    """Run a chunk's lines on the engine and store each answer; returns (answered, errors,
    handed back)."""
    store = s.store
    ready: list[tuple[dict[str, Any], Ticket | RequestError]] = []
    valid: list[tuple[dict[str, Any], ChatCompletionRequest]] = []
    for item in items:
        parsed = _parse(s, item)
        if isinstance(parsed, RequestError):
            ready.append((item, parsed))
        else:
            valid.append((item, parsed))
    # The engine thread appends each finished request here and wakes this thread once a group
    # is ready (or the last one): one wake-up per group, not per line.
    finished: list[Ticket] = []
    taken = 0
    woken = threading.Event()
    total = len(valid)

    def on_done(ticket: Ticket) -> None:
        finished.append(ticket)
        if len(finished) - taken >= _RECORD_EVERY or len(finished) == total:
            woken.set()

    tickets = s.engine.submit_many([(request, f"{job_id}:{item['line']}") for item, request in valid], on_done)
    outstanding = {id(ticket): (item, ticket) for (item, _), ticket in zip(valid, tickets)}
    stopped: tuple[ErrorCode, str] | None = None
    handed_back = 0
    answered = errors = 0

    def store_ready() -> None:
        nonlocal answered, errors
        entries = [_answer(item, outcome, stopped) for item, outcome in ready]
        ready.clear()
        store.record_lines(job_id, entries)
        failed = sum(kind == "error" for _, kind, _, _ in entries)
        answered += len(entries) - failed
        errors += failed

    next_check = time.monotonic() + _STOP_CHECK_SECONDS
    while outstanding:
        woken.wait(max(0.0, next_check - time.monotonic()))
        woken.clear()
        arrived = finished[taken:]
        taken += len(arrived)
        for ticket in arrived:
            entry = outstanding.pop(id(ticket), None)
            if entry is None:
                continue  # handed back already
            if ticket.cancelled() and s.engine.draining:
                outstanding[id(ticket)] = entry  # handed back below with the others
            else:
                ready.append(entry)
        if s.engine.draining and handed_back == 0 and outstanding:
            # Hand back at once every line without an answer yet, the running ones too: the
            # other worker skips or discards whichever of them this one still answers before
            # it exits. The delivery is uncounted first, so the copy runs batched, not as a
            # suspect.
            rest = [item for item, _ in outstanding.values()]
            store.uncount_delivery(job_id, number)
            _send_back(task, [job_id, number, rest], chunk_argsrepr(job_id, number, len(rest)))
            handed_back = len(rest)
            for _, pending in outstanding.values():
                pending.cancel()  # what has not started; the running batch finishes
            outstanding = {key: value for key, value in outstanding.items() if not value[1].cancelled()}
            continue
        if time.monotonic() >= next_check:
            next_check = time.monotonic() + _STOP_CHECK_SECONDS
            if stopped is None:
                stopped = _stop_reason_cached(store, job_id)
                if stopped is not None:
                    # Requests that have not started are dropped; the running batch finishes.
                    for _, pending in outstanding.values():
                        pending.cancel()
        if len(ready) >= _RECORD_EVERY:
            store_ready()
    store_ready()
    return answered, errors, handed_back


#: Per-process cache of each job's stop reason: the chunk tasks of one job share one Redis
#: read per interval instead of one each.
_stop_cache: dict[str, tuple[float, tuple[ErrorCode, str] | None]] = {}
_stop_cache_lock = threading.Lock()


def _stop_reason_cached(store: JobStore, job_id: str) -> tuple[ErrorCode, str] | None:
    now = time.monotonic()
    with _stop_cache_lock:
        cached = _stop_cache.get(job_id)
        if cached is not None and now - cached[0] < _STOP_CHECK_SECONDS:
            return cached[1]
    reason = stop_reason(store, job_id)
    with _stop_cache_lock:
        if len(_stop_cache) > 1_000:
            _stop_cache.clear()
        _stop_cache[job_id] = (now, reason)
    return reason


def _parse(s: WorkerState, item: dict[str, Any]) -> ChatCompletionRequest | RequestError:
    try:
        request = parse_chat_request(item["body"], prefix="body.")
        _check_model(request.model, s.served_name)
    except RequestError as error:
        return error
    return request


def _submit(s: WorkerState, job_id: str, item: dict[str, Any], **engine_args: Any) -> Future[ChatCompletion] | RequestError:
    request = _parse(s, item)
    if isinstance(request, RequestError):
        return request
    return s.engine.submit(request, f"{job_id}:{item['line']}", **engine_args)


#: Suspect lines run one at a time per worker process, so a crash is charged to one line.
_alone = threading.Lock()


def _run_alone(task: Any, s: WorkerState, job_id: str, number: str, items: list[dict[str, Any]]) -> None:
    """A redelivered chunk: a worker died while it ran, and one of its lines may be the cause.

    Its lines run one at a time, each in a batch of its own and one suspect at a time in this
    process, with an attempt counted per line when its batch starts: a line that kills the
    worker every time becomes an `internal_error` line after CHATBATCH_MAX_DELIVERIES attempts,
    while the other lines are answered.
    """
    store = s.store
    logger.warning("job %s chunk %s was redelivered: running its %d lines one at a time", job_id, number, len(items))
    for index, item in enumerate(items):
        if s.engine.draining:
            # Still counted as a redelivery where it lands: the suspect keeps running alone.
            rest = items[index:]
            _send_back(task, [job_id, number, rest], chunk_argsrepr(job_id, number, len(rest)))
            return

        def attempt(line: int = item["line"]) -> RequestError | None:
            attempts = store.count_attempt(job_id, line)
            if attempts <= s.settings.max_deliveries:
                return None
            return RequestError(
                ErrorCode.internal_error,
                f"line {line} was tried {attempts - 1} times and the worker died each time; it was not retried again",
            )

        with _alone:
            # Checked once this line's turn has come: another delivery of the chunk may have
            # answered it meanwhile.
            if store.recorded(job_id, [item["line"]])[0]:
                continue
            outcome = _submit(s, job_id, item, alone=True, on_start=attempt)
            stopped = _wait_unless_stopped(s, job_id, [outcome]) if isinstance(outcome, Future) else None
        if stopped is DRAINING:
            wait([outcome])  # type: ignore[list-item]
            if outcome.cancelled():  # type: ignore[union-attr]
                rest = items[index:]
                _send_back(task, [job_id, number, rest], chunk_argsrepr(job_id, number, len(rest)))
                return
            stopped = None
        store.record_lines(job_id, [_answer(item, outcome, stopped)])
    finish(store, job_id)


def _answer(
    item: dict[str, Any], outcome: Future[ChatCompletion] | Ticket | RequestError, stopped: tuple[ErrorCode, str] | None
) -> tuple[int, str, dict[str, Any] | str, int]:
    """The stored line for one item: its output, or its error line."""
    try:
        if isinstance(outcome, RequestError):
            raise outcome
        if outcome.cancelled():
            error = RequestError(*(stopped or CANCELLED))
            return item["line"], "error", _error(item["custom_id"], item["line"], error, with_response=False).model_dump(), 0
        completion = outcome.result()
    except RequestError as error:
        return item["line"], "error", _error(item["custom_id"], item["line"], error).model_dump(), 0
    return item["line"], "output", _output_line(item["custom_id"], completion), completion.usage.completion_tokens


#: How often a task waiting on the engine checks whether its job was cancelled or expired, or
#: its worker is stopping.
_STOP_CHECK_SECONDS = 0.5
#: What `_wait_unless_stopped` returns when the worker is stopping (SIGTERM).
DRAINING = (ErrorCode.internal_error, "the worker is stopping")


def _wait_unless_stopped(s: WorkerState, job_id: str, futures: list[Future[ChatCompletion]]) -> tuple[ErrorCode, str] | None:
    """Wait for the engine; if the job is cancelled or expires meanwhile, cancel the requests
    that have not started, so the engine never spends a batch on them. Returns DRAINING, at
    once, when the worker starts stopping: the engine cancels what has not started, and the
    task hands it back."""
    waiting = set(futures)
    while waiting:
        _, waiting = wait(waiting, timeout=_STOP_CHECK_SECONDS)
        if s.engine.draining:
            return DRAINING
        if not waiting:
            return None
        reason = stop_reason(s.store, job_id)
        if reason is None:
            continue
        for future in waiting:
            future.cancel()
        wait(waiting)  # the ones already running finish; their answers are kept
        return reason
    return None


def _send_back(task: Any, args: list[Any], argsrepr: str) -> None:
    """Put a copy of this task, with what is left of it, back on the queue it came from; the
    task then returns and its own message is acknowledged (the copy is queued first, so a
    crash in between leaves two deliveries, never none)."""
    queue = (task.request.delivery_info or {}).get("routing_key")
    if task.name == TASK_CHUNK:
        args = [*args[:2], json.dumps(args[2], separators=(",", ":"))]
    task.app.send_task(task.name, args=args, queue=queue, argsrepr=argsrepr)
    logger.info("worker stopping: task %s handed back to %s", task.request.id, queue)


def _close(store: JobStore, job_id: str, items: list[dict[str, Any]], reason: tuple[ErrorCode, str]) -> None:
    """Lines that will not run (cancelled or expired job) get their error lines."""
    error = RequestError(*reason)
    store.record_lines(
        job_id,
        [(item["line"], "error", _error(item["custom_id"], item["line"], error, with_response=False).model_dump(), 0) for item in items],
    )
    finish(store, job_id)
