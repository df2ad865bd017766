"""Kernel benchmark: the simulator's estimated Trainium2 time against the roofline, per kernel.

    python benchmarks/bench_kernels.py [--tokens 1,8,64,512,4096] [--topics kernels_basic,...]

For every kernel (benchmarks/kernels/bench_<kernel>.py, by topic) at decode (T = 1, 8, 64) and
prefill (T = 512, 4096) token counts, and the attention shapes of its own topic: estimated time
(cost model, not a measurement), roofline time (max of FLOPs / peak and HBM bytes / bandwidth),
percent of roofline, and the issue's goal. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from dataclasses import asdict

from mimo_kernels.trn2 import TRN2

# Per topic, its kernels: benchmarks/kernels/bench_<kernel>.py (beside tests/test_kernel_<kernel>.py).
TOPIC_KERNELS = {"kernels_basic": ("rmsnorm", "rope", "embedding", "linear", "dense_mlp", "norm_qkv_rope",
                                   "linear_add_rmsnorm"),
                 "kernels_moe": ("router", "expert_ffn"),
                 "kernels_attention": ("attention_prefill", "attention_decode"),
                 "decoder_layer": ("decoder_layer",)}
KERNEL_TOPICS = list(TOPIC_KERNELS)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels"))
DEFAULT_TOKENS = [1, 8, 64, 512, 4096]


def collect(topics, token_counts):
    rows = []
    for topic in topics:
        started = time.perf_counter()
        for row in topic_rows(topic, token_counts):
            row = dict(row, topic=topic)
            est, roof = row.get("estimated_us"), row.get("roofline_us")
            row["roofline_fraction"] = roof / est if est and roof else None
            row["achievable_fraction"] = achievable_fraction(row)
            row["meets_goal"] = meets_goal(row)
            rows.append(row)
        print(f"[{topic}: simulated in {time.perf_counter() - started:.0f} s]")
    return rows


def topic_rows(topic, token_counts):
    if topic not in TOPIC_KERNELS:
        raise SystemExit(f"--topics: unknown topic {topic!r}; one of {', '.join(TOPIC_KERNELS)}")
    for kernel in TOPIC_KERNELS[topic]:
        yield from importlib.import_module(f"bench_{kernel}").bench(token_counts)


def achievable_fraction(row):
    """Roofline at the achievable DMA rate (HBM bytes at dma_achieved_fraction of the bandwidth)
    over the estimate: how close a kernel gets to what the cost model lets any kernel reach."""
    est, roof, hbm = row.get("estimated_us"), row.get("roofline_us"), row.get("hbm_bytes")
    if not est or not roof or hbm is None:
        return None
    memory_us = hbm / TRN2.hbm_bytes_per_s_core * 1e6
    return max(roof, memory_us / TRN2.dma_achieved_fraction) / est


def meets_goal(row) -> bool | None:
    """A goal is judged against what the cost model lets any kernel reach: for an HBM-bound row
    the roofline at the achievable DMA rate (no kernel moves bytes faster than
    `dma_achieved_fraction` of the engines' rate, so 80% of the nominal peak would be a goal no
    kernel can meet), for a compute-bound row the documented peak."""
    goal = row.get("goal")
    fraction = row["achievable_fraction"] if row.get("bound") == "hbm" else row["roofline_fraction"]
    if goal is None or fraction is None:
        return None
    return fraction >= goal


def format_rows(rows) -> str:
    header = f"{'kernel':<26} {'shapes':<40} {'T':>6} {'bound':>6} {'est us':>10} {'roof us':>10} " \
             f"{'% roof':>7} {'% ach':>6} {'goal':>5} {'met':>4}"
    lines = [header, "-" * len(header)]
    def percent(value):
        return "-" if value is None else f"{value:.0%}"

    for r in rows:
        frac = r["roofline_fraction"]
        goal = r.get("goal")
        lines.append(f"{r['kernel']:<26} {r['shapes']:<40} {r['tokens']:>6} {r.get('bound', ''):>6} "
                     f"{r['estimated_us']:>10.1f} {r['roofline_us']:>10.1f} "
                     f"{'-' if frac is None else f'{frac:.0%}':>7} "
                     f"{percent(r.get('achievable_fraction')):>6} "
                     f"{'-' if goal is None else f'{goal:.0%}':>5} "
                     f"{'-' if goal is None else 'yes' if r['meets_goal'] else 'no':>4}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default=",".join(map(str, DEFAULT_TOKENS)))
    parser.add_argument("--topics", default=",".join(KERNEL_TOPICS))
    parser.add_argument("--json", default="benchmarks/results/kernels.json")
    args = parser.parse_args(argv)
    rows = collect(args.topics.split(","), [int(t) for t in args.tokens.split(",")])
    print(format_rows(rows))
    print("estimated times come from the simulator's cost model of Trainium2 (see docs/simulator.md); "
          "they are estimates, not measurements")
    print(f"cost model: DMA at {TRN2.dma_achieved_fraction:.0%} of the DMA engines' rate "
          f"(Trn2Model.dma_achieved_fraction), {TRN2.dma_fixed_s * 1e6:.1f} us per transfer; "
          f"% roof is against the documented peaks, % ach against the roofline at that DMA rate; "
          f"a goal is met on % ach for HBM-bound rows, on % roof for compute-bound ones")
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"timestamp": time.time(), "machine": asdict(TRN2), "rows": rows}, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
