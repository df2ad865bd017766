"""LNC=2: the two program instances run concurrently (one thread each, as NKI's own simulator
does), so ``nisa.core_barrier`` and ``nisa.sendrecv`` can make them wait for each other.

A :class:`ProgramSync` belongs to one launch.  Every synchronising instruction is a rendezvous of
all programs; a program that finishes (or fails) while the other waits breaks the rendezvous with
an error naming the instruction, instead of hanging.
"""
from __future__ import annotations

import enum
import threading

import numpy as np

from .context import current
from .errors import DtypeError, KernelInterfaceError, MemoryRegionError, ShapeMismatchError, UnsupportedError
from .memory import MemoryRegion, NkiTensor


class dma_engine(enum.Enum):
    """DMA transfer engine of ``sendrecv`` (``nisa.dma_engine``)."""

    dma = 1           # shared DMA with CoreBarrier synchronisation (default)
    gpsimd_dma = 2    # GpSimd's internal DMA for low-latency SBUF-to-SBUF swaps in LNC=2


DmaEngine = dma_engine    # the class, where a parameter named dma_engine shadows it


class RendezvousBrokenError(KernelInterfaceError):
    """A program waits at a rendezvous the other program will never reach."""


class ProgramSync:
    """Rendezvous points shared by the program threads of one launch."""

    def __init__(self, num_programs: int):
        self.num_programs = num_programs
        self._cond = threading.Condition()
        self._arrived = 0
        self._generation = 0
        self._done: set[int] = set()
        self._mailbox: dict = {}

    def rendezvous(self, program_id: int, what: str) -> None:
        with self._cond:
            generation = self._generation
            self._arrived += 1
            if self._arrived == self.num_programs:
                self._arrived = 0
                self._generation += 1
                self._cond.notify_all()
                return
            while self._generation == generation:
                if self._done:
                    raise RendezvousBrokenError(
                        f"program {program_id} waits in {what}, but program(s) {sorted(self._done)} "
                        f"finished or failed without reaching it; every program must issue the same "
                        f"sequence of core_barrier / sendrecv instructions")
                self._cond.wait(timeout=0.5)

    def post(self, key, value) -> None:
        with self._cond:
            self._mailbox[key] = value

    def take(self, key):
        with self._cond:
            return self._mailbox.pop(key)

    def finished(self, program_id: int) -> None:
        with self._cond:
            self._done.add(program_id)
            self._cond.notify_all()


def _lnc_context(instr: str):
    ctx = current(f"nisa.{instr}")
    if ctx.num_programs < 2:
        raise UnsupportedError(f"{instr} synchronises the cores of a logical NeuronCore; it is only "
                               f"allowed with LNC=2 (launch the kernel as kernel[2])")
    return ctx


def core_barrier(data, cores, engine=None, name=None):
    """Wait until every core in ``cores`` (only ``(0, 1)``) reaches this barrier on ``data``
    (a shared-HBM tensor both cores write)."""
    instr = "core_barrier"
    ctx = _lnc_context(instr)
    if tuple(cores) != (0, 1):
        raise UnsupportedError(f"{instr}: cores must be (0, 1) (the only supported set), got {cores!r}")
    if not isinstance(data, NkiTensor) or data.buffer is not MemoryRegion.shared_hbm:
        raise MemoryRegionError(f"{instr}: data must be a tensor in nl.shared_hbm, got "
                                f"{data.describe() if isinstance(data, NkiTensor) else type(data).__name__}")
    ctx.run.sync.rendezvous(ctx.program_id, instr)
    ctx.cost.compute("GpSimd", instr, 1, 1, 0)


# Bytes per partition of a gpsimd_dma sendrecv, by item size.
GPSIMD_DMA_LIMIT = {4: 1024, 2: 512, 1: 256}


def sendrecv(src, dst, send_to_rank, recv_from_rank, pipe_id, dma_engine=dma_engine.dma, name=None):
    """Send ``src`` to core ``send_to_rank``'s ``dst`` while receiving core ``recv_from_rank``'s
    ``src`` into this core's ``dst``.  SBUF tiles of one dtype and shape; ranks 0 or 1."""
    instr = "sendrecv"
    ctx = _lnc_context(instr)
    for operand, t in (("src", src), ("dst", dst)):
        if not isinstance(t, NkiTensor) or t.buffer is not MemoryRegion.sbuf:
            raise MemoryRegionError(f"{instr}: {operand} must be an SBUF tile")
    if src.dtype != dst.dtype:
        raise DtypeError(f"{instr}: src dtype {src.dtype} must equal dst dtype {dst.dtype}")
    if src.shape != dst.shape:
        raise ShapeMismatchError(f"{instr}: src {src.describe()} and dst {dst.describe()} must have one shape")
    for what, rank in (("send_to_rank", send_to_rank), ("recv_from_rank", recv_from_rank)):
        if rank not in (0, 1):
            raise ValueError(f"{instr}: {what} must be 0 or 1 (the cores of one LNC=2 pair), got {rank!r}")
    if not isinstance(dma_engine, DmaEngine):
        raise TypeError(f"{instr}: dma_engine must be a nisa.dma_engine member, got {dma_engine!r}")
    if dma_engine is DmaEngine.gpsimd_dma:
        limit = GPSIMD_DMA_LIMIT[src.itemsize]
        if src.free_size * src.itemsize > limit:
            raise ShapeMismatchError(f"{instr}: dma_engine.gpsimd_dma moves at most {limit} bytes per "
                                     f"partition for {src.dtype}, {src.describe()} has "
                                     f"{src.free_size * src.itemsize}")
    sync = ctx.run.sync
    me = ctx.program_id
    counter = ctx.__dict__.setdefault("sendrecv_count", {})
    seq = counter[pipe_id] = counter.get(pipe_id, 0) + 1
    sync.post((pipe_id, seq, me), (int(send_to_rank), np.array(src.read(instr, "src"))))
    sync.rendezvous(me, f"{instr}(pipe_id={pipe_id})")
    target, values = sync.take((pipe_id, seq, int(recv_from_rank)))
    if target != me:
        raise KernelInterfaceError(f"{instr}: core {me} receives from core {recv_from_rank}, which sends to "
                                   f"core {target}")
    dst.write(values, instr)
    sync.rendezvous(me, f"{instr}(pipe_id={pipe_id}) completion")
    n = src.size * src.itemsize
    ctx.cost.dma(instr, src.size, 2 * n, 0, partitions=src.partitions, run_bytes=n / src.partitions)
