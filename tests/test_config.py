"""Config: the real model's values, Hub key handling, presets and clear errors."""

import json

import pytest

from mimo_v2_flash.config import (PRESETS, ConfigError, MiMoV2FlashConfig, default_hybrid_pattern,
                                  load_config)


def test_full_preset_matches_the_spec():
    c = load_config("full")
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers) == (152576, 4096, 48)
    assert [i for i in range(48) if not c.is_swa(i)] == [0, 5, 11, 17, 23, 29, 35, 41, 47]
    assert c.moe_layer_freq == [0] + [1] * 47
    assert c.attention_shape(0) == (64, 4, 192, 128)
    assert c.attention_shape(1) == (64, 8, 192, 128)
    assert c.rotary_dim == 64
    assert c.softmax_scale == pytest.approx(192 ** -0.5)
    assert c.rope_theta_of(0) == 5e6 and c.rope_theta_of(1) == 1e4
    assert c.has_sink(1) and not c.has_sink(0)
    assert c.window_of(1) == 128 and c.window_of(0) is None
    assert c.routed_scaling_factor == 1.0 and c.attention_value_scale == 0.707
    assert c.layernorm_epsilon == 1e-5


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_keep_the_real_structure(name):
    c = load_config(name)
    kinds = {c.is_swa(i) for i in range(c.num_hidden_layers)}
    assert kinds == {True, False}
    assert not c.is_moe(0) and all(c.is_moe(i) for i in range(1, c.num_hidden_layers))
    assert c.num_key_value_heads != c.swa_num_key_value_heads
    assert (c.head_dim, c.v_head_dim, c.rotary_dim) == (192, 128, 64)
    assert c.num_experts_per_tok == 8 and c.add_swa_attention_sink_bias


def test_hub_dict_round_trip_and_null_scaling_factor():
    c = load_config("tiny")
    data = c.to_hub_dict()
    assert data["routed_scaling_factor"] is None          # the Hub writes null for 1.0
    # transformers counts sliding_window_size + 1 keys when that key is present: left out here.
    assert data["sliding_window"] == c.window_keys and "sliding_window_size" not in data
    assert data["layer_types"] == ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]
    assert data["mlp_layer_types"] == ["dense", "sparse", "sparse", "sparse"]
    assert data["rope_parameters"]["sliding_attention"]["rope_theta"] == c.swa_rope_theta
    assert "torch_dtype" not in data and c.to_hub_dict("float32")["torch_dtype"] == "float32"
    assert MiMoV2FlashConfig.from_hub_dict(json.loads(json.dumps(data))) == c


def test_sglang_window_convention_adds_one_key():
    c = load_config("tiny").replace(sliding_window_convention="sglang")
    assert c.window_keys == c.sliding_window + 1
    data = c.to_hub_dict()
    assert data["sliding_window_size"] == data["attention_chunk_size"] == data["sliding_window"] == 16
    assert MiMoV2FlashConfig.from_hub_dict(data) == c


def test_hub_file_without_a_convention_key_reads_as_the_key_count():
    """The Hub's own file (three equal window keys, no convention key): 128 keys, the query
    included, as the checkpoint's remote code, vLLM and Megatron-Bridge read it."""
    data = load_config("tiny").to_hub_dict()
    del data["sliding_window_convention"]
    data.update(sliding_window_size=16, attention_chunk_size=16)
    c = MiMoV2FlashConfig.from_hub_dict(data)
    assert c.sliding_window_convention == "hf" and c.window_keys == 16


def test_transformers_keys_must_agree_with_the_legacy_ones():
    data = _hub(layer_types=["full_attention"] * 4)
    with pytest.raises(ConfigError, match="key 'layer_types'"):
        MiMoV2FlashConfig.from_hub_dict(data, source="x/config.json")


def test_default_hybrid_pattern_rule():
    assert default_hybrid_pattern(12) == [0, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 0]


def _hub(**changes):
    data = load_config("tiny").to_hub_dict()
    data.update(changes)
    return data


@pytest.mark.parametrize("changes, key", [
    ({"scoring_func": "softmax"}, "scoring_func"),
    ({"n_shared_experts": 1}, "n_shared_experts"),
    ({"n_group": 8}, "n_group"),
    ({"hybrid_layer_pattern": [0, 1, 1]}, "hybrid_layer_pattern"),
    ({"moe_layer_freq": [0, 1, 2, 1]}, "moe_layer_freq"),
    ({"num_attention_heads": 7}, "num_attention_heads"),
    ({"hidden_size": -4}, "hidden_size"),
    ({"hidden_size": "4096"}, "hidden_size"),
    ({"sliding_window_size": 64}, "sliding_window_size"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4}}, "rope_scaling"),
    ({"num_experts_per_tok": 64}, "num_experts_per_tok"),
    ({"partial_rotary_factor": 0.001}, "partial_rotary_factor"),
])
def test_inconsistent_values_name_the_key(changes, key):
    with pytest.raises(ConfigError, match=key):
        MiMoV2FlashConfig.from_hub_dict(_hub(**changes))


def test_missing_key_and_unknown_key(tmp_path):
    data = _hub()
    del data["n_routed_experts"]
    with pytest.raises(ConfigError, match="n_routed_experts"):
        MiMoV2FlashConfig.from_hub_dict(data)
    with pytest.warns(UserWarning, match="frobnicate"):
        MiMoV2FlashConfig.from_hub_dict(_hub(frobnicate=1))


def test_malformed_json_names_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="config.json.*not valid JSON"):
        MiMoV2FlashConfig.from_json(path)
    with pytest.raises(ConfigError, match="not found"):
        MiMoV2FlashConfig.from_json(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="unknown config"):
        load_config("no-such-preset")
