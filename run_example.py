"""MiMo-V2-Flash command-line entry.

    python run_example.py --mode generate --weights DIR --prompt "Hello"        # text in, text out
    python run_example.py --mode generate --weights DIR --chat --prompt "Hi"    # with the chat template
    python run_example.py --mode random              # random small model: prefill + decode, a table
    python run_example.py --mode test                # self-checks (reference, kernels): pass/fail table
    python run_example.py --mode download ...        # Hub checkpoint -> per-rank files -> generate
    torchrun --nproc-per-node 4 run_example.py --mode random   # expert-parallel over 4 ranks
    torchrun --nproc-per-node 4 run_example.py --mode generate --weights PREPARED   # prepared weights
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
    p.add_argument("--mode", choices=["random", "generate", "test", "download"], default="random")
    p.add_argument("--weights", metavar="PREPARED_DIR",
                   help="--mode generate: a prepare-weights output directory; under torchrun each rank "
                        "loads its own file set (the directory must be prepared for WORLD_SIZE ranks)")
    p.add_argument("--config", help="preset (tiny, small, full) or path to config.json (default tiny)")
    p.add_argument("--num-layers", type=int, help="override num_hidden_layers")
    p.add_argument("--num-experts", type=int, help="override n_routed_experts")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=32, help="prompt tokens per sequence")
    p.add_argument("--prompt-ids", type=parse_prompt_ids, metavar="IDS",
                   help="prompt token ids instead of seeded random ones, e.g. 1,2,3 or 1,2,3;4,5,6 "
                        "(sequences of equal length; replaces --batch and --seq-len)")
    p.add_argument("--prompt", help="prompt text: tokenized with the checkpoint's tokenizer.json, the "
                                    "continuation printed as text while it is generated")
    p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template to --prompt "
                                                       "(one user message)")
    p.add_argument("--tokenizer", metavar="DIR", help="directory with tokenizer.json (default: --weights)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when the text reaches this string (repeatable; cut before it)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=["reference", "nki"], default="reference",
                   help="reference = NumPy; nki = NKI kernels (the bundled CPU simulator unless the Neuron "
                        "SDK's nki is installed; docs/device.md)")
    p.add_argument("--weight-dtype", choices=["bf16", "fp8"], default="bf16",
                   help="weight storage: how --backend nki keeps the projections, and the per-rank file "
                        "dtype in --mode download (fp8 = Trainium e4m3, +-240, 128x128 blocks)")
    p.add_argument("--no-warmup", action="store_true",
                   help="--backend nki: skip compiling every static-shape bucket before generating "
                        "(docs/device.md)")
    p.add_argument("--speculative", choices=["mtp"],
                   help="self-speculative decoding: draft with the MTP layers, verify in one pass (docs/mtp.md)")
    p.add_argument("--draft-tokens", type=int, default=3, metavar="K",
                   help="--speculative: tokens drafted per step (1 .. number of MTP layers)")
    p.add_argument("--quick", action="store_true", help="--mode test: skip the slowest checks")
    p.add_argument("--topics", help="--mode test: comma-separated self-check topics")
    p.add_argument("--json", help="also write the results as JSON to this file")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (they show on a terminal for steps longer than a few seconds)")
    ep = p.add_argument_group("expert parallel (under torchrun; see docs/expert_parallel.md)")
    ep.add_argument("--ep-mode", choices=["auto", "alltoallv", "alltoall_padded", "allgather"], default="auto")
    ep.add_argument("--ep-allgather-max-tokens", type=int, default=1,
                    help="auto mode: all-gather when no rank has more tokens than this")
    ep.add_argument("--ep-wire-dtype", choices=["float32", "bfloat16"], default="float32")
    ep.add_argument("--ep-placement", help="'contiguous' or a placement JSON file (default: contiguous; with "
                                           "--weights the prepared files' placement, which this must match)")
    ep.add_argument("--ep-save-placement", help="write a load-aware placement from this run's expert load")
    ep.add_argument("--dist-backend", choices=["gloo", "xla"], default="gloo",
                    help="process group: gloo on CPU; xla = Neuron on trn2 (untested here)")
    ep.add_argument("--timeout", type=float, default=300.0,
                    help="seconds a collective may wait before every rank gives up with an error")
    ep.add_argument("--ep-liveness", type=float, default=None,
                    help="seconds without a heartbeat after which a rank counts as killed (default "
                         "min(timeout, 10)); the others then stop naming it")
    add_download_arguments(p)
    return p


def add_download_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of --mode download (the prepare-weights command line's, under the same names)."""
    from mimo_prepare_weights.convert import REPLICATED_LAYOUTS, SHARED
    from mimo_prepare_weights.download import DEFAULT_REPO
    g = parser.add_argument_group("download / prepare weights (--mode download)")
    g.add_argument("--repo-id", default=DEFAULT_REPO, help="Hub repository")
    g.add_argument("--revision", help="branch, tag or commit (default main)")
    g.add_argument("--local-dir", default="MiMo-V2-Flash", help="where the Hub files go")
    g.add_argument("--offline", action="store_true",
                   help="use --local-dir as it is, no network (also HF_HUB_OFFLINE=1)")
    g.add_argument("--output-dir", default="MiMo-V2-Flash-prepared", help="per-rank weight files")
    g.add_argument("--world-size", type=int, help="ranks (default 1, or the placement table's)")
    g.add_argument("--placement", help="JSON placement table (rank_of list, or expert lists per rank)")
    g.add_argument("--layers", help="layer range A:B (half-open), e.g. 0:4")
    g.add_argument("--expert-subset", help="experts to keep, e.g. 0-15,40")
    g.add_argument("--replicated", choices=REPLICATED_LAYOUTS, default=SHARED,
                   help="shared: one replicated file + an experts file per rank; per-rank: "
                        "self-contained rank files")


# option field -> the flag that sets it (the flag's dest is its name without dashes)
GENERATION_FLAGS = {"max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "seed": "--seed",
                    "speculative": "--speculative", "draft_tokens": "--draft-tokens", "backend": "--backend",
                    "weight_dtype": "--weight-dtype", "no_warmup": "--no-warmup"}
EXPERT_PARALLEL_FLAGS = {"dist_backend": "--dist-backend", "mode": "--ep-mode",
                         "allgather_max_tokens": "--ep-allgather-max-tokens", "wire_dtype": "--ep-wire-dtype",
                         "placement": "--ep-placement", "save_placement": "--ep-save-placement",
                         "timeout": "--timeout", "liveness": "--ep-liveness"}


def _from_flags(cls, flags: dict[str, str], args):
    from mimo_parallel.options import OptionError
    try:
        return cls(**{field: getattr(args, flag[2:].replace("-", "_")) for field, flag in flags.items()})
    except OptionError as err:
        raise OptionError(flags[err.option], err.problem) from None


def generation_options(args):
    """`mimo_parallel.options.GenerationOptions` of the flags; an OptionError names the flag."""
    from mimo_parallel.options import GenerationOptions
    return _from_flags(GenerationOptions, GENERATION_FLAGS, args)


def expert_parallel_options(args):
    """`mimo_parallel.options.ExpertParallelOptions` of the flags; an OptionError names the flag."""
    from mimo_parallel.options import ExpertParallelOptions
    return _from_flags(ExpertParallelOptions, EXPERT_PARALLEL_FLAGS, args)


def parse_prompt_ids(text: str) -> np.ndarray:
    """'1,2,3;4,5,6' -> int64 [2, 3]: sequences separated by ';', ids by ','."""
    try:
        rows = [[int(token) for token in seq.split(",")] for seq in text.split(";")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected token ids separated by ',' (sequences by ';')") from None
    lengths = sorted({len(row) for row in rows})
    if len(lengths) > 1:
        raise argparse.ArgumentTypeError(f"{text!r}: sequences of {lengths} tokens; all need the same length")
    ids = np.array(rows, np.int64)
    if (ids < 0).any():
        raise argparse.ArgumentTypeError(f"{text!r}: token ids must be >= 0")
    return ids


def make_prompts(args, vocab_size: int) -> np.ndarray:
    """The batch's prompt ids [B, T]: --prompt-ids, or --batch x --seq-len seeded random ids."""
    if args.prompt_ids is None:
        return np.random.default_rng(args.seed).integers(0, vocab_size, (args.batch, args.seq_len))
    if args.prompt_ids.max() >= vocab_size:
        raise ValueError(f"--prompt-ids: token id {args.prompt_ids.max()} is outside the model's vocabulary "
                         f"0..{vocab_size - 1}")
    return args.prompt_ids


def make_config(args):
    from mimo_v2_flash import load_config
    config = load_config(args.config or "tiny")
    changes = {}
    if args.num_layers is not None:
        changes["num_hidden_layers"] = args.num_layers
    if args.num_experts is not None:
        changes["n_routed_experts"] = args.num_experts
    return config.replace(**changes) if changes else config


def distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def mode_random(args) -> int:
    config = make_config(args)
    if distributed():
        from mimo_parallel.run import random_rank_weights, resolve_placement, run_distributed

        def load_weights(world, rank):
            spec = args.ep_placement or "contiguous"
            placement = resolve_placement(spec, config.n_routed_experts, world)
            return random_rank_weights(config, placement, rank, args.seed, spec)
        return run_distributed(expert_parallel_options(args), generation_options(args), load_weights,
                               lambda vocab: make_prompts(args, vocab), args.json)
    from mimo_v2_flash import MiMoV2FlashModel
    t0 = time.perf_counter()
    model = MiMoV2FlashModel.random(config, seed=args.seed, backend=args.backend, weight_dtype=args.weight_dtype)
    return generate_single_process(args, model, f"random weights, {time.perf_counter() - t0:.2f} s")


def mode_generate(args) -> int:
    """The prepared weights: expert-parallel under torchrun (each rank its file set), otherwise one
    process holding every rank's experts."""
    if distributed():
        from mimo_parallel.run import prepared_rank_weights, run_distributed

        def load_weights(world, rank):
            device_memory_budget(args, world, show=rank == 0)
            return prepared_rank_weights(args.weights, world, rank, args.ep_placement)
        return run_distributed(expert_parallel_options(args), generation_options(args), load_weights,
                               lambda vocab: make_prompts(args, vocab), args.json)
    from mimo_v2_flash import MiMoV2FlashModel
    t0 = time.perf_counter()
    try:
        device_memory_budget(args, 1, show=True)
        model = MiMoV2FlashModel.from_pretrained(args.weights, backend=args.backend, weight_dtype=args.weight_dtype)
    except ValueError as err:      # CheckpointError, ConfigError: the message names the file
        return input_error(err)
    if args.prompt is not None:
        return generate_text_single_process(args, model)
    return generate_single_process(args, model, f"{args.weights}, every rank's files, "
                                                f"{time.perf_counter() - t0:.2f} s")


def device_memory_budget(args, world: int, show: bool) -> None:
    """Print the per-rank trn2 memory budget of this run (mimo_v2_flash.memory_budget) before the
    weights load; on a Neuron device a run that does not fit stops here (MemoryBudgetError)."""
    from mimo_kernels.launch import device, runtime_lnc
    from mimo_v2_flash.checkpoint import PreparedCheckpoint, is_prepared_dir
    from mimo_v2_flash.config import MiMoV2FlashConfig
    from mimo_v2_flash.memory_budget import memory_budget
    # --weights is a prepared directory or, in one process, a Hub-layout one (config.json)
    config = (PreparedCheckpoint(args.weights).runnable_config() if is_prepared_dir(args.weights)
              else MiMoV2FlashConfig.from_json(args.weights))
    batch = len(args.prompt_ids) if args.prompt_ids is not None else args.batch
    context = 1 << (args.seq_len + args.max_new_tokens - 1).bit_length()      # the decode bucket
    budget = memory_budget(config, world, weight_dtype=args.weight_dtype, batch=batch,
                           context=min(context, config.max_position_embeddings), lnc=runtime_lnc(),
                           host_weights="kernel" if args.backend == "nki" else "float32+kernel")
    on_device = args.backend == "nki" and getattr(device(), "type", "cpu") != "cpu"
    if show:
        # with --prompt, stdout carries the generated text alone
        print(budget.table() + ("" if on_device else "\n  (trn2 figures; not enforced on this CPU)"),
              file=sys.stderr if args.prompt is not None else sys.stdout)
    if on_device:
        budget.check()


def generate_text_single_process(args, model) -> int:
    """--prompt: the continuation on stdout as it is generated; speed on stderr."""
    from mimo_v2_flash.text import TextTokenizer, TokenizerError, generate_text
    try:
        tokenizer = TextTokenizer.from_dir(args.tokenizer or args.weights)
    except TokenizerError as err:
        return input_error(err)

    def show(piece):
        sys.stdout.write(piece)
        sys.stdout.flush()
    t0 = time.perf_counter()
    try:
        text = generate_text(model, tokenizer, args.prompt, chat=args.chat, max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, seed=args.seed, stop_strings=args.stop, on_text=show)
    except ValueError as err:     # TokenizerError (template, vocabulary), an empty prompt
        return input_error(err)
    print()
    print(f"[{len(text)} characters in {time.perf_counter() - t0:.2f} s]", file=sys.stderr)
    return 0


def generate_single_process(args, model, built: str) -> int:
    """Prefill + decode of the prompts in one process; prints a table (and writes --json)."""
    config = model.config
    try:
        prompt = make_prompts(args, config.vocab_size)
    except ValueError as err:
        return input_error(err)
    batch, prompt_len = prompt.shape
    variants = kernel_buckets(args, model, batch, prompt_len)
    try:
        tokens, timing = model.generate(prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                        seed=args.seed, return_timing=True, speculative=args.speculative,
                                        draft_tokens=args.draft_tokens)
    except ValueError as err:      # MtpUnavailable, a draft length the model cannot do
        return input_error(err)
    new = tokens[:, prompt_len:]
    decoded = max(args.max_new_tokens - 1, 0) * batch
    rows = [
        ("config", config.summary()),
        ("backend", args.backend),
        ("build", built),
        ("prompt", f"{batch} x {prompt_len} tokens"),
        ("prefill", f"{timing['prefill_s']:.3f} s, "
                    f"{batch * prompt_len / max(timing['prefill_s'], 1e-9):.1f} tokens/s"),
        ("decode", f"{decoded} tokens in {timing['decode_s']:.3f} s, "
                   f"{decoded / max(timing['decode_s'], 1e-9):.1f} tokens/s"),
        ("KV cache", f"{timing['kv_cache_bytes'] / 1e6:.2f} MB ({timing['kv_cache_dtype']})"),
    ]
    if args.backend == "nki":   # the simulator's cost model of one NeuronCore-v3, not a measurement
        prefill, decode = model.ops.cost_summary(slice(0, 1)), model.ops.cost_summary(slice(1, None))
        rows.append(("Trainium2 estimate", f"prefill {prefill['per_pass_us']:.0f} us; decode "
                     f"{decode['per_pass_us']:.0f} us per step of {batch} tokens "
                     f"({decode['per_layer_us']:.0f} us per layer) [simulator cost model]"))
    if args.speculative:
        rows += speculative_rows(timing["speculative"])
    for b in range(batch):
        rows.append((f"generated[{b}]", " ".join(map(str, new[b]))))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    if variants is not None:
        print(variants())
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": config.to_hub_dict(), "timing": timing, "tokens": tokens.tolist()}, f)
    return 0


def speculative_rows(stats: dict) -> list[tuple[str, str]]:
    """Table rows of `speculative.SpeculativeStats.to_dict()`."""
    def fmt(value):
        return "-" if value is None else f"{value:.2f}"
    per_step = " ".join(fmt(v) for v in stats["acceptance_length_per_step"])
    return [("speculative", f"MTP, {stats['draft_tokens']} draft tokens per step: {stats['accepted']} of "
                            f"{stats['drafted']} drafts accepted ({fmt(stats['draft_acceptance_rate'])})"),
            ("acceptance length", f"{fmt(stats['mean_acceptance_length'])} tokens per sequence per step "
                                  f"(per step: {per_step})"),
            ("tokens per pass", f"{fmt(stats['tokens_per_main_pass'])} tokens per main-model pass "
                                f"({stats['main_passes']} verify passes, {stats['mtp_passes']} MTP passes)")]


def kernel_buckets(args, model, batch: int, prompt_len: int):
    """Kernel backend: static-shape buckets for this generation, compiled ahead of time unless
    --no-warmup. Returns a function giving the `kernel variants:`, `host->device:` and
    `device->host:` lines after generation (None on the reference backend)."""
    if args.backend != "nki":
        return None
    try:
        import torch  # noqa: F401  (the static-shape path builds its tables with torch operations)
    except ImportError:
        return lambda: "kernel variants: not counted; static-shape buckets need torch (pip install '.[torch]')"
    from mimo_v2_flash.buckets import BucketTable
    from mimo_v2_flash.device_report import DeviceReport
    model.buckets = BucketTable.for_generation(batch, prompt_len, args.max_new_tokens)
    report = DeviceReport()
    if not args.no_warmup:
        model.warmup()
        report.warmed()
    return lambda: report.lines(model.ops.passes)


def input_error(err: Exception) -> int:
    print(f"run_example.py: error: {err}", file=sys.stderr)
    return 2


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
    """Fetch the Hub files the run needs, prepare per-rank files (the prepare-weights steps), then
    load every rank's files in this process and generate from them."""
    from mimo_prepare_weights.convert import ConvertOptions, convert, parse_expert_list, parse_layer_range
    from mimo_prepare_weights.download import copy_tokenizer_files, download
    from mimo_v2_flash import MiMoV2FlashModel
    from mimo_v2_flash.config import MiMoV2FlashConfig
    from mimo_v2_flash.placement import ExpertPlacement
    num_layers = None
    if os.path.isfile(os.path.join(args.local_dir, "config.json")):
        num_layers = MiMoV2FlashConfig.from_json(args.local_dir).num_hidden_layers
    layers = parse_layer_range(args.layers, num_layers) if args.layers else \
        (list(range(args.num_layers)) if args.num_layers else None)
    options = ConvertOptions(   # a bad placement file is refused here, before any download
        world_size=args.world_size, layers=layers, dtype=args.weight_dtype, replicated=args.replicated,
        placement=ExpertPlacement.load(args.placement, args.world_size) if args.placement else None,
        expert_subset=parse_expert_list(args.expert_subset) if args.expert_subset else None)
    download(args.repo_id, args.local_dir, args.revision, options.layers, options.expert_subset,
             args.offline or None)
    result = convert(args.local_dir, args.output_dir, options, progress=not args.no_progress)
    print(f"prepared {args.output_dir}: wrote {result.written}, resumed {result.skipped}, "
          f"{result.bytes_written / 1e6:.1f} MB in {result.seconds:.1f} s")
    copied = copy_tokenizer_files(args.local_dir, args.output_dir)
    if copied:
        print(f"tokenizer: {', '.join(copied)} -> {args.output_dir} (text: run_example.py --mode generate "
              f"--weights {args.output_dir} --prompt \"...\")")
    t0 = time.perf_counter()
    model = MiMoV2FlashModel.from_pretrained(args.output_dir, backend=args.backend, weight_dtype=args.weight_dtype)
    return generate_single_process(args, model, f"{args.output_dir}, every rank's files, "
                                                f"{time.perf_counter() - t0:.2f} s")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.no_progress:
        from mimo_v2_flash.progress import PROGRESS_ENV
        os.environ[PROGRESS_ENV] = "0"    # every bar, including those in torchrun's rank processes
    if (args.mode == "generate") != bool(args.weights):
        parser.error("--mode generate needs --weights PREPARED_DIR" if args.weights is None
                     else "--weights applies to --mode generate only")
    if args.mode == "generate" and (args.config or args.num_layers or args.num_experts):
        parser.error("--config, --num-layers and --num-experts do not apply to --mode generate: the model is "
                     "the prepared directory's (prepare-weights --layers 0:N for fewer layers)")
    if args.prompt is None and (args.chat or args.stop or args.tokenizer):
        parser.error("--chat, --stop and --tokenizer apply to --prompt only")
    if args.prompt is not None and (args.mode != "generate" or distributed()):
        parser.error("--prompt applies to --mode generate in one process (use --prompt-ids otherwise)")
    problem = argument_problem(args)
    if problem:
        parser.error(problem)
    modes = {"random": mode_random, "generate": mode_generate, "test": mode_test, "download": mode_download}
    try:
        return modes[args.mode](args)
    except (ValueError, OSError, FloatingPointError) as err:
        # every input error of the project is a ValueError subclass (ConfigError, CheckpointError,
        # PrepareError, SafetensorsError, MemoryBudgetError, ...) whose message names the file or value
        return input_error(err)
    except KeyboardInterrupt:
        print("run_example.py: interrupted", file=sys.stderr)
        return 130


def argument_problem(args) -> str:
    """The first flag outside its range or used where it does not apply, else ''."""
    from mimo_parallel.options import OptionError
    for flag, value, low in (("--num-layers", args.num_layers, 1), ("--num-experts", args.num_experts, 1),
                             ("--batch", args.batch, 1), ("--seq-len", args.seq_len, 1)):
        if value is not None and value < low:
            return f"{flag} must be >= {low}, got {value}"
    try:
        generation_options(args)
        expert_parallel_options(args)
    except OptionError as err:
        return str(err)
    if not distributed():
        used = [flag for flag, value, default in (
            ("--ep-mode", args.ep_mode, "auto"), ("--ep-placement", args.ep_placement, None),
            ("--ep-save-placement", args.ep_save_placement, None), ("--dist-backend", args.dist_backend, "gloo"),
            ("--ep-wire-dtype", args.ep_wire_dtype, "float32")) if value != default]
        if used:
            return (f"{used[0]} applies to expert-parallel runs under torchrun only (WORLD_SIZE > 1); "
                    "this is a single process")
    return ""


if __name__ == "__main__":
    sys.exit(main())
