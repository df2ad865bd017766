"""Reading and writing the Hub checkpoint layout (`model.safetensors.index.json` + shards).

Tensors are read one at a time from memory-mapped shards; names, shapes and stored dtypes are
checked against the table in `weights.py`.
"""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from .config import MiMoV2FlashConfig
from .weights import F32, model_tensors

INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint that does not match the config; the message names the file and tensor."""


def read_index(path: str) -> dict[str, str]:
    index_path = os.path.join(path, INDEX_FILE)
    try:
        with open(index_path) as f:
            index = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{index_path}: index file not found") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{index_path}: not valid JSON ({err})") from None
    if not isinstance(index.get("weight_map"), dict):
        raise CheckpointError(f"{index_path}: no 'weight_map' object")
    return index["weight_map"]


def load_hub_checkpoint(path, experts=None, layers=None):
    """(config, {name: float32 array}) for the main model, optionally an expert subset."""
    path = os.fspath(path)
    config = MiMoV2FlashConfig.from_json(path)
    weight_map = read_index(path)
    weights = {}
    handles = {}
    try:
        for spec in model_tensors(config, layers=layers, experts=experts):
            shard = weight_map.get(spec.name)
            if shard is None:
                raise CheckpointError(f"{os.path.join(path, INDEX_FILE)}: tensor {spec.name!r} is not listed")
            if shard not in handles:
                shard_path = os.path.join(path, shard)
                if not os.path.exists(shard_path):
                    raise CheckpointError(f"{shard_path}: shard file missing (listed for {spec.name!r})")
                try:
                    handles[shard] = safe_open(shard_path, "np")
                except Exception as err:  # safetensors raises its own error types
                    raise CheckpointError(f"{shard_path}: unreadable safetensors file ({err})") from None
            handle = handles[shard]
            if spec.name not in handle.keys():
                raise CheckpointError(f"{os.path.join(path, shard)}: tensor {spec.name!r} listed in the "
                                      "index is absent from the shard")
            array = handle.get_tensor(spec.name)
            if tuple(array.shape) != spec.shape:
                raise CheckpointError(f"{os.path.join(path, shard)}: tensor {spec.name!r} has shape "
                                      f"{tuple(array.shape)}, the config expects {spec.shape}")
            if array.dtype not in (np.float32, ml_dtypes.bfloat16):
                raise CheckpointError(f"{os.path.join(path, shard)}: tensor {spec.name!r} has dtype "
                                      f"{array.dtype}; expected BF16 or F32")
            weights[spec.name] = array.astype(np.float32)
    finally:
        handles.clear()
    return config, weights


def save_hub_checkpoint(path, config: MiMoV2FlashConfig, weights, dtype: str = "float32") -> None:
    """Write `weights` in the Hub shard layout; projections in `dtype`, F32 tensors as F32."""
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    os.makedirs(path, exist_ok=True)
    store = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
    shards: dict[str, dict[str, np.ndarray]] = {}
    for spec in model_tensors(config):
        if spec.name not in weights:
            continue   # an expert-subset model writes the experts it has
        target = np.float32 if spec.hub_dtype == F32 else store
        shards.setdefault(spec.shard, {})[spec.name] = np.ascontiguousarray(weights[spec.name], dtype=target)
    weight_map = {}
    for shard, tensors in shards.items():
        tmp = os.path.join(path, shard + ".tmp")
        save_file(tensors, tmp)
        os.replace(tmp, os.path.join(path, shard))
        weight_map.update({name: shard for name in tensors})
    config.save(os.path.join(path, "config.json"))
    with open(os.path.join(path, INDEX_FILE), "w") as f:
        json.dump({"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=1)



