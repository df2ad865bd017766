"""A projection, the residual add and the next RMSNorm in one launch (o_proj + post-attention norm).

    o = a @ W                              (kernels/linear.py: bf16, or FP8 with block scales)
    s = residual + o                       (in residual's dtype: the new residual stream)
    y = rmsnorm(s) * norm_weight           (kernels/rmsnorm.py, statistics in fp32)

Arguments (HBM): a [T, K] bf16 (the attention output, K = heads * v_head_dim), w [K, H] bf16, or
float8_e4m3 (or its uint8 bytes) with w_scale [K/128, H/128] fp32; residual [T, H] bf16,
norm_weight [H] bf16. Returns (s, y), both [T, H] in residual's dtype.

The decoder layer runs o_proj and then add_rmsnorm on its result: two launches, the second paying a
first-DMA latency (~2 us) and its own transfers for a few KiB at decode. Here o goes to an HBM
scratch that the norm reads back straight away (the norm needs whole rows, and the projection
produces them a column group at a time). LNC=2: the projection splits its columns between the
programs, so o is shared HBM and a core barrier separates the two steps; the norm then splits
the tokens.
"""
from __future__ import annotations

import numpy as np

from mimo_kernels.backend import nki, nl, nisa
from mimo_kernels.launch import launch, on_device
from mimo_kernels.linear import BF16, kernel_weight, project
from mimo_kernels.rmsnorm import rmsnorm_rows


@nki.jit
def linear_add_rmsnorm_kernel(a, w, residual, norm_weight, w_scale=None, eps=1e-5):
    """(s, y): s = residual + a @ W, y = rmsnorm(s) * norm_weight (module doc)."""
    T = a.shape[0]
    H = w.shape[1]
    shares = nl.num_programs(0)
    o = nl.ndarray((T, H), dtype=a.dtype, buffer=nl.hbm if shares == 1 else nl.shared_hbm)
    project(a, (w,), (w_scale,), o)
    if shares > 1:
        nisa.core_barrier(o, (0, 1))
    total = nl.ndarray(residual.shape, dtype=residual.dtype, buffer=nl.shared_hbm)
    y = nl.ndarray(residual.shape, dtype=residual.dtype, buffer=nl.shared_hbm)
    rmsnorm_rows(residual, o, norm_weight, y, total, eps)
    return total, y


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
