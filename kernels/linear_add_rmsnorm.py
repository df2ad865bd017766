"""A projection, the residual add and the next RMSNorm in one launch (o_proj + post-attention norm).

    o = a @ W                              (kernels/linear.py: bf16, or FP8 with block scales)
    s = residual + o                       (in residual's dtype: the new residual stream)
    y = rmsnorm(s) * norm_weight           (kernels/rmsnorm.py, statistics in fp32)

Arguments (HBM): a [T, K] bf16 (the attention output, K = heads * v_head_dim), w [K, H] bf16, or
float8_e4m3 (or its uint8 bytes) with w_scale [K/128, H/128] fp32; residual [T, H] bf16,
norm_weight [H] bf16. Returns (s, y), both [T, H] in residual's dtype.

The decoder layer runs o_proj and then add_rmsnorm on its result: two launches, the second paying a
first-DMA latency (~2 us) and its own transfers for a few KiB at decode. Here, at prefill (more
than 64 tokens, LNC=1), the add and the norm run in the projection's epilogue (`ResidualNorm`):
each output tile becomes s = residual + o before the projection stores it, and a 128-token
block's y goes out once all its columns are in, overlapping the projection of the rest. At
decode, and at LNC=2 (where the programs split the columns, so neither sees whole rows), o goes
to an HBM scratch that the norm reads back straight away (shared HBM and a core barrier at LNC=2;
the norm then splits the tokens).
"""
from __future__ import annotations

import numpy as np

from mimo_kernels.backend import nki, nl, nisa
from mimo_kernels.launch import launch, on_device
from mimo_kernels.linear import BF16, P, WEIGHTS_STATIONARY_MAX_TOKENS, kernel_weight, project
from mimo_kernels.rmsnorm import load_weight_rows, rmsnorm_rows, store_normalised_rows


@nki.jit
def linear_add_rmsnorm_kernel(a, w, residual, norm_weight, w_scale=None, eps=1e-5):
    """(s, y): s = residual + a @ W, y = rmsnorm(s) * norm_weight (module doc)."""
    T = a.shape[0]
    H = w.shape[1]
    shares = nl.num_programs(0)
    total = nl.ndarray(residual.shape, dtype=residual.dtype, buffer=nl.shared_hbm)
    y = nl.ndarray(residual.shape, dtype=residual.dtype, buffer=nl.shared_hbm)
    if shares == 1 and T > WEIGHTS_STATIONARY_MAX_TOKENS:
        project(a, (w,), (w_scale,), total, epilogue=ResidualNorm(residual, norm_weight, y, eps).add_tile)
        return total, y
    o = nl.ndarray((T, H), dtype=a.dtype, buffer=nl.hbm if shares == 1 else nl.shared_hbm)
    project(a, (w,), (w_scale,), o)
    if shares > 1:
        nisa.core_barrier(o, (0, 1))
    rmsnorm_rows(residual, o, norm_weight, y, total, eps)
    return total, y


class ResidualNorm(nl.NKIObject):
    """The projection's epilogue at prefill (LNC=1): each output tile o [tokens, columns] becomes
    s = residual + o in place (so the projection stores the new residual stream), its squares
    summed per row on ScalarE; when a 128-token block has all its columns, y = s * rstd * weight
    goes out. The block's residual rows are loaded once (one DMA) and receive s, so no o scratch
    is written to HBM and read back, and a block's norm overlaps the projection of the next."""

    def __init__(self, residual, norm_weight, y, eps):
        T, H = residual.shape
        self.residual, self.y, self.eps = residual, y, eps
        self.weight_rows = load_weight_rows(norm_weight)
        blocks = (T + P - 1) // P
        self.rows = [None] * blocks          # per 128-token block: residual rows, then s
        self.sums = [None] * blocks          # per block: squares summed per column tile [rows, H / 128]
        self.done = [0] * blocks             # columns added so far

    def add_tile(self, o_group, t0, n0, tokens):
        """The epilogue: every 128-token block of the output tile [rows, blocks, cols]."""
        rows, blocks, cols = o_group.shape
        for b in range(blocks):
            self.add_block(o_group[0:min(rows, tokens - b * rows), b, :], t0 + b * rows, n0)

    def add_block(self, o_tile, t0, n0):
        rows, cols = o_tile.shape
        H = self.residual.shape[1]
        b = t0 // P
        if self.rows[b] is None:
            self.rows[b] = nl.ndarray((rows, H), dtype=self.residual.dtype, buffer=nl.sbuf)
            nisa.dma_copy(dst=self.rows[b], src=self.residual[t0:t0 + rows, :])
            self.sums[b] = nl.ndarray((rows, H // P), dtype=nl.float32, buffer=nl.sbuf)
            nisa.memset(dst=self.sums[b], value=0.0, engine=nisa.engine.gpsimd)
        s = self.rows[b][:, n0:n0 + cols]
        nisa.tensor_tensor(dst=s, data1=s, data2=o_tile, op=nl.add)                       # VectorE
        nisa.tensor_copy(dst=o_tile, src=s, engine=nisa.engine.gpsimd)
        squares = nl.ndarray((rows, cols), dtype=nl.float32, buffer=nl.sbuf)             # by-product
        nisa.activation(dst=squares, op=nl.square, data=s, reduce_op=nl.add,
                        reduce_res=self.sums[b][:, n0 // P:n0 // P + 1], reduce_cmd=nisa.reduce_cmd.reset_reduce)
        self.done[b] += cols
        if self.done[b] == H:
            sum_sq = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
            nisa.tensor_reduce(dst=sum_sq, op=nl.add, data=self.sums[b], axis=1)
            store_normalised_rows(self.rows[b], sum_sq, self.weight_rows, self.y, t0, self.eps)
            self.rows[b], self.sums[b] = None, None


def linear_add_rmsnorm(a, weight, residual, norm_weight, scale=None, eps=1e-5, dtype=BF16, report=False):
    """Host launcher with the semantics of `ReferenceOps.linear_add_rmsnorm`: a [T, K], the PREPARED
    weight [K, H] = W_hf.T (bf16, or FP8 / its uint8 bytes with `scale`), residual [T, H],
    norm_weight [H] (activations: float arrays or device tensors, sent as `dtype`). Returns
    (residual + a @ W, rmsnorm of that) in `dtype` as device tensors, plus the cost report when
    `report=True`."""
    if np.ndim(a) != 2 or np.ndim(residual) != 2 or np.shape(a)[0] != np.shape(residual)[0]:
        raise ValueError(f"linear_add_rmsnorm: a [T, K] and residual [T, H] must be 2-D with one token count, "
                         f"got {tuple(np.shape(a))} and {tuple(np.shape(residual))}")
    weight, scale = kernel_weight(weight, scale)
    if weight.shape[1] != np.shape(residual)[1]:
        raise ValueError(f"linear_add_rmsnorm: weight {weight.shape} must give residual's {np.shape(residual)[1]} "
                         f"columns ([in, out] layout)")
    args = (on_device(a, dtype), weight, on_device(residual, dtype),
            np.ascontiguousarray(norm_weight, dtype=BF16)) + (() if scale is None else (scale,))
    return launch(linear_add_rmsnorm_kernel, *args, eps=float(eps), report=report, splits_lnc=True)
