"""Decoding state for incremental generation, one object per model family with the same small interface:
`pos` (tokens consumed so far) and `advance(n)`, which the model calls after each forward pass."""

from __future__ import annotations

import torch


class KVCache:
    """Preallocated keys and values for every layer. Values are (layers, batch, kv_heads, max_len, head_dim); keys
    are stored transposed, (layers, batch, kv_heads, head_dim, max_len), so that a one-token query's scores are a
    product with positions along rows, the faster layout for small batched products on a CPU (docs/RESULTS.md)."""

    def __init__(self, n_layers, batch_size, n_kv_heads, max_len, head_dim, device, dtype):
        self.keys = torch.zeros((n_layers, batch_size, n_kv_heads, head_dim, max_len), device=device, dtype=dtype)
        self.values = torch.zeros((n_layers, batch_size, n_kv_heads, max_len, head_dim), device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store this chunk's (batch, kv_heads, length, head_dim) keys/values and return everything up to and
        including it, in that layout."""
        end = self.pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, asked for {end}")
        self.keys[layer, ..., self.pos:end] = k.transpose(-1, -2)
        self.values[layer, :, :, self.pos:end] = v
        return self.keys[layer, ..., :end].transpose(-1, -2), self.values[layer, :, :, :end]

    def advance(self, length: int) -> None:
        self.pos += length

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (finished rows leave the batch)."""
        self.keys, self.values = self.keys.index_select(1, rows), self.values.index_select(1, rows)


class MixerState:
    """MicroMixer's running sums of LN1(x), one (batch, H) fp32 tensor per layer: O(1) work per new token."""

    def __init__(self, n_layers, batch_size, dim, device):
        self.sums = torch.zeros((n_layers, batch_size, dim), device=device, dtype=torch.float32)
        self.pos = 0

    def advance(self, length: int) -> None:
        self.pos += length

    def keep_rows(self, rows: torch.Tensor) -> None:
        self.sums = self.sums.index_select(1, rows)
