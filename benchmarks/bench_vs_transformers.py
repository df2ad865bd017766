"""The NumPy reference against transformers' eager `MiMoV2FlashForCausalLM`, float32, same weights.

    python benchmarks/bench_vs_transformers.py [--reps 5] [--threads 2] [--dir /tmp/mimo_medium]
        [--json benchmarks/results/vs_transformers.json]

Builds the medium config (hidden 1024, 8 layers: 2 full + 6 sliding-window, 32 experts top-8 x
512, vocab 16384, window 128 keys, sinks; 459M parameters), saves it once as a float32 Hub
checkpoint, loads that one directory in both implementations, checks that the logits agree
(1e-5 relative) and then times the cases below, alternating the two implementations rep by rep
in one run (the order flipping every pass) so that load from other processes hits both alike. Threads are pinned equal:
`torch.set_num_threads(n)` and threadpoolctl's limit on NumPy's BLAS.

`--warmup 0` times the first pass too (on a loaded machine, where a pass takes minutes).

Cases: prefill 1x512 and 4x128 (logits of every position, no cache), and decode: 16 steps of
one token per sequence after a 128-token prompt (prefill untimed), batch 1 and 8, with fixed
random tokens fed to both (so both see the same inputs whatever they would sample).

Decode rows also give the weight bytes one step reads (attention, dense MLP, router, the routed
experts the step's tokens chose, lm_head; the embedding rows are negligible) divided by the
step time, next to this machine's copy bandwidth (`np.copyto` of 256 MiB, bytes read + written
per second), the ceiling a bandwidth-bound decode step can approach.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time

import numpy as np

from mimo_v2_flash import MiMoV2FlashModel, MiMoV2FlashConfig
from mimo_v2_flash.weights import EMBED, is_expert, model_tensors, random_weights

PROMPT = 128          # decode cases: prompt tokens before the timed steps
DECODE_STEPS = 16
TOLERANCE = 1e-5      # max |a - b| / max |b| of the logits


def medium_config() -> MiMoV2FlashConfig:
    """459M parameters with the real structure: transformers' class derives the sliding-window
    layers' attention (same query heads and head dims, twice the KV heads), so this one does too."""
    return MiMoV2FlashConfig(
        vocab_size=16384, hidden_size=1024, num_hidden_layers=8, intermediate_size=4096,
        moe_intermediate_size=512, num_attention_heads=16, num_key_value_heads=4,
        swa_num_attention_heads=16, swa_num_key_value_heads=8, n_routed_experts=32,
        num_experts_per_tok=8, max_position_embeddings=4096, sliding_window=128,
        hybrid_layer_pattern=[0, 1, 1, 1, 1, 0, 1, 1], moe_layer_freq=[0] + [1] * 7)


def build_checkpoint(path: str, config: MiMoV2FlashConfig) -> None:
    if os.path.exists(os.path.join(path, "config.json")):
        return
    tmp = path + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    # save_pretrained writes transformers' native keys too (layer_types, rope_parameters, the
    # window as a key count), so MiMoV2FlashForCausalLM builds this same model from the directory.
    MiMoV2FlashModel(config, random_weights(config, seed=0)).save_pretrained(tmp, dtype="float32")
    os.replace(tmp, path)


def rel_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


class Project:
    name = "project"

    def __init__(self, path):
        self.model = MiMoV2FlashModel.from_pretrained(path)
        self.experts_hit = []            # distinct experts per MoE layer call of the last decode
        route = self.model.ops.router

        def counting_router(x, layer):
            ids, weights = route(x, layer)
            self.experts_hit.append(len(np.unique(ids)))
            return ids, weights
        self.model.ops.router = counting_router

    def prefill(self, ids):
        return self.model.forward(ids)

    def decode(self, prompt, steps):
        cache = self.model.new_cache(len(prompt))
        self.model.forward(prompt, cache)
        self.experts_hit = []
        t0 = time.perf_counter()
        logits = [self.model.forward(steps[:, i:i + 1], cache)[:, 0] for i in range(steps.shape[1])]
        return time.perf_counter() - t0, np.stack(logits, 1)

    def decode_weight_bytes(self) -> float:
        """Mean weight bytes a step of the last decode read: every weight but the embedding table
        and the routed experts, plus the distinct experts each MoE layer's tokens chose."""
        config, weights = self.model.config, self.model.weights
        fixed = sum(weights[s.name].nbytes for s in model_tensors(config)
                    if not is_expert(s) and s.name != EMBED)
        per_expert = 3 * config.moe_intermediate_size * config.hidden_size * 4
        return fixed + per_expert * sum(self.experts_hit) / DECODE_STEPS


class Transformers:
    name = "transformers"

    def __init__(self, path):
        import torch
        from transformers import MiMoV2FlashForCausalLM
        self.torch = torch
        self.model = MiMoV2FlashForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                            attn_implementation="eager").eval()

    def prefill(self, ids):
        with self.torch.inference_mode():
            return self.model(self.torch.from_numpy(ids)).logits.numpy()

    def decode(self, prompt, steps):
        from transformers import DynamicCache
        torch = self.torch
        with torch.inference_mode():
            cache = DynamicCache(config=self.model.config)
            self.model(torch.from_numpy(prompt), cache=cache, use_cache=True)
            t0 = time.perf_counter()
            logits = [self.model(torch.from_numpy(steps[:, i:i + 1]), cache=cache, use_cache=True).logits[:, 0]
                      for i in range(steps.shape[1])]
            return time.perf_counter() - t0, torch.stack(logits, 1).numpy()


def copy_bandwidth(reps=7) -> float:
    src = np.ones(64 * 2 ** 20, np.float32)
    dst = np.empty_like(src)
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(reps))
    return 2 * src.nbytes / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp/mimo_v2_flash_medium_f32")
    parser.add_argument("--reps", type=int, default=5, help="timed passes over all cases")
    parser.add_argument("--warmup", type=int, default=1, help="untimed passes before them")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--json", default="benchmarks/results/vs_transformers.json")
    args = parser.parse_args(argv)

    import torch
    from threadpoolctl import threadpool_limits
    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)

    config = medium_config()
    build_checkpoint(args.dir, config)
    project, hf = Project(args.dir), Transformers(args.dir)
    params = sum(int(np.prod(s.shape)) for s in model_tensors(config))
    print(f"medium: {config.summary()}; {params / 1e6:.0f}M parameters; {args.threads} threads")

    rng = np.random.default_rng(0)
    cases = []
    for batch, tokens in ((1, 512), (4, 128)):
        cases.append((f"prefill {batch}x{tokens}", "prefill", rng.integers(0, config.vocab_size, (batch, tokens))))
    for batch in (1, 8):
        cases.append((f"decode B={batch}", "decode", (rng.integers(0, config.vocab_size, (batch, PROMPT)),
                                                      rng.integers(0, config.vocab_size, (batch, DECODE_STEPS)))))

    def run(impl, kind, data):
        if kind == "prefill":
            t0 = time.perf_counter()
            logits = impl.prefill(data)
            return time.perf_counter() - t0, logits
        seconds, logits = impl.decode(*data)
        return seconds / DECODE_STEPS, logits

    bandwidth = copy_bandwidth()

    def report():
        rows = []
        header = (f"{'case':<14} {'project min/median ms':>22} {'transformers min/median ms':>27} "
                  f"{'ratio min':>9} {'ratio median':>12} {'weights GB/s':>12}")
        print(header)
        print("-" * len(header))
        for name, kind, data in cases:
            mine, theirs = times[name]["project"], times[name]["transformers"]
            row = {"case": name, "project_s": mine, "transformers_s": theirs,
                   "project_min_ms": 1e3 * min(mine), "project_median_ms": 1e3 * statistics.median(mine),
                   "transformers_min_ms": 1e3 * min(theirs),
                   "transformers_median_ms": 1e3 * statistics.median(theirs),
                   "ratio_min": min(mine) / min(theirs),
                   "ratio_median": statistics.median(mine) / statistics.median(theirs),
                   "logits_rel_diff": agreement[name]}
            if kind == "decode":
                row["weight_bytes_per_step"] = weight_bytes[name]
                row["project_weights_gb_s"] = row["weight_bytes_per_step"] / statistics.median(mine) / 1e9
                row["transformers_weights_gb_s"] = row["weight_bytes_per_step"] / statistics.median(theirs) / 1e9
            rows.append(row)
            gbs = (f"{row['project_weights_gb_s']:5.1f}/{row['transformers_weights_gb_s']:<5.1f}"
                   if kind == "decode" else "")
            print(f"{name:<14} {row['project_min_ms']:>10.1f} / {row['project_median_ms']:<9.1f} "
                  f"{row['transformers_min_ms']:>13.1f} / {row['transformers_median_ms']:<11.1f} "
                  f"{row['ratio_min']:>9.2f} {row['ratio_median']:>12.2f} {gbs:>12}")
        print(f"weights GB/s = weight bytes a decode step reads / median step time (project/transformers); "
              f"copy bandwidth of this machine: {bandwidth / 1e9:.1f} GB/s (read + write)")
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"timestamp": time.time(), "threads": args.threads, "cpu_count": os.cpu_count(),
                       "load_average": os.getloadavg(), "config": config.summary(), "parameters": params,
                       "copy_bandwidth_gb_s": bandwidth / 1e9, "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")

    # Warm-up passes are untimed; the first pass also checks that the logits agree.
    agreement, weight_bytes = {}, {}
    times = {name: {"project": [], "transformers": []} for name, _, _ in cases}
    for rep in range(-args.warmup, args.reps):
        for name, kind, data in cases:
            order = (project, hf) if rep % 2 == 0 else (hf, project)
            logits = {}
            for impl in order:
                seconds, logits[impl.name] = run(impl, kind, data)
                if rep >= 0:
                    times[name][impl.name].append(seconds)
            if kind == "decode":
                weight_bytes[name] = project.decode_weight_bytes()
            if name not in agreement:
                agreement[name] = rel_diff(logits["project"], logits["transformers"])
                print(f"{name}: logits agree to {agreement[name]:.2e} relative", flush=True)
                if agreement[name] > TOLERANCE:
                    raise SystemExit(f"{name}: logits differ by {agreement[name]:.2e} relative "
                                     f"(> {TOLERANCE}): not the same model")
        if rep >= 0:
            report()                   # after every pass, so a long run leaves its numbers early


if __name__ == "__main__":
    main()
