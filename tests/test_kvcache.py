"""The in-place growing KV layer: the same keys and values as transformers' own layer, written
in place between reallocations, and following tensors replaced from outside."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from worker.engine.kvcache import GrowingLayer


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


def test_leading_columns_are_cut_and_added_in_place_while_the_buffer_has_room() -> None:
    mine, theirs = GrowingLayer(), DynamicLayer()
    for layer in (mine, theirs):
        layer.update(*_step(2, 6, 0))
    held = mine._key_buffer  # held, so that a new buffer cannot take its address
    assert held is not None
    buffer = held.data_ptr()
    mine.drop_leading(4)
    assert theirs.keys is not None and theirs.values is not None
    theirs.keys, theirs.values = theirs.keys[:, :, 4:], theirs.values[:, :, 4:]
    for layer in (mine, theirs):
        layer.update(*_step(2, 1, 1))
    assert _same(mine, theirs)
    mine.widen(3)  # room before the view: no copy
    theirs.keys = torch.cat([torch.zeros((2, 2, 3, 4)), theirs.keys], dim=2)
    theirs.values = torch.cat([torch.zeros((2, 2, 3, 4)), theirs.values], dim=2)
    assert _same(mine, theirs) and mine._key_buffer.data_ptr() == buffer  # type: ignore[union-attr]
    assert mine.keys is not None
    mine.keys[1, :, :2] = 7.0  # a row written in place reaches the buffer
    theirs.keys[1, :, :2] = 7.0
    mine.widen(5)  # no room: the next update copies into fresh buffers
    theirs.keys = torch.cat([torch.zeros((2, 2, 5, 4)), theirs.keys], dim=2)
    theirs.values = torch.cat([torch.zeros((2, 2, 5, 4)), theirs.values], dim=2)
    for seed in range(2, 6):
        for layer in (mine, theirs):
            layer.update(*_step(2, 1, seed))
        assert _same(mine, theirs)
    assert mine._key_buffer.data_ptr() != buffer  # type: ignore[union-attr]
    assert mine.get_seq_length() == theirs.get_seq_length() == 6 - 4 + 1 + 3 + 5 + 4
