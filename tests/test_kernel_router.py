"""Sigmoid top-8 router (kernels/router.py) on the simulator against reference.router.

Measures: the chosen expert set of every token must equal the reference's exactly, except on
rows where the reference's 8th and 9th selection values (sigmoid + bias) are closer than 1e-5
(a near-tie that fp32 rounding may order either way; there the kernel's choice must still be
within 1e-5 of the cut). The kernel lists a token's ids by descending weight, the reference by
descending biased score, so ids are compared as sets and weights after aligning by id:
max abs error 1e-6 (fp32 logits and sigmoid; weights are ~0.125). Exact ties are constructed
explicitly and must follow the reference's rule: the lower expert id wins.
"""
import numpy as np
import pytest

from mimo_kernels.backend import nki, nl, nisa, simulate
from mimo_kernels.router import DISALLOWED_BIAS, route, router_kernel, routing_bias
from mimo_kernels.launch import to_host
from mimo_v2_flash import reference as ref
from mimo_v2_flash.selfcheck.kernels_moe import random_router as problem

NEAR_TIE = 1e-5
WEIGHT_ATOL = 1e-6


def by_id(ids, values):
    order = np.argsort(ids, axis=1)
    return np.take_along_axis(ids, order, 1), np.take_along_axis(values, order, 1)


def check(x, gate, bias, allowed=None, scaling=1.0, lnc=None):
    ids, weights = to_host(route(x, gate.T, bias, routed_scaling_factor=scaling, allowed=allowed, lnc=lnc))
    want_ids, want_w = ref.router(x, gate, bias, 8, scaling, allowed)
    assert ids.shape == want_ids.shape and weights.dtype == np.float32
    assert all(len(set(row)) == 8 for row in ids.tolist()), "a token got a repeated expert"
    if allowed is not None:
        assert allowed[ids].all(), "a disallowed expert was chosen"
    choice = ref.router_scores(x, gate) + bias
    if allowed is not None:
        choice = np.where(allowed, choice, -np.inf)
    ranked = -np.sort(-choice, axis=1)
    clear = ranked[:, 7] - ranked[:, 8] > NEAR_TIE
    got_sorted, got_w = by_id(ids, weights)
    want_sorted, want_w = by_id(want_ids, want_w)
    np.testing.assert_array_equal(got_sorted[clear], want_sorted[clear])
    np.testing.assert_allclose(got_w[clear], want_w[clear], rtol=0, atol=WEIGHT_ATOL)
    # Near-tie rows: every chosen expert lies at the cut or above it.
    chosen = np.take_along_axis(choice, ids, 1)
    assert (chosen[~clear] >= ranked[~clear, 7:8] - NEAR_TIE).all()
    np.testing.assert_allclose(weights.sum(axis=1), scaling, rtol=1e-5)
    return ids, weights


@pytest.mark.parametrize("tokens", [1, 129])
def test_full_shapes(tokens):
    """hidden 4096, 256 experts: T=1 (decode, x^T by one strided DMA) and T=129 (TensorE transposes)."""
    check(*problem(tokens, 4096, 256, seed=tokens))


@pytest.mark.parametrize("tokens", [1, 600, 1100])
def test_lnc2_splits_token_chunks(tokens):
    """LNC=2: the two programs take alternate chunks of 512 tokens (T=1: the second has none);
    same ids and weights as LNC=1, bit for bit."""
    x, gate, bias = problem(tokens, 256, 200, seed=tokens + 3)
    ids, weights = check(x, gate, bias, lnc=2)
    one_ids, one_w = to_host(route(x, gate.T, bias, lnc=1))
    np.testing.assert_array_equal(ids, one_ids)
    np.testing.assert_array_equal(weights, one_w)


def test_lnc2_full_shape():
    """LNC=2 at hidden 4096, 256 experts, 520 tokens (one full chunk per program)."""
    check(*problem(520, 4096, 256, seed=11), lnc=2)


@pytest.mark.parametrize("tokens", [1, 7, 33, 129, 1000])
@pytest.mark.parametrize("experts", [16, 200])
def test_small_shapes(tokens, experts):
    """hidden 256 (tiny preset), 16 or 200 experts (ragged expert tile); up to 32 tokens x^T comes
    by one strided DMA, more by TensorE transposes; 1000 tokens span 2 chunks."""
    check(*problem(tokens, 256, experts, seed=tokens + experts))


def test_no_tokens():
    x, gate, bias = problem(0, 256, 16, seed=0)
    ids, weights = to_host(route(x, gate.T, bias))
    assert ids.shape == weights.shape == (0, 8)


def test_routed_scaling_factor():
    check(*problem(5, 256, 16, seed=1), scaling=2.5)


def test_exact_ties_go_to_the_lower_expert_id():
    """Experts 3, 5, 9 have identical gate rows and biases and compete for the last 2 places;
    experts 0 and 1 are identical and both inside the top 8."""
    x, gate, _ = problem(6, 256, 16, seed=2)
    gate[5] = gate[9] = gate[3]
    gate[1] = gate[0]
    bias = np.zeros(16, np.float32)
    bias[[0, 1, 2, 4, 6, 7]] = 10.0          # six certain experts (selection in (10, 11))
    bias[[3, 5, 9]] = 5.0                   # three tied candidates for two places
    ids, weights = check(x, gate, bias)
    for row, w in zip(ids.tolist(), weights):
        assert sorted(row) == [0, 1, 2, 3, 4, 5, 6, 7]
    got = dict(zip(ids[0].tolist(), weights[0]))
    assert got[0] == got[1] and got[3] == got[5]


def test_saturated_scores_keep_the_chosen_set():
    """Chosen experts whose sigmoid underflows to 0 while unchosen ones saturate at 1: the ids are
    still the 8 the selection (score + bias) picks, as in the reference, with weight 0."""
    x, gate, _ = problem(1, 256, 16, seed=4)
    direction = x[0] / np.dot(x[0], x[0])
    gate[:8] = -200.0 * direction           # logits -200: sigmoid 0 in fp32
    gate[8:] = 50.0 * direction             # logits 50: sigmoid 1 in fp32
    bias = np.zeros(16, np.float32)
    bias[:8] = 10.0
    ids, weights = route(x, gate.T, bias)
    want_ids, want_w = ref.router(x, gate, bias, 8, 1.0, None)
    assert sorted(ids[0].tolist()) == sorted(want_ids[0].tolist()) == list(range(8))
    np.testing.assert_array_equal(weights, 0.0)
    np.testing.assert_array_equal(want_w, 0.0)


def test_allowed_subset():
    """Expert-subset models: only the 10 loaded experts may be chosen, whatever their scores."""
    x, gate, bias = problem(33, 256, 32, seed=3)
    allowed = np.zeros(32, bool)
    allowed[[1, 4, 5, 8, 13, 17, 20, 21, 30, 31]] = True
    bias[~allowed] += 3.0                   # the unloaded experts would otherwise win
    check(x, gate, bias, allowed=allowed)
    prepared = routing_bias(bias, allowed)          # made once and kept resident by NkiOps
    assert routing_bias(prepared) is prepared
    np.testing.assert_array_equal(prepared[~allowed], np.float32(DISALLOWED_BIAS))
    for got, want in zip(to_host(route(x, gate.T, prepared)), to_host(route(x, gate.T, bias, allowed=allowed))):
        np.testing.assert_array_equal(got, want)


def test_misuse_is_rejected():
    x, gate, bias = problem(4, 256, 16, seed=4)
    allowed = np.zeros(16, bool)
    allowed[:7] = True
    with pytest.raises(ValueError, match="only 7 experts are allowed but top_k is 8"):
        route(x, gate.T, bias, allowed=allowed)
    with pytest.raises(ValueError, match="top_k=6; the kernel selects exactly 8"):
        route(x, gate.T, bias, top_k=6)
    with pytest.raises(ValueError, match="gate_weight_t"):
        route(x, gate, bias)                       # Hub layout [E, H] instead of [H, E]
    with pytest.raises(ValueError, match="far from the disallowed bias"):
        route(x, gate.T, np.full(16, -5e29, np.float32))
    with pytest.raises(ValueError, match="only 0 experts are allowed"):     # -1e30 itself: excluded experts
        route(x, gate.T, np.full(16, DISALLOWED_BIAS, np.float32))
    with pytest.raises(AssertionError, match="must be float32"):
        simulate(router_kernel)(x.astype(np.float16), gate.T.copy(), bias)
    wide = np.zeros((256, 600), np.float32)
    with pytest.raises(AssertionError, match="600 experts; supported 8..512"):
        simulate(router_kernel)(x, wide, np.zeros(600, np.float32))
    with pytest.raises(AssertionError, match="hidden size 200 must be a multiple of 128"):
        simulate(router_kernel)(x[:, :200].copy(), np.zeros((200, 16), np.float32), bias)


@nki.jit
def _transpose_3d_kernel(a, axes):
    """a [T, K, P] (HBM) -> SBUF by a DMA transpose with `axes` -> out."""
    out = nl.ndarray((a.shape[2], a.shape[1], a.shape[0]), dtype=a.dtype, buffer=nl.shared_hbm)
    tile = nl.ndarray(out.shape, dtype=a.dtype, buffer=nl.sbuf)
    nisa.dma_transpose(dst=tile, src=a, axes=axes)
    nisa.dma_copy(dst=out, src=tile)
    return out


def test_simulator_dma_transpose_3d():
    """The 3-D DMA transpose ([t, k, p] -> [p, k, t], axes (2, 1, 0)), 2-byte data; other 3-D
    permutations are refused by name."""
    a = np.arange(5 * 3 * 128, dtype=np.float32).reshape(5, 3, 128).astype(np.float16)
    np.testing.assert_array_equal(simulate(_transpose_3d_kernel)(a, (2, 1, 0)), a.transpose(2, 1, 0))
    with pytest.raises(Exception, match=r"axes=\(1, 0, 2\) for 3-D; supported"):
        simulate(_transpose_3d_kernel)(a, (1, 0, 2))
