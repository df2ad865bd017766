"""RMSNorm kernels (kernels/rmsnorm.py) on the simulator against reference.rmsnorm.

Error measure: max |kernel - reference| / max |reference|, the reference computed in fp32 from the
same bf16-rounded inputs the kernel reads. Tolerances: bf16 output 1e-2 (one bf16 rounding is
~4e-3 of the value); fp32 activations 1e-5 (engines compute in fp32).
"""
import ml_dtypes
import numpy as np
import pytest

from mimo_kernels.rmsnorm import add_rmsnorm, rmsnorm
from mimo_kernels.launch import to_host
from mimo_v2_flash import reference as ref

BF16 = np.dtype(ml_dtypes.bfloat16)
TOL = {BF16: 1e-2, np.dtype(np.float32): 1e-5}


def rel_err(got, want):
    return float(np.abs(np.asarray(got, np.float32) - want).max() / np.abs(want).max())


def inputs(tokens, hidden, seed=0):
    rng = np.random.default_rng(seed)
    x = (3.0 * rng.standard_normal((tokens, hidden))).astype(np.float32)
    delta = rng.standard_normal((tokens, hidden)).astype(np.float32)
    weight = (1.0 + 0.2 * rng.standard_normal(hidden)).astype(np.float32)
    return x, delta, weight


def rounded(a, dtype):
    return np.asarray(a).astype(dtype).astype(np.float32)


# T = 1, 7 exercise the hidden-major (decode) layout only, 129 and 1000 both layouts.
@pytest.mark.parametrize("tokens", [1, 7, 129, 1000])
@pytest.mark.parametrize("hidden", [4096, 256])
def test_rmsnorm_bf16(tokens, hidden):
    x, _, w = inputs(tokens, hidden)
    y = to_host(rmsnorm(x, w, eps=1e-5))
    assert y.dtype == BF16 and y.shape == (tokens, hidden)
    want = ref.rmsnorm(rounded(x, BF16), rounded(w, BF16), 1e-5)
    assert rel_err(y, want) < TOL[BF16]


@pytest.mark.parametrize("tokens", [1, 7, 129, 1000])
def test_add_rmsnorm_bf16(tokens):
    x, delta, w = inputs(tokens, 4096, seed=1)
    total, y = to_host(add_rmsnorm(x, delta, w, eps=1e-5))
    total_want = rounded(rounded(x, BF16) + rounded(delta, BF16), BF16)   # the residual stream is bf16
    np.testing.assert_array_equal(np.asarray(total, np.float32), total_want)
    assert rel_err(y, ref.rmsnorm(total_want, rounded(w, BF16), 1e-5)) < TOL[BF16]


@pytest.mark.parametrize("tokens", [7, 130])
def test_add_rmsnorm_fp32_activations(tokens):
    x, delta, w = inputs(tokens, 512, seed=2)
    total, y = to_host(add_rmsnorm(x, delta, w, eps=1e-5, dtype=np.float32))
    np.testing.assert_allclose(total, x + delta, rtol=1e-6)
    assert rel_err(y, ref.rmsnorm(x + delta, rounded(w, BF16), 1e-5)) < TOL[np.dtype(np.float32)]


def test_eps_matters_for_tiny_rows():
    """A row of zeros normalises to 0 (not NaN), and eps sets the scale of near-zero rows."""
    x = np.zeros((3, 256), np.float32)
    x[1] = 1e-3
    w = np.ones(256, np.float32)
    y = np.asarray(to_host(rmsnorm(x, w, eps=1e-5, dtype=np.float32)), np.float32)
    np.testing.assert_allclose(y, ref.rmsnorm(x, w, 1e-5), rtol=1e-5)
    assert np.isfinite(y).all() and y[1, 0] < 0.5


def test_rejects_wrong_weight_shape():
    x, _, _ = inputs(4, 4096)
    with pytest.raises(AssertionError, match=r"weight shape \(4095,\) must be \(4096,\)"):
        rmsnorm(x, np.ones(4095, np.float32))


def test_rejects_hidden_not_multiple_of_128_for_tail_tokens():
    x, _, w = inputs(5, 200)
    with pytest.raises(AssertionError, match="hidden size 200 must be a multiple of 128"):
        rmsnorm(x, w)


def test_rejects_mismatched_delta():
    x, delta, w = inputs(4, 256)
    with pytest.raises(ValueError, match=r"delta shape \(3, 256\) differs from x shape \(4, 256\)"):
        add_rmsnorm(x, delta[:3], w)


# LNC=2: the programs split the token tiles (a decode tail into one piece per core), so the result
# is the LNC=1 result bit for bit.
@pytest.mark.parametrize("tokens", [1, 5, 64, 300])
def test_lnc2_splits_tokens_between_cores(monkeypatch, tokens):
    x, delta, w = inputs(tokens, 4096, seed=3)
    (want_total, want_y), rep1 = to_host(add_rmsnorm(x, delta, w, eps=1e-5, report=True))
    want_norm = to_host(rmsnorm(x, w, eps=1e-5))
    monkeypatch.setenv("NEURON_LOGICAL_NC_CONFIG", "2")
    (total, y), rep2 = to_host(add_rmsnorm(x, delta, w, eps=1e-5, report=True))
    assert rep2.num_programs == 2
    for got, want in ((total, want_total), (y, want_y), (to_host(rmsnorm(x, w, eps=1e-5)), want_norm)):
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
