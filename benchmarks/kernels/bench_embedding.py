"""Token embedding gather (kernels/embedding.py; tests/test_kernel_embedding.py)."""

from __future__ import annotations

import numpy as np

from mimo_v2_flash.selfcheck.kernels_basic import BF16, HIDDEN, VOCAB, run_embedding

from kernel_rows import basic_row

GOAL = None         # a few rows per token: latency-bound, no roofline goal


def bench(token_counts):
    table = np.zeros((VOCAB, HIDDEN), BF16)
    for tokens in token_counts:
        yield basic_row("embedding", GOAL, tokens, run_embedding(tokens, table))
