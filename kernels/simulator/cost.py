"""Cost model: what a kernel issues per engine, turned into an estimated Trainium2 time.

Every instruction the simulator executes is recorded here (engine, elements, bytes, cycles).
The numbers are a *model* built from published rates (nki_reference.md section 6), not a
measurement; docs/simulator.md explains each assumption.  In short, per program instance
(= one physical NeuronCore-v3):

* TensorE  ``nc_matmul``: ``max(min(64, M), N)`` cycles at 2.4 GHz for 16-bit and fp8 operands
  (one moving column per cycle, 64-cycle minimum initiation interval), 4x that for fp32 operands.
  fp8 with ``perf_mode=double_row`` contracts K=256 rows in the same cycles: twice the FLOPs.
  A TensorE transpose of ``[P, F]`` is a matmul with the identity: ``max(min(64, F), P)`` cycles.
* VectorE (0.96 GHz), ScalarE (1.2 GHz), GpSimd (1.2 GHz): ``fixed + N`` cycles, N = elements per
  partition (one element per partition lane per cycle), fixed = 64 cycles (VectorE/ScalarE,
  the documented minimum initiation interval) or 150 cycles (GpSimd start-up).
* DMA: ``bytes / (2.9 TB/s / 8)`` (HBM bandwidth of one physical core) plus a 2 us fixed cost per
  DMA instruction, amortised over 16 DMA queues (``2 us / 16`` each).
* Engines run concurrently: ``estimate = max(engine times) + 2 us`` (the latency of the first DMA
  that nothing can hide).  ``serial`` (sum of engine times) is reported as an upper bound.
* LNC=2 (``kernel[2]``) runs two physical cores in parallel: the estimate is the slower instance.
* Roofline: ``max(matmul FLOPs / peak, HBM bytes / bandwidth)`` with 79 TFLOPS bf16/fp16,
  158 TFLOPS fp8, 79/4 TFLOPS fp32 per core and 362.5 GB/s per core (times the LNC degree).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, asdict

ENGINES = ("TensorE", "VectorE", "ScalarE", "GpSimd", "DMA")


@dataclass(frozen=True)
class Trn2Model:
    """Published Trainium2 (NeuronCore-v3) numbers the estimate uses; override to experiment."""

    tensor_hz: float = 2.4e9
    vector_hz: float = 0.96e9
    scalar_hz: float = 1.2e9
    gpsimd_hz: float = 1.2e9
    min_ii_cycles: int = 64            # minimum initiation interval (TensorE/VectorE/ScalarE)
    gpsimd_fixed_cycles: int = 150     # GpSimd instruction start-up
    hbm_bytes_per_s_chip: float = 2.9e12
    cores_per_chip: int = 8
    dma_fixed_s: float = 2e-6          # fixed cost of one DMA instruction (descriptor + latency)
    dma_queues: int = 16               # DMA queues per core the fixed cost is spread over
    # DMA transposes run below the DMA rate: "HBM->SBUF up to 90% DMA throughput, SBUF->SBUF up
    # to 50%" (trn2 architecture guide); the estimate takes these upper bounds as the rates.
    dma_transpose_rate_from_hbm: float = 0.9
    dma_transpose_rate_on_chip: float = 0.5
    peak_flops_bf16: float = 79e12
    peak_flops_fp8: float = 158e12
    peak_flops_fp32: float = 79e12 / 4
    sbuf_bytes_per_partition: int = 224 * 1024
    psum_bank_bytes: int = 2048
    psum_banks: int = 8

    @property
    def hbm_bytes_per_s_core(self) -> float:
        return self.hbm_bytes_per_s_chip / self.cores_per_chip

    def engine_hz(self, engine: str) -> float:
        return {"TensorE": self.tensor_hz, "VectorE": self.vector_hz,
                "ScalarE": self.scalar_hz, "GpSimd": self.gpsimd_hz}[engine]

    def fixed_cycles(self, engine: str) -> int:
        return self.gpsimd_fixed_cycles if engine == "GpSimd" else self.min_ii_cycles


TRN2 = Trn2Model()


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


class CostRecorder:
    """Accumulates the instructions of one program instance (one physical core)."""

    def __init__(self, model: Trn2Model = TRN2):
        self.model = model
        self.engines = {name: EngineStats() for name in ENGINES}
        self.matmul_flops = 0
        self.matmul_time_at_peak_s = 0.0   # sum of flops / peak(dtype), for the roofline
        self.tensor_columns = 0
        self.hbm_bytes = 0
        self.dma_bytes = 0

    def _count(self, engine: str, op: str, elements: int, nbytes: int) -> EngineStats:
        st = self.engines[engine]
        st.instructions += 1
        st.elements += elements
        st.bytes += nbytes
        st.by_op[op] = st.by_op.get(op, 0) + 1
        return st

    def compute(self, engine: str, op: str, partitions: int, free: int, nbytes: int,
                extra_cycles: int = 0) -> None:
        """A VectorE / ScalarE / GpSimd instruction over ``partitions x free`` elements."""
        st = self._count(engine, op, partitions * free, nbytes)
        cycles = self.model.fixed_cycles(engine) + free + extra_cycles
        st.cycles += cycles
        st.time_s += cycles / self.model.engine_hz(engine)

    def matmul(self, op: str, k: int, m: int, n: int, operand_kind: str, nbytes: int,
               flops: bool = True) -> None:
        """A TensorE instruction: stationary [k, m], moving [k, n] (k = contraction rows).

        ``operand_kind`` is "fp32", "fp8" or "16bit"; double-row fp8 passes k up to 256.
        """
        st = self._count("TensorE", op, k * n, nbytes)
        cycles = max(min(self.model.min_ii_cycles, m), n)
        if operand_kind == "fp32":
            cycles *= 4
        st.cycles += cycles
        st.time_s += cycles / self.model.tensor_hz
        self.tensor_columns += n
        if flops:
            f = 2 * k * m * n
            self.matmul_flops += f
            peak = {"fp32": self.model.peak_flops_fp32, "fp8": self.model.peak_flops_fp8}.get(
                operand_kind, self.model.peak_flops_bf16)
            self.matmul_time_at_peak_s += f / peak

    def dma(self, op: str, elements: int, nbytes: int, hbm_bytes: int, rate: float = 1.0) -> None:
        """One DMA of `nbytes` (of which `hbm_bytes` touch HBM) at `rate` x the DMA bandwidth."""
        st = self._count("DMA", op, elements, nbytes)
        st.time_s += nbytes / (rate * self.model.hbm_bytes_per_s_core) + \
            self.model.dma_fixed_s / self.model.dma_queues
        self.dma_bytes += nbytes
        self.hbm_bytes += hbm_bytes

    def engine_times(self) -> dict:
        return {name: st.time_s for name, st in self.engines.items()}

    def estimate_s(self) -> float:
        times = self.engine_times()
        busiest = max(times.values())
        latency = self.model.dma_fixed_s if self.engines["DMA"].instructions else 0.0
        return busiest + latency

    def serial_s(self) -> float:
        latency = self.model.dma_fixed_s if self.engines["DMA"].instructions else 0.0
        return sum(self.engine_times().values()) + latency


@dataclass
class Report:
    """What ``simulate(kernel, report=True)`` returns next to the outputs.

    All times are model estimates for Trainium2, not measurements.  ``str(report)`` is a table;
    ``report.to_dict()`` / ``report.to_json()`` give the same numbers for files.
    """

    kernel: str
    num_programs: int
    engines: dict                      # engine -> EngineStats (summed over program instances)
    estimated_time_s: float            # max over program instances of their overlapped estimate
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
        slowest = recorders[estimates.index(max(estimates))] if recorders else None
        times = slowest.engine_times() if slowest else {e: 0.0 for e in ENGINES}
        busiest = max(times, key=times.get)
        flops = sum(r.matmul_flops for r in recorders)
        hbm = sum(r.hbm_bytes for r in recorders)
        compute_s = sum(r.matmul_time_at_peak_s for r in recorders) / n
        memory_s = hbm / (model.hbm_bytes_per_s_core * n)
        return cls(
            kernel=kernel, num_programs=len(recorders), engines=engines,
            estimated_time_s=max(estimates), serial_time_s=max(serials), busiest_engine=busiest,
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
            f"estimated time      {us(self.estimated_time_s)} us (busiest: {self.busiest_engine}; "
            f"serial bound {us(self.serial_time_s)} us)",
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
