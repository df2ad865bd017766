"""Kernel launch: ``nki.jit``, ``kernel[lnc]``, ``nki.simulate`` and the per-run bookkeeping.

A kernel runs eagerly on NumPy.  Array arguments become immutable HBM tensors (``nl.hbm``, or
``nl.shared_hbm`` when two program instances share them); other arguments pass through as
compile-time constants.  ``kernel[2]`` runs program 0 then program 1 (sequentially: the order is
deterministic, and both instances see the same ``nl.shared_hbm`` outputs, matched by allocation
order).  The returned ``nl.shared_hbm`` tensors come back as NumPy arrays (or torch tensors when
torch tensors went in).
"""
from __future__ import annotations

import functools
import inspect
import time

import numpy as np

from .context import ProgramContext, SimConfig, active, set_current
from .cost import Report
from .subset import check_kernel
from .errors import (KernelInterfaceError, NkiContextError, OutputBufferError, OutputNotWrittenError,
                     UnsupportedError)
from .memory import MemoryRegion, NkiTensor, wrap_input


class KernelRun:
    """State shared by the program instances of one launch."""

    def __init__(self, config: SimConfig, num_programs: int):
        self.config = config
        self.num_programs = num_programs
        self.shared: list[NkiTensor] = []
        self.rng = np.random.default_rng(0)

    def shared_hbm_tensor(self, ctx: ProgramContext, shape, dtype, name):
        """For programs > 0: the shared_hbm tensor program 0 allocated at the same position."""
        if ctx.program_id == 0:
            return None
        i = ctx.shared_hbm_count
        ctx.shared_hbm_count += 1
        if i >= len(self.shared):
            raise KernelInterfaceError(
                f"program {ctx.program_id} allocates more nl.shared_hbm tensors than program 0; all "
                f"programs must allocate the same outputs in the same order")
        t = self.shared[i]
        if t.shape != tuple(shape) or t.dtype != dtype:
            raise KernelInterfaceError(
                f"program {ctx.program_id} allocates shared_hbm #{i} as {list(shape)} {dtype}, program 0 "
                f"as {list(t.shape)} {t.dtype}")
        return t

    def register_shared_hbm(self, ctx: ProgramContext, tensor: NkiTensor) -> None:
        ctx.shared_hbm_count += 1
        self.shared.append(tensor)


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def _from_torch(x) -> np.ndarray:
    import torch
    import ml_dtypes
    x = x.detach().cpu().contiguous()
    if x.dtype == torch.bfloat16:
        return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return x.numpy()


def _to_torch(a: np.ndarray):
    import torch
    import ml_dtypes
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    if a.dtype.kind == "f" and a.dtype.itemsize == 1:
        return torch.from_numpy(a.astype(np.float32))
    return torch.from_numpy(a.copy())


class Kernel:
    """A kernel function plus its launch grid (``kernel[2]`` = two program instances, LNC=2)."""

    def __init__(self, fn, num_programs: int = 1):
        if isinstance(fn, Kernel):
            fn = fn.fn
        self.fn = fn
        self.num_programs = num_programs
        self.last_report: Report | None = None
        functools.update_wrapper(self, fn)

    @property
    def name(self) -> str:
        return getattr(self.fn, "__name__", "kernel")

    def __getitem__(self, grid) -> "Kernel":
        dims = grid if isinstance(grid, tuple) else (grid,)
        if len(dims) != 1 or not isinstance(dims[0], (int, np.integer)) or int(dims[0]) not in (1, 2):
            raise UnsupportedError(
                f"kernel[{grid!r}]: the NKI 0.6 launch grid is the logical-core degree, 1 or 2 "
                f"(kernel[2] = LNC=2); loop over other work inside the kernel")
        return Kernel(self.fn, int(dims[0]))

    def __call__(self, *args, **kwargs):
        if active() is not None:
            raise NkiContextError(f"kernel {self.name!r} is launched from inside another kernel; "
                                  f"call an undecorated helper function instead")
        return simulate(self)(*args, **kwargs)

    def __repr__(self) -> str:
        return f"Kernel({self.name}, programs={self.num_programs})"


def jit(fn=None, mode=None, platform_target=None, **kwargs):
    """``@nki.jit``: mark a kernel.  Called with NumPy arrays it runs on the simulator.

    ``mode`` is accepted and ignored (deprecated in NKI 0.3); ``platform_target`` is an error,
    as in NKI 0.3+ (use ``NEURON_PLATFORM_TARGET_OVERRIDE``); any other keyword is an error."""
    if platform_target is not None:
        raise UnsupportedError("nki.jit(platform_target=...) is an error since NKI 0.3; set the "
                               "NEURON_PLATFORM_TARGET_OVERRIDE environment variable instead")
    if kwargs:
        raise TypeError(f"nki.jit() got unexpected keyword argument(s): {', '.join(sorted(kwargs))}")
    if fn is None:
        return Kernel
    return Kernel(fn)


def simulate(kernel, report: bool = False, fp32_storage: bool | None = None,
             check_outputs_written: bool | None = None, model=None, lenient=None):
    """``nki.simulate(kernel)(*args)``: run ``kernel`` on the CPU simulator.

    Returns what the kernel returns (NumPy arrays), or ``(outputs, Report)`` when ``report=True``.
    ``fp32_storage`` stores bf16/fp16/fp8 as fp32 (default from ``NKI_SIM_FP32_STORAGE``);
    ``model`` overrides the :class:`~mimo_kernels.simulator.cost.Trn2Model` of the cost estimate.
    ``lenient`` names ambiguous rules to read leniently (``rules.AMBIGUOUS``; default from
    ``NKI_SIM_LENIENT``, else none).  The last report is also kept on ``kernel.last_report``.
    """
    k = kernel if isinstance(kernel, Kernel) else Kernel(kernel)
    config = SimConfig.from_env(fp32_storage=fp32_storage, check_outputs_written=check_outputs_written,
                                model=model, lenient=lenient)

    def run(*args, **kwargs):
        outputs, rep = _execute(k, config, args, kwargs)
        k.last_report = rep
        if isinstance(kernel, Kernel) and kernel is not k:
            kernel.last_report = rep
        return (outputs, rep) if report else outputs

    run.__name__ = f"simulate_{k.name}"
    return run


def _wrap_args(fn, args, kwargs, buffer, config):
    names = list(inspect.signature(fn).parameters)

    def wrap(value, name):
        if _is_torch(value):
            value = _from_torch(value)
        if isinstance(value, np.ndarray):
            return wrap_input(value, name, buffer, config.fp32_storage)
        if isinstance(value, list) and any(isinstance(v, np.ndarray) for v in value):
            raise KernelInterfaceError(f"kernel argument {name!r} is a list; pass a tuple of arrays")
        if isinstance(value, tuple):
            return tuple(wrap(v, f"{name}[{i}]") for i, v in enumerate(value))
        return value

    wrapped = [wrap(v, names[i] if i < len(names) else f"arg{i}") for i, v in enumerate(args)]
    wrapped_kw = {key: wrap(v, key) for key, v in kwargs.items()}
    return wrapped, wrapped_kw


def _collect(ret, config: SimConfig):
    """Returned tensors -> NumPy arrays (checks: whole shared_hbm tensors, fully written)."""
    if ret is None:
        return None
    if isinstance(ret, (tuple, list)):
        return tuple(_collect(r, config) for r in ret)
    if not isinstance(ret, NkiTensor):
        raise OutputBufferError(f"a kernel must return nl.shared_hbm tensors, got {type(ret).__name__}")
    if ret.buffer is not MemoryRegion.shared_hbm:
        raise OutputBufferError(
            f"kernel output {ret.describe()} must be allocated with buffer=nl.shared_hbm (NKI 0.3+: "
            f"outputs in {ret.buffer.value} fail to compile)")
    if not ret.is_whole:
        raise OutputBufferError(f"kernel output {ret.describe()} is a view; return the whole tensor")
    storage = ret.storage
    if config.check_outputs_written and storage.init is not None and not storage.init.all():
        missing = int(storage.init.size - np.count_nonzero(storage.init))
        first = [int(i) for i in np.argwhere(~storage.init)[0]]
        raise OutputNotWrittenError(
            f"kernel output {ret.describe()} has {missing} of {storage.init.size} elements never written "
            f"(first at {first}); on hardware they would hold garbage")
    return storage.data.copy()


def _to_user(outputs, torch_out: bool):
    if outputs is None:
        return None
    if isinstance(outputs, tuple):
        return tuple(_to_user(o, torch_out) for o in outputs)
    return _to_torch(outputs) if torch_out else outputs


def _execute(kernel: Kernel, config: SimConfig, args, kwargs):
    n = kernel.num_programs
    buffer = MemoryRegion.shared_hbm if n > 1 else MemoryRegion.hbm
    torch_out = any(_is_torch(a) for a in list(args) + list(kwargs.values()))
    check_kernel(kernel.fn, args, kwargs)
    wrapped, wrapped_kw = _wrap_args(kernel.fn, args, kwargs, buffer, config)
    run = KernelRun(config, n)
    contexts, returns = [], []
    start = time.perf_counter()
    for pid in range(n):
        ctx = ProgramContext(config, pid, n, run)
        set_current(ctx)
        try:
            returns.append(kernel.fn(*wrapped, **wrapped_kw))
        finally:
            set_current(None)
        contexts.append(ctx)
    wall = time.perf_counter() - start
    outputs = _collect(returns[0], config)
    for pid, other in enumerate(returns[1:], start=1):
        if not _same_outputs(returns[0], other):
            raise KernelInterfaceError(f"program {pid} returned different outputs than program 0; every "
                                       f"program must return the same shared_hbm tensors")
    rep = Report.build(kernel.name, [c.cost for c in contexts], [c.alloc for c in contexts], wall,
                       config.fp32_storage, config.model)
    return _to_user(outputs, torch_out), rep


def _same_outputs(a, b) -> bool:
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same_outputs(x, y) for x, y in zip(a, b))
    if isinstance(a, NkiTensor) and isinstance(b, NkiTensor):
        return a.storage is b.storage
    return a is None and b is None
