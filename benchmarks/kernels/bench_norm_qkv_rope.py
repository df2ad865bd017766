"""The decoder layer's input norm + q|k|v projection + RoPE, one launch, per layer kind and weight
dtype (kernels/norm_qkv_rope.py; tests/test_kernel_norm_qkv_rope.py). Weight-streaming at decode,
so the projection goal."""

from __future__ import annotations

from mimo_v2_flash.selfcheck.kernels_basic import KV_HEADS, PROJECTIONS, prepared_weight, run_norm_qkv_rope

from bench_linear import GOAL
from kernel_rows import basic_row


def bench(token_counts):
    for kind in KV_HEADS:
        k, n = PROJECTIONS[f"qkv_{kind}"]
        for dtype in ("bf16", "fp8"):
            weight = prepared_weight(k, n, dtype, seed=0, zeros=True)
            for tokens in token_counts:
                yield basic_row(f"norm_qkv_rope_{kind}_{dtype}", GOAL, tokens,
                                run_norm_qkv_rope(tokens, kind, dtype, zeros=True, weight=weight))

