"""Cached attention at decode: 1..64 sequences, one new token each, at 4096 and 131072 keys, full
(4 KV heads) and SWA (8 KV heads, sinks) layers (kernels/attention/decode.py;
tests/test_kernel_attention_decode.py).

Full layers at 131072 keys are too long to simulate here: the kernel's work is a sum over row tiles
(2 sequences each) of a cost linear in the number of 2048-key chunks, so each engine's time is
fitted from simulations at 1, 2, 4 sequences x 4096, 8192 keys, and so is the schedule's makespan
(the estimate); the check compares the estimate at 3 sequences x 6144 keys with a simulation (the rows give its error).
"""

from __future__ import annotations

import numpy as np

from mimo_kernels.attention import attention_decode
from mimo_kernels.attention.host import BF16
from mimo_v2_flash.layer import AttentionInput
from mimo_v2_flash.selfcheck.kernels_attention import FULL, HEAD_DIM, SCALE, SWA, V_DIM, roofline, shape_text

from kernel_rows import attention_row, engine_times, estimate_us

GOAL = 0.7          # of the roofline
KEYS = (4096, 131072)
SEQUENCES = (1, 2, 4, 8, 16, 32, 64)
SIMULATED_MAX_KEYS = 4096


def simulate(n_seqs, keys, hq, hkv, window):
    """Per-engine busy times and makespan [s] (`TIMES`) of one decode launch: n_seqs sequences, one
    new token each, attending to `keys` keys (the new one included)."""
    rng = np.random.default_rng(0)
    cached = keys if window is None else min(keys, window)
    problems = []
    for _ in range(n_seqs):
        k = np.zeros((cached, hkv, HEAD_DIM), BF16)
        v = np.zeros((cached, hkv, V_DIM), BF16)
        q = rng.standard_normal((1, hq, HEAD_DIM)).astype(np.float32)
        problems.append(AttentionInput(q, k, v, np.array([keys - 1]), np.arange(keys - cached, keys)))
    sink = None if window is None else np.zeros(hq, np.float32)
    return engine_times(attention_decode(problems, SCALE, window, sink)[1])


def full_formula():
    """Per-engine times of full-layer decode as setup + tiles x (a + b x chunks), fitted from
    simulations (module docstring); returns (predict(B, keys) -> times, relative error of the
    estimate at B = 3, 6144 keys against a simulation)."""
    sim = {(b, s): simulate(b, s, **FULL) for b in (1, 2, 4) for s in (4096, 8192)}
    pair = {s: sim[(4, s)] - sim[(2, s)] for s in (4096, 8192)}         # one more 2-sequence tile
    pair_slope = (pair[8192] - pair[4096]) / 2                           # per 2048-key chunk
    setup = sim[(2, 4096)] - pair[4096]
    single = {s: sim[(1, s)] for s in (4096, 8192)}                      # a 1-sequence tile + setup
    single_slope = (single[8192] - single[4096]) / 2

    def predict(n_seqs, keys):
        chunks = keys / 2048
        pairs, odd = divmod(n_seqs, 2)
        times = setup + pairs * (pair[4096] + pair_slope * (chunks - 2)) if pairs else 0.0
        if odd:
            times = times + single[4096] + single_slope * (chunks - 2)
        return times
    check = estimate_us(simulate(3, 6144, **FULL))
    return predict, abs(estimate_us(predict(3, 6144)) - check) / check


def bench(token_counts):
    """Decode at the issue's shapes (`KEYS` x `SEQUENCES`) when a token count is at most 64 (a
    decode batch), nothing otherwise (so prefill token counts can run separately)."""
    if min(token_counts) > max(SEQUENCES):
        return
    formula, check = full_formula()
    for layer, shape in (("full", FULL), ("swa", SWA)):
        hq, hkv, window = shape["hq"], shape["hkv"], shape["window"]
        for keys in KEYS:
            read = keys if window is None else window
            for n_seqs in SEQUENCES:
                roof = roofline(n_seqs * min(keys, read), n_seqs, n_seqs * read, hq, hkv)
                if window is None and keys > SIMULATED_MAX_KEYS:
                    times, how = formula(n_seqs, keys), f"formula, check err {check:.1%}"
                else:
                    times, how = simulate(n_seqs, keys, hq, hkv, window), "simulated"
                yield attention_row(f"attention_decode_{layer}",
                                    f"B={n_seqs} keys={keys} {shape_text(hq, hkv, window)}", n_seqs, times,
                                    roof, GOAL, how)

