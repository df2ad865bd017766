"""Prefill attention kernel (kernels/attention_prefill.py) against the NumPy reference
(mimo_v2_flash.reference.attention), on the CPU simulator.

Error measure: max |kernel - reference| / max |reference| over the output, the reference
(fp32) fed exactly the bf16 values the kernel reads (Q * scale, K, V rounded to bf16, scale 1), so
the measure is the kernel's own arithmetic: probabilities held in bf16 for the PV matmul and the
bf16 output (observed 2e-3 .. 5e-3). Tolerance 1e-2. For T > 512 the reference is evaluated on
a subset of query rows (first, last and evenly spread ones; the reference masks by position, so
this is exact), because its einsum is slow at 4096 tokens.

Shapes: the full MiMo attention (64 query heads over 4 KV heads without sink for full layers; over
8 KV heads with a 128-key window and sinks for SWA layers; head dims 192 / 128) at T = 1, 128,
129, 1000 and 4096 (the window crossed 32 times), plus odd shapes.
"""
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")   # the simulator's matmuls are small

import numpy as np
import pytest

from kernels.attention_prefill import BF16, attention_prefill, attention_prefill_kernel, to_rows_t
from kernels.backend import nki, nl, nisa, simulate
from mimo_v2_flash.reference import attention

SCALE = 192 ** -0.5
TOL = 1e-2


def make_inputs(t_len, hq, hkv, seed=0, d=192, dv=128):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((t_len, hq, d)).astype(np.float32)
    k = rng.standard_normal((t_len, hkv, d)).astype(np.float32)
    v = (0.707 * rng.standard_normal((t_len, hkv, dv))).astype(np.float32)
    return q, k, v


def relative_error(out, ref):
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def bf16_values(x):
    return np.asarray(x, np.float32).astype(BF16).astype(np.float32)


def reference_rows(q, k, v, rows, window, sink):
    """The reference on the kernel's bf16 inputs, for query rows `rows` of a fresh sequence."""
    pos = np.arange(len(q))
    return attention(bf16_values(q[rows] * np.float32(SCALE)), bf16_values(k), bf16_values(v),
                     pos[rows], pos, 1.0, window, sink)


def checked_rows(t_len):
    if t_len <= 512:
        return np.arange(t_len)
    return np.unique(np.concatenate([np.arange(64), np.arange(t_len - 64, t_len),
                                     np.linspace(0, t_len - 1, 128).astype(int)]))


def check(t_len, hq, hkv, window, sink, seed=0):
    q, k, v = make_inputs(t_len, hq, hkv, seed)
    out, report = attention_prefill(q, k, v, SCALE, window, sink)
    assert out.shape == (t_len, hq, v.shape[2])
    rows = checked_rows(t_len)
    err = relative_error(out[rows], reference_rows(q, k, v, rows, window, sink))
    assert err < TOL, f"T={t_len} Hq={hq} Hkv={hkv} window={window}: error {err:.3e} >= {TOL}"
    return out, report


def random_sink(hq, seed=1):
    return (3.0 * np.random.default_rng(seed).standard_normal(hq)).astype(np.float32)


@pytest.mark.parametrize("t_len", [1, 128, 129, 1000, 4096])
def test_full_attention_mimo_shapes(t_len):
    check(t_len, 64, 4, None, None)


@pytest.mark.parametrize("t_len", [1, 128, 129, 1000, 4096])
def test_sliding_window_with_sink_mimo_shapes(t_len):
    check(t_len, 64, 8, 128, random_sink(64))


def test_sglang_window_of_129_keys():
    check(300, 64, 8, 129, random_sink(64))


@pytest.mark.parametrize("t_len, hq, hkv, window", [
    (77, 8, 2, 16),        # tiny window, ragged last row tile
    (50, 12, 4, None),     # G = 3: 42-token row tiles (126 rows), not a power of two
    (600, 8, 1, 3),        # window shorter than a row tile's tokens
    (2100, 16, 1, None),   # two key chunks per row tile past 2048 tokens
])
def test_odd_shapes(t_len, hq, hkv, window):
    check(t_len, hq, hkv, window, random_sink(hq) if window else None)


def test_sinks_large_and_very_negative():
    """Even heads: sink +15 (it takes almost all the probability, outputs shrink ~e^-10);
    odd heads: -40 (no effect). The error measure is per head so the tiny heads count too."""
    sink = np.where(np.arange(64) % 2 == 0, 15.0, -40.0).astype(np.float32)
    q, k, v = make_inputs(300, 64, 8, seed=3)
    out, _ = attention_prefill(q, k, v, SCALE, 128, sink)
    ref = reference_rows(q, k, v, np.arange(300), 128, sink)
    for h in range(64):
        err = relative_error(out[:, h], ref[:, h])
        assert err < TOL, f"head {h} (sink {sink[h]}): error {err:.3e}"
    assert np.abs(ref[:, 0]).max() < 1e-2 * np.abs(ref[:, 1]).max()   # the large sink really bites


def test_window_skips_key_blocks():
    """Sliding window issues ~(128 + 16) key columns per row instead of ~T/2: count matmul FLOPs."""
    q, k, v = make_inputs(2048, 8, 1)
    _, full = attention_prefill(q, k, v, SCALE, None)
    _, swa = attention_prefill(q, k, v, SCALE, 128)
    assert swa.matmul_flops < 0.2 * full.matmul_flops, (swa.matmul_flops, full.matmul_flops)


def test_lnc2_splits_kv_heads_between_cores():
    q, k, v = make_inputs(200, 64, 4, seed=5)
    out1, rep1 = attention_prefill(q, k, v, SCALE, None)
    out2, rep2 = attention_prefill(q, k, v, SCALE, None, lnc=2)
    np.testing.assert_array_equal(out1, out2)
    assert rep2.num_programs == 2 and rep2.estimated_time_s < 0.6 * rep1.estimated_time_s


def test_dma_transposes_give_the_same_result():
    q, k, v = make_inputs(700, 16, 1, seed=6)
    base, _ = attention_prefill(q, k, v, SCALE, None, dma_transpose_share=0.0)
    dma, rep = attention_prefill(q, k, v, SCALE, None, dma_transpose_share=1.0)
    np.testing.assert_array_equal(base, dma)       # a transpose is exact either way
    assert rep.engines["DMA"].by_op.get("dma_transpose", 0) > 0


def test_misuse_is_rejected_with_clear_errors():
    q, k, v = make_inputs(64, 16, 2)
    with pytest.raises(ValueError, match="same tokens"):
        attention_prefill(q, k[:32], v[:32], SCALE)
    with pytest.raises(ValueError, match="not a multiple of 3 KV heads"):
        attention_prefill(q, np.zeros((64, 3, 192), np.float32), np.zeros((64, 3, 128), np.float32), SCALE)
    with pytest.raises(ValueError, match="window must be a positive"):
        attention_prefill(q, k, v, SCALE, window=0)
    # the kernel itself: Q^T columns that are not T * G
    q_t = to_rows_t(q, 2, SCALE)[:, :, :-1]
    k_t = np.zeros((2, 192, 64), q_t.dtype)
    v_d = np.zeros((2, 64, 128), q_t.dtype)
    with pytest.raises(AssertionError, match="must be T \\* G"):
        simulate(attention_prefill_kernel)(q_t, k_t, v_d, None, None)


@nki.jit
def scaled_copy_kernel(x, scale_col):
    """ScalarE copy with a per-partition scale (nisa.activation with op=nl.copy)."""
    out = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.shared_hbm)
    x_sb = nl.load(x)
    s_sb = nl.load(scale_col)
    y = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.sbuf)
    nisa.activation(y, nl.copy, x_sb, scale=s_sb)
    nl.store(out, y)
    return out


def test_simulator_activation_copy_with_scale():
    """nl.copy as an activation function (registered in the simulator for these kernels)."""
    x = np.random.default_rng(0).standard_normal((128, 64)).astype(np.float32)
    scale = np.linspace(-2, 2, 128, dtype=np.float32)[:, None]
    np.testing.assert_allclose(simulate(scaled_copy_kernel)(x, scale), x * scale, rtol=1e-6)
