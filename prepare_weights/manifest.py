"""The manifest of a prepared directory: what was converted, how, each file's sha256, and which
files make up each rank's weights.

`manifest.json` (format `mimo_v2_flash.prepared`, version 2) is rewritten atomically (temporary
name + rename) at the start of a conversion (`complete: false`, no hashes), after every finished
file (its sha256), and at the end (`complete: true`). Readers accept only a complete manifest.
Fields: see docs/weights.md.
"""

from __future__ import annotations

import json
import os
import stat

from mimo_v2_flash.checkpoint import (INDEX_FILE, MANIFEST_FILE, PREPARED_FORMAT, PREPARED_VERSION,
                                      CheckpointError)
from mimo_v2_flash.fileguard import check_plain_name, create_new
from mimo_v2_flash.jsonfile import read_json
from mimo_v2_flash.progress import progress_bar
from mimo_v2_flash.safetensors_io import encode_header, sha256_file
from mimo_v2_flash.weights import scale_name

LAYOUT = ("projections (2-D tensors except the embedding) transposed to [in, out] and named "
          "'<hub name>_t'; fp8 weights: Trainium float8_e4m3 (max 240, same bits as e4m3fn within "
          "+-240) with '<name>_scale_inv' float32 [ceil(in/128), ceil(out/128)], a multiplier; other "
          "tensors keep their Hub names and shapes")


class PrepareError(ValueError):
    """Bad conversion input or output; the message names the file, tensor, value or limit."""


# Keys that must agree for a rerun to resume an earlier conversion (the source path may move).
PLAN_KEYS = ("format_version", "config", "world_size", "placement", "layers", "experts", "dtype",
             "replicated")


def file_metadata(dtype: str, contents: str, rank: int | None = None,
                  world_size: int | None = None) -> dict[str, str]:
    """The `__metadata__` of an output file's safetensors header. `contents`: "replicated",
    "experts" or "replicated+experts"; a file shared by every rank names no rank."""
    metadata = {"format": PREPARED_FORMAT, "contents": contents, "dtype": dtype, "layout": LAYOUT}
    if rank is not None:
        metadata.update(rank=str(rank), world_size=str(world_size))
    return metadata


def source_shards(weight_map: dict[str, str], specs) -> list[str]:
    """Shard files holding these tensors and their FP8 scales (every name must be listed)."""
    shards = set()
    for spec in specs:
        if spec.name not in weight_map:
            raise CheckpointError(f"{INDEX_FILE}: tensor {spec.name!r} is not listed")
        shards.add(weight_map[spec.name])
        if scale_name(spec.name) in weight_map:
            shards.add(weight_map[scale_name(spec.name)])
    return sorted(shards)


def shard_records(source: str, shards: list[str], hash_sources: bool) -> dict[str, dict]:
    """Size and mtime of each source shard (and its sha256 with `hash_sources`): what a resumed
    run compares to decide that the source is unchanged."""
    records = {}
    for name in shards:
        path = os.path.join(source, name)
        info = os.stat(path)
        records[name] = {"size": info.st_size, "mtime_ns": info.st_mtime_ns}
        if hash_sources:
            records[name]["sha256"] = sha256_file(path)
    return records


def new_manifest(source: str, config, placement, layers, experts, dtype: str, replicated: str,
                 files, ranks, shards: dict[str, dict]) -> dict:
    """A manifest (not complete, no hashes). files = [(name, entries, metadata)] in write order;
    ranks = [(rank, experts, names of the files holding that rank's tensors)]; shards: the
    `shard_records` of the source shards read."""
    records = []
    for name, entries, metadata in files:
        records.append({
            "name": name, "size": len(encode_header(entries, metadata)) + sum(e.nbytes for e in entries),
            "sha256": None,
            "tensors": {e.name: {"dtype": e.dtype, "shape": list(e.shape)} for e in entries},
        })
    return {
        "format": PREPARED_FORMAT, "format_version": PREPARED_VERSION, "complete": False,
        "config": config.to_hub_dict(), "world_size": placement.world_size,
        "placement": placement.to_json(), "layers": list(layers), "experts": experts, "dtype": dtype,
        "replicated": replicated, "layout": LAYOUT,
        "source": {"path": os.path.abspath(source),
                   "index_sha256": sha256_file(os.path.join(source, INDEX_FILE)), "shards": shards},
        "files": records,
        "ranks": [{"rank": rank, "experts": owned, "files": list(names)} for rank, owned, names in ranks],
    }


def write_manifest(output: str, manifest: dict) -> None:
    path = os.path.join(output, MANIFEST_FILE)
    tmp = path + ".partial"
    with create_new(tmp, PrepareError, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_existing(output: str) -> dict | None:
    """The manifest already in `output` (complete or not, structure checked), or None."""
    path = os.path.join(output, MANIFEST_FILE)
    if not os.path.lexists(path):
        return None
    manifest = read_json(path, PrepareError, "manifest")
    files = manifest.get("files")
    if not isinstance(files, list) or not all(
            isinstance(f, dict) and isinstance(f.get("size"), int) and isinstance(f.get("tensors"), dict)
            and isinstance(f.get("sha256"), (str, type(None))) for f in files):
        raise PrepareError(f"{path}: 'files' must be a list of {{name, size, sha256, tensors}} records; "
                           "delete the manifest to start over")
    for record in files:
        check_plain_name(record.get("name"), PrepareError, path)
    return manifest


def plan_difference(previous: dict, current: dict) -> str:
    """'' if `previous` describes the same conversion from the same source, else the first
    difference: a setting, the index, or a source shard (sha256 when both runs hashed the
    sources, else size and modification time)."""
    for key in PLAN_KEYS:
        if previous.get(key) != current.get(key):
            return f"{key!r} differs"
    source = previous.get("source") if isinstance(previous.get("source"), dict) else {}
    if source.get("index_sha256") != current["source"]["index_sha256"]:
        return "the source checkpoint's index differs"
    recorded = source.get("shards") if isinstance(source.get("shards"), dict) else {}
    for name, now in current["source"]["shards"].items():
        then = recorded.get(name)
        if not isinstance(then, dict):
            return f"source shard {name} is not recorded in the earlier manifest"
        if "sha256" in then and "sha256" in now:
            if then["sha256"] != now["sha256"]:
                return f"source shard {name} changed (sha256 differs)"
        elif (then.get("size"), then.get("mtime_ns")) != (now["size"], now["mtime_ns"]):
            return (f"source shard {name} changed (size or modification time differs; if only its "
                    "time changed, e.g. a copy, resume with --hash-sources in both runs)")
    if [(f["name"], f["tensors"]) for f in previous["files"]] != \
            [(f["name"], f["tensors"]) for f in current["files"]]:
        return "the planned file contents differ"
    return ""


def recorded_hash(manifest: dict, name: str) -> str | None:
    return next((f.get("sha256") for f in manifest.get("files", []) if f["name"] == name), None)


def file_matches(output: str, manifest: dict, record: dict, progress: bool = False) -> bool:
    """True if `record`'s file exists with the size and sha256 that `manifest` recorded."""
    expected = recorded_hash(manifest, record["name"])
    path = os.path.join(output, record["name"])
    if expected is None or not _is_regular(path) or os.path.getsize(path) != record["size"]:
        return False
    with progress_bar(total=record["size"], unit="B", unit_scale=True, unit_divisor=1024,
                      desc=f"hashing {record['name']}", enabled=None if progress else False) as bar:
        return sha256_file(path, progress=bar) == expected


def _is_regular(path: str) -> bool:
    """A regular file, not a symlink to one."""
    return stat.S_ISREG(os.lstat(path).st_mode) if os.path.lexists(path) else False


def verify(output: str, progress: bool = True) -> list[tuple[str, str]]:
    """Re-hash every file against the manifest: [(file, 'ok' or the problem)]."""
    output = os.fspath(output)
    manifest = read_existing(output)
    if manifest is None:
        return [(MANIFEST_FILE, f"missing in {output}")]
    report = [] if manifest.get("complete") else [(MANIFEST_FILE, "conversion not complete")]
    if os.path.islink(os.path.join(output, MANIFEST_FILE)):
        report.append((MANIFEST_FILE, "is a symlink (refused)"))
    for record in manifest["files"]:
        path = os.path.join(output, record["name"])
        if record.get("sha256") is None:
            report.append((record["name"], "not written yet"))
        elif os.path.islink(path):
            report.append((record["name"], "is a symlink (refused: a prepared file must be the file itself)"))
        elif not os.path.lexists(path):
            report.append((record["name"], "missing"))
        elif not _is_regular(path):
            report.append((record["name"], "not a regular file"))
        elif os.path.getsize(path) != record["size"]:
            report.append((record["name"], f"size {os.path.getsize(path)}, manifest says {record['size']}"))
        elif not file_matches(output, manifest, record, progress):
            report.append((record["name"], "sha256 mismatch (file changed or corrupt)"))
        else:
            report.append((record["name"], "ok"))
    return report
