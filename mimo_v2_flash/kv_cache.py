"""KV cache: full-attention layers append; sliding-window layers keep a ring buffer of the window.

Sequences in a batch are independent (ragged): each has its own length. A full layer stores every
key of a sequence (capacity doubles as it grows); an SWA layer stores only `window` slots per
sequence (slot = position % window), so its memory is constant. Keys are returned with their
absolute positions and the attention masks by position, so the ring order never matters.
"""

from __future__ import annotations

import numpy as np

from .config import MiMoV2FlashConfig


class LayerKVCache:
    """Keys [B, slots, Hkv, D], values [B, slots, Hkv, Dv] and key positions [B, slots] (-1 = empty)."""

    def __init__(self, batch: int, kv_heads: int, head_dim: int, v_head_dim: int,
                 window: int | None, dtype=np.float32, capacity: int = 64):
        self.window = window
        slots = window if window is not None else capacity
        self.k = np.zeros((batch, slots, kv_heads, head_dim), dtype)
        self.v = np.zeros((batch, slots, kv_heads, v_head_dim), dtype)
        self.pos = np.full((batch, slots), -1, np.int64)
        self.length = np.zeros(batch, np.int64)   # keys stored so far (full layers)

    def _grow(self, needed: int) -> None:
        slots = self.k.shape[1]
        if needed <= slots:
            return
        new = max(needed, 2 * slots)
        pad = new - slots
        self.k = np.pad(self.k, ((0, 0), (0, pad), (0, 0), (0, 0)))
        self.v = np.pad(self.v, ((0, 0), (0, pad), (0, 0), (0, 0)))
        self.pos = np.pad(self.pos, ((0, 0), (0, pad)), constant_values=-1)

    def update(self, seq: int, positions: np.ndarray, k: np.ndarray, v: np.ndarray):
        """Store new keys of sequence `seq`; return (keys, values, positions) to attend over:
        the cached keys followed by all the new ones (a prefill longer than the window still
        sees every key its queries need)."""
        valid = self.pos[seq] >= 0
        keys = np.concatenate([self.k[seq][valid], k.astype(self.k.dtype)])
        values = np.concatenate([self.v[seq][valid], v.astype(self.v.dtype)])
        key_pos = np.concatenate([self.pos[seq][valid], positions])
        if self.window is None:
            start = self.length[seq]
            self._grow(start + len(positions))
            slots = np.arange(start, start + len(positions))
            self.length[seq] += len(positions)
        else:
            keep = slice(max(0, len(positions) - self.window), None)  # later keys overwrite earlier
            positions, k, v = positions[keep], k[keep], v[keep]
            slots = positions % self.window
        self.k[seq, slots] = k
        self.v[seq, slots] = v
        self.pos[seq, slots] = positions
        return keys, values, key_pos

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class KVCache:
    """Per-layer caches for a batch of independent sequences, plus each sequence's length."""

    def __init__(self, config: MiMoV2FlashConfig, batch: int, dtype=np.float32):
        self.layers = []
        for layer in range(config.num_hidden_layers):
            _, kv, d, dv = config.attention_shape(layer)
            self.layers.append(LayerKVCache(batch, kv, d, dv, config.window_of(layer), dtype))
        self.seq_lens = np.zeros(batch, np.int64)

    @property
    def batch(self) -> int:
        return len(self.seq_lens)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.layers)
