"""The dense SwiGLU MLP of layer 0, bf16 and FP8 (kernels/dense_mlp.py; tests/test_kernel_dense_mlp.py)."""

from __future__ import annotations

from mimo_v2_flash.selfcheck.kernels_basic import DENSE_INTER, HIDDEN, prepared_weight, run_dense_mlp

from bench_linear import GOAL
from kernel_rows import basic_row


def bench(token_counts):
    for dtype in ("bf16", "fp8"):
        weights = [prepared_weight(a, b, dtype, seed=0, zeros=True)
                   for a, b in ((HIDDEN, DENSE_INTER),) * 2 + ((DENSE_INTER, HIDDEN),)]
        for tokens in token_counts:
            yield basic_row(f"dense_mlp_{dtype}", GOAL, tokens,
                            run_dense_mlp(tokens, dtype, zeros=True, weights=weights))

