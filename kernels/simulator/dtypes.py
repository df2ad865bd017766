"""NKI data types, their storage, and the single rounding step every engine performs.

Logical dtypes are NumPy dtypes (``ml_dtypes`` for bfloat16 and fp8), so ``nl.bfloat16 ==
"bfloat16"`` holds like in NKI.  ``float8_e4m3`` is ``ml_dtypes.float8_e4m3``: the IEEE-like
e4m3 with a maximum of 240, which is Trainium's fp8 e4m3 (``float8_e4m3fn``, max 448, is the OCP
variant that only trn3 matmuls accept).

Storage: with precise storage (the default, like ``NKI_PRECISE_FP=1``) tensors hold their logical
dtype.  With ``NKI_SIM_FP32_STORAGE=1`` (or ``simulate(..., fp32_storage=True)``) bfloat16, fp16
and fp8 tensors are stored as float32, which separates precision loss from logic bugs.
"""
from __future__ import annotations

import numpy as np
import ml_dtypes

from .errors import DtypeError

float32 = np.dtype(np.float32)
float16 = np.dtype(np.float16)
bfloat16 = np.dtype(ml_dtypes.bfloat16)
float8_e4m3 = np.dtype(ml_dtypes.float8_e4m3)
float8_e4m3fn = np.dtype(ml_dtypes.float8_e4m3fn)
float8_e5m2 = np.dtype(ml_dtypes.float8_e5m2)
int32 = np.dtype(np.int32)
uint32 = np.dtype(np.uint32)
int16 = np.dtype(np.int16)
uint16 = np.dtype(np.uint16)
int8 = np.dtype(np.int8)
uint8 = np.dtype(np.uint8)
bool_ = np.dtype(np.bool_)

# MX types (NKI 0.6 names; the math that uses them, nc_matmul_mx / quantize_mx, is NeuronCore-v4
# only).  Packed types hold four elements in one item: 4 x fp8 in 4 bytes, 4 x fp4 in 2 bytes.
# On Trainium2 they are storage only: DMA and same-dtype copies move their bits, engines raise.
float8_e8m0fnu = np.dtype(ml_dtypes.float8_e8m0fnu)
float8_e4m3fn_x4 = np.dtype([("float8_e4m3fn_x4", "<u4")])
float8_e5m2_x4 = np.dtype([("float8_e5m2_x4", "<u4")])
float4_e2m1fn_x4 = np.dtype([("float4_e2m1fn_x4", "<u2")])
MX_STORAGE_ONLY = (float8_e8m0fnu, float8_e4m3fn_x4, float8_e5m2_x4, float4_e2m1fn_x4)
PACKED_ELEMENTS = {float8_e4m3fn_x4: 4, float8_e5m2_x4: 4, float4_e2m1fn_x4: 4}

SUPPORTED = (float32, float16, bfloat16, float8_e4m3, float8_e4m3fn, float8_e5m2,
             int32, uint32, int16, uint16, int8, uint8, bool_) + MX_STORAGE_ONLY
LOW_PRECISION_FLOATS = (float16, bfloat16, float8_e4m3, float8_e4m3fn, float8_e5m2)
FP8 = (float8_e4m3, float8_e4m3fn, float8_e5m2)
_SUPPORTED_SET = set(SUPPORTED)

# Float widths for promotion: (rank, bits).
_FLOAT_RANK = {float8_e4m3: 0, float8_e4m3fn: 0, float8_e5m2: 0, bfloat16: 1, float16: 1, float32: 2}


def as_dtype(dtype, what: str = "dtype") -> np.dtype:
    """Normalise ``dtype`` (NumPy dtype, type or name) to a supported NKI dtype or raise."""
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise DtypeError(f"{what}: {dtype!r} is not a data type") from exc
    if dt not in _SUPPORTED_SET:
        raise DtypeError(
            f"{what}: dtype {dt} is not supported on Trainium2 (supported: "
            + ", ".join(str(d) for d in SUPPORTED) + "; there are no 64-bit types on device)")
    return dt


def is_float(dt: np.dtype) -> bool:
    return dt in _FLOAT_RANK


def is_int(dt: np.dtype) -> bool:
    return dt.kind in "iu"


def storage_dtype(dt: np.dtype, fp32_storage: bool) -> np.dtype:
    """The NumPy dtype actually held in memory for logical dtype ``dt``."""
    if fp32_storage and dt in LOW_PRECISION_FLOATS:
        return float32
    return dt


def fill_value(dt: np.dtype):
    """Sentinel of freshly allocated memory, as in the real simulator: NaN for floats, 4 for ints."""
    if dt == bool_:
        return True
    return np.nan if is_float(dt) else 4


def dtype_name(dt: np.dtype) -> str:
    """The NKI name of a dtype (``float8_e4m3fn_x4`` for the packed types)."""
    return dt.names[0] if dt.names else str(dt)


def to_f32(values: np.ndarray) -> np.ndarray:
    """Engine input conversion: every arithmetic engine computes in fp32."""
    if values.dtype == float32:
        return values
    if values.dtype in MX_STORAGE_ONLY:
        raise DtypeError(f"{dtype_name(values.dtype)} is an MX storage type: arithmetic on it "
                         f"(nc_matmul_mx, quantize_mx) is trn3 (NeuronCore-v4) only; on Trainium2 it "
                         f"can only be moved (DMA, same-dtype copies)")
    return values.astype(float32)


def round_to(values: np.ndarray, dt: np.dtype, fp32_storage: bool) -> np.ndarray:
    """Round computed values once into ``dt`` (returned in its storage dtype).

    Floats: round to nearest even (NumPy / ml_dtypes casts), overflow to inf as ml_dtypes does.
    Integers: round half to even, then saturate to the destination range (NKI 0.6 simulator);
    NaN becomes 0 (undefined on hardware; reads of uninitialised memory are reported earlier).
    """
    if values.dtype == dt and not (fp32_storage and dt in LOW_PRECISION_FLOATS):
        return values
    if dt == bool_:
        return values != 0
    if is_int(dt):
        if values.dtype.kind in "iub":
            wide = values.astype(np.int64)
        else:
            wide = np.rint(values.astype(np.float64))
            wide = np.nan_to_num(wide, nan=0.0, posinf=np.inf, neginf=-np.inf)
        info = np.iinfo(dt)
        return np.clip(wide, info.min, info.max).astype(dt)
    if fp32_storage and dt in LOW_PRECISION_FLOATS:
        return values.astype(float32)
    return values.astype(dt)


def promote(a: np.dtype, b: np.dtype) -> np.dtype:
    """NKI type promotion for mixed-dtype element-wise ops (nki.api.shared.rst, 'Data types')."""
    if a == b:
        return a
    if a == bool_:
        a = uint8
    if b == bool_:
        b = uint8
    if a == b:
        return a
    fa, fb = is_float(a), is_float(b)
    if fa and not fb:
        return a
    if fb and not fa:
        return b
    if fa and fb:
        ra, rb = _FLOAT_RANK[a], _FLOAT_RANK[b]
        if ra != rb:
            return a if ra > rb else b
        # Same width, different format: fp16 vs bf16 -> fp32; two fp8 formats -> bf16.
        return float32 if ra == 1 else bfloat16
    # Two integers.
    if a.kind == b.kind:
        return a if a.itemsize >= b.itemsize else b
    signed, unsigned = (a, b) if a.kind == "i" else (b, a)
    if signed.itemsize > unsigned.itemsize:
        return signed
    wider = {1: int16, 2: int32}.get(unsigned.itemsize)
    return wider if wider is not None else float32


def scalar_dtype(value) -> np.dtype:
    """Weak type of a Python scalar: bool -> uint8, int -> int32, float -> float32."""
    if isinstance(value, (bool, np.bool_)):
        return uint8
    if isinstance(value, (int, np.integer)):
        return int32
    return float32


def itemsize(dt: np.dtype) -> int:
    return np.dtype(dt).itemsize
