"""Partial RoPE of q, k and q | k heads (kernels/rope.py; tests/test_kernel_rope.py)."""

from __future__ import annotations

from mimo_v2_flash.selfcheck.kernels_basic import ROPE_HEADS, THETA, run_rope

from kernel_rows import basic_row

GOAL = 0.8          # of the roofline: an HBM-bound pass over q and k


def bench(token_counts):
    for tokens in token_counts:
        for which in ROPE_HEADS:
            theta = THETA["swa"] if which.endswith("swa") else THETA["full"]
            yield basic_row(f"rope_{which}", GOAL, tokens, run_rope(tokens, which, theta, zeros=True))
