"""The one table of checkpoint tensors: Hub names, shapes and stored dtypes, per config.

Everything that reads or writes weights (random init, Hub checkpoints, per-rank files) asks this
module which tensors exist; nothing else spells a weight name.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from .config import MiMoV2FlashConfig

FP8 = "F8_E4M3"      # FP8 e4m3 with a 128x128 `weight_scale_inv` block grid beside it
BF16 = "BF16"
F32 = "F32"
FP8_BLOCK = 128


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    hub_dtype: str        # FP8, BF16 or F32 as stored on the Hub
    shard: str            # the Hub shard file holding it


def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}."


def expert_prefix(layer: int, expert: int) -> str:
    return f"model.layers.{layer}.mlp.experts.{expert}."


def mtp_prefix(index: int) -> str:
    """Prefix of multi-token-prediction layer `index` (spec 3.7, stored in model_mtp.safetensors)."""
    return f"model.mtp.layers.{index}."


EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"
EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")


def layer_tensors(config: MiMoV2FlashConfig, layer: int, experts=None) -> list[TensorSpec]:
    """Tensors of one decoder layer; `experts` limits the routed experts listed (default all)."""
    h = config.hidden_size
    heads, kv, d, dv = config.attention_shape(layer)
    p = layer_prefix(layer)
    shard = f"model_{layer}.safetensors"
    specs = [
        TensorSpec(p + "input_layernorm.weight", (h,), BF16, shard),
        TensorSpec(p + "post_attention_layernorm.weight", (h,), BF16, shard),
        TensorSpec(p + "self_attn.q_proj.weight", (heads * d, h), FP8, shard),
        TensorSpec(p + "self_attn.k_proj.weight", (kv * d, h), FP8, shard),
        TensorSpec(p + "self_attn.v_proj.weight", (kv * dv, h), FP8, shard),
        TensorSpec(p + "self_attn.o_proj.weight", (h, heads * dv), BF16, shard),
    ]
    if config.has_sink(layer):
        specs.append(TensorSpec(p + "self_attn.attention_sink_bias", (heads,), BF16, shard))
    if not config.is_moe(layer):
        i = config.intermediate_size
        specs += [TensorSpec(p + "mlp.gate_proj.weight", (i, h), FP8, shard),
                  TensorSpec(p + "mlp.up_proj.weight", (i, h), FP8, shard),
                  TensorSpec(p + "mlp.down_proj.weight", (h, i), FP8, shard)]
        return specs
    specs += [TensorSpec(p + "mlp.gate.weight", (config.n_routed_experts, h), F32, shard),
              TensorSpec(p + "mlp.gate.e_score_correction_bias", (config.n_routed_experts,), F32, shard)]
    i = config.moe_intermediate_size
    for e in (range(config.n_routed_experts) if experts is None else experts):
        q = expert_prefix(layer, e)
        specs += [TensorSpec(q + "gate_proj.weight", (i, h), FP8, f"model_{layer}_linear_fc1.safetensors"),
                  TensorSpec(q + "up_proj.weight", (i, h), FP8, f"model_{layer}_linear_fc1.safetensors"),
                  TensorSpec(q + "down_proj.weight", (h, i), FP8, f"model_{layer}_linear_fc2.safetensors")]
    return specs


def global_tensors(config: MiMoV2FlashConfig) -> list[TensorSpec]:
    v, h = config.vocab_size, config.hidden_size
    return [TensorSpec(EMBED, (v, h), BF16, "model_embedding.safetensors"),
            TensorSpec(FINAL_NORM, (h,), BF16, "model_final.safetensors"),
            TensorSpec(LM_HEAD, (v, h), BF16, "model_final.safetensors")]


def model_tensors(config: MiMoV2FlashConfig, layers=None, experts=None) -> list[TensorSpec]:
    """Every tensor of the main model (MTP layers are not part of it)."""
    layers = range(config.num_hidden_layers) if layers is None else layers
    specs = global_tensors(config)
    for layer in layers:
        specs += layer_tensors(config, layer, experts)
    return specs


MTP_SHARD = "model_mtp.safetensors"


def mtp_tensors(config: MiMoV2FlashConfig) -> list[TensorSpec]:
    """Tensors of the MTP layers (spec 4.2): an SWA attention block and a dense SwiGLU like the
    main layers' (FP8 q/k/v and MLP, BF16 o_proj, sink), plus enorm, hnorm, the BF16 eh_proj
    [H, 2H] and final_layernorm. They share the main model's embedding and lm_head."""
    h, i = config.hidden_size, config.intermediate_size
    heads, kv = config.swa_num_attention_heads, config.swa_num_key_value_heads
    d, dv = config.swa_head_dim, config.swa_v_head_dim
    specs = []
    for index in range(config.mtp_num_layers):
        p = mtp_prefix(index)
        specs += [TensorSpec(p + "enorm.weight", (h,), BF16, MTP_SHARD),
                  TensorSpec(p + "hnorm.weight", (h,), BF16, MTP_SHARD),
                  TensorSpec(p + "eh_proj.weight", (h, 2 * h), BF16, MTP_SHARD),
                  TensorSpec(p + "input_layernorm.weight", (h,), BF16, MTP_SHARD),
                  TensorSpec(p + "self_attn.q_proj.weight", (heads * d, h), FP8, MTP_SHARD),
                  TensorSpec(p + "self_attn.k_proj.weight", (kv * d, h), FP8, MTP_SHARD),
                  TensorSpec(p + "self_attn.v_proj.weight", (kv * dv, h), FP8, MTP_SHARD),
                  TensorSpec(p + "self_attn.o_proj.weight", (h, heads * dv), BF16, MTP_SHARD)]
        if config.add_swa_attention_sink_bias:
            specs.append(TensorSpec(p + "self_attn.attention_sink_bias", (heads,), BF16, MTP_SHARD))
        specs += [TensorSpec(p + "pre_mlp_layernorm.weight", (h,), BF16, MTP_SHARD),
                  TensorSpec(p + "mlp.gate_proj.weight", (i, h), FP8, MTP_SHARD),
                  TensorSpec(p + "mlp.up_proj.weight", (i, h), FP8, MTP_SHARD),
                  TensorSpec(p + "mlp.down_proj.weight", (h, i), FP8, MTP_SHARD),
                  TensorSpec(p + "final_layernorm.weight", (h,), BF16, MTP_SHARD)]
    return specs


def scale_name(weight_name: str) -> str:
    """The FP8 block-scale tensor beside a weight (a multiplier, DeepSeek convention);
    `x.weight` -> `x.weight_scale_inv`, `x.weight_t` -> `x.weight_t_scale_inv`."""
    return weight_name + "_scale_inv"


def is_projection(spec: TensorSpec) -> bool:
    """A weight used as `x @ W.T` (every 2-D tensor but the embedding table, which is gathered)."""
    return len(spec.shape) == 2 and spec.name != EMBED


def kernel_name(spec: TensorSpec) -> str:
    """Name in the per-rank files (kernel layout): projections are stored transposed, [in, out]
    (contraction dim first, onto SBUF partitions), as `<hub name>_t`; the rest keep Hub names."""
    return spec.name + "_t" if is_projection(spec) else spec.name


def fp8_scale_shape(shape: tuple[int, int]) -> tuple[int, int]:
    """Uniform 128x128 block grid: [ceil(out / 128), ceil(in / 128)]."""
    return (-(-shape[0] // FP8_BLOCK), -(-shape[1] // FP8_BLOCK))


def random_weights(config: MiMoV2FlashConfig, seed: int = 0, experts=None,
                   dtype=np.float32, mtp: bool = True) -> dict[str, np.ndarray]:
    """Seeded random weights with activations of order one through every layer.

    Projections ~ N(0, 1/in), norms ~ 1 + N(0, 0.05^2), router bias ~ N(0, 0.01^2), sinks ~ N(0, 1).
    `experts` loads only those routed experts (an expert subset). Each tensor has its own
    stream seeded by (seed, name), so a subset holds exactly the full model's values (an
    expert-parallel rank's weights match the single-process model). `mtp` adds the MTP layers.
    """
    weights = {}
    for spec in model_tensors(config, experts=experts) + (mtp_tensors(config) if mtp else []):
        name, shape = spec.name, spec.shape
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        if name.endswith("norm.weight"):        # layer norms, model.norm, MTP enorm / hnorm
            w = 1.0 + 0.05 * rng.standard_normal(shape)
        elif name.endswith("e_score_correction_bias"):
            w = 0.01 * rng.standard_normal(shape)
        elif name.endswith("attention_sink_bias") or name == EMBED:
            w = rng.standard_normal(shape)
        else:
            w = rng.standard_normal(shape) / np.sqrt(shape[-1])
        weights[name] = w.astype(dtype)
    return weights
