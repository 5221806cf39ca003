"""The batching engine on the tiny model, in process: batching must not change answers."""

from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Any

import pytest

from chatbatch.settings import Settings
from schemas import ChatCompletion, ErrorCode, RequestError, parse_chat_request
from worker.engine.scheduler import Engine
from worker.models.model import load_runner


@pytest.fixture(scope="module", params=["dynamic", "static"])
def runner(request: pytest.FixtureRequest, tiny_model: Path):  # type: ignore[no-untyped-def]
    """The tiny model's runner in each decode mode: the static one (preallocated cache, checks
    on the device, the CUDA default) must answer exactly as the dynamic one."""
    return load_runner(str(tiny_model), Settings(redis_url="redis://127.0.0.1:1/0", decode=request.param, dtype="float32"))


def _request(text: str, **extra: object):  # type: ignore[no-untyped-def]
    return parse_chat_request({"messages": [{"role": "user", "content": text}], **extra})


def _run_together(runner, requests, **engine_args):  # type: ignore[no-untyped-def]
    """Submit all requests before the engine starts, so they meet in the same batches."""
    engine = Engine(runner, batch_wait=0.0, **engine_args)
    futures = [engine.submit(request, f"r{i}") for i, request in enumerate(requests)]
    engine.start()
    try:
        outcomes = []
        for future in futures:
            try:
                outcomes.append(future.result(timeout=120))
            except RequestError as error:
                outcomes.append(error)
        return outcomes, engine.stats
    finally:
        engine.stop()


def _generate_alone(runner, text: str, max_new: int) -> str:  # type: ignore[no-untyped-def]
    """What transformers' own generate gives for one request, alone, greedy."""
    import torch

    tokenizer = runner.tokenizer
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    with torch.inference_mode():
        out = runner.model.generate(**ids, max_new_tokens=max_new, do_sample=False, pad_token_id=runner.pad_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


PROMPTS = [
    "hi",
    "Write me a hello world program in python",
    "The quick brown fox jumps over the lazy dog, " * 3,
    "0123456789",
    "Batch inference turns many chat requests into one generate call.",
    "a b c d e f g",
    "system user assistant",
    "Explain batching.",
    "lazy " * 9,
    "fox?",
    "What is the capital of France? Answer in one word.",
    "print('x')",
    "one two three four five six seven eight nine ten eleven twelve",
    "!",
    "The quick brown fox",
    "dog " * 20,
    "many chat requests",
    "x" * 40,
]


def test_batched_greedy_equals_one_at_a_time(runner) -> None:  # type: ignore[no-untyped-def]
    requests = [_request(text, temperature=0, max_tokens=16) for text in PROMPTS]
    lengths = {len(runner.tokenizer(t)["input_ids"]) for t in PROMPTS}
    assert len(lengths) >= 10, "the prompts must differ in length"
    outcomes, stats = _run_together(runner, requests, max_batch_size=len(requests))
    assert stats["batches"] == 1 and stats["largest_batch"] == len(PROMPTS)
    for text, outcome in zip(PROMPTS, outcomes):
        assert isinstance(outcome, ChatCompletion)
        assert outcome.choices[0].message.content == _generate_alone(runner, text, 16), text


def test_context_length_exceeded_spares_the_batch(runner) -> None:  # type: ignore[no-untyped-def]
    too_long = _request("word " * 400, max_tokens=8, temperature=0)
    fits_but_max_tokens_too_big = _request("hi", max_tokens=runner.context_length, temperature=0)
    good = [_request(text, max_tokens=8, temperature=0) for text in PROMPTS[:4]]
    outcomes, stats = _run_together(runner, [good[0], too_long, good[1], fits_but_max_tokens_too_big, *good[2:]])
    assert isinstance(outcomes[1], RequestError)
    assert outcomes[1].code is ErrorCode.context_length_exceeded
    assert "context" in outcomes[1].message and "max_tokens" in outcomes[1].message
    assert isinstance(outcomes[3], RequestError)
    assert outcomes[3].code is ErrorCode.context_length_exceeded
    good_outcomes = [outcomes[0], outcomes[2], *outcomes[4:]]
    assert all(isinstance(o, ChatCompletion) for o in good_outcomes)
    assert stats["batches"] == 1 and stats["requests"] == len(good)


def test_max_tokens_finish_reason_and_usage(runner) -> None:  # type: ignore[no-untyped-def]
    (out,), _ = _run_together(runner, [_request("hello", temperature=0, max_completion_tokens=5)])
    assert isinstance(out, ChatCompletion)
    prompt = runner.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True
    )
    assert out.usage.prompt_tokens == len(runner.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    choice = out.choices[0]
    if choice.finish_reason == "length":
        assert out.usage.completion_tokens == 5
    else:  # EOS came first
        assert out.usage.completion_tokens <= 5
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_stop_sequence_cuts_text_and_sets_stop(runner) -> None:  # type: ignore[no-untyped-def]
    (free,), _ = _run_together(runner, [_request("fox", temperature=0, max_tokens=24)])
    text = free.choices[0].message.content
    assert len(text) > 4
    stop = text[2:4]
    (cut,), _ = _run_together(runner, [_request("fox", temperature=0, max_tokens=24, stop=[stop])])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[: text.find(stop)]
    assert stop not in cut.choices[0].message.content


def test_mixed_sampling_settings_share_one_batch_and_seed_reproduces(runner) -> None:  # type: ignore[no-untyped-def]
    requests = [
        _request("fox", temperature=0, max_tokens=12),
        _request("fox", temperature=1.3, top_p=0.9, seed=7, max_tokens=12, n=3),
        _request("fox", temperature=0.7, seed=11, max_tokens=12),
        _request("fox", temperature=1.0, max_tokens=12, n=2),
    ]
    first, stats = _run_together(runner, requests)
    assert stats["batches"] == 1 and stats["largest_batch"] == 7
    assert [len(o.choices) for o in first] == [1, 3, 1, 2]
    assert [c.index for c in first[1].choices] == [0, 1, 2]
    # Seeded answers do not depend on the batch they ran in.
    alone, _ = _run_together(runner, [requests[1]])
    assert [c.message.content for c in alone[0].choices] == [c.message.content for c in first[1].choices]
    assert len({c.message.content for c in first[1].choices}) > 1, "each choice samples its own text"
    # Usage counts the tokens of all n choices.
    assert 3 < first[1].usage.completion_tokens <= 3 * 12
    greedy_alone, _ = _run_together(runner, [requests[0]])
    assert greedy_alone[0].choices[0].message.content == first[0].choices[0].message.content


def test_engine_rejects_bad_limits(runner) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="max_batch_size"):
        Engine(runner, max_batch_size=0)
    with pytest.raises(ValueError, match="batch_wait"):
        Engine(runner, batch_wait=-1)


class Held:
    """A runner held inside its first batch until the test releases it."""

    def __init__(self, runner) -> None:  # type: ignore[no-untyped-def]
        self.runner = runner
        self.served_name = runner.served_name
        self.batched = True
        self.started = threading.Event()
        self.release = threading.Event()

    def prepare_many(self, items):  # type: ignore[no-untyped-def]
        return self.runner.prepare_many(items)

    def run_batch(self, items):  # type: ignore[no-untyped-def]
        self.started.set()
        self.release.wait(60)
        return self.runner.run_batch(items)


def test_a_continuous_batch_is_checked_when_the_engine_is_set_up(runner) -> None:  # type: ignore[no-untyped-def]
    """A runner offers a continuous batch through `continuous()`: what it gives must be a
    ContinuousBatch, or the engine refuses to be set up; a runner without one batches per
    request."""

    class Offers(Held):
        def continuous(self, max_rows: int, max_tokens: int) -> object:
            return object()

    with pytest.raises(TypeError, match="not a ContinuousBatch"):
        Engine(Offers(runner))
    assert Engine(Offers(runner), schedule="request").schedule == "request"
    assert Engine(Held(runner)).schedule == "request"
    assert Engine(runner).schedule == "continuous"


def test_drain_cancels_what_has_not_started_and_finishes_the_running_batch(runner) -> None:  # type: ignore[no-untyped-def]
    from concurrent.futures import wait

    held = Held(runner)
    engine = Engine(held, batch_wait=0.0, max_batch_size=2)
    engine.start()
    try:
        running = [engine.submit(_request(f"run {i}", max_tokens=4), f"r{i}") for i in range(2)]
        assert held.started.wait(60)
        queued = [engine.submit(_request(f"wait {i}", max_tokens=4), f"q{i}") for i in range(5)]
        engine.drain()
        late = engine.submit(_request("late", max_tokens=4), "late")
        assert late.cancelled() and late.done()
        held.release.set()
        done, waiting = wait(running + queued + [late], timeout=60)
        assert not waiting, "every waiter is woken: cancelled futures are notified"
        assert all(isinstance(f.result(), ChatCompletion) for f in running)
        assert all(f.cancelled() for f in queued)
        assert engine.stats["batches"] == 1
    finally:
        held.release.set()
        engine.stop()


def test_stop_answers_every_request_left_and_keeps_cancellations(runner) -> None:  # type: ignore[no-untyped-def]
    """Requests still queued when the engine stops get an error, so no task waits for ever; one
    cancelled meanwhile stays cancelled (and does not stop the engine thread with an error)."""
    import time
    from concurrent.futures import wait

    held = Held(runner)
    engine = Engine(held, batch_wait=0.0, max_batch_size=2)
    engine.start()
    stopper = threading.Thread(target=engine.stop)
    try:
        running = [engine.submit(_request(f"run {i}", max_tokens=4), f"r{i}") for i in range(2)]
        assert held.started.wait(60)
        queued = [engine.submit(_request(f"left {i}", max_tokens=4), f"q{i}") for i in range(3)]
        assert queued[1].cancel()
        stopper.start()
        deadline = time.monotonic() + 10
        while not engine._stopping.is_set() and time.monotonic() < deadline:  # stop() has begun
            time.sleep(0.01)
        held.release.set()
        stopper.join(60)
        _, waiting = wait(running + queued, timeout=10)
        assert not waiting, "every waiter is woken"
        assert all(isinstance(f.result(), ChatCompletion) for f in running)
        for future in (queued[0], queued[2]):
            with pytest.raises(RequestError, match="stopped before this request ran"):
                future.result()
        assert queued[1].cancelled()
    finally:
        held.release.set()
        engine.stop()


def test_submit_many_answers_each_ticket_once_through_its_callback(runner) -> None:  # type: ignore[no-untyped-def]
    """A chunk's lines go in as tickets: each callback comes once, from the engine thread for
    an answer or an error, or from the canceller; a cancelled ticket never runs."""
    from concurrent.futures import CancelledError, InvalidStateError

    from worker.engine.pending import Ticket

    held = Held(runner)
    calls: list[tuple[Ticket, str]] = []
    all_called = threading.Event()

    def on_done(ticket: Ticket) -> None:
        calls.append((ticket, threading.current_thread().name))
        if len(calls) == 6:
            all_called.set()

    engine = Engine(held, batch_wait=0.0, max_batch_size=2)
    engine.start()
    try:
        running = engine.submit_many([(_request(f"run {i}", max_tokens=4, temperature=0), f"r{i}") for i in range(2)], on_done)
        assert held.started.wait(60)
        queued = engine.submit_many(
            [(_request("word " * 400, max_tokens=8), "too-long"), *((_request(f"wait {i}", max_tokens=4), f"q{i}") for i in range(3))],
            on_done,
        )
        assert not any(ticket.done() for ticket in running + queued)
        with pytest.raises(InvalidStateError):
            running[0].result()
        assert [ticket.cancel() for ticket in running] == [False, False]  # their batch has started
        assert queued[1].cancel() and queued[1].cancel() and queued[1].cancelled()
        held.release.set()
        assert all_called.wait(60)
        assert sorted(id(ticket) for ticket, _ in calls) == sorted(id(ticket) for ticket in running + queued)
        by_ticket = {id(ticket): thread for ticket, thread in calls}
        assert by_ticket[id(queued[1])] == threading.current_thread().name
        assert {by_ticket[id(t)] for t in running + [queued[0], queued[2], queued[3]]} == {"chatbatch-engine"}
        assert all(isinstance(ticket.result(), ChatCompletion) for ticket in running + queued[2:])
        with pytest.raises(RequestError) as error:
            queued[0].result()
        assert error.value.code is ErrorCode.context_length_exceeded
        with pytest.raises(CancelledError):
            queued[1].result()
        assert engine.stats["requests"] == 4  # the cancelled line never ran
        with pytest.raises(InvalidStateError):
            queued[1].set_result(running[0].result())
    finally:
        held.release.set()
        engine.stop()


def test_a_chunks_answers_are_freed_as_soon_as_its_task_lets_go(runner) -> None:  # type: ignore[no-untyped-def]
    """A ticket drops its callback once called: a task's callback that keeps its tickets would
    otherwise close a cycle holding every answer of the chunk until a full garbage collection
    (the worker's grew by ~30 MB per 20,000-line job before a full pass)."""
    import gc
    import time
    import weakref

    from worker.engine.pending import Ticket

    class Task:
        def __init__(self) -> None:
            self.finished: list[Ticket] = []
            self.all_done = threading.Event()

        def on_done(self, ticket: Ticket) -> None:
            self.finished.append(ticket)
            if len(self.finished) == 3:
                self.all_done.set()

    engine = Engine(runner, batch_wait=0.0)
    engine.start()
    gc.disable()
    try:
        task = Task()
        engine.submit_many([(_request(f"free {i}", max_tokens=2), f"f{i}") for i in range(3)], task.on_done)
        assert task.all_done.wait(120)
        gone = weakref.ref(task)
        del task
        deadline = time.monotonic() + 10  # the engine thread may still be returning from the last callback
        while gone() is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert gone() is None, "the task's answers are held by a reference cycle"
    finally:
        gc.enable()
        engine.stop()


def test_a_failing_start_hook_fails_its_request_and_the_engine_goes_on(runner) -> None:  # type: ignore[no-untyped-def]
    """`on_start` runs Redis commands in the engine thread (a suspect's attempt count): when it
    raises, that request gets internal_error, and the engine keeps serving."""
    import redis

    def broken() -> RequestError | None:
        raise redis.ConnectionError("Redis went away")

    engine = Engine(runner, batch_wait=0.0)
    engine.start()
    try:
        failing = engine.submit(_request("suspect", max_tokens=2), "suspect", alone=True, on_start=broken)
        with pytest.raises(RequestError) as error:
            failing.result(timeout=60)
        assert error.value.code is ErrorCode.internal_error and "Redis went away" in error.value.message
        after = engine.submit(_request("next", max_tokens=2), "next")
        assert isinstance(after.result(timeout=60), ChatCompletion)
        assert not engine.died.is_set()
    finally:
        engine.stop()


def test_an_engine_thread_that_dies_says_so(runner) -> None:  # type: ignore[no-untyped-def]
    """An error of the engine's own (not a request's) ends the thread with `died` set; later
    requests fail at once instead of waiting for ever."""

    class Exiting(Held):
        def run_batch(self, items):  # type: ignore[no-untyped-def]
            raise SystemExit("the model's library called exit()")

    engine = Engine(Exiting(runner), batch_wait=0.0)
    engine.start()
    try:
        engine.submit(_request("first", max_tokens=2), "first")
        assert engine.died.wait(60)
        assert isinstance(engine.failure, SystemExit)
        late = engine.submit(_request("late", max_tokens=2), "late")
        with pytest.raises(RequestError, match="engine stopped"):
            late.result(timeout=5)
    finally:
        engine.stop()


def test_every_request_feature_in_one_batch_in_each_decode_mode(runner, tiny_model: Path) -> None:  # type: ignore[no-untyped-def]
    """Structured output, tools, log probabilities, bias and penalties beside plain requests,
    in one batch: the static decode (the CUDA default) answers exactly as the dynamic one."""
    import json

    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}, "c": {"enum": ["a", "b"]}},
              "required": ["n", "c"], "additionalProperties": False}
    tool = {"type": "function", "function": {"name": "f", "parameters": schema}}
    requests = [
        _request("json", response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}, max_tokens=40, temperature=0),
        _request("call", tools=[tool], tool_choice={"type": "function", "function": {"name": "f"}}, max_tokens=40, temperature=0),
        _request("scored", logprobs=True, top_logprobs=2, max_tokens=6, temperature=0),
        _request("biased", logit_bias={"40": 100}, presence_penalty=1.0, frequency_penalty=0.5, max_tokens=6, temperature=0),
        _request("plain", max_tokens=6, temperature=0),
    ]
    outcomes, stats = _run_together(runner, requests)
    assert stats["batches"] == 1
    json_answer, call, scored, biased, plain = (o.choices[0] for o in outcomes)
    assert json_answer.finish_reason == "stop" and set(json.loads(json_answer.message.content)) == {"n", "c"}
    assert call.finish_reason == "tool_calls" and set(json.loads(call.message.tool_calls[0].function.arguments)) == {"n", "c"}
    assert scored.logprobs is not None and len(scored.logprobs.content) == outcomes[2].usage.completion_tokens
    assert biased.message.content.startswith(runner.tokenizer.decode([40]))
    (alone,), _ = _run_together(runner, [requests[4]])
    assert alone.choices[0].message.content == plain.message.content
    if runner.decode != "dynamic":
        dynamic = load_runner(str(tiny_model), Settings(redis_url="redis://127.0.0.1:1/0", decode="dynamic", dtype="float32"))
        reference, _ = _run_together(dynamic, requests)
        for mine, theirs in zip(outcomes, reference):
            assert mine.choices[0].message.content == theirs.choices[0].message.content
            assert mine.choices[0].finish_reason == theirs.choices[0].finish_reason


def test_logprobs_of_n_choices_stay_with_their_rows_as_rows_leave(runner) -> None:  # type: ignore[no-untyped-def]
    """Choices of different lengths leave the batch at different steps (the dynamic decode
    drops them): each keeps exactly its own tokens' log probabilities."""
    request = _request("many", n=4, temperature=1.0, seed=5, max_tokens=10, stop=["e"], logprobs=True, top_logprobs=1)
    plain = _request("neighbour", max_tokens=10, temperature=0)
    (outcome, _), _ = _run_together(runner, [request, plain])
    lengths = set()
    for choice in outcome.choices:
        entries = choice.logprobs.content
        text = b"".join(bytes(entry.bytes) for entry in entries).decode(errors="replace")
        assert text.startswith(choice.message.content), (text, choice.message.content)
        assert all(entry.top_logprobs[0].logprob >= entry.logprob - 1e-6 for entry in entries)
        lengths.add(len(entries))
    assert len(lengths) > 1, "the choices ended at different steps"


def test_stop_strings_do_not_cut_an_answer_a_grammar_shapes(runner) -> None:  # type: ignore[no-untyped-def]
    import json

    schema = {"type": "object", "properties": {"c": {"enum": ["a", "b"]}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["c", "n"], "additionalProperties": False}
    (outcome,), _ = _run_together(runner, [_request("json", response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
                                                    stop=["\""], max_tokens=40, temperature=0)])
    assert outcome.choices[0].finish_reason == "stop" and set(json.loads(outcome.choices[0].message.content)) == {"c", "n"}


def test_a_later_chunk_goes_in_turn_with_an_earlier_one(runner) -> None:  # type: ignore[no-untyped-def]
    """Batch lines of two chunks are taken and admitted in turn, so a small chunk queued behind
    a large one is answered early, not after the whole of it (docs/scheduling.md)."""
    from worker.engine.pending import Ticket

    finished: list[str] = []
    lock = threading.Lock()
    everything = threading.Event()

    def on_done(ticket: Ticket) -> None:
        with lock:
            finished.append(names[id(ticket)])
            if len(finished) == 44:
                everything.set()

    engine = Engine(runner, batch_wait=0.0, max_batch_size=4)
    large = engine.submit_many([(_request(f"large {i}", max_tokens=6, temperature=0), f"l{i}") for i in range(40)], on_done)
    small = engine.submit_many([(_request(f"small {i}", max_tokens=6, temperature=0), f"s{i}") for i in range(4)], on_done)
    names = {**{id(t): "large" for t in large}, **{id(t): "small" for t in small}}
    engine.start()
    try:
        assert everything.wait(120)
    finally:
        engine.stop()
    last_small = max(i for i, name in enumerate(finished) if name == "small")
    assert last_small < 16, finished


def test_service_tiers_order_single_requests_and_batch_lines(runner) -> None:  # type: ignore[no-untyped-def]
    """`priority` requests go before `default` ones of their kind, and `flex` single requests
    wait behind batch lines (docs/scheduling.md); every answer names the tier it ran in."""
    from worker.engine.pending import Ticket

    finished: list[str] = []
    lock = threading.Lock()

    def done(name: str) -> None:
        with lock:
            finished.append(name)

    def on_done(ticket: Ticket) -> None:
        done(lines[id(ticket)])

    engine = Engine(runner, batch_wait=0.0, max_batch_size=2)
    tickets = engine.submit_many(
        [(_request(f"line {i}", max_tokens=6, temperature=0, **({"service_tier": "flex"} if i == 0 else {})), f"b{i}") for i in range(4)], on_done
    )
    lines = {id(ticket): "line-flex" if i == 0 else "line" for i, ticket in enumerate(tickets)}
    futures: dict[Any, str] = {}
    for tier in ("flex", "flex", "default", "default", "priority", "priority"):
        future = engine.submit(_request(f"single {len(futures)}", max_tokens=6, temperature=0, service_tier=tier), f"s{len(futures)}")
        future.add_done_callback(functools.partial(lambda tier, _: done(tier), tier))
        futures[future] = tier
    engine.start()
    try:
        answers = {tier: future.result(timeout=120) for future, tier in futures.items()}
    finally:
        engine.stop()
    assert {tier: answer.service_tier for tier, answer in answers.items()} == {"flex": "flex", "default": "default", "priority": "priority"}
    assert finished[:4] == ["priority", "priority", "default", "default"], finished
    last_line = max(i for i, name in enumerate(finished) if name == "line")
    assert min(i for i, name in enumerate(finished) if name in ("flex", "line-flex")) > last_line, finished


# A request that breaks fails alone, whatever the reason.

NEIGHBOURS = ["hi", "Explain batching.", "fox?", "print('x')", "a b c d e f g"]
HOSTILE = "word " * 60  # the only prompt whose positions pass 60


def _bypassing_validation(text: str):  # type: ignore[no-untyped-def]
    """A request whose content validation would refuse (as an older producer could send):
    what reaches the engine is the engine's to survive."""
    request = _request("placeholder", temperature=0, max_tokens=8)
    request.messages[0].content = text
    return request


def _assert_neighbours_answer_as_alone(runner, outcomes) -> None:  # type: ignore[no-untyped-def]
    for text, outcome in zip(NEIGHBOURS, outcomes):
        assert isinstance(outcome, ChatCompletion), (text, outcome)
        assert outcome.choices[0].message.content == _generate_alone(runner, text, outcome.usage.completion_tokens), text


@pytest.mark.parametrize("schedule", ["continuous", "request"])
def test_text_the_tokenizer_refuses_fails_alone(runner, schedule: str) -> None:  # type: ignore[no-untyped-def]
    """An unpaired surrogate makes the tokenizer's batch encode raise for every prompt in the
    call: the engine encodes one by one, and only that request fails (invalid_request)."""
    requests = [_request(text, temperature=0, max_tokens=8) for text in NEIGHBOURS]
    requests.insert(2, _bypassing_validation("bad \udc80 text"))
    outcomes, _ = _run_together(runner, requests, schedule=schedule)
    refused = outcomes.pop(2)
    assert isinstance(refused, RequestError) and refused.code is ErrorCode.invalid_request
    assert refused.param == "messages" and "tokenizer refused" in refused.message
    _assert_neighbours_answer_as_alone(runner, outcomes)


class _BreaksOn:
    """The runner's model, failing every forward pass (`prefill` ones, or decode steps) in
    which some row's position passes `limit`: a request that breaks any batch it is in."""

    def __init__(self, model, limit: int, *, prefill: bool) -> None:  # type: ignore[no-untyped-def]
        self.model, self.limit, self.prefill, self.failures = model, limit, prefill, 0

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self.model, name)

    def __call__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if (kwargs["input_ids"].shape[1] > 1) == self.prefill and int(kwargs["position_ids"].max()) > self.limit:
            self.failures += 1
            raise RuntimeError("this row breaks its batch")
        return self.model(*args, **kwargs)


@pytest.mark.parametrize(("schedule", "prefill"), [("continuous", True), ("continuous", False), ("request", True), ("request", False)])
def test_a_request_that_breaks_its_batch_fails_alone(runner, schedule: str, prefill: bool) -> None:  # type: ignore[no-untyped-def]
    """The model fails whenever one request is in the batch, at its prefill or at a decode
    step: the batch runs again in halves (or the joining requests one at a time) until that
    request fails alone; every other request is answered as it would be alone."""
    requests = [_request(text, temperature=0, max_tokens=8) for text in NEIGHBOURS]
    requests.insert(3, _request(HOSTILE, temperature=0, max_tokens=8))
    model = runner.model
    runner.model = broken = _BreaksOn(model, 60, prefill=prefill)
    try:
        outcomes, _ = _run_together(runner, requests, schedule=schedule)
    finally:
        runner.model = model
    assert broken.failures >= 2  # in its batch, then alone
    hostile = outcomes.pop(3)
    assert isinstance(hostile, RequestError) and hostile.code is ErrorCode.internal_error
    assert "breaks its batch" in hostile.message
    _assert_neighbours_answer_as_alone(runner, outcomes)


class _BrokenSink:
    """A streamed request's sink that fails at its first token (its stream cannot be written)."""

    cancelled = False
    sent = False

    def put(self, choice: int, token: int) -> None:
        raise OSError("the stream's sink failed")


def test_a_row_that_breaks_leaves_and_its_neighbours_go_on(runner) -> None:  # type: ignore[no-untyped-def]
    """A row whose own per-token work fails (here its stream) finishes at once with
    internal_error; the rows beside it decode on in the same batch, never run again."""
    engine = Engine(runner, batch_wait=0.0)
    futures = [engine.submit(_request(text, temperature=0, max_tokens=8), f"n{i}") for i, text in enumerate(NEIGHBOURS)]
    broken = engine.submit(_request("stream me", temperature=0, max_tokens=8), "broken", stream=_BrokenSink())
    engine.start()
    try:
        with pytest.raises(RequestError) as error:
            broken.result(timeout=120)
        assert error.value.code is ErrorCode.internal_error and "sink failed" in error.value.message
        _assert_neighbours_answer_as_alone(runner, [future.result(timeout=120) for future in futures])
        assert engine.stats["batches"] == 1  # one running batch took them all, and nothing ran again
    finally:
        engine.stop()
