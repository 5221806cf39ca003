"""The prefix cache's keys and its bound, without a model."""

from __future__ import annotations

import torch

from worker.engine.prefix_cache import BLOCK, PrefixCache, block_keys, reusable_blocks


def _block(value: float, layers: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.full((1, BLOCK, 4), value), torch.full((1, BLOCK, 4), value)) for _ in range(layers)]


def test_block_keys_name_whole_prefixes() -> None:
    a = list(range(3 * BLOCK + 5))
    b = a[: 2 * BLOCK] + [7] * (BLOCK + 5)
    keys_a, keys_b = block_keys(a), block_keys(b)
    assert len(keys_a) == 3 and keys_a[:2] == keys_b[:2] and keys_a[2] != keys_b[2]
    assert block_keys(a[BLOCK:])[0] != keys_a[1], "a block's key depends on everything before it"
    assert reusable_blocks(2 * BLOCK) == 1 and reusable_blocks(2 * BLOCK + 1) == 2, "the last token is always computed"


def test_lookups_touch_what_they_use_and_the_least_recently_used_go_first() -> None:
    size = sum(k.nbytes + v.nbytes for k, v in _block(0))
    cache = PrefixCache(3 * size)
    prompt = list(range(4 * BLOCK + 1))
    keys = block_keys(prompt)
    for j, key in enumerate(keys[:3]):
        cache.put(key, _block(j))
    assert cache.bytes == 3 * size and cache.matched(keys) == 3
    assert len(cache.take(keys[:1], len(prompt))) == 1  # block 0 is now the most recently used
    cache.put(keys[3], _block(3))  # evicts block 1, the least recently used
    assert cache.bytes == 3 * size and cache.matched(keys) == 1
    assert cache.hit_rate == BLOCK / len(prompt)
    cache.put(b"too big", _block(9, layers=8))  # larger than the whole bound: not kept
    assert cache.bytes == 3 * size


def test_a_cache_of_zero_bytes_is_off() -> None:
    cache = PrefixCache(0)
    cache.put(block_keys(list(range(BLOCK)))[0], _block(1))
    assert not cache.enabled and len(cache) == 0
