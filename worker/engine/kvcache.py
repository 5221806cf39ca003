"""A KV cache layer that grows in place, for the dynamic decode.

transformers' DynamicLayer appends each step's keys and values with `torch.cat`, which copies
the whole cache at every token: for a batch of 32 rows of 300 tokens of a small model, more
memory traffic per step than the attention itself. `GrowingLayer` keeps them in buffers with
room to spare, writes each step's token in place, and hands out views of the filled part.

The continuous decode changes the batch in place as well: a row that joins is written into a
finished row's place, leading columns every row masks are cut by moving the view's start, and
columns for a longer prompt are added before it where the buffer has room. Whoever replaces
`keys`/`values` outright (transformers' `batch_select_indices` on other layers, or a change with
no room) is followed at the next update: the layer sees that its views were replaced and copies
the new tensors into fresh buffers, once, in place of the copy `torch.cat` makes at every step.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

#: Spare columns a buffer gets when it is (re)made: at least this many, or a quarter more.
_SPARE = 64


class GrowingLayer(DynamicLayer):
    """A DynamicLayer whose keys and values are views of buffers with spare columns.

    The view covers buffer columns [start, end): steps write at `end`; `drop_leading` cuts
    columns off the front and `widen` adds zero columns there, both without copying while the
    buffer has room.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None
        self._start = 0
        self._end = 0

    def replace(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """New keys and values from outside; the buffers go now (the next update copies the
        new tensors into fresh ones)."""
        self._key_buffer = self._value_buffer = None
        self.keys, self.values = keys, values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep these rows, in buffers with the same spare columns (one copy; the old buffers go)."""
        if not self._owns_view() or self.get_seq_length() == 0:
            super().batch_select_indices(indices)
            return
        assert self._key_buffer is not None and self._value_buffer is not None
        self._key_buffer = self._key_buffer[indices, :, self._start :]
        self._value_buffer = self._value_buffer[indices, :, self._start :]
        self._end -= self._start
        self._start = 0
        self._set_view()

    def drop_leading(self, count: int) -> None:
        """Cut the first `count` columns (every row masks them)."""
        if not self._owns_view():
            assert self.keys is not None and self.values is not None
            self.replace(self.keys[:, :, count:], self.values[:, :, count:])
            return
        self._start += count
        self._set_view()

    def widen(self, count: int) -> None:
        """Add `count` zero columns before the first (for a row joining with a longer prompt)."""
        assert self.keys is not None and self.values is not None
        if not self._owns_view() or self._start < count:
            self.replace(pad_left(self.keys, count), pad_left(self.values, count))
            return
        assert self._key_buffer is not None and self._value_buffer is not None
        self._start -= count
        self._key_buffer[:, :, self._start : self._start + count] = 0
        self._value_buffer[:, :, self._start : self._start + count] = 0
        self._set_view()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        coming = key_states.shape[-2]
        if not self._owns_view() or self._end + coming > self._key_buffer.shape[-2]:  # type: ignore[union-attr]
            self._rebuffer(key_states, value_states, coming)
        keys, values = self._key_buffer, self._value_buffer
        assert keys is not None and values is not None
        keys[:, :, self._end : self._end + coming] = key_states
        values[:, :, self._end : self._end + coming] = value_states
        self._end += coming
        self._set_view()
        return self.keys, self.values  # type: ignore[return-value]

    def _owns_view(self) -> bool:
        """Whether `keys` is still the view of the buffers this layer handed out (not replaced
        from outside)."""
        buffer, current = self._key_buffer, self.keys
        return (
            buffer is not None
            and current is not None
            and current.shape[0] == buffer.shape[0]
            and current.shape[-2] == self._end - self._start
            and current.data_ptr() == buffer[:, :, self._start :].data_ptr()
        )

    def _set_view(self) -> None:
        assert self._key_buffer is not None and self._value_buffer is not None
        self.keys = self._key_buffer[:, :, self._start : self._end]
        self.values = self._value_buffer[:, :, self._start : self._end]

    def _rebuffer(self, key_states: torch.Tensor, value_states: torch.Tensor, coming: int) -> None:
        """New buffers holding the current keys and values, with room for `coming` columns and
        spare ones."""
        current = self.keys
        assert current is not None
        length = current.shape[-2] if current.numel() else 0
        capacity = length + coming + max(_SPARE, (length + coming) // 4)
        self._key_buffer = self._value_buffer = None  # the old buffers go before the new come
        rows, heads = key_states.shape[:2]
        self._key_buffer = key_states.new_empty((rows, heads, capacity, key_states.shape[-1]))
        self._value_buffer = value_states.new_empty((rows, value_states.shape[1], capacity, value_states.shape[-1]))
        if length:
            self._key_buffer[:, :, :length] = self.keys  # type: ignore[assignment]
            self._value_buffer[:, :, :length] = self.values  # type: ignore[assignment]
        self._start, self._end = 0, length


def pad_left(tensor: torch.Tensor, count: int, dim: int = 2) -> torch.Tensor:
    """`count` zero columns before `tensor`'s along `dim` (the tensor itself when none)."""
    if not count:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = count
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def left_padded(prompts: list[list[int]], rows: int, width: int, pad_id: int) -> tuple[Any, Any]:
    """The prompts' token ids left-padded to `width`, in `rows` rows (the rows after the
    prompts, a static batch's fillers, hold one token: padding only), and their attention mask
    (0 over the padding), as CPU tensors.

    Filled in numpy (~0.1 ms for a batch of 32 short prompts): a torch operation per row
    costs tens of microseconds, ~1 ms per batch, about a tenth of a batch on the tiny model.
    """
    import numpy as np

    ids = np.full((rows, width), pad_id, dtype=np.int64)
    mask = np.zeros((rows, width), dtype=np.int64)
    mask[:, -1] = 1
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt) :] = prompt
        mask[i, width - len(prompt) :] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)
