"""Flash-style prefill attention, full (4 KV heads) and SWA (8 KV heads, sinks) layers, T = 512,
4096, 32768 (kernels/attention/prefill.py; tests/test_kernel_attention_prefill.py).

T = 32768 is too large to simulate here. Full attention: one KV head (16 query heads) is simulated
at T = 2048, 4096 and 8192; each engine's busy time and the schedule's makespan (the estimate)
are fitted as quadratics in T, checked at T = 6144 (the row gives the check's relative error), and
multiplied by the 4 KV heads (they run one after another and cost the same). SWA: a quarter of
the KV heads (2, one head group of the kernel's pipeline, so its transfers are shared as in the
whole layer) is simulated directly (x 4).
"""

from __future__ import annotations

import numpy as np

from mimo_kernels.attention import attention_prefill
from mimo_kernels.attention.host import BF16
from mimo_v2_flash.selfcheck.kernels_attention import (FULL, HEAD_DIM, SCALE, SWA, V_DIM, prefill_pairs, roofline,
                                                       shape_text)

from kernel_rows import TIMES, attention_row, engine_times

GOAL = 0.6          # of the roofline
LENGTHS = (512, 4096, 32768)
SIMULATED_MAX = 4096
SWA_HEADS_SIMULATED = 2      # KV heads of a SWA layer simulated beyond SIMULATED_MAX tokens


def simulate(t_len, hq, hkv, window):
    """Per-engine busy times and makespan [s] (`TIMES`) of one prefill launch (zero inputs: the
    cost does not depend on the values)."""
    q = np.zeros((t_len, hq, HEAD_DIM), BF16)
    k = np.zeros((t_len, hkv, HEAD_DIM), BF16)
    v = np.zeros((t_len, hkv, V_DIM), BF16)
    sink = None if window is None else np.zeros(hq, np.float32)
    return engine_times(attention_prefill(q, k, v, SCALE, window, sink)[1])


def full_formula():
    """Per-engine times and makespan of one KV head of full-attention prefill as quadratics in T,
    fitted at T = 2048, 4096, 8192; returns (predict(T) -> times, largest relative error at T = 6144)."""
    points = (2048, 4096, 8192)
    times = np.stack([simulate(t, FULL["hq"] // FULL["hkv"], 1, None) for t in points])
    coeffs = np.stack([np.polyfit(points, times[:, e], 2) for e in range(len(TIMES))])

    def predict(t_len):
        return np.array([np.polyval(c, t_len) for c in coeffs])
    check = simulate(6144, FULL["hq"] // FULL["hkv"], 1, None)
    return predict, float(np.max(np.abs(predict(6144) - check) / np.maximum(check, 1e-12)))


def bench(token_counts):
    """Full and SWA prefill at those of `LENGTHS` that are in `token_counts` (so the slow lengths
    can run separately)."""
    lengths = [t for t in LENGTHS if t in token_counts]
    if any(t > SIMULATED_MAX for t in lengths):
        formula, check = full_formula()
    for layer, shape in (("full", FULL), ("swa", SWA)):
        hq, hkv, window = shape["hq"], shape["hkv"], shape["window"]
        for t_len in lengths:
            roof = roofline(prefill_pairs(t_len, window), t_len, t_len, hq, hkv)
            if t_len <= SIMULATED_MAX:
                times, how = simulate(t_len, hq, hkv, window), "simulated"
            elif window is None:
                times, how = hkv * formula(t_len), f"formula, check err {check:.1%}"
            else:
                part = hkv // SWA_HEADS_SIMULATED
                times = part * simulate(t_len, hq // part, SWA_HEADS_SIMULATED, window)
                how = f"{SWA_HEADS_SIMULATED} KV heads simulated x{part}"
            yield attention_row(f"attention_prefill_{layer}", f"T={t_len} {shape_text(hq, hkv, window)}", t_len,
                                times, roof, GOAL, how)

