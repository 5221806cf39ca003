"""Stop strings found incrementally, on the tiny model's byte-level tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.decode.stops import StopFinder


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model / "components" / "tokenizer"))


def _first_hit(tokenizer, text: str, stops: list[str]) -> int | None:  # type: ignore[no-untyped-def]
    """The index of the token at which a finder fed `text`'s tokens sees a stop string."""
    finder = StopFinder(tokenizer, stops)
    for index, token in enumerate(tokenizer(text, add_special_tokens=False)["input_ids"]):
        if finder.feed(token):
            return index
    return None


def test_a_stop_string_that_spans_tokens_is_found_at_the_token_that_completes_it(tokenizer) -> None:  # type: ignore[no-untyped-def]
    text = "The quick brown fox jumps over the lazy dog"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    stop = "n fox ju"  # the end of ' brown', all of ' fox', the start of ' jumps'
    pieces = [tokenizer.decode(ids[: i + 1]) for i in range(len(ids))]
    completes = next(i for i, piece in enumerate(pieces) if stop in piece)
    assert stop not in tokenizer.decode([ids[completes]]), "the stop string spans tokens"
    assert _first_hit(tokenizer, text, [stop]) == completes
    assert _first_hit(tokenizer, text, ["cat", "zebra"]) is None


def test_multi_byte_characters_split_over_tokens_are_matched_once_whole(tokenizer) -> None:  # type: ignore[no-untyped-def]
    text = "héllo wörld ✓ 日本語 done"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.encode()) // 2, "this tokenizer splits multi-byte characters"
    hit = _first_hit(tokenizer, text, ["✓ 日"])
    assert hit is not None and "✓ 日" in tokenizer.decode(ids[: hit + 1]) and "✓ 日" not in tokenizer.decode(ids[:hit])
    assert _first_hit(tokenizer, text, ["ö"]) is not None


def test_the_work_per_token_does_not_grow_with_the_text(tokenizer) -> None:  # type: ignore[no-untyped-def]
    """Each feed decodes only the tokens since the last piece of text and keeps a tail as long as
    the longest stop string: a long answer is watched in linear time."""
    calls: list[int] = []

    class Counting:
        def decode(self, ids: list[int], **kwargs: object) -> str:
            calls.append(len(ids))
            return str(tokenizer.decode(ids, **kwargs))

    finder = StopFinder(Counting(), ["never there"])
    for token in tokenizer("word " * 400, add_special_tokens=False)["input_ids"]:
        assert not finder.feed(token)
    assert max(calls) <= 4 and len(finder.tail) == len("never there") - 1
