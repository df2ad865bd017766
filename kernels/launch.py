"""The one launch verb of every host launcher: ``kernel[lnc](*device_tensors)``.

    from mimo_kernels.launch import launch
    out = launch(rmsnorm_kernel, x, w, eps=1e-6)                   # outputs as device tensors
    out, report = launch(rmsnorm_kernel, x, w, eps=1e-6, report=True)
    y = to_host(out)                                               # NumPy: one counted read

This is the documented PyTorch integration of NKI (Neuron SDK 2.31: torch-neuronx 2.9,
torch-xla 2.9, NKI 0.5): an ``@nki.jit`` kernel called with torch tensors on the XLA device is
traced into the step's graph and compiled with it; the grid ``[lnc]`` is the logical-NeuronCore
degree, which must equal the degree the graph is compiled and run with (``NEURON_LOGICAL_NC_CONFIG``;
trn2 defaults to 2, and a kernel launched at another degree fails with NCC_EVRF066).

At LNC=2 both physical cores run the kernel's program concurrently on shared HBM, so a kernel
must split its work by ``nl.program_id`` (the attention kernels do: ``splits_lnc=True``); the
others would race on their outputs (the expert kernel's read-modify-write of its per-token sums
gives wrong results under the simulator's concurrent programs). `launch` refuses those at LNC=2
with an error naming the kernel: until every kernel splits, run with ``NEURON_LOGICAL_NC_CONFIG=1``
(the default here; on a trn2 the runtime's default is 2, so set it).

On this CPU the same verb runs on the bundled simulator: its ``Kernel`` takes torch tensors too and
``kernel[lnc](...)`` runs every program instance, so the launch code tested here is the code a
trn2 runs. Only the placement differs (``device()``: the XLA device there, the CPU here). Cost
reports come from the bundled simulator (``report=True``); they are a test and benchmark tool.

Specializations: a jit kernel compiles once per distinct (kernel, LNC degree, argument shapes and
dtypes, compile-time arguments). ``VARIANTS`` counts those keys on every backend, so the count
measured on the simulator is the number of compilations a device would do for the same launches.

Host -> device traffic: a host array registered with ``RESIDENT`` (the kernel-layout weights, the
RoPE table, a static KV cache, the attention plan tensors of a bucket) gets its device copy once,
and every launch that receives that array passes the copy; ``RESIDENT.write`` updates a few elements
of it in place (a KV cache's new slots); a torch tensor passes through untouched; any other array is
converted at the launch. ``TRANSFERS`` counts the bytes and tensors converted, as "weights",
"kv_cache" or "plans" (registered, once) or "activations" (at a launch or an in-place write:
activations, new KV slots, block plans, small runtime tensors). On the CPU a conversion is a
zero-copy view, so the count is what a NeuronCore would upload for the same launches.

Device -> host traffic: `launch` returns its outputs as device tensors and reads nothing back, so
activations stay on the device from one launch to the next (the host launchers do their layout
work, padding, casts, reshapes, block plans, with torch operations on the device: `on_device`).
Reading back is an explicit act, `to_host`, and ``TRANSFERS`` counts one "readback" per call with
the bytes of every tensor it reads: on a NeuronCore each is a graph execution and a host round trip
(a graph break of the step). A generation step on the static-shape path reads back only its
sampled token ids (docs/device.md).
"""
from __future__ import annotations

import os
import warnings
import weakref
from dataclasses import dataclass, field

import numpy as np

from .backend import IS_SIMULATOR

LNC_ENV = "NEURON_LOGICAL_NC_CONFIG"
TRN2_DEFAULT_LNC = 2


def runtime_lnc() -> int:
    """The logical-NeuronCore degree of the runtime: ``NEURON_LOGICAL_NC_CONFIG`` (1 or 2); unset,
    trn2's default 2 on a Neuron device and 1 on the bundled simulator (module docstring)."""
    value = os.environ.get(LNC_ENV, "").strip()
    if not value:
        where = device()
        return TRN2_DEFAULT_LNC if where is not None and where.type != "cpu" else 1
    if value not in ("1", "2"):
        raise ValueError(f"{LNC_ENV}={value!r}: the logical NeuronCore degree must be 1 or 2")
    return int(value)


def device():
    """Where kernel arguments live: the XLA (NeuronCore) device when the Neuron stack is installed
    and its ``nki`` is the backend, the CPU otherwise. None when torch is not installed (the
    simulator then takes NumPy arrays)."""
    try:
        import torch
    except ImportError:
        return None
    if not IS_SIMULATOR:
        try:
            import torch_xla
            return torch_xla.device()
        except ImportError:
            pass
    return torch.device("cpu")


# ---------------------------------------------------------------------------------- variants

def _signature(value):
    """The part of an argument a compiled kernel is specialized on: shape and dtype of a tensor,
    the value of anything else (a compile-time constant)."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return ("tensor", tuple(int(s) for s in value.shape), str(value.dtype).replace("torch.", ""))
    if isinstance(value, (tuple, list)):
        return tuple(_signature(v) for v in value)
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return value


def variant_key(kernel, lnc: int, args, kwargs) -> tuple:
    """What a jit kernel is specialized (compiled) on: its name, the LNC degree, and each argument's
    signature (tensor shape and dtype; constants by value)."""
    name = getattr(kernel, "__name__", None) or getattr(kernel, "name", repr(kernel))
    return (name, int(lnc), tuple(_signature(a) for a in args),
            tuple(sorted((k, _signature(v)) for k, v in kwargs.items())))


class VariantCounter:
    """Distinct kernel specializations seen so far, with marks to count the new ones after a point
    (e.g. after warmup)."""

    def __init__(self):
        self.keys: dict[tuple, int] = {}     # key -> launches with it

    def record(self, key: tuple) -> bool:
        """Count a launch; True when its key is new (a compilation on the device)."""
        new = key not in self.keys
        self.keys[key] = self.keys.get(key, 0) + 1
        return new

    def __len__(self) -> int:
        return len(self.keys)

    def since(self, mark: int) -> list[tuple]:
        """The keys first seen after `len(counter)` was `mark` (dicts keep insertion order)."""
        return list(self.keys)[mark:]

    def by_kernel(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for key in self.keys:
            counts[key[0]] = counts.get(key[0], 0) + 1
        return counts

    def clear(self) -> None:
        self.keys.clear()


VARIANTS = VariantCounter()


# ---------------------------------------------------------------------------------- transfers

@dataclass(frozen=True)
class TransferMark:
    """`TRANSFERS` at one point (`TransferCounter.mark`): bytes and tensors per kind."""
    bytes: dict[str, int] = field(default_factory=dict)
    tensors: dict[str, int] = field(default_factory=dict)


class TransferCounter:
    """Host <-> device traffic by kind, with marks to take the traffic after a point (e.g. after
    warmup). Host -> device: "weights", "kv_cache" and "plans" (registered arrays, once),
    "activations" (converted at a launch or an in-place write); device -> host: "readback" (one
    per `to_host` call). `tensors` counts the records of each kind: arrays uploaded, reads."""

    KINDS = ("weights", "kv_cache", "plans", "activations", "readback")

    def __init__(self):
        self.bytes: dict[str, int] = {}
        self.tensors: dict[str, int] = {}

    def record(self, kind: str, nbytes: int) -> None:
        self.bytes[kind] = self.bytes.get(kind, 0) + int(nbytes)
        self.tensors[kind] = self.tensors.get(kind, 0) + 1

    def mark(self) -> TransferMark:
        """The counts so far (give it to `since`, `tensors_since`)."""
        return TransferMark(dict(self.bytes), dict(self.tensors))

    def since(self, mark: TransferMark) -> dict[str, int]:
        """Bytes per kind of `KINDS` moved after `mark` (0 when none)."""
        return {kind: self.bytes.get(kind, 0) - mark.bytes.get(kind, 0) for kind in self.KINDS}

    def tensors_since(self, mark: TransferMark, kind: str) -> int:
        """Records of `kind` after `mark` (tensors uploaded; for "readback", reads)."""
        return self.tensors.get(kind, 0) - mark.tensors.get(kind, 0)

    def clear(self) -> None:
        self.bytes.clear()
        self.tensors.clear()


TRANSFERS = TransferCounter()


class DeviceWeights:
    """Device copies of host arrays that stay on the device (weights): `resident(array)` uploads
    once and returns the array itself, which stays the handle the host launchers check and pass
    (their layout checks are NumPy); `launch` then hands the kernel the device copy. An entry
    lives as long as its host array (a weak reference; on the CPU the copy is a view made at
    each launch, so nothing here keeps the array alive)."""

    def __init__(self):
        self._entries: dict[int, tuple[weakref.ref, object]] = {}

    def resident(self, array, kind: str = "weights"):
        """Register `array` (a NumPy array; anything else is returned as is) and upload it once,
        counted in `TRANSFERS` under `kind` ("kv_cache" for a preallocated KV cache, "plans" for
        read-only attention plan tensors)."""
        if not isinstance(array, np.ndarray) or self.lookup(array) is not None:
            return array
        where = device()
        if where is None:
            return array
        tensor = to_device(array, where, kind=kind)
        key = id(array)
        self._entries[key] = (weakref.ref(array, lambda _, key=key: self._entries.pop(key, None)),
                              None if where.type == "cpu" else tensor)
        return array

    def write(self, array, index, value) -> None:
        """`array[index] = value` for a registered array, in place in its device copy: a host value
        on the host too, and only the written elements travel (counted as activations); a device
        tensor (an activation that never left the device) is written on the device only (on the
        CPU the copy is a view of the host array, which then holds it as well). Keep one advanced
        index in `index` (slices elsewhere) so NumPy and torch place the written axes alike."""
        registered = self.lookup(array) is not None
        if not registered and device() is not None:     # without torch nothing is registered
            raise ValueError(f"DeviceWeights.write: the array {array.shape} {array.dtype} is not registered")
        if is_tensor(value):
            copy = self.lookup(array)
            copy[index] = value.to(copy.dtype)
            return
        array[index] = value
        if registered:
            written = to_device(np.ascontiguousarray(array[index]))
            copy = self._entries[id(array)][1]
            if copy is not None:
                copy[index] = written

    def lookup(self, array):
        """The device copy of a registered array (on the CPU a fresh zero-copy view), else None."""
        entry = self._entries.get(id(array))
        if entry is None or entry[0]() is not array:
            return None
        return entry[1] if entry[1] is not None else to_device(array, kind=None)

    def __len__(self) -> int:
        return len(self._entries)


RESIDENT = DeviceWeights()


# ---------------------------------------------------------------------------------- tensors

def to_device(value, where=None, kind: str | None = "activations"):
    """A host array as a torch tensor on `where` (default `device()`); torch tensors and
    constants pass through. On the CPU a NumPy array becomes a zero-copy view (bf16 through its
    16-bit pattern). A converted array counts in `TRANSFERS` under `kind` (None: not counted).
    Trainium FP8 (``ml_dtypes.float8_e4m3``, +-240) has no torch dtype: it goes as a ``torch.uint8``
    tensor of the same bytes, which the kernels reinterpret (docs/device.md)."""
    if isinstance(value, tuple):
        return tuple(to_device(v, where, kind) for v in value)
    if not isinstance(value, np.ndarray):
        return value
    where = device() if where is None else where
    if where is None:
        return value
    if kind is not None:
        TRANSFERS.record(kind, value.nbytes)
    import torch
    import ml_dtypes
    if value.dtype == ml_dtypes.bfloat16:
        tensor = _from_numpy(np.ascontiguousarray(value).view(np.int16)).view(torch.bfloat16)
    elif value.dtype.itemsize == 1 and value.dtype.kind not in "biu":      # an ml_dtypes float8
        # No torch dtype holds Trainium e4m3: its bytes travel as uint8, and the kernels
        # reinterpret them (`.view(nl.float8_e4m3)` of the HBM tensor).
        tensor = _from_numpy(np.ascontiguousarray(value).view(np.uint8))
    else:
        tensor = _from_numpy(np.ascontiguousarray(value))
    return tensor if where.type == "cpu" else tensor.to(where)


def _from_numpy(array: np.ndarray):
    """torch.from_numpy, also of read-only arrays (memory-mapped weights: kernel inputs are never
    written, so the view needs no copy)."""
    import torch
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def to_host(value):
    """Device tensors, or tuples and lists holding them (and anything else, e.g. a launch's cost
    report, passed as is), with every tensor as a NumPy array (bf16 as ml_dtypes.bfloat16): the one
    way back to the host, counted in `TRANSFERS` as one "readback" with the bytes of every tensor
    read."""
    tensors = _tensors(value)
    if tensors:
        TRANSFERS.record("readback", sum(t.numel() * t.element_size() for t in tensors))
    return _numpy(value)


def is_tensor(value) -> bool:
    """True for a torch tensor (a device value), without importing torch."""
    return hasattr(value, "detach") and hasattr(value, "numel")


def _tensors(value) -> list:
    """The torch tensors of a value (nested tuples and lists)."""
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return [value] if is_tensor(value) else []


def _numpy(value):
    if isinstance(value, (tuple, list)):
        return tuple(_numpy(v) for v in value)
    if not is_tensor(value):
        return value
    import torch
    import ml_dtypes
    tensor = value.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def torch_dtype(dtype):
    """The torch dtype of a NumPy dtype (bf16 from ml_dtypes; FP8 as its uint8 bytes, `to_device`)."""
    import torch
    import ml_dtypes
    dtype = np.dtype(dtype)
    if dtype == ml_dtypes.bfloat16:
        return torch.bfloat16
    if dtype.itemsize == 1 and dtype.kind not in "biu":
        return torch.uint8
    return torch.from_numpy(np.zeros(0, dtype)).dtype


def on_device(value, dtype=None):
    """A launcher's input as a contiguous device tensor of NumPy `dtype` (default: its own): a torch
    tensor is cast on the device; a host array is cast on the host and uploaded (counted as
    activations, as at a launch)."""
    if not is_tensor(value):
        return to_device(np.ascontiguousarray(value, dtype=dtype))
    return (value if dtype is None else value.to(torch_dtype(dtype))).contiguous()


def pad_rows(tensor, rows: int, fill=0):
    """A device tensor [N, ...] with rows of `fill` appended up to `rows` (itself when N = rows)."""
    import torch
    if tensor.shape[0] == rows:
        return tensor
    return torch.cat([tensor, tensor.new_full((rows - tensor.shape[0],) + tuple(tensor.shape[1:]), fill)])


# ---------------------------------------------------------------------------------- launch

def _argument(value, where):
    """A launch argument on the device: the resident copy of a registered array, else converted."""
    if isinstance(value, tuple):
        return tuple(_argument(v, where) for v in value)
    resident = RESIDENT.lookup(value) if isinstance(value, np.ndarray) else None
    return resident if resident is not None else to_device(value, where)


class LncError(RuntimeError):
    """A kernel launched at LNC=2 without being declared to split its work between the two cores."""


def launch(kernel, *args, report: bool = False, lnc: int | None = None, splits_lnc: bool = False, **kwargs):
    """Run `kernel` as ``kernel[lnc](*device_tensors, **constants)`` and return its outputs as
    device tensors, not read back (plus the simulator's cost report, None on the device, when `report=True`).

    `lnc` defaults to `runtime_lnc()`; `splits_lnc`: the kernel divides its work by
    ``nl.program_id``, so it may run at LNC=2 (module docstring). An array registered with
    `RESIDENT` is replaced by its device copy, torch tensors pass untouched, other arrays go to
    `device()` (a zero-copy view on the CPU, counted in `TRANSFERS`); everything else is a
    compile-time constant. Every launch is counted in `VARIANTS`; reading its outputs back is the
    caller's explicit `to_host` (module docstring)."""
    lnc = runtime_lnc() if lnc is None else int(lnc)
    if lnc == 2 and not splits_lnc:
        name = getattr(kernel, "__name__", None) or getattr(kernel, "name", repr(kernel))
        raise LncError(f"{name} is not declared to split its work between the two cores of LNC=2 "
                       f"(launch(..., splits_lnc=True)); both programs would race on its outputs: run "
                       f"with {LNC_ENV}=1 until it splits (docs/device.md)")
    VARIANTS.record(variant_key(kernel, lnc, args, kwargs))
    where = device()
    grid = kernel[lnc]
    outputs = grid(*(_argument(a, where) for a in args), **{k: _argument(v, where) for k, v in kwargs.items()})
    if report:
        return outputs, getattr(grid, "last_report", None)
    return outputs


__all__ = ["DeviceWeights", "LNC_ENV", "LncError", "RESIDENT", "TRANSFERS", "TransferCounter", "TransferMark",
           "VARIANTS", "VariantCounter", "device", "is_tensor", "launch", "on_device", "pad_rows", "runtime_lnc",
           "to_device", "to_host", "torch_dtype", "variant_key"]
