"""The projections q, k, v, o, q|k|v and lm_head, bf16 and FP8 (kernels/linear.py;
tests/test_kernel_linear.py).

lm_head at more than 512 tokens is extrapolated linearly in N from two column slices (its 298
column groups of 512 repeat the same instructions); such rows say so in `shapes`.
"""

from __future__ import annotations

import numpy as np

from mimo_kernels.linear import linear
from mimo_v2_flash.selfcheck.kernels_basic import (BF16, FP8_PROJECTIONS, HIDDEN, PROJECTIONS, VOCAB,
                                                   prepared_weight, roofline, run_linear)

from kernel_rows import basic_row, kernel_row

GOAL = 0.7          # of the roofline, for every weight-streaming projection (also the fused kernels')
LM_HEAD_FULL_MAX_TOKENS = 512
LM_HEAD_SLICES = (8192, 16384)


def lm_head_extrapolated(tokens):
    """lm_head at `tokens`, its estimate extrapolated linearly in N from two column slices."""
    estimates = []
    for n in LM_HEAD_SLICES:
        w = np.zeros((HIDDEN, n), BF16)
        _, rep = linear(np.zeros((tokens, HIDDEN), BF16), w, report=True)
        estimates.append(rep.estimated_time_s)
    (n1, n2), (e1, e2) = LM_HEAD_SLICES, estimates
    estimate = e1 + (e2 - e1) * (VOCAB - n1) / (n2 - n1)
    k, n = PROJECTIONS["lm_head"]
    flops, hbm = 2 * tokens * k * n, tokens * (k + n) * 2 + k * n * 2
    roof, bound = roofline(flops, hbm)
    return kernel_row("linear_lm_head_bf16", f"{k}->{n} bf16 (extrapolated from N={n1},{n2})", tokens,
                      estimate * 1e6, roof * 1e6, bound, GOAL, flops, hbm)


def bench(token_counts):
    for name, (k, n) in PROJECTIONS.items():
        for dtype in ("bf16", "fp8") if name in FP8_PROJECTIONS else ("bf16",):
            weight = prepared_weight(k, n, dtype, seed=0, zeros=True)
            for tokens in token_counts:
                if name == "lm_head" and tokens > LM_HEAD_FULL_MAX_TOKENS:
                    yield lm_head_extrapolated(tokens)
                else:
                    yield basic_row(f"linear_{name}_{dtype}", GOAL, tokens,
                                    run_linear(tokens, name, dtype, zeros=True, weight=weight))

