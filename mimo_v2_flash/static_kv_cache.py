"""Preallocated KV cache of static size, in the layout the cached-attention kernel reads: what a
device keeps resident between steps.

The ragged `KVCache` grows its full-attention layers by doubling. This one allocates everything
once: full layers `context` key slots per sequence (the largest decode bucket's context; slot =
position), sliding-window layers a ring of `window` slots (slot = position % window). Storage is the
kernel's (`mimo_kernels.attention.decode`): keys `k [B, P, T, slots]` (transposed, the Hkv x D
rows in the kernel's partition tiles: `tiled_rows`, e.g. 128 x 6 for 4 heads of 192; keys
contiguous), values `v [B, slots, Hkv, Dv]` with slot s in row `value_rows(s,
slots)` (each block of 2048 slots stores its 128-key tiles transposed, so the kernel's V load reads
long runs), both bfloat16 by default, and key positions `pos [B, slots]` float32 with
EMPTY_POSITION in empty slots. A step writes its new keys in
place (`store`), and `attention_decode_cache` hands these buffers to the kernel as they are (no
relayout): `NkiOps.attention` does so for every decode bucket. On the kernel backend the buffers
are device-resident (`resident=True`: registered with `mimo_kernels.launch.RESIDENT`, uploaded once
at allocation, every write applied to the device copy in place).

`update` has the ragged cache's contract (keys to attend over, model layout: the cached ones, then
the new ones, with integer positions), so the layer code and both backends take either cache:

* full layers return the slots [0, length) of the sequence in position order (the keys a view of
  the static buffer, the values gathered from their rows);
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
from .kv_cache import LayerCacheBase, LayerCaches

EMPTY_POSITION = 2 ** 30      # the attention kernels' marker of an empty slot (attention_decode)
BF16 = np.dtype(ml_dtypes.bfloat16)


def _permuted(a, axes):
    """`a` with its axes reordered; a device tensor (a resident cache's write or read) stays one."""
    return a.permute(*axes) if hasattr(a, "permute") else np.asarray(a).transpose(axes)


class StaticLayerKVCache(LayerCacheBase):
    """Keys [B, P, T, slots] (`tiled_rows`), values [B, slots, Hkv, Dv] (rows in `value_rows` order),
    key positions [B, slots] float32.

    `resident`: register the three buffers with `mimo_kernels.launch.RESIDENT` (the kernel backend):
    they are uploaded once, here, every launch that reads them passes the device copies, and every
    write goes through `RESIDENT.write`, which moves only the written slots."""

    empty = EMPTY_POSITION

    def __init__(self, batch: int, kv_heads: int, head_dim: int, v_head_dim: int, window: int | None,
                 context: int, dtype=BF16, resident: bool = False):
        super().__init__(batch, window)
        self.context = context
        from mimo_kernels.attention.plan import head_row_tiling    # the kernel's layout, loaded with the kernels
        slots = window if window is not None else context
        tiling = head_row_tiling(kv_heads, head_dim)
        self.kv_heads = kv_heads
        self.k = np.zeros((batch, tiling.parts, tiling.tiles, slots), dtype)
        self.v = np.zeros((batch, slots, kv_heads, v_head_dim), dtype)
        self.pos = np.full((batch, slots), self.empty, np.float32)
        self.device = None       # mimo_kernels.launch.RESIDENT when the buffers are registered
        if resident:
            from mimo_kernels.launch import RESIDENT        # the simulator: loaded only for the kernels
            for buffer in (self.k, self.v, self.pos):
                RESIDENT.resident(buffer, kind="kv_cache")
            self.device = RESIDENT

    def value_rows(self, slots):
        """The rows of `v` holding key slots `slots` (an index array or a slice of the slots)."""
        from mimo_kernels.attention.plan import value_rows    # the kernel's layout, loaded with the kernels
        n_slots = self.v.shape[1]
        return value_rows(np.arange(n_slots)[slots], n_slots)

    def slot_kv(self, seq: int, slots, on_device: bool = False):
        """(keys [n, Hkv, D], values [n, Hkv, Dv]) of the slots, in slot order; `on_device`: read
        from the resident buffers' device copies (torch), which hold what a device step wrote."""
        from mimo_kernels.attention.plan import untiled_rows
        k, v = (self.k, self.v) if not on_device else (self.device.lookup(self.k), self.device.lookup(self.v))
        keys = _permuted(untiled_rows(k[seq][:, :, slots], self.kv_heads), (2, 0, 1))
        return keys, v[seq][self.value_rows(slots)]

    def _put(self, buffer: np.ndarray, index: tuple, value) -> None:
        """buffer[index] = value, also in the device copy of a resident buffer."""
        if self.device is None:
            buffer[index] = value
        else:
            self.device.write(buffer, index, value)

    # The sequence is indexed by a slice so that `slots` (an index array) is the only advanced
    # index: NumPy and torch then keep every axis in place.
    def store_kv(self, seq: int, slots, k, v) -> None:
        row = slice(seq, seq + 1)
        from mimo_kernels.attention.plan import tiled_rows
        keys = tiled_rows(_permuted(k, (1, 2, 0)), self.kv_heads)
        self._put(self.k, (row, slice(None), slice(None), slots), keys[None])
        self._put(self.v, (row, self.value_rows(slots)), (v if hasattr(v, "permute") else np.asarray(v))[None])

    def store_positions(self, seq: int, slots, positions) -> None:
        self._put(self.pos, (slice(seq, seq + 1), slots), positions)

    def saved_slots(self, seq: int, slots):
        """Copies of the slots' (keys, values, positions), for `restore_slots`: a resident cache's
        keys and values from the device copies, which alone hold what device steps wrote (on a
        NeuronCore the host buffers go stale), copied on the device (nothing read back)."""
        if self.device is None:
            return super().saved_slots(seq, slots)
        k, v = self.slot_kv(seq, slots, on_device=True)
        return k.clone(), v.clone(), self.pos[seq, slots].copy()

    def store(self, seq: int, positions, k, v) -> None:
        """Write the new keys in place (full layers: slot = position; SWA: the ring)."""
        positions = np.asarray(positions)
        end = int(positions.max()) + 1
        if end > self.context:
            raise ValueError(f"static KV cache: position {end - 1} of sequence {seq} is beyond its context "
                             f"of {self.context} positions (choose a larger decode bucket)")
        if self.window is None:
            self.write(seq, positions, positions, k, v)
        else:
            self.write_ring(seq, positions, k, v)
        self.length[seq] = max(self.length[seq], end)

    def update(self, seq: int, positions: np.ndarray, k: np.ndarray, v: np.ndarray):
        """Store the new keys of sequence `seq` in place; return (keys, values, positions) to
        attend over (module docstring). Device tensors k, v (the kernel backend's activations, on a
        resident cache) are written and gathered on the device."""
        positions = np.asarray(positions)
        on_device = hasattr(k, "detach")        # a torch tensor: the kernel backend's
        if self.window is None:
            self.store(seq, positions, k, v)
            n = self.length[seq]
            keys, values = self.slot_kv(seq, slice(0, n), on_device)
            return keys, values, self.pos[seq, :n].astype(np.int64)
        if on_device:
            import torch
            from mimo_kernels.launch import torch_dtype
            k, v, concat = k.to(torch_dtype(self.k.dtype)), v.to(torch_dtype(self.v.dtype)), torch.cat
        else:
            k, v, concat = np.asarray(k, self.k.dtype), np.asarray(v, self.v.dtype), np.concatenate
        if self.length[seq] == 0:        # nothing cached yet: the new keys only (a fresh prefill)
            keys, values, key_pos = k, v, positions
        else:
            ring_k, ring_v = self.slot_kv(seq, slice(None), on_device)
            keys, values = concat([ring_k, k]), concat([ring_v, v])
            key_pos = np.concatenate([self.pos[seq].astype(np.int64), positions])
        self.store(seq, positions, k, v)
        return keys, values, key_pos


class StaticKVCache(LayerCaches):
    """Per-layer static caches for `batch` sequences of up to `context` positions. `batch_slots`:
    the sequences the buffers hold (a decode bucket's batch, so that the attention launch on them
    has the bucket's shape; default `batch`); `resident`: see `StaticLayerKVCache`."""

    def __init__(self, config: MiMoV2FlashConfig, batch: int, context: int, dtype=BF16,
                 batch_slots: int | None = None, resident: bool = False):
        if context > config.max_position_embeddings:
            raise ValueError(f"static KV cache: context {context} exceeds max_position_embeddings="
                             f"{config.max_position_embeddings}")
        slots = batch if batch_slots is None else int(batch_slots)
        if slots < batch:
            raise ValueError(f"static KV cache: batch_slots={slots} cannot hold a batch of {batch} sequences")
        self.context = context
        super().__init__(config, batch, lambda kv, d, dv, window: StaticLayerKVCache(
            slots, kv, d, dv, window, context, dtype, resident))
