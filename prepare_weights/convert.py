"""Hub checkpoint -> safetensors files for the expert-parallel ranks, streamed tensor by tensor.

Each rank needs its routed experts (per the placement; 256 / world size each by default) plus
every replicated tensor (embedding, attention, norms, routers, dense MLP, lm_head). Two layouts
(`replicated`), each converting every source tensor exactly once:

* `shared` (default): one `replicated.safetensors` for all ranks plus one experts-only file per
  rank (`experts-RRRRR-of-WWWWW.safetensors`).
* `per-rank`: one self-contained file per rank (`rank-RRRRR-of-WWWWW.safetensors`), for hosts
  that receive only their own file. Rank 0's file is converted; the other ranks' replicated
  tensors are copied byte for byte from it (streamed, hashed), never converted again.

Tensors are in the layout the kernels read: every projection transposed to [in, out] under
`weights.kernel_name` (`<hub name>_t`), everything else as on the Hub. Output dtype:

* `bf16` (default): projections, norms, sinks and embeddings BF16; router weight and correction
  bias F32 (routing runs in fp32).
* `fp8`: the tensors that are FP8 on the Hub (q/k/v, dense MLP, experts) requantised to
  Trainium's e4m3 (+-240) with fresh 128x128 block scales `<name>_t_scale_inv`
  [ceil(in/128), ceil(out/128)] (a multiplier); the rest as for bf16.

Memory: one tensor at a time. The source is memory-mapped and dequantised in chunks of whole
128-row blocks, written into one output-layout array, and streamed to the file; peak memory is
about the output tensor plus the source tensor's mapped pages plus a chunk (docs/weights.md).
A copied tensor streams through one 16 MiB buffer. Every input problem is found from the headers
before the output directory is touched.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np

from mimo_v2_flash import fp8
from mimo_v2_flash.checkpoint import (MANIFEST_FILE, REPLICATED_FILE, CheckpointError, HubCheckpoint,
                                      expert_file_name, rank_file_name, stored_mtp_tensors)
from mimo_v2_flash.fileguard import DirectoryLock, create_new, refuse_symlinks
from mimo_v2_flash.placement import ExpertPlacement, PlacementError
from mimo_v2_flash.progress import progress_bar
from mimo_v2_flash.safetensors_io import SafetensorsError, SafetensorsFile, SafetensorsWriter, TensorEntry
from mimo_v2_flash.weights import HUB_F32, HUB_FP8, TensorSpec, is_projection, kernel_name, model_tensors, scale_name

from . import manifest as manifest_io
from .manifest import PrepareError

OUTPUT_DTYPES = ("bf16", "fp8")
SHARED, PER_RANK = "shared", "per-rank"
REPLICATED_LAYOUTS = (SHARED, PER_RANK)
CHUNK_ROWS = 256     # source rows dequantised at once: whole 128-row blocks, and short enough
                     # that the transposed write into [in, out] stays cache-friendly


@dataclass
class FilePlan:
    """One output file. Tensors of the specs in `copied` are taken byte for byte from the file
    `copy_from` (written earlier in the same run, or verified by hash on resume); the rest are
    converted from the source."""
    name: str
    specs: list[TensorSpec]
    entries: list[TensorEntry]
    metadata: dict[str, str]
    copied: frozenset[TensorSpec] = frozenset()
    copy_from: str | None = None


@dataclass
class RankPlan:
    rank: int
    experts: list[int]
    files: list[str]      # the files that together hold this rank's tensors


@dataclass
class ConversionResult:
    manifest: dict
    written: list[str] = field(default_factory=list)     # files (re)written
    skipped: list[str] = field(default_factory=list)     # files resumed: present, hash matches
    bytes_written: int = 0
    seconds: float = 0.0


def output_entries(spec: TensorSpec, dtype: str) -> list[TensorEntry]:
    """The tensors one Hub tensor becomes in a rank file (weight, plus its scale for fp8)."""
    name = kernel_name(spec)
    shape = spec.shape[::-1] if is_projection(spec) else spec.shape
    if dtype == "fp8" and spec.hub_dtype == HUB_FP8:
        grid = (fp8.num_blocks(shape[0]), fp8.num_blocks(shape[1]))
        return [TensorEntry(name, "F8_E4M3", shape), TensorEntry(scale_name(name), "F32", grid)]
    return [TensorEntry(name, "F32" if spec.hub_dtype == HUB_F32 else "BF16", shape)]


def convert_tensor(checkpoint: HubCheckpoint, spec: TensorSpec, dtype: str) -> list[np.ndarray]:
    """Read, dequantise, transpose and (re)quantise one tensor; arrays in `output_entries` order."""
    entries = output_entries(spec, dtype)
    transpose = is_projection(spec)
    if entries[0].dtype == "F8_E4M3":
        q = np.empty(entries[0].shape, fp8.TRAINIUM_E4M3.dtype)             # [in, out]
        scale = np.empty(entries[1].shape, np.float32)                        # [in/128, out/128]
        for start, stop, rows in checkpoint.iter_rows(spec, CHUNK_ROWS):     # rows [r, in]
            try:
                q_rows, s_rows = fp8.quantize_blocks(rows, fp8.TRAINIUM_E4M3)
            except fp8.Fp8RangeError as err:
                raise PrepareError(f"{spec.name} rows {start}..{stop}: {err}") from None
            q[:, start:stop] = q_rows.T
            scale[:, start // fp8.FP8_BLOCK: start // fp8.FP8_BLOCK + s_rows.shape[0]] = s_rows.T
        return [q, scale]
    out_dtype = np.float32 if entries[0].dtype == "F32" else ml_dtypes.bfloat16
    out = np.empty(entries[0].shape, out_dtype)
    for start, stop, rows in checkpoint.iter_rows(spec, CHUNK_ROWS):
        if transpose:
            out[:, start:stop] = rows.astype(out_dtype).T
        else:
            out[start:stop] = rows.astype(out_dtype)
    return [out]


def parse_layer_range(text: str, num_layers: int | None = None) -> list[int]:
    """'A:B' (half-open, either end optional) or 'N' -> layer indices."""
    try:
        if ":" in text:
            start, stop = (part.strip() for part in text.split(":", 1))
            if not stop and num_layers is None:
                raise PrepareError(f"layer range {text!r} needs an end (the layer count is not known yet)")
            return list(range(int(start or 0), int(stop) if stop else num_layers))
        return [int(text)]
    except ValueError:
        raise PrepareError(f"layer range {text!r}: expected A:B or N with integers") from None


def parse_expert_list(text: str) -> list[int]:
    """'0-7,12,20-23' (inclusive ranges) -> sorted expert ids."""
    experts = set()
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            first, _, last = part.partition("-")
            experts.update(range(int(first), int(last or first) + 1))
    except ValueError:
        raise PrepareError(f"expert subset {text!r}: expected a list like 0-7,12") from None
    return sorted(experts)


@dataclass(frozen=True)
class ConvertOptions:
    """What `convert` produces; the prepare-weights flags of the same names build it.

    world_size: ranks of a contiguous placement (default 1), or None to take `placement`'s.
    placement: an explicit table (`ExpertPlacement.load` of a `--placement` file).
    expert_subset / layers: routed experts and layer indices to keep (default all).
    dtype: `bf16` or `fp8` (`--weight-dtype`). replicated: SHARED (one replicated file for all
    ranks + experts-only files) or PER_RANK (self-contained rank files). hash_sources: record and
    compare each source shard's sha256 on resume, not only its size and modification time.
    """
    world_size: int | None = None
    placement: ExpertPlacement | None = None
    expert_subset: tuple[int, ...] | None = None
    layers: tuple[int, ...] | None = None
    dtype: str = "bf16"
    replicated: str = SHARED
    hash_sources: bool = False

    def __post_init__(self):
        if self.dtype not in OUTPUT_DTYPES:
            raise PrepareError(f"output dtype must be one of {OUTPUT_DTYPES}, got {self.dtype!r}")
        if self.replicated not in REPLICATED_LAYOUTS:
            raise PrepareError(f"replicated layout must be one of {REPLICATED_LAYOUTS}, got {self.replicated!r}")
        if self.world_size is not None and (isinstance(self.world_size, bool) or not isinstance(self.world_size, int)
                                            or self.world_size < 1):
            raise PrepareError(f"world_size must be an integer >= 1, got {self.world_size!r}")
        if self.placement is not None and self.world_size not in (None, self.placement.world_size):
            raise PrepareError(f"world_size is {self.world_size}, the placement table is for "
                               f"{self.placement.world_size} ranks")
        for name in ("expert_subset", "layers"):     # any iterable of ints -> sorted, unique
            value = getattr(self, name)
            if value is not None:
                try:
                    object.__setattr__(self, name, tuple(sorted({int(v) for v in value})))
                except (TypeError, ValueError):
                    raise PrepareError(f"{name} must be integers, got {value!r:.80}") from None

    def resolve_placement(self, num_experts: int) -> ExpertPlacement:
        """The explicit placement (which must cover `num_experts`), else contiguous."""
        try:
            if self.placement is None:
                return ExpertPlacement.contiguous(num_experts, self.world_size or 1)
        except PlacementError as err:
            raise PrepareError(f"expert placement: {err}") from None
        if self.placement.num_experts != num_experts:
            raise PrepareError(f"expert placement: the placement table has {self.placement.num_experts} "
                               f"experts, the checkpoint has {num_experts}")
        return self.placement


def plan_files(config, placement: ExpertPlacement, layers: list[int], experts: list[int] | None,
               dtype: str, replicated: str, mtp_specs=()) -> tuple[list[FilePlan], list[RankPlan]]:
    """The output files in write order, and which of them each rank reads (`mtp_specs`: the MTP
    layers' tensors, replicated like the attention weights)."""
    world = placement.world_size
    replicated_specs = model_tensors(config, layers, experts=[]) + list(mtp_specs)
    shared_specs = frozenset(replicated_specs)

    def file_plan(name, specs, metadata, **copy):
        entries = [e for spec in specs for e in output_entries(spec, dtype)]
        return FilePlan(name, specs, entries, metadata, **copy)

    files, ranks = [], []
    if replicated == SHARED:
        files.append(file_plan(REPLICATED_FILE, replicated_specs,
                               manifest_io.file_metadata(dtype, "replicated")))
    for rank in range(world):
        owned = placement.experts_of(rank)
        owned = owned if experts is None else [e for e in owned if e in set(experts)]
        specs = model_tensors(config, layers, experts=owned) + list(mtp_specs)   # replicated and expert tensors interleaved
        if replicated == SHARED:
            name = expert_file_name(rank, world)
            files.append(file_plan(name, [s for s in specs if s not in shared_specs],
                                   manifest_io.file_metadata(dtype, "experts", rank, world)))
            ranks.append(RankPlan(rank, owned, [REPLICATED_FILE, name]))
        else:
            name = rank_file_name(rank, world)
            copy = {} if rank == 0 else {"copied": shared_specs, "copy_from": files[0].name}
            metadata = manifest_io.file_metadata(dtype, "replicated+experts", rank, world)
            files.append(file_plan(name, specs, metadata, **copy))
            ranks.append(RankPlan(rank, owned, [name]))
    return files, ranks


def check_output_dir(source: str, output: str) -> None:
    """Create the directory and prove it writable, or raise naming it. OUTPUT may not be SOURCE,
    nor hold symlinks (a planted link would redirect a write outside it)."""
    if os.path.exists(output) and os.path.samefile(source, output):
        raise PrepareError(f"{output}: the output directory is the source checkpoint; choose another")
    try:
        os.makedirs(output, exist_ok=True)
    except OSError as err:
        raise PrepareError(f"{output}: output directory is not writable (cannot create it: "
                           f"{err.strerror or err})") from None
    if not os.path.isdir(output):
        raise PrepareError(f"{output}: exists and is not a directory")
    refuse_symlinks(output, PrepareError)
    probe = os.path.join(output, ".write-probe.partial")
    try:
        with create_new(probe, PrepareError) as f:
            f.write(b"ok")
        os.remove(probe)
    except OSError as err:
        raise PrepareError(f"{output}: output directory is not writable ({err.strerror or err})") from None


def convert(source, output, options: ConvertOptions | None = None, *, progress: bool = True, log=print,
            **settings) -> ConversionResult:
    """Convert the Hub checkpoint in `source` into the files of every rank in `output`.

    `options` (or its fields as keywords, e.g. `world_size=2, dtype="fp8"`): see ConvertOptions.
    An interrupted run resumes: files recorded in the manifest whose sha256 still matches are
    skipped, if the settings, the source index and every source shard read are unchanged (size
    and modification time; sha256 with `hash_sources`). A refusal found while converting (a
    non-finite weight, an FP8 range error) leaves OUTPUT as it was before the run.
    """
    t0 = time.perf_counter()
    if options is None:
        options = ConvertOptions(**settings)
    elif settings:
        raise TypeError(f"convert: give ConvertOptions or its fields ({sorted(settings)}), not both")
    source, output = os.fspath(source), os.fspath(output)
    dtype, replicated = options.dtype, options.replicated
    try:
        checkpoint = HubCheckpoint(source)
    except (CheckpointError, ValueError) as err:
        raise PrepareError(str(err)) from None
    config = checkpoint.config
    layers = list(range(config.num_hidden_layers)) if options.layers is None else list(options.layers)
    bad = [i for i in layers if not 0 <= i < config.num_hidden_layers]
    if bad or not layers:
        raise PrepareError(f"layer {bad[0] if bad else '(none)'} outside the checkpoint's layers "
                           f"0..{config.num_hidden_layers - 1}")
    expert_subset = None if options.expert_subset is None else list(options.expert_subset)
    if expert_subset is not None:
        bad = [e for e in expert_subset if not 0 <= e < config.n_routed_experts]
        if bad or not expert_subset:
            raise PrepareError(f"expert subset: expert {bad[0] if bad else '(none)'} outside "
                               f"0..{config.n_routed_experts - 1}")
    placement = options.resolve_placement(config.n_routed_experts)
    try:   # MTP layers (speculative decoding) go along with a whole model when the source has them
        mtp_specs = stored_mtp_tensors(checkpoint) if layers == list(range(config.num_hidden_layers)) else []
    except CheckpointError as err:
        raise PrepareError(str(err)) from None
    files, ranks = plan_files(config, placement, layers, expert_subset, dtype, replicated, mtp_specs)
    specs = model_tensors(config, layers, experts=expert_subset) + mtp_specs
    try:   # every needed header, shape, dtype and scale grid, before any output exists
        checkpoint.validate(specs)
        shards = manifest_io.shard_records(source, manifest_io.source_shards(checkpoint.weight_map, specs),
                                           options.hash_sources)
    except CheckpointError as err:
        raise PrepareError(str(err)) from None
    created = not os.path.exists(output)
    check_output_dir(source, output)
    with DirectoryLock(output, PrepareError, "prepare-weights"):
        try:
            return _convert_locked(checkpoint, source, output, placement, layers, expert_subset, dtype,
                                   replicated, files, ranks, shards, progress, log, t0)
        except RefusedWhileWriting as refusal:
            refusal.restore(output)
            message = str(refusal.__cause__)
    if created:
        os.rmdir(output)
    raise PrepareError(f"{message} (nothing was kept: {output} is as it was before this run)")


class RefusedWhileWriting(Exception):
    """Bad data found after writing started: `restore` puts OUTPUT back as it was."""

    def __init__(self, written: list[str], previous: dict | None):
        super().__init__("refused while writing")
        self.written, self.previous = written, previous

    def restore(self, output: str) -> None:
        for name in self.written:
            os.remove(os.path.join(output, name))
        if self.previous is None:
            os.remove(os.path.join(output, MANIFEST_FILE))
        else:
            manifest_io.write_manifest(output, self.previous)


def _convert_locked(checkpoint, source, output, placement, layers, expert_subset, dtype, replicated,
                    files, ranks, shards, progress, log, t0) -> ConversionResult:
    config = checkpoint.config
    manifest = manifest_io.new_manifest(source, config, placement, layers, expert_subset, dtype, replicated,
                                        [(f.name, f.entries, f.metadata) for f in files],
                                        [(r.rank, r.experts, r.files) for r in ranks], shards)
    previous = manifest_io.read_existing(output)
    if previous is not None:
        differs = manifest_io.plan_difference(previous, manifest)
        if differs:
            raise PrepareError(f"{output}: holds a conversion with different settings ({differs}); "
                               "use another output directory or delete this one")
    result = ConversionResult(manifest)
    for record in manifest["files"]:
        if previous is not None and manifest_io.file_matches(output, previous, record, progress):
            record.update(sha256=manifest_io.recorded_hash(previous, record["name"]))
            result.skipped.append(record["name"])
    manifest_io.write_manifest(output, manifest)
    if result.skipped:
        log(f"resuming: {len(result.skipped)} of {len(files)} files are complete and match their hashes")

    for plan, record in zip(files, manifest["files"]):
        if plan.name in result.skipped:
            continue
        copy_source = SafetensorsFile(os.path.join(output, plan.copy_from)) if plan.copy_from else None
        bar = progress_bar(total=record["size"], unit="B", unit_scale=True, unit_divisor=1024,
                           desc=plan.name, enabled=None if progress else False)
        try:
            with bar, SafetensorsWriter(os.path.join(output, plan.name), plan.entries, plan.metadata) as writer:
                for spec in plan.specs:
                    entries = output_entries(spec, dtype)
                    if spec in plan.copied:
                        for entry in entries:
                            writer.copy(copy_source, entry.name)
                            bar.update(entry.nbytes)
                        continue
                    for entry, array in zip(entries, convert_tensor(checkpoint, spec, dtype)):
                        writer.write(entry.name, array)
                        bar.update(array.nbytes)
                record["sha256"] = writer.finish()
        except (PrepareError, CheckpointError, SafetensorsError) as err:
            raise RefusedWhileWriting(result.written, previous) from err
        result.written.append(plan.name)
        result.bytes_written += record["size"]
        manifest_io.write_manifest(output, manifest)    # this file is now resumable
    manifest["complete"] = True
    manifest_io.write_manifest(output, manifest)
    result.seconds = time.perf_counter() - t0
    return result
