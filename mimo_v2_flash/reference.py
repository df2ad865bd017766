"""The NumPy reference of MiMo-V2-Flash: one function per operation, exactly the spec's math.

All weights use the Hub layout `W[out, in]` (`y = x @ W.T`). Arithmetic is float32 unless the
inputs are float64 (tests use float64 to check formulations against each other). This module is
the oracle for the kernels and for the expert-parallel runtime; it favours reading like the spec
(`../shared/docs/mimo_v2_flash_spec.md` section 3) over speed, but every function is vectorised.
"""

from __future__ import annotations

import numpy as np


def _float(x: np.ndarray) -> np.ndarray:
    """float32 unless already float64 (keeps test precision)."""
    return x if x.dtype == np.float64 else np.asarray(x, dtype=np.float32)


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """`x / sqrt(mean(x^2) + eps) * weight` over the last axis, statistics in fp32 (no 1+w offset)."""
    x = _float(x)
    variance = np.mean(x * x, axis=-1, keepdims=True)
    return x / np.sqrt(variance + eps) * weight.astype(x.dtype)


def rope_cos_sin(positions: np.ndarray, rotary_dim: int, theta: float, dtype=np.float32):
    """cos and sin tables [T, rotary_dim / 2]: angle[t, i] = p_t * theta^(-2i / rotary_dim)."""
    half = rotary_dim // 2
    inv_freq = 1.0 / theta ** (np.arange(half, dtype=np.float64) * 2.0 / rotary_dim)
    angle = np.asarray(positions, dtype=np.float64)[:, None] * inv_freq[None, :]
    return np.cos(angle).astype(dtype), np.sin(angle).astype(dtype)


def apply_partial_rope(x: np.ndarray, positions: np.ndarray, rotary_dim: int, theta: float) -> np.ndarray:
    """Rotate-half (NeoX) RoPE on the first `rotary_dim` dims of every head; the rest untouched.

    x [T, heads, D]; dim i of the rotated slice pairs with dim i + rotary_dim/2.
    """
    x = _float(x)
    cos, sin = rope_cos_sin(positions, rotary_dim, theta, x.dtype)
    cos, sin = cos[:, None, :], sin[:, None, :]          # [T, 1, R/2]
    half = rotary_dim // 2
    x1, x2 = x[..., :half], x[..., half:rotary_dim]
    out = x.copy()
    out[..., :half] = x1 * cos - x2 * sin
    out[..., half:rotary_dim] = x2 * cos + x1 * sin
    return out


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_positions: np.ndarray,
              k_positions: np.ndarray, scale: float, window: int | None = None,
              sink: np.ndarray | None = None) -> np.ndarray:
    """Grouped-query attention of one sequence, masks from absolute positions.

    q [T, Hq, D], k [S, Hkv, D], v [S, Hkv, Dv]; query head h reads KV head h // (Hq / Hkv).
    A key j is visible to query t iff k_pos[j] <= q_pos[t] and, with a window of W keys,
    k_pos[j] > q_pos[t] - W (W keys including the query itself). Keys may come in any order
    (a ring-buffer cache). `sink` [Hq] is a per-head logit that joins the softmax normaliser
    and carries no value. Returns [T, Hq, Dv].
    """
    q, k, v = _float(q), _float(k), _float(v)
    t_len, hq, d = q.shape
    s_len, hkv, dv = v.shape
    group = hq // hkv
    qg = q.reshape(t_len, hkv, group, d)
    scores = np.einsum("tkgd,skd->kgts", qg, k, optimize=True) * scale           # [Hkv, G, T, S]
    qp = np.asarray(q_positions)[:, None]
    kp = np.asarray(k_positions)[None, :]
    visible = kp <= qp
    if window is not None:
        visible &= kp > qp - window
    scores = np.where(visible, scores, -np.inf)
    row_max = scores.max(axis=-1, keepdims=True)
    if sink is not None:
        sink_logit = _float(sink).astype(scores.dtype).reshape(hkv, group, 1, 1)
        row_max = np.maximum(row_max, sink_logit)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)        # a row with nothing visible
    probs = np.exp(scores - row_max)
    denom = probs.sum(axis=-1, keepdims=True)
    if sink is not None:
        denom = denom + np.exp(sink_logit - row_max)
    probs = probs / np.where(denom > 0, denom, 1.0)
    out = np.einsum("kgts,skd->tkgd", probs, v, optimize=True)                   # [T, Hkv, G, Dv]
    return out.reshape(t_len, hq, dv)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (np.tanh(0.5 * x) + 1.0)   # overflow-free form of 1 / (1 + exp(-x))


def silu(x: np.ndarray) -> np.ndarray:
    return x * sigmoid(x)


def router_scores(x: np.ndarray, gate_weight: np.ndarray) -> np.ndarray:
    """Unbiased sigmoid scores [T, E] from fp32 logits (never lower precision: mis-routing)."""
    logits = _float(x).astype(np.float64 if x.dtype == np.float64 else np.float32) @ \
        gate_weight.astype(np.float64 if x.dtype == np.float64 else np.float32).T
    return sigmoid(logits)


def select_experts(scores: np.ndarray, correction_bias: np.ndarray, top_k: int,
                   allowed: np.ndarray | None = None) -> np.ndarray:
    """Top-k expert ids [T, k] ranked by `scores + correction_bias` (the bias selects only).

    Ties go to the lower expert id (a stable sort), so exactly k distinct experts are chosen.
    `allowed` [E] bool restricts the choice (an expert-subset model routes among loaded experts).
    """
    choice = scores + correction_bias.astype(scores.dtype)[None, :]
    if allowed is not None:
        if allowed.sum() < top_k:
            raise ValueError(f"only {int(allowed.sum())} experts are allowed but top_k is {top_k}")
        choice = np.where(allowed[None, :], choice, -np.inf)
    return np.argsort(-choice, axis=-1, kind="stable")[:, :top_k]


def router(x: np.ndarray, gate_weight: np.ndarray, correction_bias: np.ndarray, top_k: int,
           routed_scaling_factor: float = 1.0, allowed: np.ndarray | None = None):
    """MiMo's noaux_tc sigmoid router: (expert ids [T, k], weights [T, k]).

    Weights are the unbiased sigmoid scores of the chosen experts, renormalised to sum 1
    (`norm_topk_prob`), times `routed_scaling_factor` (1.0 for MiMo).
    """
    scores = router_scores(x, gate_weight)
    ids = select_experts(scores, correction_bias, top_k, allowed)
    weights = np.take_along_axis(scores, ids, axis=-1)
    weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
    return ids, (weights * routed_scaling_factor).astype(scores.dtype)


def swiglu(x: np.ndarray, gate_proj: np.ndarray, up_proj: np.ndarray, down_proj: np.ndarray) -> np.ndarray:
    """`down(silu(gate(x)) * up(x))`, weights [I, H], [I, H], [H, I]; the expert and the dense MLP."""
    x = _float(x)
    dt = x.dtype
    hidden = silu(x @ gate_proj.astype(dt).T) * (x @ up_proj.astype(dt).T)
    return hidden @ down_proj.astype(dt).T


def moe(x: np.ndarray, expert_ids: np.ndarray, expert_weights: np.ndarray, experts) -> np.ndarray:
    """Sum over each token's chosen experts of weight * expert(x); no shared expert.

    `experts(e)` returns expert e's (gate [I, H], up [I, H], down [H, I]). Tokens are grouped by
    expert so each expert runs once on all of its tokens. A slot with id -1 is skipped (its
    expert is computed elsewhere, e.g. on another rank).
    """
    x = _float(x)
    out = np.zeros_like(x)
    flat_ids = expert_ids.reshape(-1)
    token_of = np.repeat(np.arange(x.shape[0]), expert_ids.shape[1])
    weight_of = expert_weights.reshape(-1)
    for e in np.unique(flat_ids[flat_ids >= 0]):
        rows = np.nonzero(flat_ids == e)[0]
        tokens = token_of[rows]
        y = swiglu(x[tokens], *experts(int(e)))
        np.add.at(out, tokens, y * weight_of[rows, None].astype(x.dtype))
    return out


def linear(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """`x @ W.T` with the Hub layout W [out, in]."""
    x = _float(x)
    return x @ weight.astype(x.dtype).T


# ---- multi-token prediction (spec 3.7, docs/mtp.md) --------------------------------------------
def mtp_combine(embedding: np.ndarray, hidden: np.ndarray, enorm: np.ndarray, hnorm: np.ndarray,
                eh_proj: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """An MTP layer's input: `eh_proj(concat(enorm(e), hnorm(h)))`, embedding first.

    `embedding` [N, H] is the (shared) embedding of the token after the one `hidden` [N, H] sits
    at; `eh_proj` is [H, 2H] (Hub layout). The result enters the layer's SWA attention block."""
    both = np.concatenate([rmsnorm(embedding, enorm, eps), rmsnorm(hidden, hnorm, eps)], axis=-1)
    return linear(both, eh_proj)


def mtp_logits(hidden: np.ndarray, final_layernorm: np.ndarray, lm_head: np.ndarray,
               eps: float = 1e-5) -> np.ndarray:
    """An MTP layer's draft logits: its own final_layernorm, then the main model's lm_head."""
    return linear(rmsnorm(hidden, final_layernorm, eps), lm_head)
