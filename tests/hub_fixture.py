"""A small checkpoint in the exact Hub layout, quantised from known float weights.

Layout as on the Hub (spec section 4): `config.json` with the legacy keys and a
`quantization_config`, `model.safetensors.index.json`, and the shards `model_{i}.safetensors`,
`model_{i}_linear_fc1.safetensors`, `model_{i}_linear_fc2.safetensors`,
`model_embedding.safetensors`, `model_final.safetensors`, `model_mtp.safetensors` (the MTP layers:
SWA geometry, q/k/v and MLP FP8 per tensor, eh_proj and norms BF16). q/k/v, the dense MLP and the experts are
FP8 e4m3fn with 128x128 `weight_scale_inv` blocks (amax / 448, a multiplier); o_proj, norms,
sinks and the embeddings BF16; the router F32. Full-attention layers quantise K and V per KV head
as one fused [K_h; V_h] matrix (2 K scale rows and 1 V scale row per head), SWA layers per tensor.

The quantiser here is written independently of `mimo_v2_flash.fp8` and the files are written by
the `safetensors` package itself (through torch, the only binding that stores F8_E4M3), so the
reader under test is checked against other code.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mimo_v2_flash import MiMoV2FlashConfig, load_config
from mimo_v2_flash.weights import HUB_BF16, HUB_F32, HUB_FP8, layer_prefix, model_tensors, mtp_tensors, random_weights

E4M3FN_MAX = 448.0
BLOCK = 128
QUANTIZATION_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                       "weight_block_size": [BLOCK, BLOCK], "packed_modules_mapping": {}}


@dataclass
class HubFixture:
    path: str
    config: MiMoV2FlashConfig
    known: dict[str, np.ndarray]      # float32 weights before quantisation
    expected: dict[str, np.ndarray]   # float32 values an exact reader returns (q * scale, bf16 values)
    scales: dict[str, np.ndarray]     # each FP8 weight's scale, expanded to the weight's shape


def fixture_config() -> MiMoV2FlashConfig:
    """The tiny preset (full layers 2 KV heads, SWA 4) with the Hub's quantization_config."""
    config = load_config("tiny")
    ignored = [layer_prefix(i) + "self_attn.o_proj" for i in range(config.num_hidden_layers)]
    return config.replace(quantization_config={**QUANTIZATION_CONFIG, "ignored_layers": ignored})


def quantize_rows_in_blocks(w: np.ndarray):
    """DeepSeek-style blocks over a [R, C] matrix: (q e4m3fn, scale per block, q*scale, scale
    expanded to [R, C])."""
    rows, cols = w.shape
    q = np.zeros((rows, cols), ml_dtypes.float8_e4m3fn)
    scale = np.zeros((-(-rows // BLOCK), -(-cols // BLOCK)), np.float32)
    expanded = np.zeros((rows, cols), np.float32)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            block = w[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK]
            s = np.float32(np.abs(block).max() / E4M3FN_MAX)
            scale[i, j] = s
            q[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK] = (block / s).astype(ml_dtypes.float8_e4m3fn)
            expanded[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK] = s
    return q, scale, q.astype(np.float32) * expanded, expanded


def quantize_fused_kv(k: np.ndarray, v: np.ndarray, kv_heads: int):
    """Per KV head, quantise [K_h; V_h] as one matrix; K's scale takes the blocks touching K rows,
    V's scale the rest (spec 4.4). Returns (k parts, v parts), each as quantize_rows_in_blocks."""
    d, dv = k.shape[0] // kv_heads, v.shape[0] // kv_heads
    k_blocks = -(-d // BLOCK)
    parts = {"k": [], "v": []}
    for h in range(kv_heads):
        fused = np.concatenate([k[h * d:(h + 1) * d], v[h * dv:(h + 1) * dv]])
        q, scale, deq, expanded = quantize_rows_in_blocks(fused)
        parts["k"].append((q[:d], scale[:k_blocks], deq[:d], expanded[:d]))
        parts["v"].append((q[d:], scale[k_blocks:], deq[d:], expanded[d:]))
    return tuple(tuple(np.concatenate(column) for column in zip(*parts[t])) for t in ("k", "v"))


def to_torch(array: np.ndarray) -> torch.Tensor:
    if array.dtype == ml_dtypes.float8_e4m3fn:
        return torch.from_numpy(array.view(np.uint8).copy()).view(torch.float8_e4m3fn)
    if array.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(array))


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    if tensor.dtype == torch.float8_e4m3fn:
        return tensor.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def write_hub_fixture(path, config: MiMoV2FlashConfig | None = None, seed: int = 0,
                      full_kv_grouping: str = "per_kv_head", mtp: bool = True) -> HubFixture:
    """Write the checkpoint to `path`; `full_kv_grouping="uniform"` quantises full layers' K/V
    per tensor instead (a layout the reader must also detect); `mtp=False` leaves out
    `model_mtp.safetensors` (a checkpoint without MTP layers)."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    config = config or fixture_config()
    known = random_weights(config, seed, mtp=mtp)
    specs = model_tensors(config) + (mtp_tensors(config) if mtp else [])
    expected, scales, stored = {}, {}, {}
    fused = {}
    for layer in range(config.num_hidden_layers):
        if not config.is_swa(layer) and full_kv_grouping == "per_kv_head":
            p = layer_prefix(layer) + "self_attn."
            k_parts, v_parts = quantize_fused_kv(known[p + "k_proj.weight"], known[p + "v_proj.weight"],
                                                 config.attention_shape(layer)[1])
            fused[p + "k_proj.weight"], fused[p + "v_proj.weight"] = k_parts, v_parts
    for spec in specs:
        w = known[spec.name]
        shard = stored.setdefault(spec.shard, {})
        if spec.hub_dtype == HUB_FP8:
            q, scale, deq, expanded = fused.get(spec.name) or quantize_rows_in_blocks(w)
            shard[spec.name] = q
            shard[spec.name + "_scale_inv"] = scale
            expected[spec.name], scales[spec.name] = deq, expanded
        elif spec.hub_dtype == HUB_BF16:
            shard[spec.name] = w.astype(ml_dtypes.bfloat16)
            expected[spec.name] = shard[spec.name].astype(np.float32)
        else:
            assert spec.hub_dtype == HUB_F32
            shard[spec.name] = w.astype(np.float32)
            expected[spec.name] = shard[spec.name]
    weight_map, total = {}, 0
    for shard, tensors in stored.items():
        save_file({name: to_torch(a) for name, a in tensors.items()}, os.path.join(path, shard),
                  metadata={"format": "pt"})
        weight_map.update({name: shard for name in tensors})
        total += sum(a.nbytes for a in tensors.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f,
                  indent=2)
    config.save(os.path.join(path, "config.json"))
    return HubFixture(path, config, known, expected, scales)


def rewrite_shard(path, shard: str, edit) -> None:
    """Load one shard as NumPy arrays, let `edit(tensors)` change the dict, write it back."""
    file = os.path.join(os.fspath(path), shard)
    tensors = {name: to_numpy(t) for name, t in load_file(file).items()}
    edit(tensors)
    save_file({name: to_torch(a) for name, a in tensors.items()}, file, metadata={"format": "pt"})
