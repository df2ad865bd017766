"""``nki.language`` for the CPU simulator.

Types, buffers, tile-size constants, tensor creation, loops, SPMD ids and the ``nl.*`` wrappers
(``load``/``store``/``copy``, element-wise math, reductions, ``matmul``/``transpose``).  Each
wrapper allocates its result tile and issues the ``nisa`` instruction the NKI 0.6 wrapper lowers to,
so it is checked and costed exactly like the instruction.  The ``nl`` math functions double as the
operator arguments of ``nisa`` instructions (``op=nl.add``, ``op=nl.exp``).
"""
from __future__ import annotations

import builtins
import contextlib
import sys
import threading

import numpy as np

from ..trn2 import TRN2 as _TRN2
from . import dtypes as _dt
from . import isa as _isa
from . import ops as _ops
from .context import current as _current
from . import errors as _err
from .memory import MemoryRegion, NkiTensor   # nl.MemoryRegion / nl.NkiTensor are NKI classes
from .memory import PMAX as _PMAX, DynamicSlice as _DynamicSlice, VirtualRegister as _VirtualRegister
from .memory import allocate as _allocate, bind_element_wise_api as _bind_element_wise_api
from .memory import runtime_int as _runtime_int

# --------------------------------------------------------------------------- dtypes and buffers
float32 = _dt.float32
float16 = _dt.float16
bfloat16 = _dt.bfloat16
float8_e4m3 = _dt.float8_e4m3
float8_e4m3fn = _dt.float8_e4m3fn
float8_e5m2 = _dt.float8_e5m2
int32 = _dt.int32
uint32 = _dt.uint32
int16 = _dt.int16
uint16 = _dt.uint16
int8 = _dt.int8
uint8 = _dt.uint8
bool_ = _dt.bool_
float8_e8m0fnu = _dt.float8_e8m0fnu
float8_e4m3fn_x4 = _dt.float8_e4m3fn_x4
float8_e5m2_x4 = _dt.float8_e5m2_x4
float4_e2m1fn_x4 = _dt.float4_e2m1fn_x4

sbuf = MemoryRegion.sbuf
psum = MemoryRegion.psum
hbm = MemoryRegion.hbm
private_hbm = MemoryRegion.private_hbm
shared_hbm = MemoryRegion.shared_hbm

fp32 = _isa.fp32          # nl.fp32.min == -3.4028235e38 (the usual masking fill value)


class tile_size:
    """Hardware tile limits of Trainium2 (NeuronCore-v3), from :mod:`mimo_kernels.trn2`."""

    pmax = _TRN2.partitions                           # partitions of an SBUF / PSUM tile
    psum_fmax = _TRN2.psum_bank_fp32                  # fp32 per partition of one PSUM bank (old name)
    psum_bank_fmax = _TRN2.psum_bank_fp32
    psum_bank_fmax_bytes = _TRN2.psum_bank_bytes
    psum_num_banks = _TRN2.psum_banks
    gemm_stationary_fmax = _TRN2.gemm_stationary_fmax  # free size of the matmul stationary operand (M)
    gemm_moving_fmax = _TRN2.gemm_moving_fmax          # free size of the matmul moving operand (N)
    bn_stats_fmax = _TRN2.bn_stats_fmax
    sbuf_size_bytes = _TRN2.sbuf_bytes_per_partition
    total_available_sbuf_size = sbuf_size_bytes - 16384 - 8 - 256   # usable per partition (NKI Library)


class NKIObject:
    """Base class of classes used inside kernels (NKI language guide, "Classes").

    As the NKI compiler does, a subclass that does not define them gets ``__init__`` and
    ``__post_init__`` generated from its annotated class attributes (with or without
    ``@dataclass``): ``__init__(self, x=None, y=<class default>, ...)`` sets the fields in
    declaration order (base classes first) and calls ``self.__post_init__()``, which does nothing
    by default.  Equality is structural (same class, same attribute dictionary).
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__init__" not in cls.__dict__:
            cls.__init__ = _generated_init(cls)

    def __post_init__(self):
        pass

    def __eq__(self, other):
        return type(self) is type(other) and self.__dict__ == other.__dict__

    __hash__ = object.__hash__


def _generated_init(cls):
    fields = []
    for klass in reversed(cls.__mro__):
        for field in klass.__dict__.get("__annotations__", {}):
            if field not in fields:
                fields.append(field)
    defaults = {f: getattr(cls, f, None) for f in fields}

    def __init__(self, *args, **kwargs):
        if len(args) > len(fields):
            raise TypeError(f"{cls.__name__}() takes {len(fields)} positional arguments but "
                            f"{len(args)} were given")
        values = dict(defaults)
        values.update(zip(fields, args))
        unknown = set(kwargs) - set(fields)
        if unknown:
            raise TypeError(f"{cls.__name__}() got unexpected keyword argument(s) {sorted(unknown)}")
        values.update(kwargs)
        for field, value in values.items():
            object.__setattr__(self, field, value)     # works for frozen dataclasses too
        self.__post_init__()
    __init__.__qualname__ = f"{cls.__qualname__}.__init__"
    return __init__


# --------------------------------------------------------------------------- creation

def ndarray(shape, dtype, buffer=None, name="", address=None) -> NkiTensor:
    """An uninitialised tensor (NaN / 4 filled; reads before writes raise).  ``address=
    (partition_offset, free_offset)`` places an on-chip tile: tiles at one address share it."""
    return _allocate(shape, dtype, sbuf if buffer is None else buffer, name, address)


def _filled(shape, dtype, value, buffer, name, api):
    buffer = sbuf if buffer is None else buffer
    if isinstance(buffer, MemoryRegion) and buffer.is_hbm:
        raise _err.UnsupportedError(f"nl.{api}: HBM tensors cannot be created with an initial value "
                                    f"(err_hbm_tensor_with_init_value_not_supported); use nl.ndarray and "
                                    f"write it")
    t = _allocate(shape, dtype, buffer, name)
    _isa.memset(t, int(value) if _dt.is_int(t.dtype) or t.dtype == _dt.bool_ else float(value))
    return t


def zeros(shape, dtype, buffer=None, name="") -> NkiTensor:
    return _filled(shape, dtype, 0, buffer, name, "zeros")


def ones(shape, dtype, buffer=None, name="") -> NkiTensor:
    return _filled(shape, dtype, 1, buffer, name, "ones")


def full(shape, fill_value, dtype, buffer=None, name="") -> NkiTensor:
    return _filled(shape, dtype, fill_value, buffer, name, "full")


def zeros_like(a, dtype=None, buffer=None, name="") -> NkiTensor:
    return zeros(a.shape, a.dtype if dtype is None else dtype, a.buffer if buffer is None else buffer, name)


def empty_like(a, dtype=None, buffer=None, name="") -> NkiTensor:
    return ndarray(a.shape, a.dtype if dtype is None else dtype, a.buffer if buffer is None else buffer, name)


def rand(shape, dtype=float32, buffer=None, name="") -> NkiTensor:
    """Uniform [0, 1) values (GpSimd); seeded per kernel run for reproducibility."""
    t = ndarray(shape, dtype, buffer, name)
    ctx = _current("nl.rand")
    rng = ctx.run.rng
    t.write(rng.random(t.shape, dtype=np.float32), "rand")
    ctx.cost.compute("GpSimd", "rand", t.partitions, t.free_size, t.size * t.itemsize)
    return t


def random_seed(seed) -> None:
    """Seed ``nl.rand``: ``seed`` is a [1, 1] SBUF or PSUM tensor holding a 32-bit integer (SDK
    language stub, ``random_seed``); the same seed gives the same sequence."""
    ctx = _current("nl.random_seed")
    if not isinstance(seed, NkiTensor) or not seed.buffer.on_chip or seed.shape != (1, 1) \
            or seed.dtype not in (int32, uint32):
        got = seed.describe() if isinstance(seed, NkiTensor) else repr(seed)
        raise TypeError(f"nl.random_seed: seed must be a [1, 1] int32/uint32 tensor in SBUF or PSUM, got {got}")
    ctx.run.rng = np.random.default_rng(int(seed.read("random_seed", "seed").reshape(-1)[0]) & 0xFFFFFFFF)


SHARED_CONSTANT_DTYPES = (float32, float16, bfloat16, int32, int16, int8, uint32, uint16, uint8,
                          float8_e4m3fn, float8_e5m2, float8_e8m0fnu)


def shared_constant(constant) -> NkiTensor:
    """A ``nl.shared_hbm`` tensor holding ``constant`` (a NumPy array or a ``.npy`` path); in NKI it
    is embedded in the binary and loaded at model load time, so it costs the kernel nothing."""
    ctx = _current("nl.shared_constant")
    if isinstance(constant, (str, bytes)) or hasattr(constant, "__fspath__"):
        constant = np.load(constant)
    values = np.asarray(constant)
    dtype = _dt.as_dtype(values.dtype, "nl.shared_constant")
    if dtype not in SHARED_CONSTANT_DTYPES:
        raise _err.DtypeError(f"nl.shared_constant: dtype {_dt.dtype_name(dtype)} is not supported (supported: "
                              + ", ".join(_dt.dtype_name(d) for d in SHARED_CONSTANT_DTYPES) + ")")
    from .memory import wrap_input
    tensor = wrap_input(values, "shared_constant", shared_hbm, ctx.fp32_storage)
    tensor.storage.is_input = False
    tensor.storage.readonly_constant = True
    return tensor


def shared_identity_matrix(n, dtype=uint8, dst=None) -> NkiTensor:
    """An ``[n, n]`` identity matrix in SBUF (``dst`` if given); like ``shared_constant``, loaded
    from HBM, so it costs one DMA of ``n * n`` elements."""
    n = int(n)
    if dst is None:
        dst = ndarray((n, n), dtype, sbuf, name="identity")
    elif not isinstance(dst, NkiTensor) or dst.buffer is not sbuf or dst.partitions != n or dst.free_size != n:
        raise _err.ShapeMismatchError(f"nl.shared_identity_matrix: dst must be an [{n}, {n}] SBUF tile, got "
                                      f"{dst.describe() if isinstance(dst, NkiTensor) else dst!r}")
    dst.write(np.eye(n, dtype=np.float32).reshape(dst.shape), "shared_identity_matrix")
    _current("nl.shared_identity_matrix").cost.dma("shared_identity_matrix", dst.size,
                                                   dst.size * dst.itemsize, dst.size * dst.itemsize,
                                                   partitions=n, run_bytes=n * dst.itemsize)
    return dst


# --------------------------------------------------------------------------- indexing and loops

def ds(start, size):
    """``start : start + size``; a VirtualRegister start gives a dynamic (HBM / DMA only) slice."""
    if isinstance(start, (_VirtualRegister, NkiTensor)):
        return _DynamicSlice(start, size)
    return slice(int(start), int(start) + int(size))


# NKI 0.3+: every loop is unrolled; these are deprecated aliases of range.
affine_range = range
sequential_range = range
static_range = range


_no_reorder = threading.local()     # depth of nl.no_reorder blocks in this program's thread


def _dynamic_loop(api: str, step=1) -> None:
    """Checks shared by the register-based loops (SDK language stub and the dynamic-loops deep dive:
    the step is a compile-time positive int; dynamic loops are not supported inside no_reorder)."""
    if getattr(_no_reorder, "depth", 0):
        raise _err.UnsupportedError(f"nl.{api} inside an nl.no_reorder() block is not supported; put the "
                                    f"no_reorder block inside the loop body")
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step <= 0:
        raise TypeError(f"nl.{api}: step must be a compile-time positive integer, got {step!r}")


def dynamic_range(start, stop=None, step=1):
    """A runtime loop: bounds may be VirtualRegisters; yields read-only registers."""
    _dynamic_loop("dynamic_range", step)
    if stop is None:
        start, stop = 0, start
    lo, hi = _runtime_int(start, "dynamic_range start"), _runtime_int(stop, "dynamic_range stop")
    for i in range(lo, hi, int(step)):
        yield _VirtualRegister(i, frozen=True)


def fori_loop(lower, upper, body_fun, step=1) -> None:
    """``for i in range(lower, upper, step): body_fun(i)`` with runtime bounds; ``i`` is a register."""
    _dynamic_loop("fori_loop", step)
    lo, hi = _runtime_int(lower, "fori_loop lower"), _runtime_int(upper, "fori_loop upper")
    for i in range(lo, hi, int(step)):
        body_fun(_VirtualRegister(i, frozen=True))


def while_loop(init, body_fun) -> None:
    """``r = init; while r != 0: r = body_fun(r)``: the body receives the condition value as a
    read-only register and returns the next condition (SDK language stub, ``while_loop``)."""
    _dynamic_loop("while_loop")
    value = _runtime_int(init, "while_loop init")
    while value:
        value = _runtime_int(body_fun(_VirtualRegister(value, frozen=True)), "while_loop condition")


@contextlib.contextmanager
def no_reorder():
    """Instructions in this block keep program order (the simulator always does); register-based
    loops inside it raise, as documented."""
    _no_reorder.depth = getattr(_no_reorder, "depth", 0) + 1
    try:
        yield
    finally:
        _no_reorder.depth -= 1


# --------------------------------------------------------------------------- SPMD

def program_id(axis=0) -> int:
    if axis != 0:
        raise IndexError(f"nl.program_id: the launch grid has one axis (kernel[lnc]), got axis={axis}")
    return _current("nl.program_id").program_id


def num_programs(axes=0) -> int:
    if axes not in (0, None, (0,), [0]):
        raise IndexError(f"nl.num_programs: the launch grid has one axis, got axes={axes}")
    return _current("nl.num_programs").num_programs


def program_ndim() -> int:
    """Axes of the launch grid: 1 for ``kernel[n]``, 0 for a kernel launched without a grid."""
    return _current("nl.program_ndim").run.grid_ndim


# --------------------------------------------------------------------------- memory movement

def _tile_shape(shape):
    shape = tuple(shape)
    if len(shape) >= 2:
        return shape
    return (1,) * (2 - len(shape)) + shape


def load(src, dtype=None) -> NkiTensor:
    """HBM -> new SBUF tile (``nisa.dma_copy``); the partition dim is ``src``'s first dim."""
    if not isinstance(src, NkiTensor) or not src.buffer.is_hbm:
        where = src.buffer.value if isinstance(src, NkiTensor) else type(src).__name__
        raise _err.MemoryRegionError(f"Expected operand 'src' of 'load' to be in address space 'hbm', but got "
                                     f"a tile in '{where}' instead.")
    shape = _tile_shape(src.shape)
    if shape[0] > _PMAX:
        raise _err.PartitionLimitError(f"load: partition dimension {shape[0]} of src {src.describe()} exceeds "
                                       f"maximum {_PMAX}; load it in tiles of {_PMAX} rows")
    tile = ndarray(shape, src.dtype if dtype is None else dtype, sbuf)
    _isa.dma_copy(tile, src)
    return tile


def store(dst, value) -> None:
    """SBUF tile (or a number) -> HBM ``dst`` (``nisa.dma_copy``)."""
    if not isinstance(dst, NkiTensor) or not dst.buffer.is_hbm:
        where = dst.buffer.value if isinstance(dst, NkiTensor) else type(dst).__name__
        raise _err.MemoryRegionError(f"Expected operand 'dst' of 'store' to be in address space 'hbm', but got "
                                     f"a tile in '{where}' instead.")
    if not isinstance(value, NkiTensor):
        value = full(_tile_shape(dst.shape), value, dst.dtype)
    if value.buffer is MemoryRegion.psum:
        raise _err.MemoryRegionError("Expected operand 'value' of 'store' to be in address space 'sbuf', but got "
                                     "a tile in 'psum' instead (copy PSUM to SBUF first with nisa.tensor_copy)")
    _isa.dma_copy(dst, value)


def load_transpose2d(src, dtype=None) -> NkiTensor:
    """HBM ``[a, b]`` -> SBUF ``[b, a]`` via a DMA transpose; ``dtype`` casts the result (a
    ``tensor_copy`` after the transpose, which keeps the dtype)."""
    if not isinstance(src, NkiTensor) or not src.buffer.is_hbm or src.ndim != 2:
        raise _err.MemoryRegionError("load_transpose2d: src must be a 2-D HBM tensor")
    tile = ndarray((src.shape[1], src.shape[0]), src.dtype, sbuf)
    _isa.dma_transpose(tile, src)
    if dtype is None or _dt.as_dtype(dtype) == src.dtype:
        return tile
    cast = ndarray(tile.shape, dtype, sbuf)
    _isa.tensor_copy(cast, tile)
    return cast


def copy(src, dtype=None) -> NkiTensor:
    """New SBUF tile with ``src``'s values (``nisa.tensor_copy``; PSUM eviction + cast)."""
    _check_tile("copy", "src", src)
    out = ndarray(src.shape, src.dtype if dtype is None else dtype, sbuf)
    _isa.tensor_copy(out, src)
    return out


def broadcast_to(src, shape, dtype=None) -> NkiTensor:
    """New SBUF tile of ``shape`` from ``src`` (same rank).  A partition broadcast ``[1, F] -> [P, F]``
    is a TensorE ones-matmul (one per 512 columns); a free broadcast ``[P, 1] -> [P, F]`` a VectorE copy."""
    _check_tile("broadcast_to", "src", src)
    shape = tuple(int(s) for s in shape)
    if len(shape) != src.ndim:
        raise _err.ShapeMismatchError(f"broadcast_to: shape {list(shape)} must have the rank of src {list(src.shape)}")
    try:
        values = np.broadcast_to(src.read_f32("broadcast_to", "src"), shape)
    except ValueError as exc:
        raise _err.ShapeMismatchError(f"broadcast_to: cannot broadcast {src.describe()} to {list(shape)}") from exc
    out = ndarray(shape, src.dtype if dtype is None else dtype, sbuf)
    out.write(values if (dtype is not None and out.dtype != src.dtype) else
              np.broadcast_to(src.read("broadcast_to", "src"), shape), "broadcast_to")
    ctx = _current("nl.broadcast_to")
    if shape[0] != src.shape[0]:
        free = out.free_size
        for c in range(0, free, 512):
            n = builtins.min(512, free - c)
            kind = "fp32" if src.dtype == float32 else "16bit"
            ctx.cost.matmul("broadcast_to", 1, shape[0], n, kind, n * src.itemsize + shape[0] * n * 4,
                            flops=False)
        ctx.cost.compute("VectorE", "broadcast_to(psum->sbuf)", shape[0], free, out.size * (4 + out.itemsize))
    else:
        ctx.cost.compute("VectorE", "broadcast_to", shape[0], out.free_size, out.size * out.itemsize)
    return out


# --------------------------------------------------------------------------- element-wise helpers

def _check_tile(api: str, operand: str, x) -> NkiTensor:
    if not isinstance(x, NkiTensor):
        raise TypeError(f"nl.{api}: {operand} must be a tile, got {type(x).__name__}")
    if x.buffer.is_hbm:
        raise _err.MemoryRegionError(f"Expected operand '{operand}' of '{api}' to be in address space 'psum|sbuf', "
                                     f"but got a tile in 'hbm' instead ({x.describe()}); nl.load it first")
    return x


def _is_number(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating, bool, np.bool_))


def _result_dtype(dtype, *types):
    if dtype is not None:
        return _dt.as_dtype(dtype)
    # Comparisons and logical ops too: the NKI 0.6 stubs give them the inputs' dtype by default
    # (1 / 0 in that dtype) and suggest dtype=nl.uint8 for a boolean-like tile.
    out = types[0]
    for t in types[1:]:
        out = _dt.promote(out, t)
    return out


def _as_fp32_column(api: str, col: NkiTensor) -> NkiTensor:
    """tensor_scalar vector operands are fp32; cast a column first when it is not."""
    if col.dtype == float32:
        return col
    tmp = ndarray((col.partitions, 1), float32, sbuf)
    _isa.tensor_copy(tmp, col.reshape((col.partitions, 1)))
    return tmp


# nl functions that are not one documented ScalarE activation: nl.sin range-reduces before its
# activation (nki.api.shared.rst), the others lower to other instruction sequences.
_LOWERED = ("sin", "cos", "tan", "negative", "floor", "ceil", "trunc")


def _unary_activation(name: str):
    def fn(x, dtype=None):
        x = _check_tile(name, "x", x)
        out = ndarray(x.shape, x.dtype if dtype is None else dtype, sbuf)
        if name in _LOWERED:
            with _isa._lowered_activations():
                _isa.activation(out, fn, x)
        else:
            _isa.activation(out, fn, x)
        return out
    fn.__name__ = name
    fn.__doc__ = f"Element-wise {name} on ScalarE (``nisa.activation(op=nl.{name})``); result in SBUF."
    _ops.register_activation(fn, name)
    return fn


exp = _unary_activation("exp")
log = _unary_activation("log")
sqrt = _unary_activation("sqrt")
sigmoid = _unary_activation("sigmoid")
tanh = _unary_activation("tanh")
relu = _unary_activation("relu")
gelu = _unary_activation("gelu")
gelu_apprx_tanh = _unary_activation("gelu_apprx_tanh")
gelu_apprx_sigmoid = _unary_activation("gelu_apprx_sigmoid")
silu = _unary_activation("silu")
softplus = _unary_activation("softplus")
mish = _unary_activation("mish")
erf = _unary_activation("erf")
sin = _unary_activation("sin")
cos = _unary_activation("cos")
tan = _unary_activation("tan")
arctan = _unary_activation("arctan")
negative = _unary_activation("negative")
sign = _unary_activation("sign")
square = _unary_activation("square")
floor = _unary_activation("floor")
ceil = _unary_activation("ceil")
trunc = _unary_activation("trunc")
abs = _unary_activation("abs")
_ops.register_alu(abs, "abs")


def rsqrt(x, dtype=None) -> NkiTensor:
    """``1 / sqrt(x)`` on GpSimd (NKI 0.5+; PSUM inputs are rejected)."""
    x = _check_tile("rsqrt", "x", x)
    out = ndarray(x.shape, x.dtype if dtype is None else dtype, sbuf)
    _isa.tensor_scalar(out, x, op0=rsqrt, operand0=0.0, engine=_isa.engine.gpsimd)
    return out


def reciprocal(x, dtype=None) -> NkiTensor:
    """``1 / x`` on VectorE (``nisa.reciprocal``)."""
    x = _check_tile("reciprocal", "x", x)
    out = ndarray(x.shape, x.dtype if dtype is None else dtype, sbuf)
    _isa.reciprocal(out, x)
    return out


_ops.register_alu(rsqrt, "rsqrt")
_ops.register_activation(rsqrt, "rsqrt")
_ops.register_alu(reciprocal, "reciprocal")
_ops.register_activation(reciprocal, "reciprocal")
_ops.register_activation(copy, "copy")          # nisa.activation(op=nl.copy): ScalarE copy / scale


def _binary(name: str):
    def fn(x, y, dtype=None):
        return _elementwise(fn, name, x, y, dtype)
    fn.__name__ = name
    fn.__doc__ = (f"Element-wise {name}: equal-shape tiles (``nisa.tensor_tensor``), or a tile with a "
                  f"number or a [P, 1] column (``nisa.tensor_scalar``).  Partition broadcasts raise.")
    _ops.register_alu(fn, name)
    return fn


def _elementwise(op, name, x, y, dtype):
    xt, yt = isinstance(x, NkiTensor), isinstance(y, NkiTensor)
    if not xt and not yt:
        raise TypeError(f"nl.{name}: at least one operand must be a tile")
    if xt and yt:
        _check_tile(name, "x", x)
        _check_tile(name, "y", y)
        out_dtype = _result_dtype(dtype, x.dtype, y.dtype)
        if x.shape == y.shape:
            out = ndarray(x.shape, out_dtype, sbuf)
            _isa.tensor_tensor(out, x, y, op)
            return out
        if x.partitions != y.partitions:
            big, small = (x, y) if x.partitions > y.partitions else (y, x)
            raise _err.PartitionMismatchError(
                f"nl.{name}: operands {list(x.shape)} and {list(y.shape)} differ in partitions; a partition "
                f"broadcast {list(small.shape)} -> {list(big.shape)} is not supported by NKI 0.6 element-wise "
                f"ops: use nl.broadcast_to(x, shape) (a TensorE ones-matmul) first")
        if y.free_size == 1 or x.free_size == 1:
            tile, col, reverse = (x, y, False) if y.free_size == 1 else (y, x, True)
            out = ndarray(tile.shape, out_dtype, sbuf)
            _isa.tensor_scalar(out, tile, op, _as_fp32_column(name, col), reverse0=reverse)
            return out
        raise _err.ShapeMismatchError(f"nl.{name}: operand shapes {list(x.shape)} and {list(y.shape)} differ "
                                      f"(only equal shapes or a [P, 1] column broadcast are supported)")
    tile, scalar, reverse = (x, y, False) if xt else (y, x, True)
    _check_tile(name, "x" if xt else "y", tile)
    if not _is_number(scalar):
        raise TypeError(f"nl.{name}: operand must be a tile or a number, got {type(scalar).__name__}")
    out = ndarray(tile.shape, _result_dtype(dtype, tile.dtype, _dt.scalar_dtype(scalar)), sbuf)
    _isa.tensor_scalar(out, tile, op, scalar, reverse0=reverse)
    return out


add = _binary("add")
subtract = _binary("subtract")
multiply = _binary("multiply")
maximum = _binary("maximum")
minimum = _binary("minimum")
power = _binary("power")
equal = _binary("equal")
not_equal = _binary("not_equal")
greater = _binary("greater")
greater_equal = _binary("greater_equal")
less = _binary("less")
less_equal = _binary("less_equal")
logical_and = _binary("logical_and")
logical_or = _binary("logical_or")
logical_xor = _binary("logical_xor")
bitwise_and = _binary("bitwise_and")
bitwise_or = _binary("bitwise_or")
bitwise_xor = _binary("bitwise_xor")
left_shift = _binary("left_shift")
right_shift = _binary("right_shift")


def divide(x, y, dtype=None) -> NkiTensor:
    """``x / y`` for a tile and a number (multiply by the fp32 reciprocal).

    Tile / tile division is not supported on Trainium2 in NKI 0.6 (use
    ``nl.multiply(x, nl.reciprocal(y))``)."""
    if isinstance(y, NkiTensor):
        raise _err.UnsupportedError("nl.divide by a tile is not supported on hardware in NKI 0.6; use "
                                    "nl.multiply(x, nl.reciprocal(y))")
    if not _is_number(y):
        raise TypeError(f"nl.divide: divisor must be a number, got {type(y).__name__}")
    out = multiply(x, float(np.float32(1.0) / np.float32(y)), dtype=dtype)
    return out


_ops.register_alu(divide, "divide")


def where(condition, x, y, dtype=None) -> NkiTensor:
    """``x`` where ``condition`` is non-zero else ``y`` (tiles of one shape, or numbers); VectorE."""
    condition = _check_tile("where", "condition", condition)
    tiles = [t for t in (x, y) if isinstance(t, NkiTensor)]
    for t in tiles:
        _check_tile("where", "x/y", t)
        if t.shape != condition.shape:
            raise _err.ShapeMismatchError(f"nl.where: {t.describe()} must have the condition's shape "
                                          f"{list(condition.shape)}")
    out_dtype = _result_dtype(dtype, *[t.dtype if isinstance(t, NkiTensor) else _dt.scalar_dtype(t)
                                                for t in (x, y)])
    out = ndarray(condition.shape, out_dtype, sbuf)
    cond = condition.read_f32("where", "condition") != 0
    xv = x.read_f32("where", "x") if isinstance(x, NkiTensor) else np.float32(x)
    yv = y.read_f32("where", "y") if isinstance(y, NkiTensor) else np.float32(y)
    out.write(np.where(cond, xv, yv), "where")
    _current("nl.where").cost.compute("VectorE", "where", out.partitions, out.free_size,
                                      out.size * out.itemsize * (2 + len(tiles)))
    return out


# --------------------------------------------------------------------------- reductions

def _reduced_shape(x: NkiTensor, axis, keepdims: bool):
    axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    axes = {int(a) + x.ndim if int(a) < 0 else int(a) for a in axes}
    if keepdims:
        return tuple(1 if i in axes else s for i, s in enumerate(x.shape))
    shape = tuple(s for i, s in enumerate(x.shape) if i not in axes)
    return shape if len(shape) >= 2 else (x.shape[0], 1)   # on-chip tiles stay >= 2-D: [P, 1]


def _reduction(name: str, op_name: str):
    def fn(x, axis, dtype=None, keepdims=False):
        x = _check_tile(name, "x", x)
        out = ndarray(_reduced_shape(x, axis, keepdims), x.dtype if dtype is None else dtype, sbuf)
        _isa.tensor_reduce(out, _ops.ALU_BY_NAME[op_name], x, axis, keepdims=keepdims)
        return out
    fn.__name__ = name
    fn.__doc__ = (f"{name} over free ``axis`` (``nisa.tensor_reduce``); a reduction that would leave "
                  f"fewer than 2 dims gives a [P, 1] column.")
    return fn


sum = _reduction("sum", "add")
max = _reduction("max", "maximum")
min = _reduction("min", "minimum")
prod = _reduction("prod", "multiply")
_ops.register_alu(sum, "add")
_ops.register_alu(max, "maximum")
_ops.register_alu(min, "minimum")


def mean(x, axis, dtype=None, keepdims=False) -> NkiTensor:
    """Mean over free ``axis``: a sum in fp32, then a multiply by ``1/n``."""
    x = _check_tile("mean", "x", x)
    total = sum(x, axis, dtype=float32, keepdims=keepdims)
    axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    n = int(np.prod([x.shape[int(a)] for a in axes]))
    return multiply(total, 1.0 / n, dtype=x.dtype if dtype is None else dtype)


def all(x, axis, dtype=bool_) -> NkiTensor:
    x = _check_tile("all", "x", x)
    out = ndarray(_reduced_shape(x, axis, False), dtype, sbuf)
    _isa.tensor_reduce(out, _ops.ALU_BY_NAME["logical_and"], x, axis)
    return out


# --------------------------------------------------------------------------- TensorE wrappers

def matmul(x, y, transpose_x=False) -> NkiTensor:
    """``x.T @ y`` into a new fp32 PSUM tile (``nisa.nc_matmul``); ``x`` is ``[K, M]``, ``y`` ``[K, N]``.

    NKI 0.3+ supports only ``transpose_x=True`` (contraction on the partition dim of both)."""
    if not transpose_x:
        raise _err.UnsupportedError("nl.matmul(x, y) without transpose_x=True is not supported in NKI 0.3+; pass "
                                    "x as [K, M] with transpose_x=True")
    _check_tile("matmul", "x", x)
    _check_tile("matmul", "y", y)
    if x.free_size > 128 or y.free_size > 512:
        raise _err.TileSizeError(f"nl.matmul: x {x.describe()} free size must be <= 128 and y {y.describe()} "
                                 f"free size <= 512")
    out = ndarray((x.free_size, y.free_size), float32, psum)
    _isa.nc_matmul(out, x, y)
    return out


def transpose(x, dtype=None) -> NkiTensor:
    """``[P, F] -> [F, P]`` into a new PSUM tile on TensorE (same dtype)."""
    _check_tile("transpose", "x", x)
    if dtype is not None and _dt.as_dtype(dtype) != x.dtype:
        raise _err.DtypeError("nl.transpose: the TensorE transpose keeps the dtype; cast with nl.copy afterwards")
    out = ndarray((x.free_size, x.partitions), x.dtype, psum)
    _isa.nc_transpose(out, x, engine=_isa.engine.tensor)
    return out


# --------------------------------------------------------------------------- misc

def device_print(print_prefix, tensor) -> None:
    """Print ``print_prefix`` and the values of ``tensor`` to stdout, as NKI's CPU simulation does.
    The prefix is a constant string and the tensor is in SBUF or HBM (SDK language stub)."""
    _current("nl.device_print")
    if not isinstance(print_prefix, str):
        raise TypeError(f"nl.device_print: print_prefix must be a constant string, got {print_prefix!r}")
    if not isinstance(tensor, NkiTensor) or tensor.buffer is psum:
        got = tensor.describe() if isinstance(tensor, NkiTensor) else type(tensor).__name__
        raise _err.MemoryRegionError(f"nl.device_print: tensor must be in SBUF or HBM, got {got}")
    values = tensor.read("device_print", "tensor")
    builtins.print(print_prefix, values.astype(np.float32) if _dt.is_float(tensor.dtype) else values)


_bind_element_wise_api(sys.modules[__name__])   # the tensor operators (+, *, <, ...) call nl.*
