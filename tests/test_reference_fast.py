"""The reference's fast paths against the straightforward formulation of the same math.

`reference.py` blocks attention over queries and computes only the keys a block can see,
runs experts once per expert with per-slot results summed at the end, and multiplies small
row counts with the weight on the left. Here each is compared with the plain formulation it
replaced (full score matrix with masks, `np.add.at` accumulation, `x @ W.T`), written out in
this file, op by op and through whole models (past the window, ragged batches, KV-cache
decode): equal to 1e-6 relative in float32, to 1e-12 in float64.
"""

import ml_dtypes
import numpy as np
import pytest

from mimo_v2_flash import MiMoV2FlashModel
from mimo_v2_flash import reference as ref
from mimo_v2_flash.layer import ReferenceOps, attention_sink
from mimo_v2_flash.weights import EXPERT_PROJS, FINAL_NORM, LM_HEAD, layer_weight

RNG = np.random.default_rng(2024)


def plain_attention(q, k, v, q_positions, k_positions, scale, window=None, sink=None):
    """All T x S scores at once, masked from positions, softmax with the sink in the normaliser."""
    t_len, hq, d = q.shape
    s_len, hkv, dv = v.shape
    group = hq // hkv
    scores = np.einsum("tkgd,skd->kgts", q.reshape(t_len, hkv, group, d), k) * scale
    qp, kp = np.asarray(q_positions)[:, None], np.asarray(k_positions)[None, :]
    visible = kp <= qp
    if window is not None:
        visible &= kp > qp - window
    scores = np.where(visible, scores, -np.inf)
    row_max = scores.max(axis=-1, keepdims=True)
    if sink is not None:
        sink_logit = sink.astype(scores.dtype).reshape(hkv, group, 1, 1)
        row_max = np.maximum(row_max, sink_logit)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    probs = np.exp(scores - row_max)
    denom = probs.sum(axis=-1, keepdims=True)
    if sink is not None:
        denom = denom + np.exp(sink_logit - row_max)
    probs = probs / np.where(denom > 0, denom, 1.0)
    return np.einsum("kgts,skd->tkgd", probs, v).reshape(t_len, hq, dv)


def plain_swiglu(x, gate, up, down):
    return ref.silu(x @ gate.T) * (x @ up.T) @ down.T


def plain_moe(x, expert_ids, expert_weights, experts):
    """Expert by expert, each result added into its tokens' rows with np.add.at."""
    out = np.zeros_like(x)
    flat = expert_ids.reshape(-1)
    token_of = np.repeat(np.arange(x.shape[0]), expert_ids.shape[1])
    weight_of = expert_weights.reshape(-1)
    for e in np.unique(flat[flat >= 0]):
        rows = np.nonzero(flat == e)[0]
        y = plain_swiglu(x[token_of[rows]], *experts(int(e)))
        np.add.at(out, token_of[rows], y * weight_of[rows, None].astype(x.dtype))
    return out


def rel(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


TOL = {np.float32: 1e-6, np.float64: 1e-12}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("t_len, s_len, hq, hkv, window, with_sink, shuffled", [
    (300, 300, 8, 2, None, False, False),     # full attention, several query blocks
    (300, 300, 8, 4, 128, True, False),       # sliding window, long past the window
    (1, 200, 8, 4, 128, True, True),          # decode against a ring buffer (keys out of order)
    (70, 230, 4, 4, 16, True, True),          # chunk of prefill on history
    (130, 400, 8, 2, None, True, True),       # chunk on a long full-attention history
    (5, 5, 2, 1, 3, False, False),
])
def test_blocked_attention_equals_full_score_matrix(dtype, t_len, s_len, hq, hkv, window, with_sink, shuffled):
    q = RNG.standard_normal((t_len, hq, 192)).astype(dtype)
    k = RNG.standard_normal((s_len, hkv, 192)).astype(dtype)
    v = RNG.standard_normal((s_len, hkv, 128)).astype(dtype)
    k_pos = np.arange(s_len) + 11
    q_pos = k_pos[-t_len:]
    if shuffled:
        order = RNG.permutation(s_len)
        k, v, k_pos = k[order], v[order], k_pos[order]
    sink = 2.0 * RNG.standard_normal(hq).astype(dtype) if with_sink else None
    got = ref.attention(q, k, v, q_pos, k_pos, 192 ** -0.5, window, sink)
    want = plain_attention(q, k, v, q_pos, k_pos, 192 ** -0.5, window, sink)
    assert got.dtype == dtype and got.shape == want.shape
    assert rel(got, want) < TOL[dtype]


def test_blocked_attention_with_queries_that_see_nothing():
    # Queries before every key (whole blocks see no key) and unsorted query positions.
    q = RNG.standard_normal((200, 4, 16))
    k, v = RNG.standard_normal((40, 2, 16)), RNG.standard_normal((40, 2, 8))
    k_pos = np.arange(40) + 150
    q_pos = RNG.permutation(200)
    for window, sink in [(None, None), (10, RNG.standard_normal(4))]:
        got = ref.attention(q, k, v, q_pos, k_pos, 0.25, window, sink)
        np.testing.assert_allclose(got, plain_attention(q, k, v, q_pos, k_pos, 0.25, window, sink),
                                   rtol=0, atol=1e-13)
        assert not got[q_pos < 150].any()


@pytest.mark.parametrize("rows", [1, 2, 3, 8, 16, 17, 64])
def test_matmul_wt_equals_x_times_w_transposed(rows):
    x = RNG.standard_normal((rows, 96)).astype(np.float32)
    w = RNG.standard_normal((80, 96)).astype(np.float32)
    got = ref.matmul_wt(x, w)
    assert got.flags.c_contiguous and got.dtype == np.float32
    assert rel(got, x.astype(np.float64) @ w.T.astype(np.float64)) < 1e-6


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("tokens", [1, 3, 40])
def test_moe_equals_add_at_accumulation(dtype, tokens):
    h, i, e, k = 32, 16, 12, 4
    experts = [tuple(RNG.standard_normal(s).astype(dtype) for s in [(i, h), (i, h), (h, i)]) for _ in range(e)]
    x = RNG.standard_normal((tokens, h)).astype(dtype)
    ids = np.stack([RNG.permutation(e)[:k] for _ in range(tokens)])
    ids[0, 1] = -1                                  # computed elsewhere
    if tokens > 1:
        ids[1, 2] = ids[1, 0]                       # a repeated expert (slots mapped from -1 to 0)
    w = RNG.random((tokens, k)).astype(dtype)
    got = ref.moe(x, ids, w, lambda j: experts[j])
    assert got.dtype == dtype
    assert rel(got, plain_moe(x, ids, w, lambda j: experts[j])) < TOL[dtype]


class PlainOps(ReferenceOps):
    """The reference layer with the straightforward attention, experts and products."""

    def attention(self, step, layer):
        window, sink = self.config.window_of(layer), attention_sink(self, layer)
        return np.concatenate([plain_attention(p.q, p.k, p.v, p.q_positions, p.k_positions,
                                               self.config.softmax_scale, window, sink) for p in step.problems()])

    def experts(self, x, layer, ids, weights, static_rows=None):
        return plain_moe(x, ids, weights, lambda e: self.expert_weights(layer, e))

    def linear(self, x, layer, proj):
        return x @ self.w(layer_weight(layer, proj)).T

    def dense_mlp(self, x, layer):
        return plain_swiglu(x, *(self.w(layer_weight(layer, proj)) for proj in EXPERT_PROJS))

    def logits(self, x, layer=None):
        norm = FINAL_NORM if layer is None else layer_weight(layer, "final")
        return ref.rmsnorm(x, self.w(norm), self.config.layernorm_epsilon) @ self.w(LM_HEAD).T


def _run_cases(model, vocab):
    """Long forward past the window, ragged cached batches, and single-token decode steps."""
    rng = np.random.default_rng(9)
    w = model.config.window_keys
    ids = rng.integers(0, vocab, (2, 3 * w + 5))
    out = [model.forward(ids)]
    cache = model.new_cache(3)
    out += model.forward_ragged([rng.integers(0, vocab, n) for n in (2 * w + 3, 4, 1)], cache)
    out += model.forward_ragged([rng.integers(0, vocab, n) for n in (1, 2 * w, 7)], cache)
    for _ in range(3):
        out += model.forward_ragged([rng.integers(0, vocab, 1) for _ in range(3)], cache)
    return out


@pytest.mark.parametrize("preset, vocab", [("tiny", 512), ("small", 2048)])
def test_model_logits_equal_the_straightforward_formulation(preset, vocab):
    model = MiMoV2FlashModel.random(preset, seed=5)
    plain = MiMoV2FlashModel.random(preset, seed=5)
    plain.ops = PlainOps(plain.config, plain.weights)
    plain.expert_executor.ops = plain.ops
    for got, want in zip(_run_cases(model, vocab), _run_cases(plain, vocab), strict=True):
        assert rel(got, want) < 1e-6


def test_weights_are_used_in_place_and_other_dtypes_converted_once():
    model = MiMoV2FlashModel.random("tiny", seed=0)
    name = "model.layers.1.self_attn.q_proj.weight"
    assert model.ops.w(name) is model.weights[name]             # float32: no copy, per call or once
    weights = dict(model.weights)
    weights[name] = model.weights[name].astype(ml_dtypes.bfloat16)
    ops = ReferenceOps(model.config, weights)
    first = ops.w(name)
    assert first.dtype == np.float32 and ops.w(name) is first
    np.testing.assert_array_equal(first, weights[name].astype(np.float32))
