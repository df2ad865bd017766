"""The decoder layer, written once over an `ops` object, so the NumPy reference and the NKI
kernels run the same block (a backend supplies the ops; `ReferenceOps` is the oracle).

Tokens of a batch are flat, `x [N, H]`, grouped by sequence (`TokenBatch`); everything but
attention is per token, and attention runs per sequence against that sequence's cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import reference as ref
from .config import MiMoV2FlashConfig
from .kv_cache import KVCache
from .weights import EMBED, FINAL_NORM, LM_HEAD, expert_prefix, layer_prefix


@dataclass
class TokenBatch:
    """Flat tokens of a ragged batch: sequence `seqs[i]` owns rows `starts[i]:stops[i]`."""
    seqs: list[int]
    starts: list[int]
    stops: list[int]
    positions: np.ndarray      # [N] absolute position of every token in its sequence

    def segments(self):
        return zip(self.seqs, self.starts, self.stops)


@dataclass
class AttentionInput:
    """One sequence's attention problem: new queries against cached plus new keys."""
    q: np.ndarray              # [T, Hq, D]
    k: np.ndarray              # [S, Hkv, D]
    v: np.ndarray              # [S, Hkv, Dv] (already scaled by attention_value_scale)
    q_positions: np.ndarray    # [T]
    k_positions: np.ndarray    # [S]


class ReferenceOps:
    """The NumPy reference path; a kernel backend implements the same methods."""

    name = "reference"

    def __init__(self, config: MiMoV2FlashConfig, weights, allowed_experts: np.ndarray | None = None):
        self.config = config
        self.weights = weights
        self.allowed_experts = allowed_experts
        self._float32: dict[str, np.ndarray] = {}   # weights stored in another dtype, converted once

    def w(self, name: str) -> np.ndarray:
        """Weight `name` in float32, the dtype the math uses: the stored array itself when it is
        float32 (as every loader here gives), otherwise a float32 copy made on first use."""
        weight = self.weights[name]
        if weight.dtype == np.float32:
            return weight
        if name not in self._float32:
            self._float32[name] = np.asarray(weight, np.float32)
        return self._float32[name]

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return self.w(EMBED)[ids].astype(np.float32)

    def rmsnorm(self, x, weight_name):
        return ref.rmsnorm(x, self.w(weight_name), self.config.layernorm_epsilon)

    def add_rmsnorm(self, x, delta, weight_name):
        """The residual add fused with the next norm: (x + delta, rmsnorm(x + delta))."""
        total = x + delta
        return total, self.rmsnorm(total, weight_name)

    def linear(self, x, weight_name):
        return ref.linear(x, self.w(weight_name))

    def rope(self, x, positions, theta):
        return ref.apply_partial_rope(x, positions, self.config.rotary_dim, theta)

    def qkv(self, x, layer):
        """The q, k and v projections of one layer: [N, Hq*D], [N, Hkv*D], [N, Hkv*Dv]
        (one op so a kernel backend can run them as one launch over concatenated weights)."""
        p = layer_prefix(layer) + "self_attn."
        return tuple(self.linear(x, p + f"{name}_proj.weight") for name in "qkv")

    def rope_qk(self, q, k, positions, theta):
        """RoPE of q [N, Hq, D] and k [N, Hkv, D] at the same positions (one launch on kernels)."""
        return self.rope(q, positions, theta), self.rope(k, positions, theta)

    def norm_qkv_rope(self, x, layer, positions, theta):
        """The attention's input: input RMSNorm, q/k/v projections, RoPE of q and k (one launch on
        kernels). Returns q [N, Hq, D], k [N, Hkv, D] (rotated) and v [N, Hkv*Dv]."""
        heads, kv_heads, d, _ = self.config.attention_shape(layer)
        n = x.shape[0]
        q, k, v = self.qkv(self.rmsnorm(x, layer_prefix(layer) + "input_layernorm.weight"), layer)
        q, k = self.rope_qk(q.reshape(n, heads, d), k.reshape(n, kv_heads, d), positions, theta)
        return q, k, v

    def linear_add_rmsnorm(self, x, a, weight_name, norm_name):
        """A projection of `a` added to the residual x, and the next norm: (x + a W^T, its rmsnorm)
        (o_proj and the post-attention norm; one launch on kernels)."""
        return self.add_rmsnorm(x, self.linear(a, weight_name), norm_name)

    def attention(self, problems: list[AttentionInput], window, sink) -> list[np.ndarray]:
        return [ref.attention(p.q, p.k, p.v, p.q_positions, p.k_positions,
                              self.config.softmax_scale, window, sink) for p in problems]

    def router(self, x, layer):
        p = layer_prefix(layer) + "mlp.gate."
        return ref.router(x, self.w(p + "weight"), self.w(p + "e_score_correction_bias"),
                          self.config.num_experts_per_tok, self.config.routed_scaling_factor,
                          self.allowed_experts)

    def expert_weights(self, layer, expert):
        p = expert_prefix(layer, expert)
        try:
            return tuple(self.w(p + f"{proj}.weight") for proj in ("gate_proj", "up_proj", "down_proj"))
        except KeyError:
            raise KeyError(f"layer {layer}: expert {expert} is not loaded in this model") from None

    def experts(self, x, layer, ids, weights):
        return ref.moe(x, ids, weights, lambda e: self.expert_weights(layer, e))

    def dense_mlp(self, x, layer):
        p = layer_prefix(layer) + "mlp."
        return ref.swiglu(x, self.w(p + "gate_proj.weight"), self.w(p + "up_proj.weight"),
                          self.w(p + "down_proj.weight"))

    def logits(self, x):
        return ref.linear(self.rmsnorm(x, FINAL_NORM), self.w(LM_HEAD))


class CheckedOps:
    """Runs every op on a backend and on the reference, returns the backend's result and records
    the largest relative difference per op ("numpy-reference-checked").

    Both backends see the same inputs, so each recorded number is that op's own error, not the
    error accumulated through the layer. `differences[op] = max |a - b| / max |b|`. Routing is
    compared as the fraction of (token, slot) expert ids that differ.
    """

    _COMPARED = ("embed", "rmsnorm", "add_rmsnorm", "linear", "qkv", "rope", "rope_qk", "norm_qkv_rope",
                 "linear_add_rmsnorm", "attention", "router", "experts", "dense_mlp", "logits")

    def __init__(self, backend, reference):
        self.backend, self.reference = backend, reference
        self.differences: dict[str, float] = {}

    def __getattr__(self, name):
        primary = getattr(self.backend, name)
        if name not in self._COMPARED:
            return primary

        def checked(*args, **kwargs):
            got = primary(*args, **kwargs)
            want = getattr(self.reference, name)(*args, **kwargs)
            if name == "router":
                diff = float(np.mean(np.sort(got[0], -1) != np.sort(want[0], -1)))
            else:
                pairs = zip(got, want) if isinstance(got, (list, tuple)) else [(got, want)]
                diff = max(float(np.abs(np.asarray(a, np.float32) - b).max() / max(np.abs(b).max(), 1e-30))
                           for a, b in pairs)
            self.differences[name] = max(self.differences.get(name, 0.0), diff)
            return got
        return checked


class LocalExperts:
    """Runs a layer's routed experts in this process (the default expert executor).

    An expert executor is any callable `(layer, x [N, H], ids [N, k], weights [N, k]) -> [N, H]`;
    `parallel` provides one that dispatches tokens to the ranks owning the experts.
    """

    def __init__(self, ops):
        self.ops = ops

    def __call__(self, layer, x, ids, weights):
        return self.ops.experts(x, layer, ids, weights)


def attention_block(ops, config: MiMoV2FlashConfig, layer: int, x: np.ndarray,
                    batch: TokenBatch, cache: KVCache | None) -> np.ndarray:
    """Input norm, projections and partial RoPE (one op), value scale, per-sequence attention with
    the cache; returns the attention output [N, Hq*Dv] (o_proj is fused with the residual add)."""
    heads, kv_heads, d, dv = config.attention_shape(layer)
    p = layer_prefix(layer) + "self_attn."
    n = x.shape[0]
    q, k, v = ops.norm_qkv_rope(x, layer, batch.positions, config.rope_theta_of(layer))
    v = v.reshape(n, kv_heads, dv) * np.float32(config.attention_value_scale)
    problems = []
    for seq, start, stop in batch.segments():
        pos = batch.positions[start:stop]
        if cache is None:
            keys, values, key_pos = k[start:stop], v[start:stop], pos
        else:
            keys, values, key_pos = cache.layers[layer].update(seq, pos, k[start:stop], v[start:stop])
        problems.append(AttentionInput(q[start:stop], keys, values, pos, key_pos))
    sink = ops.w(p + "attention_sink_bias").astype(np.float32) if config.has_sink(layer) else None
    outs = ops.attention(problems, config.window_of(layer), sink)
    return np.concatenate(outs).reshape(n, heads * dv)


def decoder_layer(ops, config: MiMoV2FlashConfig, layer: int, x: np.ndarray, batch: TokenBatch,
                  cache: KVCache | None, expert_executor) -> np.ndarray:
    """h = x + attn(norm(x)); out = h + ffn(norm(h)), with dense SwiGLU or the routed MoE."""
    p = layer_prefix(layer)
    attn = attention_block(ops, config, layer, x, batch, cache)
    h, hn = ops.linear_add_rmsnorm(x, attn, p + "self_attn.o_proj.weight", p + "post_attention_layernorm.weight")
    if not config.is_moe(layer):
        return h + ops.dense_mlp(hn, layer)
    ids, weights = ops.router(hn, layer)
    return h + expert_executor(layer, hn, ids, weights)
