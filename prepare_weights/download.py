"""Download only what a run needs from the Hub (prepare-weights --download, and the first step of
`run_example.py --mode download`, which then prepares per-rank files and generates from them).

What is fetched (`allow_patterns` for `huggingface_hub.snapshot_download`): `config.json`, the
index, tokenizer files, and the shards holding the requested layers' tensors plus
`model_embedding` / `model_final`. An expert subset does not shrink the download: all 256
experts of a layer share one shard pair (`model_{i}_linear_fc1/fc2.safetensors`), so those
shards come whole. The size is printed before anything large is fetched: from the Hub's file
metadata when online, from the local files when offline.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import urllib.parse

from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import HfHubHTTPError

from mimo_v2_flash.checkpoint import INDEX_FILE, read_index
from mimo_v2_flash.config import MiMoV2FlashConfig
from mimo_v2_flash.weights import model_tensors

from .manifest import PrepareError, source_shards

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
