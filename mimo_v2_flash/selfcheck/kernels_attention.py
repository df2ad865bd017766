"""Self-checks of the attention kernels: flash-style prefill
(kernels/attention/prefill.py) and cached attention for ragged decode / prefill-on-history
batches (kernels/attention/decode.py), at the full MiMo shapes: 64 query heads over 4 KV heads
(full layers, no sink) or 8 (SWA layers: 128-key window, sinks), head dims 192 / 128.

Error measure: max |kernel - reference| / max |reference| per sequence, the reference
(mimo_v2_flash.reference.attention, fp32) fed exactly the bf16 values the kernel reads (Q * scale,
K and V rounded to bf16, scale 1), so the measure is the kernel's own arithmetic (bf16
probabilities in the PV matmul, bf16 output). Tolerance 1e-2. For prefill longer than 512 tokens
the reference runs on a subset of query rows (first, last and evenly spread; the reference masks
by position, so this is exact).

Roofline (stricter than the simulator report's, which counts the FLOPs and bytes the kernel
issues): the problem's own work on one NeuronCore-v3 (LNC=1). FLOPs = 2 (D + Dv) per visible
(query, key) pair and query head, at 79 TFLOPS bf16; HBM bytes = Q, K, V read and the output
written once, in bf16 (for decode: every cached key and value the queries can see), at 362.5 GB/s.

The problems, reference measures and rooflines are shared with
tests/test_kernel_attention_prefill.py, test_kernel_attention_decode.py and
benchmarks/kernels/bench_attention_prefill.py, bench_attention_decode.py.
"""

from __future__ import annotations

import numpy as np

from mimo_kernels.attention import attention_decode, attention_prefill
from mimo_kernels.attention.host import BF16
from mimo_kernels.launch import to_host
from mimo_kernels.trn2 import TRN2
from .. import reference as ref
from ..kv_cache import LayerKVCache
from ..layer import AttentionInput
from . import CheckResult, relative_error

TOPIC = "kernels_attention"
SCALE = 192 ** -0.5
HEAD_DIM, V_DIM, HEADS = 192, 128, 64
FULL = dict(hq=HEADS, hkv=4, window=None)
SWA = dict(hq=HEADS, hkv=8, window=128)
TOL = 1e-2
PEAK_BF16, HBM_BYTES_PER_S = TRN2.peak_flops_bf16, TRN2.hbm_bytes_per_s_core


# ----------------------------------------------------------------------- problems (shared with tests)

def random_prefill(t_len, hq, hkv, seed=0, d=HEAD_DIM, dv=V_DIM):
    """q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, Dv] (value-scaled), fp32."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((t_len, hq, d)).astype(np.float32)
    k = rng.standard_normal((t_len, hkv, d)).astype(np.float32)
    v = (0.707 * rng.standard_normal((t_len, hkv, dv))).astype(np.float32)
    return q, k, v


def cached_problem(rng, history, new, hq, hkv, window, d=HEAD_DIM, dv=V_DIM, dtype=np.float32):
    """One sequence's AttentionInput after `history` tokens went through the layer's KV cache:
    the cached keys in cache order (a wrapped ring buffer for SWA layers), then the new ones."""
    k_all = rng.standard_normal((history + new, hkv, d)).astype(dtype)
    v_all = (0.707 * rng.standard_normal((history + new, hkv, dv))).astype(dtype)
    cache = LayerKVCache(1, hkv, d, dv, window, dtype=dtype)
    if history:
        cache.update(0, np.arange(history), k_all[:history], v_all[:history])
    positions = np.arange(history, history + new)
    keys, values, key_pos = cache.update(0, positions, k_all[history:], v_all[history:])
    return AttentionInput(rng.standard_normal((new, hq, d)).astype(dtype), keys, values, positions, key_pos)


def random_sink(hq, seed=1):
    return (3.0 * np.random.default_rng(seed).standard_normal(hq)).astype(np.float32)


def bf16_values(x):
    return np.asarray(x, np.float32).astype(BF16).astype(np.float32)


def reference_on_kernel_inputs(q, k, v, q_positions, k_positions, window, sink):
    """reference.attention on the bf16 values the kernels read: Q * scale, K, V."""
    return ref.attention(bf16_values(np.asarray(q, np.float32) * np.float32(SCALE)), bf16_values(k),
                         bf16_values(v), q_positions, k_positions, 1.0, window, sink)


def checked_rows(t_len):
    """Query rows of a prefill compared with the reference: all, or 256 of them past 512 tokens."""
    if t_len <= 512:
        return np.arange(t_len)
    return np.unique(np.concatenate([np.arange(64), np.arange(t_len - 64, t_len),
                                     np.linspace(0, t_len - 1, 128).astype(int)]))


def prefill_error(q, k, v, window, sink, out) -> float:
    rows = checked_rows(len(q))
    pos = np.arange(len(q))
    return relative_error(out[rows], reference_on_kernel_inputs(q[rows], k, v, pos[rows], pos, window, sink))


def cached_error(problems, window, sink, outs) -> float:
    return max(relative_error(o, reference_on_kernel_inputs(p.q, p.k, p.v, p.q_positions, p.k_positions,
                                                            window, sink))
               for p, o in zip(problems, outs))


# ----------------------------------------------------------------------- rooflines

def visible_pairs(q_positions, k_positions, window) -> int:
    qp = np.asarray(q_positions)[:, None]
    kp = np.asarray(k_positions)[None, :]
    seen = kp <= qp
    if window is not None:
        seen &= kp > qp - window
    return int(seen.sum())


def roofline(pairs, q_tokens, keys_read, hq, hkv, d=HEAD_DIM, dv=V_DIM):
    """(seconds, FLOPs, HBM bytes, bound) of attention work: `pairs` visible (query, key) pairs
    per head, `q_tokens` queries (Q read, O written), `keys_read` keys (K and V read), bf16."""
    flops = 2 * (d + dv) * pairs * hq
    hbm = 2 * (q_tokens * hq * (d + dv) + keys_read * hkv * (d + dv))
    compute_s, memory_s = flops / PEAK_BF16, hbm / HBM_BYTES_PER_S
    return max(compute_s, memory_s), flops, hbm, "tensor" if compute_s >= memory_s else "hbm"


def prefill_pairs(t_len, window) -> int:
    if window is None or window >= t_len:
        return t_len * (t_len + 1) // 2
    return window * (window + 1) // 2 + (t_len - window) * window


def cached_roofline(problems, window, hq, hkv):
    pairs = sum(visible_pairs(p.q_positions, p.k_positions, window) for p in problems)
    keys = 0
    for p in problems:
        kp = np.asarray(p.k_positions)
        seen = kp <= np.max(p.q_positions)
        if window is not None:
            seen &= kp > np.min(p.q_positions) - window
        keys += int(seen.sum())
    return roofline(pairs, sum(len(p.q) for p in problems), keys, hq, hkv)


# ----------------------------------------------------------------------- checks

def shape_text(hq, hkv, window):
    return f"{hq}/{hkv} heads" + (f" W={window}" if window else "")


def _prefill_check(t_len, hq, hkv, window, sink, seed):
    q, k, v = random_prefill(t_len, hq, hkv, seed)
    out, rep = to_host(attention_prefill(q, k, v, SCALE, window, sink))
    err = prefill_error(q, k, v, window, sink, out)
    roof = roofline(prefill_pairs(t_len, window), t_len, t_len, hq, hkv)[0]
    kind = "full causal" if window is None else "SWA+sink"
    return CheckResult(TOPIC, f"attention prefill {kind}", f"T={t_len} {shape_text(hq, hkv, window)}",
                       err, TOL, err <= TOL, rep.estimated_time_s * 1e6, roof * 1e6)


def _cached_check(name, specs, hq, hkv, window, sink, seed):
    rng = np.random.default_rng(seed)
    problems = [cached_problem(rng, h, n, hq, hkv, window) for h, n in specs]
    outs, rep = to_host(attention_decode(problems, SCALE, window, sink))
    err = cached_error(problems, window, sink, outs)
    roof = cached_roofline(problems, window, hq, hkv)[0]
    return CheckResult(TOPIC, name, f"{len(specs)} seqs {shape_text(hq, hkv, window)}", err, TOL,
                       err <= TOL, rep.estimated_time_s * 1e6, roof * 1e6,
                       note="histories/new tokens " + ",".join(f"{h}+{n}" for h, n in specs[:6])
                            + ("..." if len(specs) > 6 else ""))


def checks(quick: bool):
    lengths = (1, 128, 129, 1000) if quick else (1, 128, 129, 1000, 4096)
    for t_len in lengths:
        yield _prefill_check(t_len, **FULL, sink=None, seed=t_len)
        yield _prefill_check(t_len, **SWA, sink=random_sink(HEADS), seed=t_len)
    yield _prefill_check(300, HEADS, 8, 129, random_sink(HEADS), seed=7)          # SGLang window
    extremes = np.where(np.arange(HEADS) % 2 == 0, 15.0, -40.0).astype(np.float32)
    yield _prefill_check(300, **SWA, sink=extremes, seed=8)
    around_window = [(h, 1) for h in (0, 30, 127, 128, 129, 300, 1000)]
    for layer, shape, sink in (("full", FULL, None), ("SWA", SWA, random_sink(HEADS))):
        yield _cached_check(f"decode {layer}, cache vs window", around_window, **shape, sink=sink, seed=1)
        yield _cached_check(f"prefill on history {layer}", [(100, 64), (0, 128), (37, 256), (300, 256)],
                            **shape, sink=sink, seed=2)
        yield _cached_check(f"decode batch 16 {layer}", [(h, 1) for h in [50] * 4 + [100] * 4 + [200] * 4
                                                        + [400] * 4], **shape, sink=sink, seed=3)
    yield _cached_check("decode SWA, sinks +15/-40", [(200, 1), (50, 1), (130, 20)], **SWA, sink=extremes,
                        seed=4)
