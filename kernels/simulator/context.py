"""Simulation settings and the state of the program instance that is running right now.

The simulator executes a kernel eagerly, one instruction after another, like the real NKI
simulator.  While a kernel runs, :func:`current` returns its :class:`ProgramContext`: the program
id, the cost recorder, the on-chip allocation tracker and the ScalarE accumulator registers.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import numpy as np

from ..trn2 import TRN2, Trn2Model
from .cost import CostRecorder
from .errors import CapacityError, NkiContextError


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() not in ("0", "false", "no", "off")


@dataclass(frozen=True)
class SimConfig:
    """Knobs of one simulation.

    ``fp32_storage`` stores bf16/fp16/fp8 tensors as fp32 (default from ``NKI_SIM_FP32_STORAGE``,
    or ``NKI_PRECISE_FP=0`` like the real simulator).  ``check_outputs_written`` raises when a
    returned output still has unwritten elements.
    """

    fp32_storage: bool = False
    check_outputs_written: bool = True
    model: Trn2Model = TRN2
    lenient: frozenset = frozenset()     # ambiguous rules read leniently (rules.AMBIGUOUS)

    @classmethod
    def from_env(cls, **overrides) -> "SimConfig":
        fp32 = _env_flag("NKI_SIM_FP32_STORAGE", not _env_flag("NKI_PRECISE_FP", True))
        lenient = [r.strip() for r in os.environ.get("NKI_SIM_LENIENT", "").split(",") if r.strip()]
        values = {"fp32_storage": fp32, "lenient": lenient}
        values.update({k: v for k, v in overrides.items() if v is not None})
        from .rules import AMBIGUOUS
        unknown = sorted(set(values["lenient"]) - set(AMBIGUOUS))
        if unknown:
            raise ValueError(f"lenient rules {unknown} are not switchable; only {list(AMBIGUOUS)} are "
                             f"(docs/simulator.md)")
        values["lenient"] = frozenset(values["lenient"])
        return cls(**values)


class AllocationTracker:
    """Live SBUF bytes and PSUM banks per partition of one core, with their high-water marks.

    A tensor is live from ``nl.ndarray`` until its last Python reference dies (a weakref
    finalizer frees it), which mirrors how the NKI compiler reuses the buffer of a tile that is
    allocated inside an unrolled loop body.  Rebinding a name in a loop allocates the new tile
    before the old one dies, so such a loop counts two copies (what double buffering costs too).
    """

    def __init__(self, model: Trn2Model):
        self.model = model
        self.sbuf_live = 0
        self.sbuf_peak = 0
        self.psum_live_banks = 0
        self.psum_peak_banks = 0
        self.psum_peak_bytes = 0
        self._psum_live_bytes = 0

    def allocate(self, buffer_name: str, bytes_per_partition: int, describe: str) -> None:
        if buffer_name == "sbuf":
            limit = self.model.sbuf_bytes_per_partition
            if self.sbuf_live + bytes_per_partition > limit:
                raise CapacityError(
                    f"SBUF capacity exceeded allocating {describe}: {bytes_per_partition:,} bytes "
                    f"per partition on top of {self.sbuf_live:,} live bytes > {limit:,} bytes per "
                    f"partition (trn2: 224 KiB). Free tiles (let them go out of scope) or tile smaller.")
            self.sbuf_live += bytes_per_partition
            self.sbuf_peak = max(self.sbuf_peak, self.sbuf_live)
        elif buffer_name == "psum":
            banks = -(-bytes_per_partition // self.model.psum_bank_bytes)
            if self.psum_live_banks + banks > self.model.psum_banks:
                raise CapacityError(
                    f"PSUM capacity exceeded allocating {describe}: {banks} bank(s) of 2 KiB per "
                    f"partition on top of {self.psum_live_banks} live bank(s) > "
                    f"{self.model.psum_banks} banks (16 KiB per partition).")
            self.psum_live_banks += banks
            self._psum_live_bytes += banks * self.model.psum_bank_bytes
            self.psum_peak_banks = max(self.psum_peak_banks, self.psum_live_banks)
            self.psum_peak_bytes = max(self.psum_peak_bytes, self._psum_live_bytes)

    def free(self, buffer_name: str, bytes_per_partition: int) -> None:
        if buffer_name == "sbuf":
            self.sbuf_live -= bytes_per_partition
        elif buffer_name == "psum":
            banks = -(-bytes_per_partition // self.model.psum_bank_bytes)
            self.psum_live_banks -= banks
            self._psum_live_bytes -= banks * self.model.psum_bank_bytes


class ProgramContext:
    """State of one program instance (one physical core) of a running kernel."""

    def __init__(self, config: SimConfig, program_id: int, num_programs: int, run):
        self.config = config
        self.program_id = program_id
        self.num_programs = num_programs
        self.run = run                       # the KernelRun (shared_hbm bookkeeping)
        self.cost = CostRecorder(config.model)
        self.alloc = AllocationTracker(config.model)
        # ScalarE: 128 fp32 accumulator registers, one per partition lane.
        self.scalar_acc = np.zeros((128, 1), np.float32)
        self.scalar_acc_valid = np.zeros((128, 1), bool)
        self.shared_hbm_count = 0

    @property
    def fp32_storage(self) -> bool:
        return self.config.fp32_storage


_local = threading.local()


def current(api: str = "this NKI API") -> ProgramContext:
    ctx = getattr(_local, "ctx", None)
    if ctx is None:
        raise NkiContextError(
            f"{api} was called outside a running kernel; call it inside a function run with "
            f"nki.simulate(kernel)(...) or a @nki.jit kernel")
    return ctx


def active() -> ProgramContext | None:
    return getattr(_local, "ctx", None)


def set_current(ctx: ProgramContext | None) -> None:
    _local.ctx = ctx
