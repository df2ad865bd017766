"""Fused input RMSNorm + q|k|v projection + partial RoPE (kernels/norm_qkv_rope.py) on the simulator
against the reference: reference.rmsnorm, reference.linear on the Hub-layout q, k, v weights and
reference.apply_partial_rope, in fp32 (angles in float64) from the same bf16-rounded inputs (FP8
weights dequantised exactly). Also the final norm + lm_head form (`norm_linear`).

Error measure: max |kernel - reference| / max |reference|, separately for q, k and v. Tolerance
1e-2: the normalised row is rounded to bf16 once (2^-9 relative per element, averaging out over
the 4096-long contraction), the projection once (at most 2^-8 of max |reference|) and the rotated
dims once more; FP8 adds one bf16 rounding of the block-scaled activation per product.
"""
from functools import lru_cache

import ml_dtypes
import numpy as np
import pytest

from mimo_kernels.norm_qkv_rope import norm_linear, norm_qkv_rope
from mimo_kernels.launch import to_host
from mimo_v2_flash import reference as ref
from mimo_v2_flash.selfcheck.kernels_basic import kernel_layout

BF16 = np.dtype(ml_dtypes.bfloat16)
TOL = 1e-2
EPS = 1e-5
ROTARY, MAX_POS = 64, 262144
THETA = {"full": 5e6, "swa": 1e4}
# (hidden, q heads, kv heads, head dim, v head dim): MiMo's full and SWA layers, the tiny config's.
SHAPES = {"full": (4096, 64, 4, 192, 128), "swa": (4096, 64, 8, 192, 128), "tiny": (256, 8, 2, 192, 128)}


def rel_err(got, want):
    return float(np.abs(np.asarray(got, np.float32) - want).max() / np.abs(want).max())


def bf16(a):
    return np.asarray(a, np.float32).astype(BF16).astype(np.float32)


@lru_cache(maxsize=2)
def layer_weights(shape, fp8, seed=0):
    """(norm weight [H], prepared fused weight [H, N], scale or None, exact fp32 q, k, v Hub weights)."""
    hidden, heads, kv_heads, d, dv = SHAPES[shape]
    rng = np.random.default_rng(seed)
    hub = [rng.standard_normal((rows, hidden), dtype=np.float32) * np.float32(hidden ** -0.5)
           for rows in (heads * d, kv_heads * d, kv_heads * dv)]
    weight, scale, exact = kernel_layout(np.concatenate([w.T for w in hub], axis=1), "fp8" if fp8 else "bf16")
    widths = np.cumsum([heads * d, kv_heads * d])
    norm = (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32)
    return norm, weight, scale, [w.T for w in np.split(exact, widths, axis=1)]


def reference(shape, x, norm, exact, positions, theta):
    _, heads, kv_heads, d, _ = SHAPES[shape]
    xn = ref.rmsnorm(bf16(x), bf16(norm), EPS)
    q, k, v = (ref.linear(xn, w) for w in exact)
    return (ref.apply_partial_rope(q.reshape(-1, heads, d), positions, ROTARY, theta),
            ref.apply_partial_rope(k.reshape(-1, kv_heads, d), positions, ROTARY, theta), v)


def run(shape, tokens, fp8, seed=1, weight_as_bytes=False):
    hidden, heads, kv_heads, d, dv = SHAPES[shape]
    norm, weight, scale, exact = layer_weights(shape, fp8)
    rng = np.random.default_rng(seed)
    x = (2 * rng.standard_normal((tokens, hidden))).astype(np.float32)
    positions = rng.integers(MAX_POS - 70000, MAX_POS, tokens)
    theta = THETA["swa" if kv_heads == 8 else "full"]
    if weight_as_bytes:
        weight = weight.view(np.uint8)
    (q, k, v), report = to_host(norm_qkv_rope(x, norm, weight, positions, theta, (heads, kv_heads), d, ROTARY,
                                              scale=scale, eps=EPS, report=True))
    assert q.shape == (tokens, heads, d) and k.shape == (tokens, kv_heads, d) and v.shape == (tokens, kv_heads * dv)
    assert q.dtype == k.dtype == v.dtype == BF16
    return (q, k, v), reference(shape, x, norm, exact, positions, theta), report


def check(shape, tokens, fp8, **kwargs):
    got, want, report = run(shape, tokens, fp8, **kwargs)
    for name, a, b in zip("qkv", got, want):
        err = rel_err(a, b)
        assert err < TOL, f"{shape} T={tokens} fp8={fp8}: {name} relative error {err:.2e}"
    return got, report


# Full MiMo shapes at decode (1, 7) and past one 128-token tile (129); FP8 as the Hub stores q/k/v.
@pytest.mark.parametrize("shape, tokens, fp8", [("full", 1, False), ("swa", 1, True), ("swa", 7, False),
                                                ("full", 129, True)])
def test_mimo_shapes(shape, tokens, fp8):
    _, report = check(shape, tokens, fp8)
    assert report.num_programs == 1


# Ragged token counts over every schedule: hidden-major norm tail (< 32 rows), weights stationary
# (<= 64), weights moving (65+), several tiles.
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("tokens", [1, 5, 33, 64, 65, 130])
def test_small_shapes(tokens, fp8):
    check("tiny", tokens, fp8)


@pytest.mark.parametrize("shape, tokens, fp8", [("swa", 1, True), ("tiny", 5, False), ("tiny", 130, True)])
def test_lnc2_splits_columns_between_cores(lnc1_and_lnc2, shape, tokens, fp8):
    """At LNC=2 each core normalises the x^T it loads and projects and ropes its own column
    groups: LNC=1's bits, and at decode each core streams half the weights."""
    rep1, rep2 = lnc1_and_lnc2(lambda: check(shape, tokens, fp8))
    if shape == "swa":
        assert rep2.estimated_time_s < 0.75 * rep1.estimated_time_s


def test_fp8_weight_as_uint8_bytes():
    want, _ = check("tiny", 3, True)
    got, _ = check("tiny", 3, True, weight_as_bytes=True)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


@pytest.mark.parametrize("tokens", [1, 65])
def test_norm_linear_is_final_norm_and_lm_head(tokens):
    rng = np.random.default_rng(tokens)
    x = rng.standard_normal((tokens, 4096)).astype(np.float32)
    norm = (1 + 0.1 * rng.standard_normal(4096)).astype(np.float32)
    w = (rng.standard_normal((4096, 2048)) / 64).astype(BF16)
    y = to_host(norm_linear(x, norm, w, eps=EPS))
    assert y.dtype == BF16 and y.shape == (tokens, 2048)
    assert rel_err(y, ref.rmsnorm(bf16(x), bf16(norm), EPS) @ w.astype(np.float32)) < TOL


def test_rejects_misuse():
    norm, weight, _, _ = layer_weights("tiny", False)
    x = np.ones((2, 256), np.float32)
    with pytest.raises(ValueError, match=r"positions shape \(3,\) must be \(2,\)"):
        norm_qkv_rope(x, norm, weight, np.arange(3), 1e4, (8, 2), 192)
    with pytest.raises(AssertionError, match="rotary dim 48 must be even and divide 128"):
        norm_qkv_rope(x, norm, weight, np.arange(2), 1e4, (8, 2), 192, rotary_dim=48)
    with pytest.raises(AssertionError, match="40 rotary heads of 192 exceed the 2176 output columns"):
        norm_qkv_rope(x, norm, weight, np.arange(2), 1e4, (38, 2), 192)
    with pytest.raises(ValueError, match=r"x must be \[tokens, hidden\]"):
        norm_qkv_rope(x[0], norm, weight, np.arange(1), 1e4, (8, 2), 192)
