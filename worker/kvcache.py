"""A KV cache layer that grows in place, for the dynamic decode.

transformers' DynamicLayer appends each step's keys and values with `torch.cat`, which copies
the whole cache at every token: for a batch of 32 rows of 300 tokens of a small model, more
memory traffic per step than the attention itself. `GrowingLayer` keeps them in buffers with
room to spare, writes each step's token in place, and hands out views of the filled part.

Whoever replaces `keys`/`values` outright (transformers' `batch_select_indices` when rows leave,
worker/continuous.py when rows join or leading columns are cut) is followed at the next update:
the layer sees that its views were replaced and copies the new tensors into fresh buffers,
once, in place of the copy `torch.cat` makes at every step.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

#: Spare columns a buffer gets when it is (re)made: at least this many, or a quarter more.
_SPARE = 64


class GrowingLayer(DynamicLayer):
    """A DynamicLayer whose keys and values are views of buffers with spare columns."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None
        self._length = 0

    def replace(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """New keys and values from outside; the buffers go now (the next update copies the
        new tensors into fresh ones)."""
        self._key_buffer = self._value_buffer = None
        self.keys, self.values = keys, values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep these rows, in buffers with the same spare columns (one copy; the old buffers go)."""
        if self._key_buffer is None or self.get_seq_length() == 0:
            super().batch_select_indices(indices)
            return
        assert self._value_buffer is not None
        self._key_buffer = self._key_buffer[indices]
        self._value_buffer = self._value_buffer[indices]
        self.keys = self._key_buffer[:, :, : self._length]
        self.values = self._value_buffer[:, :, : self._length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        coming = key_states.shape[-2]
        buffer, current = self._key_buffer, self.keys
        assert current is not None
        if (
            buffer is None
            or current.data_ptr() != buffer.data_ptr()  # replaced from outside
            or current.shape[0] != buffer.shape[0]
            or current.shape[-2] != self._length
            or self._length + coming > buffer.shape[-2]  # full
        ):
            self._rebuffer(key_states, value_states, coming)
        end = self._length + coming
        keys, values = self._key_buffer, self._value_buffer
        assert keys is not None and values is not None
        keys[:, :, self._length : end] = key_states
        values[:, :, self._length : end] = value_states
        self._length = end
        self.keys, self.values = keys[:, :, :end], values[:, :, :end]
        return self.keys, self.values

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
        self._length = length
