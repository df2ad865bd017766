"""Input RMSNorm, the fused q|k|v projection and partial RoPE of q and k in one launch.

    xn  = rmsnorm(x) * norm_weight                       (kernels/rmsnorm.py, statistics in fp32)
    y   = xn @ W                                          (kernels/linear.py; W = Wq | Wk | Wv, [H, N])
    y[:, h*D : h*D + R] rotated for heads h < rope_heads  (kernels/rope.py's rotate-half)

Arguments (HBM): x [T, H] bf16; norm_weight [H] bf16; w [H, N] bf16, or float8_e4m3 (or its
bytes as uint8) with w_scale [H/128, N/128] fp32; positions [T] int32; cos_sin_table
[n_positions, R] fp32 (`rope.rope_table`). Constants: rope_heads (q heads + k heads: the first
rope_heads * D columns are heads of D = head_dim), eps. Returns y [T, N] in x's dtype; the host
launcher splits it into q, k and v. With rope_heads = 0 it is the final norm + lm_head.

Why one kernel: at decode a launch's fixed costs (about 2 us of first-DMA latency, 1.3 us per
DMA under the cost model) dominate RMSNorm (one 8 KiB row) and RoPE (a few rows), so as separate
launches they reach a few % of their roofline. Here the norm runs on the x^T the projection loads
anyway (`project`'s prologue, `rmsnorm.normalise_transposed`: sums of squares per partition, a
ones matmul across partitions, two multiplies), so the normalised activations never exist in
HBM; and RoPE runs on every projected output tile in SBUF before it is stored (`project`'s
epilogue): q and k never make an HBM round trip either. The rotation is the six element-wise
instructions of `rope.rotate_half` over all rotary heads of a tile's token blocks at once (a
strided SBUF view [tokens, blocks, heads, R/2]); cos/sin rows are gathered once per token group
by indirect DMAs on the positions, from the host's float64-exact table as in kernels/rope.py.

A rotary range [h*D, h*D + R) never straddles an output tile when R divides 128 and D (tiles are
multiples of 128 columns), which the kernel requires (MiMo: R = 64, D = 192).

LNC=2: the projection splits its output columns (token groups at prefill) between the programs;
each normalises the x^T it loaded and ropes the tiles it writes, so no program reads another's
results.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from mimo_kernels.backend import nki, nl, nisa
from mimo_kernels.checks import KernelInputError
from mimo_kernels.launch import RESIDENT, launch, on_device
from mimo_kernels.linear import BF16, kernel_weight, project
from mimo_kernels.rmsnorm import load_weight_transposed, normalise_transposed
from mimo_kernels.rope import positions_and_table, rotate_half

P = nl.tile_size.pmax


def gather_rows(dst, positions, cos_sin_table, t0):
    """dst [n, R] fp32 (SBUF) <- the cos | sin rows of tokens t0 .. t0+n-1: an indirect DMA on
    their positions."""
    n, R = dst.shape[0], cos_sin_table.shape[1]
    pos = nl.ndarray((n, 1), dtype=nl.int32, buffer=nl.sbuf)
    nisa.dma_copy(dst=pos, src=positions[t0:t0 + n].reshape((n, 1)))
    nisa.dma_copy(dst=dst, src=cos_sin_table.ap([[R, n], [1, R]], vector_offset=pos, indirect_dim=0))


def rope_epilogue(positions, cos_sin_table, rope_heads, head_dim):
    """`project`'s epilogue rotating the first R dims of heads 0 .. rope_heads-1 (columns h*D ..)
    of an output tile [rows, blocks, columns] holding tokens t0 .. t0+tokens-1 (blocks of `rows`,
    the last one ragged), columns n0 ..: one rotate_half over the whole blocks' rotary heads, one
    over the ragged block's valid rows. The tile is a whole SBUF tensor, so its rotary columns
    are an access pattern from its base. cos | sin rows are gathered once per token group."""
    R = cos_sin_table.shape[1]
    half = R // 2
    gathered = {}          # cos | sin rows per token group [rows, blocks, R], gathered once

    def apply(y_group, t0, n0, tokens):
        rows, blocks, cols = y_group.shape
        first = (n0 + head_dim - 1) // head_dim                 # first head starting in the tile
        heads = min(rope_heads, (n0 + cols - 1) // head_dim + 1) - first
        if heads <= 0:
            return
        key = str(t0)
        if key not in gathered:
            table_rows = nl.ndarray((rows, blocks, R), dtype=nl.float32, buffer=nl.sbuf)
            for b in range(blocks):
                n = min(rows, tokens - b * rows)
                gather_rows(table_rows[0:n, b, :], positions, cos_sin_table, t0 + b * rows)
            gathered[key] = table_rows
        table_rows = gathered[key]
        start = first * head_dim - n0
        full = tokens // rows
        pieces = [(0, full, rows)] if full else []
        if full < blocks:
            pieces.append((full, 1, tokens - full * rows))
        for b0, nb, n in pieces:
            # [n tokens, nb blocks, heads, R/2] at columns start + h * D (+ R/2) of blocks b0 ..
            pattern = [[blocks * cols, n], [cols, nb], [head_dim, heads], [1, half]]
            x1 = y_group.ap(pattern, offset=b0 * cols + start)
            x2 = y_group.ap(pattern, offset=b0 * cols + start + half)
            cs = table_rows[0:n, b0:b0 + nb, :]
            cos = cs[:, :, 0:half].expand_dim(2).broadcast(2, heads)          # [n, nb, heads, R/2]
            sin = cs[:, :, half:R].expand_dim(2).broadcast(2, heads)
            rotate_half(x1, x2, cos, sin)
    return apply


@nki.jit
def norm_qkv_rope_kernel(x, norm_weight, w, positions, cos_sin_table, w_scale=None, rope_heads=0,
                         head_dim=128, eps=1e-5):
    """y [T, N] = rope(rmsnorm(x) * norm_weight @ W) on the first rope_heads heads (module doc)."""
    T, H = x.shape
    N = w.shape[1]
    R = cos_sin_table.shape[1]
    if not (tuple(positions.shape) == (T,)):
        raise KernelInputError(f"norm_qkv_rope: positions shape {positions.shape} must be ({T},)")
    if not (R % 2 == 0 and P % R == 0 and head_dim % R == 0):
        raise KernelInputError(f"norm_qkv_rope: rotary dim {R} must be even and divide {P} and the head dim "
                               f"{head_dim} (a rotary range must not straddle a 128-column tile)")
    if not (0 <= rope_heads * head_dim <= N):
        raise KernelInputError(f"norm_qkv_rope: {rope_heads} rotary heads of {head_dim} exceed the {N} "
                               f"output columns")
    if not (tuple(norm_weight.shape) == (H,)):
        raise KernelInputError(f"norm_qkv_rope: norm weight shape {norm_weight.shape} must be ({H},)")
    weight_t = load_weight_transposed(norm_weight)

    def normalise(x_t):
        normalise_transposed(x_t, weight_t, eps)
    y = nl.ndarray((T, N), dtype=x.dtype, buffer=nl.shared_hbm)
    epilogue = rope_epilogue(positions, cos_sin_table, rope_heads, head_dim) if rope_heads else None
    project(x, (w,), (w_scale,), y, epilogue, normalise)
    return y


# --------------------------------------------------------------------------- host launchers

def _tokens(x) -> int:
    if np.ndim(x) != 2:
        raise ValueError(f"norm_qkv_rope: x must be [tokens, hidden], got shape {np.shape(x)}")
    return np.shape(x)[0]


def _launch(x, norm_weight, weight, scale, positions, table, rope_heads, head_dim, eps, dtype, report):
    weight, scale = kernel_weight(weight, scale)
    args = (on_device(x, dtype), np.ascontiguousarray(norm_weight, dtype=BF16), weight,
            positions, table) + (() if scale is None else (scale,))
    return launch(norm_qkv_rope_kernel, *args, rope_heads=int(rope_heads), head_dim=int(head_dim),
                  eps=float(eps), report=report, splits_lnc=True)


def norm_qkv_rope(x, norm_weight, weight, positions, theta, heads, head_dim, rotary_dim=64, scale=None,
                  eps=1e-5, dtype=BF16, report=False, max_position=None):
    """Host launcher with the semantics of `ReferenceOps.norm_qkv_rope`: x [T, H] (a float array or
    device tensor, sent as `dtype`), norm_weight [H], the PREPARED fused weight [H, Hq*D + Hkv*D + Hkv*Dv] = the
    Hub q, k, v matrices transposed side by side (bf16, or float8_e4m3 / its uint8 bytes with
    `scale`), positions [T], `heads` = (Hq, Hkv). Returns q [T, Hq, D] and k [T, Hkv, D] (first
    `rotary_dim` dims rotated at `theta`) and v [T, Hkv*Dv], in `dtype` (device tensors), plus the cost report
    when `report=True`. `max_position`: see `rope.positions_and_table`."""
    q_heads, kv_heads = heads
    positions, table = positions_and_table("norm_qkv_rope", positions, _tokens(x), theta, rotary_dim,
                                           max_position)
    result = _launch(x, norm_weight, weight, scale, positions, table, q_heads + kv_heads, head_dim, eps,
                     dtype, report)
    y, rep = result if report else (result, None)
    T, qk = y.shape[0], (q_heads + kv_heads) * head_dim
    q = y[:, :q_heads * head_dim].reshape(T, q_heads, head_dim)
    k = y[:, q_heads * head_dim:qk].reshape(T, kv_heads, head_dim)
    out = (q, k, y[:, qk:])
    return (out, rep) if report else out


@lru_cache(maxsize=None)
def _no_rotary_inputs(tokens: int):
    """Positions and a cos/sin table for a launch without rotary heads (never read): made read-only
    and uploaded once per token count, like a static plan."""
    arrays = np.zeros(tokens, np.int32), np.zeros((1, 2), np.float32)
    for array in arrays:
        array.flags.writeable = False
    return tuple(RESIDENT.resident(array, kind="plans") for array in arrays)


def norm_linear(x, norm_weight, weight, scale=None, eps=1e-5, dtype=BF16, report=False):
    """Host launcher of rmsnorm(x) * norm_weight @ W in one launch (the final norm + lm_head):
    x [T, H], the PREPARED weight [H, N] (bf16, or FP8 with `scale`). Returns y [T, N] in `dtype` (a
    device tensor), plus the cost report when `report=True`."""
    positions, table = _no_rotary_inputs(_tokens(x))
    return _launch(x, norm_weight, weight, scale, positions, table, 0, 2, eps, dtype, report)
