"""The one launch verb of every host launcher: ``kernel[lnc](*device_tensors)``.

    from mimo_kernels.launch import launch
    out = launch(rmsnorm_kernel, x, w, eps=1e-6)                   # outputs as NumPy
    out, report = launch(rmsnorm_kernel, x, w, eps=1e-6, report=True)

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
"""
from __future__ import annotations

import os
import warnings

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


# ---------------------------------------------------------------------------------- tensors

def to_device(value, where=None):
    """A host array as a torch tensor on `where` (default `device()`); torch tensors and
    constants pass through. On the CPU a NumPy array becomes a zero-copy view (bf16 through its
    16-bit pattern). Trainium FP8 (``ml_dtypes.float8_e4m3``, +-240) has no torch dtype: it goes as
    a ``torch.uint8`` tensor of the same bytes, which the kernels reinterpret (docs/device.md)."""
    if isinstance(value, tuple):
        return tuple(to_device(v, where) for v in value)
    if not isinstance(value, np.ndarray):
        return value
    where = device() if where is None else where
    if where is None:
        return value
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
    """Kernel outputs (torch tensors, tuples of them) as NumPy arrays (bf16 as ml_dtypes.bfloat16)."""
    if isinstance(value, (tuple, list)):
        return tuple(to_host(v) for v in value)
    if value is None or isinstance(value, np.ndarray):
        return value
    import torch
    import ml_dtypes
    tensor = value.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


# ---------------------------------------------------------------------------------- launch

class LncError(RuntimeError):
    """A kernel launched at LNC=2 that does not split its work between the two cores."""


def launch(kernel, *args, report: bool = False, lnc: int | None = None, splits_lnc: bool = False, **kwargs):
    """Run `kernel` as ``kernel[lnc](*device_tensors, **constants)`` and return its outputs as
    NumPy arrays (plus the simulator's cost report, None on the device, when `report=True`).

    `lnc` defaults to `runtime_lnc()`; `splits_lnc`: the kernel divides its work by
    ``nl.program_id``, so it may run at LNC=2 (module docstring). Array arguments go to
    `device()` (a zero-copy view on the CPU); everything else is a compile-time constant. Every
    launch is counted in `VARIANTS`."""
    lnc = runtime_lnc() if lnc is None else int(lnc)
    if lnc == 2 and not splits_lnc:
        name = getattr(kernel, "__name__", None) or getattr(kernel, "name", repr(kernel))
        raise LncError(f"{name} does not split its work between the two cores of LNC=2 (both programs "
                       f"would race on its outputs); run with {LNC_ENV}=1 until it does (docs/device.md)")
    VARIANTS.record(variant_key(kernel, lnc, args, kwargs))
    where = device()
    grid = kernel[lnc]
    outputs = grid(*(to_device(a, where) for a in args), **{k: to_device(v, where) for k, v in kwargs.items()})
    outputs = to_host(outputs)
    if report:
        return outputs, getattr(grid, "last_report", None)
    return outputs


__all__ = ["LNC_ENV", "LncError", "VARIANTS", "VariantCounter", "device", "launch", "runtime_lnc", "to_device", "to_host",
           "variant_key"]
