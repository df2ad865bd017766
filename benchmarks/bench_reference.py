"""Reference-path (NumPy) prefill and decode throughput and peak memory, small and medium configs.

    python benchmarks/bench_reference.py [--json benchmarks/results/reference.json]

Timing and memory are separate passes of the same generation: the timed pass runs untraced
(tracemalloc slows NumPy-heavy Python ~2x), then a second pass measures the tracemalloc
high-water mark of allocations during the run (weights excluded: they are allocated before),
plus the process RSS afterwards. CPU numbers of this machine; they say how interactive the
reference is, nothing about Trainium.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import tracemalloc

import numpy as np
import psutil

from mimo_v2_flash import MiMoV2FlashModel, load_config

CASES = [
    # name, preset, batch, prompt tokens, new tokens
    ("small", "tiny", 4, 128, 32),
    ("medium", "small", 4, 256, 32),
]


def run_case(name, preset, batch, prompt_len, new_tokens):
    config = load_config(preset)
    model = MiMoV2FlashModel.random(config, seed=0)
    prompt = np.random.default_rng(0).integers(0, config.vocab_size, (batch, prompt_len))
    model.generate(prompt[:, :8], max_new_tokens=2)          # warm-up
    tokens, timing = model.generate(prompt, max_new_tokens=new_tokens, return_timing=True)
    tracemalloc.start()                                      # memory: a second, traced pass
    traced = model.generate(prompt, max_new_tokens=new_tokens)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    if not np.array_equal(traced, tokens):
        raise RuntimeError(f"{name}: the traced pass generated other tokens than the timed one")
    decoded = batch * (new_tokens - 1)
    return {
        "case": name, "config": config.summary(), "batch": batch, "prompt_tokens": prompt_len,
        "new_tokens": new_tokens,
        "prefill_tokens_per_s": batch * prompt_len / timing["prefill_s"],
        "decode_tokens_per_s": decoded / timing["decode_s"],
        "decode_ms_per_step": 1e3 * timing["decode_s"] / max(new_tokens - 1, 1),
        "kv_cache_mb": timing["kv_cache_bytes"] / 1e6,
        "peak_traced_mb": peak / 1e6,
        "rss_mb": psutil.Process().memory_info().rss / 1e6,
    }
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", default="benchmarks/results/reference.json")
    args = parser.parse_args(argv)
    rows = [run_case(*case) for case in CASES]
    header = f"{'case':<8} {'batch x prompt':>14} {'prefill tok/s':>14} {'decode tok/s':>13} " \
             f"{'ms/step':>8} {'KV MB':>7} {'peak MB':>8} {'RSS MB':>7}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['case']:<8} {r['batch']:>5} x {r['prompt_tokens']:<6} {r['prefill_tokens_per_s']:>14.0f} "
              f"{r['decode_tokens_per_s']:>13.1f} {r['decode_ms_per_step']:>8.1f} {r['kv_cache_mb']:>7.1f} "
              f"{r['peak_traced_mb']:>8.1f} {r['rss_mb']:>7.0f}")
    for r in rows:
        print(f"  {r['case']}: {r['config']}")
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"timestamp": time.time(), "cpu_count": os.cpu_count(), "rows": rows}, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
