"""A streamed row's text, decoded as its tokens come, with stop strings held back.

Decoding is incremental, with worker/decode/stops.py's `IncrementalText` (vLLM's detokenizer): a
decoding that ends in U+FFFD waits, since the character is not whole yet (a multi-byte character
split over tokens), or tokens only form text together.

Text that could still turn into a stop string is held back: the longest end of the text that
is the start of one of the row's stop strings is not released until the next tokens show it
is not; once a stop string is found, nothing at or after it is ever released. The row's final
answer (cut at the stop string by the runner) then begins with everything released.
"""

from __future__ import annotations

from typing import Any

from worker.decode.stops import IncrementalText


class Detokenizer:
    """One row's text as it may be streamed.

    Args:
        tokenizer: the model's tokenizer.
        stops: the row's stop strings (may be empty).
    """

    __slots__ = ("stops", "_decoded", "text", "released", "stopped")

    def __init__(self, tokenizer: Any, stops: list[str]) -> None:
        self.stops = stops
        self._decoded = IncrementalText(tokenizer)
        #: The text decoded so far (whole characters only).
        self.text = ""
        #: Characters of `text` released to the stream.
        self.released = 0
        #: Set once a stop string was found: nothing more is released.
        self.stopped = False

    def feed(self, tokens: list[int]) -> str:
        """Add generated tokens (not EOS); the text that may be streamed now."""
        for token in tokens:
            self.text += self._decoded.add(token)
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
