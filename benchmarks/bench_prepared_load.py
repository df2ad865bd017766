"""Peak RSS of loading a prepared directory for the NKI backend: through the float32 Hub layout
(what `from_pretrained` did before) against straight into the kernel layout (memory-mapped).

    python benchmarks/bench_prepared_load.py [--work-dir /tmp/mimo_bench_load] [--weight-dtype bf16|fp8] [--keep]

Writes a synthetic Hub checkpoint (bench_prepare_weights' writer; hidden 2048, 6 layers, 8 experts
x 1024, vocab 65536), prepares it for one rank, then in a fresh subprocess per case loads it and
converts every tensor into the kernel layout the way the first forward pass does (projections,
the fused q|k|v weights, each layer's expert stack), and reports the subprocess's peak RSS
(VmHWM) and the bytes the kernel-layout weights occupy. Memory-mapped pages a process has read
count in its RSS, so the kernel-layout case is charged for the file pages it touched. Prints a
table, writes benchmarks/results/bench_prepared_load.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_prepare_weights import bench_config, peak_rss_bytes, write_synthetic_checkpoint  # noqa: E402

CASES = ("hub_float32", "kernel_layout")


def small_config():
    return bench_config().replace(n_routed_experts=8)


def run_child(prepared: str, case: str, dtype: str) -> dict:
    """Load `prepared` one way and convert everything into the kernel layout; report memory."""
    import numpy as np
    from mimo_v2_flash import MiMoV2FlashModel
    from mimo_v2_flash.checkpoint import PreparedCheckpoint
    from mimo_v2_flash.weights import layer_weight, model_tensors
    baseline = peak_rss_bytes()
    if case == "hub_float32":
        config, weights = PreparedCheckpoint(prepared).load(0)
        model = MiMoV2FlashModel(config, weights, backend="nki", weight_dtype=dtype)
    else:
        model = MiMoV2FlashModel.from_pretrained(prepared, rank=0, backend="nki", weight_dtype=dtype)
    config, ops = model.config, model.ops
    for layer in range(config.num_hidden_layers):
        ops._fused_qkv_weight(layer)
        if config.is_moe(layer):
            ops._expert_stack(layer)
    qkv = {layer_weight(layer, proj) for layer in range(config.num_hidden_layers)
           for proj in ("q_proj", "k_proj", "v_proj")}
    for spec in model_tensors(config, experts=[]):
        if spec.name not in qkv:
            ops.kernel_weight(spec.name)
    kernel_bytes = sum(a.nbytes for pair in ops._prepared.values() for a in pair if a is not None)
    kernel_bytes += sum(a.nbytes for stack, _ in ops._expert_stacks.values()
                        for a in vars(stack).values() if isinstance(a, np.ndarray))
    return {"case": case, "peak_rss_bytes": peak_rss_bytes(), "baseline_rss_bytes": baseline,
            "kernel_layout_bytes": kernel_bytes}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", default="/tmp/mimo_bench_load")
    p.add_argument("--weight-dtype", choices=["bf16", "fp8"], default="bf16")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--child", nargs=3, metavar=("PREPARED", "CASE", "DTYPE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(*args.child)))
        return 0
    from mimo_prepare_weights.convert import convert
    hub, prepared = os.path.join(args.work_dir, "hub"), os.path.join(args.work_dir, f"prepared-{args.weight_dtype}")
    try:
        if not os.path.exists(hub):
            write_synthetic_checkpoint(hub, small_config())
        if not os.path.exists(prepared):
            convert(hub, prepared, world_size=1, dtype=args.weight_dtype, progress=False, log=lambda *_: None)
        rows = []
        for case in CASES:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", prepared, case, args.weight_dtype],
                                  capture_output=True, text=True, check=True)
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    finally:
        if not args.keep:
            shutil.rmtree(args.work_dir, ignore_errors=True)
    print(f"{'case':<15} {'peak RSS MB':>12} {'baseline MB':>12} {'kernel-layout MB':>17}")
    for r in rows:
        print(f"{r['case']:<15} {r['peak_rss_bytes'] / 1e6:>12.0f} {r['baseline_rss_bytes'] / 1e6:>12.0f} "
              f"{r['kernel_layout_bytes'] / 1e6:>17.0f}")
    os.makedirs(os.path.join(ROOT, "benchmarks", "results"), exist_ok=True)
    out = os.path.join(ROOT, "benchmarks", "results", f"bench_prepared_load_{args.weight_dtype}.json")
    with open(out, "w") as f:
        json.dump({"config": "bench_prepare_weights.bench_config with 8 experts", "dtype": args.weight_dtype,
                   "rows": rows}, f, indent=1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
