"""`torchrun --nproc-per-node R run_example.py --mode random | generate ...`: expert-parallel generation.

Each rank holds the replicated weights (embedding, attention, router, dense layer, lm_head) and
only its own experts, from one of two sources (`RankWeights`): seeded random weights (`--mode
random`; the same seed gives the same values everywhere) or its file set in a prepare_weights
directory (`--mode generate --weights DIR`; the manifest's world size and placement must match
the run). Both then take the same path: attention is data-parallel (rank r takes a contiguous
share of the batch's sequences, possibly none) and runs prefill and decode on them; every MoE
layer goes through the dispatcher. Ranks agree before each decode step whether anyone still
decodes, and a rank with no tokens still takes part in every MoE layer's collectives. Rank 0
prints the generated tokens and a per-rank statistics table. On the kernel backend the ranks
generate inside static-shape buckets warmed up on every rank, with the static expert exchange, and
rank 0 prints the kernel-variant count of every rank (docs/device.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from mimo_v2_flash.buckets import BucketTable
from mimo_v2_flash.checkpoint import MANIFEST_FILE, PreparedCheckpoint
from mimo_v2_flash.config import MiMoV2FlashConfig
from mimo_v2_flash.model import MiMoV2FlashModel, check_position_limit, generation_loop, host_sampler
from mimo_v2_flash.placement import ExpertPlacement, PlacementError
from mimo_v2_flash.weights import random_weights

from .comm import Communicator, failure_guard, report_and_exit_code
from .dispatcher import Dispatcher, ModePolicy
from .executor import ExpertParallelExecutor, OpsLocalExperts
from .options import ExpertParallelOptions, GenerationOptions
from .placement import load_aware_placement
from .plan import RowFormat
from .static_dispatch import (STATIC_MODES, HostLocalExperts, StaticDispatcher, StaticExpertParallelExecutor,
                              TorchLocalExperts)
from .stats import format_table, summarize


@dataclass
class RankWeights:
    """What one rank holds: the replicated tensors plus its own experts (Hub names, float32)."""
    config: MiMoV2FlashConfig
    placement: ExpertPlacement
    weights: dict[str, np.ndarray]
    routable: list[int] | None     # experts the router may choose; None = all (a prepared subset limits it)
    source: str                    # where the weights came from, for the report
    identity: dict                 # what every rank must agree on (`check_same_checkpoint`)
    placement_name: str            # how the placement was chosen, for the report

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w in self.weights.values())


def random_rank_weights(config: MiMoV2FlashConfig, placement: ExpertPlacement, rank: int,
                        seed: int, placement_name: str = "contiguous") -> RankWeights:
    """Seeded random weights: each tensor has its own stream, so a rank's experts have exactly the
    single-process model's values. `placement_name`: the --ep-placement spec `placement` came from."""
    identity = {"source": "random weights", "seed": seed, "config": _digest(config.to_hub_dict()),
                "layers": config.num_hidden_layers, "experts": config.n_routed_experts,
                "placement": _digest(placement.to_json())}
    return RankWeights(config, placement, random_weights(config, seed, experts=placement.experts_of(rank)),
                       None, f"random (seed {seed})", identity, placement_name)


def prepared_rank_weights(path, world_size: int, rank: int, placement_spec: str | None = None) -> RankWeights:
    """`rank`'s file set of a prepare_weights directory, after checking that it was prepared for
    `world_size` ranks and (if `placement_spec` is given) for that placement. Every rank runs the
    same checks on the same manifest, so a mismatch stops every rank before any collective."""
    prepared = PreparedCheckpoint(path)
    manifest = os.path.join(prepared.path, MANIFEST_FILE)
    if prepared.world_size != world_size:
        raise PlacementError(f"{manifest}: the weights are prepared for {prepared.world_size} ranks, this run "
                             f"has {world_size} (WORLD_SIZE); launch torchrun with --nproc-per-node "
                             f"{prepared.world_size}, or prepare again with --world-size {world_size}")
    if placement_spec is not None:
        wanted = resolve_placement(placement_spec, prepared.full_config.n_routed_experts, world_size)
        moved = [e for e, (a, b) in enumerate(zip(wanted.rank_of, prepared.placement.rank_of)) if a != b]
        if moved:
            e = moved[0]
            raise PlacementError(f"{manifest}: --ep-placement {placement_spec} puts expert {e} on rank "
                                 f"{wanted.rank_of[e]}, the prepared files on rank "
                                 f"{prepared.placement.rank_of[e]} ({len(moved)} experts differ); omit "
                                 f"--ep-placement to use the files' placement, or prepare again with "
                                 f"--placement {placement_spec}")
    config, weights = prepared.load(rank)
    manifest_data = prepared.manifest
    return RankWeights(config, prepared.placement, weights, prepared.experts,
                       f"{prepared.path} ({manifest_data['dtype']}, {manifest_data['replicated']} layout, "
                       f"{len(prepared.rank_files[rank])} file(s) per rank)", checkpoint_identity(manifest_data),
                       placement_spec or "as prepared")


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def checkpoint_identity(manifest: dict) -> dict:
    """What identifies a prepared checkpoint across ranks, from its manifest: the source
    checkpoint (its index file's sha256), the conversion (dtype, layers, experts, placement,
    layout, config) and the bytes written (every file's recorded sha256)."""
    source = manifest.get("source") if isinstance(manifest.get("source"), dict) else {}
    files = sorted((f.get("name"), f.get("sha256")) for f in manifest.get("files", []) if isinstance(f, dict))
    layers = manifest.get("layers") or []
    return {"source index sha256": source.get("index_sha256"), "dtype": manifest.get("dtype"),
            "layers": f"{len(layers)} ({layers[0]}..{layers[-1]})" if layers else "none",
            "experts": "all" if manifest.get("experts") is None else _digest(manifest.get("experts")),
            "placement": _digest(manifest.get("placement")), "replicated": manifest.get("replicated"),
            "config": _digest(manifest.get("config")), "files": _digest(files)}


class CheckpointMismatch(RuntimeError):
    """Ranks hold different checkpoints (or conversions of one)."""


def check_same_checkpoint(comm: Communicator, identity: dict) -> None:
    """Every rank compares its checkpoint identity with rank 0's before the first forward; all
    ranks raise the same error, naming each differing rank and field."""
    identities = comm.all_gather_objects(identity, "checkpoint identity check")
    differences = []
    for r, other in enumerate(identities[1:], start=1):
        fields = [k for k in sorted(set(identities[0]) | set(other)) if identities[0].get(k) != other.get(k)]
        if fields:
            differences.append(f"rank {r} differs from rank 0 in " + ", ".join(
                f"{k} ({other.get(k)!r} on rank {r}, {identities[0].get(k)!r} on rank 0)" for k in fields))
    if differences:
        raise CheckpointMismatch("ranks hold different checkpoints: " + "; ".join(differences) +
                                 ". Give every rank the same prepared directory (or copies of it)")


def resolve_placement(spec: str, num_experts: int, world_size: int) -> ExpertPlacement:
    """"contiguous" or a placement file (`ExpertPlacement.load`: what `to_json` or
    `--ep-save-placement` writes, or a prepare-weights `--placement` table)."""
    if spec == "contiguous":
        return ExpertPlacement.contiguous(num_experts, world_size)
    return ExpertPlacement.load(spec, world_size, num_experts)


def rank_buckets(backend: str, mode: str, speculative: str | None, world: int, batch: int, prompt_len: int,
                 max_new_tokens: int) -> BucketTable | None:
    """The static-shape buckets of a rank's generation, as in one process (backend "nki"): a rank's
    batch is its largest share of the sequences. None (ragged shapes) on the reference backend,
    for alltoallv (its splits follow the routing) and for speculative passes (draft lengths)."""
    if backend != "nki" or speculative or (mode != "auto" and mode not in STATIC_MODES):
        return None
    return BucketTable.for_generation(max(-(-batch // world), 1), prompt_len, max_new_tokens)


def build_rank_model(held: RankWeights, comm: Communicator, mode: str = "auto", wire_dtype: str = "float32",
                     policy: ModePolicy | None = None, backend: str = "reference", weight_dtype: str = "bf16",
                     buckets: BucketTable | None = None):
    """This rank's model over `held` and its expert-parallel executor; the rank's experts run on
    the model's ops backend (backend "nki": the grouped expert FFN kernel, `weight_dtype`).
    `buckets` (static shapes, `rank_buckets`): the model runs inside them, and the exchange is the
    static dispatcher's, so the expert kernel gets a fixed row count (R slots of the bucket's rows)."""
    config, placement = held.config, held.placement
    # The router chooses among all (routable) experts, wherever they live.
    model = MiMoV2FlashModel(config, held.weights, expert_subset=held.routable, backend=backend,
                             weight_dtype=weight_dtype)
    model.buckets = buckets
    mine = placement.experts_of(comm.rank)
    if comm.transport.lazy or buckets is not None:   # static shapes, equal splits
        dispatcher = StaticDispatcher(comm, placement, config.hidden_size, config.num_experts_per_tok,
                                      wire_dtype=wire_dtype)
        # The kernel backend takes and gives device tensors (the expert kernel at its static block
        # shape, nothing read back); the reference runs as torch ops on a lazy device, on the host else.
        if backend == "nki":
            local = OpsLocalExperts(model.ops, mine, static=True)
        elif comm.transport.lazy:
            local = TorchLocalExperts(model.ops, mine, comm.to_device)
        else:
            local = HostLocalExperts(OpsLocalExperts(model.ops, mine, static=True), comm)
        executor = StaticExpertParallelExecutor(
            dispatcher, local, config, mode, sizes=None if buckets is None else buckets.row_counts(),
            allgather_max_tokens=(policy or ModePolicy()).allgather_max_tokens)
    else:
        fmt = RowFormat(config.hidden_size, config.num_experts_per_tok, wire_dtype)
        executor = ExpertParallelExecutor(Dispatcher(comm, placement, fmt, mode, policy),
                                          OpsLocalExperts(model.ops, mine))
    model.expert_executor = executor
    return model, executor


def generate_data_parallel(model: MiMoV2FlashModel, executor: ExpertParallelExecutor, comm: Communicator,
                           prompts: np.ndarray, max_new_tokens: int, temperature: float = 0.0,
                           seed: int = 0, speculative: str | None = None, draft_tokens: int = 3):
    """`model.generate` for this rank's share of the batch (prompts [b, T], b may be 0).

    Greedy decoding gives exactly the single-process tokens; sampling draws from a per-rank
    stream (seed, rank), so sampled tokens differ from a single-process run; with `model.buckets`
    (static shapes) the token is chosen on the device (`DeviceSampler`). `speculative="mtp"`:
    the MTP layers (dense, replicated) draft on this rank, and each verify pass is one MoE
    dispatch per layer for all draft tokens (docs/mtp.md).
    Returns (tokens int64 [b, T + max_new_tokens], timing dict).
    """
    config = model.config
    check_position_limit(config, prompts.shape[1], max_new_tokens)    # every rank: the same prompt length
    stop = set(config.stop_token_ids)
    rng = np.random.default_rng([seed, comm.rank])
    if model.buckets is None:
        choose = host_sampler(temperature, None, None, rng)
    else:                        # the static-shape (device) path samples on the device
        from mimo_v2_flash.device_sampling import DeviceSampler
        rank_seed = int(np.random.SeedSequence([seed, comm.rank]).generate_state(1)[0])
        choose = DeviceSampler(temperature, None, None, rank_seed)
    batch = prompts.shape[0]
    cache = model.new_cache(batch) if batch else None

    def last_logits(sequences, slots):
        """Last-position logits of each sequence; with none, still take part in every MoE layer."""
        if sequences:
            logits = [l[-1] for l in model.forward_ragged(sequences, cache, slots,
                                                          on_device=model.buckets is not None)]
        else:
            executor.idle(config)
            logits = []
        executor.stats.next_step()
        return logits

    def keep_decoding(step, active):
        """Every rank takes part in each step's MoE layers while any rank still decodes."""
        decoding = comm.all_gather(np.array([len(active)], np.int64), None, "", f"decode step {step} agreement")
        return bool(decoding.sum())

    if speculative:
        return _speculative_data_parallel(model, executor, prompts, max_new_tokens, temperature, rng, stop,
                                          keep_decoding, speculative, draft_tokens)
    out, prefill_s, decode_s = generation_loop(prompts, max_new_tokens, last_logits, choose, stop, keep_decoding)
    return out, {"prefill_s": prefill_s, "decode_s": decode_s}


def _speculative_data_parallel(model, executor, prompts, max_new_tokens, temperature, rng, stop, keep_decoding,
                               method: str, draft_tokens: int):
    """The speculative twin of the loop above: the same agreement and idle participation."""
    from mimo_v2_flash.speculative import SPECULATIVE_METHODS, MtpSpeculator, speculative_loop
    if method not in SPECULATIVE_METHODS:
        raise ValueError(f"speculative={method!r}: supported methods are {SPECULATIVE_METHODS}")

    def main_pass(sequences, slots):
        """Logits and hidden states of new tokens; with none, still take part in every MoE layer."""
        if sequences:
            out = model.forward_ragged(sequences, speculator.cache, slots, return_hidden=True)
        else:
            executor.idle(model.config)
            out = ([], [])
        executor.stats.next_step()
        return out

    speculator = MtpSpeculator(model, draft_tokens, temperature, rng=rng, main_pass=main_pass)
    out, prefill_s, decode_s = speculative_loop(speculator, prompts, max_new_tokens, stop, keep_decoding)
    return out, {"prefill_s": prefill_s, "decode_s": decode_s, "speculative": speculator.stats.to_dict()}


def run_distributed(options: ExpertParallelOptions, generation: GenerationOptions,
                    load_weights: Callable[[int, int], RankWeights], make_prompts: Callable[[int], np.ndarray],
                    json_path: str | None = None) -> int:
    """Entry from run_example.py when WORLD_SIZE > 1; returns the process exit code.

    `load_weights(world_size, rank)` gives the rank's weights; `make_prompts(vocab_size)` the
    whole batch's prompt ids [B, T] (the same on every rank). Both run on every rank inside the
    failure guard, so a bad input stops every rank with its message. Rank 0 prints the report
    and writes it to `json_path` as well, if given.
    """
    try:
        comm = Communicator.from_env(options.dist_backend, options.timeout, options.liveness)
    except Exception as err:
        return report_and_exit_code(int(os.environ.get("RANK", -1)), err)
    try:
        with failure_guard(comm):
            _run(comm, options, generation, load_weights, make_prompts, json_path)
    except Exception as err:
        return report_and_exit_code(comm.rank, err)
    finally:
        comm.close()
    return 0


def warm_up_rank(model: MiMoV2FlashModel, skip: bool):
    """Every rank compiles every bucket (the warmup passes take part in each other's MoE layers, so
    all ranks run it, in the same bucket order). Returns the `DeviceReport` marks (None without
    buckets)."""
    if model.buckets is None:
        return None
    from mimo_v2_flash.device_report import DeviceReport
    report = DeviceReport()
    if not skip:
        model.warmup()
        report.warmed()
    return report


def kernel_report(comm: Communicator, model: MiMoV2FlashModel, report) -> str | None:
    """The `kernel variants:` line of every rank (one line when they agree) and rank 0's
    `host->device:` and `device->host:` lines (None on the reference backend); only rank 0 prints
    it."""
    counts = comm.all_gather_objects(None if report is None else report.variants_line(), "gathering kernel variants")
    if report is None:
        return None if model.backend != "nki" else \
            "kernel variants: not counted (ragged shapes without buckets: alltoallv or speculative)"
    if len(set(counts)) == 1:
        lines = f"{counts[0]} (every rank)"
    else:
        lines = "\n".join(f"{line} (rank {r})" for r, line in enumerate(counts))
    return "\n".join([lines] + [f"{line} (rank 0)" for line in report.traffic_lines(model.ops.passes)])


def _run(comm: Communicator, options: ExpertParallelOptions, generation: GenerationOptions, load_weights,
         make_prompts, json_path: str | None) -> None:
    world, rank = comm.world_size, comm.rank
    t0 = time.perf_counter()
    held = load_weights(world, rank)
    check_same_checkpoint(comm, held.identity)
    config, placement = held.config, held.placement
    prompts = make_prompts(config.vocab_size)
    policy = ModePolicy(options.allgather_max_tokens, comm.uneven_splits)
    batch, prompt_len = prompts.shape
    buckets = rank_buckets(generation.backend, options.mode, generation.speculative, world, batch, prompt_len,
                           generation.max_new_tokens)
    model, executor = build_rank_model(held, comm, options.mode, options.wire_dtype, policy, generation.backend,
                                       generation.weight_dtype, buckets)
    build_s = time.perf_counter() - t0
    device = warm_up_rank(model, generation.no_warmup)
    mine = np.array_split(np.arange(batch), world)[rank]
    tokens, timing = generate_data_parallel(model, executor, comm, prompts[mine], generation.max_new_tokens,
                                            generation.temperature, generation.seed, generation.speculative,
                                            generation.draft_tokens)
    device_lines = kernel_report(comm, model, device)
    shares = comm.all_gather_objects((mine.tolist(), tokens.tolist(), timing, held.nbytes), "gathering results")
    records = [rec for part in comm.all_gather_objects(executor.stats.records, "gathering statistics")
               for rec in part]
    if rank != 0:
        return
    summary = summarize(records, world)
    full = np.zeros((batch, prompt_len + generation.max_new_tokens), np.int64)
    for seqs, toks, _, _ in shares:
        if seqs:
            full[seqs] = toks
    weight_bytes = [nbytes for _, _, _, nbytes in shares]
    routable = set(range(config.n_routed_experts) if held.routable is None else held.routable)
    rows = [("config", config.summary()),
            ("weights", held.source),
            ("expert parallel", f"{world} ranks ({options.dist_backend}), mode {options.mode}, wire "
                                f"{options.wire_dtype}, placement {held.placement_name}, experts per rank "
                                f"{[len(routable.intersection(placement.experts_of(r))) for r in range(world)]}"),
            ("weights per rank", f"{[round(b / 1e6, 2) for b in weight_bytes]} MB (float32: replicated + "
                                 "own experts)"),
            ("build", f"{build_s:.2f} s (rank 0, weights included)"),
            ("prompt", f"{batch} x {prompt_len} tokens, sequences per rank {[len(s[0]) for s in shares]}"),
            ("prefill", f"{max(s[2]['prefill_s'] for s in shares):.3f} s (slowest rank)"),
            ("decode", f"{max(s[2]['decode_s'] for s in shares):.3f} s (slowest rank)")]
    for r, (_, _, rank_timing, _) in enumerate(shares):
        if "speculative" in rank_timing:
            stats = rank_timing["speculative"]
            rows.append((f"speculative[rank {r}]", f"{stats['accepted']} of {stats['drafted']} drafts accepted, "
                                                   f"acceptance length {stats['mean_acceptance_length']}, "
                                                   f"{stats['tokens_per_main_pass']} tokens per verify pass"))
    for b in range(batch):
        rows.append((f"generated[{b}]", " ".join(map(str, full[b, prompt_len:]))))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    if device_lines:
        print(device_lines)
    print()
    print(format_table(summary) if records else "expert-parallel statistics: not recorded by the static-shape "
          "executor (one exchange shape per bucket)", flush=True)
    if options.save_placement:
        load = np.zeros(config.n_routed_experts)
        for rec in records:
            np.add.at(load, rec.local_experts, rec.expert_rows)
        _write_json(options.save_placement, load_aware_placement(load, world).to_json())
    if json_path:
        _write_json(json_path, {"config": config.to_hub_dict(), "tokens": full.tolist(), "world_size": world,
                                "weights": held.source, "weight_bytes": weight_bytes, "ep": summary,
                                "speculative": [s[2].get("speculative") for s in shares]})


def _write_json(path: str, data) -> None:
    """Write atomically: a reader never sees half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)
