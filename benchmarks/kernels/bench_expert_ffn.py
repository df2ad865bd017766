"""The grouped expert FFN, bf16 and FP8 (kernels/expert_ffn.py; tests/test_kernel_expert_ffn.py).

Load: expert parallelism over 32 ranks, so a rank holds 8 experts and, with T tokens per rank and
uniform routing, each of its experts gets T rows (256 experts, top-8); the rank receives 8T (token,
expert) rows as 8T tokens with one local expert each (the real figure is ~7.2T tokens with 1.1
local experts each; the kernel's cost is set by the rows).
"""

from __future__ import annotations

import numpy as np

from mimo_kernels.expert_ffn import expert_ffn
from mimo_v2_flash.selfcheck.kernels_moe import (HBM_BYTES_PER_S, HIDDEN, INTER, LOCAL_EXPERTS, PEAK_BF16,
                                                 ffn_roofline_s, random_experts)

from kernel_rows import kernel_row

GOAL = 0.8          # of the roofline


def bench(token_counts):
    for dtype in ("bf16", "fp8"):
        weights = random_experts(LOCAL_EXPERTS, HIDDEN, INTER, dtype, seed=6)
        for tokens in token_counts:
            received = LOCAL_EXPERTS * tokens            # one local expert per received token
            x = np.random.default_rng(tokens).standard_normal((received, HIDDEN)).astype(np.float32)
            ids = (np.arange(received) // tokens)[:, None]
            w = np.full((received, 1), 0.125, np.float32)
            _, rep = expert_ffn(x, ids, w, weights, report=True)
            roof, flops, hbm = ffn_roofline_s(received, received, LOCAL_EXPERTS, weights.gate.dtype.itemsize)
            bound = "hbm" if hbm / HBM_BYTES_PER_S >= flops / PEAK_BF16 else "tensor"
            yield kernel_row(f"expert_ffn_{dtype}", f"{LOCAL_EXPERTS}x{tokens} rows {HIDDEN}x{INTER}", tokens,
                             rep.estimated_time_s * 1e6, roof * 1e6, bound, GOAL, flops, hbm)

