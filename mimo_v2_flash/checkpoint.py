"""Reading checkpoints: the Hub layout (FP8 blocks, fused K/V scales) and prepared per-rank files.

Hub layout (`XiaomiMiMo/MiMo-V2-Flash`): `config.json`, `model.safetensors.index.json` and
per-layer shards. Tensors are read one at a time from memory-mapped shards and checked against
the table in `weights.py` (name, shape, stored dtype). FP8 `F8_E4M3` weights are dequantised
with their `weight_scale_inv` grids (a multiplier, see `fp8.py`); BF16 and F32 tensors are read
as they are.

The full-attention layers' K/V scales (spec section 4.4): the checkpoint was quantised per
tensor-parallel rank of a fused [Q | K | V] projection, so for every KV head the K rows (192) and
V rows (128) form one 320-row matrix cut into 128-row blocks. K's scale has one row per block
that touches K (2 per head), V's one row per block that holds only V (1 per head), and V rows
0..63 of each head use K's last scale row of that head. `HubCheckpoint.kv_grouping` detects the
layout per layer from the scale shapes (per-head iff the K scale has n_kv * ceil(192/128) rows
and that differs from the uniform count; uniform if the shapes fit the plain grid; an error
otherwise) and, on first read, checks it: amax-scaled blocks reach max|fp8| = 448, so a block
far below that under the chosen grouping triggers a `ScaleGroupingWarning`.

Prepared layout (written by `prepare_weights`): `manifest.json` plus, per rank, a set of
safetensors files (one shared replicated file + the rank's experts file, or one self-contained
file), projections stored transposed under `weights.kernel_name` (see docs/weights.md).
`PreparedCheckpoint` reads it back into Hub-layout float32 arrays.
"""

from __future__ import annotations

import json
import os
import warnings

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from . import fp8
from .config import ConfigError, MiMoV2FlashConfig
from .fileguard import check_plain_name
from .jsonfile import read_json
from .placement import ExpertPlacement, PlacementError
from .progress import progress_bar
from .safetensors_io import SafetensorsError, SafetensorsFile, check_finite
from .weights import (EMBED, HUB_BF16, HUB_F32, HUB_FP8, TensorSpec, fp8_scale_shape, kernel_name,
                      layer_and_role, layer_tensors, layer_weight, model_tensors, mtp_tensors, scale_name)

INDEX_FILE = "model.safetensors.index.json"
FINITE_CHECK_ROWS = 1024          # rows of a stored tensor checked for NaN / Inf at a time
MANIFEST_FILE = "manifest.json"
PREPARED_FORMAT = "mimo_v2_flash.prepared"
PREPARED_VERSION = 2      # 2: per-rank file sets (shared replicated file)

UNIFORM = "uniform"               # plain 128-row blocks per tensor
PER_KV_HEAD = "per_kv_head"       # fused [K_h; V_h] blocks per KV head (spec 4.4, option C)
# Hub dtypes a table entry may be stored as (FP8 needs its scale grid beside it).
ACCEPTED_DTYPES = {HUB_FP8: ("F8_E4M3", "BF16", "F32"), HUB_BF16: ("BF16", "F32"), HUB_F32: ("F32", "BF16")}
# An amax-scaled block's max|fp8| is the format maximum; below this fraction of it the grouping
# that assigned the block its scale is suspect.
SELF_CHECK_FRACTION = 0.5


class CheckpointError(ValueError):
    """A checkpoint that does not match the config; the message names the file and tensor."""


class ScaleGroupingWarning(UserWarning):
    """FP8 blocks whose max|fp8| is far below the format maximum under the chosen grouping."""


def read_index(path: str) -> dict[str, str]:
    index_path = os.path.join(path, INDEX_FILE)
    index = read_json(index_path, CheckpointError, "index file")
    if not isinstance(index.get("weight_map"), dict):
        raise CheckpointError(f"{index_path}: no 'weight_map' object")
    for shard in index["weight_map"].values():
        check_plain_name(shard, CheckpointError, index_path)
    return index["weight_map"]


def kv_row_groups(kv_heads: int, head_dim: int, v_head_dim: int, grouping: str):
    """Scale rows of the K and V rows of one attention layer.

    Returns (k_groups [kv*d] indexing K's scale, v_groups [kv*dv] indexing the concatenation
    [K scale; V scale]). Per-KV-head: head h's fused matrix [K_h; V_h] has
    nb = ceil((d + dv) / 128) blocks, the first kb = ceil(d / 128) stored in K's scale (rows
    h*kb ...), the rest in V's scale (rows h*(nb-kb) ...).
    """
    if grouping == UNIFORM:
        return (fp8.uniform_row_groups(kv_heads * head_dim),
                fp8.num_blocks(kv_heads * head_dim) + fp8.uniform_row_groups(kv_heads * v_head_dim))
    kb = fp8.num_blocks(head_dim)
    vb = fp8.num_blocks(head_dim + v_head_dim) - kb
    heads = np.arange(kv_heads)[:, None]
    k_groups = heads * kb + np.arange(head_dim)[None, :] // fp8.FP8_BLOCK
    block = (head_dim + np.arange(v_head_dim))[None, :] // fp8.FP8_BLOCK        # fused block of V row
    v_groups = np.where(block < kb, heads * kb + block, kv_heads * kb + heads * vb + block - kb)
    return k_groups.reshape(-1), v_groups.reshape(-1)


def kv_scale_rows(kv_heads: int, head_dim: int, v_head_dim: int, grouping: str) -> tuple[int, int]:
    """(K scale rows, V scale rows) of a grouping."""
    if grouping == UNIFORM:
        return fp8.num_blocks(kv_heads * head_dim), fp8.num_blocks(kv_heads * v_head_dim)
    kb = fp8.num_blocks(head_dim)
    return kv_heads * kb, kv_heads * (fp8.num_blocks(head_dim + v_head_dim) - kb)


class HubCheckpoint:
    """A Hub-layout checkpoint directory, read lazily, tensor by tensor.

    Shard headers are parsed once (and checked: a truncated shard fails on first use); tensor
    data is memory-mapped per read and released when the caller drops the array.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        self.config = MiMoV2FlashConfig.from_json(self.path)
        self.index_path = os.path.join(self.path, INDEX_FILE)
        self.weight_map = read_index(self.path)
        self._shards: dict[str, SafetensorsFile] = {}
        self._groupings: dict[int, str] = {}
        self._self_checked: set[int] = set()

    # ---- headers -----------------------------------------------------------------------------
    def shard_of(self, name: str) -> SafetensorsFile:
        shard = self.weight_map.get(name)
        if shard is None:
            raise CheckpointError(f"{self.index_path}: tensor {name!r} is not listed")
        if shard not in self._shards:
            shard_path = os.path.join(self.path, shard)
            if not os.path.exists(shard_path):
                raise CheckpointError(f"{shard_path}: shard file missing (listed for {name!r})")
            try:
                self._shards[shard] = SafetensorsFile(shard_path)
            except SafetensorsError as err:
                raise CheckpointError(str(err)) from None
        handle = self._shards[shard]
        if name not in handle:
            raise CheckpointError(f"{handle.path}: tensor {name!r} listed in the index is absent "
                                  "from the shard")
        return handle

    def stored_dtype(self, spec: TensorSpec) -> str:
        """The safetensors dtype `spec` is stored in, after checking shape and dtype."""
        handle = self.shard_of(spec.name)
        entry = handle.entries[spec.name]
        if entry.shape != spec.shape:
            raise CheckpointError(f"{handle.path}: tensor {spec.name!r} has shape {list(entry.shape)}, "
                                  f"the config expects {list(spec.shape)}")
        if entry.dtype not in ACCEPTED_DTYPES[spec.hub_dtype]:
            raise CheckpointError(f"{handle.path}: tensor {spec.name!r} has dtype {entry.dtype}; the "
                                  f"table stores it as {spec.hub_dtype} (accepted: "
                                  f"{', '.join(ACCEPTED_DTYPES[spec.hub_dtype])})")
        if entry.dtype == "F8_E4M3":
            scale = self.shard_of(scale_name(spec.name))
            scale_entry = scale.entries[scale_name(spec.name)]
            if scale_entry.dtype != "F32" or len(scale_entry.shape) != 2:
                raise CheckpointError(f"{scale.path}: scale {scale_entry.name!r} is {scale_entry.dtype} "
                                      f"{list(scale_entry.shape)}; expected a 2-D F32 grid")
            if scale_entry.shape[1] != fp8.num_blocks(spec.shape[1]):
                raise CheckpointError(f"{scale.path}: scale {scale_entry.name!r} has shape "
                                      f"{list(scale_entry.shape)}; {spec.shape[1]} columns need "
                                      f"{fp8.num_blocks(spec.shape[1])} column blocks")
        return entry.dtype

    def _scale_shape(self, name: str) -> tuple[int, ...]:
        return self.shard_of(scale_name(name)).entries[scale_name(name)].shape

    def kv_grouping(self, layer: int) -> str:
        """UNIFORM or PER_KV_HEAD for this layer's K/V scales, detected from their shapes."""
        if layer in self._groupings:
            return self._groupings[layer]
        _, kv, d, dv = self.config.attention_shape(layer)
        k_spec, v_spec = self._kv_specs(layer)
        if self.stored_dtype(k_spec) != "F8_E4M3" or self.stored_dtype(v_spec) != "F8_E4M3":
            grouping = UNIFORM      # at most one of them is FP8: nothing is shared
        else:
            k_rows, v_rows = self._scale_shape(k_spec.name)[0], self._scale_shape(v_spec.name)[0]
            uniform = kv_scale_rows(kv, d, dv, UNIFORM)
            per_head = kv_scale_rows(kv, d, dv, PER_KV_HEAD)
            if (k_rows, v_rows) == per_head and per_head != uniform:
                grouping = PER_KV_HEAD
            elif (k_rows, v_rows) == uniform:
                grouping = UNIFORM
            else:
                raise CheckpointError(
                    f"{self.path}: layer {layer} K/V scales have {k_rows} and {v_rows} rows, which fit "
                    f"no grouping: uniform 128-row blocks need {uniform[0]} and {uniform[1]}, fused "
                    f"per-KV-head blocks need {per_head[0]} and {per_head[1]} "
                    f"({kv} KV heads, head dims {d}/{dv})")
        self._groupings[layer] = grouping
        return grouping

    def _kv_specs(self, layer: int) -> tuple[TensorSpec, TensorSpec]:
        specs = {s.name: s for s in layer_tensors(self.config, layer, experts=[])}
        return specs[layer_weight(layer, "k_proj")], specs[layer_weight(layer, "v_proj")]

    def validate(self, specs: list[TensorSpec]) -> None:
        """Check every listed tensor (headers only): present, shape, dtype, scale grid."""
        for spec in specs:
            layer = _kv_layer(spec.name)
            if layer is not None and self.kv_grouping(layer) == PER_KV_HEAD:
                continue    # the detection checked both scale shapes
            if self.stored_dtype(spec) == "F8_E4M3":
                shape = self._scale_shape(spec.name)
                if shape != fp8_scale_shape(spec.shape):
                    raise CheckpointError(f"{self.shard_of(scale_name(spec.name)).path}: scale "
                                          f"{scale_name(spec.name)!r} has shape {list(shape)}, which fits "
                                          f"no grouping of {list(spec.shape)} (expected "
                                          f"{list(fp8_scale_shape(spec.shape))})")

    # ---- data --------------------------------------------------------------------------------
    def _raw(self, name: str) -> np.ndarray:
        return self.shard_of(name).read(name)

    def _fp8_parts(self, spec: TensorSpec):
        """(fp8 array, scale grid, row groups) of an FP8 tensor, K/V grouping applied."""
        layer = _kv_layer(spec.name)
        if layer is not None and layer not in self._self_checked:
            self._self_checked.add(layer)
            self.self_check_kv(layer)
        if layer is None or self.kv_grouping(layer) == UNIFORM:
            return self._raw(spec.name), self._raw(scale_name(spec.name)), \
                fp8.uniform_row_groups(spec.shape[0])
        k_spec, v_spec = self._kv_specs(layer)
        _, kv, d, dv = self.config.attention_shape(layer)
        k_groups, v_groups = kv_row_groups(kv, d, dv, PER_KV_HEAD)
        k_scale = np.asarray(self._raw(scale_name(k_spec.name)))
        if spec.name == k_spec.name:
            return self._raw(spec.name), k_scale, k_groups
        both = np.concatenate([k_scale, self._raw(scale_name(v_spec.name))])
        return self._raw(spec.name), both, v_groups

    def self_check_kv(self, layer: int) -> None:
        """Warn when this layer's K/V blocks do not reach max|fp8| near 448 under its grouping."""
        k_spec, v_spec = self._kv_specs(layer)
        if self.stored_dtype(k_spec) != "F8_E4M3" or self.stored_dtype(v_spec) != "F8_E4M3":
            return      # no shared blocks to misread
        grouping = self.kv_grouping(layer)
        _, kv, d, dv = self.config.attention_shape(layer)
        k_groups, v_groups = kv_row_groups(kv, d, dv, grouping)
        groups = sum(kv_scale_rows(kv, d, dv, grouping))
        peak = np.maximum(fp8.group_max_abs(self._raw(k_spec.name), k_groups, groups),
                          fp8.group_max_abs(self._raw(v_spec.name), v_groups, groups))
        low = peak < SELF_CHECK_FRACTION * fp8.OCP_E4M3.max
        if low.any():
            warnings.warn(f"{self.path}: layer {layer}: {int(low.sum())} of {low.size} K/V scale blocks "
                          f"have max|fp8| below {SELF_CHECK_FRACTION * fp8.OCP_E4M3.max:g} under the "
                          f"{grouping} grouping (amax-scaled blocks reach {fp8.OCP_E4M3.max:g}); the "
                          "K/V scale layout may be misread", ScaleGroupingWarning, stacklevel=2)

    def iter_rows(self, spec: TensorSpec, chunk_rows: int):
        """As `_iter_rows`, each chunk checked finite (CheckpointError naming the tensor)."""
        for start, stop, rows in self._iter_rows(spec, chunk_rows):
            try:
                check_finite(rows, f"{self.shard_of(spec.name).path}: tensor {spec.name!r}", start)
            except SafetensorsError as err:
                raise CheckpointError(str(err)) from None
            yield start, stop, rows

    def _iter_rows(self, spec: TensorSpec, chunk_rows: int):
        """Yield (start, stop, float32 rows [stop - start, ...]) of one tensor, dequantised.

        `chunk_rows` is rounded down to a multiple of 128 for FP8 tensors (at least 128), so each
        chunk holds whole block rows; 1-D tensors are chunked along their only axis.
        """
        rows = spec.shape[0]
        if self.stored_dtype(spec) != "F8_E4M3":
            raw = self._raw(spec.name)
            for start in range(0, rows, max(chunk_rows, 1)):
                stop = min(rows, start + max(chunk_rows, 1))
                yield start, stop, np.asarray(raw[start:stop], np.float32)
            return
        q, scale, groups = self._fp8_parts(spec)
        step = max(fp8.FP8_BLOCK, chunk_rows // fp8.FP8_BLOCK * fp8.FP8_BLOCK)
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            yield start, stop, fp8.dequantize_rows(q, scale, groups, start, stop)

    def read(self, spec: TensorSpec) -> np.ndarray:
        """The whole tensor as float32 (dequantised if FP8)."""
        out = np.empty(spec.shape, np.float32)
        for start, stop, rows in self.iter_rows(spec, spec.shape[0]):
            out[start:stop] = rows
        return out


def _kv_layer(name: str) -> int | None:
    """The layer of a `k_proj`/`v_proj` weight (whose scales may be fused), else None."""
    layer_role = layer_and_role(name)
    return layer_role[0] if layer_role is not None and layer_role[1] in ("k_proj", "v_proj") else None


def stored_mtp_tensors(checkpoint: HubCheckpoint) -> list[TensorSpec]:
    """The MTP layers' tensors if the index lists them (all of them), [] if it lists none."""
    specs = mtp_tensors(checkpoint.config)
    listed = [spec.name in checkpoint.weight_map for spec in specs]
    if any(listed) and not all(listed):
        missing = next(spec.name for spec, ok in zip(specs, listed) if not ok)
        raise CheckpointError(f"{checkpoint.index_path}: lists some MTP tensors but not {missing!r} "
                              f"(mtp_num_layers={checkpoint.config.mtp_num_layers})")
    return specs if all(listed) else []


def load_hub_checkpoint(path, experts=None, layers=None):
    """(config, {name: float32 array}) for the main model, optionally an expert subset, plus the
    MTP layers when the checkpoint holds them (a whole model only: `layers` None).

    Headers of every needed tensor are checked before any data is read."""
    checkpoint = HubCheckpoint(path)
    specs = model_tensors(checkpoint.config, layers=layers, experts=experts)
    if layers is None:
        specs += stored_mtp_tensors(checkpoint)
    checkpoint.validate(specs)
    return checkpoint.config, {spec.name: checkpoint.read(spec)
                               for spec in progress_bar(specs, desc="loading", unit="tensor")}


class TransformersCompatibilityWarning(UserWarning):
    """A saved checkpoint that transformers' native class would load as a different model."""


def save_hub_checkpoint(path, config: MiMoV2FlashConfig, weights, dtype: str = "float32") -> None:
    """Write `weights` in the Hub shard layout; projections in `dtype`, F32 tensors as F32.

    config.json says `dtype` and carries no FP8 `quantization_config` (nothing written is FP8),
    so transformers loads the tensors as they are stored."""
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    specs = model_tensors(config)
    missing = [spec.name for spec in specs if spec.name not in weights]
    if missing:  # an expert-subset model writes the experts it has
        warnings.warn(f"{path}: {len(missing)} tensors (first {missing[0]!r}) are not held by this "
                      "model; transformers would initialise them at random", TransformersCompatibilityWarning,
                      stacklevel=3)
    for difference in config.transformers_differences():
        warnings.warn(f"{path}: transformers' MiMoV2FlashForCausalLM cannot build this config: "
                      f"{difference}", TransformersCompatibilityWarning, stacklevel=3)
    os.makedirs(path, exist_ok=True)
    store = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
    shards: dict[str, dict[str, np.ndarray]] = {}
    for spec in specs + mtp_tensors(config):
        if spec.name not in weights:
            continue   # an expert-subset model writes the experts it has; an MTP-less one no MTP
        target = np.float32 if spec.hub_dtype == HUB_F32 else store
        shards.setdefault(spec.shard, {})[spec.name] = np.ascontiguousarray(weights[spec.name], dtype=target)
    weight_map = {}
    for shard, tensors in shards.items():
        tmp = os.path.join(path, shard + ".tmp")
        save_file(tensors, tmp)
        os.replace(tmp, os.path.join(path, shard))
        weight_map.update({name: shard for name in tensors})
    config.replace(quantization_config=None).save(os.path.join(path, "config.json"), dtype=dtype)
    with open(os.path.join(path, INDEX_FILE), "w") as f:
        json.dump({"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=1)


# ---- prepared per-rank files ------------------------------------------------------------------
REPLICATED_FILE = "replicated.safetensors"


def rank_file_name(rank: int, world_size: int) -> str:
    """A self-contained rank file (`--replicated per-rank`): replicated tensors + the rank's experts."""
    return f"rank-{rank:05d}-of-{world_size:05d}.safetensors"


def expert_file_name(rank: int, world_size: int) -> str:
    """A rank's experts-only file (`--replicated shared`), read together with REPLICATED_FILE."""
    return f"experts-{rank:05d}-of-{world_size:05d}.safetensors"


def is_prepared_dir(path) -> bool:
    return os.path.isfile(os.path.join(os.fspath(path), MANIFEST_FILE))


def _int_list(value, path: str, key: str) -> list[int]:
    """A manifest list of non-negative ints, or a CheckpointError naming the key."""
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                              for v in value):
        raise CheckpointError(f"{path}: {key!r} must be a list of non-negative integers, got {value!r:.80}")
    return value


class PreparedCheckpoint:
    """A directory written by `prepare_weights`: `manifest.json` plus each rank's file set.

    The manifest lists per rank the files that together hold its tensors: the shared
    `replicated.safetensors` plus its own experts file, or one self-contained rank file. Either
    way, projections are stored transposed to [in, out] under `kernel_name`, in BF16/F32 or FP8
    (Trainium e4m3, 128x128 scales). Only a manifest marked complete is read; hashes are checked
    by `prepare_weights --verify`.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        manifest_path = os.path.join(self.path, MANIFEST_FILE)
        self.manifest = read_json(manifest_path, CheckpointError, "manifest")
        m = self.manifest
        if m.get("format") != PREPARED_FORMAT or m.get("format_version") != PREPARED_VERSION:
            raise CheckpointError(f"{manifest_path}: not a {PREPARED_FORMAT} v{PREPARED_VERSION} manifest "
                                  f"(format {m.get('format')!r} v{m.get('format_version')}); prepare the "
                                  "weights again into a new directory")
        if not m.get("complete"):
            raise CheckpointError(f"{manifest_path}: conversion not complete (interrupted?); rerun "
                                  "prepare-weights on the same output directory to resume")
        try:
            self.full_config = MiMoV2FlashConfig.from_hub_dict(m["config"], source=manifest_path)
            self.placement = ExpertPlacement.from_json(m["placement"])
            rank_files = {r["rank"]: [os.path.join(self.path, check_plain_name(name, CheckpointError, manifest_path))
                                      for name in r["files"]] for r in m["ranks"]}
        except (ConfigError, PlacementError, KeyError, TypeError) as err:
            raise CheckpointError(f"{manifest_path}: {err}") from None
        self.world_size = self.placement.world_size
        if sorted(rank_files) != list(range(self.world_size)):
            raise CheckpointError(f"{manifest_path}: lists files for ranks {sorted(rank_files)}, the "
                                  f"placement has ranks 0..{self.world_size - 1}")
        self.rank_files = rank_files
        self.layers = _int_list(m.get("layers"), manifest_path, "layers")
        self.experts = None if m.get("experts") is None else _int_list(m["experts"], manifest_path, "experts")

    def experts_of(self, rank: int) -> list[int]:
        """Routed experts stored in `rank`'s files."""
        owned = self.placement.experts_of(rank)
        return owned if self.experts is None else [e for e in owned if e in set(self.experts)]

    def runnable_config(self) -> MiMoV2FlashConfig:
        """The config of a model over the stored layers (which must be 0..n-1)."""
        n = len(self.layers)
        if self.layers != list(range(n)):
            raise CheckpointError(f"{self.path}: holds layers {self.layers[0]}..{self.layers[-1]}; a "
                                  "runnable model needs the layers from 0 on (prepare with --layers 0:N)")
        config = self.full_config
        return config if n == config.num_hidden_layers else config.replace(num_hidden_layers=n)

    def load(self, rank: int | None = None) -> tuple[MiMoV2FlashConfig, dict[str, np.ndarray]]:
        """(config, Hub-name float32 weights [out, in]) of one rank, or of every rank (None).

        rank=None: replicated tensors from rank 0's files plus every rank's experts.
        """
        return self._load(rank, self._read)

    def load_kernel_layout(self, rank: int | None = None) -> tuple[MiMoV2FlashConfig, "KernelLayoutWeights"]:
        """Like `load`, but every tensor as stored (projections [in, out] in bf16, or FP8 with
        its block scale), memory-mapped: what a kernel backend reads, with no float32 Hub-layout
        copy (see `KernelLayoutWeights`)."""
        config, stored = self._load(rank, self._read_stored)
        return config, KernelLayoutWeights(stored)

    def _load(self, rank, read):
        if rank is not None and not 0 <= rank < self.world_size:
            raise CheckpointError(f"{self.path}: rank {rank} outside 0..{self.world_size - 1}")
        config = self.runnable_config()
        ranks = range(self.world_size) if rank is None else [rank]
        opened: dict[str, SafetensorsFile] = {}     # a shared file is opened once for all ranks
        weights = {}
        replicated = set(model_tensors(self.full_config, self.layers, experts=[]))
        for r in ranks:
            for path in self.rank_files[r]:
                if path not in opened:
                    try:
                        opened[path] = SafetensorsFile(path)
                    except SafetensorsError as err:
                        raise CheckpointError(str(err)) from None
            files = [opened[path] for path in self.rank_files[r]]
            specs = model_tensors(self.full_config, self.layers, experts=self.experts_of(r))
            if r != min(ranks):    # replicated tensors come from the first rank read
                specs = [s for s in specs if s not in replicated]
            else:
                specs += self._stored_mtp(files)
            for spec in progress_bar(specs, desc=f"loading rank {r}", unit="tensor"):
                weights[spec.name] = read(r, files, spec)
        return config, weights

    def _stored_mtp(self, files: list[SafetensorsFile]) -> list[TensorSpec]:
        """The MTP layers' tensors if these files hold them (prepared from a whole model)."""
        if self.layers != list(range(self.full_config.num_hidden_layers)):
            return []
        specs = mtp_tensors(self.full_config)
        held = [any(kernel_name(spec) in f for f in files) for spec in specs]
        if any(held) and not all(held):
            missing = next(kernel_name(spec) for spec, ok in zip(specs, held) if not ok)
            raise CheckpointError(f"{self.path}: holds some MTP tensors but not {missing!r}")
        return specs if all(held) else []

    def _read(self, rank: int, files: list[SafetensorsFile], spec: TensorSpec) -> np.ndarray:
        weight, scale = self._read_stored(rank, files, spec)
        return stored_to_hub(weight, scale, projection=kernel_name(spec) != spec.name)

    def _read_stored(self, rank: int, files: list[SafetensorsFile], spec: TensorSpec):
        """(tensor as stored, memory-mapped; its FP8 block scale or None), shape checked."""
        name = kernel_name(spec)
        handle = next((f for f in files if name in f), None)
        if handle is None:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing from rank {rank}'s files "
                                  f"{[os.path.basename(f.path) for f in files]}")
        stored = handle.entries[name]
        shape = spec.shape[::-1] if name != spec.name else spec.shape
        if stored.shape != shape:
            raise CheckpointError(f"{handle.path}: tensor {name!r} has shape {list(stored.shape)}, "
                                  f"expected {list(shape)}")
        weight = handle.read(name)
        scale = handle.read(scale_name(name)) if stored.dtype == "F8_E4M3" else None
        try:       # in row blocks: the float32 view of a check never holds a whole tensor
            for array, what in ((weight, name), (scale, scale_name(name))):
                for r0 in range(0, 0 if array is None else max(len(array), 1), FINITE_CHECK_ROWS):
                    check_finite(array[r0:r0 + FINITE_CHECK_ROWS], f"{handle.path}: tensor {what!r}", row_offset=r0)
        except SafetensorsError as err:
            raise CheckpointError(str(err)) from None
        return weight, scale


def stored_to_hub(weight: np.ndarray, scale: np.ndarray | None, projection: bool) -> np.ndarray:
    """A stored tensor in the Hub layout, float32: FP8 dequantised, projections transposed back."""
    array = fp8.dequantize(weight, scale) if scale is not None else np.asarray(weight, np.float32)
    return array.T if projection else array


class KernelLayoutWeights:
    """A prepared rank's tensors as stored: `stored(name)` gives (array, FP8 scale or None) in the
    kernel layout (projections [in, out]); `weights[name]` gives the Hub layout [out, in] float32,
    computed on each access (for the few small tensors the layer code reads directly, and for a
    reference check). The arrays are memory maps of the files: nothing is copied until a backend
    converts or uploads them."""

    def __init__(self, stored: dict[str, tuple[np.ndarray, np.ndarray | None]]):
        self._stored = stored

    def stored(self, name: str) -> tuple[np.ndarray, np.ndarray | None]:
        return self._stored[name]

    def __getitem__(self, name: str) -> np.ndarray:
        weight, scale = self._stored[name]
        return stored_to_hub(weight, scale, projection=weight.ndim == 2 and name != EMBED)

    def __contains__(self, name) -> bool:
        return name in self._stored

    def __iter__(self):
        return iter(self._stored)

    def __len__(self) -> int:
        return len(self._stored)

    def keys(self):
        return self._stored.keys()

    def items(self):
        return ((name, self[name]) for name in self._stored)
