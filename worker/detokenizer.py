"""A streamed row's text, decoded as its tokens come, with stop strings held back.

Decoding is incremental, as in worker/stops.py (vLLM's detokenizer): the tokens since the last
piece of text are decoded together with the tokens of that piece, and the new piece is what
that decoding has beyond the decoding of the context alone. A decoding that ends in U+FFFD
waits: the character is not whole yet (a multi-byte character split over tokens), or tokens
only form text together.

Text that could still turn into a stop string is held back: the longest end of the text that
is the start of one of the row's stop strings is not released until the next tokens show it
is not; once a stop string is found, nothing at or after it is ever released. The row's final
answer (cut at the stop string by the runner) then begins with everything released.
"""

from __future__ import annotations

from typing import Any


class Detokenizer:
    """One row's text as it may be streamed.

    Args:
        tokenizer: the model's tokenizer.
        stops: the row's stop strings (may be empty).
    """

    __slots__ = ("tokenizer", "stops", "_tokens", "_prefix", "_read", "text", "released", "stopped")

    def __init__(self, tokenizer: Any, stops: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self._tokens: list[int] = []
        self._prefix = 0
        self._read = 0
        #: The text decoded so far (whole characters only).
        self.text = ""
        #: Characters of `text` released to the stream.
        self.released = 0
        #: Set once a stop string was found: nothing more is released.
        self.stopped = False

    def feed(self, tokens: list[int]) -> str:
        """Add generated tokens (not EOS); the text that may be streamed now."""
        decode = self.tokenizer.decode
        for token in tokens:
            self._tokens.append(token)
            before = decode(self._tokens[self._prefix : self._read], skip_special_tokens=True)
            after = decode(self._tokens[self._prefix :], skip_special_tokens=True)
            if len(after) <= len(before) or after.endswith("\ufffd"):
                continue  # no whole character yet
            self.text += after[len(before) :]
            self._prefix, self._read = self._read, len(self._tokens)
        return self._release()

    def _release(self) -> str:
        if self.stopped:
            return ""
        end = len(self.text)
        if self.stops:
            # A stop string found in the text not yet released (or reaching back into it).
            start = max(0, self.released - max(len(stop) for stop in self.stops) + 1)
            found = [i for i in (self.text.find(stop, start) for stop in self.stops) if i >= 0]
            if found:
                self.stopped = True
                end = min(found)
            else:
                end -= self._held(self.text)
        piece = self.text[self.released : max(end, self.released)]
        self.released += len(piece)
        return piece

    def _held(self, text: str) -> int:
        """Length of the longest end of `text` that is the start of a stop string."""
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest
