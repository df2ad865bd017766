"""NkiOps: the decoder layer's ops through the NKI kernels (`backend="nki"`).

Every method has the semantics of the same method of `layer.ReferenceOps` and runs the kernel's
host launcher (kernels/*.py) on the backend `mimo_kernels.backend` picked: the CPU simulator here, the
real `nki` on a Trainium2.

Weights arrive by Hub name in the Hub layout `[out, in]` float32, or from a prepared directory as
stored (`checkpoint.KernelLayoutWeights`: already the kernel layout, memory-mapped, used as is
when its dtype is the one asked for). Each is converted once, on first use, into the layout its
kernel reads and kept: projections `[in, out]` in bf16, or with
`weight_dtype="fp8"` the tensors the Hub stores as FP8 (q/k/v, the dense MLP, the experts) as
Trainium float8_e4m3 with 128x128 block scales (`fp8.quantize_blocks`); o_proj and lm_head stay
bf16 as on the Hub, the router weight fp32. A layer's routed experts are stacked once into the
grouped expert kernel's `ExpertWeights` (local index = position among the loaded experts).
Every kernel-layout array is registered with `mimo_kernels.launch.RESIDENT` when it is made: its
device copy is uploaded once, and every later launch passes that copy (no weight bytes move after
a model's first pass; `launch.TRANSFERS` counts the traffic).

Activations stay on the device between kernels: every op returns the kernel's outputs as device
tensors (`mimo_kernels.launch.launch` reads nothing back), bf16 where the kernels produce bf16;
the router's ids (int64) and weights (fp32) and the expert kernel's fp32 sums as the kernels give
them. The layer code runs on them unchanged (layer.py); reading back is explicit and counted
(`launch.to_host`, `layer.host_values`). Inputs may be NumPy (uploaded, counted) or tensors.

Static shapes: with `bucket` set (a `buckets.Bucket`), every op pads its token rows to the
bucket's `rows` and drops the padding from its result, attention runs at the bucket's shape (a
decode step on a `StaticKVCache` straight on the cache's resident buffers) and the expert kernel
at its fixed block count, so a pass launches the same kernel specializations
whatever the lengths inside the bucket (`mimo_kernels.launch.VARIANTS` counts them). Without a
bucket the launches take the exact ragged shapes.

Cost: every launch's simulator report (an estimate of Trainium2 time from the cost model, not a
measurement) is added to a per-op running total, split into forward passes (a pass starts at
`embed`), so `cost_summary()` can give the estimated time per pass, per token and per decoder
layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import ml_dtypes
import numpy as np
import torch

from mimo_kernels.attention import attention_batch, attention_decode_cache
from mimo_kernels.dense_mlp import dense_mlp
from mimo_kernels.embedding import embed
from mimo_kernels.expert_ffn import ExpertWeights, expert_ffn, static_block_shape
from mimo_kernels.launch import RESIDENT, TRANSFERS, TransferMark, is_tensor, on_device, pad_rows
from mimo_kernels.linear import linear
from mimo_kernels.linear_add_rmsnorm import linear_add_rmsnorm
from mimo_kernels.norm_qkv_rope import norm_linear, norm_qkv_rope
from mimo_kernels.rmsnorm import add_rmsnorm, rmsnorm
from mimo_kernels.router import route, routing_bias
from .config import MiMoV2FlashConfig
from .fp8 import TRAINIUM_E4M3, quantize_blocks
from .layer import AttentionStep, attention_sink
from .static_kv_cache import StaticLayerKVCache
from .weights import (EMBED, EXPERT_PROJS, FINAL_NORM, HUB_F32, HUB_FP8, LM_HEAD, TensorSpec, expert_weight,
                      is_projection, layer_tensors, layer_weight, model_tensors, mtp_block_tensors)

BF16 = np.dtype(ml_dtypes.bfloat16)
WEIGHT_DTYPES = ("bf16", "fp8")
LAYER_OPS = ("rmsnorm", "add_rmsnorm", "linear", "norm_qkv_rope", "linear_add_rmsnorm", "attention", "router",
             "experts", "dense_mlp")


def _resident(weight: np.ndarray, scale: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """A kernel-layout (weight, scale) registered on the device (module docstring). Plain ndarrays
    (not memory-map subclasses), so the launchers' np.asarray hands back the registered object."""
    return (RESIDENT.resident(np.asarray(weight)),
            None if scale is None else RESIDENT.resident(np.asarray(scale)))


@dataclass
class OpCost:
    """Running totals of the simulator reports of one op (estimates, not measurements)."""
    calls: int = 0
    launches: int = 0
    estimated_s: float = 0.0
    roofline_s: float = 0.0
    instructions: int = 0
    hbm_bytes: int = 0
    matmul_flops: int = 0

    def add(self, report) -> None:
        """Count one kernel launch (`report` None: the launch was skipped, e.g. no routed rows)."""
        if report is None:
            return
        self.launches += 1
        self.estimated_s += report.estimated_time_s
        self.roofline_s += report.roofline_time_s
        self.instructions += report.instructions
        self.hbm_bytes += report.hbm_bytes
        self.matmul_flops += report.matmul_flops

    def merge(self, other: "OpCost") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def to_dict(self) -> dict:
        return {"calls": self.calls, "launches": self.launches,
                "estimated_us": self.estimated_s * 1e6, "roofline_us": self.roofline_s * 1e6,
                "instructions": self.instructions, "hbm_bytes": self.hbm_bytes,
                "matmul_flops": self.matmul_flops}


@dataclass
class PassCost:
    """The ops of one forward pass: `tokens` embedded (0 when the layer was run on its own);
    `transfer_mark`: `launch.TRANSFERS.mark()` when the pass started (host <-> device traffic since)."""
    tokens: int
    ops: dict[str, OpCost] = field(default_factory=dict)
    transfer_mark: TransferMark = field(default_factory=TransferMark)


class NkiOps:
    """The `ops.DecoderOps` backend built from the NKI kernels (see module doc)."""

    name = "nki"

    def __init__(self, config: MiMoV2FlashConfig, weights, allowed_experts: np.ndarray | None = None,
                 weight_dtype: str = "bf16"):
        if weight_dtype not in WEIGHT_DTYPES:
            raise ValueError(f"weight_dtype must be one of {WEIGHT_DTYPES}, got {weight_dtype!r}")
        self.config = config
        self.weights = weights
        self.allowed_experts = allowed_experts
        self.weight_dtype = weight_dtype
        # The weight table for the non-expert tensors (stored dtype decides FP8); experts are
        # looked up per layer when their stack is built. The MTP block's tensors (mtp.py) fill
        # only names the decoder layers do not have.
        self._specs = {spec.name: spec for spec in model_tensors(config, experts=[])}
        for spec in mtp_block_tensors(config):
            self._specs.setdefault(spec.name, spec)
        self._prepared: dict[str, tuple] = {}
        self._expert_stacks: dict[int, tuple[ExpertWeights, np.ndarray]] = {}
        self.passes: list[PassCost] = []
        self.bucket = None      # a buckets.Bucket: launch at its static shapes (module docstring)

    def _max_position(self) -> int | None:
        """The largest position of the bucket (sizes the RoPE table), None without a bucket."""
        return None if self.bucket is None else self.bucket.context - 1

    def padded(self, a, fill=0, rows: int | None = None):
        """`a` [N, ...] with rows of `fill` up to `rows` (default the bucket's rows; unchanged
        without either): a device tensor padded on the device, host data (token ids, positions)
        on the host."""
        rows = rows if rows is not None else None if self.bucket is None else self.bucket.rows
        if rows is None or len(a) == rows:
            return a
        if len(a) > rows:
            raise ValueError(f"{len(a)} token rows exceed the static shape of {rows} rows (bucket {self.bucket})")
        if is_tensor(a):
            return pad_rows(a, rows, fill)
        a = np.asarray(a)
        return np.concatenate([a, np.full((rows - a.shape[0],) + a.shape[1:], fill, a.dtype)])

    # ---- weights: Hub layout in, kernel layout out (once) ------------------------------------
    def w(self, name: str) -> np.ndarray:
        return self.weights[name]

    def kernel_weight(self, name: str) -> tuple[np.ndarray, np.ndarray | None]:
        """(weight, scale or None) of a Hub tensor in its kernel layout, converted on first use:
        projections [in, out] (bf16, or FP8 + block scale where the Hub stores FP8 and
        weight_dtype="fp8"), the router weight [in, out] fp32, vectors and the embedding bf16."""
        prepared = self._prepared.get(name)
        if prepared is None:
            prepared = self._prepared[name] = _resident(*self._kernel_layout(self._specs[name]))
        return prepared

    def _kernel_layout(self, spec: TensorSpec) -> tuple[np.ndarray, np.ndarray | None]:
        """A tensor in its kernel layout: taken as stored when the weights come from a prepared
        directory in that layout already (`checkpoint.KernelLayoutWeights`, memory-mapped, no
        copy), otherwise converted from the Hub layout."""
        stored = getattr(self.weights, "stored", None)
        if stored is None:
            return self._convert(spec, self.weights[spec.name])
        weight, scale = stored(spec.name)
        if not is_projection(spec):                       # norms and the embedding table
            return np.asarray(weight, dtype=BF16), None
        if spec.hub_dtype == HUB_F32:
            return np.asarray(weight, dtype=np.float32), None
        if self.weight_dtype == "fp8" and spec.hub_dtype == HUB_FP8:
            if scale is not None:   # F8_E4M3 files hold e4m3fn bytes; within +-240 they are Trainium's
                return weight.view(TRAINIUM_E4M3.dtype), np.asarray(scale, np.float32)
        elif weight.dtype == BF16:
            return weight, None
        return self._convert(spec, self.weights[spec.name])   # stored in the other dtype

    def _convert(self, spec: TensorSpec, hub: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        if not is_projection(spec):                       # norms and the embedding table
            return np.ascontiguousarray(hub, dtype=BF16), None
        if spec.hub_dtype == HUB_F32:                     # the router: routing stays fp32
            return np.ascontiguousarray(hub.T, dtype=np.float32), None
        if self.weight_dtype == "fp8" and spec.hub_dtype == HUB_FP8:
            return quantize_blocks(np.asarray(hub, np.float32).T, TRAINIUM_E4M3)
        return np.ascontiguousarray(hub.T, dtype=BF16), None

    def _expert_stack(self, layer: int) -> tuple[ExpertWeights, np.ndarray]:
        """The layer's loaded experts (those whose weights this model holds) stacked for the
        grouped kernel, and global id -> local index (-1 for experts not loaded)."""
        if layer not in self._expert_stacks:
            experts = [e for e in range(self.config.n_routed_experts)
                       if expert_weight(layer, e, "gate_proj") in self.weights]
            by_name = {spec.name: spec for spec in layer_tensors(self.config, layer, experts=experts)}
            mats = {proj: [] for proj in EXPERT_PROJS}
            scales = {proj: [] for proj in EXPERT_PROJS}
            for e in experts:
                for proj in EXPERT_PROJS:
                    weight, scale = self._kernel_layout(by_name[expert_weight(layer, e, proj)])
                    mats[proj].append(weight)
                    scales[proj].append(scale)
            stacked = [RESIDENT.resident(np.stack(mats[proj])) for proj in EXPERT_PROJS]
            if scales["gate_proj"][0] is not None:
                stacked += [RESIDENT.resident(np.stack(scales[proj])) for proj in EXPERT_PROJS]
            local_of = np.full(self.config.n_routed_experts, -1, np.int64)
            local_of[experts] = np.arange(len(experts))
            self._expert_stacks[layer] = (ExpertWeights(*stacked), RESIDENT.resident(local_of))
        return self._expert_stacks[layer]

    # ---- cost accounting ---------------------------------------------------------------------
    def _record(self, op: str, *reports) -> None:
        if not self.passes:
            self.passes.append(PassCost(tokens=0))
        cost = self.passes[-1].ops.setdefault(op, OpCost())
        cost.calls += 1
        for report in reports:
            cost.add(report)

    def reset_costs(self) -> None:
        self.passes = []

    def cost_summary(self, passes=None) -> dict:
        """Estimated Trainium2 time (simulator cost model) of the ops run so far.

        `passes`: a slice or indices into the forward passes (default all), e.g. `slice(0, 1)`
        for a generation's prefill and `slice(1, None)` for its decode steps. Returns per-op
        totals (`ops`), their sum (`total`), the number of passes and tokens, and the means
        `per_pass_us`, `per_token_us` and `per_layer_us` (the decoder-layer ops of a pass
        divided by the number of layers).
        """
        if passes is None:
            chosen = self.passes
        elif isinstance(passes, slice):
            chosen = self.passes[passes]
        else:
            chosen = [self.passes[i] for i in passes]
        ops: dict[str, OpCost] = {}
        for p in chosen:
            for op, cost in p.ops.items():
                ops.setdefault(op, OpCost()).merge(cost)
        total, layers = OpCost(), OpCost()
        for op, cost in ops.items():
            total.merge(cost)
            if op in LAYER_OPS:
                layers.merge(cost)
        n_passes, tokens = len(chosen), sum(p.tokens for p in chosen)
        return {
            "ops": {op: cost.to_dict() for op, cost in sorted(ops.items())},
            "total": total.to_dict(),
            "passes": n_passes,
            "tokens": tokens,
            "per_pass_us": total.estimated_s * 1e6 / max(n_passes, 1),
            "per_token_us": total.estimated_s * 1e6 / tokens if tokens else None,
            "per_layer_us": layers.estimated_s * 1e6 / max(n_passes * self.config.num_hidden_layers, 1),
        }

    # ---- the ops (ReferenceOps semantics) ----------------------------------------------------
    def embed(self, ids: np.ndarray) -> np.ndarray:
        """Token rows of the embedding table; starts a new forward pass in the cost ledger."""
        self.passes.append(PassCost(tokens=int(np.size(ids)), transfer_mark=TRANSFERS.mark()))
        table, _ = self.kernel_weight(EMBED)
        out, report = embed(self.padded(np.reshape(ids, -1)), table, report=True)
        self._record("embed", report)
        return out[:np.size(ids)].reshape(np.shape(ids) + tuple(out.shape[1:]))

    def rmsnorm(self, x, layer, norm):
        weight, _ = self.kernel_weight(layer_weight(layer, norm))
        y, report = rmsnorm(self.padded(x), weight, self.config.layernorm_epsilon, report=True)
        self._record("rmsnorm", report)
        return y[:len(x)]

    def add_rmsnorm(self, x, delta, layer, norm):
        """(x + delta, rmsnorm(x + delta)) in one kernel; the sum is the bf16 residual."""
        weight, _ = self.kernel_weight(layer_weight(layer, norm))
        (total, y), report = add_rmsnorm(self.padded(x), self.padded(delta), weight, self.config.layernorm_epsilon,
                                         report=True)
        self._record("add_rmsnorm", report)
        return total[:len(x)], y[:len(x)]

    def linear(self, x, layer, proj):
        weight, scale = self.kernel_weight(layer_weight(layer, proj))
        y, report = linear(self.padded(x), weight, scale, report=True)
        self._record("linear", report)
        return y[:len(x)]

    def _fused_qkv_weight(self, layer: int) -> tuple[np.ndarray, np.ndarray | None]:
        """q | k | v kernel weights side by side, [in, Hq*D + Hkv*D + Hkv*Dv] (and their block
        scales): every width is a multiple of 128, so the FP8 block grids line up as well."""
        names = [layer_weight(layer, proj) for proj in ("q_proj", "k_proj", "v_proj")]
        key = "|".join(names)
        if key not in self._prepared:
            parts = [self._kernel_layout(self._specs[name]) for name in names]    # host only: not uploaded
            weight = np.concatenate([w for w, _ in parts], axis=1)
            scale = None if parts[0][1] is None else np.concatenate([sc for _, sc in parts], axis=1)
            for name in names:      # the fused copy replaces any separate ones
                self._prepared.pop(name, None)
            self._prepared[key] = _resident(weight, scale)
        return self._prepared[key]

    def norm_qkv_rope(self, x, layer, positions):
        """Input norm, q|k|v projection over the concatenated weights and RoPE of q and k in one
        launch (kernels/norm_qkv_rope.py): q [N, Hq, D], k [N, Hkv, D], v [N, Hkv*Dv]."""
        heads, kv_heads, d, _ = self.config.attention_shape(layer)
        norm, _ = self.kernel_weight(layer_weight(layer, "input"))
        weight, scale = self._fused_qkv_weight(layer)
        (q, k, v), report = norm_qkv_rope(self.padded(x), norm, weight, self.padded(positions),
                                          self.config.rope_theta_of(layer),
                                          (heads, kv_heads), d, self.config.rotary_dim, scale=scale,
                                          eps=self.config.layernorm_epsilon, report=True,
                                          max_position=self._max_position())
        self._record("norm_qkv_rope", report)
        return tuple(a[:len(x)] for a in (q, k, v))

    def linear_add_rmsnorm(self, x, a, layer, proj, norm):
        """(x + a W^T, its rmsnorm) in one launch (kernels/linear_add_rmsnorm.py); the sum is the
        bf16 residual."""
        weight, scale = self.kernel_weight(layer_weight(layer, proj))
        norm_weight, _ = self.kernel_weight(layer_weight(layer, norm))
        (total, y), report = linear_add_rmsnorm(self.padded(a), weight, self.padded(x), norm_weight, scale=scale,
                                                eps=self.config.layernorm_epsilon, report=True)
        self._record("linear_add_rmsnorm", report)
        return total[:len(x)], y[:len(x)]

    def attention(self, step: AttentionStep, layer):
        """A decode bucket's step on a `StaticKVCache`: the new keys written into the cache in place,
        then one cached-attention launch on the cache's own buffers (`_attention_in_cache`).
        Otherwise on the gathered problems: fresh prompts of 128+ tokens through the flash prefill
        kernel (one launch each); decode steps, prefill on a history and short prompts share one
        cached-attention launch (at the bucket's shape when there is one)."""
        window, sink = self.config.window_of(layer), attention_sink(self, layer)
        if self.bucket is not None and self.bucket.kind == "decode" and isinstance(step.cache, StaticLayerKVCache):
            return self._attention_in_cache(step, window, sink)
        shape = None if self.bucket is None else (self.bucket.batch, self.bucket.tokens,
                                                  self.bucket.attention_keys(window))
        outs, reports = attention_batch(step.problems(), self.config.softmax_scale, window, sink, shape=shape)
        self._record("attention", *reports)
        return torch.cat(outs)

    def _attention_in_cache(self, step: AttentionStep, window: int | None, sink):
        """`attention_decode_cache` on the layer cache's buffers, every sequence slot of the cache
        in the launch (slots outside the step: zero queries at position 0, outputs dropped). Full
        layers read the bucket's context, sliding-window layers the ring, which after the write
        holds every key a one-token query sees. The launch shape is (cache slots, 1 token, keys):
        the bucket's, whatever the lengths."""
        cache, batch = step.cache, step.batch
        step.write_cache()
        slots = cache.k.shape[0]
        queries = on_device(step.q, np.float32)
        q = queries.new_zeros((slots, 1) + tuple(queries.shape[1:]))
        q_positions = np.zeros((slots, 1), np.float32)
        for seq, start, stop in batch.segments():
            q[seq], q_positions[seq] = queries[start:stop], batch.positions[start:stop]
        out, report = attention_decode_cache(q, cache.k, cache.v, cache.pos, q_positions, self.config.softmax_scale,
                                             window, sink, keys=self.bucket.context if window is None else None)
        self._record("attention", report)
        return torch.cat([out[seq] for seq in batch.seqs])

    def _routing_bias(self, layer: int) -> np.ndarray:
        """The layer's correction bias with the experts outside `allowed_experts` excluded, made and
        uploaded once (`router.routing_bias`)."""
        name = layer_weight(layer, "router_bias")
        if name not in self._prepared:
            bias = routing_bias(self.w(name), self.allowed_experts)
            self._prepared[name] = (RESIDENT.resident(np.array(bias)), None)
        return self._prepared[name][0]

    def router(self, x, layer):
        gate_t, _ = self.kernel_weight(layer_weight(layer, "router"))
        ids, weights, report = route(self.padded(x), gate_t, self._routing_bias(layer), self.config.num_experts_per_tok,
                                     self.config.routed_scaling_factor, report=True)
        self._record("router", report)
        return ids[:len(x)], weights[:len(x)]

    def experts(self, x, layer, ids, weights, static_rows: int | None = None):
        """Routed experts (global ids; -1 = a slot computed elsewhere) through the grouped expert
        FFN kernel over the layer's loaded experts; a routed expert that is not loaded is an
        error, as in ReferenceOps. `static_rows`: run at the fixed block shape of that many rows
        (default: the bucket's rows; the expert-parallel receive side passes its slot rows)."""
        stack, local_of = self._expert_stack(layer)
        if not is_tensor(ids):      # host ids are checked here; device ids are not (a read back)
            ids = np.asarray(ids)
            missing = (ids >= 0) & (local_of[np.maximum(ids, 0)] < 0)
            if missing.any():
                raise KeyError(f"layer {layer}: expert {int(ids[missing][0])} is not loaded in this model")
        ids = on_device(ids, np.int64)
        local = torch.where(ids >= 0, RESIDENT.lookup(local_of)[ids.clamp(min=0)], -1)   # -1: computed elsewhere
        rows = static_rows if static_rows is not None else None if self.bucket is None else self.bucket.rows
        shape = None if rows is None else static_block_shape(rows, local.shape[1], stack.num_experts)
        out, report = expert_ffn(self.padded(x, rows=rows), self.padded(local, fill=-1, rows=rows),
                                 self.padded(weights, rows=rows), stack, report=True, shape=shape)
        self._record("experts", report)
        return out[:len(x)]

    def dense_mlp(self, x, layer):
        prepared = [self.kernel_weight(layer_weight(layer, proj)) for proj in EXPERT_PROJS]
        scales = None if prepared[0][1] is None else [s for _, s in prepared]
        y, report = dense_mlp(self.padded(x), *(w for w, _ in prepared), scales=scales, report=True)
        self._record("dense_mlp", report)
        return y[:len(x)]

    def logits(self, x, layer=None):
        """Final norm (`model.norm`, or an MTP layer's final_layernorm) and lm_head in one launch
        (kernels/norm_qkv_rope.norm_linear)."""
        norm, _ = self.kernel_weight(FINAL_NORM if layer is None else layer_weight(layer, "final"))
        weight, scale = self.kernel_weight(LM_HEAD)
        y, report = norm_linear(self.padded(x), norm, weight, scale, self.config.layernorm_epsilon, report=True)
        self._record("logits", report)
        return y[:len(x)]
