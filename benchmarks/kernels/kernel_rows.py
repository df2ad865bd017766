"""What the per-kernel benchmarks share: the row every one of them yields.

A row: kernel, shapes, tokens, estimated_us (the simulator's cost model of Trainium2, an estimate,
not a measurement), roofline_us (the problem's own FLOPs and bytes, mimo_v2_flash/selfcheck), bound
("hbm" or "tensor"), goal (fraction of the roofline, or None), flops, hbm_bytes.
"""

from __future__ import annotations

import numpy as np

from mimo_v2_flash.selfcheck.kernels_basic import roofline


def kernel_row(kernel, shapes, tokens, estimated_us, roofline_us, bound, goal, flops, hbm_bytes) -> dict:
    return dict(kernel=kernel, shapes=shapes, tokens=tokens, estimated_us=estimated_us, roofline_us=roofline_us,
                bound=bound, goal=goal, flops=flops, hbm_bytes=hbm_bytes)


def basic_row(kernel, goal, tokens, run) -> dict:
    """The row of one `run_*` result of mimo_v2_flash/selfcheck/kernels_basic.py."""
    _, rep, _, flops, hbm, shapes = run
    roof, bound = roofline(flops, hbm)
    return kernel_row(kernel, shapes, tokens, rep.estimated_time_s * 1e6, roof * 1e6, bound, goal, flops, hbm)


# Attention shapes too large to simulate use a formula fitted on simulated times: each engine's
# busy time and the dependency-aware schedule's makespan (the estimate every kernel row reports).
ENGINES = ("TensorE", "VectorE", "ScalarE", "GpSimd", "DMA")
TIMES = ENGINES + ("schedule",)


def engine_times(report):
    """Per-engine busy times and the schedule's makespan [s] of a cost report, in `TIMES` order."""
    return np.array([report.engines[e].time_s for e in ENGINES] + [report.estimated_time_s])


def estimate_us(times_s):
    """The estimate of a launch from its `engine_times`: the makespan of the dependency-aware
    schedule (the busiest engine is only its perfect-overlap lower bound)."""
    return float(times_s[-1]) * 1e6


def attention_row(kernel, shapes, tokens, times_s, roof, goal, how) -> dict:
    """A row of an attention problem: `roof` = (seconds, FLOPs, HBM bytes, bound) of
    kernels_attention.roofline; `how` says whether the times were simulated or come from a formula."""
    seconds, flops, hbm, bound = roof
    return kernel_row(kernel, f"{shapes} ({how})", tokens, estimate_us(times_s), seconds * 1e6, bound, goal,
                      flops, hbm)
