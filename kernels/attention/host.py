"""Host-side helpers of the attention launchers: input checks and the conversions between the
reference layout (q [T, Hq, D], k [S, Hkv, D], v [S, Hkv, Dv]) and the kernels' layouts."""
from __future__ import annotations

import ml_dtypes
import numpy as np

from mimo_kernels.launch import on_device
from .flash import P_MAX

BF16 = np.dtype(ml_dtypes.bfloat16)


def check_attention_shapes(q, k, v, sink, window):
    """Validate reference-layout inputs (q [T, Hq, D], k [S, Hkv, D], v [S, Hkv, Dv]); raises
    ValueError naming the offending shape or limit."""
    if q.ndim != 3 or k.ndim != 3 or v.ndim != 3:
        raise ValueError(f"attention: q, k, v must be 3-D [tokens, heads, dim], got shapes "
                         f"{q.shape}, {k.shape}, {v.shape}")
    hq, d = q.shape[1:]
    s, hkv, dk = k.shape
    if dk != d:
        raise ValueError(f"attention: k head dim {dk} differs from q head dim {d} (k {k.shape}, q {q.shape})")
    if v.shape[:2] != (s, hkv):
        raise ValueError(f"attention: v {v.shape} must be [{s}, {hkv}, Dv] to match k {k.shape}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"attention: {hq} query heads are not a multiple of {hkv} KV heads")
    if hq // hkv > P_MAX:
        raise ValueError(f"attention: {hq // hkv} query heads per KV head exceed the {P_MAX} score rows")
    if v.shape[2] > P_MAX:
        raise ValueError(f"attention: V head dim {v.shape[2]} exceeds {P_MAX} (PV outputs and PSUM "
                         f"budget are sized for it)")
    if sink is not None and np.shape(sink) != (hq,):
        raise ValueError(f"attention: sink must have one logit per query head, shape ({hq},), got "
                         f"{np.shape(sink)}")
    if window is not None and (int(window) != window or window < 1):
        raise ValueError(f"attention: window must be a positive number of keys, got {window!r}")


def scaled_rows_t(q, kv_heads: int, scale: float):
    """q [T, Hq, D] (host array or device tensor) -> [Hkv, D, T*G] float32 device tensor: Q * scale,
    transposed per KV head (column t*G + i)."""
    t_len, hq, d = q.shape
    group = hq // kv_heads
    scaled = on_device(q, np.float32) * np.float32(scale)
    return scaled.reshape(t_len, kv_heads, group, d).permute(1, 3, 0, 2).reshape(kv_heads, d, t_len * group)


def to_rows_t(q, kv_heads: int, scale: float):
    """q [T, Hq, D] -> [Hkv, D, T*G] bf16 device tensor: Q * scale, transposed per KV head (column t*G + i)."""
    return on_device(scaled_rows_t(q, kv_heads, scale), BF16)


def from_rows(o_rows, t_len: int):
    """[Hkv, T*G, Dv] -> [T, Hq, Dv] float32 (device tensors)."""
    kv_heads, total, dv = o_rows.shape
    group = total // t_len
    return o_rows.float().reshape(kv_heads, t_len, group, dv).permute(1, 0, 2, 3).reshape(t_len, kv_heads * group, dv)


def kv_layout(a, axes):
    """Keys or values (host array or device tensor) permuted to `axes`: a contiguous bf16 device tensor."""
    return on_device(a, BF16).permute(*axes).contiguous()


def sink_per_row(sink, kv_heads: int, group: int):
    """[Hkv, R, 1] fp32: the sink logit of row r (head g*G + r % G) of a row tile."""
    rows = (P_MAX // group) * group
    heads = np.arange(kv_heads)[:, None] * group + np.arange(rows)[None, :] % group
    return np.asarray(sink, np.float32)[heads][..., None]

