"""The Trainium2 (NeuronCore-v3) machine description: every hardware number the project uses.

One frozen dataclass, :class:`Trn2Model`, read by the simulator's rules and cost model, the
kernels' tile budgets and block-size choices, the self-check rooflines and the benchmarks.  Each
constant names its documentation source.  Sources (aws-neuron/aws-neuron-sdk, read at master):

* ``[T2]``   nki/guides/architecture/trainium2_arch.rst (NeuronCore-v3 engines, SBUF, DMA
  transpose, DGE, VectorE performance mode)
* ``[T1]``   nki/guides/architecture/trainium_inferentia2_arch.rst (engine cost models, tile
  sizes, start-partition rule; the NeuronCore-v2 page the trn2 page builds on)
* ``[CHIP]`` about-neuron/arch/neuron-hardware/trainium2.rst (8 cores, 2.9 TB/s HBM)
* ``[DMA]``  nki/deep-dives/nki-dma-bandwidth-guide.rst (16 engines x 23 B/ns, ~1300 ns per
  transfer, payload-size curve)
* ``[PERF]`` nki/deep-dives/nki_perf_guide.rst (8 partitions per DMA engine, 60-70 % achieved)
* ``[SHARED]`` nki/api/nki.api.shared.rst (activation table and valid input ranges, MIN_II,
  reciprocal 8N)
* ``[ISA]``  nki/api/nki/isa/__init__.py (per-instruction docstrings: dma_transpose limits,
  engines of tensor_tensor / memset / tensor_scalar)
* ``[REF]``  the project's digest /work/shared/docs/nki_reference.md (section 5.9: GpSimd ~150 +
  N cycles, from the legacy ISA page)

This module has no dependencies so that kernels can read it under the real ``nki`` as well.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Trn2Model:
    """Published Trainium2 numbers; override fields (``Trn2Model(tensor_hz=...)``) to experiment."""

    # --- on-chip memories
    partitions: int = 128                       # [T1] SBUF/PSUM partitions, TensorE rows
    sbuf_bytes_per_partition: int = 224 * 1024  # [T2] "128 partitions of 224KiB"
    psum_bank_bytes: int = 2048                 # [T1] 8 banks of 2 KiB per partition
    psum_banks: int = 8                         # [T2] "PSUM capacity remains the same at 2MiB"
    gemm_stationary_fmax: int = 128             # [T1] matmul stationary free size (M)
    gemm_moving_fmax: int = 512                 # [T1] matmul moving free size (N)
    bn_stats_fmax: int = 512                    # [T1] bn_stats input free size
    # [T1] "free dimension size can be up to 64K elements for SBUF or 4K elements for PSUM"
    # (VectorE and ScalarE instruction operands).
    engine_fmax_sbuf: int = 64 * 1024
    engine_fmax_psum: int = 4 * 1024

    # --- clocks and TensorE
    tensor_hz: float = 2.4e9                    # [T2] Compute Engine Specifications table
    vector_hz: float = 0.96e9                   # [T2]
    scalar_hz: float = 1.2e9                    # [T2]
    gpsimd_hz: float = 1.2e9                    # [T2]
    peak_flops_bf16: float = 79e12              # [T2] 79 BF16/FP16 dense TFLOPS per core
    peak_flops_fp8: float = 158e12              # [T2] 158 FP8 (double-row) TFLOPS
    peak_flops_fp32: float = 79e12 / 4          # [T2] "20 FP32" = 4 passes of the bf16 array
    fp32_matmul_passes: int = 4                 # [T2] 79 / 20 TFLOPS

    # --- instruction overheads
    min_ii_cycles: int = 64                     # [SHARED] "MIN_II is roughly 64 engine cycles"
    # [T1] VectorE cost model: "instructions ... depending on the output tile of the previous
    # instruction ... add a static instruction overhead of 100 engine cycles".
    static_overhead_cycles: int = 100
    gpsimd_fixed_cycles: int = 150              # [REF] GpSimd instruction ~150 + N cycles
    # [T1] "two input tiles ... roughly 2N cycles (example: nki.isa.tensor_tensor)".
    vector_two_input_cycles_per_elem: int = 2
    reciprocal_cycles_per_elem: int = 8         # [SHARED] VectorE reciprocal max(MIN_II, 8*N)
    # [T2] VectorE performance mode (bf16/fp16): tensor_copy / tensor_scalar 4x with SBUF
    # operands and contiguous inner dims, 2x when only one of those holds; tensor_tensor 2x when
    # both inputs are in SBUF and all operands are bf16/fp16.
    vector_fast_mode_full: int = 4
    vector_fast_mode_half: int = 2

    # --- HBM and DMA
    hbm_bytes_per_s_chip: float = 2.9e12        # [CHIP] 2.9 TB/s per Trainium2
    cores_per_chip: int = 8                     # [CHIP] 8 NeuronCore-v3
    dma_engines: int = 16                       # [DMA] "Each NeuronCore has 16 DMA engines"
    dma_engine_bytes_per_s: float = 23e9        # [DMA] TRN2 "23 B/ns" per engine (368 GB/s)
    dma_partitions_per_engine: int = 8          # [PERF] Opt #9: each of 16 transfers moves 8 partitions
    dma_fixed_s: float = 1.3e-6                 # [DMA] "~1300 ns" setup/semaphore per transfer
    # [DMA] payload-size curve: "< 256 B per partition: severely overhead-bound", ">= 2 KiB:
    # approaches peak", ">= 4 KiB: fully amortizes".  Modelled as run / (run + 256 B): 50 % at
    # 256 B, 89 % at 2 KiB, 94 % at 4 KiB.
    dma_run_overhead_bytes: int = 256
    # [PERF] "(60%+ is considered good in practice)", "achieving close 70% DMA throughput
    # utilization" with large transfers.  A named setting, printed in every report.
    dma_achieved_fraction: float = 0.7
    # [T2] "DMA transpose ... up to 90% DMA throughput utilization" (HBM -> SBUF), "SBUF2SBUF
    # transpose can achieve up to 50%"; only with "a multiple of 128 and a multiple of 16 in the
    # output SBUF partition and inner-most free dimension sizes" (else pro-rated, our reading).
    dma_transpose_rate_from_hbm: float = 0.9
    dma_transpose_rate_on_chip: float = 0.5
    dma_transpose_block: tuple = (128, 16)
    # [ISA] dma_transpose: 2-byte dtypes; hwdge 2-D source has 16 partitions, 3-/4-D source
    # partitions in {1, 2, 4, 8, 16}.
    dma_transpose_hwdge_src_partitions: tuple = (1, 2, 4, 8, 16)
    # SWDGE (indirect DMA) descriptors are written by GpSimd [T2 DGE section: software DGE
    # "occupies GpsimdE"]; cost per descriptor: one GpSimd cycle per row, our reading.
    swdge_cycles_per_descriptor: int = 1

    # --- start-partition rule [T1] "Memory layout": (max partitions, allowed starts)
    start_partitions: tuple = ((32, (0, 32, 64, 96)), (64, (0, 64)), (128, (0,)))

    # --- ScalarE activation table [SHARED] tbl-act-func: function -> valid input range
    activation_ranges: tuple = (
        ("copy", None), ("square", None), ("sigmoid", None), ("relu", None), ("prelu", None),
        ("gelu", None), ("gelu_dx", None), ("gelu_apprx_tanh", None), ("gelu_apprx_sigmoid", None),
        ("gelu_apprx_sigmoid_dx", None), ("silu", None), ("silu_dx", None), ("tanh", None),
        ("softplus", None), ("mish", None), ("erf", None), ("erf_dx", None), ("exp", None),
        ("log", (2.0 ** -64, 2.0 ** 64)), ("sin", (-math.pi, math.pi)),
        ("arctan", (-math.pi / 2, math.pi / 2)), ("sqrt", (2.0 ** -116, 2.0 ** 118)),
        ("rsqrt", (2.0 ** -87, 2.0 ** 97)), ("reciprocal", (2.0 ** -42, 2.0 ** 42)),
        ("sign", None), ("abs", None))

    @property
    def hbm_bytes_per_s_core(self) -> float:
        """HBM bandwidth of one physical core (the roofline's memory rate)."""
        return self.hbm_bytes_per_s_chip / self.cores_per_chip

    @property
    def psum_bank_fp32(self) -> int:
        return self.psum_bank_bytes // 4

    def engine_hz(self, engine: str) -> float:
        return {"TensorE": self.tensor_hz, "VectorE": self.vector_hz,
                "ScalarE": self.scalar_hz, "GpSimd": self.gpsimd_hz}[engine]

    def activation_range(self, name: str):
        """(documented, valid input range or None for all reals) of a ScalarE function."""
        for fn, valid in self.activation_ranges:
            if fn == name:
                return True, valid
        return False, None

    def allowed_start_partitions(self, partitions: int) -> tuple:
        for limit, starts in self.start_partitions:
            if partitions <= limit:
                return starts
        return ()

    def dma_engines_for(self, partitions: int) -> int:
        """DMA engines a transfer over ``partitions`` partitions uses (one per 8 partitions)."""
        return max(1, min(self.dma_engines, -(-int(partitions) // self.dma_partitions_per_engine)))

    def dma_run_efficiency(self, run_bytes: float) -> float:
        """Fraction of an engine's rate reached with contiguous runs of ``run_bytes`` per partition."""
        return run_bytes / (run_bytes + self.dma_run_overhead_bytes) if run_bytes > 0 else 1.0


TRN2 = Trn2Model()

__all__ = ["Trn2Model", "TRN2"]
