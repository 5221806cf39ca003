"""What the transformers decodes hold for a request (`Prepared`: its prompt ids and limits) and
for each of its rows (`Row`: one choice, its tokens and how it ended), shared by the runner that
makes and settles them (worker/models/runners.py) and the batching strategies that step them
(worker/engine/continuous.py, worker/engine/slots.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from worker.decode.stops import StopFinder
from worker.engine.pending import TokenSink

if TYPE_CHECKING:
    from worker.decode.sampling import SamplingParams


@dataclass
class Prepared:
    """A request as the transformers runner prepared it."""

    prompt_ids: list[int]
    max_new: int
    stops: list[str]
    #: The JSON Schema the answer must follow, and the field it comes from.
    schema: tuple[dict[str, Any], str] | None = None
    #: The keys of the prompt's blocks the prefix cache may serve, once hashed.
    prefix_keys: list[bytes] | None = None


@dataclass
class Row:
    """One sequence of a batch: a choice of a request."""

    #: Its request's key in the batch.
    item: int
    choice: int
    prepared: Prepared
    params: SamplingParams
    tokens: list[int] = field(default_factory=list)
    generated: int = 0
    finish: str | None = None
    text: str | None = None
    #: Per returned token: (its log probability, [(alternative, log probability)]).
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None
    #: How many of `tokens` the answer returns, when a stop string cut it.
    kept: int | None = None
    #: Why the row's grammar failed, when it did.
    grammar_error: str | None = None
    #: Watches the text for the row's stop strings, when it has some.
    finder: StopFinder | None = None
    #: The request's stream sink, when it is streamed (`Pending.stream`).
    stream: TokenSink | None = None
    #: Why the row's own work failed (its stop strings, stream or text), when it did: the row
    #: ended there, and its request gets internal_error.
    failure: str | None = None
