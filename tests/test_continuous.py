"""Continuous batching on the tiny model, in process: rows that join a running batch answer as
they would alone, nothing is held behind anything, and shared prompt prefixes are reused."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from chatbatch.settings import Settings
from schemas import ChatCompletion, parse_chat_request
from schemas.chat import ChatCompletionRequest
from tests.test_engine import PROMPTS, _generate_alone
from worker.engine import Engine
from worker.model import load_runner
from worker.prefix_cache import BLOCK

SYSTEM = "You are a careful assistant. Answer briefly and plainly, in one line. " * 4


@pytest.fixture(scope="module", params=["dynamic", "static", "compiled"])
def runner(request: pytest.FixtureRequest, tiny_model: Path):  # type: ignore[no-untyped-def]
    """Each decode mode: rows joining a growing cache (dynamic), or slots of one static cache
    (static; compiled, the CUDA default, runs the same steps through torch.compile)."""
    return load_runner(str(tiny_model), Settings(redis_url="redis://127.0.0.1:1/0", decode=request.param, dtype="float32"))


def _request(text: str, system: str | None = None, **extra: object):  # type: ignore[no-untyped-def]
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return parse_chat_request({"messages": messages, "temperature": 0, **extra})


class Finishes:
    """Answers and the order they came in, from `submit_many`'s callback."""

    def __init__(self) -> None:
        self.order: list[str] = []
        self.answers: dict[str, ChatCompletion] = {}
        self.lock = threading.Lock()
        self.all_done = threading.Event()
        self.expected = 0
        self.names: dict[int, str] = {}

    def __call__(self, ticket) -> None:  # type: ignore[no-untyped-def]
        with self.lock:
            name = self.names[id(ticket)]
            self.order.append(name)
            self.answers[name] = ticket.result()
            if len(self.order) == self.expected:
                self.all_done.set()

    def submit(self, engine: Engine, named: list[tuple[str, ChatCompletionRequest]]) -> None:
        self.expected += len(named)
        tickets = engine.submit_many([(request, name) for name, request in named], self)
        with self.lock:
            self.names.update({id(ticket): name for ticket, (name, _) in zip(tickets, named)})


def _run_lines(engine: Engine, named: list[tuple[str, ChatCompletionRequest]]) -> Finishes:
    """Submit named batch lines before the engine starts, run them all, stop the engine."""
    finishes = Finishes()
    finishes.submit(engine, named)
    engine.start()
    try:
        assert finishes.all_done.wait(120)
    finally:
        engine.stop()
    return finishes


def test_rows_admitted_mid_decode_answer_as_generate_alone(runner) -> None:  # type: ignore[no-untyped-def]
    """One prompt token of prefill per step: every request joins a batch already decoding, at a
    different width and step, and leaves it at its own (in the slot layout, past shifts of the
    shared column)."""
    engine = Engine(runner, batch_wait=0.0, max_prefill_tokens=1, max_batch_size=3)
    assert engine.schedule == "continuous"
    texts = PROMPTS * 2  # enough steps for the shared column to run past the context
    futures = [engine.submit(_request(text, max_tokens=40), f"r{i}") for i, text in enumerate(texts)]
    engine.start()
    try:
        outcomes = [future.result(timeout=300) for future in futures]
    finally:
        engine.stop()
    assert engine.stats["batches"] == len(texts), "each request joined on its own step"
    if runner.decode != "dynamic":
        assert engine.running.shifts > 0, "the slots' columns were shifted to make room"
    else:
        assert engine.running.joined_in_place > 0, "rows joined into the places of rows that finished"
    alone = {text: _generate_alone(runner, text, 40) for text in PROMPTS}
    for text, outcome in zip(texts, outcomes):
        assert outcome.choices[0].message.content == alone[text], text


def test_a_long_request_is_held_neither_behind_short_ones_nor_holds_them(runner) -> None:  # type: ignore[no-untyped-def]
    engine = Engine(runner, batch_wait=0.0, max_batch_size=2)
    early = [(f"early{i}", _request(f"short {i}", max_tokens=2)) for i in range(10)]
    long = [("long", _request("a long answer", max_tokens=60, logit_bias={str(t): -100 for t in runner.eos_ids}))]
    late = [(f"late{i}", _request(f"short {i}", max_tokens=2)) for i in range(40)]
    finishes = _run_lines(engine, early + long + late)
    order = finishes.order
    assert finishes.answers["long"].usage.completion_tokens == 60
    assert order.index("long") < len(order) - 1, "the long request finished while short ones were still coming"
    assert order.index("late0") < order.index("long"), "short requests went on beside the long one"
    assert all(order.index(f"early{i}") < order.index("late0") for i in range(10)), "first come, first admitted"


def test_batch_lines_join_once_an_eighth_of_the_rows_is_free(runner) -> None:  # type: ignore[no-untyped-def]
    """Rows finishing one at a time: lines join a few at a time (fewer prefill passes), with
    the same answers as joining at every step."""
    if runner.decode != "dynamic":
        pytest.skip("the slot layout frees rows at host syncs; it does not hold lines")
    lines = [(f"l{i}", _request(f"line {i}", max_tokens=2 + i % 9)) for i in range(60)]
    runs = {}
    for hold in (0, 8):
        engine = Engine(runner, batch_wait=0.0, max_batch_size=16)
        engine.running.hold_steps = hold
        finishes = _run_lines(engine, lines)
        runs[hold] = (engine.stats["batches"], {name: answer.choices[0].message.content for name, answer in finishes.answers.items()})
    assert runs[8][1] == runs[0][1]
    assert runs[8][0] < runs[0][0], f"{runs[8][0]} joins holding against {runs[0][0]} joining at every step"


def test_single_requests_waiting_for_a_full_batch_join_a_few_at_a_time(runner) -> None:  # type: ignore[no-untyped-def]
    """Single requests are held as batch lines are, when every row is busy: each join is a
    prefill pass the rows beside them pay for; the answers are the same."""
    if runner.decode != "dynamic":
        pytest.skip("the slot layout frees rows at host syncs; it does not hold requests")
    # Rows that finish one at a time: one frees up at each step.
    no_eos = {str(t): -100 for t in runner.eos_ids}
    requests = [_request(f"single {i}", max_tokens=4 + i % 16, logit_bias=no_eos) for i in range(48)]
    runs = {}
    for hold in (0, 8):
        engine = Engine(runner, batch_wait=0.0, max_batch_size=16)
        engine.running.hold_steps = hold
        futures = [engine.submit(request, f"s{i}") for i, request in enumerate(requests)]
        engine.start()
        try:
            answers = [future.result(timeout=120).choices[0].message.content for future in futures]
        finally:
            engine.stop()
        runs[hold] = (engine.stats["batches"], answers)
    assert runs[8][1] == runs[0][1]
    assert runs[8][0] < runs[0][0], f"{runs[8][0]} joins holding against {runs[0][0]} joining at every step"


def test_occupancy_up_to_the_last_admission_counts_steps_starved_of_work(runner) -> None:  # type: ignore[no-untyped-def]
    """A batch that runs one row of four while the next request is still to come reads a low
    occupancy over its steps up to the last admission, though no request ever waited."""
    engine = Engine(runner, batch_wait=0.0, max_batch_size=4)
    no_eos = {str(t): -100 for t in runner.eos_ids}
    steps_before = runner.decode_steps
    engine.start()
    try:
        first = engine.submit(_request("the first", max_tokens=48, logit_bias=no_eos), "first")
        while runner.decode_steps < steps_before + 16:
            time.sleep(0.005)
        second = engine.submit(_request("the second", max_tokens=4, logit_bias=no_eos), "second")
        first.result(timeout=120), second.result(timeout=120)
    finally:
        engine.stop()
    figures = engine.figures()
    steps, fed, mean = int(figures["steps"]), int(figures["steps_fed"]), float(figures["mean_occupancy_fed"])
    assert steps > fed >= 1
    assert mean < 0.5, figures
    assert mean == pytest.approx(float(figures["occupancy_sum_fed"]) / fed, abs=1e-3)


def test_a_single_request_is_admitted_ahead_of_waiting_batch_lines(runner) -> None:  # type: ignore[no-untyped-def]
    engine = Engine(runner, batch_wait=0.0, max_batch_size=2)
    finishes = Finishes()
    finishes.submit(engine, [(f"line{i}", _request(f"line {i}", max_tokens=8)) for i in range(30)])
    engine.start()
    try:
        while engine.stats["requests"] < 2:
            time.sleep(0.005)
        single = engine.submit(_request("someone waits", max_tokens=8), "single")
        answer = single.result(timeout=60)
        done_before = len(finishes.order)
        assert finishes.all_done.wait(120)
    finally:
        engine.stop()
    assert isinstance(answer, ChatCompletion)
    assert done_before <= 8, f"{done_before} of 30 earlier lines finished before the single request"


def test_prefix_reuse_answers_as_no_reuse_and_reports_cached_tokens(runner, tiny_model: Path) -> None:  # type: ignore[no-untyped-def]
    if runner.decode == "compiled":
        pytest.skip("the static decode covers the slot layout; compiling twice more adds nothing")
    questions = [f"question {i}: {word}?" for i, word in enumerate(["why", "how", "when", "where", "who", "what", "which", "whose"])]
    requests = [(f"q{i}", _request(q, system=SYSTEM, max_tokens=8)) for i, q in enumerate(questions)]
    prompt = len(runner.tokenizer(SYSTEM, add_special_tokens=False)["input_ids"])
    assert prompt >= 2 * BLOCK, "the shared system prompt spans at least two blocks"

    def run(reuse: bool) -> dict[str, ChatCompletion]:
        settings = Settings(redis_url="redis://127.0.0.1:1/0", decode=runner.decode, prefix_cache_mb=64 if reuse else 0, dtype="float32")
        own = load_runner(str(tiny_model), settings)
        engine = Engine(own, batch_wait=0.0)
        finishes = _run_lines(engine, requests)
        figures = engine.figures()
        assert (float(figures["cached_prompt_tokens"]) > 0) is reuse
        return finishes.answers

    reused, computed = run(True), run(False)
    cached = [_cached(reused[name]) for name, _ in requests]
    assert cached[0] == 0, "the first prompt is computed whole"
    assert all(count >= 2 * BLOCK and count % BLOCK == 0 for count in cached[1:]), cached
    assert all(_cached(computed[name]) == 0 for name, _ in requests)
    for name, _ in requests:
        assert reused[name].choices[0].message.content == computed[name].choices[0].message.content, name
        assert reused[name].usage.prompt_tokens == computed[name].usage.prompt_tokens


def _cached(answer: ChatCompletion) -> int:
    details = answer.usage.prompt_tokens_details
    assert details is not None, "a transformers model reports its cached prompt tokens"
    return details.cached_tokens


def test_the_prefix_cache_stays_within_its_bound(tiny_model: Path) -> None:
    own = load_runner(str(tiny_model), Settings(redis_url="redis://127.0.0.1:1/0", decode="dynamic", prefix_cache_mb=1, dtype="float32"))
    config = own.model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    block = 2 * config.num_hidden_layers * (getattr(config, "num_key_value_heads", None) or heads) * BLOCK * head_dim * 4
    own.prefix_cache.max_bytes = 5 * block  # room for five blocks of the tiny model
    _run_lines(Engine(own, batch_wait=0.0, max_prefill_tokens=1), [(f"p{i}", _request("go", system=f"{i} " + SYSTEM, max_tokens=2)) for i in range(12)])
    cache = own.prefix_cache
    assert 0 < cache.bytes <= cache.max_bytes
    assert len(cache) == 5, "older blocks were evicted, and the newest kept"


def test_drain_finishes_the_rows_running_and_cancels_the_rest(runner) -> None:  # type: ignore[no-untyped-def]
    from concurrent.futures import wait

    engine = Engine(runner, batch_wait=0.0, max_batch_size=2)
    futures = [engine.submit(_request(f"line {i}", max_tokens=30), f"r{i}") for i in range(6)]
    engine.start()
    try:
        while not engine.figures()["rows_running"]:
            time.sleep(0.001)
        engine.drain()
        done, waiting = wait(futures, timeout=120)
        assert not waiting
        answered = [f for f in futures if not f.cancelled()]
        assert 1 <= len(answered) <= 4 and all(isinstance(f.result(), ChatCompletion) for f in answered)
        assert any(f.cancelled() for f in futures)
    finally:
        engine.stop()


def test_a_request_no_slot_can_hold_runs_alone_and_the_rest_go_on(runner) -> None:  # type: ignore[no-untyped-def]
    """More choices than slots, or a prompt plus max_tokens longer than a slot: the request
    runs per request, alone, once the batch has emptied; its neighbours run in the batch."""
    engine = Engine(runner, batch_wait=0.0, max_batch_size=2, max_batch_tokens=128)
    if runner.decode != "dynamic":
        assert (engine.running.slots, engine.running.length) == (1, 128)
    wide = engine.submit(_request("many", n=3, max_tokens=4), "wide")
    plain = engine.submit(_request("one", max_tokens=4), "plain")
    long = engine.submit(_request("long", max_tokens=120), "long")
    engine.start()
    try:
        assert isinstance(plain.result(timeout=60), ChatCompletion)
        assert len(wide.result(timeout=60).choices) == 3
        answer = long.result(timeout=60)
        assert answer.choices[0].message.content == _generate_alone(runner, "long", answer.usage.completion_tokens)
    finally:
        engine.stop()


class _FailingModel:
    """The runner's model, raising on its `fail_on`-th call (as a device running out of
    memory would)."""

    def __init__(self, model, fail_on: int) -> None:  # type: ignore[no-untyped-def]
        self.model, self.calls, self.fail_on = model, 0, fail_on

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self.model, name)

    def __call__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("out of memory")
        return self.model(*args, **kwargs)


def test_a_failing_step_answers_every_request_it_held(runner) -> None:  # type: ignore[no-untyped-def]
    """The model fails once, in the step after one request finished: that request keeps its
    answer, the requests the batch held run again apart and are answered as alone, and the
    engine goes on. A request alone in a batch that fails keeps the error."""
    from schemas import ErrorCode, RequestError

    if runner.decode != "dynamic":
        pytest.skip("the slot layout settles rows only after its device steps")
    engine = Engine(runner, batch_wait=0.0)
    short = engine.submit(_request("short", max_tokens=1), "short")
    longs = [engine.submit(_request(text, max_tokens=10), text) for text in ("long", "longer")]
    model = runner.model
    runner.model = _FailingModel(model, fail_on=2)  # the prefill, then the first decode step
    try:
        engine.start()
        assert short.result(timeout=60).usage.completion_tokens == 1
        for text, future in zip(("long", "longer"), longs):
            answer = future.result(timeout=60)
            assert answer.choices[0].message.content == _generate_alone(runner, text, answer.usage.completion_tokens)
        runner.model = _FailingModel(model, fail_on=2)
        alone = engine.submit(_request("alone", max_tokens=10), "alone")
        with pytest.raises(RequestError) as error:
            alone.result(timeout=60)
        assert error.value.code is ErrorCode.internal_error and "out of memory" in error.value.message
        runner.model = model
        assert isinstance(engine.submit(_request("after", max_tokens=3), "after").result(timeout=60), ChatCompletion)
    finally:
        runner.model = model
        engine.stop()
