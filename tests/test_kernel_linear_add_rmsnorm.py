"""Fused o_proj + residual add + post-attention RMSNorm (kernels/linear_add_rmsnorm.py) on the
simulator against the reference: reference.linear, then the add, then reference.rmsnorm, in fp32
from the same bf16-rounded inputs (FP8 weights dequantised exactly).

Error measures: the new residual s = residual + a W^T is exact up to the bf16 roundings the kernel
makes (o rounded to bf16, then the sum): compared with that bf16 sum, within 1e-2 of max |s|;
the normalised output within 1e-2 of the reference's max (bf16 output, one rounding ~4e-3).
"""
import ml_dtypes
import numpy as np
import pytest

from mimo_kernels.linear_add_rmsnorm import linear_add_rmsnorm
from mimo_kernels.launch import to_host
from mimo_v2_flash import reference as ref
from mimo_v2_flash.selfcheck.kernels_basic import kernel_layout

BF16 = np.dtype(ml_dtypes.bfloat16)
TOL = 1e-2
EPS = 1e-5


def rel_err(got, want):
    return float(np.abs(np.asarray(got, np.float32) - want).max() / np.abs(want).max())


def bf16(a):
    return np.asarray(a, np.float32).astype(BF16).astype(np.float32)


def run(tokens, in_features, hidden, fp8=False, seed=0, weight_as_bytes=False):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((tokens, in_features)).astype(np.float32)
    residual = (3 * rng.standard_normal((tokens, hidden))).astype(np.float32)
    w = rng.standard_normal((in_features, hidden), dtype=np.float32) * np.float32(in_features ** -0.5)
    norm = (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32)
    weight, scale, exact = kernel_layout(w, "fp8" if fp8 else "bf16")
    if weight_as_bytes:
        weight = weight.view(np.uint8)
    (total, y), report = to_host(linear_add_rmsnorm(a, weight, residual, norm, scale=scale, eps=EPS, report=True))
    assert total.dtype == y.dtype == BF16 and total.shape == y.shape == (tokens, hidden)
    want_total = bf16(residual) + ref.linear(bf16(a), exact.T)
    assert rel_err(total, want_total) < TOL
    assert rel_err(y, ref.rmsnorm(want_total, bf16(norm), EPS)) < TOL
    return (total, y), report


# MiMo's o_proj (64 heads x 128 -> 4096, bf16 on the Hub) at decode and past a tile; FP8 too.
@pytest.mark.parametrize("tokens, fp8", [(1, False), (7, True), (129, False)])
def test_mimo_o_proj(tokens, fp8):
    run(tokens, 8192, 4096, fp8)


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("tokens", [1, 5, 33, 65, 130])
def test_small_shapes(tokens, fp8):
    run(tokens, 1024, 256, fp8, seed=tokens)


def test_prefill_fused_norm_over_token_groups_and_column_groups():
    """Past 64 tokens the norm runs in the projection's epilogue: K = 8192 streams in K parts with
    512-token groups, so 600 tokens make two groups (the second one 88-token block) and H = 1536
    three 512-column groups, each 128-token block normalised once all three have been added."""
    run(600, 8192, 1536, seed=11)


@pytest.mark.parametrize("tokens, in_features, hidden", [(1, 8192, 4096), (64, 1024, 256), (130, 1024, 256)])
def test_lnc2_splits_projection_then_tokens(lnc1_and_lnc2, tokens, in_features, hidden):
    """At LNC=2 the cores split o's columns (shared HBM, then a core barrier) and then the tokens
    of the norm: LNC=1's bits; at decode each core streams half of o_proj."""
    rep1, rep2 = lnc1_and_lnc2(lambda: run(tokens, in_features, hidden))
    if in_features == 8192:
        assert rep2.estimated_time_s < 0.75 * rep1.estimated_time_s


def test_fp8_weight_as_uint8_bytes():
    want, _ = run(3, 1024, 256, fp8=True, seed=4)
    got, _ = run(3, 1024, 256, fp8=True, seed=4, weight_as_bytes=True)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_rejects_misuse():
    a, residual, norm = np.ones((2, 256), np.float32), np.ones((3, 128), np.float32), np.ones(128, np.float32)
    with pytest.raises(ValueError, match="one token count"):
        linear_add_rmsnorm(a, np.zeros((256, 128), BF16), residual, norm)
    with pytest.raises(ValueError, match=r"weight \(256, 256\) must give residual's 128 columns"):
        linear_add_rmsnorm(a, np.zeros((256, 256), BF16), residual[:2], norm)
    with pytest.raises(TypeError, match="weight dtype float32 must be bfloat16"):
        linear_add_rmsnorm(a, np.zeros((256, 128), np.float32), residual[:2], norm)
