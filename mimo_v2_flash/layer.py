"""The decoder layer, written once over an `ops` backend (`ops.DecoderOps`), so the NumPy
reference and the NKI kernels run the same block (`ReferenceOps` is the oracle).

Read top-down: `decoder_layer` (token rows in, token rows out), `attention_block`, then the
token-batch types and the backends. Tokens of a batch are flat, `x [N, H]`, grouped by sequence
(`TokenBatch`); everything but attention is per token, and attention runs per sequence against
that sequence's cache. Ops are addressed by (layer, role); only weights.py spells tensor names.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import reference as ref
from .config import MiMoV2FlashConfig
from .kv_cache import LayerCaches
from .ops import DecoderOps
from .weights import EMBED, EXPERT_PROJS, FINAL_NORM, LM_HEAD, expert_weight, layer_weight


def decoder_layer(ops: DecoderOps, config: MiMoV2FlashConfig, layer: int, x: np.ndarray, batch: TokenBatch,
                  cache: LayerCaches | None, expert_executor) -> np.ndarray:
    """h = x + attn(norm(x)); out = h + ffn(norm(h)), with dense SwiGLU or the routed MoE."""
    attn = attention_block(ops, config, layer, x, batch, cache)
    h, hn = ops.linear_add_rmsnorm(x, attn, layer, "o_proj", "post_attention")
    if not config.is_moe(layer):
        return h + ops.dense_mlp(hn, layer)
    ids, weights = ops.router(hn, layer)
    return h + expert_executor(layer, hn, ids, weights)


def attention_block(ops: DecoderOps, config: MiMoV2FlashConfig, layer: int, x: np.ndarray,
                    batch: TokenBatch, cache: LayerCaches | None) -> np.ndarray:
    """Input norm, projections and partial RoPE (one op), value scale, per-sequence attention with
    the cache; returns the attention output [N, Hq*Dv] before o_proj (which is fused with the
    residual add and the next norm)."""
    heads, kv_heads, d, dv = config.attention_shape(layer)
    n = x.shape[0]
    q, k, v = ops.norm_qkv_rope(x, layer, batch.positions)
    v = v.reshape(n, kv_heads, dv) * np.float32(config.attention_value_scale)
    step = AttentionStep(q, k, v, batch, None if cache is None else cache.layers[layer])
    return ops.attention(step, layer).reshape(n, heads * dv)


@dataclass
class TokenBatch:
    """Flat tokens of a ragged batch: sequence `seqs[i]` owns rows `starts[i]:stops[i]`."""
    seqs: list[int]
    starts: list[int]
    stops: list[int]
    positions: np.ndarray      # [N] absolute position of every token in its sequence

    def segments(self):
        return zip(self.seqs, self.starts, self.stops)


class AttentionStep:
    """One layer's attention in a pass: the new tokens' q [N, Hq, D], k [N, Hkv, D] and v [N, Hkv, Dv]
    (flat rows of `batch`, v already scaled) and the layer's cache (a `kv_cache.LayerCacheBase`;
    None: every sequence attends over its new tokens only).

    A backend either takes `problems()` (per sequence the keys to attend over, gathered in model
    layout) or reads the cache itself after `write_cache()` (the kernel backend on a static cache).
    Either writes the new keys into the cache, once: the first call does it (`CheckedOps` runs two
    backends on one step, and gathers first, since a ring write overwrites keys a gather needs)."""

    def __init__(self, q, k, v, batch: TokenBatch, cache):
        self.q, self.k, self.v, self.batch, self.cache = q, k, v, batch, cache
        self._problems: list[AttentionInput] | None = None
        self._written = cache is None

    def problems(self) -> list[AttentionInput]:
        """Per sequence of the batch: its queries against the cached keys and its new ones (the
        cache's `update`: written and gathered in one go)."""
        if self._problems is None:
            if self._written and self.cache is not None:
                raise RuntimeError("AttentionStep: the cache was written in place already; gather the "
                                   "problems before write_cache()")
            self._problems = []
            new_k, new_v = self.k, self.v
            if self.cache is not None and getattr(self.cache, "device", None) is None:
                new_k, new_v = host_values((new_k, new_v))   # a host cache (the ragged KVCache) holds NumPy
            for seq, start, stop in self.batch.segments():
                pos, k, v = self.batch.positions[start:stop], new_k[start:stop], new_v[start:stop]
                keys, values, key_pos = (k, v, pos) if self.cache is None else self.cache.update(seq, pos, k, v)
                self._problems.append(AttentionInput(self.q[start:stop], keys, values, pos, key_pos))
            self._written = True
        return self._problems

    def on_host(self) -> AttentionStep:
        """This step's values as NumPy (device tensors read back, `host_values`) for the reference
        under `CheckedOps`: its problems gathered (and the cache written) by this step first."""
        twin = AttentionStep(*(host_values(a) for a in (self.q, self.k, self.v)), self.batch, None)
        twin._problems = [AttentionInput(*(host_values(a) for a in (p.q, p.k, p.v)), p.q_positions, p.k_positions)
                          for p in self.problems()]
        return twin

    def write_cache(self) -> None:
        """Write the new keys of every sequence into the cache (nothing gathered)."""
        if not self._written:
            for seq, start, stop in self.batch.segments():
                self.cache.store(seq, self.batch.positions[start:stop], self.k[start:stop], self.v[start:stop])
            self._written = True


@dataclass
class AttentionInput:
    """One sequence's attention problem: new queries against cached plus new keys."""
    q: np.ndarray              # [T, Hq, D]
    k: np.ndarray              # [S, Hkv, D]
    v: np.ndarray              # [S, Hkv, Dv] (already scaled by attention_value_scale)
    q_positions: np.ndarray    # [T]
    k_positions: np.ndarray    # [S]


def host_values(value):
    """`value` as NumPy for the host: device tensors read back (`mimo_kernels.launch.to_host`, one
    counted read for a tuple of them) as float32 (integers kept), an `AttentionStep` as its host
    twin; NumPy arrays and anything else as they are."""
    if isinstance(value, AttentionStep):
        return value.on_host()
    if isinstance(value, (tuple, list)) and any(isinstance(v, AttentionStep) for v in value):
        return type(value)(host_values(v) for v in value)
    items = value if isinstance(value, (tuple, list)) else (value,)
    if not any(hasattr(v, "detach") for v in items):          # no torch tensor: nothing to read
        return value
    from mimo_kernels.launch import to_host      # kernels load only for a kernel backend's values
    return _float32(to_host(value))


def _float32(value):
    """Floating arrays (bf16 included) as float32, integer arrays as they are, tuples elementwise."""
    if isinstance(value, tuple):
        return tuple(_float32(v) for v in value)
    if isinstance(value, np.ndarray) and value.dtype.kind not in "biu":
        return value.astype(np.float32)
    return value


class LocalExperts:
    """Runs a layer's routed experts in this process (the default expert executor).

    An expert executor is any callable `(layer, x [N, H], ids [N, k], weights [N, k]) -> [N, H]`;
    `parallel` provides one that dispatches tokens to the ranks owning the experts.
    """

    def __init__(self, ops):
        self.ops = ops

    def __call__(self, layer, x, ids, weights):
        return self.ops.experts(x, layer, ids, weights)


def attention_sink(ops, layer: int) -> np.ndarray | None:
    """Layer `layer`'s attention sink bias [Hq] as float32 (None for a layer without one), from a
    backend's `config` and Hub-named `weights`."""
    if not ops.config.has_sink(layer):
        return None
    return np.asarray(ops.weights[layer_weight(layer, "sink")]).astype(np.float32)


class ReferenceOps:
    """The NumPy reference backend (`ops.DecoderOps`, whose docstrings give every op's shapes)."""

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

    def rmsnorm(self, x, layer, norm):
        return ref.rmsnorm(x, self.w(layer_weight(layer, norm)), self.config.layernorm_epsilon)

    def add_rmsnorm(self, x, delta, layer, norm):
        total = x + delta
        return total, self.rmsnorm(total, layer, norm)

    def linear(self, x, layer, proj):
        return ref.linear(x, self.w(layer_weight(layer, proj)))

    def norm_qkv_rope(self, x, layer, positions):
        heads, kv_heads, d, _ = self.config.attention_shape(layer)
        xn = self.rmsnorm(x, layer, "input")
        q, k, v = (self.linear(xn, layer, proj) for proj in ("q_proj", "k_proj", "v_proj"))
        theta = self.config.rope_theta_of(layer)
        q, k = (ref.apply_partial_rope(t.reshape(len(x), h, d), positions, self.config.rotary_dim, theta)
                for t, h in ((q, heads), (k, kv_heads)))
        return q, k, v

    def linear_add_rmsnorm(self, x, a, layer, proj, norm):
        return self.add_rmsnorm(x, self.linear(a, layer, proj), layer, norm)

    def attention(self, step: AttentionStep, layer) -> np.ndarray:
        window, sink = self.config.window_of(layer), attention_sink(self, layer)
        return np.concatenate([ref.attention(p.q, p.k, p.v, p.q_positions, p.k_positions,
                                             self.config.softmax_scale, window, sink) for p in step.problems()])

    def router(self, x, layer):
        gate, bias = self.w(layer_weight(layer, "router")), self.w(layer_weight(layer, "router_bias"))
        return ref.router(x, gate, bias, self.config.num_experts_per_tok, self.config.routed_scaling_factor,
                          self.allowed_experts)

    def expert_weights(self, layer, expert):
        """(gate_proj, up_proj, down_proj) of one routed expert, Hub layout float32."""
        try:
            return tuple(self.w(expert_weight(layer, expert, proj)) for proj in EXPERT_PROJS)
        except KeyError:
            raise KeyError(f"layer {layer}: expert {expert} is not loaded in this model") from None

    def experts(self, x, layer, ids, weights, static_rows=None):
        return ref.moe(x, ids, weights, lambda e: self.expert_weights(layer, e))

    def dense_mlp(self, x, layer):
        return ref.swiglu(x, *(self.w(layer_weight(layer, proj)) for proj in EXPERT_PROJS))

    def logits(self, x, layer=None):
        norm = FINAL_NORM if layer is None else layer_weight(layer, "final")
        return ref.linear(ref.rmsnorm(x, self.w(norm), self.config.layernorm_epsilon), self.w(LM_HEAD))


class CheckedOps:
    """A `DecoderOps` that runs every op on a backend and on the reference, returns the backend's
    result and records the largest relative difference per op ("numpy-reference-checked"). The
    reference gets the backend's device values read back (`host_values`), and so do the comparisons.

    Both backends see the same inputs, so each recorded number is that op's own error, not the
    error accumulated through the layer. `differences[op] = max |a - b| / max |b|`. Routing is
    compared as the fraction of (token, slot) expert ids that differ.
    """

    _COMPARED = ("embed", "rmsnorm", "add_rmsnorm", "linear", "norm_qkv_rope", "linear_add_rmsnorm",
                 "attention", "router", "experts", "dense_mlp", "logits")

    def __init__(self, backend, reference):
        self.backend, self.reference = backend, reference
        self.differences: dict[str, float] = {}

    def __getattr__(self, name):
        primary = getattr(self.backend, name)
        if name not in self._COMPARED:
            return primary

        def checked(*args, **kwargs):
            if name == "attention":
                args[0].problems()      # gathered before a backend writes the cache in place
            got = primary(*args, **kwargs)
            want = getattr(self.reference, name)(*host_values(args), **kwargs)
            host = host_values(got)     # read back to compare (counted)
            if name == "router":
                diff = float(np.mean(np.sort(host[0], -1) != np.sort(want[0], -1)))
            else:
                pairs = zip(host, want) if isinstance(host, (list, tuple)) else [(host, want)]
                diff = max(float(np.abs(np.asarray(a, np.float32) - b).max() / max(np.abs(b).max(), 1e-30))
                           for a, b in pairs)
            self.differences[name] = max(self.differences.get(name, 0.0), diff)
            return got
        return checked
