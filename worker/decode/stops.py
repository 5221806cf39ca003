"""Stop strings found as tokens come, without decoding a row's whole text at every token.

Text is decoded incrementally, as vLLM's detokenizer does: the tokens since the last piece of
text are decoded together with the tokens of that piece (a tokenizer may need them to place a
space or to complete a multi-byte character), and the new piece is what that decoding has
beyond the decoding of the context alone. A token that ends in an incomplete character adds nothing until the
character is whole. Each new piece is searched together with the tail of the text before it,
as long as the longest stop string less one character, so a stop string that spans tokens is
found, and the work per token stays constant.
"""

from __future__ import annotations

from typing import Any


class IncrementalText:
    """A row's text decoded token by token (the technique above): `add` returns the new piece
    of text, or "" while the tokens do not form a whole character yet."""

    __slots__ = ("decode", "_tokens", "_prefix", "_read")

    def __init__(self, tokenizer: Any) -> None:
        self.decode = tokenizer.decode
        self._tokens: list[int] = []
        self._prefix = 0
        self._read = 0

    def add(self, token: int) -> str:
        self._tokens.append(token)
        before = self.decode(self._tokens[self._prefix : self._read], skip_special_tokens=True)
        after = self.decode(self._tokens[self._prefix :], skip_special_tokens=True)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""  # no whole character yet
        self._prefix, self._read = self._read, len(self._tokens)
        return after[len(before) :]


class StopFinder:
    """Watches one row's tokens for its stop strings.

    Args:
        tokenizer: the model's tokenizer.
        stops: the row's stop strings (not empty).
    """

    __slots__ = ("tokenizer", "stops", "_tail_length", "_text", "tail", "seen", "ended")

    def __init__(self, tokenizer: Any, stops: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self._tail_length = max(len(stop) for stop in stops) - 1
        self._text = IncrementalText(tokenizer)
        #: The end of the text so far, long enough to hold the start of a stop string.
        self.tail = ""
        #: Characters of text seen so far.
        self.seen = 0
        #: Set by a caller that saw the row end (EOS): nothing more to watch.
        self.ended = False

    def feed(self, token: int) -> bool:
        """Add one generated token (not EOS); True when the text now holds a stop string."""
        piece = self._text.add(token)
        if not piece:
            return False
        window = self.tail + piece
        self.seen += len(piece)
        self.tail = window[-self._tail_length :] if self._tail_length else ""
        return any(stop in window for stop in self.stops)
