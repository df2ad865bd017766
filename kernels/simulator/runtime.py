"""Kernel launch: ``nki.jit``, ``kernel[lnc]``, ``nki.simulate`` and the per-run bookkeeping.

A kernel runs eagerly on NumPy.  Array arguments become immutable HBM tensors (``nl.hbm``, or
``nl.shared_hbm`` when two program instances share them); other arguments pass through as
compile-time constants.  ``kernel[2]`` runs program 0 and program 1 concurrently, one thread each
(as NKI's simulator does, so ``core_barrier`` / ``sendrecv`` can synchronise them); both see the
same ``nl.shared_hbm`` tensors, matched by allocation order.  The returned tensors come back as
NumPy arrays (or torch tensors when torch tensors went in); inputs the kernel wrote are updated in
place in the caller's arrays, as in NKI's simulator.
"""
from __future__ import annotations

import functools
import inspect
import threading
import time

import numpy as np

from .context import ProgramContext, SimConfig, active, set_current
from .cost import Report
from .lnc import ProgramSync, RendezvousBrokenError
from .subset import check_kernel
from .errors import (KernelInterfaceError, NkiContextError, OutputBufferError, OutputNotWrittenError,
                     UnsupportedError)
from .memory import MemoryRegion, NkiTensor, wrap_input


class KernelRun:
    """State shared by the program instances of one launch."""

    def __init__(self, config: SimConfig, num_programs: int, grid_ndim: int):
        self.config = config
        self.num_programs = num_programs
        self.grid_ndim = grid_ndim          # nl.program_ndim(): 0 without a launch grid
        self.shared: list[NkiTensor] = []
        self.rng = np.random.default_rng(0)
        self.sync = ProgramSync(num_programs)
        self._lock = threading.Lock()

    def shared_hbm_tensor(self, ctx: ProgramContext, shape, dtype, name, create):
        """The i-th ``nl.shared_hbm`` allocation of a program: the tensor another program already
        made at that position (programs run concurrently), or ``create()``."""
        with self._lock:
            i = ctx.shared_hbm_count
            ctx.shared_hbm_count += 1
            if i == len(self.shared):
                self.shared.append(create())
                return self.shared[i]
            if i > len(self.shared):
                raise KernelInterfaceError(
                    f"program {ctx.program_id} allocates nl.shared_hbm #{i} out of order")
            t = self.shared[i]
            if t.shape != tuple(shape) or t.dtype != dtype:
                raise KernelInterfaceError(
                    f"program {ctx.program_id} allocates shared_hbm #{i} as {list(shape)} {dtype}, another "
                    f"program as {list(t.shape)} {t.dtype}; all programs must allocate the same outputs "
                    f"in the same order")
            return t


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

    def __init__(self, fn, num_programs: int = 1, grid_ndim: int = 0):
        if isinstance(fn, Kernel):
            fn = fn.fn
        self.fn = fn
        self.num_programs = num_programs
        self.grid_ndim = grid_ndim
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
        return Kernel(self.fn, int(dims[0]), grid_ndim=1)

    def __call__(self, *args, **kwargs):
        if active() is not None:
            raise NkiContextError(f"kernel {self.name!r} is launched from inside another kernel; "
                                  f"call an undecorated helper function instead")
        return simulate(self)(*args, **kwargs)

    def __repr__(self) -> str:
        return f"Kernel({self.name}, programs={self.num_programs})"


JIT_IGNORED_KEYWORDS = ("mode", "compile_config", "specialization_config")


def jit(fn=None, **kwargs):
    """``@nki.jit``: mark a kernel.  Called with NumPy arrays it runs on the simulator.

    Keywords the NKI docs list: ``mode`` (deprecated and ignored since NKI 0.3),
    ``compile_config`` / ``specialization_config`` (per-kernel compiler settings; accepted and
    ignored: they do not change a kernel's results).  ``platform_target`` is an error as in NKI
    0.3+ (use ``NEURON_PLATFORM_TARGET_OVERRIDE``); any other keyword is an error."""
    if kwargs.get("platform_target") is not None:
        raise UnsupportedError("nki.jit(platform_target=...) is an error since NKI 0.3; set the "
                               "NEURON_PLATFORM_TARGET_OVERRIDE environment variable instead")
    unknown = sorted(set(kwargs) - set(JIT_IGNORED_KEYWORDS) - {"platform_target"})
    if unknown:
        raise TypeError(f"nki.jit() got unexpected keyword argument(s): {', '.join(unknown)} (documented: "
                        f"{', '.join(JIT_IGNORED_KEYWORDS)})")
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
    """Kernel arguments as HBM tensors; also the (caller's array, tensor) pairs to copy back."""
    names = list(inspect.signature(fn).parameters)
    inputs = []

    def wrap(value, name):
        original = value
        if _is_torch(value):
            value = _from_torch(value)
        if isinstance(value, np.ndarray):
            tensor = wrap_input(value, name, buffer, config.fp32_storage)
            inputs.append((original, tensor))
            return tensor
        if isinstance(value, list) and any(isinstance(v, np.ndarray) for v in value):
            raise KernelInterfaceError(f"kernel argument {name!r} is a list; pass a tuple of arrays")
        if isinstance(value, tuple):
            return tuple(wrap(v, f"{name}[{i}]") for i, v in enumerate(value))
        return value

    wrapped = [wrap(v, names[i] if i < len(names) else f"arg{i}") for i, v in enumerate(args)]
    wrapped_kw = {key: wrap(v, key) for key, v in kwargs.items()}
    return wrapped, wrapped_kw, inputs


def _update_inputs(inputs) -> None:
    """Write back the inputs a kernel modified into the caller's arrays (NKI simulator semantics)."""
    for original, tensor in inputs:
        storage = tensor.storage
        if not getattr(storage, "modified", False):
            continue
        values = storage.data
        if _is_torch(original):
            original.copy_(_to_torch(values.astype(storage.dtype)))
        elif original.flags.writeable:
            np.copyto(original, values.astype(original.dtype))
        else:
            raise KernelInterfaceError(f"the kernel wrote input {tensor.describe()}, but the caller's "
                                       f"array is read-only")


def _collect(ret, config: SimConfig):
    """Returned tensors -> NumPy arrays (checks: whole shared_hbm tensors or written inputs, fully
    written).  A reshape of a whole output (same storage, every element, storage order) counts as
    the whole output and comes back in the returned shape."""
    if ret is None:
        return None
    if isinstance(ret, (tuple, list)):
        return tuple(_collect(r, config) for r in ret)
    if not isinstance(ret, NkiTensor):
        raise OutputBufferError(f"a kernel must return nl.shared_hbm tensors, got {type(ret).__name__}")
    storage = ret.storage
    if ret.buffer is not MemoryRegion.shared_hbm and not storage.is_input:
        raise OutputBufferError(
            f"kernel output {ret.describe()} must be allocated with buffer=nl.shared_hbm (NKI 0.3+: "
            f"outputs in {ret.buffer.value} fail to compile)")
    if not (ret.is_whole or _is_whole_reshape(ret)):
        raise OutputBufferError(f"kernel output {ret.describe()} is a view; return the whole tensor "
                                f"(or a reshape of it)")
    if config.check_outputs_written and storage.init is not None and not storage.init.all():
        missing = int(storage.init.size - np.count_nonzero(storage.init))
        first = [int(i) for i in np.argwhere(~storage.init)[0]]
        raise OutputNotWrittenError(
            f"kernel output {ret.describe()} has {missing} of {storage.init.size} elements never written "
            f"(first at {first}); on hardware they would hold garbage")
    return storage.data.reshape(ret.shape).copy()


def _is_whole_reshape(t: NkiTensor) -> bool:
    arr, data = t._arr, t.storage.data
    return (arr is not None and arr.size == data.size and arr.flags.c_contiguous
            and arr.__array_interface__["data"][0] == data.__array_interface__["data"][0])


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
    wrapped, wrapped_kw, inputs = _wrap_args(kernel.fn, args, kwargs, buffer, config)
    run = KernelRun(config, n, kernel.grid_ndim)
    contexts = [ProgramContext(config, pid, n, run) for pid in range(n)]
    returns, errors = [None] * n, [None] * n

    def program(pid: int) -> None:
        set_current(contexts[pid])
        try:
            returns[pid] = kernel.fn(*wrapped, **wrapped_kw)
        except BaseException as exc:   # re-raised in the caller's thread below
            errors[pid] = exc
        finally:
            set_current(None)
            run.sync.finished(pid)

    start = time.perf_counter()
    if n == 1:
        program(0)
    else:   # concurrent programs, as in NKI's simulator (core_barrier / sendrecv synchronise them)
        threads = [threading.Thread(target=program, args=(pid,), name=f"nki-program-{pid}")
                   for pid in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    wall = time.perf_counter() - start
    failures = [e for e in errors if e is not None]
    if failures:   # the root cause, not the other program's broken rendezvous
        raise next((e for e in failures if not isinstance(e, RendezvousBrokenError)), failures[0])
    outputs = _collect(returns[0], config)
    for pid, other in enumerate(returns[1:], start=1):
        if not _same_outputs(returns[0], other):
            raise KernelInterfaceError(f"program {pid} returned different outputs than program 0; every "
                                       f"program must return the same shared_hbm tensors")
    _update_inputs(inputs)
    rep = Report.build(kernel.name, [c.cost for c in contexts], [c.alloc for c in contexts], wall,
                       config.fp32_storage, config.model)
    return _to_user(outputs, torch_out), rep


def _same_outputs(a, b) -> bool:
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same_outputs(x, y) for x, y in zip(a, b))
    if isinstance(a, NkiTensor) and isinstance(b, NkiTensor):
        return a.storage is b.storage
    return a is None and b is None
