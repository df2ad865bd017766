"""KV cache: full-attention layers append; sliding-window layers keep a ring buffer of the window.

Sequences in a batch are independent (ragged): each has its own length. A full layer stores every
key of a sequence (capacity doubles as it grows); an SWA layer stores only `window` slots per
sequence (slot = position % window), so its memory is constant. Keys are returned with their
absolute positions and the attention masks by position, so the ring order never matters.

`LayerCacheBase` and `LayerCaches` hold what this cache and the preallocated one of
`static_kv_cache.py` share: slot reads and writes in model layout whatever the storage layout, the
ring-buffer write, the rollback of a pass (`CacheRollback` in speculative.py), the per-layer set.
"""

from __future__ import annotations

import numpy as np

from .config import MiMoV2FlashConfig


class LayerCacheBase:
    """One layer's keys, values and key positions for a batch; subclasses choose the storage layout
    (`slot_kv`, `store_kv`) and the position of an empty slot (`empty`)."""

    empty = -1

    def __init__(self, batch: int, window: int | None):
        self.window = window
        self.length = np.zeros(batch, np.int64)   # keys stored so far (full layers: slots [0, length))

    def slot_kv(self, seq: int, slots):
        """(keys [n, Hkv, D], values [n, Hkv, Dv]) of sequence `seq`'s slots, model layout."""
        raise NotImplementedError

    def store_kv(self, seq: int, slots, k, v) -> None:
        """Write keys [n, Hkv, D] and values [n, Hkv, Dv] (model layout) into the slots."""
        raise NotImplementedError

    def store_positions(self, seq: int, slots, positions) -> None:
        self.pos[seq, slots] = positions

    def store(self, seq: int, positions, k, v) -> None:
        """Write the new keys of sequence `seq` (positions [n], k [n, Hkv, D], v [n, Hkv, Dv]) into
        their slots: the write half of `update`, for a reader of the cache itself."""
        raise NotImplementedError

    def write(self, seq: int, slots, positions, k, v) -> None:
        self.store_kv(seq, slots, k, v)
        self.store_positions(seq, slots, positions)

    def write_ring(self, seq: int, positions, k, v) -> None:
        """Sliding-window layers: the new keys into slots position % window (later keys overwrite
        earlier ones, so of a prefill longer than the window only the last `window` are kept)."""
        keep = slice(max(0, len(positions) - self.window), None)
        self.write(seq, positions[keep] % self.window, positions[keep], k[keep], v[keep])

    def saved_slots(self, seq: int, slots):
        """Copies of the slots' (keys, values, positions), for `restore_slots`."""
        k, v = self.slot_kv(seq, slots)
        return np.array(k), np.array(v), self.pos[seq, slots].copy()

    def restore_slots(self, seq: int, slots, saved) -> None:
        self.write(seq, slots, saved[2], saved[0], saved[1])

    def truncate(self, seq: int, length: int) -> None:
        """Full layers: forget the slots from `length` on."""
        self.store_positions(seq, slice(length, self.length[seq]), self.empty)
        self.length[seq] = length

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class LayerKVCache(LayerCacheBase):
    """Keys [B, slots, Hkv, D], values [B, slots, Hkv, Dv] and key positions [B, slots] (-1 = empty)."""

    def __init__(self, batch: int, kv_heads: int, head_dim: int, v_head_dim: int,
                 window: int | None, dtype=np.float32, capacity: int = 64):
        super().__init__(batch, window)
        slots = window if window is not None else capacity
        self.k = np.zeros((batch, slots, kv_heads, head_dim), dtype)
        self.v = np.zeros((batch, slots, kv_heads, v_head_dim), dtype)
        self.pos = np.full((batch, slots), self.empty, np.int64)

    def slot_kv(self, seq: int, slots):
        return self.k[seq, slots], self.v[seq, slots]

    def store_kv(self, seq: int, slots, k, v) -> None:
        self.k[seq, slots] = k
        self.v[seq, slots] = v

    def _grow(self, needed: int) -> None:
        slots = self.k.shape[1]
        if needed <= slots:
            return
        new = max(needed, 2 * slots)
        pad = new - slots
        self.k = np.pad(self.k, ((0, 0), (0, pad), (0, 0), (0, 0)))
        self.v = np.pad(self.v, ((0, 0), (0, pad), (0, 0), (0, 0)))
        self.pos = np.pad(self.pos, ((0, 0), (0, pad)), constant_values=self.empty)

    def update(self, seq: int, positions: np.ndarray, k: np.ndarray, v: np.ndarray):
        """Store new keys of sequence `seq`; return (keys, values, positions) to attend over:
        the cached keys followed by all the new ones (a prefill longer than the window still
        sees every key its queries need)."""
        valid = self.pos[seq] >= 0
        keys = np.concatenate([self.k[seq][valid], k.astype(self.k.dtype)])
        values = np.concatenate([self.v[seq][valid], v.astype(self.v.dtype)])
        key_pos = np.concatenate([self.pos[seq][valid], positions])
        self.store(seq, positions, k, v)
        return keys, values, key_pos

    def store(self, seq: int, positions, k, v) -> None:
        if self.window is None:
            start = self.length[seq]
            self._grow(start + len(positions))
            self.write(seq, np.arange(start, start + len(positions)), positions, k, v)
            self.length[seq] += len(positions)
        else:
            self.write_ring(seq, positions, k, v)


class LayerCaches:
    """Per-layer caches for a batch of independent sequences, plus each sequence's length;
    `make_layer(kv_heads, head_dim, v_head_dim, window)` builds one layer's cache."""

    def __init__(self, config: MiMoV2FlashConfig, batch: int, make_layer):
        self.layers = []
        for layer in range(config.num_hidden_layers):
            _, kv, d, dv = config.attention_shape(layer)
            self.layers.append(make_layer(kv, d, dv, config.window_of(layer)))
        self.seq_lens = np.zeros(batch, np.int64)

    @property
    def batch(self) -> int:
        return len(self.seq_lens)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.layers)


class KVCache(LayerCaches):
    """The ragged cache of every layer (`LayerKVCache`)."""

    def __init__(self, config: MiMoV2FlashConfig, batch: int, dtype=np.float32):
        super().__init__(config, batch, lambda kv, d, dv, window: LayerKVCache(batch, kv, d, dv, window, dtype))
