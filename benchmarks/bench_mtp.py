"""Modelled trn2 decode step with and without MTP speculative decoding (a cost model, not a run).

    python benchmarks/bench_mtp.py                      # batch 1 8 32 64, acceptance 1..4, draft 3
    python benchmarks/bench_mtp.py --context 16384 --draft-tokens 3 --ranks 64

The full model cannot run here, so this is a roofline of one decode step of the deployment this
project builds (docs/expert_parallel.md): `--ranks` logical NeuronCores of a trn2.48xlarge (LNC=2:
64 ranks, each 1/4 of a chip's HBM bandwidth and dense FLOPs), routed experts spread evenly,
attention, router, dense layer 0, lm_head and the MTP layers replicated and data-parallel (each
sequence on one rank). Per rank and pass:

    time = max(bytes read / HBM bandwidth, FLOPs / peak) + layers x fixed latency per layer

bytes = the replicated weights a rank with tokens streams (sizes from `weights.py` at the Hub
dtypes: FP8 q/k/v, MLPs and experts, BF16 o_proj, eh_proj, lm_head, F32 routers) + the distinct
experts its tokens touch (uniform routing: 256 * (1 - (1 - 8/256)^tokens) per layer, split over
the ranks) + the KV cache of its sequences at `--context`. FLOPs = 2 x the multiply-adds of the
weights used per token + attention over the context. The busiest rank sets the step time.

Plain decode: one pass of 1 token per sequence, 1 token out. MTP step with k draft tokens: k MTP
layer passes (each streams one MTP layer + the lm_head for its draft logits; rows per sequence as
in speculative.py: the newly committed ones plus the rows reading drafts) + one verify pass of k+1
tokens per sequence; acceptance length a tokens out (a = accepted drafts + 1, 1 .. k+1).
Speedup = a x plain step time / MTP step time. Everything printed is modelled; the assumptions are
printed with the table and written to benchmarks/results/bench_mtp.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mimo_v2_flash import load_config  # noqa: E402
from mimo_v2_flash.weights import (EMBED, HUB_BF16, HUB_F32, HUB_FP8, LM_HEAD, layer_tensors,  # noqa: E402
                                   model_tensors, mtp_prefix, mtp_tensors)

BYTES = {HUB_FP8: 1.0 + 4.0 / (128 * 128), HUB_BF16: 2.0, HUB_F32: 4.0}     # FP8 with its fp32 block scale

# trn2 (shared/docs/nki_reference.md item 25): per chip 2.9 TB/s HBM, 1,299 dense FP8 TFLOPS,
# 8 physical cores; LNC=2 makes a logical core of 2 physical ones: a quarter of a chip.
CHIP_HBM_BYTES_S = 2.9e12
CHIP_FP8_FLOPS = 1299e12
CHIP_LOGICAL_CORES = 4


def tensor_bytes(specs) -> float:
    return sum(math.prod(s.shape) * BYTES[s.hub_dtype] for s in specs)


def tensor_macs(specs) -> float:
    """Multiply-adds per token of the projections (the embedding is a gather)."""
    return sum(math.prod(s.shape) for s in specs if len(s.shape) == 2 and s.name != EMBED)


class DecodeModel:
    def __init__(self, ranks: int, context: int, layer_latency_s: float, efficiency: float):
        self.config = config = load_config("full")
        self.ranks, self.context, self.layer_latency_s = ranks, context, layer_latency_s
        self.bandwidth = CHIP_HBM_BYTES_S / CHIP_LOGICAL_CORES * efficiency
        self.flops = CHIP_FP8_FLOPS / CHIP_LOGICAL_CORES * efficiency
        replicated = [s for s in model_tensors(config, experts=[]) if s.name != EMBED]
        self.replicated_bytes = tensor_bytes(replicated)
        self.replicated_macs = tensor_macs(replicated)
        expert = layer_tensors(config, 1, experts=[0])[-3:]
        self.expert_bytes = tensor_bytes(expert)
        self.expert_macs = tensor_macs(expert)
        self.moe_layers = sum(config.is_moe(i) for i in range(config.num_hidden_layers))
        head = [s for s in model_tensors(config, layers=[]) if s.name == LM_HEAD]
        one_mtp = [s for s in mtp_tensors(config) if s.name.startswith(mtp_prefix(0))]
        self.mtp_bytes = tensor_bytes(one_mtp) + tensor_bytes(head)
        self.mtp_macs = tensor_macs(one_mtp) + tensor_macs(head)

    def kv_bytes_and_flops(self, rows: int, layers, window_only=False):
        """KV bytes read (bf16) and attention FLOPs of `rows` queries of one sequence."""
        c = self.config
        total_bytes = total_flops = 0.0
        for layer in layers:
            heads, kv, d, dv = c.attention_shape(layer)
            keys = min(self.context, c.window_keys) if (c.is_swa(layer) or window_only) else self.context
            total_bytes += keys * kv * (d + dv) * 2
            total_flops += 2 * rows * heads * keys * (d + dv)
        return total_bytes, total_flops

    def pass_time(self, batch: int, rows_per_seq: int, mtp_pass: bool = False) -> float:
        """Busiest rank's time of one pass: `rows_per_seq` tokens of each of `batch` sequences."""
        seqs = math.ceil(batch / self.ranks)             # sequences on the busiest rank
        rows = seqs * rows_per_seq
        if mtp_pass:
            kv_bytes, attn_flops = self.kv_bytes_and_flops(rows_per_seq, [0], window_only=True)
            bytes_read = self.mtp_bytes + seqs * kv_bytes
            flops = 2 * self.mtp_macs * rows + seqs * attn_flops
            return max(bytes_read / self.bandwidth, flops / self.flops) + self.layer_latency_s
        all_tokens = batch * rows_per_seq
        k = self.config.num_experts_per_tok
        touched = self.config.n_routed_experts * (1 - (1 - k / self.config.n_routed_experts) ** all_tokens)
        expert_bytes = self.moe_layers * touched / self.ranks * self.expert_bytes
        kv_bytes, attn_flops = self.kv_bytes_and_flops(rows_per_seq, range(self.config.num_hidden_layers))
        bytes_read = self.replicated_bytes + expert_bytes + seqs * kv_bytes
        # Expert FLOPs land evenly on the ranks (all tokens x 8 experts / ranks).
        flops = (2 * self.replicated_macs * rows + seqs * attn_flops
                 + 2 * self.moe_layers * self.expert_macs * all_tokens * k / self.ranks)
        compute = max(bytes_read / self.bandwidth, flops / self.flops)
        return compute + self.config.num_hidden_layers * self.layer_latency_s

    def speculative_step(self, batch: int, draft: int, acceptance: float) -> float:
        """k MTP passes (layer j: about `acceptance` newly committed rows + j draft rows) + verify."""
        drafting = sum(self.pass_time(batch, max(1, round(acceptance)) + j, mtp_pass=True) for j in range(draft))
        return drafting + self.pass_time(batch, draft + 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--acceptance", type=float, nargs="+", default=[1, 2, 3, 4])
    p.add_argument("--draft-tokens", type=int, default=3)
    p.add_argument("--ranks", type=int, default=64, help="logical NeuronCores (trn2.48xlarge at LNC=2: 64)")
    p.add_argument("--context", type=int, default=4096, help="tokens already in each sequence's cache")
    p.add_argument("--layer-latency-us", type=float, default=30.0,
                   help="fixed time per layer and pass: kernel launches and the MoE dispatch/combine latency")
    p.add_argument("--efficiency", type=float, default=0.7, help="fraction of peak bandwidth/FLOPs reached")
    p.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "bench_mtp.json"))
    args = p.parse_args(argv)
    if any(not 1 <= a <= args.draft_tokens + 1 for a in args.acceptance):
        p.error(f"acceptance lengths must lie in 1 .. draft tokens + 1 = {args.draft_tokens + 1}")
    model = DecodeModel(args.ranks, args.context, args.layer_latency_us * 1e-6, args.efficiency)
    assumptions = {
        "deployment": f"{args.ranks} ranks (logical NeuronCores, LNC=2), experts spread evenly, attention, "
                      "routers, dense layer, lm_head and MTP layers replicated, attention data-parallel",
        "rank_hbm_bytes_per_s": model.bandwidth, "rank_fp8_flops": model.flops,
        "efficiency": args.efficiency, "context_tokens": args.context,
        "layer_latency_us": args.layer_latency_us, "draft_tokens": args.draft_tokens,
        "replicated_weight_gb": model.replicated_bytes / 1e9, "expert_gb": model.expert_bytes / 1e9,
        "mtp_pass_weight_gb (one MTP layer + lm_head)": model.mtp_bytes / 1e9,
        "routing": "uniform: distinct experts touched = 256 (1 - (1 - 8/256)^tokens) per layer",
        "weights": "Hub dtypes: FP8 q/k/v, MLPs, experts; BF16 o_proj, eh_proj, lm_head; F32 routers",
    }
    rows = []
    print("Modelled trn2 decode step (roofline cost model, not a measurement)")
    for key, value in assumptions.items():
        print(f"  {key}: {value:.4g}" if isinstance(value, float) else f"  {key}: {value}")
    print()
    header = f"{'batch':>5} {'plain us':>9} {'tok/s':>8} | " + " | ".join(
        f"a={a:g}: {'step us':>8} {'tok/s':>8} {'x':>5}" for a in args.acceptance)
    print(header)
    for batch in args.batches:
        plain = model.pass_time(batch, 1)
        cells, line = [], f"{batch:>5} {plain * 1e6:>9.0f} {batch / plain:>8.0f} | "
        for a in args.acceptance:
            step = model.speculative_step(batch, args.draft_tokens, a)
            speedup = a * plain / step
            cells.append({"acceptance_length": a, "step_us": step * 1e6, "tokens_per_s": a * batch / step,
                          "speedup": speedup})
            line += f"a={a:g}: {step * 1e6:>8.0f} {a * batch / step:>8.0f} {speedup:>5.2f} | "
        print(line.rstrip(" |"))
        rows.append({"batch": batch, "plain_step_us": plain * 1e6, "plain_tokens_per_s": batch / plain,
                     "speculative": cells})
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    tmp = args.output + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"modelled": True, "assumptions": assumptions, "rows": rows}, f, indent=1)
    os.replace(tmp, args.output)
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
