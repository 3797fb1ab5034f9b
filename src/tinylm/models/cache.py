"""Decoding state for incremental generation, one object per model family with the same small interface.

Every row of a batch has its own position (`lengths`: tokens consumed so far), so rows can join a running batch
(`grow`, then `load_rows` from a cache their prompt was prefilled into) and leave it (`keep_rows`) while the others go
on. `pos` is the common position of a batch whose rows are all at the same one (a prefill); `offsets()` gives that
position, or a (batch,) tensor of positions when they differ. The model calls `advance(n)` after each forward pass.
"""

from __future__ import annotations

import torch


class _RowPositions:
    """Each row's position, kept as Python ints (the scheduler reads them every step) and as a tensor on demand."""

    def __init__(self, batch_size: int, device):
        self.lengths = [0] * batch_size
        self.device = torch.device(device)

    @property
    def pos(self) -> int:
        """The common position of every row (a prefill, or a batch kept in lockstep)."""
        if len(set(self.lengths)) > 1:
            raise ValueError("rows are at different positions: use offsets()")
        return self.lengths[0] if self.lengths else 0

    def uniform(self) -> bool:
        return len(set(self.lengths)) <= 1

    def offsets(self) -> int | torch.Tensor:
        """The common position as an int, or each row's position as a (batch,) long tensor on the cache's device."""
        if self.uniform():
            return self.pos
        return torch.tensor(self.lengths, device=self.device)

    def advance(self, length: int) -> None:
        self.lengths = [n + length for n in self.lengths]

    def set_length(self, row: int, length: int) -> None:
        """Set one row's position (0 parks a row that has ended until the batch is compacted)."""
        self.lengths[row] = length

    def _keep(self, rows: torch.Tensor) -> None:
        self.lengths = [self.lengths[i] for i in rows.tolist()]


def _with_room(storage: torch.Tensor, used: int, rows: int) -> torch.Tensor:
    """`storage` (rows along dim 1) with room for `rows` rows: itself, or a copy of its `used` rows in one at least
    twice as large, so that rows joining one by one cost few copies of the whole cache."""
    if rows <= storage.shape[1]:
        return storage
    grown = storage.new_zeros((storage.shape[0], max(rows, 2 * storage.shape[1]), *storage.shape[2:]))
    grown[:, :used] = storage[:, :used]
    return grown


STRIDE_PAD = 16  # spare positions per row of the KV cache's storage (KVCache)


class KVCache(_RowPositions):
    """Preallocated keys and values for every layer. Values are (layers, batch, kv_heads, max_len, head_dim); keys
    are stored transposed, (layers, batch, kv_heads, head_dim, max_len), so that a one-token query's scores are a
    product with positions along rows, the faster layout for small batched products on a CPU (docs/RESULTS.md)."""

    def __init__(self, n_layers, batch_size, n_kv_heads, max_len, head_dim, device, dtype):
        super().__init__(batch_size, device)
        # Storage may hold more rows than the batch (room to grow); `keys` and `values` are the batch's rows. Each
        # row of positions has STRIDE_PAD more than max_len: at a power-of-two length (a context of 512, 1024...)
        # the rows would fall on the same CPU cache sets, and a 64-row decode step at a 512-position cache ran 20%
        # slower than at 528.
        stored = max_len + STRIDE_PAD
        self._keys = torch.zeros((n_layers, batch_size, n_kv_heads, head_dim, stored), device=device, dtype=dtype)
        self._values = torch.zeros((n_layers, batch_size, n_kv_heads, stored, head_dim), device=device, dtype=dtype)
        self.max_len = max_len

    @property
    def keys(self) -> torch.Tensor:
        return self._keys[:, :len(self.lengths)]

    @property
    def values(self) -> torch.Tensor:
        return self._values[:, :len(self.lengths)]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store this chunk's (batch, kv_heads, length, head_dim) keys/values at each row's position and return every
        row's keys and values up to the furthest row's end, in that layout (a row's later slots are masked)."""
        length = k.shape[2]
        end = max(self.lengths, default=0) + length
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, asked for {end}")
        if self.uniform():
            start = self.pos
            self.keys[layer, ..., start:end] = k.transpose(-1, -2)
            self.values[layer, :, :, start:end] = v
        else:
            if length != 1:
                raise ValueError("rows at different positions take one token at a time")
            rows = torch.arange(k.shape[0], device=k.device)
            positions = self.offsets()
            self.keys[layer][rows, :, :, positions] = k[:, :, 0]
            self.values[layer][rows, :, positions] = v[:, :, 0]
        return self.keys[layer, ..., :end].transpose(-1, -2), self.values[layer, :, :, :end]

    def grow(self, rows: int) -> None:
        """Append `rows` rows at position 0 (new requests join the batch there; `load_rows` fills them)."""
        used = len(self.lengths)
        self._keys = _with_room(self._keys, used, used + rows)
        self._values = _with_room(self._values, used, used + rows)
        self.lengths += [0] * rows

    def load_rows(self, slots: list[int], source: KVCache, source_rows: list[int]) -> None:
        """Copy `source`'s rows (a prefill) into these rows, positions included."""
        end = max(source.lengths[r] for r in source_rows)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, asked for {end}")
        index = torch.tensor(source_rows, device=self.keys.device)
        for slot, keys, values in zip(slots, source.keys[..., :end].index_select(1, index).unbind(1),
                                      source.values[:, :, :, :end].index_select(1, index).unbind(1), strict=True):
            self.keys[:, slot, ..., :end] = keys
            self.values[:, slot, :, :end] = values
        for slot, row in zip(slots, source_rows, strict=True):
            self.lengths[slot] = source.lengths[row]

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (finished rows leave the batch), in this order, at the front of the storage."""
        kept, end = len(rows), max(self.lengths, default=0)  # positions past every row's length hold nothing
        self._keys[:, :kept, ..., :end] = self.keys[..., :end].index_select(1, rows)
        self._values[:, :kept, :, :end] = self.values[:, :, :, :end].index_select(1, rows)
        self._keep(rows)


class MixerState(_RowPositions):
    """MicroMixer's running sums of LN1(x), one (batch, H) fp32 tensor per layer: O(1) work per new token."""

    def __init__(self, n_layers, batch_size, dim, device):
        super().__init__(batch_size, device)
        self._sums = torch.zeros((n_layers, batch_size, dim), device=device, dtype=torch.float32)

    @property
    def sums(self) -> torch.Tensor:
        return self._sums[:, :len(self.lengths)]

    def grow(self, rows: int) -> None:
        self._sums = _with_room(self._sums, len(self.lengths), len(self.lengths) + rows)
        self.lengths += [0] * rows

    def load_rows(self, slots: list[int], source: MixerState, source_rows: list[int]) -> None:
        for slot, row in zip(slots, source_rows, strict=True):
            self.sums[:, slot] = source.sums[:, row]
            self.lengths[slot] = source.lengths[row]

    def keep_rows(self, rows: torch.Tensor) -> None:
        self._sums[:, :len(rows)] = self.sums.index_select(1, rows)
        self._keep(rows)
