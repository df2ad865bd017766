"""Kernel benchmark: the simulator's estimated Trainium2 time against the roofline, per kernel.

    python benchmarks/bench_kernels.py [--tokens 1,8,64,512,4096] [--topics kernels_basic,...]
        [--json F] [--markdown F]
    python benchmarks/bench_kernels.py --merge A.json B.json ... [--json F] [--markdown F]

For every kernel (benchmarks/kernels/bench_<kernel>.py, by topic) at decode (T = 1, 8, 64) and
prefill (T = 512, 4096) token counts: estimated time (cost model, not a measurement), roofline
time (max of FLOPs / peak and HBM bytes / bandwidth), percent of roofline, and the goal. The
attention topic takes its own shapes, chosen by the token counts: prefill at those of 512 / 4096 /
32768 listed, decode batches of 1..64 sequences when a count is at most 64. Prints a table and
writes JSON (and, with --markdown, the same rows as a Markdown table).

Slow topics and token counts can run separately, each with its own --json (rewritten after every
row, "complete": false until the run ends, so a run stopped early keeps its rows); --merge reads
those files (a later file's row replaces an earlier one of the same topic, kernel, shapes and T)
and prints and writes the combined table without simulating anything.
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


def collect(topics, token_counts, on_row=lambda rows, wall_s: None):
    """Rows of every topic at the token counts and each topic's wall time; `on_row(rows, wall_s)`
    after every row (the JSON is rewritten then, so a run stopped early keeps its finished rows)."""
    rows, wall_s = [], {}
    for topic in topics:
        started = time.perf_counter()
        for row in topic_rows(topic, token_counts):
            row = dict(row, topic=topic)
            est, roof = row.get("estimated_us"), row.get("roofline_us")
            row["roofline_fraction"] = roof / est if est and roof else None
            row["achievable_fraction"] = achievable_fraction(row)
            row["meets_goal"] = meets_goal(row)
            rows.append(row)
            wall_s[topic] = time.perf_counter() - started
            on_row(rows, wall_s)
        wall_s[topic] = time.perf_counter() - started
        print(f"[{topic}: simulated in {wall_s[topic]:.0f} s]")
    return rows, wall_s


def merge_runs(paths):
    """Rows of several JSON files written by this script, in file order; a later file's row
    replaces an earlier row of the same topic, kernel, shapes and T. The files must come from the
    same machine description as this run (the verdicts depend on it)."""
    merged, wall_s = {}, {}
    for path in paths:
        with open(path) as f:
            run = json.load(f)
        if not isinstance(run, dict) or not isinstance(run.get("rows"), list):
            raise ValueError(f"{path}: not a bench_kernels JSON file (no 'rows' list)")
        if run.get("machine") != json.loads(json.dumps(asdict(TRN2))):
            raise ValueError(f"{path}: written with a different Trn2Model than this checkout's "
                             f"(kernels/trn2.py); re-run it instead of merging")
        for row in run["rows"]:
            merged[(row.get("topic"), row["kernel"], row["shapes"], row["tokens"])] = row
        wall_s.update(run.get("wall_s", {}))
    return list(merged.values()), wall_s


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


def _percent(value):
    return "-" if value is None else f"{value:.0%}"


def _cells(r):
    goal = r.get("goal")
    return [r["kernel"], r["shapes"], str(r["tokens"]), r.get("bound", ""), f"{r['estimated_us']:.1f}",
            f"{r['roofline_us']:.1f}", _percent(r["roofline_fraction"]),
            _percent(r.get("achievable_fraction")), _percent(goal),
            "-" if goal is None else "yes" if r["meets_goal"] else "no"]


COLUMNS = ["kernel", "shapes", "T", "bound", "est us", "roof us", "% roof", "% ach", "goal", "met"]


def format_rows(rows) -> str:
    widths = [-26, -40, 6, 6, 10, 10, 7, 6, 5, 4]          # negative: left-aligned
    def line(cells):
        return " ".join(f"{c:<{-w}}" if w < 0 else f"{c:>{w}}" for c, w in zip(cells, widths))
    header = line(COLUMNS)
    return "\n".join([header, "-" * len(header)] + [line(_cells(r)) for r in rows])


def format_markdown(rows) -> str:
    """The same rows as a Markdown table (pipes in shapes escaped)."""
    def line(cells):
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
    return "\n".join([line(COLUMNS), line(["---"] * len(COLUMNS))] + [line(_cells(r)) for r in rows])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default=",".join(map(str, DEFAULT_TOKENS)))
    parser.add_argument("--topics", default=",".join(KERNEL_TOPICS))
    parser.add_argument("--json", default="benchmarks/results/kernels.json")
    parser.add_argument("--markdown", help="also write the rows as a Markdown table to this file")
    parser.add_argument("--merge", nargs="+", metavar="JSON",
                        help="combine earlier runs' JSON files instead of simulating")
    args = parser.parse_args(argv)
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)

    def write_json(rows, wall_s, complete=False):
        with open(args.json, "w") as f:
            json.dump({"timestamp": time.time(), "machine": asdict(TRN2), "complete": complete,
                       "wall_s": wall_s, "rows": rows}, f, indent=1)
    if args.merge:
        rows, wall_s = merge_runs(args.merge)
    else:
        rows, wall_s = collect(args.topics.split(","), [int(t) for t in args.tokens.split(",")], write_json)
    print(format_rows(rows))
    print("estimated times come from the simulator's cost model of Trainium2 (see docs/simulator.md); "
          "they are estimates, not measurements")
    print(f"cost model: DMA at {TRN2.dma_achieved_fraction:.0%} of the DMA engines' rate "
          f"(Trn2Model.dma_achieved_fraction), {TRN2.dma_fixed_s * 1e6:.1f} us per transfer; "
          f"% roof is against the documented peaks, % ach against the roofline at that DMA rate; "
          f"a goal is met on % ach for HBM-bound rows, on % roof for compute-bound ones")
    write_json(rows, wall_s, complete=True)
    print(f"wrote {args.json}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(format_markdown(rows) + "\n")
        print(f"wrote {args.markdown}")


if __name__ == "__main__":
    main()
