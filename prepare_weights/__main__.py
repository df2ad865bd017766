"""prepare-weights: Hub checkpoint -> per-rank weight files for the expert-parallel runtime.

    prepare-weights SOURCE OUTPUT [--world-size 4 | --placement table.json]
                    [--expert-subset 0-15] [--layers 0:4] [--weight-dtype bf16|fp8]
                    [--replicated shared|per-rank]
    prepare-weights --download [--repo-id ...] [--revision ...] [--offline] SOURCE [OUTPUT] [...]
    prepare-weights --verify OUTPUT

SOURCE is a Hub-layout directory (config.json, model.safetensors.index.json, shards). With
--download it is where the needed Hub files go first (only the shards of the requested layers).
OUTPUT receives manifest.json and, with --replicated shared (default), replicated.safetensors
(read by every rank) plus experts-RRRRR-of-WWWWW.safetensors per rank; with --replicated
per-rank, one self-contained rank-RRRRR-of-WWWWW.safetensors per rank. Rerunning on the same
OUTPUT resumes, skipping files whose sha256 matches the manifest. --verify re-hashes OUTPUT.
"""

from __future__ import annotations

import argparse
import sys

from mimo_v2_flash.checkpoint import CheckpointError
from mimo_v2_flash.config import ConfigError
from mimo_v2_flash.placement import ExpertPlacement, PlacementError
from mimo_v2_flash.safetensors_io import SafetensorsError

from .convert import (OUTPUT_DTYPES, REPLICATED_LAYOUTS, SHARED, ConvertOptions, PrepareError, convert,
                      parse_expert_list, parse_layer_range)
from .download import DEFAULT_REPO, download
from .manifest import verify


class DeprecatedAlias(argparse.Action):
    """An old flag name that still works: stores into the new flag's destination and warns."""

    def __init__(self, *args, replacement: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.replacement = replacement

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: warning: {option_string} is deprecated; use {self.replacement}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prepare-weights", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="*", metavar="SOURCE OUTPUT")
    p.add_argument("--verify", metavar="OUTPUT", help="re-hash a prepared directory against its manifest")
    p.add_argument("--download", action="store_true", help="fetch the needed Hub files into SOURCE first")
    p.add_argument("--repo-id", default=DEFAULT_REPO)
    p.add_argument("--revision")
    p.add_argument("--offline", action="store_true", help="with --download: no network, SOURCE must hold the files")
    p.add_argument("--world-size", type=int, help="ranks (default 1, or the placement table's)")
    p.add_argument("--placement", help="JSON placement table: rank_of list, expert lists per rank, "
                                       "or {\"world_size\", \"rank_of\"}")
    p.add_argument("--expert-subset", help="routed experts to keep, e.g. 0-15,40")
    p.add_argument("--layers", help="layer range A:B (half-open), e.g. 0:4")
    p.add_argument("--weight-dtype", choices=OUTPUT_DTYPES, default="bf16",
                   help="bf16 (default) or fp8 = Trainium e4m3 (+-240) with 128x128 block scales")
    p.add_argument("--dtype", dest="weight_dtype", choices=OUTPUT_DTYPES, action=DeprecatedAlias,
                   replacement="--weight-dtype", help="deprecated name of --weight-dtype")
    p.add_argument("--replicated", choices=REPLICATED_LAYOUTS, default=SHARED,
                   help="shared (default): one replicated file read by every rank + an experts file per "
                        "rank; per-rank: one self-contained file per rank (replicated tensors in each)")
    p.add_argument("--hash-sources", action="store_true",
                   help="record (and on resume compare) each source shard's sha256, not only its size "
                        "and modification time")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def convert_options(args) -> ConvertOptions:
    """The conversion the flags ask for; a bad placement file is refused here, before any download."""
    return ConvertOptions(
        world_size=args.world_size,
        placement=ExpertPlacement.load(args.placement, args.world_size) if args.placement else None,
        expert_subset=parse_expert_list(args.expert_subset) if args.expert_subset else None,
        layers=parse_layer_range(args.layers) if args.layers else None,
        dtype=args.weight_dtype, replicated=args.replicated, hash_sources=args.hash_sources)


def run(args) -> int:
    if args.verify:
        report = verify(args.verify, progress=not args.no_progress)
        for name, status in report:
            print(f"{name:<40} {status}")
        bad = [name for name, status in report if status != "ok"]
        print(f"{len(report) - len(bad)} ok, {len(bad)} failed")
        return 1 if bad else 0
    expected = "SOURCE [OUTPUT]" if args.download else "SOURCE OUTPUT"
    if not 1 <= len(args.paths) <= 2 or (not args.download and len(args.paths) != 2):
        raise PrepareError(f"expected {expected}, got {len(args.paths)} path(s)")
    options = convert_options(args)
    if args.download:
        download(args.repo_id, args.paths[0], args.revision, options.layers, options.expert_subset,
                 args.offline or None)
        if len(args.paths) == 1:
            return 0
    result = convert(args.paths[0], args.paths[1], options, progress=not args.no_progress)
    print(f"{args.paths[1]}: wrote {len(result.written)} file(s), resumed {len(result.skipped)}, "
          f"{result.bytes_written / 1e6:.1f} MB in {result.seconds:.1f} s")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (PrepareError, PlacementError, CheckpointError, ConfigError, SafetensorsError) as err:
        print(f"prepare-weights: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:      # e.g. a disk that fills up while writing
        print(f"prepare-weights: error: {err.filename or ''}: {err.strerror or err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prepare-weights: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
