"""Dense SwiGLU kernel (kernels/dense_mlp.py) on the simulator against reference.swiglu.

The kernel reads prepared weights (gate, up [H, I], down [I, H] = Hub matrices transposed); the
reference gets the Hub matrices as float32: the bf16 values, or the FP8 weights dequantised
exactly. Inputs are rounded to bf16 first.

Error measure: max |kernel - reference| / max |reference|. Tolerance 1e-2: h = silu(g) * u is
rounded to bf16 once before the down projection (2^-9 relative per element, averaging out over I),
then the output once (at most 2^-8 of max |reference|); FP8 adds a bf16 rounding of the
dequantised weight or block-scaled activation per product.
"""
from functools import lru_cache

import ml_dtypes
import numpy as np
import pytest

from mimo_kernels.dense_mlp import dense_mlp
from mimo_kernels.launch import to_host
from mimo_v2_flash import reference as ref
from mimo_v2_flash.fp8 import TRAINIUM_E4M3, dequantize, quantize_blocks

BF16 = np.dtype(ml_dtypes.bfloat16)
TOL = 1e-2


@lru_cache(maxsize=2)
def weights(hidden, intermediate, fp8, seed=0):
    """(prepared weights, scales or None, exact float32 Hub-layout gate, up, down)."""
    rng = np.random.default_rng(seed)
    hub = [rng.standard_normal(shape, dtype=np.float32) * np.float32(shape[1] ** -0.5)
           for shape in ((intermediate, hidden), (intermediate, hidden), (hidden, intermediate))]
    if fp8:
        quantised = [quantize_blocks(w.T, TRAINIUM_E4M3) for w in hub]
        return ([q for q, _ in quantised], [s for _, s in quantised],
                [dequantize(q, s).T for q, s in quantised])
    prepared = [np.ascontiguousarray(w.T).astype(BF16) for w in hub]
    return prepared, None, [w.astype(np.float32).T for w in prepared]


def check(tokens, hidden, intermediate, fp8):
    prepared, scales, exact = weights(hidden, intermediate, fp8)
    x = np.random.default_rng(tokens).standard_normal((tokens, hidden)).astype(BF16)
    y = to_host(dense_mlp(x, *prepared, scales=scales))
    assert y.dtype == BF16 and y.shape == (tokens, hidden)
    want = ref.swiglu(x.astype(np.float32), *exact)
    err = float(np.abs(y.astype(np.float32) - want).max() / np.abs(want).max())
    assert err < TOL, f"relative error {err:.2e}"


@pytest.mark.parametrize("tokens", [1, 129])
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_mimo_dense_mlp(fp8, tokens):
    """H = 4096, I = 16384: MiMo's layer-0 MLP."""
    check(tokens, 4096, 16384, fp8)


@pytest.mark.parametrize("tokens", [1, 7, 65, 129, 1000])
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_small_dense_mlp(fp8, tokens):
    """The tiny config's sizes (H = 256, I = 512) over decode, weights-moving and ragged blocks."""
    check(tokens, 256, 512, fp8)


def test_rejects_misuse():
    prepared, scales, _ = weights(256, 512, True)
    x = np.zeros((3, 256), BF16)
    with pytest.raises(ValueError, match=r"scales must be \(gate_scale, up_scale, down_scale\)"):
        dense_mlp(x, *prepared, scales=scales[:2])
    bf16 = [w.astype(np.float32).astype(BF16) for w in prepared]
    with pytest.raises(AssertionError, match=r"w_down shape \(256, 512\) must be \[512, 256\]"):
        dense_mlp(x, bf16[0], bf16[1], np.ascontiguousarray(bf16[2].T))


@pytest.mark.parametrize("tokens", [1, 65, 300])
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_lnc2_splits_both_passes_between_cores(monkeypatch, fp8, tokens):
    """At LNC=2 each core computes part of h (shared HBM), a core barrier, then part of y: LNC=1's bits."""
    prepared, scales, _ = weights(256, 512, fp8)
    x = np.random.default_rng(tokens).standard_normal((tokens, 256)).astype(BF16)
    want = to_host(dense_mlp(x, *prepared, scales=scales))
    monkeypatch.setenv("NEURON_LOGICAL_NC_CONFIG", "2")
    y, report = to_host(dense_mlp(x, *prepared, scales=scales, report=True))
    assert report.num_programs == 2
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(want, np.float32))


def test_fp8_weights_as_uint8_bytes():
    prepared, scales, _ = weights(256, 512, True)
    x = np.random.default_rng(2).standard_normal((3, 256)).astype(BF16)
    want = to_host(dense_mlp(x, *prepared, scales=scales))
    got = to_host(dense_mlp(x, *[w.view(np.uint8) for w in prepared], scales=scales))
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
