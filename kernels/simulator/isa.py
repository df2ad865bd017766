"""``nki.isa`` for the CPU simulator: one vectorised NumPy operation per instruction.

Every instruction takes its destination ``dst`` first (NKI 0.2+), validates its operands against
the Trainium2 limits (partitions, buffers, tile sizes, dtypes), computes in fp32 (bit patterns for
bitvec operators and same-dtype copies), rounds once into ``dst.dtype`` and records its cost.
"""
from __future__ import annotations

import contextlib
import enum
import threading

import numpy as np

from . import dtypes as dt
from . import ops
from . import errors as _err
from . import memory as _mem
from .context import current as _current
from .memory import VirtualRegister   # nisa.VirtualRegister is an NKI class
from .rules import strict as _strict, violation as _violation

# --------------------------------------------------------------------------- enumerations


class engine(enum.Enum):
    """Engine selector (``engine=`` arguments)."""

    unknown = 0
    tensor = 1
    scalar = 2
    gpsimd = 3
    dma = 4
    vector = 5
    sync = 6


tensor_engine, scalar_engine, gpsimd_engine = engine.tensor, engine.scalar, engine.gpsimd
vector_engine, unknown_engine = engine.vector, engine.unknown


class reduce_cmd(enum.Enum):
    """ScalarE accumulator-register control of ``activation``."""

    idle = 0
    reset = 1
    reduce = 2
    reset_reduce = 3
    load_reduce = 4


class dge_mode(enum.Enum):
    unknown = 0
    swdge = 1
    hwdge = 2
    none = 3


class oob_mode(enum.Enum):
    error = 0
    skip = 1


class nc_version(enum.IntEnum):
    """NeuronCore generation; ordered and comparable with ints (``get_nc_version() >= 3``)."""

    gen2 = 2
    gen3 = 3
    gen4 = 4


class matmul_perf_mode(enum.Enum):
    none = 0
    double_row = 1


class _FloatLimits:
    def __init__(self, min_value: float, max_value: float):
        self.min = min_value
        self.max = max_value


fp32 = _FloatLimits(float(np.float32(-3.4028235e38)), float(np.float32(3.4028235e38)))


def get_nc_version() -> nc_version:
    """The simulated target: Trainium2 (NeuronCore-v3)."""
    return nc_version.gen3


# --------------------------------------------------------------------------- operand checks

_ENGINE_NAMES = {engine.tensor: "TensorE", engine.vector: "VectorE", engine.scalar: "ScalarE",
                 engine.gpsimd: "GpSimd"}


def _space(t: _mem.NkiTensor) -> str:
    return "hbm" if t.buffer.is_hbm else t.buffer.value


def _tensor(instr: str, operand: str, t) -> _mem.NkiTensor:
    if not isinstance(t, _mem.NkiTensor):
        raise TypeError(f"{instr}: operand '{operand}' must be an NkiTensor, got {type(t).__name__}")
    return t


def _in(instr: str, operand: str, t, spaces=("psum", "sbuf")) -> _mem.NkiTensor:
    """Check an on-chip operand: tensor, allowed buffer, partitions <= 128, not indirect."""
    t = _tensor(instr, operand, t)
    if _space(t) not in spaces:
        raise _err.MemoryRegionError(
            f"Expected operand '{operand}' of '{instr}' to be in address space '{'|'.join(spaces)}', "
            f"but got a tile in '{_space(t)}' instead ({t.describe()})")
    if t.partitions > _mem.PMAX:
        raise _err.PartitionLimitError(f"{instr} {operand} partition dimension {t.partitions} exceeds "
                                       f"maximum {_mem.PMAX} ({t.describe()})")
    if t._indirect:
        raise _err.UnsupportedError(f"{instr}: operand '{operand}' is an indirect (dynamic) access pattern; "
                                    f"only DMA instructions accept those")
    _check_start_partition(instr, operand, t)
    _check_free_size(instr, operand, t)
    return t


def _check_start_partition(instr: str, operand: str, t: _mem.NkiTensor) -> None:
    """64 < P <= 128 starts at 0; 32 < P <= 64 at 0 or 64; P <= 32 at 0, 32, 64 or 96."""
    start = t.start_partition
    allowed = _current(instr).config.model.allowed_start_partitions(t.partitions)
    if start not in allowed:
        raise _violation(_err.StartPartitionError, "start-partition",
                         f"{instr}: operand '{operand}' {t.describe()} spans {t.partitions} partitions from "
                         f"start partition {start}; with {t.partitions} partitions the start must be one "
                         f"of {list(allowed)}")


def _check_free_size(instr: str, operand: str, t: _mem.NkiTensor) -> None:
    model = _current(instr).config.model
    limit = model.engine_fmax_psum if t.buffer is _mem.MemoryRegion.psum else model.engine_fmax_sbuf
    if t.free_size > limit:
        raise _violation(_err.TileSizeError, "engine-free-size",
                         f"{instr}: operand '{operand}' {t.describe()} has {t.free_size} elements per "
                         f"partition; compute instructions take at most {limit} in {t.buffer.value}")


_FAST_DTYPES = (dt.bfloat16, dt.float16)


def _inner_contiguous(t: _mem.NkiTensor) -> bool:
    if t._arr is None:
        return False
    return t.shape[-1] == 1 or t._arr.strides[-1] == t.itemsize


def _vector_cycles_per_element(instr: str, dst: _mem.NkiTensor, *inputs: _mem.NkiTensor) -> float:
    """VectorE cycles per element: 2 for two input tiles, 1 for one; the trn2 performance mode
    (bf16/fp16 operands) only under its documented conditions (mimo_kernels.trn2)."""
    model = _current(instr).config.model
    tensors = (dst,) + inputs
    fast_dtypes = all(t.dtype in _FAST_DTYPES for t in tensors)
    in_sbuf = [t.buffer is _mem.MemoryRegion.sbuf for t in tensors]
    if len(inputs) >= 2:
        two = model.vector_two_input_cycles_per_elem
        if fast_dtypes and all(t.buffer is _mem.MemoryRegion.sbuf for t in inputs):
            return two / model.vector_fast_mode_half
        return two
    if instr not in ("tensor_copy", "tensor_scalar") or not fast_dtypes:
        return 1.0
    contiguous = all(_inner_contiguous(t) for t in tensors)
    if all(in_sbuf) and contiguous:
        return 1.0 / model.vector_fast_mode_full
    if all(in_sbuf) or (contiguous and sum(not x for x in in_sbuf) == 1):
        return 1.0 / model.vector_fast_mode_half
    return 1.0


def _same_partitions(instr: str, **operands) -> int:
    items = [(k, v) for k, v in operands.items() if isinstance(v, _mem.NkiTensor)]
    first = items[0][1].partitions
    if any(v.partitions != first for _, v in items):
        desc = ", ".join(f"{k}{list(v.shape)}" for k, v in items)
        raise _err.PartitionMismatchError(
            f"number of partitions (dimension 0 size of a tile) mismatch in parameters ({desc}) of "
            f"'{instr}'")
    return first


def _same_free(instr: str, a_name: str, a: _mem.NkiTensor, b_name: str, b: _mem.NkiTensor) -> None:
    if a.free_size != b.free_size:
        raise _err.ShapeMismatchError(
            f"{instr}: {a_name}{list(a.shape)} and {b_name}{list(b.shape)} must have the same number "
            f"of elements per partition ({a.free_size} vs {b.free_size})")


def _vals(t: _mem.NkiTensor, instr: str, operand: str) -> np.ndarray:
    """fp32 values flattened to [partitions, free]."""
    return t.read_f32(instr, operand).reshape(t.partitions, -1)


def _raw(t: _mem.NkiTensor, instr: str, operand: str) -> np.ndarray:
    return t.read(instr, operand).reshape(t.partitions, -1)


def _store(dst: _mem.NkiTensor, values: np.ndarray, instr: str, **kw) -> None:
    dst.write(np.asarray(values).reshape(dst.shape), instr, **kw)


def _bytes(*tensors) -> int:
    return sum(t.size * t.itemsize for t in tensors if isinstance(t, _mem.NkiTensor))


def _choose_engine(instr: str, requested, default: str, allowed, rule: str | None = None) -> str:
    if requested is None or requested is engine.unknown:
        return default
    if not isinstance(requested, engine):
        raise TypeError(f"{instr}: engine must be a nisa.engine member, got {requested!r}")
    name = _ENGINE_NAMES.get(requested)
    if name not in allowed:
        message = f"{instr} cannot run on {requested.name} engine (allowed: {', '.join(allowed)})"
        if rule:
            raise _violation(_err.EngineRuleError, rule, message)
        raise _err.UnsupportedError(message)
    return name


def _no_psum_on_gpsimd(instr: str, eng: str, **operands) -> None:
    if eng != "GpSimd":
        return
    for name, t in operands.items():
        if isinstance(t, _mem.NkiTensor) and t.buffer is _mem.MemoryRegion.psum:
            raise _err.MemoryRegionError(f"Expected operand '{name}' of '{instr}' to be in address space "
                                         f"'sbuf' (GpSimd cannot access PSUM), but got a tile in 'psum' "
                                         f"instead ({t.describe()})")


def _not_both_psum(instr: str, a_name: str, a, b_name: str, b) -> None:
    if isinstance(a, _mem.NkiTensor) and isinstance(b, _mem.NkiTensor) and \
            a.buffer is _mem.MemoryRegion.psum and b.buffer is _mem.MemoryRegion.psum:
        raise _err.MemoryRegionError(f"{instr}: operands '{a_name}' and '{b_name}' may not both be in PSUM")


def _scalar_operand(instr: str, operand: str, value, partitions: int, require_fp32: bool = True):
    """A compile-time scalar or a [P, 1] vector; returns something broadcastable over [P, F]."""
    if isinstance(value, _mem.NkiTensor):
        _in(instr, operand, value)
        if value.partitions != partitions or value.free_size != 1:
            raise _err.PartitionMismatchError(
                f"{instr}: {operand}{list(value.shape)} must be a scalar or a [{partitions}, 1] vector "
                f"(one value per partition)")
        if require_fp32 and value.dtype != dt.float32:
            raise _err.DtypeError(f"{instr}: vector {operand} {value.describe()} must be float32")
        return _vals(value, instr, operand)
    if isinstance(value, VirtualRegister):
        return np.float32(value.value)
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return np.float32(value)
    raise TypeError(f"{instr}: {operand} must be a number or a [P, 1] tensor, got {type(value).__name__}")


# --------------------------------------------------------------------------- data movement

def _squeezed(shape):
    return [s for s in shape if s != 1]


def _compatible_shapes(a, b) -> bool:
    """Same element count, and the same leading dim after dropping size-1 dims (free dims may be
    flattened differently; a transposition is not)."""
    if int(np.prod(a)) != int(np.prod(b)):
        return False
    sa, sb = _squeezed(a), _squeezed(b)
    if sa == sb or not sa or not sb:
        return True
    return sa[0] == sb[0]


def _run_elements(t: _mem.NkiTensor) -> int:
    """Elements of the longest contiguous run per partition row of a DMA operand."""
    if t._addr is not None:
        addr = t._addr.reshape(t.shape) if t._addr.size == t.size else t._addr
        if addr.ndim and addr.shape[-1] > 1 and bool((np.diff(addr, axis=-1) == 1).all()):
            return int(addr.shape[-1])
        return 1
    run, expected = 1, t.itemsize
    dims = list(zip(t.shape, t._arr.strides))
    if t.buffer.on_chip:
        dims = dims[1:]
    for n, stride in reversed(dims):
        if n == 1:
            continue
        if stride != expected:
            break
        run *= n
        expected *= n
    return run


def _record_dma(ctx, instr: str, dst: _mem.NkiTensor, src: _mem.NkiTensor, nbytes: int, hbm: int,
                rate: float = None) -> None:
    """Cost of one DMA: partitions (the on-chip side's, else the leading dim), contiguous run per
    partition, software-DGE descriptors for indirect operands.  A transpose (``rate`` given)
    writes whole partitions; its shape-dependent rate stands for the access pattern."""
    chip = [t for t in (dst, src) if t.buffer.on_chip]
    partitions = chip[0].partitions if chip else (dst.shape[0] if dst.ndim > 1 else 1)
    partitions = max(1, min(_mem.PMAX, partitions))
    per_partition = nbytes / partitions
    run_elements = min(_run_elements(dst), _run_elements(src))
    run_bytes = min(per_partition, run_elements * max(dst.itemsize, src.itemsize))
    if rate is not None:
        run_bytes = per_partition
    indirect = dst._indirect or src._indirect
    descriptors = max(1, dst.size // max(1, run_elements)) if indirect else 0
    ctx.cost.dma(instr, dst.size, nbytes, hbm, partitions, run_bytes,
                 1.0 if rate is None else rate, descriptors)


def dma_copy(dst, src, oob_mode=oob_mode.error, dge_mode=dge_mode.unknown, engine=engine.unknown,
             name=None):
    """DMA ``src`` into ``dst`` (HBM or SBUF on either side; dtype conversion through fp32).

    Indirect HBM views (``.ap(vector_offset=...)``) gather / scatter; out-of-bounds indices raise
    unless ``oob_mode=nisa.oob_mode.skip``, which skips those elements.
    """
    instr = "dma_copy"
    ctx = _current("nisa.dma_copy")
    dst = _tensor(instr, "dst", dst)
    src = _tensor(instr, "src", src)
    for operand, t in (("dst", dst), ("src", src)):
        if t.buffer is _mem.MemoryRegion.psum:
            raise _err.MemoryRegionError(f"Expected operand '{operand}' of '{instr}' to be in address space "
                                         f"'hbm|sbuf', but got a tile in 'psum' instead ({t.describe()})")
        if t.buffer.on_chip and t.partitions > _mem.PMAX:
            raise _err.PartitionLimitError(f"{instr} {operand} partition dimension {t.partitions} exceeds "
                                           f"maximum {_mem.PMAX} ({t.describe()})")
    if not _compatible_shapes(dst.shape, src.shape):
        raise _err.ShapeMismatchError(f"{instr}: dst {dst.describe()} and src {src.describe()} shapes are "
                                      f"not compatible (element counts must match, no implicit transpose)")
    if dge_mode is globals()["dge_mode"].hwdge and dst.dtype != src.dtype:
        raise _err.DtypeError(f"{instr}: dge_mode.hwdge needs equal src/dst dtypes ({src.dtype} vs {dst.dtype})")
    mask = None
    for operand, t in (("src", src), ("dst", dst)):
        if t._valid is not None:
            if oob_mode is globals()["oob_mode"].error:
                bad = int(np.argwhere(~t._valid.reshape(-1))[0][0])
                raise _err.OutOfBoundsError(
                    f"{instr}: indirect {operand} {t.describe()} addresses element(s) outside the tensor "
                    f"(first at flat position {bad} of the access pattern); pass "
                    f"oob_mode=nisa.oob_mode.skip to skip them")
            valid = t._valid.reshape(dst.shape)
            mask = valid if mask is None else (mask & valid)
    if mask is not None and src._valid is not None:
        # Skipped source elements are never read.
        values = src.storage.flat[src._addr]
        src_init = src.storage.init
        if src_init is not None and not (src_init.reshape(-1)[src._addr] | ~src._valid).all():
            src._check_readable(instr, "src")
    else:
        values = src.read(instr, "src")
    if src.dtype != dst.dtype:
        values = dt.to_f32(values)
    dst.write(np.asarray(values).reshape(dst.shape), instr, mask=mask)
    n = dst.size
    src_bytes, dst_bytes = n * src.itemsize, n * dst.itemsize
    hbm = (src_bytes if src.buffer.is_hbm else 0) + (dst_bytes if dst.buffer.is_hbm else 0)
    _record_dma(ctx, instr, dst, src, max(src_bytes, dst_bytes), hbm)


DMA_TRANSPOSE_PERMUTATION = {2: (1, 0), 3: (2, 1, 0), 4: (3, 1, 2, 0)}


def dma_transpose(dst, src, axes=None, dge_mode=dge_mode.unknown, oob_mode=oob_mode.error, name=None):
    """DMA with a transpose, by rank as documented: 2-D permutes (1, 0), 3-D (2, 1, 0), 4-D
    (3, 1, 2, 0); ``axes`` may be omitted or must name that permutation."""
    instr = "dma_transpose"
    ctx = _current("nisa.dma_transpose")
    dst, src = _tensor(instr, "dst", dst), _tensor(instr, "src", src)
    perm = DMA_TRANSPOSE_PERMUTATION.get(src.ndim)
    if src.ndim != dst.ndim or perm is None:
        raise _err.UnsupportedError(f"{instr}: src{list(src.shape)} and dst{list(dst.shape)} must both be 2-, 3- "
                                    f"or 4-D")
    if axes is not None and tuple(axes) != perm:
        raise _err.UnsupportedError(f"{instr}: axes={axes!r} for {src.ndim}-D; supported: the documented "
                                    f"permutation {perm} of a {src.ndim}-D tile")
    if src.itemsize not in (2, 4):
        raise _err.DtypeError(f"{instr}: DMA transpose supports 2- and 4-byte dtypes, got {src.dtype}")
    if src.itemsize != 2 and _strict("dma-transpose-2-byte"):
        raise _violation(_err.DtypeError, "dma-transpose-2-byte",
                         f"{instr}: src {src.describe()} has {src.itemsize}-byte elements; both DGE "
                         f"lowerings take 2-byte dtypes")
    _check_dma_transpose_shape(instr, src, dge_mode, ctx.config.model)
    if dst.dtype != src.dtype:
        raise _err.DtypeError(f"{instr}: dst dtype {dst.dtype} must equal src dtype {src.dtype}")
    if list(dst.shape) != [src.shape[a] for a in perm]:
        raise _err.ShapeMismatchError(f"{instr}: dst{list(dst.shape)} must be src{list(src.shape)} transposed "
                                      f"by axes {perm}")
    for operand, t in (("dst", dst), ("src", src)):
        if t.buffer is _mem.MemoryRegion.psum:
            raise _err.MemoryRegionError(f"Expected operand '{operand}' of '{instr}' to be in address space "
                                         f"'hbm|sbuf', but got a tile in 'psum' instead")
    if not dst.buffer.on_chip or dst.buffer is _mem.MemoryRegion.psum:
        raise _err.MemoryRegionError(f"Expected operand 'dst' of '{instr}' to be in address space 'sbuf', "
                                     f"but got a tile in '{_space(dst)}' instead")
    dst.write(np.transpose(src.read(instr, "src"), perm), instr)
    n = dst.size * dst.itemsize
    hbm = n if src.buffer.is_hbm else 0
    _record_dma(ctx, instr, dst, src, n, hbm, _dma_transpose_rate(src, dst, ctx.config.model))


def _check_dma_transpose_shape(instr: str, src: _mem.NkiTensor, mode, model) -> None:
    """Source limits of the hwdge lowering: 16 source partitions (2-D) or {1, 2, 4, 8, 16} with
    (partitions * shape[-2]) % 16 == 0 (3-/4-D).  (src.shape[-1] <= 128 is the dst partition limit.)"""
    if mode is dge_mode.hwdge:
        rows = src.shape[0]
        ok = rows == 16 if src.ndim == 2 else (
            rows in model.dma_transpose_hwdge_src_partitions and (rows * src.shape[-2]) % 16 == 0)
        if not ok:
            raise _violation(_err.TileSizeError, "dma-transpose-shape",
                             f"{instr}: dge_mode=hwdge with src {src.describe()}: a 2-D source needs "
                             f"shape[0] == 16, a 3-/4-D one shape[0] in {{1, 2, 4, 8, 16}} and "
                             f"shape[0] * shape[-2] a multiple of 16")


def _dma_transpose_rate(src: _mem.NkiTensor, dst: _mem.NkiTensor, model) -> float:
    """The documented "up to" rate, pro-rated when the output is not made of whole
    [128 partitions, 16 contiguous elements] blocks (what the 16 engines write together)."""
    peak = model.dma_transpose_rate_from_hbm if src.buffer.is_hbm else model.dma_transpose_rate_on_chip
    block_p, block_f = model.dma_transpose_block
    p, f = dst.partitions, dst.shape[-1]
    used = (p / (-(-p // block_p) * block_p)) * (f / (-(-f // block_f) * block_f))
    return peak * used


# --------------------------------------------------------------------------- TensorE

_MATMUL_DTYPES = (dt.float8_e4m3, dt.float8_e5m2, dt.float8_e4m3fn, dt.bfloat16, dt.float16, dt.float32)


def _check_one_bank(instr: str, dst: _mem.NkiTensor) -> None:
    bank = _current(instr).config.model.psum_bank_bytes
    lo, hi = dst.free_range()
    item = 4 if dst.dtype == dt.float32 else dst.itemsize
    if (lo * item) // bank != (hi * item + item - 1) // bank:
        raise _err.TileSizeError(
            f"{instr}: dst {dst.describe()} covers bytes [{lo * item}, {hi * item + item}) of each "
            f"partition, crossing a 2 KiB PSUM bank boundary; a TensorE output must fit in one bank "
            f"(512 fp32 per partition)")


def _check_fresh_bank(instr: str, dst: _mem.NkiTensor) -> None:
    """Strict per-bank reading of accumulate=None: the compiler decides "first write" per PSUM
    bank, so a fresh region of a bank that already holds a matmul result is ambiguous."""
    if not _strict("psum-accumulate-per-bank"):
        return
    storage = dst.storage
    item = 4 if dst.dtype == dt.float32 else dst.itemsize
    per_bank = _current(instr).config.model.psum_bank_bytes // item
    p0, p1, lo, hi = dst.region()
    acc = storage.acc.reshape(storage.shape[0], -1)[p0:p1 + 1]
    bank_lo, bank_hi = (lo // per_bank) * per_bank, (hi // per_bank + 1) * per_bank
    if (acc[:, bank_lo:bank_hi] != _mem.ACC_NONE).any():
        raise _violation(_err.AccumulationError, "psum-accumulate-per-bank",
                         f"{instr}: accumulate=None into the fresh region {dst.describe()} of a PSUM bank "
                         f"that already holds a matmul result; pass accumulate=False to start the group "
                         f"(or True to add)")


def nc_matmul(dst, stationary, moving, is_stationary_onezero=False, is_moving_onezero=False,
              is_transpose=False, accumulate=None, tile_position=(), tile_size=(),
              perf_mode=matmul_perf_mode.none, name=None):
    """``dst[M, N] (+)= stationary[K, M].T @ moving[K, N]`` on TensorE, fp32 accumulation in PSUM.

    ``accumulate=None``: the first matmul into fresh PSUM overwrites, later ones accumulate;
    after the accumulated result has been read, a further ``None`` matmul is ambiguous and raises
    (pass ``accumulate=False`` to start a new group).  ``accumulate=True`` needs PSUM written by a
    matmul.  ``perf_mode=double_row`` (fp8 only) takes ``[K, 2, M]`` / ``[K, 2, N]`` operands.
    """
    instr = "nc_matmul"
    ctx = _current("nisa.nc_matmul")
    stationary = _in(instr, "stationary", stationary, ("sbuf",))
    moving = _in(instr, "moving", moving, ("sbuf",))
    dst = _in(instr, "dst", dst, ("psum",))
    for operand, t in (("stationary", stationary), ("moving", moving)):
        if t.dtype not in _MATMUL_DTYPES:
            raise _err.DtypeError(f"{instr}: {operand} dtype {t.dtype} is not a matmul input dtype "
                                  f"(fp8, bf16, fp16, fp32)")
    if (stationary.dtype == dt.float32) != (moving.dtype == dt.float32):
        raise _err.DtypeError(f"{instr}: fp32 operands must be paired with fp32 (stationary {stationary.dtype}, "
                              f"moving {moving.dtype})")
    if dst.dtype != dt.float32 and not (is_transpose and dst.dtype in (dt.bfloat16, dt.float16)):
        raise _err.DtypeError(f"{instr}: dst {dst.describe()} must be float32 on Trainium2 (PSUM accumulates fp32)")
    if perf_mode not in (matmul_perf_mode.none, matmul_perf_mode.double_row, None):
        raise TypeError(f"{instr}: perf_mode must be a nisa.matmul_perf_mode member")
    double_row = perf_mode is matmul_perf_mode.double_row
    if bool(tile_position) != bool(tile_size):
        raise _err.UnsupportedError(f"{instr}: tile_position and tile_size must be given together")
    k = _same_partitions(instr, stationary=stationary, moving=moving)
    if k > _mem.PMAX:
        raise _err.PartitionLimitError(f"{instr} stationary partition dimension (contraction K) {k} exceeds "
                                       f"maximum {_mem.PMAX}")
    s_vals = _vals(stationary, instr, "stationary")
    m_vals = _vals(moving, instr, "moving")
    if double_row:
        if stationary.dtype not in dt.FP8 or moving.dtype not in dt.FP8:
            raise _err.DtypeError(f"{instr}: perf_mode=double_row needs fp8 operands, got {stationary.dtype} "
                                  f"and {moving.dtype}")
        if stationary.ndim != 3 or moving.ndim != 3 or stationary.shape[1] != 2 or moving.shape[1] != 2:
            raise _err.ShapeMismatchError(f"{instr}: double_row operands must be [K, 2, M] and [K, 2, N], got "
                                          f"{list(stationary.shape)} and {list(moving.shape)}")
        s_vals = s_vals.reshape(k * 2, -1)
        m_vals = m_vals.reshape(k * 2, -1)
    kk, m = s_vals.shape
    n = m_vals.shape[1]
    model = ctx.config.model
    if m > model.gemm_stationary_fmax:
        raise _err.TileSizeError(f"{instr}: stationary free size M={m} ({stationary.describe()}) exceeds "
                                 f"gemm_stationary_fmax {model.gemm_stationary_fmax}")
    if n > model.gemm_moving_fmax:
        raise _err.TileSizeError(f"{instr}: moving free size N={n} ({moving.describe()}) exceeds "
                                 f"gemm_moving_fmax {model.gemm_moving_fmax}")
    pe_tile = _pe_tile(instr, tile_position, tile_size, kk, m, double_row)
    if dst.partitions != m or dst.free_size != n:
        raise _err.ShapeMismatchError(f"{instr}: dst {dst.describe()} must be [{m}, {n}] for stationary "
                                      f"{list(stationary.shape)} and moving {list(moving.shape)}")
    _check_one_bank(instr, dst)
    result = s_vals.T @ m_vals                       # fp32 accumulation
    state = dst.acc_state()
    if accumulate is None:
        if (state == _mem.ACC_NONE).all():
            _check_fresh_bank(instr, dst)
            add = False
        elif (state == _mem.ACC_OPEN).all():
            add = True
        else:
            raise _err.AccumulationError(
                f"{instr}: accumulate=None into {dst.describe()} is ambiguous: its matmul result was "
                f"already read (or only part of it is accumulating). Start a new accumulation group "
                f"with accumulate=False, or allocate the PSUM tile inside the loop")
    elif accumulate:
        if not np.isin(state, (_mem.ACC_OPEN, _mem.ACC_READ)).all():
            raise _err.AccumulationError(
                f"{instr}: accumulate=True into {dst.describe()} whose elements were not written by a "
                f"matmul (memset / copy-initialised PSUM accumulation is undefined on Trainium2)")
        add = True
    else:
        add = False
    if add:
        result = result + _vals(dst, instr, "dst")
    _store(dst, result, instr, matmul=True)
    kind = "fp32" if stationary.dtype == dt.float32 else (
        "fp8" if stationary.dtype in dt.FP8 and moving.dtype in dt.FP8 else "16bit")
    ctx.cost.matmul(instr, kk, m, n, kind, _bytes(stationary, moving, dst), pe_tile=pe_tile)


_PE_TILE_SIZES = (32, 64, 128)      # NeuronCore-v3 row / column tile sizes


def _pe_tile(instr, tile_position, tile_size, kk, m, double_row):
    """The PE sub-array (row0, col0, rows, cols) a tiled ``nc_matmul`` occupies, or None for the
    whole 128 x 128 array.  The nc_matmul docstring: row and column tiles of 32, 64 or 128 PEs
    (32 from NeuronCore-v3), each start a multiple of its size inside the array, the stationary no
    larger than the tile, no column tiling with ``double_row``.  (Its parameter line says "start_column
    must be 0"; the prose, the SDK's own nc_matmul test and the NKI Library's column-tiled kernels
    start columns at multiples of the size, so that is what is accepted.)  Tiles that do not
    overlap run in parallel (the cost model schedules them so)."""
    if not tile_size:
        return None
    if len(tile_size) != 2 or len(tile_position) != 2:
        raise _err.TileSizeError(f"{instr}: tile_position {tuple(tile_position)} and tile_size {tuple(tile_size)} "
                                 f"must be (row, column) pairs")
    rows, cols = (int(v) for v in tile_size)
    row0, col0 = (int(v) for v in tile_position)
    if rows not in _PE_TILE_SIZES or cols not in _PE_TILE_SIZES:
        raise _err.TileSizeError(f"{instr}: tile_size {(rows, cols)} must be 32, 64 or 128 PE rows / columns")
    if row0 % rows or col0 % cols or not (0 <= row0 <= _mem.PMAX - rows and 0 <= col0 <= _mem.PMAX - cols):
        raise _err.TileSizeError(f"{instr}: tile_position {(row0, col0)} must be multiples of tile_size "
                                 f"{(rows, cols)} inside the 128 x 128 PE array")
    if kk > rows * (2 if double_row else 1) or m > cols:
        raise _err.TileSizeError(f"{instr}: stationary [{kk}, {m}] does not fit tile_size {(rows, cols)}")
    if double_row and cols < _mem.PMAX:
        raise _err.UnsupportedError(f"{instr}: perf_mode=double_row cannot be combined with column tiling "
                                    f"(tile_size {(rows, cols)})")
    return row0, col0, rows, cols


def nc_transpose(dst, data, engine=engine.unknown, name=None):
    """Transpose ``data[P, F]`` into ``dst[F, P]`` (free dims flattened first).

    TensorE (SBUF -> PSUM, up to 128x128) or VectorE (up to 32x32, SBUF/PSUM both sides); the
    engine is chosen by the buffers when not given.  Bit-exact; ``dst.dtype`` must equal ``data.dtype``.
    """
    instr = "nc_transpose"
    ctx = _current("nisa.nc_transpose")
    data = _tensor(instr, "data", data)
    dst = _tensor(instr, "dst", dst)
    if engine in (None, globals()["engine"].unknown):
        use_tensor = dst.buffer is _mem.MemoryRegion.psum and data.buffer is _mem.MemoryRegion.sbuf
    elif engine is globals()["engine"].tensor:
        use_tensor = True
    elif engine is globals()["engine"].vector:
        use_tensor = False
    else:
        raise _err.UnsupportedError(f"{instr}: engine must be tensor or vector, got {engine!r}")
    if use_tensor:
        _in(instr, "data", data, ("sbuf",))
        _in(instr, "dst", dst, ("psum",))
        limit = _mem.PMAX
    else:
        _in(instr, "data", data)
        _in(instr, "dst", dst)
        limit = 32
    p, f = data.partitions, data.free_size
    if p > limit or f > limit:
        raise _err.TileSizeError(f"{instr}: data {data.describe()} is [{p}, {f}]; the "
                                 f"{'TensorE' if use_tensor else 'VectorE'} transpose supports at most "
                                 f"[{limit}, {limit}]")
    if dst.dtype != data.dtype:
        raise _err.DtypeError(f"{instr}: dst dtype {dst.dtype} must equal data dtype {data.dtype}")
    if dst.partitions != f or dst.free_size != p:
        raise _err.ShapeMismatchError(f"{instr}: dst {dst.describe()} must be [{f}, {p}] for data {data.describe()}")
    if use_tensor:
        _check_one_bank(instr, dst)
    _store(dst, _raw(data, instr, "data").T, instr)
    if use_tensor:
        kind = "fp32" if data.dtype == dt.float32 else "16bit"
        ctx.cost.matmul(instr, p, f, p, kind, _bytes(data, dst), flops=False)
    else:
        ctx.cost.compute("VectorE", instr, p, f, _bytes(data, dst))


# --------------------------------------------------------------------------- ScalarE

_lowering = threading.local()     # set while an nl.* function lowers itself (e.g. nl.sin)


@contextlib.contextmanager
def _lowered_activations():
    """nl.* functions built from several instructions (nl.sin range-reduces first, nl.cos / nl.tan
    / rounding use other instructions) run their activation without the table check."""
    previous = getattr(_lowering, "active", False)
    _lowering.active = True
    try:
        yield
    finally:
        _lowering.active = previous


def _check_activation_input(instr: str, name: str, x: np.ndarray, model) -> None:
    documented, valid = model.activation_range(name)
    if not documented:
        raise _violation(_err.ActivationRangeError, "activation-table",
                         f"{instr}: nl.{name} is not a ScalarE activation function (the table lists "
                         f"{', '.join(n for n, _ in model.activation_ranges)})")
    if valid is None:
        return
    lo, hi = valid
    finite = x[np.isfinite(x)]
    magnitude = np.abs(finite) if name == "reciprocal" else finite
    outside = (magnitude < lo) | (magnitude > hi)
    if outside.any():
        bad = float(finite[outside].reshape(-1)[0])
        extra = (" (the hardware evaluates sin's polynomial without range reduction; use nl.sin, "
                 "which range-reduces first)" if name == "sin" else "")
        raise _violation(_err.ActivationRangeError, "activation-range",
                         f"{instr}: nl.{name} input {bad!r} is outside its valid range "
                         f"{'±' if name == 'reciprocal' else ''}[{lo:g}, {hi:g}]{extra}")

def activation(dst, op, data, bias=None, scale=1.0, reduce_op=None, reduce_res=None,
               reduce_cmd=reduce_cmd.idle, name=None):
    """``dst = op(data * scale + bias)`` on ScalarE, with the optional accumulator reduction.

    ``scale``: number or [P, 1] fp32 vector; ``bias``: number or [P, 1] vector.  Reduction
    (``reduce_op=nl.add``): ``reset``/``reset_reduce`` zero the 128 accumulator registers first;
    the free-axis sum of the output is added; ``reduce``/``reset_reduce`` keep the sum in the
    registers; ``reduce_res`` [P, 1] receives it.  Registers read before any reset raise.
    """
    instr = "activation"
    ctx = _current("nisa.activation")
    fn = ops.activation(op, instr)
    data = _in(instr, "data", data)
    dst = _in(instr, "dst", dst)
    p = _same_partitions(instr, dst=dst, data=data)
    _same_free(instr, "dst", dst, "data", data)
    if not isinstance(reduce_cmd, globals()["reduce_cmd"]):
        raise TypeError(f"{instr}: reduce_cmd must be a nisa.reduce_cmd member, got {reduce_cmd!r}")
    scale_v = _scalar_operand(instr, "scale", scale, p, require_fp32=True)
    bias_v = np.float32(0.0) if bias is None else _scalar_operand(instr, "bias", bias, p, require_fp32=False)
    with np.errstate(all="ignore"):
        x = _vals(data, instr, "data") * scale_v + bias_v
    if not getattr(_lowering, "active", False):
        _check_activation_input(instr, fn.name, x, ctx.config.model)
    y = ops.apply_activation(fn, x)
    _store(dst, y, instr)
    extra = 0
    rc = globals()["reduce_cmd"]
    if reduce_res is not None or reduce_cmd is not rc.idle:
        if reduce_op is not None and ops.alu(reduce_op, instr, "reduce_op").name != "add":
            raise _err.UnsupportedError(f"{instr}: reduce_op must be nl.add on Trainium2, got {reduce_op!r}")
        if reduce_res is not None and reduce_op is None:
            raise TypeError(f"{instr}: reduce_res needs reduce_op=nl.add")
        regs = ctx.scalar_acc[:p]
        valid = ctx.scalar_acc_valid[:p]
        if reduce_cmd in (rc.reset, rc.reset_reduce):
            regs[...] = 0.0
            valid[...] = True
        elif not valid.all():
            raise _err.UninitializedReadError(
                f"{instr}: reduce_cmd={reduce_cmd.name} reads ScalarE accumulator registers 0..{p - 1} "
                f"that were never reset; use reduce_cmd=nisa.reduce_cmd.reset_reduce for the first "
                f"activation of a reduction")
        result = regs + y.sum(axis=1, keepdims=True, dtype=np.float32)
        if reduce_cmd in (rc.reduce, rc.reset_reduce):
            regs[...] = result
        if reduce_res is not None:
            reduce_res = _in(instr, "reduce_res", reduce_res)
            if reduce_res.partitions != p or reduce_res.free_size != 1:
                raise _err.ShapeMismatchError(f"{instr}: reduce_res {reduce_res.describe()} must be [{p}, 1]")
            _store(reduce_res, result, instr)
        extra = ctx.config.model.min_ii_cycles
    ctx.cost.compute("ScalarE", instr, p, data.free_size, _bytes(data, dst, reduce_res), extra)


def activation_reduce(dst, op, data, reduce_op, reduce_res, bias=None, scale=1.0, name=None):
    """``activation`` with ``reduce_cmd=reset_reduce`` (kept for compatibility)."""
    activation(dst, op, data, bias=bias, scale=scale, reduce_op=reduce_op, reduce_res=reduce_res,
               reduce_cmd=reduce_cmd.reset_reduce)


# --------------------------------------------------------------------------- VectorE / GpSimd

def _reduce_axes(instr: str, data: _mem.NkiTensor, axis) -> tuple:
    axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    axes = tuple(sorted(int(a) + data.ndim if int(a) < 0 else int(a) for a in axes))
    if not axes:
        raise _err.ReductionAxisError(f"{instr}: axis must name at least one free axis")
    if 0 in axes:
        raise _err.ReductionAxisError(
            f"{instr}: axis={axis} of {data.describe()} includes the partition axis 0; reductions run "
            f"along free axes only (transpose first, or matmul with a ones vector)")
    if axes != tuple(range(data.ndim - len(axes), data.ndim)):
        raise _err.ReductionAxisError(f"{instr}: axis={axis} of {data.describe()} must be the last contiguous "
                                      f"free axes (e.g. [{data.ndim - 1}] or [1, ..., {data.ndim - 1}])")
    return axes


def tensor_reduce(dst, op, data, axis, negate=False, keepdims=False, name=None):
    """Reduce ``data`` along trailing free ``axis`` with ``op`` (add, maximum, minimum, ...) on VectorE."""
    instr = "tensor_reduce"
    ctx = _current("nisa.tensor_reduce")
    alu = ops.alu(op, instr)
    if alu.reduce is None:
        raise _err.UnsupportedError(f"{instr}: op nl.{alu.name} is not a reduction operator")
    data = _in(instr, "data", data)
    dst = _in(instr, "dst", dst)
    axes = _reduce_axes(instr, data, axis)
    p = _same_partitions(instr, dst=dst, data=data)
    kept = int(np.prod([s for i, s in enumerate(data.shape) if i not in axes][1:], dtype=np.int64))
    if dst.free_size != kept:
        raise _err.ShapeMismatchError(f"{instr}: dst {dst.describe()} must hold {kept} element(s) per partition "
                                      f"(data {list(data.shape)} reduced over axes {list(axes)})")
    if alu.kind == "bitvec":
        _require_int(instr, alu, data, dst)
        values = _from_bits(alu.reduce(_bits(data, instr, "data").reshape(data.shape), axis=axes), dst.dtype)
    else:
        with np.errstate(all="ignore"):
            values = alu.reduce(data.read_f32(instr, "data"), axis=axes).astype(np.float32)
        if negate:
            values = -values
    _store(dst, values, instr)
    ctx.cost.compute("VectorE", instr, p, data.free_size, _bytes(data, dst))


def _is_int32_arith(alu, *tensors) -> bool:
    return alu.kind == "arith" and all(isinstance(t, _mem.NkiTensor) and t.dtype in (dt.int32, dt.uint32)
                                       for t in tensors)


def tensor_tensor(dst, data1, data2, op, engine=engine.unknown, name=None):
    """``dst = data1 op data2`` element-wise (same partitions and elements per partition)."""
    instr = "tensor_tensor"
    ctx = _current("nisa.tensor_tensor")
    alu = ops.alu(op, instr)
    data1, data2 = _in(instr, "data1", data1), _in(instr, "data2", data2)
    dst = _in(instr, "dst", dst)
    p = _same_partitions(instr, data1=data1, data2=data2, dst=dst)
    _same_free(instr, "data1", data1, "data2", data2)
    _same_free(instr, "dst", dst, "data1", data1)
    _not_both_psum(instr, "data1", data1, "data2", data2)
    default = "GpSimd" if alu.name == "power" or _is_int32_arith(alu, data1, data2) else "VectorE"
    eng = _choose_engine(instr, engine, default, ("VectorE", "GpSimd"), rule="engine-tensor-tensor")
    _no_psum_on_gpsimd(instr, eng, data1=data1, data2=data2, dst=dst)
    if alu.kind == "bitvec":
        _require_int(instr, alu, data1, data2, dst)
        values = _from_bits(ops.apply_alu(alu, _bits(data1, instr, "data1"), _bits(data2, instr, "data2")),
                            dst.dtype)
    elif alu.kind == "unary":
        raise _err.UnsupportedError(f"{instr}: nl.{alu.name} is unary; use tensor_scalar or activation")
    else:
        values = ops.apply_alu(alu, _vals(data1, instr, "data1"), _vals(data2, instr, "data2"))
    _store(dst, values, instr)
    rate = _vector_cycles_per_element(instr, dst, data1, data2) if eng == "VectorE" else 1.0
    ctx.cost.compute(eng, instr, p, data1.free_size, _bytes(data1, data2, dst), cycles_per_element=rate)


def _bits(t: _mem.NkiTensor, instr: str, operand: str) -> np.ndarray:
    """Integer bit patterns of a tile as int64 (signed types viewed as unsigned, so right shifts
    are logical)."""
    raw = _raw(t, instr, operand)
    unsigned = np.dtype(f"u{raw.dtype.itemsize}")
    return np.ascontiguousarray(raw).view(unsigned).astype(np.int64)


def _from_bits(values: np.ndarray, dtype) -> np.ndarray:
    """Wrap int64 bit patterns into ``dtype`` (no saturation: bitvec results are bit patterns)."""
    unsigned = np.dtype(f"u{dtype.itemsize}")
    return (np.asarray(values).astype(np.uint64) & np.uint64((1 << (8 * dtype.itemsize)) - 1)) \
        .astype(unsigned).view(dtype)


def _require_int(instr, alu, *tensors):
    for t in tensors:
        if isinstance(t, _mem.NkiTensor) and not dt.is_int(t.dtype):
            raise _err.DtypeError(f"{instr}: bitvec operator nl.{alu.name} needs integer tensors, got {t.describe()}")


def _apply_scalar_op(alu, values, operand, reverse):
    if alu.kind == "unary":
        return ops.apply_alu(alu, values, None)
    return ops.apply_alu(alu, operand, values) if reverse else ops.apply_alu(alu, values, operand)


def tensor_scalar(dst, data, op0, operand0, reverse0=False, op1=None, operand1=None, reverse1=False,
                  engine=engine.unknown, name=None):
    """``dst = (data op0 operand0) op1 operand1``; operands are numbers or [P, 1] fp32 vectors."""
    instr = "tensor_scalar"
    ctx = _current("nisa.tensor_scalar")
    alu0 = ops.alu(op0, instr, "op0")
    alu1 = None if op1 is None else ops.alu(op1, instr, "op1")
    if (op1 is None) != (operand1 is None):
        raise TypeError(f"{instr}: op1 and operand1 must be given together")
    if alu1 is not None and (alu0.kind == "bitvec") != (alu1.kind == "bitvec"):
        raise _err.UnsupportedError(f"{instr}: op0 nl.{alu0.name} and op1 nl.{alu1.name} must both be bitvec "
                                    f"or both arithmetic")
    data = _in(instr, "data", data)
    dst = _in(instr, "dst", dst)
    p = _same_partitions(instr, dst=dst, data=data)
    _same_free(instr, "dst", dst, "data", data)
    eng = _choose_engine(instr, engine, "VectorE", ("VectorE", "GpSimd", "ScalarE"))
    if eng == "ScalarE" and (alu0.name, alu1.name if alu1 else None) not in (
            ("multiply", "add"), ("multiply", None), ("add", None)):
        raise _err.UnsupportedError(f"{instr}: ScalarE supports only (multiply, add), (multiply, None), "
                                    f"(add, None) on Trainium2")
    if eng == "GpSimd" and (alu0.name != "rsqrt" or alu1 is not None) and _strict("gpsimd-tensor-scalar"):
        raise _violation(_err.EngineRuleError, "gpsimd-tensor-scalar",
                         f"{instr}: op0=nl.{alu0.name}, op1={'nl.' + alu1.name if alu1 else None} on GpSimd; "
                         f"GpSimd runs tensor_scalar only for op0=nl.rsqrt")
    _no_psum_on_gpsimd(instr, eng, data=data, dst=dst, operand0=operand0, operand1=operand1)
    if alu0.kind == "bitvec":
        _require_int(instr, alu0, data, dst)
        values = _bits(data, instr, "data")
        o0 = _int_operand(instr, "operand0", operand0, p)
        values = ops.apply_alu(alu0, o0, values) if reverse0 else ops.apply_alu(alu0, values, o0)
        if alu1 is not None:
            o1 = _int_operand(instr, "operand1", operand1, p)
            values = ops.apply_alu(alu1, o1, values) if reverse1 else ops.apply_alu(alu1, values, o1)
        values = _from_bits(values, dst.dtype)
    else:
        values = _vals(data, instr, "data")
        o0 = None if alu0.kind == "unary" else _scalar_operand(instr, "operand0", operand0, p)
        values = _apply_scalar_op(alu0, values, o0, reverse0)
        if alu1 is not None:
            o1 = None if alu1.kind == "unary" else _scalar_operand(instr, "operand1", operand1, p)
            values = _apply_scalar_op(alu1, values, o1, reverse1)
    _store(dst, values, instr)
    rate = _vector_cycles_per_element(instr, dst, data) if eng == "VectorE" else 1.0
    ctx.cost.compute(eng, instr, p, data.free_size, _bytes(data, dst), cycles_per_element=rate)


def _int_operand(instr, operand, value, p):
    if isinstance(value, _mem.NkiTensor):
        _in(instr, operand, value)
        if value.partitions != p or value.free_size != 1:
            raise _err.PartitionMismatchError(f"{instr}: {operand}{list(value.shape)} must be a scalar or [{p}, 1]")
        return _raw(value, instr, operand).astype(np.int64)
    return np.int64(_mem.runtime_int(value, f"{instr} {operand}"))


def scalar_tensor_tensor(dst, data, op0, operand0, op1, operand1, reverse0=False, reverse1=False,
                         name=None):
    """``dst = (data op0 operand0) op1 operand1`` with ``operand0`` scalar/[P, 1], ``operand1`` a tile."""
    instr = "scalar_tensor_tensor"
    ctx = _current("nisa.scalar_tensor_tensor")
    alu0, alu1 = ops.alu(op0, instr, "op0"), ops.alu(op1, instr, "op1")
    if "bitvec" in (alu0.kind, alu1.kind):
        raise _err.UnsupportedError(f"{instr}: only arithmetic operators are supported")
    data = _in(instr, "data", data)
    operand1 = _in(instr, "operand1", operand1)
    dst = _in(instr, "dst", dst)
    p = _same_partitions(instr, dst=dst, data=data, operand1=operand1)
    _same_free(instr, "data", data, "operand1", operand1)
    _same_free(instr, "dst", dst, "data", data)
    _not_both_psum(instr, "data", data, "operand1", operand1)
    o0 = _scalar_operand(instr, "operand0", operand0, p)
    values = _apply_scalar_op(alu0, _vals(data, instr, "data"), o0, reverse0)
    t = _vals(operand1, instr, "operand1")
    values = ops.apply_alu(alu1, t, values) if reverse1 else ops.apply_alu(alu1, values, t)
    _store(dst, values, instr)
    ctx.cost.compute("VectorE", instr, p, data.free_size, _bytes(data, operand1, dst),
                     cycles_per_element=_vector_cycles_per_element(instr, dst, data, operand1))


def tensor_scalar_reduce(dst, data, op0, operand0, reduce_op, reduce_res=None, reverse0=False,
                         reduce_cmd=reduce_cmd.reset_reduce, reduce_init=None, reduce_res_negate=False, name=None):
    """``dst = data op0 operand0`` and a ``reduce_op`` over all its free elements through the VectorE
    accumulator registers: ``reduce_cmd`` ``reset_reduce`` starts from the op's identity, ``reduce``
    continues the accumulators (shared with the other VectorE accumulating instructions),
    ``load_reduce`` starts from ``reduce_init`` (a number or a [P, 1] tile).  ``reduce_res[P, 1]``
    receives the accumulators (negated with ``reduce_res_negate``)."""
    instr = "tensor_scalar_reduce"
    ctx = _current("nisa.tensor_scalar_reduce")
    alu0, red = ops.alu(op0, instr, "op0"), ops.alu(reduce_op, instr, "reduce_op")
    if alu0.kind == "bitvec":    # the docs: "Bitvec operators are not supported in this API"
        raise _err.UnsupportedError(f"{instr}: op0 nl.{alu0.name} is a bitvec operator; only arithmetic "
                                    f"operators are supported")
    if red.name not in ("add", "multiply", "maximum", "minimum"):
        raise _err.UnsupportedError(f"{instr}: reduce_op must be add, multiply, maximum or minimum")
    rc = globals()["reduce_cmd"]
    if reduce_cmd not in (rc.reset_reduce, rc.reduce, rc.load_reduce):
        raise _err.UnsupportedError(f"{instr}: reduce_cmd must be reset_reduce, reduce or load_reduce, "
                                    f"got {reduce_cmd!r}")
    if (reduce_init is not None) != (reduce_cmd is rc.load_reduce):
        raise _err.UnsupportedError(f"{instr}: reduce_init is set exactly when reduce_cmd is load_reduce")
    data = _in(instr, "data", data)
    dst = _in(instr, "dst", dst)
    p = _same_partitions(instr, dst=dst, data=data)
    _same_free(instr, "dst", dst, "data", data)
    o0 = None if alu0.kind == "unary" else _scalar_operand(instr, "operand0", operand0, p)
    values = _apply_scalar_op(alu0, _vals(data, instr, "data"), o0, reverse0)
    reduced = red.reduce(values, axis=1).astype(np.float32)
    acc = _vector_accumulator(ctx)
    if reduce_cmd is rc.reset_reduce:
        acc["value"][:p] = reduced
    else:
        if reduce_cmd is rc.load_reduce:
            start = _scalar_operand(instr, "reduce_init", reduce_init, p)
            acc["value"][:p] = np.broadcast_to(np.asarray(start, np.float32).reshape(-1), (p,))
        elif not acc["valid"][:p].all():
            raise _err.UninitializedReadError(f"{instr}: reduce_cmd=reduce reads VectorE accumulators "
                                              f"0..{p - 1} that were never reset; start with reset_reduce")
        acc["value"][:p] = red.fn(acc["value"][:p], reduced)
    acc["valid"][:p] = True
    _store(dst, values, instr)
    if reduce_res is not None:
        reduce_res = _in(instr, "reduce_res", reduce_res)
        if reduce_res.partitions != p or reduce_res.free_size != 1:
            raise _err.ShapeMismatchError(f"{instr}: reduce_res {reduce_res.describe()} must be [{p}, 1]")
        result = acc["value"][:p].reshape(p, 1)
        _store(reduce_res, -result if reduce_res_negate else result, instr)
    ctx.cost.compute("VectorE", instr, p, data.free_size, _bytes(data, dst, reduce_res))


def _vector_accumulator(ctx) -> dict:
    """VectorE accumulator registers (one fp32 per partition lane), created on first use."""
    acc = ctx.__dict__.get("vector_acc")
    if acc is None:
        acc = ctx.__dict__["vector_acc"] = {"value": np.zeros(128, np.float32), "valid": np.zeros(128, bool)}
    return acc


def tensor_copy(dst, src, engine=engine.unknown, name=None):
    """Copy ``src`` to ``dst`` (bit-exact for equal dtypes, else through fp32)."""
    instr = "tensor_copy"
    ctx = _current("nisa.tensor_copy")
    src, dst = _in(instr, "src", src), _in(instr, "dst", dst)
    p = _same_partitions(instr, dst=dst, src=src)
    _same_free(instr, "dst", dst, "src", src)
    eng = _choose_engine(instr, engine, "VectorE", ("VectorE", "GpSimd", "ScalarE"))
    _no_psum_on_gpsimd(instr, eng, src=src, dst=dst)
    values = _raw(src, instr, "src")
    if src.dtype != dst.dtype:
        values = dt.to_f32(values)
    _store(dst, values, instr)
    rate = _vector_cycles_per_element(instr, dst, src) if eng == "VectorE" else 1.0
    ctx.cost.compute(eng, instr, p, src.free_size, _bytes(src, dst), cycles_per_element=rate)


def reciprocal(dst, data, name=None):
    """``dst = 1 / data`` on VectorE (the precise reciprocal)."""
    instr = "reciprocal"
    ctx = _current("nisa.reciprocal")
    data, dst = _in(instr, "data", data), _in(instr, "dst", dst)
    p = _same_partitions(instr, dst=dst, data=data)
    _same_free(instr, "dst", dst, "data", data)
    with np.errstate(all="ignore"):
        _store(dst, np.float32(1.0) / _vals(data, instr, "data"), instr)
    ctx.cost.compute("VectorE", instr, p, data.free_size, _bytes(data, dst),
                     cycles_per_element=ctx.config.model.reciprocal_cycles_per_elem)


def memset(dst, value, engine=engine.unknown, name=None):
    """Fill ``dst`` with ``value`` (an int for integer tensors)."""
    instr = "memset"
    ctx = _current("nisa.memset")
    dst = _in(instr, "dst", dst)
    if dt.is_int(dst.dtype) and not isinstance(value, (int, np.integer, bool, np.bool_)):
        raise _err.DtypeError(f"{instr}: value {value!r} must be an integer literal for {dst.describe()}")
    if not isinstance(value, (int, float, np.integer, np.floating, bool, np.bool_)):
        raise TypeError(f"{instr}: value must be a number, got {type(value).__name__}")
    eng = _choose_engine(instr, engine, "VectorE", ("VectorE", "GpSimd"), rule="engine-memset")
    _no_psum_on_gpsimd(instr, eng, dst=dst)
    if dt.is_int(dst.dtype) or dst.dtype == dt.bool_:
        fill = np.int64(value)
    else:
        fill = np.float32(value)
    dst.write(np.broadcast_to(fill, dst.shape), instr)
    ctx.cost.compute(eng, instr, dst.partitions, dst.free_size, _bytes(dst))


def _pattern_values(instr: str, dst: _mem.NkiTensor, pattern, offset, channel_multiplier) -> np.ndarray:
    """``offset + p * channel_multiplier + sum(step_d * idx_d)`` as int64 [P, free]."""
    try:
        pairs = [(int(s), int(c)) for s, c in pattern]
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{instr}: pattern must be [[step, num], ...], got {pattern!r}") from exc
    counts = [c for _, c in pairs]
    if int(np.prod(counts)) != dst.free_size:
        raise _err.ShapeMismatchError(f"{instr}: pattern {pattern} covers {int(np.prod(counts))} elements per "
                                      f"partition but dst {dst.describe()} has {dst.free_size}")
    free = np.zeros(counts, np.int64)
    for k, (step, count) in enumerate(pairs):
        shape = [1] * len(pairs)
        shape[k] = count
        free = free + step * np.arange(count, dtype=np.int64).reshape(shape)
    part = np.arange(dst.partitions, dtype=np.int64)[:, None] * int(channel_multiplier)
    return _mem.runtime_int(offset, f"{instr} offset") + part + free.reshape(1, -1)


def iota(dst, pattern, offset=0, channel_multiplier=0, name=None):
    """``dst[p, ...] = offset + p * channel_multiplier + sum(step_d * idx_d)`` on GpSimd (SBUF)."""
    instr = "iota"
    ctx = _current("nisa.iota")
    dst = _in(instr, "dst", dst, ("sbuf",))
    values = _pattern_values(instr, dst, pattern, offset, channel_multiplier)
    if not dt.is_int(dst.dtype):
        values = values.astype(np.float32)
    _store(dst, values, instr)
    ctx.cost.compute("GpSimd", instr, dst.partitions, dst.free_size, _bytes(dst))


def affine_select(dst, pattern, channel_multiplier, on_true_tile, on_false_value, cmp_op=None,
                  offset=0, name=None):
    """``dst = on_true_tile where cmp_op(offset + p*channel_multiplier + sum(step*idx), 0) else
    on_false_value`` on GpSimd (SBUF only).  ``cmp_op`` defaults to ``nl.equal``."""
    instr = "affine_select"
    ctx = _current("nisa.affine_select")
    dst = _in(instr, "dst", dst, ("sbuf",))
    on_true_tile = _in(instr, "on_true_tile", on_true_tile, ("sbuf",))
    p = _same_partitions(instr, dst=dst, on_true_tile=on_true_tile)
    _same_free(instr, "dst", dst, "on_true_tile", on_true_tile)
    alu = ops.ALU_BY_NAME["equal"] if cmp_op is None else ops.alu(cmp_op, instr, "cmp_op")
    if alu.kind != "compare":
        raise _err.UnsupportedError(f"{instr}: cmp_op must be a comparison (nl.equal, nl.greater_equal, ...)")
    if not isinstance(on_false_value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{instr}: on_false_value must be a number (typically nl.fp32.min)")
    cond = ops.apply_alu(alu, _pattern_values(instr, dst, pattern, offset, channel_multiplier), 0) != 0
    if dst.dtype == on_true_tile.dtype:
        true_vals = _raw(on_true_tile, instr, "on_true_tile")
        false_val = dt.round_to(np.asarray([on_false_value], np.float32), dst.dtype,
                                dst.storage.fp32_stored)[0]
    else:
        true_vals = _vals(on_true_tile, instr, "on_true_tile")
        false_val = np.float32(on_false_value)
    _store(dst, np.where(cond, true_vals, false_val), instr)
    ctx.cost.compute("GpSimd", instr, p, dst.free_size, _bytes(dst, on_true_tile))


# --------------------------------------------------------------------------- top-8 family

def _check_top8_data(instr: str, data: _mem.NkiTensor) -> None:
    if not 8 <= data.free_size <= 16384:
        raise _err.TileSizeError(f"{instr}: data {data.describe()} has {data.free_size} elements per partition; "
                                 f"supported range is 8 to 16384")


def _check_eight(instr: str, operand: str, t: _mem.NkiTensor) -> None:
    if t.free_size != 8:
        raise _err.ShapeMismatchError(f"{instr}: {operand} {t.describe()} must hold exactly 8 elements per partition")


def max8(dst, src, name=None):
    """The 8 largest values of each partition, in descending order, on VectorE."""
    instr = "max8"
    ctx = _current("nisa.max8")
    src, dst = _in(instr, "src", src), _in(instr, "dst", dst)
    _check_top8_data(instr, src)
    _check_eight(instr, "dst", dst)
    p = _same_partitions(instr, dst=dst, src=src)
    values = _vals(src, instr, "src")
    top = np.partition(values, values.shape[1] - 8, axis=1)[:, -8:]
    _store(dst, -np.sort(-top, axis=1), instr)
    ctx.cost.compute("VectorE", instr, p, src.free_size, _bytes(src, dst))


def _occurrence_positions(data: np.ndarray, vals: np.ndarray, rank: np.ndarray):
    """For each [p, j]: position of occurrence number ``rank[p, j]`` of ``vals[p, j]`` in data[p]."""
    eq = data[:, None, :] == vals[:, :, None]                 # [P, 8, N]
    nth = np.cumsum(eq, axis=2, dtype=np.int32)
    hit = eq & (nth == (rank + 1)[:, :, None])
    found = hit.any(axis=2)
    return np.argmax(hit, axis=2), found


def _duplicate_rank(vals: np.ndarray, reverse: bool) -> np.ndarray:
    """How many earlier (or, reversed, later) slots of the same row hold the same value."""
    same = vals[:, :, None] == vals[:, None, :]               # [P, 8, 8]
    order = np.triu(np.ones((8, 8), bool), 1) if reverse else np.tril(np.ones((8, 8), bool), -1)
    return (same & order[None]).sum(axis=2)


def _index_dtype_check(instr: str, operand: str, t: _mem.NkiTensor) -> None:
    if t.dtype not in (dt.uint32, dt.uint16):
        raise _err.DtypeError(f"{instr}: {operand} {t.describe()} must be uint32 or uint16")


def nc_find_index8(dst, data, vals, name=None):
    """Index (flattened free position) of each of the 8 ``vals`` per partition in ``data``.

    Not found: all ones (0xFFFFFFFF / 0xFFFF).  A value repeated in ``vals`` maps to successive
    occurrences, left to right (NKI 0.6 simulator semantics).
    """
    instr = "nc_find_index8"
    ctx = _current("nisa.nc_find_index8")
    data, vals, dst = _in(instr, "data", data), _in(instr, "vals", vals), _in(instr, "dst", dst)
    _check_top8_data(instr, data)
    _check_eight(instr, "vals", vals)
    _check_eight(instr, "dst", dst)
    _index_dtype_check(instr, "dst", dst)
    p = _same_partitions(instr, dst=dst, data=data, vals=vals)
    v = _vals(vals, instr, "vals")
    pos, found = _occurrence_positions(_vals(data, instr, "data"), v, _duplicate_rank(v, reverse=False))
    result = np.where(found, pos, np.iinfo(dst.dtype).max).astype(dst.dtype)
    _store(dst, result, instr)
    ctx.cost.compute("VectorE", instr, p, data.free_size, _bytes(data, vals, dst))


def nc_match_replace8(dst, data, vals, imm, dst_idx=None, name=None):
    """Copy ``data`` to ``dst`` replacing the first occurrence of each of the 8 ``vals`` with ``imm``.

    Duplicated values are processed from slot 7 down to 0 (the first occurrence goes to the
    highest duplicate slot).  ``dst_idx`` (uint32/uint16, 8 per partition) receives the positions.
    """
    instr = "nc_match_replace8"
    ctx = _current("nisa.nc_match_replace8")
    data, vals, dst = _in(instr, "data", data), _in(instr, "vals", vals), _in(instr, "dst", dst)
    _check_top8_data(instr, data)
    _check_eight(instr, "vals", vals)
    p = _same_partitions(instr, dst=dst, data=data, vals=vals)
    _same_free(instr, "dst", dst, "data", data)
    if not isinstance(imm, (int, float, np.integer, np.floating)):
        raise TypeError(f"{instr}: imm must be a number (e.g. -inf or nl.fp32.min)")
    x = _vals(data, instr, "data")
    v = _vals(vals, instr, "vals")
    pos, found = _occurrence_positions(x, v, _duplicate_rank(v, reverse=True))
    out = x.copy()
    rows = np.broadcast_to(np.arange(p)[:, None], pos.shape)
    out[rows[found], pos[found]] = np.float32(imm)
    if dst.dtype == data.dtype:
        raw = _raw(data, instr, "data").copy()
        raw[rows[found], pos[found]] = dt.round_to(np.asarray([imm], np.float32), dst.dtype,
                                                   dst.storage.fp32_stored)[0]
        out = raw
    _store(dst, out, instr)
    if dst_idx is not None:
        dst_idx = _in(instr, "dst_idx", dst_idx)
        _check_eight(instr, "dst_idx", dst_idx)
        _index_dtype_check(instr, "dst_idx", dst_idx)
        _store(dst_idx, np.where(found, pos, np.iinfo(dst_idx.dtype).max).astype(dst_idx.dtype), instr)
    ctx.cost.compute("VectorE", instr, p, data.free_size, _bytes(data, vals, dst, dst_idx))


def nc_n_gather(dst, data, indices, name=None):
    """Per-partition gather over the flattened free dims on GpSimd (SBUF only, uint32 indices)."""
    instr = "nc_n_gather"
    ctx = _current("nisa.nc_n_gather")
    dst = _in(instr, "dst", dst, ("sbuf",))
    data = _in(instr, "data", data, ("sbuf",))
    indices = _in(instr, "indices", indices, ("sbuf",))
    p = _same_partitions(instr, dst=dst, data=data, indices=indices)
    _same_free(instr, "dst", dst, "indices", indices)
    if indices.dtype != dt.uint32:
        raise _err.DtypeError(f"{instr}: indices {indices.describe()} must be uint32")
    if dst.dtype != data.dtype:
        raise _err.DtypeError(f"{instr}: dst dtype {dst.dtype} must equal data dtype {data.dtype}")
    idx = _raw(indices, instr, "indices").astype(np.int64)
    if (idx >= data.free_size).any():
        raise _err.OutOfBoundsError(f"{instr}: index {int(idx.max())} outside [0, {data.free_size}) of "
                                    f"{data.describe()}")
    _store(dst, np.take_along_axis(_raw(data, instr, "data"), idx, axis=1), instr)
    ctx.cost.compute("GpSimd", instr, p, dst.free_size, _bytes(dst, data, indices))


# --------------------------------------------------------------------------- registers

def register_alloc(x=None) -> VirtualRegister:
    """A new register, holding ``x`` (an int) if given."""
    _current("nisa.register_alloc")
    return VirtualRegister(None if x is None else _mem.runtime_int(x, "register_alloc"))


def register_move(dst: VirtualRegister, src) -> None:
    """Set a register to a compile-time int or another register's value; it touches no memory
    (SDK isa stub, ``register_move``), so a tensor source raises (use ``register_load``)."""
    _current("nisa.register_move")
    if isinstance(src, _mem.NkiTensor):
        raise TypeError(f"register_move: src must be an int or a VirtualRegister, got {src.describe()}; "
                        f"load a register from memory with nisa.register_load")
    dst._set(_mem.runtime_int(src, "register_move src"))


def register_load(dst: VirtualRegister, src) -> None:
    """Load a register from a one-element HBM or SBUF tensor."""
    _current("nisa.register_load")
    src = _in("register_load", "src", src, ("sbuf", "hbm"))
    dst._set(_mem.runtime_int(src, "register_load src"))


def register_store(dst, src: VirtualRegister) -> None:
    """Store a register into a one-element HBM or SBUF tensor."""
    _current("nisa.register_store")
    dst = _in("register_store", "dst", dst, ("sbuf", "hbm"))
    if dst.size != 1:
        raise _err.ShapeMismatchError(f"register_store: dst {dst.describe()} must hold exactly one element")
    if not isinstance(src, VirtualRegister):
        raise TypeError(f"register_store: src must be a VirtualRegister, got {type(src).__name__}")
    dst.write(np.full(dst.shape, src.value, np.int64), "register_store")


# --------------------------------------------------------------------------- more instructions

def dma_compute(dst, srcs, reduce_op, scales=None, unique_indices=True, name=None):
    """``dst = srcs[0] + srcs[1] + ...`` computed in fp32 by the DMA engines.

    With an indirect view (``.ap(vector_offset=...)``) this is the documented read-modify-write:
    scatter-add ``dst(HBM)[idx] += src(SBUF)`` (dst and one source are the same indirect view) or
    gather-add ``dst(SBUF) += src(HBM)[idx]``.  Indices must be unique.
    """
    instr = "dma_compute"
    ctx = _current("nisa.dma_compute")
    if ops.alu(reduce_op, instr, "reduce_op").name != "add":
        raise _err.UnsupportedError(f"{instr}: only reduce_op=nl.add is supported")
    srcs = list(srcs)
    if not srcs:
        raise TypeError(f"{instr}: srcs must hold at least one tensor")
    if scales is not None and any(float(s) != 1.0 for s in scales):
        raise _err.UnsupportedError(f"{instr}: all scales must be 1.0")
    if not unique_indices:
        raise _err.UnsupportedError(f"{instr}: unique_indices=False is not supported")
    dst = _tensor(instr, "dst", dst)
    tensors = [("dst", dst)] + [(f"srcs[{i}]", _tensor(instr, f"srcs[{i}]", s)) for i, s in enumerate(srcs)]
    for operand, t in tensors:
        if t.buffer is _mem.MemoryRegion.psum:
            raise _err.MemoryRegionError(f"Expected operand '{operand}' of '{instr}' to be in address space "
                                         f"'hbm|sbuf', but got a tile in 'psum' instead")
        if t.size != dst.size:
            raise _err.ShapeMismatchError(f"{instr}: {operand} {t.describe()} has {t.size} elements, dst {dst.size}")
        if t._valid is not None:
            raise _err.OutOfBoundsError(f"{instr}: indirect {operand} {t.describe()} addresses elements outside "
                                        f"the tensor")
        if t._addr is not None and t._indirect and np.unique(t._addr).size != t._addr.size:
            raise _err.UnsupportedError(f"{instr}: {operand} has duplicate indirect addresses (unique_indices)")
    total = np.zeros(dst.size, np.float32)
    for operand, t in tensors[1:]:
        total += t.read_f32(instr, operand).reshape(-1)
    dst.write(total.reshape(dst.shape), instr)
    n_bytes = sum(t.size * t.itemsize for _, t in tensors)
    hbm = sum(t.size * t.itemsize for _, t in tensors if t.buffer.is_hbm)
    _record_dma(ctx, instr, dst, tensors[1][1], max(n_bytes, hbm), hbm)


def tensor_copy_predicated(dst, src, predicate, reverse_pred=False, name=None):
    """``dst = src`` where ``predicate`` is non-zero (zero with ``reverse_pred``), else unchanged."""
    instr = "tensor_copy_predicated"
    ctx = _current("nisa.tensor_copy_predicated")
    dst, src = _in(instr, "dst", dst), _in(instr, "src", src)
    predicate = _in(instr, "predicate", predicate)
    p = _same_partitions(instr, dst=dst, src=src, predicate=predicate)
    _same_free(instr, "dst", dst, "src", src)
    _same_free(instr, "dst", dst, "predicate", predicate)
    if dst.dtype != src.dtype:
        raise _err.DtypeError(f"{instr}: src dtype {src.dtype} must equal dst dtype {dst.dtype}")
    if not (dt.is_int(predicate.dtype) or predicate.dtype == dt.bool_):
        raise _err.DtypeError(f"{instr}: predicate {predicate.describe()} must be an integer (uint8/16/32) tile")
    mask = _raw(predicate, instr, "predicate") != 0
    if reverse_pred:
        mask = ~mask
    dst.write(_raw(src, instr, "src").reshape(dst.shape), instr, mask=mask.reshape(dst.shape))
    ctx.cost.compute("VectorE", instr, p, dst.free_size, _bytes(dst, src, predicate),
                     cycles_per_element=ctx.config.model.vector_two_input_cycles_per_elem)


def select_reduce(dst, predicate, on_true, on_false, reduce_res=None, reduce_cmd=reduce_cmd.idle,
                  reduce_op=None, reverse_pred=False, name=None):
    """``dst = on_true where predicate else on_false`` (number or [P, 1]); optional per-partition
    max of ``dst`` into ``reduce_res`` [P, 1] (the only reduce_op, ``nl.maximum``)."""
    instr = "select_reduce"
    ctx = _current("nisa.select_reduce")
    dst, on_true = _in(instr, "dst", dst), _in(instr, "on_true", on_true)
    predicate = _in(instr, "predicate", predicate)
    p = _same_partitions(instr, dst=dst, on_true=on_true, predicate=predicate)
    _same_free(instr, "dst", dst, "on_true", on_true)
    _same_free(instr, "dst", dst, "predicate", predicate)
    if reduce_op is not None and ops.alu(reduce_op, instr, "reduce_op").name != "maximum":
        raise _err.UnsupportedError(f"{instr}: reduce_op must be nl.maximum")
    mask = _raw(predicate, instr, "predicate") != 0
    if reverse_pred:
        mask = ~mask
    false_v = _scalar_operand(instr, "on_false", on_false, p, require_fp32=False)
    values = np.where(mask, _vals(on_true, instr, "on_true"), false_v).astype(np.float32)
    _store(dst, values, instr)
    if reduce_res is not None:
        reduce_res = _in(instr, "reduce_res", reduce_res)
        if reduce_res.partitions != p or reduce_res.free_size != 1:
            raise _err.ShapeMismatchError(f"{instr}: reduce_res {reduce_res.describe()} must be [{p}, 1]")
        _store(reduce_res, values.max(axis=1, keepdims=True), instr)
    ctx.cost.compute("VectorE", instr, p, dst.free_size, _bytes(dst, on_true, predicate, reduce_res),
                     cycles_per_element=ctx.config.model.vector_two_input_cycles_per_elem)


def bn_stats(dst, data, name=None):
    """Per partition ``[count, mean, var * count]`` of the even- and of the odd-indexed elements
    (6 values; the simulator's layout, consumed by ``bn_aggr``); at most 512 elements."""
    instr = "bn_stats"
    ctx = _current("nisa.bn_stats")
    data, dst = _in(instr, "data", data), _in(instr, "dst", dst)
    p = _same_partitions(instr, dst=dst, data=data)
    if data.free_size > _current(instr).config.model.bn_stats_fmax:
        raise _err.TileSizeError(f"{instr}: data {data.describe()} has {data.free_size} elements per partition; "
                                 f"bn_stats_fmax is 512")
    if dst.free_size != 6:
        raise _err.ShapeMismatchError(f"{instr}: dst {dst.describe()} must hold 6 values per partition")
    x = _vals(data, instr, "data")
    parts = []
    for half in (x[:, 0::2], x[:, 1::2]):
        n = half.shape[1]
        mean = half.mean(axis=1, keepdims=True) if n else np.zeros((p, 1), np.float32)
        m2 = ((half - mean) ** 2).sum(axis=1, keepdims=True) if n else np.zeros((p, 1), np.float32)
        parts += [np.full((p, 1), n, np.float32), mean, m2]
    _store(dst, np.concatenate(parts, axis=1), instr)
    ctx.cost.compute("VectorE", instr, p, data.free_size, _bytes(data, dst))


def bn_aggr(dst, data, name=None):
    """Combine ``bn_stats`` triples ``[count, mean, var*count] x k`` into ``[mean, variance]``
    (population variance) per partition."""
    instr = "bn_aggr"
    ctx = _current("nisa.bn_aggr")
    data, dst = _in(instr, "data", data), _in(instr, "dst", dst)
    p = _same_partitions(instr, dst=dst, data=data)
    if data.free_size % 3:
        raise _err.ShapeMismatchError(f"{instr}: data {data.describe()} must hold [count, mean, m2] triples")
    if dst.free_size != 2:
        raise _err.ShapeMismatchError(f"{instr}: dst {dst.describe()} must hold [mean, variance] per partition")
    s = _vals(data, instr, "data").reshape(p, -1, 3).astype(np.float64)
    count, mean, m2 = s[..., 0], s[..., 1], s[..., 2]
    total = count.sum(axis=1, keepdims=True)
    grand = (count * mean).sum(axis=1, keepdims=True) / np.maximum(total, 1)
    var = (m2 + count * (mean - grand) ** 2).sum(axis=1, keepdims=True) / np.maximum(total, 1)
    _store(dst, np.concatenate([grand, var], axis=1).astype(np.float32), instr)
    ctx.cost.compute("VectorE", instr, p, data.free_size, _bytes(data, dst))


# --------------------------------------------------------------------------- more of the surface
# (defined in their own modules, which use the helpers above)
from .isa_ext import (nc_matmul_mx, nc_stream_shuffle, nonzero_with_count, quantize_mx,  # noqa: E402
                      range_select, tensor_tensor_scan)
from .lnc import core_barrier, dma_engine, sendrecv  # noqa: E402


def _constants_module():
    """``nki.isa.constants``: the enumerations, as the NKI Library imports them."""
    import types
    module = types.ModuleType("nki.isa.constants", "Enumerations of nki.isa (simulator).")
    for enum_name in ("engine", "reduce_cmd", "dge_mode", "oob_mode", "nc_version", "matmul_perf_mode",
                      "dma_engine"):
        setattr(module, enum_name, globals()[enum_name])
    return module


constants = _constants_module()
