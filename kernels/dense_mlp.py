"""Dense SwiGLU MLP (MiMo layer 0 and the MTP blocks): y = (silu(x @ Wg) * (x @ Wu)) @ Wd.

Arguments (HBM): x [T, H] bf16; w_gate, w_up [H, I] and w_down [I, H] in the prepared [in, out]
layout, bf16, or float8_e4m3 each with its fp32 block scale ([H/128, I/128], [H/128, I/128],
[I/128, H/128]). MiMo: H = 4096, I = 16384. Returns y [T, H] in x's dtype.

One kernel, two passes of the shared tiled matmul (`mimo_kernels.linear.project`, whose docstring
describes the schedules):
1. gate and up together: every x^T block meets the gate and the up column tile of the same
   columns, and the PSUM eviction turns the two fp32 accumulators into h = silu(g) * u directly
   (ScalarE silu reading PSUM, a multiply with the other accumulator in PSUM), so g and u never
   exist outside PSUM;
2. down projection of h [T, I], which goes through a private HBM scratch tensor: T * I * 2 bytes
   written and read once, negligible next to the weights at decode (T * 64 KiB against 384 MiB of
   bf16 weights) and next to the matmuls at prefill.

FP8 weights may come as uint8 bytes (the device path). At LNC=2 both passes split their output
columns (or token groups) between the programs; h is then shared and a core barrier lies between.
"""
from __future__ import annotations

import numpy as np

from mimo_kernels.backend import nki, nl, nisa
from mimo_kernels.launch import launch, on_device
from mimo_kernels.linear import BF16, kernel_weight, project
from mimo_kernels.checks import KernelInputError


@nki.jit
def dense_mlp_kernel(x, w_gate, w_up, w_down, gate_scale=None, up_scale=None, down_scale=None):
    """y [T, H] = (silu(x @ w_gate) * (x @ w_up)) @ w_down (see module doc)."""
    T, H = x.shape
    I = w_gate.shape[1]
    if not (tuple(w_down.shape) == (I, H)):
        raise KernelInputError(
            f"dense_mlp: w_down shape {w_down.shape} must be [{I}, {H}] for w_gate {w_gate.shape} ([in, out] layout)")
    if not ((gate_scale is None) == (up_scale is None) == (down_scale is None)):
        raise KernelInputError("dense_mlp: give block scales for all three weights (FP8) or for none (bf16)")
    shares = nl.num_programs(0)
    # At LNC=2 each program computes its share of h, and the down projection reads all of it:
    # h lives in shared HBM and a core barrier separates the two passes.
    hidden = nl.ndarray((T, I), dtype=x.dtype, buffer=nl.hbm if shares == 1 else nl.shared_hbm)
    project(x, (w_gate, w_up), (gate_scale, up_scale), hidden)
    if shares > 1:
        nisa.core_barrier(hidden, (0, 1))
    y = nl.ndarray((T, H), dtype=x.dtype, buffer=nl.shared_hbm)
    project(hidden, (w_down,), (down_scale,), y)
    return y


def dense_mlp(x, gate, up, down, scales=None, dtype=BF16, report=False):
    """Host launcher with the semantics of `ReferenceOps.dense_mlp` (`reference.swiglu`), taking the
    PREPARED weights: gate, up [H, I] and down [I, H] = the Hub matrices transposed, bf16; or
    float8_e4m3 with `scales` = (gate_scale, up_scale, down_scale) fp32 block multipliers.
    x [T, H] (a float array or device tensor, sent as `dtype`). Returns y [T, H] in `dtype` (a device
    tensor), plus the cost report
    when `report=True`."""
    if np.ndim(x) != 2:
        raise ValueError(f"dense_mlp: x must be [tokens, hidden], got shape {tuple(np.shape(x))}")
    scales = (None, None, None) if scales is None else tuple(scales)
    if len(scales) != 3:
        raise ValueError(f"dense_mlp: scales must be (gate_scale, up_scale, down_scale), got {len(scales)} items")
    prepared = [kernel_weight(w, s) for w, s in zip((gate, up, down), scales)]
    args = [on_device(x, dtype)] + [w for w, _ in prepared]
    if scales[0] is not None:
        args += [s for _, s in prepared]
    return launch(dense_mlp_kernel, *args, report=report, splits_lnc=True)
