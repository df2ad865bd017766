"""The one table of checkpoint tensors: Hub names, shapes and stored dtypes, per config.

Everything that reads or writes weights (random init, Hub checkpoints, per-rank files) asks this
module which tensors exist; nothing else spells a weight name.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace

import numpy as np

from .config import MiMoV2FlashConfig

# Stored dtypes as the Hub's safetensors spell them (strings, not NumPy dtypes).
HUB_FP8 = "F8_E4M3"      # FP8 e4m3 with a 128x128 `weight_scale_inv` block grid beside it
HUB_BF16 = "BF16"
HUB_F32 = "F32"
FP8_BLOCK = 128


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    hub_dtype: str        # HUB_FP8, HUB_BF16 or HUB_F32: as stored on the Hub
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
EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")     # a routed expert's, and the dense MLP's
ATTENTION_PROJS = ("q_proj", "k_proj", "v_proj", "o_proj")

# A layer's tensors by role (the names the ops take): decoder layers and MTP layers share roles;
# an MTP layer calls its post-attention norm `pre_mlp_layernorm` and adds enorm, hnorm, eh_proj
# and its own final norm.
_LAYER_ROLES = {
    "input": "input_layernorm.weight",
    "post_attention": "post_attention_layernorm.weight",
    **{proj: f"self_attn.{proj}.weight" for proj in ATTENTION_PROJS},
    "sink": "self_attn.attention_sink_bias",
    **{proj: f"mlp.{proj}.weight" for proj in EXPERT_PROJS},      # the dense MLP
    "router": "mlp.gate.weight",
    "router_bias": "mlp.gate.e_score_correction_bias",
}
_MTP_ROLES = {**{role: path for role, path in _LAYER_ROLES.items() if not role.startswith("router")},
              "post_attention": "pre_mlp_layernorm.weight",
              "enorm": "enorm.weight", "hnorm": "hnorm.weight", "eh_proj": "eh_proj.weight",
              "final": "final_layernorm.weight"}
LAYER_ROLES = tuple(_LAYER_ROLES)
MTP_ROLES = tuple(_MTP_ROLES)


def layer_weight(layer: int, role: str) -> str:
    """Hub name of decoder layer `layer`'s tensor `role` (one of LAYER_ROLES), e.g.
    `layer_weight(3, "q_proj")` = "model.layers.3.self_attn.q_proj.weight". The MTP block
    (`mtp_block_names`) also holds MTP_ROLES under this prefix."""
    roles = _LAYER_ROLES if role in _LAYER_ROLES else _MTP_ROLES
    if role not in roles:
        raise KeyError(f"no layer tensor role {role!r}; roles: {sorted(set(_LAYER_ROLES) | set(_MTP_ROLES))}")
    return layer_prefix(layer) + roles[role]


def mtp_weight(index: int, role: str) -> str:
    """Hub name of MTP layer `index`'s tensor `role` (one of MTP_ROLES)."""
    if role not in _MTP_ROLES:
        raise KeyError(f"no MTP layer tensor role {role!r}; roles: {sorted(_MTP_ROLES)}")
    return mtp_prefix(index) + _MTP_ROLES[role]


def expert_weight(layer: int, expert: int, proj: str) -> str:
    """Hub name of routed expert `expert`'s `proj` (one of EXPERT_PROJS) in layer `layer`."""
    return f"{expert_prefix(layer, expert)}{proj}.weight"


def layer_and_role(name: str) -> tuple[int, str] | None:
    """(layer, role) of a decoder-layer tensor name (the inverse of `layer_weight`), else None."""
    parts = name.split(".", 3)
    if len(parts) < 4 or not parts[2].isdigit() or not name.startswith(layer_prefix(int(parts[2]))):
        return None
    role = next((r for r, path in _LAYER_ROLES.items() if path == parts[3]), None)
    return None if role is None else (int(parts[2]), role)


def is_expert(spec: TensorSpec) -> bool:
    """A routed expert's tensor."""
    return ".mlp.experts." in spec.name


def layer_tensors(config: MiMoV2FlashConfig, layer: int, experts=None) -> list[TensorSpec]:
    """Tensors of one decoder layer; `experts` limits the routed experts listed (default all)."""
    h = config.hidden_size
    heads, kv, d, dv = config.attention_shape(layer)
    shard = f"model_{layer}.safetensors"

    def spec(role, shape, dtype):
        return TensorSpec(layer_weight(layer, role), shape, dtype, shard)

    specs = [spec("input", (h,), HUB_BF16), spec("post_attention", (h,), HUB_BF16),
             spec("q_proj", (heads * d, h), HUB_FP8), spec("k_proj", (kv * d, h), HUB_FP8),
             spec("v_proj", (kv * dv, h), HUB_FP8), spec("o_proj", (h, heads * dv), HUB_BF16)]
    if config.has_sink(layer):
        specs.append(spec("sink", (heads,), HUB_BF16))
    if not config.is_moe(layer):
        i = config.intermediate_size
        return specs + [spec("gate_proj", (i, h), HUB_FP8), spec("up_proj", (i, h), HUB_FP8),
                        spec("down_proj", (h, i), HUB_FP8)]
    specs += [spec("router", (config.n_routed_experts, h), HUB_F32),
              spec("router_bias", (config.n_routed_experts,), HUB_F32)]
    i = config.moe_intermediate_size
    shapes = {"gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
    files = {"gate_proj": "linear_fc1", "up_proj": "linear_fc1", "down_proj": "linear_fc2"}
    for e in (range(config.n_routed_experts) if experts is None else experts):
        specs += [TensorSpec(expert_weight(layer, e, proj), shapes[proj], HUB_FP8,
                             f"model_{layer}_{files[proj]}.safetensors") for proj in EXPERT_PROJS]
    return specs


def global_tensors(config: MiMoV2FlashConfig) -> list[TensorSpec]:
    v, h = config.vocab_size, config.hidden_size
    return [TensorSpec(EMBED, (v, h), HUB_BF16, "model_embedding.safetensors"),
            TensorSpec(FINAL_NORM, (h,), HUB_BF16, "model_final.safetensors"),
            TensorSpec(LM_HEAD, (v, h), HUB_BF16, "model_final.safetensors")]


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
    roles = [("enorm", (h,), HUB_BF16), ("hnorm", (h,), HUB_BF16), ("eh_proj", (h, 2 * h), HUB_BF16),
             ("input", (h,), HUB_BF16), ("q_proj", (heads * d, h), HUB_FP8), ("k_proj", (kv * d, h), HUB_FP8),
             ("v_proj", (kv * dv, h), HUB_FP8), ("o_proj", (h, heads * dv), HUB_BF16)]
    if config.add_swa_attention_sink_bias:
        roles.append(("sink", (heads,), HUB_BF16))
    roles += [("post_attention", (h,), HUB_BF16), ("gate_proj", (i, h), HUB_FP8), ("up_proj", (i, h), HUB_FP8),
              ("down_proj", (h, i), HUB_FP8), ("final", (h,), HUB_BF16)]
    return [TensorSpec(mtp_weight(index, role), shape, dtype, MTP_SHARD)
            for index in range(config.mtp_num_layers) for role, shape, dtype in roles]


def mtp_block_names(config: MiMoV2FlashConfig) -> dict[str, str]:
    """MTP tensor name -> its name in the MTP block (mtp.py): MTP layer k's tensors under decoder
    layer k's names, so `layer_weight(k, role)` finds every MTP role."""
    return {mtp_weight(index, role): layer_weight(index, role)
            for index in range(config.mtp_num_layers) for role in _MTP_ROLES}


def mtp_block_tensors(config: MiMoV2FlashConfig) -> list[TensorSpec]:
    """`mtp_tensors` under their MTP-block names (`mtp_block_names`)."""
    names = mtp_block_names(config)
    return [replace(spec, name=names[spec.name]) for spec in mtp_tensors(config)]


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

    Projections ~ N(0, 1/in), norms ~ 1 + N(0, 0.05^2), router bias ~ N(0, 0.01^2), sinks and the
    embedding ~ N(0, 1).
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
