"""The prefix cache: the KV of prompt blocks already computed, for prompts that begin alike.

A prompt is cut into blocks of `BLOCK` tokens. Block j's key is a hash of the whole prompt up
to its end (the previous block's key and its own tokens), so a key names one exact prefix, and
the blocks of two prompts share keys exactly as far as the prompts agree, as in vLLM's
automatic prefix caching. Each entry holds one block's keys and values for every layer.

Bounded by bytes; the least recently used blocks go first. Lookups touch, and writers put,
the blocks of a prompt from its last to its first, so a parent is never older than its
children: a chain is evicted from its end, and its first blocks, which most prompts share, stay
longest.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from typing import Any

#: Tokens per block: a prompt shares at most its whole blocks.
BLOCK = 64


def block_keys(prompt_ids: list[int], limit: int | None = None) -> list[bytes]:
    """The keys of a prompt's whole blocks, in order (at most `limit` of them)."""
    count = len(prompt_ids) // BLOCK if limit is None else min(limit, len(prompt_ids) // BLOCK)
    keys: list[bytes] = []
    previous = b""
    for j in range(count):
        block = array("q", prompt_ids[j * BLOCK : (j + 1) * BLOCK]).tobytes()
        previous = hashlib.blake2b(previous + block, digest_size=16).digest()
        keys.append(previous)
    return keys


def reusable_blocks(prompt_length: int) -> int:
    """Whole blocks of a prompt that may come from the cache: at least the prompt's last token
    is always computed, for its logits."""
    return (prompt_length - 1) // BLOCK


class PrefixCache:
    """Block key -> that block's (keys, values) per layer, each (kv_heads, BLOCK, head_dim).

    Only the engine thread uses it.

    Args:
        max_bytes: most bytes of KV held; 0 turns the cache off.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._blocks: OrderedDict[bytes, list[tuple[Any, Any]]] = OrderedDict()
        #: Prompt tokens looked up, and found, since the start.
        self.looked_up = 0
        self.found = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._blocks)

    def matched(self, keys: list[bytes]) -> int:
        """How many of these blocks, from the first, are cached (a read: nothing moves)."""
        count = 0
        for key in keys:
            if key not in self._blocks:
                break
            count += 1
        return count

    def take(self, keys: list[bytes], prompt_length: int) -> list[list[tuple[Any, Any]]]:
        """The cached blocks that begin a prompt, marked as just used (the last first), and
        counted in the hit rate."""
        blocks: list[list[tuple[Any, Any]]] = []
        for key in keys[: reusable_blocks(prompt_length)]:
            block = self._blocks.get(key)
            if block is None:
                break
            blocks.append(block)
        for key in reversed(keys[: len(blocks)]):
            self._blocks.move_to_end(key)
        self.looked_up += prompt_length
        self.found += len(blocks) * BLOCK
        return blocks

    def __contains__(self, key: bytes) -> bool:
        return key in self._blocks

    def touch(self, key: bytes) -> None:
        """Mark a kept block as just used (nothing if it is not kept)."""
        if key in self._blocks:
            self._blocks.move_to_end(key)

    def put(self, key: bytes, block: list[tuple[Any, Any]]) -> None:
        """Keep one block (already copied out of any larger tensor), evicting the least
        recently used blocks to stay within the bound; a block already kept is only marked as
        just used. A block larger than the bound is not kept. Put a prompt's blocks from its
        last to its first."""
        if not self.enabled:
            return
        if key in self._blocks:
            self._blocks.move_to_end(key)
            return
        size = sum(k.nbytes + v.nbytes for k, v in block)
        if size > self.max_bytes:
            return
        while self.bytes + size > self.max_bytes:
            _, old = self._blocks.popitem(last=False)
            self.bytes -= sum(k.nbytes + v.nbytes for k, v in old)
        self._blocks[key] = block
        self.bytes += size

    @property
    def hit_rate(self) -> float:
        """Share of looked-up prompt tokens that came from the cache."""
        return self.found / self.looked_up if self.looked_up else 0.0
