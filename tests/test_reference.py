"""Reference ops against independent formulations (float64 loops, closed forms)."""

import numpy as np
import pytest

from mimo_v2_flash import reference as ref
from mimo_v2_flash.selfcheck.reference import attention_loop_float64

RNG = np.random.default_rng(1234)


def test_rmsnorm_matches_definition():
    x = RNG.standard_normal((7, 96))
    w = RNG.standard_normal(96)
    want = np.stack([row / np.sqrt(np.sum(row ** 2) / 96 + 1e-5) * w for row in x])
    np.testing.assert_allclose(ref.rmsnorm(x, w), want, rtol=1e-12)
    assert ref.rmsnorm(x.astype(np.float32), w).dtype == np.float32


def test_rope_position_zero_is_identity_and_tail_untouched():
    x = RNG.standard_normal((5, 3, 192))
    np.testing.assert_array_equal(ref.apply_partial_rope(x, np.zeros(5), 64, 5e6), x)
    out = ref.apply_partial_rope(x, np.arange(5) * 1000, 64, 1e4)
    np.testing.assert_array_equal(out[..., 64:], x[..., 64:])


def test_rope_is_pairwise_rotation_by_position_times_frequency():
    x = RNG.standard_normal((1, 1, 192))
    p, theta = 12345, 1e4
    out = ref.apply_partial_rope(x, np.array([p]), 64, theta)
    for i in range(32):
        angle = p * theta ** (-i / 32)
        c, s = np.cos(angle), np.sin(angle)
        a, b = x[0, 0, i], x[0, 0, i + 32]           # NeoX pairing: i with i + 32
        np.testing.assert_allclose(out[0, 0, [i, i + 32]], [a * c - b * s, b * c + a * s], rtol=1e-9)


def test_rope_preserves_relative_position_dot_products():
    q, k = RNG.standard_normal((2, 1, 1, 192))
    def dot(pq, pk):
        return float((ref.apply_partial_rope(q, np.array([pq]), 64, 5e6)
                      * ref.apply_partial_rope(k, np.array([pk]), 64, 5e6)).sum())
    assert dot(10, 3) == pytest.approx(dot(1010, 1003), rel=1e-9)


@pytest.mark.parametrize("window, with_sink, hq, hkv", [(None, False, 8, 2), (16, True, 8, 4), (5, True, 4, 1)])
def test_attention_against_float64_loop(window, with_sink, hq, hkv):
    t = 33
    q, k = RNG.standard_normal((t, hq, 24)), RNG.standard_normal((t, hkv, 24))
    v = RNG.standard_normal((t, hkv, 16))
    sink = 3.0 * RNG.standard_normal(hq) if with_sink else None
    pos = np.arange(t) + 7
    got = ref.attention(q, k, v, pos, pos, 0.2, window, sink)
    np.testing.assert_allclose(got, attention_loop_float64(q, k, v, pos, pos, 0.2, window, sink), atol=1e-12)


def test_sink_of_minus_infinity_is_plain_softmax_and_large_sink_silences():
    q, k, v = RNG.standard_normal((6, 2, 8)), RNG.standard_normal((6, 1, 8)), RNG.standard_normal((6, 1, 4))
    pos = np.arange(6)
    plain = ref.attention(q, k, v, pos, pos, 0.3)
    np.testing.assert_allclose(ref.attention(q, k, v, pos, pos, 0.3, sink=np.full(2, -np.inf)), plain, atol=1e-15)
    assert np.abs(ref.attention(q, k, v, pos, pos, 0.3, sink=np.full(2, 80.0))).max() < 1e-30


def test_window_counts_keys_including_the_query():
    # With window W the last visible key of query t is t - W + 1: values mark each key's index.
    t, w = 20, 4
    q = np.zeros((t, 1, 8))
    k = np.zeros((t, 1, 8))
    v = np.arange(t, dtype=np.float64).reshape(t, 1, 1)
    out = ref.attention(q, k, v, np.arange(t), np.arange(t), 1.0, window=w)
    want = [np.mean(np.arange(max(0, i - w + 1), i + 1)) for i in range(t)]   # uniform over W keys
    np.testing.assert_allclose(out[:, 0, 0], want)


def test_key_order_does_not_matter():
    q, k, v = RNG.standard_normal((4, 2, 8)), RNG.standard_normal((10, 1, 8)), RNG.standard_normal((10, 1, 4))
    qpos, kpos = np.arange(6, 10), np.arange(10)
    perm = RNG.permutation(10)
    np.testing.assert_allclose(ref.attention(q, k[perm], v[perm], qpos, kpos[perm], 0.3, 5, np.ones(2)),
                               ref.attention(q, k, v, qpos, kpos, 0.3, 5, np.ones(2)), atol=1e-14)


def test_router_bias_selects_but_does_not_weight():
    x = RNG.standard_normal((5, 32))
    gate = RNG.standard_normal((16, 32))
    bias = np.zeros(16)
    bias[[3, 11]] = 100.0                          # forces experts 3 and 11 into every top-8
    ids, w = ref.router(x, gate, bias, 8)
    scores = ref.sigmoid(x @ gate.T)
    for t in range(5):
        assert {3, 11} <= set(ids[t].tolist()) and len(set(ids[t].tolist())) == 8
        np.testing.assert_allclose(w[t], scores[t, ids[t]] / scores[t, ids[t]].sum(), rtol=1e-12)
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-12)


def test_router_ties_pick_exactly_k_lowest_ids():
    x = np.zeros((3, 8))
    gate = np.zeros((16, 8))                       # every score is sigmoid(0) = 0.5
    ids, w = ref.router(x, gate, np.zeros(16), 8)
    np.testing.assert_array_equal(ids, np.tile(np.arange(8), (3, 1)))
    np.testing.assert_allclose(w, 1 / 8)


def test_router_allowed_mask_and_scaling():
    x, gate = RNG.standard_normal((4, 8)), RNG.standard_normal((16, 8))
    allowed = np.zeros(16, bool)
    allowed[[1, 2, 4, 6, 9, 10, 12, 15, 0]] = True
    ids, w = ref.router(x, gate, np.zeros(16), 8, routed_scaling_factor=2.5, allowed=allowed)
    assert allowed[ids].all()
    np.testing.assert_allclose(w.sum(-1), 2.5, rtol=1e-12)
    with pytest.raises(ValueError, match="only 3 experts"):
        ref.router(x, gate, np.zeros(16), 8, allowed=np.arange(16) < 3)


def test_moe_equals_per_token_loop():
    h, i, e, t = 16, 8, 6, 9
    experts = [tuple(RNG.standard_normal(s) for s in [(i, h), (i, h), (h, i)]) for _ in range(e)]
    x = RNG.standard_normal((t, h))
    ids = np.stack([RNG.permutation(e)[:3] for _ in range(t)])
    w = RNG.random((t, 3))
    got = ref.moe(x, ids, w, lambda j: experts[j])
    want = np.zeros((t, h))
    for n in range(t):
        for j in range(3):
            g, u, d = experts[ids[n, j]]
            hidden = (x[n] @ g.T) / (1 + np.exp(-(x[n] @ g.T))) * (x[n] @ u.T)
            want[n] += w[n, j] * (hidden @ d.T)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_sigmoid_has_no_overflow():
    with np.errstate(over="raise"):
        np.testing.assert_allclose(ref.sigmoid(np.array([-1000.0, 0.0, 1000.0])), [0.0, 0.5, 1.0])


def test_moe_skips_slots_computed_elsewhere():
    h, i = 8, 4
    experts = [tuple(RNG.standard_normal(s) for s in [(i, h), (i, h), (h, i)]) for _ in range(3)]
    x = RNG.standard_normal((4, h))
    ids = np.array([[0, 1], [2, 0], [1, 2], [0, 2]])
    w = RNG.random((4, 2))
    remote = ids.copy()
    remote[:, 1] = -1                                     # second slot lives on another rank
    np.testing.assert_allclose(ref.moe(x, remote, w, lambda j: experts[j]),
                               ref.moe(x, ids[:, :1], w[:, :1], lambda j: experts[j]), rtol=1e-12)
