"""Preallocated KV cache of static size: what a device keeps resident between steps.

The ragged `KVCache` grows its full-attention layers by doubling. This one allocates everything
once: full layers `context` key slots per sequence (the largest decode bucket's context; slot =
position), sliding-window layers a ring of `window` slots (slot = position % window). Storage
defaults to bfloat16, the dtype the attention kernels read, so a step writes its new keys in
place and nothing is reallocated or converted afterwards.

`update` has the ragged cache's contract (keys to attend over: the cached ones, then the new ones,
with positions), so the layer code and both backends take either cache:

* full layers return the slots [0, length) of the sequence: a view of the static buffer, in
  position order;
* sliding-window layers return the whole ring as it was before the write (empty slots carry
  `EMPTY_POSITION`, later than every query, so the causal mask hides them) followed by the new
  keys: a prefill longer than the window still sees every key its queries need, and a decode
  step always attends over `window + 1` slots;
* a sequence with nothing cached gets its new keys only (a fresh prefill, the prefill kernel's case).
"""
from __future__ import annotations

import ml_dtypes
import numpy as np

from .config import MiMoV2FlashConfig

EMPTY_POSITION = 2 ** 30      # the attention kernels' marker of an empty slot (attention_decode)
BF16 = np.dtype(ml_dtypes.bfloat16)


class StaticLayerKVCache:
    """Keys [B, slots, Hkv, D], values [B, slots, Hkv, Dv], key positions [B, slots]."""

    def __init__(self, batch: int, kv_heads: int, head_dim: int, v_head_dim: int, window: int | None,
                 context: int, dtype=BF16):
        self.window = window
        self.context = context
        slots = window if window is not None else context
        self.k = np.zeros((batch, slots, kv_heads, head_dim), dtype)
        self.v = np.zeros((batch, slots, kv_heads, v_head_dim), dtype)
        self.pos = np.full((batch, slots), EMPTY_POSITION, np.int64)
        self.length = np.zeros(batch, np.int64)

    def update(self, seq: int, positions: np.ndarray, k: np.ndarray, v: np.ndarray):
        """Store the new keys of sequence `seq` in place; return (keys, values, positions) to
        attend over (module docstring)."""
        positions = np.asarray(positions)
        end = int(positions.max()) + 1
        if end > self.context:
            raise ValueError(f"static KV cache: position {end - 1} of sequence {seq} is beyond its context "
                             f"of {self.context} positions (choose a larger decode bucket)")
        if self.window is None:
            self.k[seq, positions] = k
            self.v[seq, positions] = v
            self.pos[seq, positions] = positions
            self.length[seq] = max(self.length[seq], end)
            n = self.length[seq]
            return self.k[seq, :n], self.v[seq, :n], self.pos[seq, :n]
        if self.length[seq] == 0:        # nothing cached yet: the new keys only (a fresh prefill)
            keys, values, key_pos = np.asarray(k, self.k.dtype), np.asarray(v, self.v.dtype), positions
        else:
            keys = np.concatenate([self.k[seq], np.asarray(k, self.k.dtype)])
            values = np.concatenate([self.v[seq], np.asarray(v, self.v.dtype)])
            key_pos = np.concatenate([self.pos[seq], positions])
        self.length[seq] = max(self.length[seq], end)
        keep = slice(max(0, len(positions) - self.window), None)      # later keys overwrite earlier
        slots = positions[keep] % self.window
        self.k[seq, slots] = k[keep]
        self.v[seq, slots] = v[keep]
        self.pos[seq, slots] = positions[keep]
        return keys, values, key_pos

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class StaticKVCache:
    """Per-layer static caches for `batch` sequences of up to `context` positions."""

    def __init__(self, config: MiMoV2FlashConfig, batch: int, context: int, dtype=BF16):
        if context > config.max_position_embeddings:
            raise ValueError(f"static KV cache: context {context} exceeds max_position_embeddings="
                             f"{config.max_position_embeddings}")
        self.context = context
        self.layers = []
        for layer in range(config.num_hidden_layers):
            _, kv, d, dv = config.attention_shape(layer)
            self.layers.append(StaticLayerKVCache(batch, kv, d, dv, config.window_of(layer), context, dtype))
        self.seq_lens = np.zeros(batch, np.int64)

    @property
    def batch(self) -> int:
        return len(self.seq_lens)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.layers)
