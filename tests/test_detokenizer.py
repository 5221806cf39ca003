"""The streamed text of a row (worker/decode/detokenizer.py), with the tiny model's real byte-level
tokenizer: multi-byte characters split over tokens, and stop strings held back."""

from __future__ import annotations

from typing import Any

import pytest

from worker.decode.detokenizer import Detokenizer
from worker.models.builders import tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return tiny_tokenizer()


def _stream(tokenizer: Any, text: str, stops: list[str]) -> tuple[list[str], Detokenizer]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    detokenizer = Detokenizer(tokenizer, stops)
    return [detokenizer.feed([token]) for token in ids], detokenizer


def test_multibyte_characters_split_over_tokens_come_whole(tokenizer: Any) -> None:
    text = "héllo wörld, 日本語 and 🎉 done"
    ids = tokenizer.encode(text, add_special_tokens=False)
    # The tokenizer knows no such character: each is split over byte tokens, and decoding
    # some prefixes of the tokens ends in half a character.
    assert any(tokenizer.decode(ids[:k]).endswith("\ufffd") for k in range(1, len(ids)))
    pieces, _ = _stream(tokenizer, text, [])
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)
    # A piece is released only once its character is whole: the emoji's four byte tokens
    # release nothing, then the whole emoji at once.
    assert "🎉" in pieces


def test_stop_string_is_held_back_and_never_released(tokenizer: Any) -> None:
    pieces, detokenizer = _stream(tokenizer, "print('Hello, world!') and more", ["world!"])
    released = "".join(pieces)
    assert released == "print('Hello, "
    assert detokenizer.stopped
    assert detokenizer.feed(tokenizer.encode(" later", add_special_tokens=False)) == ""


def test_a_partial_stop_string_is_held_until_it_is_not_one(tokenizer: Any) -> None:
    detokenizer = Detokenizer(tokenizer, ["END"])
    assert detokenizer.feed(tokenizer.encode("batch E", add_special_tokens=False)) == "batch "
    assert detokenizer.feed(tokenizer.encode("N", add_special_tokens=False)) == ""
    assert detokenizer.feed(tokenizer.encode("x", add_special_tokens=False)) == "ENx"
    assert not detokenizer.stopped


def test_stop_string_spanning_tokens_and_multibyte(tokenizer: Any) -> None:
    pieces, detokenizer = _stream(tokenizer, "ab😀cd😀ef", ["d😀"])
    assert "".join(pieces) == "ab😀c" and detokenizer.stopped
