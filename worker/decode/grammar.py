"""Grammars for constrained decoding, with llguidance.

A request whose answer must be JSON (`response_format` `json_object` or `json_schema`) or a
forced tool call (`tool_choice` `required` or a named function) gets a grammar, compiled once
per distinct grammar (an LRU cache keyed by its text) and copied per row. Each decode step, the
sampler asks every constrained row's matcher for its token bitmask (llguidance fills them in
parallel, without the GIL), masks those rows' logits, samples, and tells each matcher the
token chosen. Every answer therefore parses, and validates against its schema, whatever the
model; an answer cut by `max_tokens` ends `length`, as with OpenAI. A forced call cut that way
is still a call (`cut_calls`): the calls as far as they were written, never grammar text.

JSON is generated with fixed separators (", " and ": ") and no free whitespace, so that a model
cannot spend its tokens on whitespace.
"""

from __future__ import annotations

import json
import re
import sys
import threading
from collections import OrderedDict
from typing import Any

from chatbatch.structured import JSON_OPTIONS
from schemas.chat import ChatCompletionRequest, NamedToolChoice
from schemas.errors import ErrorCode, RequestError
from worker.decode.chat_format import written_arguments

#: Compiled grammars kept (each a pristine matcher that rows copy).
CACHE_SIZE = 256


class Grammars:
    """Compiles grammars for one tokenizer and fills their token masks.

    Args:
        tokenizer: the model's transformers tokenizer (a fast one).
        vocab_size: the width of the model's logits (may exceed the tokenizer's vocabulary).
        eos_ids: the tokens that end an answer.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: set[int]) -> None:
        import llguidance
        import llguidance.hf

        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=sorted(eos_ids) or None)
        self.vocab_size = vocab_size
        self.mask_width = (vocab_size + 31) // 32
        self.executor = llguidance.LLExecutor()
        self._compiled: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def matcher(self, schema: dict[str, Any], where: str) -> Any:
        """A fresh matcher for answers that follow `schema`.

        Raises:
            RequestError: invalid_request naming `where` and why the schema cannot be used.
        """
        import llguidance

        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)  # type: ignore[arg-type]
        except (ValueError, TypeError) as error:
            raise RequestError(ErrorCode.invalid_request, f"'{where}' is not a JSON Schema chatbatch can enforce: {error}", param=where) from None
        with self._lock:
            pristine = self._compiled.get(grammar)
            if pristine is not None:
                self._compiled.move_to_end(grammar)
        if pristine is None:
            pristine = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
            if pristine.is_error():
                raise RequestError(
                    ErrorCode.invalid_request,
                    f"'{where}' is not a JSON Schema chatbatch can enforce: {pristine.get_error()}",
                    param=where,
                )
            with self._lock:
                self._compiled[grammar] = pristine
                while len(self._compiled) > CACHE_SIZE:
                    self._compiled.popitem(last=False)
        return pristine.deep_copy()

    def fill(self, matchers: list[tuple[Any, int]], bitmask: Any) -> None:
        """Fill row `index` of `bitmask` (a CPU int32 tensor, one bit per token) for each
        (matcher, index), in parallel and without the GIL."""
        self.executor.unsafe_compute_mask_ptr(matchers, bitmask.data_ptr(), self.mask_width * 4, bitmask.shape[0])

    def token_bytes(self, token: int) -> bytes:
        """The UTF-8 bytes of one token (special tokens as their text)."""
        return bytes(self.tokenizer.decode_bytes([token]))


#: Byte value -> its 8 bits, least significant first, per device (the bitmask's unpacking table).
_BYTE_BITS: dict[Any, Any] = {}


def apply_bitmask(logits: Any, bitmask: Any) -> None:
    """Set to -inf, in place, the logits of the tokens each row's bitmask forbids (bitmask on
    the logits' device: rows x ceil(vocab / 32) int32, bit i of word j for token 32j + i).

    On a little-endian machine the int32 words are read as bytes and unpacked through a 256 x 8
    table: one lookup, no rows x vocab x 32 temporary. (llguidance's own kernel goes through
    torch.compile at first use, which needs a C++ compiler on the worker.)
    """
    import torch

    if sys.byteorder == "little":
        table = _BYTE_BITS.get(logits.device)
        if table is None:
            table = _BYTE_BITS[logits.device] = ((torch.arange(256, device=logits.device)[:, None] >> torch.arange(8, device=logits.device)) & 1).bool()
        allowed = table[bitmask.contiguous().view(torch.uint8).long()].reshape(bitmask.shape[0], -1)
    else:
        bits = torch.arange(32, device=logits.device, dtype=torch.int32)
        allowed = ((bitmask.unsqueeze(-1) >> bits) & 1).bool().reshape(bitmask.shape[0], -1)
    vocab = logits.shape[-1]
    if allowed.shape[1] < vocab:
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]), value=False)
    logits.masked_fill_(~allowed[:, :vocab], float("-inf"))


def forced_calls(text: str, request: ChatCompletionRequest) -> list[tuple[str, str]]:
    """(name, arguments as JSON text) of each call of a complete answer the grammar wrote for
    `tool_choice` "required" (a list of calls) or a named function (its arguments)."""
    choice = request.effective_tool_choice
    if isinstance(choice, NamedToolChoice):
        return [(choice.function.name, json.dumps(json.loads(text), separators=(", ", ": "), ensure_ascii=False))]
    return [(call["name"], json.dumps(call["arguments"], separators=(", ", ": "), ensure_ascii=False)) for call in json.loads(text)]


#: The start of one call of a `tool_choice: "required"` answer, as the grammar writes it: its
#: name (group 1), the name's closing quote (2), and the arguments' key (3), each when written.
_CALL_START = re.compile(r'\s*\{"name": "([A-Za-z0-9_-]*)(")?(, "arguments": )?')
_SEPARATOR = re.compile(r"\s*,\s*")


def cut_calls(text: str, request: ChatCompletionRequest) -> list[tuple[str, str]]:
    """(name, arguments as far as they were written) of each call of a forced-call answer that
    `max_tokens` cut: a call appears once its name is written whole; its arguments are JSON text
    when complete, else the text written so far (possibly empty)."""
    choice = request.effective_tool_choice
    if isinstance(choice, NamedToolChoice):
        return [(choice.function.name, written_arguments(text))]
    calls: list[tuple[str, str]] = []
    decoder = json.JSONDecoder()
    position = 1 if text.startswith("[") else len(text)
    while position < len(text):
        try:
            call, position = decoder.raw_decode(text, position)
        except ValueError:
            start = _CALL_START.match(text, position)
            if start is not None and start.group(2):
                calls.append((start.group(1), written_arguments(text[start.end():]) if start.group(3) else ""))
            break
        calls.append((call["name"], json.dumps(call["arguments"], separators=(", ", ": "), ensure_ascii=False)))
        separator = _SEPARATOR.match(text, position)
        position = separator.end() if separator and separator.end() > position else len(text)
    return calls
