"""The batch's key/value cache: one row per running sequence, each at its own length.

Continuous batching needs sequences of different lengths, joining and leaving at any
step, to decode together. This cache keeps, per layer, one preallocated tensor
[rows, kv_heads, capacity, head_dim]; sequence `r` lives in row `r` at positions
0 .. length-1. A decoding step writes each row's new key/value at that row's own position
and attends over the longest row's length, with a mask hiding what a shorter row has not
written. Rows stay compact (the engine moves the last row into a freed one), and both
dimensions grow by doubling, so memory follows the work actually in flight, but never
past `limit()` bytes (the engine's KV grant, within its budget: `kv_memory.py`): near the
limit the cache grows only as far as it allows, and a reallocation frees the old tensors
layer by layer, so the old and new cache are never both held whole.

It implements the one method transformers' attention layers call, `update`, plus the
size queries its mask code asks when no explicit mask is passed (a lone sequence: then
the computation is exactly Hugging Face's own, which keeps greedy decoding identical).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def _unlimited() -> int:
    return 2**62


class SlotKVCache:
    """Per-layer key/value storage for the rows of a running batch."""

    def __init__(
        self, layers: int, kv_heads: int, head_dim: int, max_positions: int, dtype: torch.dtype
    ) -> None:
        self.layers = layers
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.dtype = dtype
        self.rows_capacity = 0
        self.positions_capacity = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        # The most bytes the cache may allocate; read at each growth.
        self.limit: Callable[[], int] = _unlimited
        # Set by prepare() before each forward pass.
        self._first_row = 0
        self._batch = 0
        self._write_rows = torch.zeros(0, 0, dtype=torch.long)
        self._write_positions = torch.zeros(0, 0, dtype=torch.long)
        self._kv_length = 0
        self._query_length = 0

    @property
    def bytes_per_position(self) -> int:
        """Bytes one token of one sequence occupies across all layers (keys and values)."""
        element = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * self.layers * self.kv_heads * self.head_dim * element

    @property
    def allocated_bytes(self) -> int:
        return self.rows_capacity * self.positions_capacity * self.bytes_per_position

    def reserve(self, rows: int, positions: int) -> None:
        """Make room for `rows` rows of `positions` positions, keeping what is stored (the
        first `rows` rows, up to `positions`: the engine asks for at least what it uses)."""
        if rows <= self.rows_capacity and positions <= self.positions_capacity:
            return
        new_rows, new_positions = self.shape_for(rows, positions)
        shape = (new_rows, self.kv_heads, new_positions, self.head_dim)
        for store in (self.keys, self.values):
            old_layers: list[torch.Tensor | None] = list(store)
            store.clear()
            for layer in range(self.layers):
                grown = torch.zeros(shape, dtype=self.dtype)
                if old_layers:  # copy what is kept, then let the old layer go
                    old = old_layers[layer]
                    assert old is not None
                    kept_rows = min(old.shape[0], new_rows)
                    kept_positions = min(old.shape[2], new_positions)
                    grown[:kept_rows, :, :kept_positions] = old[:kept_rows, :, :kept_positions]
                    old_layers[layer] = old = None
                store.append(grown)
        self.rows_capacity, self.positions_capacity = new_rows, new_positions

    def shape_for(self, rows: int, positions: int) -> tuple[int, int]:
        """The (rows, positions) to grow to: each dimension that must grow doubles (rows from
        4, positions from 64, up to the context), the other stays; then, over `limit()`,
        fewer spare rows, then fewer spare positions, down to what was asked for."""
        new_rows = self.rows_capacity
        if rows > self.rows_capacity:
            new_rows = max(rows, 2 * self.rows_capacity, 4)
        new_positions = self.positions_capacity
        if positions > self.positions_capacity:
            new_positions = min(max(positions, 2 * self.positions_capacity, 64), self.max_positions)
        budget = self.limit() // self.bytes_per_position  # positions the limit allows
        if new_rows * new_positions > budget:
            new_rows = max(rows, budget // new_positions)
        if new_rows * new_positions > budget:
            new_positions = max(positions, budget // new_rows)
        return new_rows, new_positions

    def move_row(self, source: int, target: int, length: int) -> None:
        """Copy the first `length` positions of row `source` into row `target`."""
        for store in (self.keys, self.values):
            for tensor in store:
                tensor[target, :, :length] = tensor[source, :, :length]

    def copy_prefix(self, source: int, first_row: int, rows: int, length: int) -> None:
        """Copy the first `length` positions of row `source` into rows first_row ..
        first_row+rows-1 (sequences whose tokens begin with the same `length` tokens)."""
        for store in (self.keys, self.values):
            for tensor in store:
                tensor[first_row : first_row + rows, :, :length] = tensor[source, :, :length]

    def release(self) -> None:
        """Free the storage (an idle engine holds no cache)."""
        self.keys, self.values = [], []
        self.rows_capacity = self.positions_capacity = 0

    def prepare(self, first_row: int, positions: torch.Tensor) -> None:
        """Set where the next forward pass writes: rows first_row .. first_row+B-1 (rows are
        kept compact, so a batch is always a contiguous block) at positions [B, q]."""
        batch, query = positions.shape
        self._first_row = first_row
        self._batch = batch
        rows = torch.arange(first_row, first_row + batch)
        self._write_rows = rows[:, None].expand(batch, query)
        self._write_positions = positions
        self._kv_length = int(positions.max()) + 1
        self._query_length = query

    # -- what transformers calls ------------------------------------------------------

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        kwargs: Any = None,
        **_: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store [B, kv_heads, q, head_dim] at each row's positions; return the batch's K/V."""
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys[self._write_rows, :, self._write_positions] = key_states.transpose(1, 2)
        values[self._write_rows, :, self._write_positions] = value_states.transpose(1, 2)
        rows = slice(self._first_row, self._first_row + self._batch)
        # Views, not copies: attention reads the rows' first `length` positions in place.
        return keys[rows, :, : self._kv_length], values[rows, :, : self._kv_length]

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self._kv_length, 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self._kv_length - self._query_length

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kv_length
