"""The engine's declared interfaces (docs/engine.md#the-engine-interface).

- `InferenceEngine`: what the worker's service side (Celery tasks, chunks, the stream
  publisher, metrics, the process entry) uses of an engine: submit a prepared request, receive
  its token and answer events, cancel it, read its figures. `worker/engine/scheduler.py`
  `Engine` implements it.
- `Runner`: what `Engine` uses of a model runner, and `ContinuousRunner`, the declared way a
  runner offers a continuous batch.
- `ContinuousBatch`: a batching strategy that requests join and leave at every step, checked
  when the engine is set up (worker/engine/continuous.py `ContinuousDecode`,
  worker/engine/slots.py `SlotDecode`).
- `StepModel`: what those strategies use of their runner (worker/models/runners.py
  `TransformersRunner`): its forward passes, rows, sampler and answers.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from schemas.chat import ChatCompletion, ChatCompletionRequest
from schemas.errors import RequestError
from worker.engine.pending import Pending, Ticket, TokenSink
from worker.engine.rows import Row

if TYPE_CHECKING:
    import torch

    from worker.decode.sampling import BatchSampler, SamplingParams

#: Called in the engine thread with each request that ran or was refused, and its answer or
#: error (the worker's metrics); it must be quick.
Observer = Callable[[Pending, ChatCompletion | RequestError], None]


@dataclass(frozen=True)
class ModelInfo:
    """What an engine serves, as the worker reports it (heartbeat, metrics, job records)."""

    #: The name the worker serves, reported as `model` in every completion.
    served_name: str
    #: Where the model runs: `cpu`, `cuda`, `cuda:1`, ... (`pyfunc` for a pyfunc model).
    device: str
    #: What the model runs in (`bfloat16`, `float32`, ...; None: whatever the model's own
    #: predict uses).
    dtype: str | None
    #: The URI served and, for `models:/` URIs, the registered name and version loaded.
    lineage: dict[str, str] | None
    #: The tokenizer that turns streamed tokens into text (None: the model has none).
    tokenizer: Any


def describe(runner: Any) -> ModelInfo:
    """A runner's `ModelInfo`: worker/models/model.py `load_runner` gives a runner its dtype
    and lineage; a runner made otherwise (a test's) has none."""
    return ModelInfo(
        served_name=runner.served_name,
        device=str(getattr(runner, "device", "pyfunc")),
        dtype=getattr(runner, "dtype", None),
        lineage=getattr(runner, "lineage", None),
        tokenizer=getattr(runner, "tokenizer", None),
    )


class InferenceEngine(Protocol):
    """An engine as the worker's service side sees it.

    Events: a request's tokens go to its `TokenSink` as they are generated (engine thread), its
    answer (a ChatCompletion, or a RequestError) to its handle, and every answer or refusal to
    the `observer`. Cancel: the handle's `cancel()` before the request starts; once it runs,
    the sink's `cancelled` ends its rows at their next token.
    """

    #: Most sequences per batch; the worker sizes its task threads on it.
    max_batch_size: int
    #: Most prompt-plus-new tokens the batch may hold (its KV budget).
    max_batch_tokens: int
    #: The answers' `system_fingerprint` (worker/models/model.py `fingerprint`).
    fingerprint: str | None
    #: Set when the engine can no longer answer (its thread ended on an error of its own).
    died: threading.Event
    #: What ended it, once `died` is set.
    failure: BaseException | None
    observer: Observer | None

    @property
    def info(self) -> ModelInfo:
        """What it serves."""

    @property
    def draining(self) -> bool:
        """Whether it was told to start nothing more (`drain`)."""

    def start(self) -> None: ...

    def stop(self, timeout: float = 30.0) -> None: ...

    def drain(self) -> None:
        """Start nothing more: requests not running yet are cancelled, now and as they come."""

    def submit(
        self,
        request: ChatCompletionRequest,
        request_id: str,
        *,
        alone: bool = False,
        on_start: Callable[[], RequestError | None] | None = None,
        stream: TokenSink | None = None,
    ) -> Future[ChatCompletion]:
        """Queue one request; the future holds its ChatCompletion or raises RequestError."""

    def submit_many(self, requests: list[tuple[ChatCompletionRequest, str]], on_done: Callable[[Ticket], None]) -> list[Ticket]:
        """Queue (request, request_id) pairs at once; `on_done(ticket)` once each has its
        outcome or is cancelled."""

    def figures(self) -> dict[str, float | str]:
        """What it is doing now: rows running, requests waiting, occupancy, KV use
        (docs/engine.md#engine-figures)."""

    def counters(self) -> dict[str, float]:
        """Totals since it started: requests, batches, generated tokens, largest batch, busy
        seconds, cancelled requests."""


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


@runtime_checkable
class ContinuousBatch(Protocol):
    """A running batch that requests join and leave at every step. Only the engine thread uses
    it; `request_count` and `len()` may be read from any thread."""

    #: Most rows it can hold, when it has a fixed number of slots (else None).
    capacity: int | None
    #: Most steps waiting requests wait for an eighth of the rows to be free before they join
    #: (0: they join as soon as they fit).
    hold_steps: int
    #: Prompt tokens admitted, and those taken from the prefix cache, since the start.
    prompt_tokens: int
    cached_tokens: int

    @property
    def requests(self) -> list[Pending]:
        """The requests in the batch."""

    @property
    def request_count(self) -> int: ...

    def __len__(self) -> int:
        """Rows running."""

    def fits_ever(self, item: Pending) -> bool:
        """Whether a request can join this batch at all (else it runs per request)."""

    def fits(self, items: list[Pending]) -> bool:
        """Whether these requests can join together now."""

    def cached_prefix(self, item: Pending) -> int:
        """Prompt tokens of a request the prefix cache holds now."""

    def first_block(self, item: Pending) -> bytes | None:
        """The key of a prompt's first reusable block, if it has one."""

    def admit(self, items: list[Pending]) -> None:
        """Prefill these requests and add their rows.

        Raises:
            JoinRefused: their prefill failed; the batch is as it was.
        """

    def step(self) -> list[tuple[Pending, ChatCompletion | RequestError]]:
        """Decode; the requests whose last row finished, with their answers."""

    def abandon(self, failure: RequestError) -> list[tuple[Pending, ChatCompletion | RequestError]]:
        """Drop the batch: the answers settled before, and `failure` for every other request."""


@runtime_checkable
class ContinuousRunner(Protocol):
    """A runner that offers a continuous batch."""

    def continuous(self, max_rows: int, max_tokens: int) -> ContinuousBatch | None:
        """A running batch of up to `max_rows` rows and `max_tokens` KV tokens, or None where
        this model or decode mode batches per request only."""


class StepModel(Protocol):
    """What the continuous batching strategies use of their runner."""

    device: torch.device
    #: The token that pads prompts on the left.
    pad_id: int
    #: The width of the model's logits.
    vocab_size: int
    #: Forward passes of one token per row so far; a strategy counts the steps it runs itself.
    decode_steps: int

    def row(self, key: int, choice: int, item: Pending) -> Row:
        """A new row for one choice of a prepared request (its sampling settings, its stop
        strings, its stream)."""

    def sampler(self, params: list[SamplingParams], *, host_logprobs: bool = False) -> BatchSampler:
        """The sampler stage for rows with these settings."""

    def new_cache(self) -> Any:
        """An empty KV cache whose layers grow in place (worker/engine/kvcache.py)."""

    def slot_cache(self, slots: int, length: int) -> Any:
        """A static KV cache of `slots` rows of `length` tokens, allocated now."""

    def last_logits(self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any, **extra: Any) -> torch.Tensor:
        """One forward pass that fills `cache`; the float32 logits of each row's last position."""

    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, cache_position: torch.Tensor, mask: torch.Tensor, cache: Any) -> torch.Tensor:
        """One decode step over a static cache (compiled where the decode mode says so),
        counted in `decode_steps`."""

    def advance(self, row: Row, token: int) -> bool:
        """Give a row one generated token; True once it is finished (its finish reason set)."""

    def text_of(self, row: Row) -> str:
        """A finished row's text."""

    def completion(self, item: Pending, rows: list[Row], created: int) -> ChatCompletion:
        """A request's answer from its finished rows.

        Raises:
            RequestError: the answer cannot be given (a row's grammar or own work failed, or
                its client went away).
        """
