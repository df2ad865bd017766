"""Tensor names (mimo_v2_flash/weights.py) against the checkpoint's listing in tests/data.

tests/data/mimo_v2_flash_tensor_names.txt.gz holds every key of MiMo-V2-Flash's
model.safetensors.index.json with its shard file. It is RECONSTRUCTED from the spec's checkpoint
section (its header says how), not copied from the Hub: the real index could not be found with
the search tools. Renaming, adding or dropping a tensor in weights.py fails here.
"""

import gzip
from pathlib import Path

import pytest

from mimo_v2_flash.config import load_config
from mimo_v2_flash.weights import (HUB_FP8, LAYER_ROLES, MTP_ROLES, layer_and_role, layer_weight, model_tensors,
                                   mtp_block_names, mtp_tensors, mtp_weight, scale_name)

LISTING = Path(__file__).parent / "data" / "mimo_v2_flash_tensor_names.txt.gz"

# Keys of the listing the project does not load, with why. Empty: the project loads every tensor
# of the checkpoint (the MTP layers too, from model_mtp.safetensors). Keys such as
# `*.rotary_emb.inv_freq`, which some exports carry, would be listed here (RoPE is computed).
NOT_LOADED: dict[str, str] = {}


def hub_listing() -> dict[str, str]:
    """name -> shard file of the checkpoint's index (comment lines skipped)."""
    with gzip.open(LISTING, "rt") as f:
        rows = [line.rstrip("\n").split("\t") for line in f if not line.startswith("#")]
    return dict(rows)


def project_listing(config) -> dict[str, str]:
    """name -> shard file of every tensor weights.py lists, with the FP8 block scale beside each
    F8_E4M3 tensor (in the same shard)."""
    out = {}
    for spec in model_tensors(config) + mtp_tensors(config):
        out[spec.name] = spec.shard
        if spec.hub_dtype == HUB_FP8:
            out[scale_name(spec.name)] = spec.shard
    return out


def test_names_and_shards_equal_the_checkpoint_listing():
    hub, ours = hub_listing(), project_listing(load_config("full"))
    assert len(hub) == 72826 and len(set(hub.values())) == 145       # the spec's 145 shards
    only_hub = sorted(set(hub) - set(ours) - set(NOT_LOADED))
    only_ours = sorted(set(ours) - set(hub))
    assert not only_hub and not only_ours, \
        f"in the checkpoint only: {only_hub[:5]}; in weights.py only: {only_ours[:5]}"
    assert set(NOT_LOADED) <= set(hub)
    wrong_shard = [(name, ours[name], hub[name]) for name in ours if ours[name] != hub[name]]
    assert not wrong_shard, f"(name, weights.py shard, checkpoint shard): {wrong_shard[:5]}"


def test_every_decoder_layer_tensor_has_a_role_and_round_trips():
    hub = hub_listing()
    layer_names = [n for n in hub if n.startswith("model.layers.") and ".mlp.experts." not in n
                   and not n.endswith("_scale_inv")]
    assert len(layer_names) == 48 * 6 + 39 + 3 + 47 * 2     # norms, q/k/v/o; SWA sinks; dense MLP; routers
    roles = set()
    for name in layer_names:
        layer, role = layer_and_role(name)
        assert layer_weight(layer, role) == name
        roles.add(role)
    assert roles == set(LAYER_ROLES)
    assert layer_and_role("model.layers.1.mlp.experts.0.gate_proj.weight") is None
    assert layer_and_role("model.mtp.layers.0.enorm.weight") is None


def test_mtp_tensors_map_onto_decoder_layer_roles():
    """Every MTP key of the checkpoint is an MTP role, and the MTP block (mtp.py) holds it under the
    decoder-layer name of that role (pre_mlp_layernorm as post_attention_layernorm)."""
    config = load_config("full")
    mtp_keys = {n for n in hub_listing() if n.startswith("model.mtp.") and not n.endswith("_scale_inv")}
    assert mtp_keys == {mtp_weight(i, role) for i in range(3) for role in MTP_ROLES}
    names = mtp_block_names(config)
    assert names[mtp_weight(2, "post_attention")] == "model.layers.2.post_attention_layernorm.weight"
    assert mtp_weight(2, "post_attention") == "model.mtp.layers.2.pre_mlp_layernorm.weight"
    assert names[mtp_weight(0, "eh_proj")] == layer_weight(0, "eh_proj") == "model.layers.0.eh_proj.weight"


def test_unknown_role_names_the_roles():
    with pytest.raises(KeyError, match="no layer tensor role 'q_norm'.*'o_proj'"):
        layer_weight(3, "q_norm")
    with pytest.raises(KeyError, match="no MTP layer tensor role 'router'"):
        mtp_weight(0, "router")
