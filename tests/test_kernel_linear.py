"""Linear projection kernel (kernels/linear.py) on the simulator against reference.linear.

The kernel reads prepared weights W_k = W_hf.T ([in, out]); the reference gets W_hf itself, as
float32: the bf16 values, or the FP8 weight dequantised exactly (q * block scale), so the FP8
error measured is the kernel's, not the quantisation's. Inputs are rounded to bf16 first.

Error measure: max |kernel - reference| / max |reference|. Tolerance 1e-2 (bf16 output: one
rounding is at most 2^-8 of max |reference|; FP8 adds one bf16 rounding of the dequantised weight,
or of the block-scaled activation at decode, per product, which averages out over K).
"""
from functools import lru_cache

import ml_dtypes
import numpy as np
import pytest
import torch

from mimo_kernels.backend import simulate
from mimo_kernels.launch import to_device, to_host
from mimo_kernels.linear import linear, linear_kernel
from mimo_v2_flash import reference as ref
from mimo_v2_flash.fp8 import TRAINIUM_E4M3, dequantize, quantize_blocks
from mimo_v2_flash.selfcheck.kernels_basic import rolled_weight

BF16 = np.dtype(ml_dtypes.bfloat16)
TOL = 1e-2


def rel_err(got, want):
    return float(np.abs(np.asarray(got, np.float32) - want).max() / np.abs(want).max())


def hub_weight(out_features, in_features, seed):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((out_features, in_features), dtype=np.float32) * np.float32(in_features ** -0.5)


def activations(tokens, features, seed):
    x = np.random.default_rng(seed).standard_normal((tokens, features)).astype(np.float32)
    return x.astype(BF16)


@lru_cache(maxsize=4)
def prepared(out_features, in_features, seed, fp8):
    """(kernel-layout weight, scale or None, exact float32 Hub-layout weight the kernel computes with)."""
    w_hf = hub_weight(out_features, in_features, seed)
    if fp8:
        q, scale = quantize_blocks(w_hf.T, TRAINIUM_E4M3)         # prepared: [in, out] + [in/128, out/128]
        return q, scale, dequantize(q, scale).T
    w_k = np.ascontiguousarray(w_hf.T).astype(BF16)
    return w_k, None, w_k.astype(np.float32).T


def check(tokens, in_features, out_features, fp8, seed=0):
    w_k, scale, w_exact = prepared(out_features, in_features, seed, fp8)
    x = activations(tokens, in_features, seed + 1)
    y = to_host(linear(x, w_k, scale))
    assert y.dtype == BF16 and y.shape == (tokens, out_features)
    err = rel_err(y, ref.linear(x.astype(np.float32), w_exact))
    assert err < TOL, f"relative error {err:.2e}"


# Full MiMo projections: q, k (4 / 8 KV heads), v (4 / 8 KV heads), o.
MIMO = {"q": (4096, 12288), "k_full": (4096, 768), "k_swa": (4096, 1536), "v_full": (4096, 512),
        "v_swa": (4096, 1024), "o": (8192, 4096)}


@pytest.mark.parametrize("tokens", [1, 129])
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("name", MIMO)
def test_mimo_projections(name, fp8, tokens):
    check(tokens, *MIMO[name], fp8=fp8)


# Small shapes over the schedule boundaries: <= 64 tokens (weights stationary; FP8 scales on the
# activations), 65..128 (weights moving; FP8 dequantised in SBUF), ragged tails, several token groups.
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("tokens", [1, 7, 64, 65, 129, 1000])
def test_small_shapes(tokens, fp8):
    check(tokens, 256, 384, fp8=fp8, seed=tokens)


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_large_contraction_several_token_groups(fp8):
    """K = 16384 (the dense MLP's down projection) streams its weights in K parts into open PSUM
    accumulators, 512 tokens of x^T per group: 552 tokens make two groups, the second one block
    of 40 tokens (the K-split path keeps the weights moving even for a block this short)."""
    check(552, 16384, 256, fp8=fp8, seed=3)


def test_lm_head_full_vocab():
    """lm_head 4096 -> 152576 (1.25 GB of bf16 weights), built from rolled copies of one block so
    it is cheap to make and every 4096-column slice differs."""
    K, V = 4096, 152576
    w_k = rolled_weight(K, V, seed=4)
    x = activations(7, K, 5)
    y = to_host(linear(x, w_k))
    xf = x.astype(np.float32)
    for c0 in range(0, V, 8 * K):                                  # reference in column chunks
        want = xf @ w_k[:, c0:c0 + 8 * K].astype(np.float32)
        assert rel_err(y[:, c0:c0 + 8 * K], want) < TOL


def test_fp32_activations_are_rounded_to_bf16():
    w_hf = hub_weight(256, 128, 6)
    x = np.random.default_rng(7).standard_normal((5, 128)).astype(np.float32)
    y = to_host(linear(x, np.ascontiguousarray(w_hf.T).astype(BF16), dtype=np.float32))
    assert y.dtype == np.float32
    want = ref.linear(x.astype(BF16).astype(np.float32), w_hf.T.astype(BF16).astype(np.float32).T)
    assert rel_err(y, want) < 1e-5          # fp32 output: only accumulation-order differences


def test_rejects_misuse():
    x = activations(4, 256, 8)
    w = np.zeros((256, 384), BF16)
    with pytest.raises(AssertionError, match=r"weight shape \(384, 256\) must be \[K=256, N\]"):
        linear(x, np.zeros((384, 256), BF16))                    # Hub layout [out, in] by mistake
    with pytest.raises(AssertionError, match="K=200 and N=384 must be multiples of 128"):
        linear(activations(4, 200, 8), np.zeros((200, 384), BF16))
    with pytest.raises(TypeError, match="weight dtype float32 must be bfloat16"):
        linear(x, w.astype(np.float32))
    q, scale = quantize_blocks(np.ones((256, 384), np.float32), TRAINIUM_E4M3)
    with pytest.raises(TypeError, match="must be float8_e4m3, got bfloat16"):
        linear(x, w, scale)
    with pytest.raises(AssertionError, match=r"scale shape \(3, 2\) must be \(2, 3\)"):
        linear(x, q, scale.T)


# LNC=2: the programs split the output columns (token groups when there are several), so the
# result is LNC=1's bit for bit, and at decode each core streams half the weights.
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("tokens, in_features, out_features", [(1, 4096, 12288), (7, 256, 384),
                                                               (129, 256, 640), (300, 16384, 256)])
def test_lnc2_splits_the_output_between_cores(lnc1_and_lnc2, tokens, in_features, out_features, fp8):
    w_k, scale, _ = prepared(out_features, in_features, 0, fp8)
    x = activations(tokens, in_features, 9)
    rep1, rep2 = lnc1_and_lnc2(lambda: to_host(linear(x, w_k, scale, report=True)))
    if out_features == 12288:
        assert rep2.estimated_time_s < 0.75 * rep1.estimated_time_s


def test_fp8_weight_as_float8_or_as_uint8_bytes():
    """The launcher passes FP8 to torch as uint8 bytes (launch.to_device) and the kernel reinterprets
    them; the same kernel also takes a float8_e4m3 array directly (the simulator on NumPy), and the
    launcher takes the uint8 bytes themselves. All three give the same bits."""
    w_k, scale, w_exact = prepared(384, 256, 10, True)
    x = activations(7, 256, 11)
    via_launch = to_host(linear(x, w_k, scale))
    direct = simulate(linear_kernel)(x, w_k, scale)
    as_bytes = to_host(linear(x, w_k.view(np.uint8), scale))
    assert rel_err(via_launch, ref.linear(x.astype(np.float32), w_exact)) < TOL
    for other in (direct, as_bytes):
        np.testing.assert_array_equal(np.asarray(other, np.float32), np.asarray(via_launch, np.float32))
    tensor = to_device(w_k)
    assert tensor.dtype == torch.uint8 and np.array_equal(tensor.numpy(), w_k.view(np.uint8))
