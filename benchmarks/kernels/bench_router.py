"""The sigmoid top-8 router, fp32 (kernels/router.py; tests/test_kernel_router.py)."""

from __future__ import annotations

from mimo_kernels.router import route
from mimo_v2_flash.selfcheck.kernels_moe import (EXPERTS, HBM_BYTES_PER_S, HIDDEN, PEAK_FP32, random_router,
                                                 router_roofline_s)

from kernel_rows import kernel_row

GOAL = 0.7          # of the roofline


def bench(token_counts):
    for tokens in token_counts:
        x, gate, bias = random_router(tokens, HIDDEN, EXPERTS, seed=tokens)
        _, _, rep = route(x, gate.T, bias, report=True)
        roof, flops, hbm = router_roofline_s(tokens)
        bound = "hbm" if hbm / HBM_BYTES_PER_S >= flops / PEAK_FP32 else "tensor"
        yield kernel_row("router", f"H={HIDDEN} E={EXPERTS} fp32", tokens, rep.estimated_time_s * 1e6,
                         roof * 1e6, bound, GOAL, flops, hbm)

