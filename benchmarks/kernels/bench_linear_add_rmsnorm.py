"""o_proj + residual add + post-attention norm, one launch (kernels/linear_add_rmsnorm.py;
tests/test_kernel_linear_add_rmsnorm.py). Weight-streaming at decode, so the projection goal."""

from __future__ import annotations

from mimo_v2_flash.selfcheck.kernels_basic import PROJECTIONS, prepared_weight, run_linear_add_rmsnorm

from bench_linear import GOAL
from kernel_rows import basic_row


def bench(token_counts):
    weight = prepared_weight(*PROJECTIONS["o"], "bf16", seed=0, zeros=True)
    for tokens in token_counts:
        yield basic_row("linear_add_rmsnorm_o_bf16", GOAL, tokens,
                        run_linear_add_rmsnorm(tokens, zeros=True, weight=weight))

