"""RMSNorm alone and fused with the residual add (kernels/rmsnorm.py; tests/test_kernel_rmsnorm.py)."""

from __future__ import annotations

from mimo_v2_flash.selfcheck.kernels_basic import run_rmsnorm

from kernel_rows import basic_row

GOAL = 0.8          # of the roofline: an HBM-bound pass over the activations


def bench(token_counts):
    for tokens in token_counts:
        yield basic_row("rmsnorm", GOAL, tokens, run_rmsnorm(tokens, False, zeros=True))
        yield basic_row("add_rmsnorm", GOAL, tokens, run_rmsnorm(tokens, True, zeros=True))
