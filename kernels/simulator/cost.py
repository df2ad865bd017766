"""Cost model: what a kernel issues per engine, turned into an estimated Trainium2 time.

Every instruction the simulator executes is recorded here (engine, elements, bytes, cycles, and
which memory it read and wrote).  Every rate comes from the machine description
:mod:`mimo_kernels.trn2`, which cites its documentation source; docs/simulator.md explains the
model.  In short, per program instance (= one physical NeuronCore-v3):

* TensorE ``nc_matmul``: ``max(min(64, M), N)`` cycles at 2.4 GHz (16-bit and fp8), 4x for fp32;
  fp8 double_row contracts K=256 in the same cycles.  A transpose is a matmul with the identity.
  Matmuls tiled onto disjoint parts of the PE array (``tile_position`` / ``tile_size``) run side
  by side, as the nc_matmul docs say.
* VectorE / ScalarE: ``max(MIN_II, cycles_per_element * N)`` cycles, N = elements per partition:
  1 per element for one input, 2 for two-input VectorE instructions (``tensor_tensor``), 8 for the
  VectorE ``reciprocal``; the trn2 VectorE performance mode (bf16/fp16) divides by 4 or 2 only
  where its documented conditions hold.  An instruction that reads what the previous instruction
  of its engine wrote pays the documented static overhead (100 cycles).  GpSimd: 150 + N.
* DMA: a transfer over P partitions uses ceil(P / 8) of the 16 DMA engines (23 B/ns each), pays
  ~1.3 us of descriptor setup, and streams at ``achieved fraction x run efficiency`` of their rate,
  where the run efficiency penalises contiguous runs below 2 KiB per partition.  DMA transposes
  run at their "up to" rates only for their documented shapes.  Indirect (software-DGE) DMAs
  charge their descriptor generation to GpSimd.
* Scheduling: each instruction starts when its engine is free and the memory it reads has been
  written (read-after-write dependencies at the granularity of partition and free-offset ranges),
  so ``estimated_time_s`` includes dependency stalls.  ``overlapped_time_s`` (busiest engine,
  perfect overlap) and ``serial_time_s`` (sum of engine times) bracket it.
* Roofline: ``max(matmul FLOPs / peak, HBM bytes / HBM bandwidth)`` per core (times the LNC degree).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, asdict

from ..trn2 import TRN2, Trn2Model

ENGINES = ("TensorE", "VectorE", "ScalarE", "GpSimd", "DMA")
_WRITES_TRACKED = 256       # most recent write regions remembered per tensor
PE_BLOCK = 32               # TensorE tiling granularity (nc_matmul: 32-row / -column tiles on v3)


@dataclass
class EngineStats:
    """Totals for one engine."""

    instructions: int = 0
    elements: int = 0          # elements processed (partitions x free elements)
    bytes: int = 0             # bytes read + written by the engine
    cycles: int = 0            # engine cycles (compute engines)
    time_s: float = 0.0        # modelled busy time
    by_op: dict = field(default_factory=dict)   # instruction name -> count

    def merge(self, other: "EngineStats") -> None:
        self.instructions += other.instructions
        self.elements += other.elements
        self.bytes += other.bytes
        self.cycles += other.cycles
        self.time_s += other.time_s
        for k, v in other.by_op.items():
            self.by_op[k] = self.by_op.get(k, 0) + v


def _overlaps(a, b) -> bool:
    return a[0] <= b[1] and b[0] <= a[1] and a[2] <= b[3] and b[2] <= a[3]


class CostRecorder:
    """Accumulates and schedules the instructions of one program instance (one physical core)."""

    def __init__(self, model: Trn2Model = TRN2):
        self.model = model
        self.engines = {name: EngineStats() for name in ENGINES}
        self.matmul_flops = 0
        self.matmul_time_at_peak_s = 0.0   # sum of flops / peak(dtype), for the roofline
        self.tensor_columns = 0
        self.hbm_bytes = 0
        self.dma_bytes = 0
        self.engine_free = {name: 0.0 for name in ENGINES if name not in ("DMA", "TensorE")}
        side = model.partitions // PE_BLOCK
        self.pe_free = [0.0] * (side * side)   # TensorE: when each PE block is free
        self.tensor_issued = 0.0               # start of the last TensorE instruction (in-order issue)
        self.dma_free = [0.0] * model.dma_engines
        self.makespan = 0.0
        self._writes = {}                  # storage uid -> [(region, finish time)]
        self._last_writes = {name: [] for name in ENGINES}
        self._reads, self._written = [], []

    # ----------------------------------------------------------------- memory of the instruction
    def note_access(self, key: int, region: tuple, write: bool) -> None:
        """A read or write of ``region`` (p0, p1, lo, hi) of tensor ``key`` by the next instruction."""
        (self._written if write else self._reads).append((key, region))

    def _ready_time(self) -> float:
        ready = 0.0
        for key, region in self._reads:
            for other, finish in self._writes.get(key, ()):
                if finish > ready and _overlaps(region, other):
                    ready = finish
        return ready

    def _depends_on_previous(self, engine: str) -> bool:
        last = self._last_writes[engine]
        return any(k == key and _overlaps(r, region) for key, region in self._reads for k, r in last)

    def _retire(self, engine: str, finish: float) -> None:
        for key, region in self._written:
            entries = self._writes.setdefault(key, [])
            entries.append((region, finish))
            if len(entries) > _WRITES_TRACKED:
                del entries[0]
        self._last_writes[engine] = self._written
        self._reads, self._written = [], []
        self.makespan = max(self.makespan, finish)

    def _run(self, engine: str, duration: float) -> None:
        start = max(self.engine_free[engine], self._ready_time())
        self.engine_free[engine] = start + duration
        self._retire(engine, start + duration)

    def _count(self, engine: str, op: str, elements: int, nbytes: int) -> EngineStats:
        st = self.engines[engine]
        st.instructions += 1
        st.elements += elements
        st.bytes += nbytes
        st.by_op[op] = st.by_op.get(op, 0) + 1
        return st

    # ----------------------------------------------------------------- engines
    def compute(self, engine: str, op: str, partitions: int, free: int, nbytes: int,
                extra_cycles: int = 0, cycles_per_element: float = 1.0) -> None:
        """A VectorE / ScalarE / GpSimd instruction over ``partitions x free`` elements."""
        st = self._count(engine, op, partitions * free, nbytes)
        work = int(-(-free * cycles_per_element // 1))
        if engine == "GpSimd":
            cycles = self.model.gpsimd_fixed_cycles + work
        else:
            cycles = max(self.model.min_ii_cycles, work)
            if self._depends_on_previous(engine):
                cycles += self.model.static_overhead_cycles
        cycles += extra_cycles
        seconds = cycles / self.model.engine_hz(engine)
        st.cycles += cycles
        st.time_s += seconds
        self._run(engine, seconds)

    def matmul(self, op: str, k: int, m: int, n: int, operand_kind: str, nbytes: int,
               flops: bool = True, pe_tile=None) -> None:
        """A TensorE instruction: stationary [k, m], moving [k, n] (k = contraction rows).

        ``operand_kind`` is "fp32", "fp8" or "16bit"; double-row fp8 passes k up to 256.
        ``pe_tile`` (row0, col0, rows, cols): the PE sub-array of a tiled matmul (None: all of
        it).  Instructions issue in order; one starts when the PE blocks it uses are free, so
        matmuls on disjoint tiles run side by side.  Busy time counts the share of the array used.
        """
        st = self._count("TensorE", op, k * n, nbytes)
        cycles = max(min(self.model.min_ii_cycles, m), n)
        if operand_kind == "fp32":
            cycles *= self.model.fp32_matmul_passes
        seconds = cycles / self.model.tensor_hz
        blocks = self._pe_blocks(pe_tile)
        st.cycles += cycles
        st.time_s += seconds * len(blocks) / len(self.pe_free)
        self.tensor_columns += n
        if flops:
            f = 2 * k * m * n
            self.matmul_flops += f
            peak = {"fp32": self.model.peak_flops_fp32, "fp8": self.model.peak_flops_fp8}.get(
                operand_kind, self.model.peak_flops_bf16)
            self.matmul_time_at_peak_s += f / peak
        start = max(self.tensor_issued, max([self.pe_free[b] for b in blocks]), self._ready_time())
        for b in blocks:
            self.pe_free[b] = start + seconds
        self.tensor_issued = start
        self._retire("TensorE", start + seconds)

    def _pe_blocks(self, pe_tile) -> list:
        """Indices of the PE_BLOCK x PE_BLOCK blocks of the array a matmul occupies."""
        side = self.model.partitions // PE_BLOCK
        if pe_tile is None:
            return list(range(side * side))
        row0, col0, rows, cols = pe_tile
        return [r * side + c for r in range(row0 // PE_BLOCK, (row0 + rows) // PE_BLOCK)
                for c in range(col0 // PE_BLOCK, (col0 + cols) // PE_BLOCK)]

    def dma(self, op: str, elements: int, nbytes: int, hbm_bytes: int, partitions: int,
            run_bytes: float, rate: float = 1.0, descriptors: int = 0) -> None:
        """One DMA transfer of ``nbytes`` (``hbm_bytes`` of them in HBM) over ``partitions``
        partitions with contiguous runs of ``run_bytes`` per partition, at ``rate`` x the DMA
        rate (transposes).  ``descriptors`` > 0: software DGE, whose descriptors GpSimd writes."""
        model = self.model
        if descriptors:
            reads, self._reads = self._reads, []
            written, self._written = self._written, []
            self.compute("GpSimd", f"{op}(swdge descriptors)", 1, descriptors, 0,
                         cycles_per_element=model.swdge_cycles_per_descriptor)
            self._reads, self._written = reads, written
        st = self._count("DMA", op, elements, nbytes)
        used = model.dma_engines_for(partitions)
        bandwidth = (used * model.dma_engine_bytes_per_s * model.dma_achieved_fraction
                     * model.dma_run_efficiency(run_bytes) * rate)
        seconds = model.dma_fixed_s + nbytes / bandwidth
        st.time_s += seconds * used / model.dma_engines     # busy share of the 16 engines
        self.dma_bytes += nbytes
        self.hbm_bytes += hbm_bytes
        order = sorted(range(len(self.dma_free)), key=self.dma_free.__getitem__)[:used]
        after = self.engine_free["GpSimd"] if descriptors else 0.0
        start = max(max(self.dma_free[i] for i in order), self._ready_time(), after)
        for i in order:
            self.dma_free[i] = start + seconds
        self._retire("DMA", start + seconds)

    # ----------------------------------------------------------------- totals
    def engine_times(self) -> dict:
        return {name: st.time_s for name, st in self.engines.items()}

    def estimate_s(self) -> float:
        """Makespan of the dependency-aware schedule."""
        return self.makespan

    def overlapped_s(self) -> float:
        """Busiest engine's time: the estimate if every instruction overlapped perfectly."""
        return max(self.engine_times().values())

    def serial_s(self) -> float:
        return sum(self.engine_times().values())


@dataclass
class Report:
    """What ``simulate(kernel, report=True)`` returns next to the outputs.

    All times are model estimates for Trainium2, not measurements.  ``str(report)`` is a table;
    ``report.to_dict()`` / ``report.to_json()`` give the same numbers for files.
    """

    kernel: str
    num_programs: int
    engines: dict                      # engine -> EngineStats (summed over program instances)
    estimated_time_s: float            # max over program instances of their dependency-aware schedule
    overlapped_time_s: float           # max over instances of the busiest engine (perfect overlap)
    serial_time_s: float               # max over instances of the sum of engine times (upper bound)
    busiest_engine: str
    matmul_flops: int
    tensor_columns: int
    hbm_bytes: int
    dma_bytes: int
    roofline_time_s: float
    roofline_compute_s: float
    roofline_memory_s: float
    roofline_bound: str                # "compute" or "memory"
    sbuf_peak_bytes_per_partition: int
    sbuf_capacity_bytes_per_partition: int
    psum_peak_banks: int
    psum_peak_bytes_per_partition: int
    psum_capacity_banks: int
    instructions: int
    wall_time_s: float
    fp32_storage: bool
    model: dict

    @classmethod
    def build(cls, kernel: str, recorders: list, trackers: list, wall_time_s: float,
              fp32_storage: bool, model: Trn2Model = TRN2) -> "Report":
        engines = {name: EngineStats() for name in ENGINES}
        for rec in recorders:
            for name, st in rec.engines.items():
                engines[name].merge(st)
        n = max(1, len(recorders))
        estimates = [rec.estimate_s() for rec in recorders] or [0.0]
        serials = [rec.serial_s() for rec in recorders] or [0.0]
        overlapped = [rec.overlapped_s() for rec in recorders] or [0.0]
        slowest = recorders[estimates.index(max(estimates))] if recorders else None
        times = slowest.engine_times() if slowest else {e: 0.0 for e in ENGINES}
        busiest = max(times, key=times.get)
        flops = sum(r.matmul_flops for r in recorders)
        hbm = sum(r.hbm_bytes for r in recorders)
        compute_s = sum(r.matmul_time_at_peak_s for r in recorders) / n
        memory_s = hbm / (model.hbm_bytes_per_s_core * n)
        return cls(
            kernel=kernel, num_programs=len(recorders), engines=engines,
            estimated_time_s=max(estimates), overlapped_time_s=max(overlapped),
            serial_time_s=max(serials), busiest_engine=busiest,
            matmul_flops=flops, tensor_columns=sum(r.tensor_columns for r in recorders),
            hbm_bytes=hbm, dma_bytes=sum(r.dma_bytes for r in recorders),
            roofline_time_s=max(compute_s, memory_s), roofline_compute_s=compute_s,
            roofline_memory_s=memory_s,
            roofline_bound="compute" if compute_s >= memory_s else "memory",
            sbuf_peak_bytes_per_partition=max((t.sbuf_peak for t in trackers), default=0),
            sbuf_capacity_bytes_per_partition=model.sbuf_bytes_per_partition,
            psum_peak_banks=max((t.psum_peak_banks for t in trackers), default=0),
            psum_peak_bytes_per_partition=max((t.psum_peak_bytes for t in trackers), default=0),
            psum_capacity_banks=model.psum_banks,
            instructions=sum(st.instructions for st in engines.values()),
            wall_time_s=wall_time_s, fp32_storage=fp32_storage, model=asdict(model))

    @property
    def efficiency(self) -> float:
        """Roofline time / estimated time (1.0 = at the roofline)."""
        return self.roofline_time_s / self.estimated_time_s if self.estimated_time_s else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["engines"] = {name: asdict(st) for name, st in self.engines.items()}
        d["efficiency"] = self.efficiency
        return d

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def __str__(self) -> str:
        def us(s: float) -> str:
            return f"{s * 1e6:,.2f}"

        lines = [f"NKI simulator report: {self.kernel} (programs={self.num_programs}; "
                 f"times are Trainium2 model estimates, not measurements)",
                 f"{'engine':<8} {'instr':>8} {'elements':>14} {'bytes':>14} {'cycles':>12} {'time us':>12}"]
        for name, st in self.engines.items():
            lines.append(f"{name:<8} {st.instructions:>8,} {st.elements:>14,} {st.bytes:>14,} "
                         f"{st.cycles:>12,} {us(st.time_s):>12}")
        lines += [
            f"estimated time      {us(self.estimated_time_s)} us with dependency stalls (busiest: "
            f"{self.busiest_engine}; perfect overlap {us(self.overlapped_time_s)} us, serial "
            f"{us(self.serial_time_s)} us)",
            f"DMA achieved        {self.model['dma_achieved_fraction']:.0%} of the DMA engines' rate "
            f"(Trn2Model.dma_achieved_fraction)",
            f"roofline time       {us(self.roofline_time_s)} us ({self.roofline_bound}-bound: "
            f"compute {us(self.roofline_compute_s)} us, memory {us(self.roofline_memory_s)} us); "
            f"efficiency {self.efficiency:.1%}",
            f"matmul FLOPs        {self.matmul_flops:,} ({self.tensor_columns:,} TensorE columns)",
            f"HBM bytes           {self.hbm_bytes:,}",
            f"SBUF peak           {self.sbuf_peak_bytes_per_partition:,} / "
            f"{self.sbuf_capacity_bytes_per_partition:,} bytes per partition",
            f"PSUM peak           {self.psum_peak_banks} / {self.psum_capacity_banks} banks "
            f"({self.psum_peak_bytes_per_partition:,} bytes per partition)",
            f"simulated           {self.instructions:,} instructions in {self.wall_time_s:.3f} s wall"
            + (" (fp32 storage)" if self.fp32_storage else ""),
        ]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"Report(kernel={self.kernel!r}, estimated_time_s={self.estimated_time_s:.3e}, "
                f"roofline_time_s={self.roofline_time_s:.3e}, instructions={self.instructions})")


__all__ = ["ENGINES", "Trn2Model", "TRN2", "EngineStats", "CostRecorder", "Report"]
