"""The in-place growing KV layer: the same keys and values as transformers' own layer, written
in place between reallocations, and following tensors replaced from outside."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from worker.kvcache import GrowingLayer


def _step(rows: int, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((rows, 2, tokens, 4), generator=generator), torch.randn((rows, 2, tokens, 4), generator=generator)


def _same(mine: DynamicLayer, theirs: DynamicLayer) -> bool:
    assert mine.keys is not None and mine.values is not None and theirs.keys is not None and theirs.values is not None
    return torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)


def test_it_holds_what_a_dynamic_layer_holds_through_steps_selections_and_replacements() -> None:
    mine, theirs = GrowingLayer(), DynamicLayer()
    for layer in (mine, theirs):
        layer.update(*_step(3, 5, 0))
    buffers = set()
    for seed in range(1, 40):
        for layer in (mine, theirs):
            layer.update(*_step(3, 1, seed))
        buffers.add(mine._key_buffer.data_ptr())  # type: ignore[union-attr]
        assert _same(mine, theirs)
    assert len(buffers) <= 2, "steps write in place; the buffer is remade only when full"
    index = torch.tensor([0, 2])
    for layer in (mine, theirs):
        layer.batch_select_indices(index)
        assert layer.keys is not None and layer.values is not None
        layer.keys, layer.values = layer.keys[:, :, 3:], layer.values[:, :, 3:]  # leading columns cut
        layer.update(*_step(2, 1, 99))
    assert _same(mine, theirs)
    assert mine.get_seq_length() == theirs.get_seq_length() == 5 + 39 - 3 + 1
