"""FP8 e4m3 block quantisation: the Hub's OCP format and Trainium's.

Two e4m3 formats share 4 exponent bits (bias 7) and 3 mantissa bits but differ at the top:

* OCP e4m3fn (`ml_dtypes.float8_e4m3fn`, safetensors `F8_E4M3`): no infinities, max +-448.
  The Hub checkpoint uses it.
* Trainium's e4m3 (`ml_dtypes.float8_e4m3`, IEEE-style): exponent 1111 means inf/NaN, max +-240.
  Every code below 0x78 (|x| <= 240) decodes to the same value in both, so a tensor quantised to
  +-240 is also a valid `F8_E4M3` file; 256..448 become inf/NaN on Trainium.

Block scales follow the DeepSeek convention of the Hub: a float32 grid over 128 x 128 blocks,
`weight_scale_inv`, which is a multiplier: W = float(q) * S[row block, column block].
Quantising picks S = block max|W| / format max, so the largest element of every block lands on
the format maximum and nothing can clip.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

from .weights import FP8_BLOCK


@dataclass(frozen=True)
class Fp8Format:
    name: str
    dtype: np.dtype
    max: float


OCP_E4M3 = Fp8Format("float8_e4m3fn", np.dtype(ml_dtypes.float8_e4m3fn), 448.0)
TRAINIUM_E4M3 = Fp8Format("float8_e4m3", np.dtype(ml_dtypes.float8_e4m3), 240.0)


class Fp8RangeError(ValueError):
    """A value that would not fit the FP8 format (it would saturate, become inf or NaN)."""


# Decoding by table: one float32 per byte code, much faster than ml_dtypes' element-wise cast.
_DECODE = {fmt.dtype: np.arange(256, dtype=np.uint8).view(fmt.dtype).astype(np.float32)
           for fmt in (OCP_E4M3, TRAINIUM_E4M3)}


def to_float32(q: np.ndarray) -> np.ndarray:
    """float32 values of an FP8 array (either format) or of any other array."""
    table = _DECODE.get(q.dtype)
    return np.asarray(q, np.float32) if table is None else table[np.asarray(q).view(np.uint8)]


def num_blocks(n: int) -> int:
    return -(-n // FP8_BLOCK)


def uniform_row_groups(rows: int) -> np.ndarray:
    """Scale row of each weight row on the plain 128-row grid: [rows] int."""
    return np.arange(rows) // FP8_BLOCK


def dequantize_rows(q: np.ndarray, scale: np.ndarray, row_groups: np.ndarray,
                    start: int, stop: int) -> np.ndarray:
    """Rows start:stop of float(q) * S as float32 [stop - start, in].

    q: FP8 [out, in]; scale: float32 [G, ceil(in / 128)]; row_groups: [out] int, the scale row of
    each weight row (uniform: r // 128; the fused K/V grouping maps rows differently).
    """
    w = to_float32(q[start:stop])
    s = np.asarray(scale, np.float32)[row_groups[start:stop]]     # [r, ncb]
    rows, cols = w.shape
    if cols % FP8_BLOCK == 0:
        w.reshape(rows, cols // FP8_BLOCK, FP8_BLOCK)[...] *= s[:, :, None]   # w is fresh: a view
    else:
        w *= np.repeat(s, FP8_BLOCK, axis=1)[:, :cols]
    return w


def dequantize(q: np.ndarray, scale: np.ndarray, row_groups: np.ndarray | None = None) -> np.ndarray:
    """float32 [out, in] = float(q) * S, blocks 128 columns wide, rows grouped by `row_groups`."""
    groups = uniform_row_groups(q.shape[0]) if row_groups is None else row_groups
    return dequantize_rows(q, scale, groups, 0, q.shape[0])


def quantize_blocks(w: np.ndarray, fmt: Fp8Format) -> tuple[np.ndarray, np.ndarray]:
    """(q [R, C] in `fmt`, scale float32 [ceil(R/128), ceil(C/128)]) with W ~= float(q) * S.

    S = block max|W| / fmt.max (1.0 for an all-zero block), so |W / S| <= fmt.max by
    construction; the range is still checked, and a non-finite weight raises.
    """
    w = np.asarray(w, np.float32)
    rows, cols = w.shape
    rb, cb = num_blocks(rows), num_blocks(cols)
    padded = w
    if (rows, cols) != (rb * FP8_BLOCK, cb * FP8_BLOCK):
        padded = np.zeros((rb * FP8_BLOCK, cb * FP8_BLOCK), np.float32)
        padded[:rows, :cols] = w
    blocks = padded.reshape(rb, FP8_BLOCK, cb, FP8_BLOCK)
    amax = np.abs(blocks).max(axis=(1, 3))                          # [rb, cb]
    if not np.isfinite(amax).all():
        raise Fp8RangeError(f"cannot quantise to {fmt.name}: the weight holds a non-finite value")
    scale = np.where(amax > 0, amax / np.float32(fmt.max), np.float32(1.0)).astype(np.float32)
    ratio = (blocks / scale[:, None, :, None]).reshape(padded.shape)[:rows, :cols]
    peak = float(np.abs(ratio).max(initial=0.0))
    if peak > fmt.max:
        # Float rounding of amax / max can push the block maximum a hair over; anything more
        # would saturate (OCP) or become inf (Trainium).
        if peak > fmt.max * (1 + 1e-6):
            raise Fp8RangeError(f"cannot quantise to {fmt.name}: scaled value {peak} exceeds +-{fmt.max}")
        ratio = np.clip(ratio, -fmt.max, fmt.max)
    return ratio.astype(fmt.dtype), scale


def group_max_abs(q: np.ndarray, row_groups: np.ndarray, num_groups: int) -> np.ndarray:
    """Largest |q| in each (scale row, 128-column block) group: float32 [num_groups, ceil(in/128)].

    Under the true grouping of an amax-quantised tensor every group reaches the format maximum.
    """
    a = np.abs(to_float32(q))
    rows, cols = a.shape
    cb = num_blocks(cols)
    padded = np.zeros((rows, cb * FP8_BLOCK), np.float32)
    padded[:, :cols] = a
    per_row = padded.reshape(rows, cb, FP8_BLOCK).max(axis=2)       # [rows, cb]
    out = np.zeros((num_groups, cb), np.float32)
    np.maximum.at(out, row_groups, per_row)
    return out
