"""Download only what a run needs from the Hub, then (for `run_example.py --mode download`)
prepare per-rank files and generate a few tokens with them.

What is fetched (`allow_patterns` for `huggingface_hub.snapshot_download`): `config.json`, the
index, tokenizer files, and the shards holding the requested layers' tensors plus
`model_embedding` / `model_final`. An expert subset does not shrink the download: all 256
experts of a layer share one shard pair (`model_{i}_linear_fc1/fc2.safetensors`), so those
shards come whole. The size is printed before anything large is fetched: from the Hub's file
metadata when online, from the local files when offline.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import urllib.parse

import numpy as np

from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import HfHubHTTPError

from mimo_v2_flash import MiMoV2FlashModel
from mimo_v2_flash.checkpoint import INDEX_FILE, read_index
from mimo_v2_flash.config import MiMoV2FlashConfig
from mimo_v2_flash.jsonfile import read_json
from mimo_v2_flash.weights import model_tensors

from .manifest import source_shards
from .convert import REPLICATED_LAYOUTS, SHARED, PrepareError, convert, parse_expert_list, parse_layer_range

DEFAULT_REPO = "XiaomiMiMo/MiMo-V2-Flash"
METADATA_FILES = ["config.json", INDEX_FILE]
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "vocab.json",
                   "merges.txt", "special_tokens_map.json", "added_tokens.json", "generation_config.json"]


def needed_shards(config: MiMoV2FlashConfig, weight_map: dict[str, str], layers=None,
                  experts=None) -> list[str]:
    """Shard files holding every tensor (and FP8 scale) of the requested layers and experts."""
    return source_shards(weight_map, model_tensors(config, layers=layers, experts=experts))


def allow_patterns(shards: list[str]) -> list[str]:
    return METADATA_FILES + TOKENIZER_FILES + shards


def _local_size(local_dir: str, files: list[str]) -> int:
    missing = [f for f in files if not os.path.isfile(os.path.join(local_dir, f))]
    if missing:
        raise PrepareError(f"{local_dir}: offline, and {len(missing)} needed file(s) are not there "
                           f"(first: {missing[0]})")
    return sum(os.path.getsize(os.path.join(local_dir, f)) for f in files)


def _hub_size(repo_id: str, revision: str | None, files: list[str]) -> int:
    infos = HfApi().get_paths_info(repo_id, files, revision=revision)
    return sum(getattr(info, "size", 0) or 0 for info in infos)


def check_hub_reachable(timeout: float = 5.0) -> None:
    """Fail in seconds, with one message, when the Hub's host cannot be reached (huggingface_hub
    itself retries for about 24 s and ends in a chained traceback). Behind a proxy the check is
    left to the download itself."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return
    url = urllib.parse.urlsplit(hf_constants.ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        raise PrepareError(f"cannot reach the Hub at {hf_constants.ENDPOINT} ({err.strerror or err}); "
                           "check the network, or pass --offline with the files already in the "
                           "local directory") from None


@contextlib.contextmanager
def hub_errors(repo_id: str):
    """Any failure talking to the Hub as one PrepareError naming the repository."""
    try:
        yield
    except (OSError, HfHubHTTPError, ValueError) as err:
        if isinstance(err, PrepareError):
            raise
        raise PrepareError(f"{repo_id}: download failed ({type(err).__name__}: {str(err).splitlines()[0]})"
                           ) from None


def download(repo_id: str = DEFAULT_REPO, local_dir: str = "MiMo-V2-Flash", revision: str | None = None,
             layers=None, experts=None, offline: bool | None = None, log=print) -> list[str]:
    """Fetch the files a run needs into `local_dir` (or check them offline); returns the shards.

    offline: never touch the network (default: the HF_HUB_OFFLINE setting); `local_dir` must then
    already hold config, index and the needed shards.
    """
    local_dir = os.fspath(local_dir)
    offline = hf_constants.HF_HUB_OFFLINE if offline is None else offline
    if not offline:
        check_hub_reachable()
        with hub_errors(repo_id):
            for name in METADATA_FILES:
                hf_hub_download(repo_id, name, revision=revision, local_dir=local_dir)
    config = MiMoV2FlashConfig.from_json(local_dir)
    shards = needed_shards(config, read_index(local_dir), layers, experts)
    size = _local_size(local_dir, shards) if offline else _hub_size(repo_id, revision, shards)
    where = f"local files in {local_dir}" if offline else f"{repo_id}@{revision or 'main'}"
    log(f"{len(shards)} shard(s), {size / 1e9:.2f} GB ({where})")
    if experts is not None:
        log(f"expert subset of {len(experts)} experts: all {config.n_routed_experts} experts of a layer "
            "share one shard pair (model_{i}_linear_fc1/fc2), so those shards are downloaded whole")
    if not offline:
        with hub_errors(repo_id):
            snapshot_download(repo_id, revision=revision, local_dir=local_dir,
                              allow_patterns=allow_patterns(shards))
    return shards


def copy_tokenizer_files(source_dir: str, target_dir: str) -> list[str]:
    """The tokenizer files present in `source_dir`, copied beside the prepared weights so that the
    prepared directory alone serves `--prompt` text."""
    copied = []
    for name in TOKENIZER_FILES:
        source = os.path.join(source_dir, name)
        if os.path.isfile(source):
            shutil.copyfile(source, os.path.join(target_dir, name))
            copied.append(name)
    return copied


def add_download_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `run_example.py --mode download` (and the prepare-weights CLI's download)."""
    g = parser.add_argument_group("download / prepare weights")
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
    g.add_argument("--weight-dtype", choices=["bf16", "fp8"], default="bf16",
                   help="weight storage: per-rank file dtype in download mode, and how --backend nki "
                        "keeps the Hub's FP8 projections (fp8 = Trainium e4m3, +-240, 128x128 blocks)")
    g.add_argument("--replicated", choices=REPLICATED_LAYOUTS, default=SHARED,
                   help="shared: one replicated file + an experts file per rank; per-rank: "
                        "self-contained rank files")


def run_download_mode(args) -> int:
    """`run_example.py --mode download`: fetch, prepare, load, generate a few tokens."""
    num_layers = None
    if os.path.isfile(os.path.join(args.local_dir, "config.json")):
        num_layers = MiMoV2FlashConfig.from_json(args.local_dir).num_hidden_layers
    layers = parse_layer_range(args.layers, num_layers) if args.layers else \
        (list(range(args.num_layers)) if args.num_layers else None)
    experts = parse_expert_list(args.expert_subset) if args.expert_subset else None
    placement = read_json(args.placement, PrepareError, "placement table", expect=None) if args.placement else None
    download(args.repo_id, args.local_dir, args.revision, layers, experts, args.offline or None)
    result = convert(args.local_dir, args.output_dir, args.world_size, placement, experts, layers,
                     args.weight_dtype, replicated=args.replicated)
    print(f"prepared {args.output_dir}: wrote {result.written}, resumed {result.skipped}, "
          f"{result.bytes_written / 1e6:.1f} MB in {result.seconds:.1f} s")
    copied = copy_tokenizer_files(args.local_dir, args.output_dir)
    if copied:
        print(f"tokenizer: {', '.join(copied)} -> {args.output_dir} (text: run_example.py --mode generate "
              f"--weights {args.output_dir} --prompt \"...\")")
    model = MiMoV2FlashModel.from_pretrained(args.output_dir)
    config = model.config
    prompt = np.random.default_rng(args.seed).integers(0, config.vocab_size, (args.batch, args.seq_len))
    tokens, timing = model.generate(prompt, max_new_tokens=args.max_new_tokens,
                                    temperature=args.temperature, seed=args.seed, return_timing=True)
    print(f"model: {config.summary()}")
    print(f"prefill {timing['prefill_s']:.3f} s, decode {timing['decode_s']:.3f} s")
    for b, row in enumerate(tokens[:, args.seq_len:]):
        print(f"generated[{b}]  {' '.join(map(str, row))}")
    return 0
