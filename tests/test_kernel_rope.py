"""Partial RoPE kernel (kernels/rope.py) on the simulator against reference.apply_partial_rope.

Error measure: max |kernel - reference| / max |reference|, the reference computed in fp32 (angles in
float64) from the same bf16-rounded input. Tolerance 5e-3 for bf16 output: the only error left is the one
rounding of the output to bf16, at most half an ulp = 2^-9 of a value below the next power of two of
max |reference|, so at most 2^-8 = 3.9e-3 of max |reference| (the issue's "about 1e-2", tightened
so that it can tell angle errors apart). Positions go up to 262143 (max_position_embeddings - 1),
where angle precision matters: a test below shows that fp32 angles miss this tolerance.
"""
import ml_dtypes
import numpy as np
import pytest

from mimo_kernels.backend import simulate
from mimo_kernels.rope import rope, rope_kernel, rope_table
from mimo_kernels.launch import to_host
from mimo_v2_flash import reference as ref

BF16 = np.dtype(ml_dtypes.bfloat16)
TOL = 5e-3
MAX_POS = 262144
THETAS = [5e6, 1e4]      # full-attention layers, sliding-window layers


def rel_err(got, want):
    return float(np.abs(np.asarray(got, np.float32) - want).max() / np.abs(want).max())


def case(tokens, heads, seed=0, head_dim=192, low=MAX_POS - 70000):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, heads, head_dim)).astype(np.float32)
    positions = rng.integers(low, MAX_POS, tokens)
    return x, positions


def reference(x, positions, theta, rotary_dim=64):
    return ref.apply_partial_rope(np.asarray(x).astype(BF16).astype(np.float32), positions, rotary_dim, theta)


# Full MiMo shapes: q (64 heads), k (4 and 8 KV heads), head dim 192, rotary 64.
@pytest.mark.parametrize("theta", THETAS)
@pytest.mark.parametrize("heads", [64, 4, 8])
@pytest.mark.parametrize("tokens", [1, 7, 129, 1000])
def test_rope_mimo_shapes(tokens, heads, theta):
    x, positions = case(tokens, heads, seed=tokens + heads)
    out = to_host(rope(x, positions, theta))
    assert out.dtype == BF16 and out.shape == x.shape
    want = reference(x, positions, theta)
    assert rel_err(out, want) < TOL
    # dims 64..191 pass through bit-exactly
    np.testing.assert_array_equal(np.asarray(out[..., 64:], np.float32),
                                  x[..., 64:].astype(BF16).astype(np.float32))


def test_rope_prefill_positions_and_small_heads():
    """Consecutive positions from 0 (prefill), a tiny-config head count, fp32 activations."""
    x, _ = case(300, 2, seed=3)
    positions = np.arange(300)
    out = to_host(rope(x, positions, 1e4, dtype=np.float32))
    np.testing.assert_allclose(out, ref.apply_partial_rope(x, positions, 64, 1e4), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("theta", THETAS)
def test_fp32_angles_would_fail_the_tolerance(theta):
    """The same kernel fed a table whose angles were computed in fp32 misses the tolerance at
    positions near 262144, so the tests above do check the angle precision."""
    x, positions = case(128, 8, seed=5, low=MAX_POS - 1000)
    n = MAX_POS
    inv_freq = (theta ** (-np.arange(32, dtype=np.float32) * np.float32(2.0 / 64))).astype(np.float32)
    angle = np.arange(n, dtype=np.float32)[:, None] * inv_freq[None, :]          # fp32 angles
    fp32_table = np.concatenate([np.cos(angle), np.sin(angle)], axis=1).astype(np.float32)
    want = reference(x, positions, theta)
    args = (x.astype(BF16), positions.astype(np.int32))
    assert rel_err(simulate(rope_kernel)(*args, rope_table(theta, 64, n)), want) < TOL
    assert rel_err(simulate(rope_kernel)(*args, fp32_table), want) > TOL


def test_rejects_position_outside_the_table():
    x, positions = case(4, 4, seed=6, low=0)
    table = rope_table(1e4, 64, 100)
    positions[2] = 100
    with pytest.raises(IndexError, match="outside the tensor"):
        simulate(rope_kernel)(x.astype(BF16), positions.astype(np.int32), table)


def test_rejects_negative_positions_and_bad_shapes():
    x, positions = case(4, 4, seed=7, low=0)
    positions[0] = -1
    with pytest.raises(ValueError, match=r"positions must lie in \[0, 2\^31\)"):
        rope(x, positions, 1e4)
    with pytest.raises(ValueError, match=r"positions shape \(3,\) must be \(4,\)"):
        rope(x, positions[:3] + 1, 1e4)
    with pytest.raises(AssertionError, match="rotary dim.*must be even and <= head dim 32"):
        rope(x[..., :32], np.arange(4), 1e4)


@pytest.mark.parametrize("tokens", [1, 7, 129])
def test_lnc2_splits_tokens_between_cores(monkeypatch, tokens):
    """At LNC=2 the programs take alternate tiles (a decode tile cut in two): LNC=1's bits."""
    x, positions = case(tokens, 68, seed=tokens)
    want = to_host(rope(x, positions, 5e6))
    monkeypatch.setenv("NEURON_LOGICAL_NC_CONFIG", "2")
    out, report = to_host(rope(x, positions, 5e6, report=True))
    assert report.num_programs == 2
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(want, np.float32))
