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

from mimo_v2_flash.checkpoint import INDEX_FILE, MANIFEST_FILE, PREPARED_FORMAT, PREPARED_VERSION
from mimo_v2_flash.progress import progress_bar
from mimo_v2_flash.safetensors_io import encode_header, sha256_file

LAYOUT = ("projections (2-D tensors except the embedding) transposed to [in, out] and named "
          "'<hub name>_t'; fp8 weights: Trainium float8_e4m3 (max 240, same bits as e4m3fn within "
          "+-240) with '<name>_scale_inv' float32 [ceil(in/128), ceil(out/128)], a multiplier; other "
          "tensors keep their Hub names and shapes")
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


def _sha256_of_index(source: str) -> str:
    return sha256_file(os.path.join(source, INDEX_FILE))


def new_manifest(source: str, config, placement, layers, experts, dtype: str, replicated: str,
                 files, ranks) -> dict:
    """A manifest (not complete, no hashes). files = [(name, entries, metadata)] in write order;
    ranks = [(rank, experts, names of the files holding that rank's tensors)]."""
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
        "source": {"path": os.path.abspath(source), "index_sha256": _sha256_of_index(source)},
        "files": records,
        "ranks": [{"rank": rank, "experts": owned, "files": list(names)} for rank, owned, names in ranks],
    }


def write_manifest(output: str, manifest: dict) -> None:
    path = os.path.join(output, MANIFEST_FILE)
    tmp = path + ".partial"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_existing(output: str) -> dict | None:
    """The manifest already in `output` (complete or not), or None."""
    path = os.path.join(output, MANIFEST_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); delete it to start over") from None


def plan_difference(previous: dict, current: dict) -> str:
    """'' if `previous` describes the same conversion, else the first differing setting."""
    for key in PLAN_KEYS:
        if previous.get(key) != current.get(key):
            return f"{key!r} differs"
    if previous.get("source", {}).get("index_sha256") != current["source"]["index_sha256"]:
        return "the source checkpoint's index differs"
    if [(f["name"], f["tensors"]) for f in previous.get("files", [])] != \
            [(f["name"], f["tensors"]) for f in current["files"]]:
        return "the planned file contents differ"
    return ""


def recorded_hash(manifest: dict, name: str) -> str | None:
    return next((f.get("sha256") for f in manifest.get("files", []) if f["name"] == name), None)


def file_matches(output: str, manifest: dict, record: dict, progress: bool = False) -> bool:
    """True if `record`'s file exists with the size and sha256 that `manifest` recorded."""
    expected = recorded_hash(manifest, record["name"])
    path = os.path.join(output, record["name"])
    if expected is None or not os.path.isfile(path) or os.path.getsize(path) != record["size"]:
        return False
    with progress_bar(total=record["size"], unit="B", unit_scale=True, unit_divisor=1024,
                      desc=f"hashing {record['name']}", enabled=None if progress else False) as bar:
        return sha256_file(path, progress=bar) == expected


def verify(output: str, progress: bool = True) -> list[tuple[str, str]]:
    """Re-hash every file against the manifest: [(file, 'ok' or the problem)]."""
    output = os.fspath(output)
    manifest = read_existing(output)
    if manifest is None:
        return [(MANIFEST_FILE, f"missing in {output}")]
    report = [] if manifest.get("complete") else [(MANIFEST_FILE, "conversion not complete")]
    for record in manifest.get("files", []):
        path = os.path.join(output, record["name"])
        if record.get("sha256") is None:
            report.append((record["name"], "not written yet"))
        elif not os.path.isfile(path):
            report.append((record["name"], "missing"))
        elif os.path.getsize(path) != record["size"]:
            report.append((record["name"], f"size {os.path.getsize(path)}, manifest says {record['size']}"))
        elif not file_matches(output, manifest, record, progress):
            report.append((record["name"], "sha256 mismatch (file changed or corrupt)"))
        else:
            report.append((record["name"], "ok"))
    return report
