"""`torchrun --nproc-per-node R run_example.py --mode random ...`: the random model, expert-parallel.

Each rank holds the replicated weights (embedding, attention, router, dense layer, lm_head; the
same seed gives the same values everywhere) and only its own experts. Attention is
data-parallel: rank r takes a contiguous share of the batch's sequences (possibly none) and runs
prefill and decode on them; every MoE layer goes through the dispatcher. Ranks agree before each
decode step whether anyone still decodes, and a rank with no tokens still takes part in every
MoE layer's collectives. Rank 0 prints the generated tokens and a per-rank statistics table.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from mimo_v2_flash.config import MiMoV2FlashConfig
from mimo_v2_flash.layer import ReferenceOps
from mimo_v2_flash.model import MiMoV2FlashModel, sample
from mimo_v2_flash.placement import ExpertPlacement, PlacementError
from mimo_v2_flash.weights import random_weights

from .comm import Communicator, failure_guard, report_and_exit_code
from .dispatcher import Dispatcher, ModePolicy
from .executor import ExpertParallelExecutor, KernelLocalExperts, ReferenceLocalExperts
from .placement import load_aware_placement
from .plan import RowFormat
from .stats import format_table, summarize


def resolve_placement(spec: str, num_experts: int, world_size: int) -> ExpertPlacement:
    """"contiguous" or a JSON file written by `ExpertPlacement.to_json` (or `--ep-save-placement`)."""
    if spec == "contiguous":
        return ExpertPlacement.contiguous(num_experts, world_size)
    try:
        with open(spec) as f:
            data = json.load(f)
        placement = ExpertPlacement.from_table(data["rank_of"], int(data["world_size"]), num_experts)
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise PlacementError(f"{spec}: not a placement file ({type(err).__name__}: {err})") from None
    except PlacementError as err:
        raise PlacementError(f"{spec}: {err}") from None
    if placement.world_size != world_size:
        raise PlacementError(f"{spec}: placement is for {placement.world_size} ranks, the world size is {world_size}")
    return placement


def build_rank_model(config: MiMoV2FlashConfig, comm: Communicator, placement: ExpertPlacement,
                     seed: int, mode: str = "auto", wire_dtype: str = "float32",
                     policy: ModePolicy | None = None, backend: str = "reference"):
    """This rank's model (replicated weights + its own experts) and its expert-parallel executor;
    backend "nki" also runs the local experts through the NKI grouped expert FFN kernel."""
    mine = placement.experts_of(comm.rank)
    weights = random_weights(config, seed, experts=mine)
    fmt = RowFormat(config.hidden_size, config.num_experts_per_tok, wire_dtype)
    dispatcher = Dispatcher(comm, placement, fmt, mode, policy)
    expert_weights = ReferenceOps(config, weights).expert_weights
    if backend == "nki":
        moe_layers = [layer for layer in range(config.num_hidden_layers) if config.is_moe(layer)]
        local_experts = KernelLocalExperts(expert_weights, mine, moe_layers)
    else:
        local_experts = ReferenceLocalExperts(expert_weights, mine)
    executor = ExpertParallelExecutor(dispatcher, local_experts)
    # expert_subset=None: the router chooses among all experts, wherever they live.
    model = MiMoV2FlashModel(config, weights, backend=backend, expert_executor=executor)
    return model, executor


def generate_data_parallel(model: MiMoV2FlashModel, executor: ExpertParallelExecutor, comm: Communicator,
                           prompts: np.ndarray, max_new_tokens: int, temperature: float = 0.0,
                           seed: int = 0):
    """`model.generate` for this rank's share of the batch (prompts [b, T], b may be 0).

    Greedy decoding gives exactly the single-process tokens; sampling draws from a per-rank
    stream (seed, rank), so sampled tokens differ from a single-process run.
    Returns (tokens int64 [b, T + max_new_tokens], timing dict).
    """
    config = model.config
    stop = set(config.stop_token_ids)
    rng = np.random.default_rng([seed, comm.rank])
    batch, prompt_len = prompts.shape
    cache = model.new_cache(batch) if batch else None
    out = np.zeros((batch, prompt_len + max_new_tokens), np.int64)
    out[:, :prompt_len] = prompts

    def forward(sequences, slots):
        """Last-position logits of each sequence; with none, still take part in every MoE layer."""
        if sequences:
            logits = [l[-1] for l in model.forward_ragged(sequences, cache, slots)]
        else:
            executor.idle(config)
            logits = []
        executor.stats.next_step()
        return logits

    t0 = time.perf_counter()
    logits = forward(list(prompts), list(range(batch))) if max_new_tokens else []
    prefill_s = time.perf_counter() - t0
    active = list(range(batch))
    t1 = time.perf_counter()
    for step in range(max_new_tokens):
        col = prompt_len + step
        still = []
        for seq, row_logits in zip(active, logits):
            token = sample(row_logits, temperature, None, None, rng)
            out[seq, col] = token
            if token in stop:
                out[seq, col + 1:] = token
            else:
                still.append(seq)
        active = still
        if step == max_new_tokens - 1:
            break
        decoding = comm.all_gather(np.array([len(active)], np.int64), None, "", f"decode step {step} agreement")
        if decoding.sum() == 0:
            break
        logits = forward([[out[seq, col]] for seq in active], active)
    return out, {"prefill_s": prefill_s, "decode_s": time.perf_counter() - t1}


def run_random_distributed(args, config: MiMoV2FlashConfig) -> int:
    """Entry from run_example.py when WORLD_SIZE > 1; returns the process exit code."""
    try:
        comm = Communicator.from_env(args.dist_backend, args.timeout)
    except Exception as err:
        return report_and_exit_code(int(os.environ.get("RANK", -1)), err)
    try:
        with failure_guard(comm):
            _run(comm, args, config)
    except Exception as err:
        return report_and_exit_code(comm.rank, err)
    finally:
        comm.close()
    return 0


def _run(comm: Communicator, args, config: MiMoV2FlashConfig) -> None:
    world, rank = comm.world_size, comm.rank
    placement = resolve_placement(args.ep_placement, config.n_routed_experts, world)
    policy = ModePolicy(args.ep_allgather_max_tokens, comm.uneven_splits)
    t0 = time.perf_counter()
    model, executor = build_rank_model(config, comm, placement, args.seed, args.ep_mode,
                                       args.ep_wire_dtype, policy, args.backend)
    build_s = time.perf_counter() - t0
    prompt = np.random.default_rng(args.seed).integers(0, config.vocab_size, (args.batch, args.seq_len))
    mine = np.array_split(np.arange(args.batch), world)[rank]
    tokens, timing = generate_data_parallel(model, executor, comm, prompt[mine], args.max_new_tokens,
                                            args.temperature, args.seed)
    shares = comm.all_gather_objects((mine.tolist(), tokens.tolist(), timing), "gathering results")
    records = [rec for part in comm.all_gather_objects(executor.stats.records, "gathering statistics")
               for rec in part]
    if rank != 0:
        return
    summary = summarize(records, world)
    full = np.zeros((args.batch, args.seq_len + args.max_new_tokens), np.int64)
    for seqs, toks, _ in shares:
        if seqs:
            full[seqs] = toks
    rows = [("config", config.summary()),
            ("expert parallel", f"{world} ranks ({args.dist_backend}), mode {args.ep_mode}, wire "
                                f"{args.ep_wire_dtype}, placement {args.ep_placement}, experts per rank "
                                f"{[len(placement.experts_of(r)) for r in range(world)]}"),
            ("build (random weights)", f"{build_s:.2f} s (rank 0)"),
            ("prompt", f"{args.batch} x {args.seq_len} tokens, sequences per rank "
                       f"{[len(s) for s, _, _ in shares]}"),
            ("prefill", f"{max(t['prefill_s'] for _, _, t in shares):.3f} s (slowest rank)"),
            ("decode", f"{max(t['decode_s'] for _, _, t in shares):.3f} s (slowest rank)")]
    for b in range(args.batch):
        rows.append((f"generated[{b}]", " ".join(map(str, full[b, args.seq_len:]))))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print()
    print(format_table(summary), flush=True)
    if args.ep_save_placement:
        load = np.zeros(config.n_routed_experts)
        for rec in records:
            np.add.at(load, rec.local_experts, rec.expert_rows)
        _write_json(args.ep_save_placement, load_aware_placement(load, world).to_json())
    if args.json:
        _write_json(args.json, {"config": config.to_hub_dict(), "tokens": full.tolist(),
                                "world_size": world, "ep": summary})


def _write_json(path: str, data) -> None:
    """Write atomically: a reader never sees half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)
