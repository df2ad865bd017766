"""Conversion throughput and peak memory of prepare_weights on a synthetic Hub checkpoint (>= 2 GB).

    python benchmarks/bench_prepare_weights.py [--work-dir /tmp/mimo_bench_weights] [--keep]

Writes a Hub-layout checkpoint (real shard names, FP8 e4m3fn blocks with 128x128 scales, fused
per-KV-head K/V scales on full layers, BF16 embeddings) of a MiMo-shaped config scaled down in
hidden size and expert count but with the real head dims, then converts it in a fresh subprocess
per case and reports wall time, MB/s and the subprocess's peak RSS against the largest single
tensor, for both layouts of the replicated weights (`shared`: one replicated file + experts
files; `per-rank`: self-contained rank files whose replicated tensors are copied from rank 0's).
The source was just written, so it is read from the page cache: the numbers are the converter's
CPU cost, not a disk's. Prints a table, writes benchmarks/results/bench_prepare_weights.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import ml_dtypes
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mimo_v2_flash.checkpoint import INDEX_FILE, PER_KV_HEAD, kv_scale_rows  # noqa: E402
from mimo_v2_flash.config import MiMoV2FlashConfig  # noqa: E402
from mimo_v2_flash.safetensors_io import SafetensorsWriter, TensorEntry  # noqa: E402
from mimo_v2_flash.weights import (HUB_F32, HUB_FP8, fp8_scale_shape, layer_and_role, model_tensors,  # noqa: E402
                                   scale_name)

CASES = [("bf16", 4, "shared"), ("bf16", 4, "per-rank"), ("fp8", 4, "shared"), ("fp8", 4, "per-rank"),
         ("bf16", 1, "shared")]     # (dtype, world size, replicated layout)


def bench_config() -> MiMoV2FlashConfig:
    """6 layers (full, 4 SWA, full), hidden 2048, 64 experts x 1024, vocab 65536: about 2.6 GB
    of FP8/BF16, 2.0 GB of it experts; the largest tensor is the embedding (as on the Hub)."""
    return MiMoV2FlashConfig(vocab_size=65536, hidden_size=2048, num_hidden_layers=6,
                             intermediate_size=8192, moe_intermediate_size=1024,
                             num_attention_heads=16, num_key_value_heads=4,
                             swa_num_attention_heads=16, swa_num_key_value_heads=8,
                             n_routed_experts=64, num_experts_per_tok=8,
                             hybrid_layer_pattern=[0, 1, 1, 1, 1, 0], moe_layer_freq=[0, 1, 1, 1, 1, 1])


def hub_entries(config: MiMoV2FlashConfig) -> dict[str, list[TensorEntry]]:
    """Shard -> tensors (weights and their scales) in the Hub layout."""
    shards: dict[str, list[TensorEntry]] = {}
    for spec in model_tensors(config):
        entries = shards.setdefault(spec.shard, [])
        if spec.hub_dtype != HUB_FP8:
            entries.append(TensorEntry(spec.name, "F32" if spec.hub_dtype == HUB_F32 else "BF16", spec.shape))
            continue
        entries.append(TensorEntry(spec.name, "F8_E4M3", spec.shape))
        grid = fp8_scale_shape(spec.shape)
        layer, role = layer_and_role(spec.name) or (None, None)
        if role in ("k_proj", "v_proj") and not config.is_swa(layer):
            _, kv, d, dv = config.attention_shape(layer)
            k_rows, v_rows = kv_scale_rows(kv, d, dv, PER_KV_HEAD)
            grid = (k_rows if role == "k_proj" else v_rows, grid[1])
        entries.append(TensorEntry(scale_name(spec.name), "F32", grid))
    return shards


def synthetic_tensor(entry: TensorEntry, rng: np.random.Generator) -> np.ndarray:
    if entry.dtype == "F8_E4M3":
        codes = np.frombuffer(rng.bytes(entry.nbytes), np.uint8).copy()
        codes[(codes & 0x7F) == 0x7F] = 0          # no NaN codes; +-448 (0x7E) stays common
        return codes.view(ml_dtypes.float8_e4m3fn).reshape(entry.shape)
    values = rng.standard_normal(entry.shape, dtype=np.float32)
    if entry.name.endswith("_scale_inv"):
        return np.abs(values) * 1e-3 + 1e-4
    return values if entry.dtype == "F32" else values.astype(ml_dtypes.bfloat16)


def write_synthetic_checkpoint(path: str, config: MiMoV2FlashConfig, seed: int = 0) -> int:
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(seed)
    weight_map, total = {}, 0
    for shard, entries in hub_entries(config).items():
        with SafetensorsWriter(os.path.join(path, shard), entries, {"format": "pt"}) as writer:
            for entry in entries:
                writer.write(entry.name, synthetic_tensor(entry, rng))
                weight_map[entry.name] = shard
                total += entry.nbytes
            writer.finish()
    with open(os.path.join(path, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    config.save(os.path.join(path, "config.json"))
    return total


def peak_rss_bytes() -> int:
    """This process image's peak RSS (VmHWM). Not ru_maxrss: Linux carries that over exec from
    the parent, which had just generated the synthetic checkpoint."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_child(source: str, output: str, dtype: str, world_size: int, layout: str) -> dict:
    """Convert in this (fresh) process; report time and this process's peak RSS."""
    from mimo_prepare_weights.convert import convert
    from mimo_prepare_weights.manifest import verify
    baseline = peak_rss_bytes()       # interpreter + numpy + imports
    result = convert(source, output, world_size=world_size, dtype=dtype, progress=False, log=lambda *_: None,
                     replicated=layout)
    peak = peak_rss_bytes()
    t0 = time.perf_counter()
    report = verify(output, progress=False)
    return {"seconds": result.seconds, "bytes_written": result.bytes_written, "files": len(result.written),
            "peak_rss_bytes": peak, "baseline_rss_bytes": baseline,
            "verify_seconds": time.perf_counter() - t0, "verify_ok": all(s == "ok" for _, s in report)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", default="/tmp/mimo_bench_weights")
    p.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint and outputs")
    p.add_argument("--child", nargs=5, metavar=("SOURCE", "OUTPUT", "DTYPE", "WORLD", "LAYOUT"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        source, output, dtype, world, layout = args.child
        print(json.dumps(run_child(source, output, dtype, int(world), layout)))
        return 0

    config = bench_config()
    source = os.path.join(args.work_dir, "hub")
    shutil.rmtree(args.work_dir, ignore_errors=True)
    t0 = time.perf_counter()
    source_bytes = write_synthetic_checkpoint(source, config)
    print(f"synthetic checkpoint: {source_bytes / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s "
          f"({config.summary()})")
    largest = max((e for entries in hub_entries(config).values() for e in entries), key=lambda e: e.nbytes)
    rows = []
    for dtype, world, layout in CASES:
        output = os.path.join(args.work_dir, f"out-{dtype}-{world}-{layout}")
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", source, output, dtype,
                               str(world), layout], capture_output=True, text=True, cwd=ROOT)
        if proc.returncode:
            print(proc.stderr, file=sys.stderr)
            return proc.returncode
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r.update(dtype=dtype, world_size=world, replicated=layout, source_bytes=source_bytes,
                 source_mb_per_s=source_bytes / 1e6 / r["seconds"],
                 output_mb_per_s=r["bytes_written"] / 1e6 / r["seconds"],
                 largest_tensor=largest.name, largest_tensor_bytes=largest.nbytes,
                 peak_over_largest=r["peak_rss_bytes"] / largest.nbytes,
                 peak_minus_baseline_over_largest=(r["peak_rss_bytes"] - r["baseline_rss_bytes"]) / largest.nbytes)
        rows.append(r)
        if not args.keep:
            shutil.rmtree(output, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(args.work_dir, ignore_errors=True)

    print(f"largest tensor: {largest.name} {largest.dtype} {list(largest.shape)} = {largest.nbytes / 1e6:.0f} MB")
    header = (f"{'dtype':<5} {'ranks':>5} {'replicated':<10} {'files':>5} {'src GB':>7} {'out GB':>7} {'sec':>7} "
              f"{'src MB/s':>9} {'out MB/s':>9} {'peak RSS MB':>11} {'base MB':>8} {'peak/largest':>12} "
              f"{'verify s':>8}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['dtype']:<5} {r['world_size']:>5} {r['replicated']:<10} {r['files']:>5} "
              f"{r['source_bytes'] / 1e9:>7.2f} {r['bytes_written'] / 1e9:>7.2f} "
              f"{r['seconds']:>7.1f} {r['source_mb_per_s']:>9.0f} {r['output_mb_per_s']:>9.0f} "
              f"{r['peak_rss_bytes'] / 1e6:>11.0f} {r['baseline_rss_bytes'] / 1e6:>8.0f} "
              f"{r['peak_over_largest']:>12.2f} {r['verify_seconds']:>8.1f}")
    os.makedirs(os.path.join(ROOT, "benchmarks", "results"), exist_ok=True)
    out_json = os.path.join(ROOT, "benchmarks", "results", "bench_prepare_weights.json")
    with open(out_json, "w") as f:
        json.dump({"config": config.to_hub_dict(), "cases": rows}, f, indent=1)
    print(f"wrote {out_json}")
    return 0 if all(r["verify_ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
