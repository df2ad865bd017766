"""The documented rules the simulator enforces beyond shapes and memories, by name.

Every error raised for one of these rules ends with ``[rule NAME: SOURCE]`` so a failing kernel
points at the documentation.  Rules whose documentation is ambiguous can be switched to the
lenient reading, one by one (``simulate(kernel, lenient=("dma-transpose-2-byte",))`` or
``NKI_SIM_LENIENT=name,name``); all are strict by default.  docs/simulator.md lists them.
"""
from __future__ import annotations

from .context import active

# name -> documentation source
RULES = {
    "engine-tensor-tensor": "nki.isa.tensor_tensor: 'using Vector Engine or GpSimd Engine'",
    "engine-memset": "nki.isa.memset: 'using Vector or GpSimd Engine'",
    "gpsimd-tensor-scalar": "nki.isa.tensor_scalar: engine 'nki.isa.engine.gpsimd (only allowed for rsqrt)'",
    "activation-table": "nki.api.shared.rst 'Supported Activation Functions for NKI ISA'",
    "activation-range": "nki.api.shared.rst activation table 'Valid Input Range' (sin: no range reduction)",
    "dma-transpose-2-byte": "nki.isa.dma_transpose constraints: 'src.dtype is 2 bytes'",
    "dma-transpose-shape": "nki.isa.dma_transpose DGE constraints (source partitions, src.shape[-1] <= 128)",
    "start-partition": "trainium_inferentia2_arch.rst 'start_partition' rule",
    "engine-free-size": "trainium_inferentia2_arch.rst: free size up to 64K elements (SBUF) / 4K (PSUM)",
    "psum-accumulate-per-bank": "nki.isa.nc_matmul accumulate=None: 'first write overwrites, subsequent writes "
                                "accumulate' (read per PSUM bank)",
    "python-subset": "nki-language-guide.rst 'NKI Values' (None, bool, 32-bit int, 32-bit float, str, "
                     "tensors; tuples, lists, dicts with string keys, NKIObject classes)",
}

# Rules whose documentation is ambiguous: these may be loosened (why: docs/simulator.md).
AMBIGUOUS = ("dma-transpose-2-byte", "gpsimd-tensor-scalar", "psum-accumulate-per-bank")


def strict(rule: str) -> bool:
    """Whether ``rule`` is enforced in the running simulation (always, unless loosened)."""
    ctx = active()
    return ctx is None or rule not in ctx.config.lenient


def violation(error_class, rule: str, message: str):
    """The exception for breaking ``rule``, citing its source."""
    return error_class(f"{message} [rule {rule}: {RULES[rule]}]")
