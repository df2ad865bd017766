"""MiMo-V2-Flash configuration: the Hub's `config.json` (legacy key names), presets, validation.

The Hub file uses MiMo's legacy names (`layernorm_epsilon`, `swa_*`, `hybrid_layer_pattern`,
`moe_layer_freq`); this class keeps those names so a config round-trips unchanged. Values the
model cannot run (another scoring function, shared experts, group-limited routing, ...) are
rejected with an error naming the key. Choices where public sources disagree are settings:

* `sliding_window` counts the keys a sliding-window query sees, itself included (the Hub's own
  remote code through HF masking, vLLM, Megatron-Bridge, llama.cpp: keys t-127 .. t for 128).
  `sliding_window_convention="sglang"` adds one key (SGLang passes the window to FA3 without
  subtracting the query: keys t-128 .. t; transformers' native class follows SGLang whenever a
  config carries `sliding_window_size`). See docs/ARCHITECTURE.md for the sources.
* `routed_scaling_factor: null` on the Hub means 1.0.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

from .jsonfile import read_json


class ConfigError(ValueError):
    """A config value that is missing, unknown or inconsistent; the message names the key."""


FULL_ATTENTION = 0
SLIDING_WINDOW_ATTENTION = 1
WINDOW_CONVENTIONS = ("hf", "sglang")

# Hub keys that carry no information for this implementation (or duplicate another key).
# Upper bounds of the size keys: generous for this model family (MiMo-V2-Flash is far below every
# one), small enough that a config cannot make the code allocate terabytes before any other check.
SIZE_LIMITS = {
    "vocab_size": 1 << 22, "hidden_size": 1 << 16, "num_hidden_layers": 1024,
    "intermediate_size": 1 << 18, "moe_intermediate_size": 1 << 16, "num_attention_heads": 1024,
    "num_key_value_heads": 1024, "swa_num_attention_heads": 1024, "swa_num_key_value_heads": 1024,
    "head_dim": 1024, "v_head_dim": 1024, "swa_head_dim": 1024, "swa_v_head_dim": 1024,
    "max_position_embeddings": 1 << 24, "sliding_window": 1 << 24, "n_routed_experts": 4096,
    "num_experts_per_tok": 256,
}

_IGNORED_HUB_KEYS = {
    "architectures", "model_type", "auto_map", "transformers_version", "torch_dtype", "use_cache",
    "initializer_range", "sliding_window_size", "attention_chunk_size", "hybrid_block_size",
    "quantization_config", "bos_token_id", "eos_token_id", "pad_token_id", "attention_dropout",
    "rope_scaling", "moe_router_dtype", "num_nextn_predict_layers", "_name_or_path",
    "head_dim_swa", "swa_num_attention_heads_per_kv", "output_router_logits", "dtype",
}
# transformers' native MiMoV2FlashConfig names (written beside the legacy ones by `to_hub_dict`);
# when a file carries them they must agree with the legacy keys.
TRANSFORMERS_KEYS = ("layer_types", "mlp_layer_types", "rms_norm_eps", "rope_parameters")


@dataclass
class MiMoV2FlashConfig:
    vocab_size: int = 152576
    hidden_size: int = 4096
    num_hidden_layers: int = 48
    intermediate_size: int = 16384          # dense SwiGLU of layer 0
    moe_intermediate_size: int = 2048       # each routed expert
    num_attention_heads: int = 64           # full-attention layers
    num_key_value_heads: int = 4
    swa_num_attention_heads: int = 64       # sliding-window layers
    swa_num_key_value_heads: int = 8
    head_dim: int = 192                     # Q and K
    v_head_dim: int = 128
    swa_head_dim: int = 192
    swa_v_head_dim: int = 128
    partial_rotary_factor: float = 0.334    # int(192 * 0.334) = 64 rotated dims
    rope_theta: float = 5_000_000.0
    swa_rope_theta: float = 10_000.0
    max_position_embeddings: int = 262144
    sliding_window: int = 128
    sliding_window_convention: str = "hf"
    hybrid_layer_pattern: list[int] = field(default_factory=list)   # 0 = full, 1 = SWA
    moe_layer_freq: list[int] = field(default_factory=list)         # 0 = dense, 1 = MoE
    n_routed_experts: int = 256
    num_experts_per_tok: int = 8
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    layernorm_epsilon: float = 1e-5
    attention_value_scale: float = 0.707
    add_swa_attention_sink_bias: bool = True
    add_full_attention_sink_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    quantization_config: dict | None = None

    def __post_init__(self):
        self.check_sizes()      # before the layer patterns below are built from num_hidden_layers
        if not self.hybrid_layer_pattern:
            self.hybrid_layer_pattern = default_hybrid_pattern(self.num_hidden_layers)
        if not self.moe_layer_freq:
            self.moe_layer_freq = [0] + [1] * (self.num_hidden_layers - 1)
        if self.routed_scaling_factor is None:
            self.routed_scaling_factor = 1.0
        self.validate()

    # ---- derived values ------------------------------------------------------------------
    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def window_keys(self) -> int:
        """Keys a sliding-window query attends to, itself included."""
        return self.sliding_window + (1 if self.sliding_window_convention == "sglang" else 0)

    @property
    def softmax_scale(self) -> float:
        return self.head_dim ** -0.5

    def is_swa(self, layer: int) -> bool:
        return self.hybrid_layer_pattern[layer] == SLIDING_WINDOW_ATTENTION

    def is_moe(self, layer: int) -> bool:
        return self.moe_layer_freq[layer] == 1

    def attention_shape(self, layer: int) -> tuple[int, int, int, int]:
        """(query heads, KV heads, Q/K head dim, V head dim) of one layer."""
        if self.is_swa(layer):
            return (self.swa_num_attention_heads, self.swa_num_key_value_heads,
                    self.swa_head_dim, self.swa_v_head_dim)
        return self.num_attention_heads, self.num_key_value_heads, self.head_dim, self.v_head_dim

    def rope_theta_of(self, layer: int) -> float:
        return self.swa_rope_theta if self.is_swa(layer) else self.rope_theta

    def has_sink(self, layer: int) -> bool:
        return self.add_swa_attention_sink_bias if self.is_swa(layer) else self.add_full_attention_sink_bias

    def window_of(self, layer: int) -> int | None:
        return self.window_keys if self.is_swa(layer) else None

    @property
    def stop_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    # ---- validation ----------------------------------------------------------------------
    def check_sizes(self) -> None:
        """Every size key a positive integer within SIZE_LIMITS: a hostile or mistyped config
        fails here, naming the key, before anything is allocated from it."""
        for key in SIZE_LIMITS:
            check_size(key, getattr(self, key))
        for key in ("hybrid_layer_pattern", "moe_layer_freq"):
            value = getattr(self, key)
            if not isinstance(value, list):
                raise ConfigError(f"config key {key!r} must be a list of 0/1, got {type(value).__name__}")

    def validate(self) -> None:
        self.check_sizes()
        for key in ["rope_theta", "swa_rope_theta", "layernorm_epsilon", "attention_value_scale",
                    "routed_scaling_factor", "partial_rotary_factor"]:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ConfigError(f"config key {key!r} must be a positive finite number, got {value!r}")
        if self.sliding_window_convention not in WINDOW_CONVENTIONS:
            raise ConfigError(f"config key 'sliding_window_convention' must be one of "
                              f"{WINDOW_CONVENTIONS}, got {self.sliding_window_convention!r}")
        for key in ["hybrid_layer_pattern", "moe_layer_freq"]:
            pattern = getattr(self, key)
            if len(pattern) != self.num_hidden_layers:
                raise ConfigError(f"config key {key!r} has {len(pattern)} entries but "
                                  f"num_hidden_layers is {self.num_hidden_layers}")
            bad = [v for v in pattern if v not in (0, 1)]
            if bad:
                raise ConfigError(f"config key {key!r} may hold only 0 and 1, found {bad[0]!r}")
        for heads_key, kv_key in [("num_attention_heads", "num_key_value_heads"),
                                  ("swa_num_attention_heads", "swa_num_key_value_heads")]:
            heads, kv = getattr(self, heads_key), getattr(self, kv_key)
            if heads % kv:
                raise ConfigError(f"config key {heads_key!r}={heads} is not a multiple of "
                                  f"{kv_key!r}={kv} (grouped-query attention)")
        if self.swa_head_dim != self.head_dim:
            raise ConfigError(f"config key 'swa_head_dim'={self.swa_head_dim} differs from "
                              f"'head_dim'={self.head_dim}; one rotary/softmax setup is assumed")
        rot = self.rotary_dim
        if rot <= 0 or rot % 2 or rot > self.head_dim:
            raise ConfigError(f"config key 'partial_rotary_factor'={self.partial_rotary_factor} gives "
                              f"rotary dim {rot}; it must be even and within head_dim {self.head_dim}")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ConfigError(f"config key 'num_experts_per_tok'={self.num_experts_per_tok} exceeds "
                              f"'n_routed_experts'={self.n_routed_experts}")
        if self.tie_word_embeddings:
            raise ConfigError("config key 'tie_word_embeddings' is true; MiMo-V2-Flash has an untied lm_head")
        if not self.norm_topk_prob:
            raise ConfigError("config key 'norm_topk_prob' is false; MiMo-V2-Flash renormalises top-k weights")

    # ---- Hub config.json -------------------------------------------------------------------
    @classmethod
    def from_hub_dict(cls, data: dict[str, Any], source: str = "config.json") -> "MiMoV2FlashConfig":
        """Build from the Hub's `config.json` dict; errors name `source` and the key."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        required = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "n_routed_experts", "num_experts_per_tok",
                    "moe_intermediate_size", "intermediate_size", "hybrid_layer_pattern",
                    "moe_layer_freq"]
        missing = [k for k in required if k not in data]
        if missing:
            raise ConfigError(f"{source}: missing required key {missing[0]!r}")
        # Values this implementation does not model must be absent or take the MiMo value.
        fixed = {"scoring_func": "sigmoid", "topk_method": "noaux_tc", "n_group": 1, "topk_group": 1,
                 "hidden_act": "silu", "attention_bias": False}
        for key, expected in fixed.items():
            if key in data and data[key] != expected:
                raise ConfigError(f"{source}: key {key!r} is {data[key]!r}; only {expected!r} is supported")
        if data.get("n_shared_experts") not in (None, 0):
            raise ConfigError(f"{source}: key 'n_shared_experts' is {data['n_shared_experts']!r}; "
                              "MiMo-V2-Flash has no shared experts")
        if data.get("rope_scaling") not in (None, {}):
            rope_type = data["rope_scaling"].get("rope_type", data["rope_scaling"].get("type"))
            if rope_type != "default":
                raise ConfigError(f"{source}: key 'rope_scaling' is {data['rope_scaling']!r}; "
                                  "only default RoPE is implemented")
        for key in ("sliding_window_size", "attention_chunk_size"):
            if key in data and "sliding_window" in data and data[key] != data["sliding_window"]:
                raise ConfigError(f"{source}: key {key!r}={data[key]} disagrees with "
                                  f"'sliding_window'={data['sliding_window']}")
        kwargs = {}
        for key, value in data.items():
            if key in fields:
                kwargs[key] = value
            elif (key not in _IGNORED_HUB_KEYS and key not in fixed and key != "n_shared_experts"
                  and key not in TRANSFORMERS_KEYS):
                warnings.warn(f"{source}: ignoring unknown key {key!r}", stacklevel=2)
        if "quantization_config" in data:
            kwargs["quantization_config"] = data["quantization_config"]
        for key in ("bos_token_id", "eos_token_id"):
            if key in data:
                kwargs[key] = data[key]
        try:
            config = cls(**kwargs)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None
        except TypeError as err:  # a value of the wrong JSON type reaching arithmetic
            raise ConfigError(f"{source}: {err}") from None
        native = config.transformers_keys()
        for key in TRANSFORMERS_KEYS:
            if key in data and data[key] != native[key]:
                raise ConfigError(f"{source}: key {key!r} is {data[key]!r} but the legacy keys give "
                                  f"{native[key]!r}")
        return config

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "MiMoV2FlashConfig":
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        return cls.from_hub_dict(read_json(path, ConfigError, "config file"), source=path)

    def to_hub_dict(self, dtype: str | None = None) -> dict[str, Any]:
        """The Hub `config.json` form: MiMo's legacy names, which this project, vLLM and SGLang
        read, plus transformers' native names, so that `MiMoV2FlashForCausalLM` builds the same
        model. `dtype` ("float32", "bfloat16") labels the weights; None leaves them unlabelled.

        The window: transformers counts `sliding_window_size + 1` keys when that key is present
        and `sliding_window` keys otherwise. So the default convention writes `sliding_window`
        alone (the key count), and "sglang" writes the Hub's three equal keys, which SGLang and
        transformers both read as one key more.
        """
        data = dataclasses.asdict(self)
        if data["quantization_config"] is None:
            data.pop("quantization_config")
        for key in ("bos_token_id", "eos_token_id"):
            if data[key] is None:
                data.pop(key)
        data.update({
            "architectures": ["MiMoV2FlashForCausalLM"], "model_type": "mimo_v2_flash",
            "scoring_func": "sigmoid", "topk_method": "noaux_tc", "n_group": 1, "topk_group": 1,
            "n_shared_experts": None, "hidden_act": "silu", "attention_bias": False,
        })
        data.update(self.transformers_keys())
        if self.sliding_window_convention == "sglang":
            data.update(sliding_window_size=self.sliding_window, attention_chunk_size=self.sliding_window)
        if dtype is not None:
            data["torch_dtype"] = data["dtype"] = dtype   # transformers 4.x reads the first, 5.x the second
        if self.routed_scaling_factor == 1.0:
            data["routed_scaling_factor"] = None  # the Hub writes null for 1.0
        return data

    def transformers_keys(self) -> dict[str, Any]:
        """transformers' native names for the layer kinds, norm epsilon and per-kind RoPE."""
        rope = {kind: {"rope_type": "default", "rope_theta": theta,
                       "partial_rotary_factor": self.partial_rotary_factor}
                for kind, theta in (("full_attention", self.rope_theta),
                                    ("sliding_attention", self.swa_rope_theta))}
        return {
            "layer_types": ["sliding_attention" if self.is_swa(i) else "full_attention"
                            for i in range(self.num_hidden_layers)],
            "mlp_layer_types": ["sparse" if self.is_moe(i) else "dense"
                                for i in range(self.num_hidden_layers)],
            "rms_norm_eps": self.layernorm_epsilon,
            "rope_parameters": rope,
        }

    def transformers_differences(self) -> list[str]:
        """What transformers' native class (5.x) cannot express of this config: it derives the
        sliding-window layers' heads from the full layers' (same query heads and head dims,
        twice the KV heads) and puts sinks on exactly the sliding-window layers."""
        differences = []
        if self.swa_num_attention_heads != self.num_attention_heads:
            differences.append(f"swa_num_attention_heads={self.swa_num_attention_heads} differs from "
                               f"num_attention_heads={self.num_attention_heads}")
        if self.swa_num_key_value_heads != 2 * self.num_key_value_heads:
            differences.append(f"swa_num_key_value_heads={self.swa_num_key_value_heads} is not twice "
                               f"num_key_value_heads={self.num_key_value_heads}")
        if self.swa_v_head_dim != self.v_head_dim:
            differences.append(f"swa_v_head_dim={self.swa_v_head_dim} differs from v_head_dim={self.v_head_dim}")
        if not self.add_swa_attention_sink_bias or self.add_full_attention_sink_bias:
            differences.append("attention sinks are not on exactly the sliding-window layers")
        return differences

    def save(self, path: str | os.PathLike, dtype: str | None = None) -> None:
        with open(path, "w") as f:
            json.dump(self.to_hub_dict(dtype), f, indent=2)

    def replace(self, **changes) -> "MiMoV2FlashConfig":
        """A copy with some fields changed; layer patterns are cut or regenerated to fit."""
        data = dataclasses.asdict(self)
        data.update(changes)
        layers = data["num_hidden_layers"]
        if "num_hidden_layers" in changes:
            check_size("num_hidden_layers", layers)     # before patterns of that length are built
            for key, default in (("hybrid_layer_pattern", default_hybrid_pattern(layers)),
                                 ("moe_layer_freq", [0] + [1] * (layers - 1))):
                if key not in changes:
                    data[key] = data[key][:layers] if len(data[key]) >= layers else default
        return MiMoV2FlashConfig(**data)

    def summary(self) -> str:
        full = sum(1 for i in range(self.num_hidden_layers) if not self.is_swa(i))
        moe = sum(self.moe_layer_freq)
        return (f"{self.num_hidden_layers} layers ({full} full, {self.num_hidden_layers - full} SWA; "
                f"{moe} MoE), hidden {self.hidden_size}, heads {self.num_attention_heads} "
                f"(KV {self.num_key_value_heads} full / {self.swa_num_key_value_heads} SWA), head dims "
                f"{self.head_dim}/{self.v_head_dim}, experts {self.n_routed_experts} top-"
                f"{self.num_experts_per_tok} x {self.moe_intermediate_size}, vocab {self.vocab_size}, "
                f"window {self.window_keys} keys")


def check_size(key: str, value) -> None:
    """A size key is a positive integer within SIZE_LIMITS, or a ConfigError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"config key {key!r} must be a positive integer, got {value!r}")
    if value > SIZE_LIMITS[key]:
        raise ConfigError(f"config key {key!r}={value} exceeds the limit {SIZE_LIMITS[key]} (a sane range "
                          f"for this model family; MiMo-V2-Flash uses {getattr(MiMoV2FlashConfig, key)})")


def default_hybrid_pattern(num_layers: int) -> list[int]:
    """MiMo's rule: layer i is full attention iff i == 0 or (i + 1) % 6 == 0, SWA otherwise."""
    return [FULL_ATTENTION if i == 0 or (i + 1) % 6 == 0 else SLIDING_WINDOW_ATTENTION
            for i in range(num_layers)]


def _small(**overrides) -> MiMoV2FlashConfig:
    """Test-sized configs with the real structure: full + SWA layers, dense layer 0, 4 vs 8 KV
    heads, head dims 192/128, 64 rotary dims, sinks, top-8 sigmoid routing."""
    base = dict(vocab_size=512, hidden_size=256, num_hidden_layers=4, intermediate_size=512,
                moe_intermediate_size=128, num_attention_heads=8, num_key_value_heads=2,
                swa_num_attention_heads=8, swa_num_key_value_heads=4, n_routed_experts=16,
                num_experts_per_tok=8, max_position_embeddings=4096, sliding_window=16,
                hybrid_layer_pattern=[0, 1, 1, 0], moe_layer_freq=[0, 1, 1, 1])
    base.update(overrides)
    return MiMoV2FlashConfig(**base)


PRESETS = {
    "full": MiMoV2FlashConfig,
    # 4 layers, full/SWA/SWA/full, 16 experts: the unit-test and quick-run size.
    "tiny": _small,
    # 8 layers with the real 5:1 pattern tail, 32 experts: the benchmark's "medium".
    "small": lambda: _small(hidden_size=512, num_hidden_layers=8, intermediate_size=1024,
                            moe_intermediate_size=256, num_attention_heads=16, num_key_value_heads=4,
                            swa_num_attention_heads=16, swa_num_key_value_heads=8,
                            n_routed_experts=32, vocab_size=2048, sliding_window=32,
                            hybrid_layer_pattern=[0, 1, 1, 1, 1, 0, 1, 1],
                            moe_layer_freq=[0] + [1] * 7),
}


def load_config(name_or_path: str | os.PathLike) -> MiMoV2FlashConfig:
    """A preset name (`full`, `small`, `tiny`) or a path to a `config.json` / model directory."""
    if isinstance(name_or_path, str) and name_or_path in PRESETS:
        return PRESETS[name_or_path]()
    if os.path.exists(name_or_path):
        return MiMoV2FlashConfig.from_json(name_or_path)
    raise ConfigError(f"unknown config {name_or_path!r}: not a preset ({', '.join(PRESETS)}) "
                      "and no such file or directory")


