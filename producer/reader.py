"""Reading JSONL input as a stream: memory stays flat however large the file."""

from __future__ import annotations

from collections.abc import Iterator
from typing import IO

from chatbatch.exceptions import InputTooLargeError

_READ = 64 * 1024


def check_size(source: str, size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise InputTooLargeError(
            f"{source} is {size:,} bytes, over the limit of {max_bytes:,}: split the file or "
            "raise CHATBATCH_MAX_FILE_BYTES"
        )


def check_lines(source: str, count: int, max_lines: int) -> None:
    if count > max_lines:
        raise InputTooLargeError(
            f"{source} has {count:,} lines, over the limit of {max_lines:,}: split the file or "
            "raise CHATBATCH_MAX_FILE_LINES"
        )


def count_lines(stream: IO[bytes]) -> int:
    """Lines in a seekable stream (a last line without a newline counts); reads in blocks."""
    count = 0
    last = b"\n"
    while True:
        block = stream.read(1 << 20)
        if not block:
            break
        count += block.count(b"\n")
        last = block[-1:]
    return count + (0 if last == b"\n" else 1)


def iter_lines(stream: IO[bytes], *, max_line_bytes: int) -> Iterator[tuple[int, bytes | None, int]]:
    """(1-based line number, raw line without its newline, size in bytes) for each line.

    A line longer than `max_line_bytes` is never held in memory: it comes back as None with its
    full size, and the caller turns it into a `line_too_large` error line.
    """
    number = 0
    while True:
        head = stream.readline(max_line_bytes + 2)
        if not head:
            return
        number += 1
        raw = head.rstrip(b"\r\n")
        if len(raw) <= max_line_bytes:
            yield number, raw, len(raw)
            continue
        size = len(raw)
        while not head.endswith(b"\n"):  # skip the rest of the line
            head = stream.readline(_READ)
            if not head:
                break
            size += len(head.rstrip(b"\r\n"))
        yield number, None, size
