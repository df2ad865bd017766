"""MiMo-V2-Flash command-line entry.

    python run_example.py --mode random              # random small model: prefill + decode, a table
    python run_example.py --mode test                # self-checks (reference, kernels): pass/fail table
    python run_example.py --mode download ...        # Hub checkpoint -> per-rank files -> generate
    torchrun --nproc-per-node 4 run_example.py --mode random   # expert-parallel over 4 ranks
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["random", "test", "download"], default="random")
    p.add_argument("--config", default="tiny", help="preset (tiny, small, full) or path to config.json")
    p.add_argument("--num-layers", type=int, help="override num_hidden_layers")
    p.add_argument("--num-experts", type=int, help="override n_routed_experts")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=32, help="prompt tokens per sequence")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=["reference", "nki"], default="reference",
                   help="reference = NumPy; nki = NKI kernels (CPU simulator unless real NKI is present)")
    p.add_argument("--quick", action="store_true", help="--mode test: skip the slowest checks")
    p.add_argument("--topics", help="--mode test: comma-separated self-check topics")
    p.add_argument("--json", help="also write the results as JSON to this file")
    ep = p.add_argument_group("expert parallel (under torchrun; see docs/expert_parallel.md)")
    ep.add_argument("--ep-mode", choices=["auto", "alltoallv", "alltoall_padded", "allgather"], default="auto")
    ep.add_argument("--ep-allgather-max-tokens", type=int, default=1,
                    help="auto mode: all-gather when no rank has more tokens than this")
    ep.add_argument("--ep-wire-dtype", choices=["float32", "bfloat16"], default="float32")
    ep.add_argument("--ep-placement", default="contiguous", help="'contiguous' or a placement JSON file")
    ep.add_argument("--ep-save-placement", help="write a load-aware placement from this run's expert load")
    ep.add_argument("--dist-backend", choices=["gloo", "xla"], default="gloo",
                    help="process group: gloo on CPU; xla = Neuron on trn2 (untested here)")
    ep.add_argument("--timeout", type=float, default=300.0,
                    help="seconds a collective may wait before every rank gives up with an error")
    return p


def make_config(args):
    from mimo_v2_flash import load_config
    config = load_config(args.config)
    changes = {}
    if args.num_layers:
        changes["num_hidden_layers"] = args.num_layers
    if args.num_experts:
        changes["n_routed_experts"] = args.num_experts
    return config.replace(**changes) if changes else config


def mode_random(args) -> int:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from parallel.run import run_random_distributed
        return run_random_distributed(args, make_config(args))
    from mimo_v2_flash import MiMoV2FlashModel
    config = make_config(args)
    t0 = time.perf_counter()
    model = MiMoV2FlashModel.random(config, seed=args.seed, backend=args.backend, weight_dtype=args.weight_dtype)
    build_s = time.perf_counter() - t0
    prompt = np.random.default_rng(args.seed).integers(0, config.vocab_size, (args.batch, args.seq_len))
    tokens, timing = model.generate(prompt, max_new_tokens=args.max_new_tokens,
                                    temperature=args.temperature, seed=args.seed, return_timing=True)
    new = tokens[:, args.seq_len:]
    decoded = max(args.max_new_tokens - 1, 0) * args.batch
    rows = [
        ("config", config.summary()),
        ("backend", args.backend),
        ("build (random weights)", f"{build_s:.2f} s"),
        ("prompt", f"{args.batch} x {args.seq_len} tokens"),
        ("prefill", f"{timing['prefill_s']:.3f} s, "
                    f"{args.batch * args.seq_len / max(timing['prefill_s'], 1e-9):.1f} tokens/s"),
        ("decode", f"{decoded} tokens in {timing['decode_s']:.3f} s, "
                   f"{decoded / max(timing['decode_s'], 1e-9):.1f} tokens/s"),
        ("KV cache", f"{timing['kv_cache_bytes'] / 1e6:.2f} MB (float32)"),
    ]
    if args.backend == "nki":   # the simulator's cost model of one NeuronCore-v3, not a measurement
        prefill, decode = model.ops.cost_summary(slice(0, 1)), model.ops.cost_summary(slice(1, None))
        rows.append(("Trainium2 estimate", f"prefill {prefill['per_pass_us']:.0f} us; decode "
                     f"{decode['per_pass_us']:.0f} us per step of {args.batch} tokens "
                     f"({decode['per_layer_us']:.0f} us per layer) [simulator cost model]"))
    for b in range(args.batch):
        rows.append((f"generated[{b}]", " ".join(map(str, new[b]))))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": config.to_hub_dict(), "timing": timing, "tokens": tokens.tolist()}, f)
    return 0


def mode_test(args) -> int:
    from mimo_v2_flash.selfcheck import TOPICS, format_table, run_checks
    topics = args.topics.split(",") if args.topics else TOPICS
    results = run_checks(topics, quick=args.quick)
    print(format_table(results))
    failed = [r for r in results if not r.passed]
    print(f"\n{len(results) - len(failed)} passed, {len(failed)} failed")
    for r in failed:
        print(f"FAILED {r.topic}/{r.name} [{r.shapes}]: {r.note}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.to_dict() for r in results], f, indent=1)
    return 1 if failed else 0


def mode_download(args) -> int:
    from prepare_weights.download import run_download_mode
    return run_download_mode(args)


def main(argv=None) -> int:
    from prepare_weights.download import add_download_arguments
    parser = build_parser()
    add_download_arguments(parser)
    args = parser.parse_args(argv)
    return {"random": mode_random, "test": mode_test, "download": mode_download}[args.mode](args)


if __name__ == "__main__":
    sys.exit(main())
