"""Memories, tensors and views.

A :class:`Storage` is one allocation: a NumPy array in its storage dtype, an "initialised" mask
(so a read of never-written memory is reported precisely, for integer tensors too), and for PSUM
the matmul accumulation state.  An :class:`NkiTensor` is a view of a storage: either a NumPy view
(slicing, reshape, broadcast) or, for ``.ap()`` access patterns and indirect DMA, an array of flat
element addresses.  Views never copy data, as in NKI.

Indexing follows the NKI rules: ints, slices (any positive step; step 1 on the partition axis of
on-chip tensors), ``...`` and ``nl.ds``.  Out-of-bounds slices raise instead of clamping.  On-chip
tensors stay at least 2-D: an int on the partition axis keeps a size-1 dim, an int on a free axis
drops it unless the result would fall below 2-D.
"""
from __future__ import annotations

import enum
import itertools
import math
import weakref

import numpy as np

from ..trn2 import TRN2
from . import dtypes as dt
from .context import active
from .errors import (DtypeError, NkiContextError, MemoryRegionError, OutOfBoundsError,
                     PartitionLimitError, ShapeMismatchError, UninitializedReadError,
                     UnsupportedError)

PMAX = TRN2.partitions                # partitions of an on-chip tensor


class MemoryRegion(enum.Enum):
    """Where a tensor lives (``nl.sbuf``, ``nl.psum``, ``nl.hbm``, ...)."""

    sbuf = "sbuf"
    psum = "psum"
    hbm = "hbm"
    private_hbm = "private_hbm"
    shared_hbm = "shared_hbm"

    @property
    def on_chip(self) -> bool:
        return self in (MemoryRegion.sbuf, MemoryRegion.psum)

    @property
    def is_hbm(self) -> bool:
        return not self.on_chip

    def __repr__(self) -> str:
        return f"nl.{self.value}"


class VirtualRegister:
    """An engine register holding a runtime integer (``nisa.register_alloc``).

    Like under the real tracer frontend, a register cannot become a Python int (no ``int()``,
    ``range()`` or ``if``): use it as a loop bound (``nl.fori_loop``, ``nl.dynamic_range``), as
    ``scalar_offset`` of ``.ap()``, or as the start of ``nl.ds`` in an HBM slice.
    """

    __slots__ = ("_value", "frozen")

    def __init__(self, value=None, frozen: bool = False):
        self._value = None if value is None else int(value)
        self.frozen = frozen

    @property
    def value(self) -> int:
        if self._value is None:
            raise UninitializedReadError("read of a VirtualRegister that was never written "
                                         "(register_alloc() without a value, then no register_load/move)")
        return self._value

    def _set(self, value: int) -> None:
        if self.frozen:
            raise UnsupportedError("this VirtualRegister is a loop induction value and is read-only")
        self._value = int(value)

    def __index__(self):
        raise TypeError("a VirtualRegister holds a runtime value and cannot be used as a Python int; "
                        "use it as a loop bound, as scalar_offset of .ap(), or in nl.ds(reg, size)")

    __int__ = __index__

    def __bool__(self):
        raise TypeError("a VirtualRegister cannot be used in Python control flow; use nl.while_loop")

    def __repr__(self) -> str:
        return f"VirtualRegister({self._value})"


def runtime_int(value, what: str) -> int:
    """The integer behind an int, a VirtualRegister, or a 1x1 integer SBUF tensor."""
    if isinstance(value, VirtualRegister):
        return value.value
    if isinstance(value, NkiTensor):
        if value.size != 1:
            raise ShapeMismatchError(f"{what}: expected a 1x1 tensor, got {value.describe()}")
        return int(value.read(what, "value").reshape(-1)[0])
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{what}: expected an int or VirtualRegister, got {type(value).__name__}")
    return int(value)


class DynamicSlice:
    """``nl.ds(start, size)`` whose start is a runtime value (register or 1x1 tensor)."""

    __slots__ = ("start", "size")

    def __init__(self, start, size: int):
        self.start = start
        self.size = int(size)


_STORAGE_IDS = itertools.count()


class Storage:
    """One allocation in one memory."""

    def __init__(self, shape, dtype, buffer: MemoryRegion, name: str, fp32_storage: bool,
                 data: np.ndarray | None = None, is_input: bool = False):
        self.shape = tuple(int(s) for s in shape)
        self.dtype = dtype
        self.buffer = buffer
        self.name = name
        self.is_input = is_input
        self.uid = next(_STORAGE_IDS)
        sdtype = dt.storage_dtype(dtype, fp32_storage)
        if data is None:
            self.data = np.full(self.shape, dt.fill_value(dtype), dtype=sdtype)
            self.init = np.zeros(self.shape, bool)
        else:
            self.data = data
            self.init = None            # kernel inputs: fully initialised
        self.acc = np.zeros(self.shape, np.uint8) if buffer is MemoryRegion.psum else None
        self.partition_stride = int(np.prod(self.shape[1:], dtype=np.int64)) if len(self.shape) > 1 else 1

    @property
    def fp32_stored(self) -> bool:
        return self.data.dtype != self.dtype

    @property
    def flat(self) -> np.ndarray:
        return self.data.reshape(-1)

    def mark_initialized(self, flat_addr) -> None:
        if self.init is not None:
            self.init.reshape(-1)[flat_addr] = True


class ReinterpretedStorage(Storage):
    """The bytes of another storage seen as another dtype (``.ap(dtype=...)``).  Its
    initialised mask is derived from the parent's on every use, and writes mark the parent."""

    def __init__(self, parent: Storage, dtype):
        self.parent, self.dtype, self.buffer, self.name = parent, dtype, parent.buffer, parent.name
        self.is_input = parent.is_input
        self.uid = parent.uid               # the same memory, for the cost model's dependencies
        self._num, self._den = parent.dtype.itemsize, dtype.itemsize
        # Rows stay rows (partitions on chip, the leading dims in HBM) when the last dim's bytes
        # divide evenly; otherwise an HBM tensor is seen as one flat run of elements.
        last_bytes = parent.shape[-1] * self._num
        if last_bytes % self._den == 0:
            self.shape = parent.shape[:-1] + (last_bytes // self._den,)
        else:
            self.shape = (parent.data.nbytes // self._den,)
        self.data = parent.data.view(dtype).reshape(self.shape) if len(parent.shape) == len(self.shape) \
            else parent.data.reshape(-1).view(dtype)
        self.partition_stride = int(np.prod(self.shape[1:], dtype=np.int64)) if len(self.shape) > 1 else 1
        self.acc = None

    @property
    def init(self):
        parent = self.parent.init
        if parent is None:
            return None
        flat = parent.reshape(-1)
        if self._num >= self._den:      # each parent element covers num/den new elements
            return np.repeat(flat, self._num // self._den).reshape(self.shape)
        return flat.reshape(-1, self._den // self._num).all(axis=1).reshape(self.shape)

    def mark_initialized(self, flat_addr) -> None:
        if self.parent.init is None:
            return
        flat_addr = np.asarray(flat_addr).reshape(-1)
        if self._num >= self._den:
            self.parent.mark_initialized(flat_addr // (self._num // self._den))
        else:
            k = self._den // self._num
            self.parent.mark_initialized((flat_addr[:, None] * k + np.arange(k)).reshape(-1))


def _reinterpreted(storage: Storage, dtype, base: int):
    """(storage seen as ``dtype``, ``base`` in its elements) for ``.ap(dtype=...)``."""
    if isinstance(storage, ReinterpretedStorage):
        base, storage = base * storage.dtype.itemsize // storage.parent.dtype.itemsize, storage.parent
    if storage.fp32_stored:
        raise UnsupportedError(f"ap(dtype={dt.dtype_name(dtype)}) of {storage.name!r}: its bytes are not "
                               f"modelled in fp32-storage mode (NKI_SIM_FP32_STORAGE / NKI_PRECISE_FP=0)")
    if storage.buffer is MemoryRegion.psum and dtype.itemsize != storage.dtype.itemsize:
        raise UnsupportedError(f"ap(dtype={dt.dtype_name(dtype)}) of PSUM tensor {storage.name!r}: "
                               f"reinterpreting PSUM with another item size is not supported")
    row_bytes = (storage.partition_stride if storage.buffer.on_chip else storage.data.size) * storage.dtype.itemsize
    if row_bytes % dtype.itemsize or (base * storage.dtype.itemsize) % dtype.itemsize:
        raise ShapeMismatchError(f"ap(dtype={dt.dtype_name(dtype)}) of {storage.name!r}: the bytes per "
                                 f"{'partition' if storage.buffer.on_chip else 'tensor'} or the view start "
                                 f"are not a multiple of {dtype.itemsize}")
    return ReinterpretedStorage(storage, dtype), base * storage.dtype.itemsize // dtype.itemsize


# PSUM accumulation state per element (Storage.acc).
ACC_NONE, ACC_OPEN, ACC_READ = 0, 1, 2


def _free_bytes_per_partition(shape, dtype) -> int:
    return int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize


def allocate(shape, dtype, buffer: MemoryRegion, name: str = "", address=None) -> "NkiTensor":
    """Create a tensor (``nl.ndarray``): NaN / 4 filled, registered with the capacity tracker."""
    from .context import current
    ctx = current("nl.ndarray")
    if not isinstance(buffer, MemoryRegion):
        raise UnsupportedError(f"nl.ndarray: buffer must be a MemoryRegion such as nl.sbuf, got "
                               f"{buffer!r} (strings are rejected since NKI 0.3)")
    dtype = dt.as_dtype(dtype, f"nl.ndarray {name or ''}".strip())
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError as exc:
        raise TypeError(f"nl.ndarray: shape must be a tuple of ints, got {shape!r}") from exc
    if any(s <= 0 for s in shape):
        raise ShapeMismatchError(f"nl.ndarray {name!r}: every dimension must be positive, got {list(shape)}")
    if buffer.on_chip:
        if len(shape) < 2:
            raise ShapeMismatchError(
                f"nl.ndarray {name!r}: {buffer.value} tensors need at least 2 dims "
                f"(partition, free...), got shape {list(shape)}; use ({shape[0] if shape else 1}, 1)")
        if shape[0] > PMAX:
            raise PartitionLimitError(
                f"nl.ndarray {name!r}: partition dimension {shape[0]} of {list(shape)} in "
                f"{buffer.value} exceeds maximum {PMAX}")
    if buffer is MemoryRegion.shared_hbm:
        return ctx.run.shared_hbm_tensor(ctx, shape, dtype, name, lambda: NkiTensor._whole(
            Storage(shape, dtype, buffer, name or "tensor", ctx.fp32_storage)))
    if address is not None and buffer.on_chip:
        return _placed(ctx, shape, dtype, buffer, name, address)
    storage = Storage(shape, dtype, buffer, name or "tensor", ctx.fp32_storage)
    if buffer.on_chip:
        per_partition = _free_bytes_per_partition(shape, dtype)
        describe = f"{name or 'tensor'} {list(shape)} {dtype} in {buffer.value}"
        if buffer is MemoryRegion.psum and per_partition > ctx.config.model.psum_bank_bytes * ctx.config.model.psum_banks:
            raise PartitionLimitError(f"nl.ndarray {describe}: {per_partition} bytes per partition "
                                      f"exceeds the 16 KiB PSUM partition")
        ctx.alloc.allocate(buffer.value, per_partition, describe)
        weakref.finalize(storage, ctx.alloc.free, buffer.value, per_partition)
    return NkiTensor._whole(storage)


def _placed(ctx, shape, dtype, buffer: MemoryRegion, name: str, address) -> "NkiTensor":
    """``nl.ndarray(..., address=(partition_offset, free_offset))``: tiles placed at one address
    share one allocation (its capacity is counted once, while any of them is alive).

    Sharing is modelled for tiles of the same shape and dtype (one buffer reused, e.g. per loop
    iteration); a different shape or dtype at a live address raises, because the byte-level
    overlap of differently typed tiles is not modelled."""
    try:
        key = (buffer.value, int(address[0]), int(address[1]))
    except (TypeError, ValueError, IndexError) as exc:
        raise TypeError(f"nl.ndarray {name!r}: address must be (partition_offset, free_offset), "
                        f"got {address!r}") from exc
    if key[1] < 0 or key[1] + shape[0] > PMAX:
        raise PartitionLimitError(f"nl.ndarray {name!r}: partitions [{key[1]}, {key[1] + shape[0]}) at "
                                  f"address {address} exceed the {PMAX} partitions")
    placed = ctx.__dict__.setdefault("placed", weakref.WeakValueDictionary())
    owner = placed.get(key)
    if owner is not None:
        if owner.shape != shape or owner.dtype != dtype:
            raise UnsupportedError(
                f"nl.ndarray {name!r} {list(shape)} {dtype} at address {address} overlaps live tile "
                f"{owner.name!r} {list(owner.shape)} {owner.dtype}; sharing an address is modelled for "
                f"tiles of one shape and dtype only")
        alias = Storage.__new__(Storage)
        alias.__dict__.update(owner.__dict__)
        alias.name = name or owner.name
        alias._owner = owner            # the allocation lives while any tile at the address does
        return NkiTensor._whole(alias)
    storage = Storage(shape, dtype, buffer, name or "tensor", ctx.fp32_storage)
    per_partition = _free_bytes_per_partition(shape, dtype)
    ctx.alloc.allocate(buffer.value, per_partition, f"{name or 'tensor'} {list(shape)} {dtype} at {address}")
    weakref.finalize(storage, ctx.alloc.free, buffer.value, per_partition)
    placed[key] = storage
    return NkiTensor._whole(storage)


def wrap_input(array: np.ndarray, name: str, buffer: MemoryRegion, fp32_storage: bool) -> "NkiTensor":
    """A kernel argument: a fully initialised HBM tensor holding a copy of ``array`` (copied back
    into ``array`` after the run if the kernel wrote it)."""
    dtype = dt.as_dtype(array.dtype, f"kernel input {name!r}")
    data = np.array(array, dtype=dt.storage_dtype(dtype, fp32_storage), copy=True, order="C")
    storage = Storage(array.shape, dtype, buffer, name, fp32_storage, data=data, is_input=True)
    return NkiTensor._whole(storage)


def _squeeze_dims(shape, int_dims, on_chip):
    """Which int-indexed dims to drop (NKI rank rule)."""
    drop = list(int_dims)
    if on_chip:
        drop = [d for d in drop if d != 0]
        while drop and len(shape) - len(drop) < 2:
            drop.pop()          # keep the last int-indexed free dim as size 1
    return tuple(drop)


# The nl.* element-wise functions behind the tensor operators.  nki.language registers itself
# here when it is imported, so this module never imports the API modules built on top of it.
_ELEMENT_WISE = []


def bind_element_wise_api(module) -> None:
    _ELEMENT_WISE[:] = [module]


def _element_wise_api():
    if not _ELEMENT_WISE:
        raise NkiContextError("tensor operators need nki.language to be imported")
    return _ELEMENT_WISE[0]


def _note_access(tensor: "NkiTensor", write: bool) -> None:
    """Tell the running program's cost recorder which memory the current instruction touches."""
    ctx = active()
    if ctx is not None:
        ctx.cost.note_access(tensor.storage.uid, tensor.region(), write)


class NkiTensor:
    """A view of a :class:`Storage` (the real ``nki.language.NkiTensor``)."""

    __slots__ = ("storage", "shape", "_arr", "_init", "_acc", "_addr", "_valid", "_indirect", "_out_of_bounds",
                 "_readonly", "__weakref__")

    def __init__(self, storage, shape, arr=None, init=None, acc=None, addr=None, valid=None,
                 indirect=False, readonly=False):
        self.storage = storage
        self.shape = tuple(int(s) for s in shape)
        self._arr = arr
        self._init = init
        self._acc = acc
        self._addr = addr
        self._valid = valid
        self._indirect = indirect
        self._readonly = readonly
        self._out_of_bounds = None      # the error of a static .ap() outside its tensor (raised on access)

    @classmethod
    def _whole(cls, storage: Storage) -> "NkiTensor":
        return cls(storage, storage.shape, arr=storage.data, init=storage.init, acc=storage.acc)

    # ----------------------------------------------------------------- attributes
    @property
    def dtype(self):
        return self.storage.dtype

    @property
    def buffer(self) -> MemoryRegion:
        return self.storage.buffer

    @property
    def name(self) -> str:
        return self.storage.name

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def partitions(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def free_size(self) -> int:
        """Elements per partition (free dims flattened)."""
        return math.prod(self.shape[1:])

    @property
    def is_whole(self) -> bool:
        return (self._arr is self.storage.data) and self.shape == self.storage.shape

    def describe(self) -> str:
        return f"'{self.name}'{list(self.shape)} {self.dtype} in {self.buffer.value}"

    def __repr__(self) -> str:
        return f"NkiTensor({self.describe()})"

    def __bool__(self):
        raise UnsupportedError(f"the truth value of tensor {self.describe()} is ambiguous (tensor "
                               f"values are not known while tracing); use nl.* comparisons")

    def __len__(self):
        return self.shape[0]

    def __iter__(self):
        raise UnsupportedError("iterating over an NkiTensor is not supported; index it explicitly")

    def __setitem__(self, key, value):
        raise UnsupportedError(
            f"assignment into tensor {self.describe()} is not an NKI 0.6 instruction; write with "
            f"an explicit instruction (nisa.tensor_copy / nisa.dma_copy / nl.store / nisa.memset)")

    # ----------------------------------------------------------------- indexing
    def _views(self):
        return [a for a in (self._arr, self._init, self._acc, self._addr, self._valid)]

    def _derive(self, fn, shape, **flags) -> "NkiTensor":
        arr, init, acc, addr, valid = (None if a is None else fn(a) for a in self._views())
        view = NkiTensor(self.storage, shape, arr, init, acc, addr, valid,
                         indirect=flags.get("indirect", self._indirect),
                         readonly=flags.get("readonly", self._readonly))
        view._out_of_bounds = self._out_of_bounds
        return view

    def __getitem__(self, key) -> "NkiTensor":
        if not isinstance(key, tuple):
            key = (key,)
        if any(k is Ellipsis for k in key):
            if sum(k is Ellipsis for k in key) > 1:
                raise IndexError("an index can only have a single ellipsis ('...')")
            i = next(j for j, k in enumerate(key) if k is Ellipsis)
            fill = (slice(None),) * (self.ndim - len(key) + 1)
            key = key[:i] + fill + key[i + 1:]
        if len(key) > self.ndim:
            raise IndexError(f"too many indices for tensor {self.describe()}: {len(key)} > {self.ndim}")
        key = key + (slice(None),) * (self.ndim - len(key))
        on_chip = self.buffer.on_chip
        np_key, int_dims = [], []
        for d, k in enumerate(key):
            n = self.shape[d]
            if isinstance(k, DynamicSlice):
                if on_chip:
                    raise UnsupportedError(
                        f"dynamic nl.ds start on {self.describe()}: only HBM addresses of a DMA may "
                        f"be dynamic")
                start = runtime_int(k.start, "nl.ds start")
                if start < 0 or start + k.size > n:
                    raise OutOfBoundsError(
                        f"Out-of-bound dynamic access for tensor `{self.name}` on dimension {d}: "
                        f"index range [{start}, {start + k.size - 1}] exceed dimension size of {n}")
                np_key.append(slice(start, start + k.size))
            elif isinstance(k, slice):
                for part in (k.start, k.stop, k.step):
                    if part is not None and not isinstance(part, (int, np.integer)):
                        raise TypeError(f"slice bounds must be ints, got {part!r} (use nl.ds(register, size) "
                                        f"for a runtime start)")
                step = 1 if k.step is None else int(k.step)
                if step <= 0:
                    raise UnsupportedError(f"slice step must be positive, got {step} on dimension {d} "
                                           f"of {self.describe()}")
                start = 0 if k.start is None else int(k.start)
                stop = n if k.stop is None else int(k.stop)
                start = start + n if start < 0 else start
                stop = stop + n if stop < 0 else stop
                if start < 0 or stop > n or start > stop:
                    raise OutOfBoundsError(
                        f"Out-of-bound access for tensor `{self.name}` on dimension {d}: index range "
                        f"[{start}, {stop - 1}] exceed dimension size of {n}" if stop > n or start < 0
                        else f"Empty slice [{start}:{stop}] on dimension {d} of tensor {self.describe()}")
                if on_chip and d == 0 and step != 1:
                    raise UnsupportedError(
                        f"slice step {step} on the partition dimension of {self.describe()}: an "
                        f"instruction accesses a contiguous range of partitions")
                np_key.append(slice(start, stop, step))
            elif isinstance(k, (int, np.integer)) and not isinstance(k, (bool, np.bool_)):
                i = int(k) + n if int(k) < 0 else int(k)
                if not 0 <= i < n:
                    raise OutOfBoundsError(
                        f"Out-of-bound access for tensor `{self.name}` on dimension {d}: index {int(k)} "
                        f"exceed dimension size of {n}")
                np_key.append(slice(i, i + 1))
                int_dims.append(d)
            elif isinstance(k, NkiTensor):
                raise UnsupportedError(
                    "indexing a tensor with a tensor is legacy NKI; gather rows with "
                    "tensor.ap(pattern, vector_offset=index_tile, indirect_dim=0) in nisa.dma_copy")
            elif k is None:
                raise UnsupportedError("None / np.newaxis indexing is not supported; use .expand_dim()")
            else:
                raise TypeError(f"unsupported index {k!r} for tensor {self.describe()}")
        np_key = tuple(np_key)
        sliced_shape = [len(range(*s.indices(n))) for s, n in zip(np_key, self.shape)]
        drop = _squeeze_dims(sliced_shape, int_dims, on_chip)
        shape = [s for i, s in enumerate(sliced_shape) if i not in drop]

        def apply(a):
            v = a[np_key]
            return np.squeeze(v, axis=drop) if drop else v
        return self._derive(apply, shape)

    # ----------------------------------------------------------------- view methods
    def reshape(self, shape) -> "NkiTensor":
        """A view with another shape (same element count; on-chip: partition dim unchanged)."""
        if isinstance(shape, (int, np.integer)):
            shape = (shape,)
        shape = list(int(s) for s in shape)
        if shape.count(-1) == 1:
            known = int(np.prod([s for s in shape if s != -1], dtype=np.int64))
            shape[shape.index(-1)] = self.size // known if known else 0
        if int(np.prod(shape, dtype=np.int64)) != self.size:
            raise ShapeMismatchError(f"reshape of {self.describe()} to {shape}: element counts differ "
                                     f"({self.size} vs {int(np.prod(shape, dtype=np.int64))})")
        if self.buffer.on_chip and (len(shape) < 2 or shape[0] != self.shape[0]):
            raise ShapeMismatchError(f"reshape of on-chip {self.describe()} to {shape} must keep the "
                                     f"partition dimension {self.shape[0]} and at least 2 dims")

        def apply(a):
            try:
                return np.reshape(a, shape, copy=False)
            except ValueError as exc:
                raise UnsupportedError(f"reshape of non-contiguous view {self.describe()} to {shape} "
                                       f"would need a copy") from exc
        return self._derive(apply, shape)

    def flatten_dims(self, start: int, end: int) -> "NkiTensor":
        """Merge dims ``start..end`` (inclusive) into one."""
        shape = list(self.shape[:start]) + [int(np.prod(self.shape[start:end + 1]))] + list(self.shape[end + 1:])
        return self.reshape(shape)

    def expand_dim(self, dim: int) -> "NkiTensor":
        shape = list(self.shape)
        shape.insert(dim, 1)
        return self._derive(lambda a: np.expand_dims(a, dim), shape)

    def squeeze_dim(self, dim: int) -> "NkiTensor":
        if self.shape[dim] != 1:
            raise ShapeMismatchError(f"squeeze_dim({dim}) of {self.describe()}: dimension size is not 1")
        shape = list(self.shape)
        del shape[dim]
        if self.buffer.on_chip and (dim == 0 or len(shape) < 2):
            raise ShapeMismatchError(f"squeeze_dim({dim}) of on-chip {self.describe()} would remove the "
                                     f"partition dimension or leave fewer than 2 dims")
        return self._derive(lambda a: np.squeeze(a, axis=dim), shape)

    def permute(self, dims) -> "NkiTensor":
        dims = tuple(int(d) for d in dims)
        if sorted(dims) != list(range(self.ndim)):
            raise ShapeMismatchError(f"permute{dims} of {self.describe()}: not a permutation")
        if self.buffer.on_chip and dims[0] != 0:
            raise UnsupportedError(f"permute{dims} of on-chip {self.describe()} would move the partition "
                                   f"dimension; use nisa.nc_transpose")
        return self._derive(lambda a: np.transpose(a, dims), [self.shape[d] for d in dims])

    def select(self, dim: int, index) -> "NkiTensor":
        key = [slice(None)] * self.ndim
        key[dim] = index
        return self[tuple(key)]

    def broadcast(self, dim: int, size: int) -> "NkiTensor":
        """Repeat a size-1 dimension ``size`` times (stride 0, read-only view)."""
        if self.shape[dim] != 1:
            raise ShapeMismatchError(f"broadcast({dim}, {size}) of {self.describe()}: dim size is not 1")
        if self.buffer.on_chip and dim == 0:
            raise UnsupportedError(
                f"broadcast along the partition dim of on-chip {self.describe()}: partitions are "
                f"physical; use nl.broadcast_to (TensorE) or a DMA from HBM")
        shape = list(self.shape)
        shape[dim] = int(size)
        return self._derive(lambda a: np.broadcast_to(a, shape), shape, readonly=True)

    def broadcast_to(self, shape, dtype=None) -> "NkiTensor":
        """New SBUF tile holding this tile broadcast to ``shape`` (like ``nl.broadcast_to``)."""
        language = _element_wise_api()
        return language.broadcast_to(self, shape, dtype=dtype)

    def is_contiguous(self) -> bool:
        return self._arr is not None and self._arr.flags.c_contiguous

    def view(self, dtype) -> "NkiTensor":
        """Reinterpret the bytes as ``dtype`` (same item size only)."""
        new = dt.as_dtype(dtype, "view")
        if new.itemsize != self.dtype.itemsize or self.storage.fp32_stored or self._arr is None:
            raise UnsupportedError(f"view({new}) of {self.describe()}: only same-size reinterpretation "
                                   f"of precisely stored, non-indirect tensors is supported")
        storage = self.storage
        alias = Storage.__new__(Storage)
        alias.__dict__.update(storage.__dict__)
        alias.dtype = new
        alias.data = storage.data.view(new)
        alias._owner = storage          # keep the allocation alive while the alias lives
        return NkiTensor(alias, self.shape, self._arr.view(new), self._init, self._acc)

    def ap(self, pattern, offset: int | None = None, scalar_offset=None, vector_offset=None,
           indirect_dim: int = 0, dtype=None) -> "NkiTensor":
        """Access pattern over the underlying storage.

        Element ``[i0, i1, ...]`` of the result is storage element
        ``base + offset + sum(stride_k * i_k)`` (flat, in elements) for ``pattern = [[stride_k,
        count_k], ...]``, ``base`` being this view's first element (0 for a whole tensor; the
        documented "offset added to the view's base storage offset").  ``dtype=`` reinterprets
        the storage bytes (strides and offsets then count elements of that dtype).
        Dynamic parts (simulator semantics, see docs/simulator.md):

        * ``scalar_offset`` (int, VirtualRegister or 1x1 SBUF int tensor) adds
          ``value * stride[indirect_dim]``: a runtime start along that pattern dim.
        * ``vector_offset`` (an SBUF ``[n, 1]`` integer tile, HBM tensors only, ``indirect_dim=0``)
          replaces index ``i`` of the leading pattern dim by ``vector_offset[i]``: a row
          gather/scatter.  The leading stride given is ignored (documented): rows are
          ``prod(shape[1:])`` elements of the base tensor apart.

        For on-chip tensors the first pair is the partition dim and its stride must equal the
        number of elements per partition.  Indirect views may only be used by DMA instructions.
        """
        if self._indirect:
            raise UnsupportedError(f"ap() on the indirect view {self.describe()}: only one dynamic "
                                   f"access per tensor")
        base = self._base_offset()
        storage = self.storage
        if dtype is not None and dt.as_dtype(dtype, "ap dtype") != self.dtype:
            storage, base = _reinterpreted(storage, dt.as_dtype(dtype, "ap dtype"), base)
        try:
            pairs = [(int(s), int(c)) for s, c in pattern]
        except (TypeError, ValueError) as exc:
            raise TypeError(f"ap pattern must be [[stride, count], ...], got {pattern!r}") from exc
        if not pairs or any(c <= 0 for _, c in pairs):
            raise ShapeMismatchError(f"ap pattern {pattern!r}: counts must be positive")
        if vector_offset is not None:
            if indirect_dim != 0:
                raise UnsupportedError(f"ap with vector_offset: only indirect_dim=0 is supported (NKI "
                                       f"access-pattern guide), got {indirect_dim}")
            # The guide: the leading stride of the pattern is ignored; the hardware uses the
            # number of elements right of the leading dim of the base tensor.
            pairs[0] = (storage.partition_stride, pairs[0][1])
        shape = [c for _, c in pairs]
        if storage.buffer.on_chip:
            if pairs[0][0] != storage.partition_stride:
                raise UnsupportedError(
                    f"ap on on-chip {self.describe()}: the first pattern pair is the partition dim and "
                    f"its stride must be {storage.partition_stride} (elements per partition), got {pairs[0][0]}")
            if shape[0] > PMAX:
                raise PartitionLimitError(f"ap on {self.describe()}: partition count {shape[0]} exceeds "
                                          f"maximum {PMAX}")
            if vector_offset is not None:
                raise UnsupportedError("vector_offset is only supported on HBM tensors (indirect DMA)")
        if not 0 <= indirect_dim < len(pairs):
            raise IndexError(f"indirect_dim {indirect_dim} out of range for pattern of {len(pairs)} dims")
        addr = np.full(shape, base + (0 if offset is None else int(offset)), np.int64)
        dynamic = False
        for k, (stride, count) in enumerate(pairs):
            idx = np.arange(count, dtype=np.int64)
            if k == indirect_dim and vector_offset is not None:
                if not isinstance(vector_offset, NkiTensor) or vector_offset.buffer is not MemoryRegion.sbuf:
                    raise MemoryRegionError("ap vector_offset must be an SBUF tensor of indices")
                if not dt.is_int(vector_offset.dtype):
                    raise DtypeError(f"ap vector_offset {vector_offset.describe()} must be an integer tile")
                if vector_offset.size != count:
                    raise ShapeMismatchError(
                        f"ap vector_offset {vector_offset.describe()} holds {vector_offset.size} indices "
                        f"but pattern dim {k} has count {count}")
                idx = vector_offset.read("ap", "vector_offset").reshape(-1).astype(np.int64)
                dynamic = True
            view_shape = [1] * len(pairs)
            view_shape[k] = count
            addr = addr + stride * idx.reshape(view_shape)
        if scalar_offset is not None:
            addr = addr + pairs[indirect_dim][0] * runtime_int(scalar_offset, "ap scalar_offset")
            dynamic = True
        total = int(np.prod(storage.shape, dtype=np.int64))
        valid = (addr >= 0) & (addr < total)
        out_of_bounds = None
        if valid.all():
            valid = None
        elif not dynamic:
            # A static pattern outside the tensor is only a descriptor until an instruction uses
            # it (public kernels build such views for loop iterations they then skip): the error
            # is raised on access.
            bad = addr[~valid].reshape(-1)[0]
            out_of_bounds = (f"ap on {self.describe()}: pattern {pattern} with offset {offset} addresses "
                             f"element {bad}, outside [0, {total})")
            addr, valid = np.where(valid, addr, 0), None
        else:
            addr = np.where(valid, addr, 0)
        view = NkiTensor(storage, shape, addr=addr, valid=valid, indirect=dynamic)
        view._out_of_bounds = out_of_bounds
        return view

    def _base_offset(self) -> int:
        """Flat storage index of this view's first element."""
        if self._addr is not None:
            return int(self._addr.reshape(-1)[0]) if self._addr.size else 0
        start = self._arr.__array_interface__["data"][0] - self.storage.data.__array_interface__["data"][0]
        return int(start // self._arr.itemsize)

    # ----------------------------------------------------------------- element access (engines)
    def _check_accessible(self, instr: str, operand: str) -> None:
        if self._out_of_bounds:
            raise OutOfBoundsError(f"{instr} operand {operand}: {self._out_of_bounds}")
        if self.size == 0:
            raise ShapeMismatchError(f"{instr}: operand {operand} {self.describe()} has no elements; a "
                                     f"zero-size view (e.g. nl.ds(0, 0)) may be created but not accessed")

    def _check_readable(self, instr: str, operand: str) -> None:
        self._check_accessible(instr, operand)
        storage = self.storage
        if storage.init is None:
            return
        if self._arr is not None:
            init = self._init
        else:
            init = storage.init.reshape(-1)[self._addr]
            if self._valid is not None:
                init = init | ~self._valid
        if not init.all():
            first = tuple(int(i) for i in np.argwhere(~init)[0])
            missing = int(init.size - np.count_nonzero(init))
            raise UninitializedReadError(
                f"{instr} reads uninitialised memory: operand {operand} = {self.describe()} has "
                f"{missing} of {init.size} elements never written (first at index {list(first)} of the "
                f"view); the real simulator would read NaN/4 here")

    def read(self, instr: str, operand: str) -> np.ndarray:
        """Values of the view in storage dtype (after the initialisation check)."""
        self._check_readable(instr, operand)
        _note_access(self, write=False)
        if self._arr is not None:
            values = self._arr
        else:
            values = self.storage.flat[self._addr]
        if self._acc is not None:
            acc = self._acc
            acc[acc == ACC_OPEN] = ACC_READ
        return values

    def read_f32(self, instr: str, operand: str) -> np.ndarray:
        return dt.to_f32(self.read(instr, operand))

    def write(self, values, instr: str, operand: str = "dst", matmul: bool = False,
              mask: np.ndarray | None = None) -> None:
        """Round ``values`` once into this view's dtype and store them (only where ``mask``)."""
        self._check_accessible(instr, operand)
        storage = self.storage
        if getattr(storage, "readonly_constant", False):
            raise UnsupportedError(f"{instr}: {operand} {self.describe()} is an nl.shared_constant, "
                                   f"which kernels may not write")
        if storage.is_input:
            storage.modified = True     # copied back into the caller's array after the run
        if self._readonly:
            raise UnsupportedError(f"{instr}: {operand} {self.describe()} is a broadcast (stride-0) view "
                                   f"and cannot be written")
        _note_access(self, write=True)
        values = np.asarray(values)
        rounded = dt.round_to(values, self.dtype, storage.fp32_stored)
        state = ACC_OPEN if matmul else ACC_NONE
        if self._arr is not None and mask is None:
            self._arr[...] = rounded
            if self._init is not None:
                self._init[...] = True
            if self._acc is not None:
                self._acc[...] = state
        elif self._arr is not None:
            self._arr[mask] = np.broadcast_to(rounded, self.shape)[mask]
            if self._init is not None:
                self._init[mask] = True
            if self._acc is not None:
                self._acc[mask] = state
        else:
            addr = self._addr
            rounded = np.broadcast_to(rounded, self.shape)
            keep = self._valid
            if mask is not None:
                keep = mask if keep is None else (keep & mask)
            if keep is not None:
                addr, rounded = addr[keep], rounded[keep]
            storage.flat[addr] = rounded
            storage.mark_initialized(addr)
            if storage.acc is not None:
                storage.acc.reshape(-1)[addr] = state

    def acc_state(self) -> np.ndarray:
        """PSUM accumulation state of the view's elements (ACC_NONE / ACC_OPEN / ACC_READ)."""
        if self._arr is not None:
            return self._acc
        return self.storage.acc.reshape(-1)[self._addr]

    def region(self):
        """(first partition, last partition, first, last element offset inside a partition) the
        view touches: the unit the cost model tracks dependencies in (HBM: partition 0, flat)."""
        storage = self.storage
        stride = storage.partition_stride if storage.buffer.on_chip else storage.data.size
        if self._addr is not None:
            addr = self._addr if self._valid is None else self._addr[self._valid]
            if addr.size == 0:
                return 0, 0, 0, 0
            first, last = int(addr.min()), int(addr.max())
            rel = addr % stride
            return first // stride, last // stride, int(rel.min()), int(rel.max())
        arr = self._arr
        if arr.size == 0:
            return 0, 0, 0, 0
        item = arr.itemsize
        base = storage.data.__array_interface__["data"][0]
        ptr = arr.__array_interface__["data"][0]
        first = (ptr + sum(min(0, (n - 1) * s) for n, s in zip(arr.shape, arr.strides)) - base) // item
        last = (ptr + sum(max(0, (n - 1) * s) for n, s in zip(arr.shape, arr.strides)) - base) // item
        p0, p1 = first // stride, last // stride
        if p0 == p1:
            return p0, p1, first - p0 * stride, last - p0 * stride
        lo, hi = self.free_range()
        return p0, p1, lo, hi

    @property
    def start_partition(self) -> int:
        """The first partition an on-chip view occupies (0 for HBM)."""
        return self.region()[0] if self.buffer.on_chip else 0

    def free_range(self):
        """(first, last) element offsets inside one partition that the view touches."""
        storage = self.storage
        if self._addr is not None:
            rel = self._addr % storage.partition_stride
            return int(rel.min()), int(rel.max())
        arr = self._arr
        item = arr.itemsize
        base = storage.data.__array_interface__["data"][0]
        row = arr[0] if arr.ndim > 1 else arr
        ptr = row.__array_interface__["data"][0]
        lo = ptr + sum(min(0, (n - 1) * s) for n, s in zip(row.shape, row.strides))
        hi = ptr + sum(max(0, (n - 1) * s) for n, s in zip(row.shape, row.strides))
        first = (lo - base) // item
        p0 = first // storage.partition_stride
        return int(first - p0 * storage.partition_stride), int((hi - base) // item - p0 * storage.partition_stride)

    # Operator overloads map to the nl.* element-wise functions (same shape rules).
    def _binary(self, other, fn_name, reverse=False):
        language = _element_wise_api()
        fn = getattr(language, fn_name)
        return fn(other, self) if reverse else fn(self, other)

    def __add__(self, other): return self._binary(other, "add")
    def __radd__(self, other): return self._binary(other, "add", True)
    def __sub__(self, other): return self._binary(other, "subtract")
    def __rsub__(self, other): return self._binary(other, "subtract", True)
    def __mul__(self, other): return self._binary(other, "multiply")
    def __rmul__(self, other): return self._binary(other, "multiply", True)
    def __truediv__(self, other): return self._binary(other, "divide")
    def __rtruediv__(self, other): return self._binary(other, "divide", True)
    def __lt__(self, other): return self._binary(other, "less")
    def __le__(self, other): return self._binary(other, "less_equal")
    def __gt__(self, other): return self._binary(other, "greater")
    def __ge__(self, other): return self._binary(other, "greater_equal")
    def __and__(self, other): return self._binary(other, "bitwise_and")
    def __or__(self, other): return self._binary(other, "bitwise_or")
    def __xor__(self, other): return self._binary(other, "bitwise_xor")
    def __neg__(self):
        language = _element_wise_api()
        return language.negative(self)

    def __iadd__(self, other):
        raise UnsupportedError("in-place '+=' on a tensor is legacy NKI; use nisa.tensor_tensor(dst=t, "
                               "data1=t, data2=x, op=nl.add) or nc_matmul accumulation")

    __isub__ = __imul__ = __itruediv__ = __iadd__
    __hash__ = object.__hash__


Tensor = NkiTensor
