"""Prefill attention kernel (kernels/attention/prefill.py) against the NumPy reference
(mimo_v2_flash.reference.attention), on the CPU simulator.

Error measure: max |kernel - reference| / max |reference| over the output, the reference
(fp32) fed exactly the bf16 values the kernel reads (Q * scale, K, V rounded to bf16, scale 1), so
the measure is the kernel's own arithmetic: probabilities held in bf16 for the PV matmul and the
bf16 output (observed 2e-3 .. 5e-3), within `TOL`. For T > 512 the reference is evaluated on
a subset of query rows (first, last and evenly spread ones; the reference masks by position, so
this is exact), because its einsum is slow at 4096 tokens.

Shapes: the full MiMo attention (64 query heads over 4 KV heads without sink for full layers; over
8 KV heads with a 128-key window and sinks for SWA layers; head dims 192 / 128) at T = 1, 128,
129, 1000 and 4096 (the window crossed 32 times), plus odd shapes.
"""
import numpy as np
import pytest

from mimo_kernels.attention import attention_prefill, attention_prefill_kernel
from mimo_kernels.attention.host import to_rows_t
from mimo_kernels.backend import nki, nl, nisa, simulate
from mimo_kernels.launch import to_host
from mimo_v2_flash.selfcheck.kernels_attention import SCALE, prefill_error, random_prefill, random_sink

TOL = 1e-2          # relative error over the output (module doc)


def check(t_len, hq, hkv, window, sink, seed=0):
    q, k, v = random_prefill(t_len, hq, hkv, seed)
    out, report = to_host(attention_prefill(q, k, v, SCALE, window, sink))
    assert out.shape == (t_len, hq, v.shape[2])
    err = prefill_error(q, k, v, window, sink, out)
    assert err < TOL, f"T={t_len} Hq={hq} Hkv={hkv} window={window}: error {err:.3e} >= {TOL}"
    return out, report


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
    (1300, 12, 4, None),   # 126-row tiles with more than 8 P^T blocks per PSUM eviction
])
def test_odd_shapes(t_len, hq, hkv, window):
    check(t_len, hq, hkv, window, random_sink(hq) if window else None)


def test_sinks_large_and_very_negative():
    """Even heads: sink +15 (it takes almost all the probability, outputs shrink ~e^-10);
    odd heads: -40 (no effect). The error measure is per head so the tiny heads count too."""
    sink = np.where(np.arange(64) % 2 == 0, 15.0, -40.0).astype(np.float32)
    q, k, v = random_prefill(300, 64, 8, seed=3)
    out, _ = to_host(attention_prefill(q, k, v, SCALE, 128, sink))
    for h in range(64):
        err = prefill_error(q[:, h:h + 1], k[:, h // 8:h // 8 + 1], v[:, h // 8:h // 8 + 1], 128,
                            sink[h:h + 1], out[:, h:h + 1])
        assert err < TOL, f"head {h} (sink {sink[h]}): error {err:.3e}"
    assert np.abs(out[:, 0]).max() < 1e-2 * np.abs(out[:, 1]).max()   # the large sink really bites


def test_window_skips_key_blocks():
    """Sliding window issues ~(128 + 16) key columns per row instead of ~T/2: count matmul FLOPs."""
    q, k, v = random_prefill(2048, 8, 1)
    _, full = to_host(attention_prefill(q, k, v, SCALE, None))
    _, swa = to_host(attention_prefill(q, k, v, SCALE, 128))
    assert swa.matmul_flops < 0.2 * full.matmul_flops, (swa.matmul_flops, full.matmul_flops)


def test_lnc2_splits_kv_heads_between_cores():
    q, k, v = random_prefill(200, 64, 4, seed=5)
    out1, rep1 = to_host(attention_prefill(q, k, v, SCALE, None))
    out2, rep2 = to_host(attention_prefill(q, k, v, SCALE, None, lnc=2))
    np.testing.assert_array_equal(out1, out2)
    # each core takes half the KV heads; the first load and the last store are not halved
    assert rep2.num_programs == 2 and rep2.estimated_time_s < 0.75 * rep1.estimated_time_s


def test_window_with_sink_across_super_blocks_lnc2():
    """T = 1100: the window crosses the 512-token super block boundaries, the last row tile is ragged
    (tile-major output rows past T*G dropped), and at LNC=2 each core loads its strided KV heads'
    keys and sinks in one DMA each."""
    sink = random_sink(32)
    out1, _ = check(1100, 32, 4, 128, sink, seed=7)
    q, k, v = random_prefill(1100, 32, 4, seed=7)
    out2, rep2 = to_host(attention_prefill(q, k, v, SCALE, 128, sink, lnc=2))
    np.testing.assert_array_equal(out1, out2)
    assert rep2.num_programs == 2


def test_partial_dma_transpose_share_goes_by_whole_batches():
    """A share of 0.3: some batches' P transposes all by one DMA each, the rest on TensorE; exact."""
    q, k, v = random_prefill(700, 16, 1, seed=6)
    base, pe = to_host(attention_prefill(q, k, v, SCALE, None, dma_transpose_share=0.0))
    mixed, rep = to_host(attention_prefill(q, k, v, SCALE, None, dma_transpose_share=0.3))
    np.testing.assert_array_equal(base, mixed)
    by_dma = rep.engines["DMA"].by_op.get("dma_transpose", 0)
    by_pe = pe.engines["TensorE"].by_op["nc_transpose"] - rep.engines["TensorE"].by_op["nc_transpose"]
    assert 0 < by_dma < by_pe        # several 128-key blocks per DMA transpose


def test_dma_transposes_give_the_same_result():
    q, k, v = random_prefill(700, 16, 1, seed=6)
    base, _ = to_host(attention_prefill(q, k, v, SCALE, None, dma_transpose_share=0.0))
    dma, rep = to_host(attention_prefill(q, k, v, SCALE, None, dma_transpose_share=1.0))
    np.testing.assert_array_equal(base, dma)       # a transpose is exact either way
    assert rep.engines["DMA"].by_op.get("dma_transpose", 0) > 0


def test_misuse_is_rejected_with_clear_errors():
    q, k, v = random_prefill(64, 16, 2)
    with pytest.raises(ValueError, match="same tokens"):
        attention_prefill(q, k[:32], v[:32], SCALE)
    with pytest.raises(ValueError, match="not a multiple of 3 KV heads"):
        attention_prefill(q, np.zeros((64, 3, 192), np.float32), np.zeros((64, 3, 128), np.float32), SCALE)
    with pytest.raises(ValueError, match="window must be a positive"):
        attention_prefill(q, k, v, SCALE, window=0)
    # the kernel itself: Q^T columns that are not T * G
    q_t = to_host(to_rows_t(q, 2, SCALE))[:, :, :-1]
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
