"""The NumPy reference of MiMo-V2-Flash: one function per operation, exactly the spec's math.

All weights use the Hub layout `W[out, in]` (`y = x @ W.T`). Arithmetic is float32 unless the
inputs are float64 (tests use float64 to check formulations against each other). This module is
the oracle for the kernels and for the expert-parallel runtime; it reads like the spec
(`../shared/docs/mimo_v2_flash_spec.md` section 3) and is also the fast CPU path: weights
already in the math's dtype are used in place (never copied per call), attention computes
only the keys a block of queries can see, and experts run once on all of their tokens.
"""

from __future__ import annotations

import numpy as np

# Queries per attention block: scores take O(block x keys) memory, and a sliding-window block
# computes block + window - 1 keys per query row instead of all of them.
ATTENTION_BLOCK = 128
WINDOW_BLOCK = 64
# Up to this many rows, `x @ W.T` runs as `(W @ x.T).T`: OpenBLAS's GEMM with 2-16 rows on the
# left reaches a fraction of the one-row bandwidth, with the weight on the left it does not
# (decode batches, experts holding a few tokens; measured in benchmarks/bench_vs_transformers.py).
SMALL_ROWS = 16


def _float(x: np.ndarray) -> np.ndarray:
    """float32 unless already float64 (keeps test precision)."""
    return x if x.dtype == np.float64 else np.asarray(x, dtype=np.float32)


def _as(weight: np.ndarray, dtype) -> np.ndarray:
    """`weight` in the math's dtype, without a copy when it already is (weights are large)."""
    return np.asarray(weight, dtype=dtype)


def matmul_wt(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """`x @ weight.T` for x [N, in] and a weight [out, in] of x's dtype (no copy of the weight)."""
    if 1 < x.shape[0] <= SMALL_ROWS:
        return np.ascontiguousarray((weight @ x.T).T)
    return x @ weight.T


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """`x / sqrt(mean(x^2) + eps) * weight` over the last axis, statistics in fp32 (no 1+w offset)."""
    x = _float(x)
    variance = np.mean(x * x, axis=-1, keepdims=True)
    return x / np.sqrt(variance + eps) * _as(weight, x.dtype)


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

    Computed per block of queries over the keys that block can see (keys sorted by position,
    so that is one contiguous range): memory O(block x keys), and a sliding-window layer costs
    O(T x window) whatever the sequence length.
    """
    q, k, v = _float(q), _float(k), _float(v)
    t_len, hq, d = q.shape
    s_len, hkv, dv = v.shape
    group = hq // hkv
    q_positions, k_positions = np.asarray(q_positions), np.asarray(k_positions)
    if s_len > 1 and not np.all(k_positions[1:] > k_positions[:-1]):
        order = np.argsort(k_positions, kind="stable")
        k, v, k_positions = k[order], v[order], k_positions[order]
    k_heads = k.transpose(1, 2, 0)                      # [Hkv, D, S]
    v_heads = v.transpose(1, 0, 2)                      # [Hkv, S, Dv]
    sink_logit = None if sink is None else _float(sink).astype(q.dtype).reshape(hkv, 1, group, 1)
    out = np.empty((t_len, hq, dv), q.dtype)
    block = ATTENTION_BLOCK if window is None else WINDOW_BLOCK
    for t0 in range(0, t_len, block):
        qp = q_positions[t0:t0 + block]
        first = 0 if window is None else int(np.searchsorted(k_positions, qp.min() - window, "right"))
        last = int(np.searchsorted(k_positions, qp.max(), "right"))
        if first >= last:                                # no key visible: weights all zero
            out[t0:t0 + block] = 0.0
            continue
        out[t0:t0 + block] = _attention_block(q[t0:t0 + block], k_heads[:, :, first:last],
                                              v_heads[:, first:last], qp, k_positions[first:last],
                                              scale, window, sink_logit)
    return out


def _attention_block(q, k_heads, v_heads, q_positions, k_positions, scale, window, sink_logit):
    """Softmax attention of queries q [T, Hq, D] over keys k_heads [Hkv, D, S] (the spec's
    formulation; `attention` picks the keys)."""
    t_len, hq, d = q.shape
    hkv, _, s_len = k_heads.shape
    group = hq // hkv
    dv = v_heads.shape[2]
    q_heads = q.reshape(t_len, hkv, group, d).transpose(1, 0, 2, 3).reshape(hkv, t_len * group, d)
    scores = np.matmul(q_heads, k_heads).reshape(hkv, t_len, group, s_len)
    scores *= scale
    visible = k_positions[None, :] <= q_positions[:, None]
    if window is not None:
        visible &= k_positions[None, :] > q_positions[:, None] - window
    if not visible.all():
        np.copyto(scores, -np.inf, where=~visible[None, :, None, :])
    row_max = scores.max(axis=-1, keepdims=True)
    if sink_logit is not None:
        row_max = np.maximum(row_max, sink_logit)
    row_max[~np.isfinite(row_max)] = 0.0                # a row with nothing visible
    scores -= row_max
    probs = np.exp(scores, out=scores)
    denom = probs.sum(axis=-1, keepdims=True)
    if sink_logit is not None:
        denom += np.exp(sink_logit - row_max)
    denom[denom <= 0] = 1.0
    probs /= denom
    out = np.matmul(probs.reshape(hkv, t_len * group, s_len), v_heads)         # [Hkv, T*G, Dv]
    return out.reshape(hkv, t_len, group, dv).transpose(1, 0, 2, 3).reshape(t_len, hq, dv)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (np.tanh(0.5 * x) + 1.0)   # overflow-free form of 1 / (1 + exp(-x))


def silu(x: np.ndarray) -> np.ndarray:
    return x * sigmoid(x)


def router_scores(x: np.ndarray, gate_weight: np.ndarray) -> np.ndarray:
    """Unbiased sigmoid scores [T, E] from fp32 logits (never lower precision: mis-routing)."""
    x = _float(x)
    return sigmoid(matmul_wt(x, _as(gate_weight, x.dtype)))


def select_experts(scores: np.ndarray, correction_bias: np.ndarray, top_k: int,
                   allowed: np.ndarray | None = None) -> np.ndarray:
    """Top-k expert ids [T, k] ranked by `scores + correction_bias` (the bias selects only).

    Ties go to the lower expert id (a stable sort), so exactly k distinct experts are chosen.
    `allowed` [E] bool restricts the choice (an expert-subset model routes among loaded experts).
    """
    choice = scores + _as(correction_bias, scores.dtype)[None, :]
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
    gate = matmul_wt(x, _as(gate_proj, dt))
    hidden = np.multiply(gate, 0.5)          # silu(gate) = gate * sigmoid(gate), in place:
    np.tanh(hidden, out=hidden)              # the same operations as `silu`, no temporaries
    hidden += 1.0
    hidden *= 0.5
    hidden *= gate
    hidden *= matmul_wt(x, _as(up_proj, dt))
    return matmul_wt(hidden, _as(down_proj, dt))


def moe(x: np.ndarray, expert_ids: np.ndarray, expert_weights: np.ndarray, experts) -> np.ndarray:
    """Sum over each token's chosen experts of weight * expert(x); no shared expert.

    `experts(e)` returns expert e's (gate [I, H], up [I, H], down [H, I]). Tokens are grouped by
    expert so each expert runs once on all of its tokens; each (token, slot) result lands in its
    own row and the k slots of a token are summed at the end. A slot with id -1 is skipped (its
    expert is computed elsewhere, e.g. on another rank).
    """
    x = _float(x)
    t_len, top_k = expert_ids.shape
    flat_ids = expert_ids.reshape(-1)
    if flat_ids.size == 0:
        return np.zeros_like(x)
    weight_of = _as(expert_weights, x.dtype).reshape(-1)
    by_expert = np.argsort(flat_ids, kind="stable")       # slots grouped by expert, in slot order
    sorted_ids = flat_ids[by_expert]
    bounds = np.flatnonzero(np.diff(sorted_ids)) + 1
    per_slot = np.zeros((t_len * top_k, x.shape[1]), x.dtype)
    for rows in np.split(by_expert, bounds):
        e = int(flat_ids[rows[0]])
        if e < 0:
            continue
        per_slot[rows] = swiglu(x[rows // top_k], *experts(e)) * weight_of[rows, None]
    return per_slot.reshape(t_len, top_k, -1).sum(axis=1)


def linear(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """`x @ W.T` with the Hub layout W [out, in]."""
    x = _float(x)
    return matmul_wt(x, _as(weight, x.dtype))
