"""Attention of new tokens against a KV cache, for ragged batches: decode (one new token per
sequence) and prefill on a history (several new tokens on top of cached keys), full layers
(every cached key) and sliding-window layers (the ring buffer of the window).

Device layout of the cache (what the kernel reads; the model's `LayerKVCache` arrays
`k [B, slots, Hkv, D]`, `v`, `pos [B, slots]` map onto it by a transpose and, for v, a row order):

    k_t   [B, P, T, S]     bf16  keys transposed, the Hkv x D rows in T partition tiles of P
                                 (`head_row_tiling`, `tiled_rows`: 4 x 192 -> 128 x 6; row h D + d
                                 at [p, t] with t P + p = h D + d), keys contiguous: one DMA brings
                                 a key chunk of all KV heads on all 16 DMA engines, and a partition's
                                 tiles of a short cache (the SWA ring) are one run
    v     [B, S, Hkv, Dv]  bf16  values, keys on partitions when loaded; row `value_rows(slot, S)`:
                                 each block of 2048 slots stores its 128-key tiles transposed, so a
                                 chunk's V load gives every partition its keys of all KV heads as one
                                 contiguous run (16 keys x 4 heads x 256 B = 16 KiB for a full chunk)
    kpos  [B, S]           fp32  absolute position of every key slot; EMPTY_POSITION (2^30) for
                                 empty or padding slots, which the causal test then masks

Keys may sit in any order (a ring buffer): masks come from positions at run time. New keys are
written into the cache (or appended to the history) before the kernel runs, so a query sees
exactly the keys with `q_pos - window < k_pos <= q_pos`.

Rows. Like the prefill kernel, a score tile holds up to 128 rows of (token, query head) of one
sequence; here a tile also packs several KV heads and several short sequences ("pieces": one
sequence and KV head each), so a decode tile of full attention holds 2 sequences x 4 KV heads x 16
heads. Each piece has its own keys: its QK matmul uses a stationary Q^T that is zero outside the
piece's columns and accumulates into the shared score tile; its PV matmul is `O^T[dv, piece rows]
= V_piece^T P^T[:, piece rows]` (moving = the piece's P^T columns). Pieces of one tile cover the
same key range (sequences of similar length are packed together). A packed tile that sees all its
keys in one chunk (every SWA decode tile, full layers up to 2048 keys) keeps O^T: its denominators
come out of TensorE on every value partition too, `l[dv, rows] = ones^T P^T` (+ ones^T diag(exp(sink
- m)) with sinks), and one VectorE divide writes O^T / l where the output store reads it (the rows
of a launch leave as [Dv, rows]); l sums the same bf16 probabilities as the P V, so no rounding of
a normalized P (which would make the max's probability, 1, inexact). A tile spanning several
chunks transposes O^T back once per chunk for the online-softmax rescale.

Masks (only over the key ranges the host plan flags: keys newer than some query or padding, and
keys outside some query's window): the 0/1 indicator [tokens, keys] = (k_pos > q_pos) and/or
(k_pos <= q_pos - W) is computed on GpSimd or VectorE from the positions over those columns only,
and added as MASK_BIAS through the one-hot matmul of the prefill kernel.

Batches. The single-chunk tiles of a split unit go through the softmax in batches (the prefill
kernel's `tile_batches`: same lead, constant tile step, PSUM budget), so the row max, the [rows, n]
bookkeeping, the P^T evictions and the final 1/l scaling are one instruction per batch. A batch
shares its widest logit range; a tile's columns past its own keys get MASK_BIAS through the same
one-hot matmul with an all-ones indicator, and its exp() and P V skip them. The softmax machinery
is shared with the prefill kernel (`flash.py`); the plan is built on the host (`plan.py`).

Schedule. Decode is bound by the K / V stream (every DMA over 128 partitions holds all 16 DMA
engines, 1.3 us setup included), so the kernel is written for the cost model's in-order engines
(an instruction starts when its engine is free and its inputs are written): the key chunks of a
core's unit groups form a software pipeline (`decode_pipeline`). The next chunk's K^T loads before
this chunk's V, its scores and softmax (which need K^T only) go to the engines before the previous
chunk's P V (which needs V), the next batch's QK before this batch's softmax when PSUM holds both
score tiles, and a group's store after the next chunk's loads, so no DMA waits for compute in
front of the stream and TensorE / VectorE / ScalarE work while V arrives. Consecutive packed
groups share one Q^T load and one store (the core's last group stores alone: the pipeline's tail
after the last V is that group's P V and a short store). Groups too large to keep two chunks in
SBUF (long prefills on a history) run their chunks one after the other.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from mimo_kernels.backend import nki, nl, nisa
from mimo_kernels.launch import RESIDENT, device, launch, on_device, to_device
from mimo_kernels.linear import EngineRotation
from mimo_kernels.checks import KernelInputError
from .flash import (BANK_FP32, CHUNK_KEYS, P_MAX, EvictEngines, RowState, RowTile, Share, TileBatch, mask_matmuls,
                    pv_matmuls, qk_matmuls, score_tile, slot_width, softmax_transposed, store_rows, tile_batches,
                    update_output)
from .host import BF16, check_attention_shapes, scaled_rows_t
from .plan import (DecodePlan, head_row_tiling, key_chunks, limit_keys, output_rows, plan_decode_units,
                   plan_tensors, static_output_rows, static_plan_tensors, tiled_rows, typed_units, value_rows)

EMPTY_POSITION = float(2 ** 30)      # key slot holding no key: later than every query
EVICT_VECTOR_SHARE = 0.2
MASK_VECTOR_SHARE = {"full": 0.0, "swa": 0.6}   # mask indicators on VectorE (GpSimd the rest)
# share of P^T blocks of split tiles transposed by SBUF -> SBUF DMA (packed decode tiles: none;
# the DMA queues carry their K / V)
SPLIT_DMA_TRANSPOSE_SHARE = {"full": 0.3, "swa": 0.0}
GROUP_SBUF_BYTES = 96 * 1024     # per partition: Q^T, K^T and V chunks of units sharing their DMAs
# PSUM banks for two batches' score tiles at once (the next one's QK before this one's softmax),
# next to the P^T blocks (2 banks) and the P V outputs (2)
SKEW_SCORE_BANKS = 4
QUERY_BLOCK_BYTES = 16 * 1024    # per partition: Q^T of consecutive groups loaded in one DMA
STORE_BATCH_BYTES = 16 * 1024    # per partition: rows of consecutive groups stored in one DMA
PIPELINE_SBUF_BYTES = 160 * 1024  # per partition: at most `pipeline_bytes` for a pipelined group


# --------------------------------------------------------------------------- the kernel

@nki.jit
def attention_decode_kernel(q_t, k_t, v, kpos, qpos, tile_onehot, sink_rows, plan, window,
                            evict_vector_share=EVICT_VECTOR_SHARE, mask_vector_share=None,
                            split_dma_transpose_share=None):
    """New tokens of a ragged batch against their sequences' cached keys.

    q_t         [P, B, T, Tq*G]   bf16  Q * softmax scale, transposed per KV head, in the row tiles
                                        of K^T (`tiled_rows`) and partition-major (a group's queries
                                        are one run per partition): column t*G + i = new token t,
                                        query head g*G + i of sequence b.
    k_t         [B, P, T, S]      bf16  cache keys transposed (module docstring).
    v           [B, S, Hkv, Dv]   bf16  cache values, rows in `value_rows` order.
    kpos        [B, S]            fp32  key positions (EMPTY_POSITION for empty slots).
    qpos        [B, Tq]           fp32  positions of the new tokens.
    tile_onehot [tiles, NT, 128]  bf16  MASK_BIAS where a tile row belongs to tile token t.
    sink_rows   [tiles, 128, 1]   fp32  or None: each tile row's sink logit.
    plan        (group, units) from `plan_decode_units` (`plan.py`): units `PlanUnit(runs, tiles)`.
                A unit shares its Q, K, V and position loads between its row tiles, and
                consecutive packed units of the same shape share their Q, K, V and output DMAs
                (`unit_groups`). A Run is sequences first_seq .. first_seq + seqs - 1, KV heads
                [kv_start, kv_end), new tokens [token_start, token_end), rows ordered (sequence,
                KV head, token, query head). Either one tile holds all the runs' rows (short
                sequences packed), or the unit has one run of one sequence and KV head and its
                tiles split the tokens. A PlanTile: its rows, tokens [token_start, token_end) of
                the unit's run (all of them when packed), cache keys [key_start, key_end) (the
                others are invisible to its queries), masks[c] the KeyMasks of the unit's key chunk
                c (`key_chunks` of the unit's key range) that need the position mask (from
                `mask_regions`; empty: no mask). Plain nested tuples are accepted (`typed_units`).
    window      int or None             keys a query sees, itself included.
    mask_vector_share                   share of the mask indicators computed on VectorE, GpSimd
                                        the rest (None: MASK_VECTOR_SHARE of the layer type).
    split_dma_transpose_share           share of the split tiles' P^T blocks transposed by DMA
                                        (None: SPLIT_DMA_TRANSPOSE_SHARE of the layer type).
    Returns     [sum of tile rows, Dv] bf16: the tiles' rows, in plan order; transposed, [Dv, rows],
                when the plan has several tiles or its tile's P V gives O^T (`transposed_rows`:
                consecutive groups' rows then leave in one DMA with one run per value dim).

    The Hkv x D contraction rows are in the partition tiles of `head_row_tiling` (TensorE time
    does not depend on the contraction rows), so Q^T and each K^T chunk arrive in one DMA. LNC=2
    splits the unit groups between the two cores.
    """
    group, plain_units = plan
    units = typed_units(plain_units)
    check_decode_inputs(q_t, k_t, v, kpos, qpos, group)
    rows = sum([t.rows for unit in units for t in unit.tiles])
    out = nl.ndarray((v.shape[3], rows) if transposed_rows(units) else (rows, v.shape[3]), dtype=q_t.dtype,
                     buffer=nl.shared_hbm)
    setup = DecodeSetup(q_t, k_t, v, kpos, qpos, tile_onehot, sink_rows, out, group, units, window)
    setup.set_engines(evict_vector_share, mask_vector_share, split_dma_transpose_share)
    groups = unit_groups(units, setup.tiling, v.shape[3], nl.num_programs(0))
    decode_pipeline(setup, [UnitGroup(setup, u_first, n_units) for gi, (u_first, n_units) in enumerate(groups)
                            if gi % nl.num_programs(0) == nl.program_id(0)])
    return out


def check_decode_inputs(q_t, k_t, v, kpos, qpos, group: int) -> None:
    """KernelInputError naming the tensor unless the shapes fit the kernel."""
    parts, n_seqs, tiles, q_cols = q_t.shape
    s_max, kv_heads, dv = k_t.shape[3], v.shape[2], v.shape[3]
    rows = parts * tiles
    if not (rows % kv_heads == 0 and head_row_tiling(kv_heads, rows // kv_heads)[:2] == (parts, tiles)):
        raise KernelInputError(f"q_t {q_t.shape} must hold {kv_heads} KV heads (v {v.shape}) in the partition "
                               f"tiles of head_row_tiling")
    if not (k_t.shape[:3] == (n_seqs, parts, tiles)):
        raise KernelInputError(f"k_t {k_t.shape} must be [{n_seqs}, {parts}, {tiles}, S]")
    if not (v.shape[:2] == (n_seqs, s_max)):
        raise KernelInputError(f"v {v.shape} must be [{n_seqs}, {s_max}, Hkv, Dv]")
    if not (kpos.shape == (n_seqs, s_max)):
        raise KernelInputError(f"kpos {kpos.shape} must be [{n_seqs}, {s_max}]")
    if not (dv <= P_MAX):
        raise KernelInputError(f"V head dim {dv} exceeds {P_MAX} (V is a matmul stationary in packed tiles)")
    if not (q_cols % group == 0 and qpos.shape == (n_seqs, q_cols // group)):
        raise KernelInputError(
            f"qpos {qpos.shape} must be [{n_seqs}, {q_cols // group}] for q_t {q_t.shape} and G = {group}")


class DecodeSetup(nl.NKIObject):
    """What every unit group of a launch shares: the inputs and output, the plan, the head-dim split,
    the engine shares, and the SBUF constants set up once (zero-padded Q^T buffers per packed
    layout, -sink rows and mask one-hots per tile layout, the all-ones mask)."""

    def __init__(self, q_t, k_t, v, kpos, qpos, tile_onehot, sink_rows, out, group: int, units, window):
        self.q_t, self.k_t, self.v, self.kpos, self.qpos = q_t, k_t, v, kpos, qpos
        self.tile_onehot, self.sink_rows, self.out = tile_onehot, sink_rows, out
        self.group, self.units, self.window = group, units, window
        self.dv = v.shape[3]
        self.tiling = head_row_tiling(v.shape[2], q_t.shape[0] * q_t.shape[2] // v.shape[2])
        self.padded_q = {}       # (packed-tile layout, units) -> Q^T buffer zeroed outside each piece
        self.per_layout = {}     # (rows, tile layout) -> LayoutConstants, loaded once
        self.unit_row0, self.unit_tile0 = [0], [0]
        for unit in units:
            self.unit_row0.append(self.unit_row0[-1] + sum([t.rows for t in unit.tiles]))
            self.unit_tile0.append(self.unit_tile0[-1] + len(unit.tiles))

    def set_engines(self, evict_vector_share, mask_vector_share, split_dma_transpose_share):
        """Engine shares (None: the layer type's default) and the all-ones mask of a batch's columns
        past a tile's own keys."""
        kind = "full" if self.window is None else "swa"
        self.evict = EvictEngines(evict_vector_share)
        self.no_dma = Share(0.0)
        if split_dma_transpose_share is None:
            split_dma_transpose_share = SPLIT_DMA_TRANSPOSE_SHARE[kind]
        self.split_dma = Share(split_dma_transpose_share)
        if mask_vector_share is None:
            mask_vector_share = MASK_VECTOR_SHARE[kind]
        self.mask_vector = Share(mask_vector_share)
        self.memset_engines = [nisa.gpsimd_engine, nisa.vector_engine]     # memset: VectorE or GpSimd only
        self.q_copies = EngineRotation(self.memset_engines)
        self.columns = None      # ColumnConstants, made on first use
        self.ones = None
        if any([len(unit.tiles) > 1 for unit in self.units]):    # (batches of 2+ tiles are <= CHUNK_KEYS / 2 wide)
            self.ones = nl.ndarray((P_MAX, CHUNK_KEYS // 2), dtype=nl.bfloat16, buffer=nl.sbuf)
            nisa.memset(self.ones, 1.0, engine=nisa.gpsimd_engine)


class Piece(nl.NKIObject):
    """One sequence and KV head of a packed tile: run index, sequence and KV head within the run,
    first row in the tile, row count, and the sequence's index in the unit."""
    run: int
    seq: int
    kv: int
    row0: int
    rows: int
    slot: int = 0


class LayoutConstants(nl.NKIObject):
    """Per tile layout: the sink logits as loaded [1, rows] and their negated column [rows, 1] (made
    before the first softmax that needs it; both None without sinks), and the mask one-hot [tokens,
    rows] (None until a tile of the layout needs a mask)."""
    sink_row: object = None
    neg_sink: object = None
    onehot: object = None


class TileSetup(nl.NKIObject):
    """Per tile of a unit: its Q^T stationaries (per piece, per partition tile), its query positions
    column (for masks; None without) and its RowState when it spans several key chunks."""
    stationaries: list
    qpos_col: object = None
    state: RowState = None


class UnitGroup(nl.NKIObject):
    """Consecutive units sharing their Q, K, V and output DMAs (`unit_groups`): unit u of the group
    holds the sequences of the first unit's runs shifted by u * seqs."""

    def __init__(self, setup: DecodeSetup, first: int, count: int):
        self.first, self.count = first, count
        unit = setup.units[first]
        self.runs, self.tiles = unit.runs, unit.tiles
        self.seqs = sum([r.seqs for r in self.runs])
        self.rows = [run_rows(setup.tiling, r) for r in self.runs]
        run0 = self.runs[0]
        self.packed = packed_unit(unit)
        if self.packed:
            self.pieces = unit_pieces(self.runs, setup.group)
            if not (self.pieces[-1].row0 + self.pieces[-1].rows == self.tiles[0].rows):
                raise KernelInputError(f"unit {first}: runs give a different row count than {self.tiles[0].rows}")
            self.layout = (self.tiles[0].rows, tuple([(p.row0, p.rows) for p in self.pieces]),
                           tuple([(r.kv_start, r.kv_end) for r in self.runs]))
        else:            # one sequence and KV head: a single piece spanning the tile
            self.pieces = [Piece(0, 0, 0, 0, self.tiles[0].rows)]
            self.layout = (self.tiles[0].rows, run0.kv_start)
        self.split_tokens = max([t.tokens for t in self.tiles])
        self.chunks = key_chunks(min([t.key_start for t in self.tiles]), max([t.key_end for t in self.tiles]))
        self.columns = output_columns(unit)
        self.pipelined = pipeline_bytes(setup, self) <= PIPELINE_SBUF_BYTES
        self.q_buf = None
        self.q_runs = []         # a packed group's Q^T as loaded, per run, until copied into q_buf
        self.tile_setup = []     # per unit: [TileSetup]
        self.result = None       # bf16 SBUF: the group's output rows, [rows, tiles, Dv], or its slice
                                 # [Dv, tiles, rows] of its StoreBatch's buffer when `columns`
        self.q_block, self.q_seq0 = None, 0          # its Q^T load, shared (`share_dma`)
        self.store, self.store_tile0 = None, 0       # its store, shared (`share_dma`)

    def unit_sequences(self, u: int):
        """(sequence, run) of unit u of the group, in row order."""
        return [(self.runs[ri].first_seq + u * self.seqs + i, self.runs[ri])
                for ri in range(len(self.runs)) for i in range(self.runs[ri].seqs)]


def pipeline_bytes(setup: DecodeSetup, grp: UnitGroup) -> int:
    """Per partition, about what pipelining a group's steps keeps in SBUF at once (`decode_pipeline`):
    the K^T chunks of two steps, a V chunk, and two groups' queries, P^T of a chunk and rows."""
    keys = max([c1 - c0 for c0, c1 in grp.chunks])
    key_tiles = (keys + P_MAX - 1) // P_MAX
    tiles = grp.count * len(grp.tiles)
    chunk, queries = 0, 0
    for run, rows in zip(grp.runs, grp.rows):
        n_seq = grp.count * run.seqs
        chunk += n_seq * (2 * rows.tiles * keys + key_tiles * (run.kv_end - run.kv_start) * setup.dv)
        queries += rows.tiles * (grp.count * grp.seqs * grp.tiles[0].rows if grp.packed
                                 else (run.token_end - run.token_start) * setup.group)
    return 2 * (chunk + 2 * (queries + tiles * ((key_tiles + 1) * P_MAX + setup.dv)))


def packed_unit(unit) -> bool:
    """Whether a plan unit is one tile packing several sequences or KV heads (else one sequence and
    KV head, whose tiles split the tokens)."""
    run0 = unit.runs[0]
    return len(unit.tiles) == 1 and (len(unit.runs) > 1 or run0.seqs > 1 or run0.kv_end - run0.kv_start > 1)


def output_columns(unit) -> bool:
    """Whether a unit's P V gives its output as it is stored, O^T [Dv, rows] (`column_outputs`): a
    packed tile that sees all its keys in one chunk."""
    tile = unit.tiles[0]
    return packed_unit(unit) and len(key_chunks(tile.key_start, tile.key_end)) == 1


def unit_pieces(runs, group: int):
    """The pieces (Piece) of a packed tile's runs, in row order: sequence, then KV head."""
    pieces = []
    row, slot = 0, 0
    for ri, run in enumerate(runs):
        for seq in range(run.seqs):
            for kv in range(run.kv_end - run.kv_start):
                pieces.append(Piece(ri, seq, kv, row, (run.token_end - run.token_start) * group, slot + seq))
                row += (run.token_end - run.token_start) * group
        slot += run.seqs
    return pieces


class RunRows(NamedTuple):
    """The partition tiles [tile0, tile0 + tiles) of the row tiling holding a run's KV heads, and per
    KV head of the run its pieces ((tile - tile0, first partition, end partition), ...)."""
    tile0: int
    tiles: int
    pieces: tuple


def run_rows(tiling, run) -> RunRows:
    """The RunRows of a run's KV heads [kv_start, kv_end) in the launch's row tiling."""
    heads = tiling.pieces[run.kv_start:run.kv_end]
    tile0 = heads[0][0][0]
    return RunRows(tile0, heads[-1][-1][0] + 1 - tile0, tuple([tuple([(t - tile0, p0, p1) for t, p0, p1 in head])
                                                                for head in heads]))


class ChunkStep(nl.NKIObject):
    """One key chunk of a unit group, a step of `decode_pipeline`: its K^T and V parts (per run), the
    key positions of each unit (None: no mask in the chunk) and its batches (BatchWork) between their
    softmax and their P V."""

    def __init__(self, grp: UnitGroup, ci: int):
        self.grp, self.ci = grp, ci
        self.k_sb, self.v_sb, self.kpos_rows = None, None, []
        self.scored = []

    def last(self) -> bool:
        return self.ci == len(self.grp.chunks) - 1


class BatchWork(nl.NKIObject):
    """A TileBatch of unit u on its way through a step: its RowState, layout constants and per tile
    the end of its own logit columns; its scores in PSUM until the softmax takes them, then alpha
    (None on a first chunk) and P^T until its P V, then that product until the output update."""

    def __init__(self, u: int, batch: TileBatch, state: RowState, consts: LayoutConstants, ends, scores):
        self.u, self.batch, self.state, self.consts, self.ends = u, batch, state, consts, ends
        self.scores = scores
        self.alpha, self.probs_t = None, None
        self.sink_diag = None    # `sink_diagonal`, for `column_outputs`
        self.product = None      # its P V in PSUM until the output update

    def take_scores(self):
        """The scores, no longer held here (the softmax releases their PSUM before its transposes)."""
        scores, self.scores = self.scores, None
        return scores


def decode_pipeline(setup: DecodeSetup, groups) -> None:
    """The key chunks (ChunkStep) of the program's unit groups in program order, software-pipelined
    so that each engine has independent work queued while a chunk waits for its data. A pipelined
    group's step i (`UnitGroup.pipelined`: two steps' K^T fit next to its V and its rows):

        K^T(i + 1), scores and softmax(i), P V and output(i - 1), V(i), store(i - 1)

    The keys of the next chunk load before this chunk's values, so its scores and softmax (which
    need K^T only) run while V streams in, and the P V of a chunk waits on TensorE behind the next
    chunk's scores (they wait for K^T only); a group's store goes after the next step's loads (a
    store waiting for its rows would hold the DMA queues). V(i) goes after the P V of step i - 1,
    which frees its V chunk, except for split tiles, whose softmax transposes part of P^T by DMA
    (V(i) goes before, lest those wait in front of it). Other steps (large split units, which
    compute more than they load) run as they come: K^T and V, each batch's P V right after its
    softmax, the store."""
    share_dma(setup, groups)
    steps = [ChunkStep(grp, ci) for grp in groups for ci in range(len(grp.chunks))]
    pending = None           # the previous step: its P V (when pipelined) and its store are to come
    for i, step in enumerate(steps):
        if step.k_sb is None:
            load_step_keys(setup, step)
        if step.grp.pipelined:
            if i + 1 < len(steps) and steps[i + 1].grp.pipelined:
                load_step_keys(setup, steps[i + 1])
            early = not step.grp.packed      # split tiles: DMA transposes in the softmax would hold V
            if early:
                load_step_values(setup, step)
            score_step(setup, step)
            close_step(setup, pending, None if early else step)
            pending = step
        else:
            close_step(setup, pending, step)
            score_step(setup, step)
            close_step(setup, step, None)
            pending = None
    close_step(setup, pending, None)


def load_step_values(setup: DecodeSetup, step: ChunkStep) -> None:
    """HBM -> SBUF: a step's V chunk (`load_chunk_values`)."""
    step.v_sb = load_chunk_values(setup, step.grp, *step.grp.chunks[step.ci])


def close_step(setup: DecodeSetup, step: ChunkStep, loading: ChunkStep) -> None:
    """The step's P V and output update, then the V chunk of the step `loading` (None: none), then
    the step's store if it ends its group (releasing the group's row states)."""
    if step is not None:
        finish_step(setup, step)
    if loading is not None:
        load_step_values(setup, loading)
    if step is not None and step.last():
        store_group(setup, step.grp)
        step.grp.tile_setup = []


class QueryBlock(nl.NKIObject):
    """Q^T of consecutive packed groups of a program (`share_dma`): sequences [run.first_seq,
    run.first_seq + seqs) of the first group's run as [parts, sequences, tile, columns], from one DMA
    issued by the first group."""

    def __init__(self, run):
        self.run, self.seqs = run, 0
        self.q = None


class StoreBatch(nl.NKIObject):
    """Consecutive groups of a program whose rows leave in one store (`share_dma`): each transposes
    its tiles into result_t [Dv, tiles, rows] (allocated by the first), the last stores it from
    output column row0."""

    def __init__(self, row0: int):
        self.row0, self.tile_rows, self.last = row0, [], None
        self.result_t = None


def share_dma(setup: DecodeSetup, groups) -> None:
    """Which of the program's unit groups share their Q^T load (`query_block`) and their store
    (StoreBatch: groups whose rows follow each other, in full tiles of one height but for the
    batch's last, up to STORE_BATCH_BYTES per partition). The program's last group stores alone, so
    the store after the pipeline's last P V stays short."""
    prev = None
    for gi, grp in enumerate(groups):
        follows = prev is not None and prev.first + prev.count == grp.first
        grp.q_block = query_block(setup, prev.q_block if follows else None, grp)
        tile_rows = [t.rows for u in range(grp.count) for t in setup.units[grp.first + u].tiles]
        batch = prev.store if follows and gi < len(groups) - 1 else None
        if batch is not None:
            rows0 = batch.tile_rows[0]
            fits = (len(batch.tile_rows) + len(tile_rows)) * rows0 * 2 <= STORE_BATCH_BYTES
            if not (fits and all([r == rows0 for r in batch.tile_rows + tile_rows[0:-1]]) and tile_rows[-1] <= rows0):
                batch = None
        grp.store = StoreBatch(setup.unit_row0[grp.first]) if batch is None else batch
        grp.store_tile0 = len(grp.store.tile_rows)
        grp.store.tile_rows = grp.store.tile_rows + tile_rows
        grp.store.last = grp
        prev = grp


def query_block(setup: DecodeSetup, block, grp: UnitGroup):
    """The QueryBlock of a packed group of one run: the previous group's `block` when the group's
    sequences come right after the block's, with the same run shape, and the block stays within
    QUERY_BLOCK_BYTES per partition; else a new block (None for other groups)."""
    if not (grp.packed and len(grp.runs) == 1):
        return None
    run = grp.runs[0]
    seq_bytes = 2 * grp.rows[0].tiles * (run.token_end - run.token_start) * setup.group
    joins = block is not None and block.run._replace(first_seq=block.run.first_seq + block.seqs) == run and \
        (block.seqs + grp.count * run.seqs) * seq_bytes <= QUERY_BLOCK_BYTES
    if not joins:
        block = QueryBlock(run)
    grp.q_seq0 = block.seqs
    block.seqs += grp.count * run.seqs
    return block


def load_step_keys(setup: DecodeSetup, step: ChunkStep) -> None:
    """HBM -> SBUF: a step's K^T chunk and the key positions of its masked units; on a group's first
    chunk first its queries, per-tile setup and output buffer."""
    grp, ci = step.grp, step.ci
    if ci == 0:
        if grp.packed:
            load_packed_queries(setup, grp)
        else:
            load_split_queries(setup, grp)
        for u in range(grp.count):
            grp.tile_setup.append(setup_unit_tiles(setup, grp, u))
        if grp.columns:
            grp.result = store_buffer(setup, grp.store)[:, grp.store_tile0:grp.store_tile0 + grp.count, :]
        else:
            grp.result = nl.ndarray((max([t.rows for t in grp.tiles]), grp.count * len(grp.tiles), setup.dv),
                                    dtype=setup.out.dtype, buffer=nl.sbuf)
    c0, c1 = grp.chunks[ci]
    step.k_sb = load_chunk_keys(setup, grp, c0, c1)
    for u in range(grp.count):
        masked = any([t.masks[ci] for t in setup.units[grp.first + u].tiles])
        step.kpos_rows.append(load_key_positions(setup, grp, u, c0, c1) if masked else None)


def score_step(setup: DecodeSetup, step: ChunkStep) -> None:
    """Scores, online softmax and P^T of every batch of a step (`unit_batches`), and right after
    each softmax its P V and output update unless the group is pipelined (`finish_step` does them
    later). The next batch's QK goes to TensorE before this batch's softmax when both score tiles
    fit SKEW_SCORE_BANKS, so TensorE computes it while VectorE / ScalarE / GpSimd run the softmax;
    the K^T chunk is released after."""
    grp, ci = step.grp, step.ci
    if ci == 0 and grp.packed:
        copy_packed_queries(setup, grp)
    c0, c1 = grp.chunks[ci]
    waiting = None
    for u in range(grp.count):
        for batch in unit_batches(setup.units[grp.first + u].tiles, grp.tile_setup[u], c0, c1, setup.group,
                                  grp.packed):
            if waiting is not None and score_banks(waiting.batch) + score_banks(batch) > SKEW_SCORE_BANKS:
                settle_batch(setup, step, waiting)
                waiting = None
            scoring = score_batch(setup, step, u, batch)
            if waiting is not None:
                settle_batch(setup, step, waiting)
            waiting = scoring
    if waiting is not None:
        settle_batch(setup, step, waiting)
    step.k_sb, step.kpos_rows = None, []
    if step.last():         # the group's queries are done with
        grp.q_buf = None
        for unit_setup in grp.tile_setup:
            for tile_setup in unit_setup:
                tile_setup.stationaries, tile_setup.qpos_col = [], None


def settle_batch(setup: DecodeSetup, step: ChunkStep, work: BatchWork) -> None:
    """A scored batch's softmax; then its P V and output update at once unless its group is
    pipelined (then it waits in step.scored for `finish_step`)."""
    softmax_batch(setup, step.grp, work)
    if step.grp.pipelined:
        step.scored.append(work)
    else:
        update_batch(setup, step, work, batch_pv(setup, step, work))


def score_banks(batch: TileBatch) -> int:
    """PSUM banks of a batch's score tile (`score_tile`)."""
    return (batch.count * slot_width(batch.width) + BANK_FP32 - 1) // BANK_FP32


def finish_step(setup: DecodeSetup, step: ChunkStep) -> None:
    """P V and the output update of a step's scored batches, the next batch's P V going to TensorE
    before this one's output update (which waits for evictions); the V chunk is released after."""
    waiting = None
    for work in step.scored:
        product = batch_pv(setup, step, work)
        if waiting is not None:
            update_batch(setup, step, waiting, waiting.product)
        work.product = product
        waiting = work
    if waiting is not None:
        update_batch(setup, step, waiting, waiting.product)
    step.scored, step.v_sb = [], None


def store_group(setup: DecodeSetup, grp: UnitGroup) -> None:
    """SBUF -> HBM: the group's rows, transposed into its StoreBatch's buffer (unless they are there
    as columns already) and stored with it by the batch's last group (`store_columns`), or in rows
    when the plan has a single tile of rows (`store_rows`)."""
    tile_rows = [t.rows for u in range(grp.count) for t in setup.units[grp.first + u].tiles]
    if not transposed_rows(setup.units):
        store_rows(setup.out, setup.unit_row0[grp.first], grp.result, tile_rows)          # SBUF -> HBM
        grp.result = None
        return
    batch = grp.store
    if not grp.columns:
        tiles = slice(grp.store_tile0, grp.store_tile0 + len(tile_rows))
        transpose_rows(setup, grp.result, store_buffer(setup, batch)[:, tiles, :], tile_rows)
    grp.result = None
    if batch.last is grp:
        store_columns(setup, batch.row0, batch.result_t, batch.tile_rows)
        batch.result_t = None


def store_buffer(setup: DecodeSetup, batch: StoreBatch):
    """The StoreBatch's [Dv, tiles, rows] buffer, allocated by its first group that writes it."""
    if batch.result_t is None:
        batch.result_t = nl.ndarray((setup.dv, len(batch.tile_rows), batch.tile_rows[0]), dtype=setup.out.dtype,
                                    buffer=nl.sbuf)
    return batch.result_t


def transposed_rows(units) -> bool:
    """Whether the kernel returns its rows transposed: when the plan has several row tiles or its
    tile's P V gives columns (`output_columns`; a single tile of up to 128 rows otherwise stores as
    cheaply row by row, on as many DMA engines as rows)."""
    return sum([len(unit.tiles) for unit in units]) > 1 or output_columns(units[0])


def transpose_rows(setup: DecodeSetup, result, result_t, tile_rows) -> None:
    """SBUF [>= rows, tiles, Dv] -> SBUF [Dv, tiles, R]: the tiles (of `tile_rows` rows: R, but for
    a shorter last one) transposed on TensorE, evicted one PSUM bank at a time (stored as columns, a
    value dim's rows of a whole batch are one run, where a row-major store would write 256 B runs, one
    row of each tile per partition)."""
    dv, n, rows0 = result_t.shape
    full = sum([1 for rows in tile_rows if rows == rows0])
    per_bank = BANK_FP32 * 4 // (rows0 * 2)          # bf16 [Dv, R] blocks per PSUM bank
    for b0 in range(0, n, per_bank):
        b1 = min(n, b0 + per_bank)
        blocks = nl.ndarray((dv, b1 - b0, rows0), dtype=result.dtype, buffer=nl.psum)
        for j in range(b0, b1):
            nisa.nc_transpose(blocks[:, j - b0, 0:tile_rows[j]], result[0:tile_rows[j], j, :])
        whole = min(b1, full) - b0
        if whole > 0:
            setup.evict.copy(result_t[:, b0:b0 + whole, :], blocks[:, 0:whole, :])          # PSUM -> SBUF
        if b1 > full:
            setup.evict.copy(result_t[:, full, 0:tile_rows[full]], blocks[:, full - b0, 0:tile_rows[full]])


def store_columns(setup: DecodeSetup, row0: int, result_t, tile_rows) -> None:
    """SBUF [Dv, tiles, R] -> HBM out [Dv, rows] from column row0: one DMA for the full tiles, one for
    a ragged last tile."""
    rows0 = result_t.shape[2]
    full = sum([1 for rows in tile_rows if rows == rows0])
    if full:
        nisa.dma_copy(setup.out[:, row0:row0 + full * rows0], result_t[:, 0:full, :])     # SBUF -> HBM
    if full < len(tile_rows):
        start = row0 + full * rows0
        nisa.dma_copy(setup.out[:, start:start + tile_rows[full]], result_t[:, full, 0:tile_rows[full]])


def load_packed_queries(setup: DecodeSetup, grp: UnitGroup) -> None:
    """HBM -> SBUF: Q^T of the group's packed units, one DMA per run ([parts, sequence, tile,
    columns]: one run per partition), into grp.q_runs until `copy_packed_queries`; and the group's
    buffer zeroed outside each piece's columns (`padded_queries`), whose views are the stationaries:
    those of piece (sequence slot s, KV head h) of unit u are q_buf[p0:p1, t, u, s, :] for the head's
    pieces (t, p0, p1) (every partition of a tile holds one head's rows)."""
    rows = grp.rows[0]
    if not all([r == rows for r in grp.rows]):
        raise KernelInputError(f"unit {grp.first}: the runs of a packed tile must have the same KV heads")
    grp.q_buf = padded_queries(setup, grp)
    block = grp.q_block
    if block is not None:
        if block.q is None:
            block.q = load_query_run(setup, rows, block.run, block.seqs)
        grp.q_runs = [block.q[:, grp.q_seq0:grp.q_seq0 + grp.count * block.run.seqs]]
        if grp.q_seq0 + grp.count * block.run.seqs == block.seqs:
            block.q = None
        return
    grp.q_runs = [load_query_run(setup, rows, run, grp.count * run.seqs) for run in grp.runs]


def load_query_run(setup: DecodeSetup, rows: RunRows, run, n_seq: int):
    """HBM -> SBUF: Q^T [parts, sequence, tile, columns] of n_seq sequences from run.first_seq with
    the run's KV heads (the partition tiles `rows`) and tokens, one DMA."""
    n = (run.token_end - run.token_start) * setup.group
    q_run = nl.ndarray((setup.tiling.parts, n_seq, rows.tiles, n), dtype=setup.q_t.dtype, buffer=nl.sbuf)
    nisa.dma_copy(q_run, setup.q_t[:, run.first_seq:run.first_seq + n_seq, rows.tile0:rows.tile0 + rows.tiles,
                                   run.token_start * setup.group:run.token_end * setup.group])
    return q_run


def padded_queries(setup: DecodeSetup, grp: UnitGroup):
    """The zero-padded Q^T buffer [parts, tile, unit, sequence slot, rows] of the group's packed
    layout: two per layout, zeroed once each and taken in turns, so a group's copies never write the
    buffer the previous group's QK may still read."""
    key = (grp.layout, grp.count)
    if key not in setup.padded_q:
        setup.padded_q[key] = PaddedQueries()
    pair = setup.padded_q[key]
    if len(pair.buffers) < 2:
        buf = nl.ndarray((setup.tiling.parts, grp.rows[0].tiles, grp.count, grp.seqs, grp.tiles[0].rows),
                         dtype=setup.q_t.dtype, buffer=nl.sbuf)
        zeroing = EngineRotation(setup.memset_engines, len(setup.padded_q) + len(pair.buffers))
        for u in range(grp.count):
            nisa.memset(buf[:, :, u], 0.0, engine=zeroing.next())
        pair.buffers.append(buf)
    pair.turn += 1
    return pair.buffers[(pair.turn - 1) % 2]


class PaddedQueries(nl.NKIObject):
    """The (up to) two zero-padded Q^T buffers of a packed layout and how many groups took one."""

    def __init__(self):
        self.buffers = []
        self.turn = 0


def copy_packed_queries(setup: DecodeSetup, grp: UnitGroup) -> None:
    """SBUF -> SBUF: each piece's rows of the loaded Q^T into its columns of the padded buffer, one
    copy per KV head of a run and partition tile (on GpSimd and VectorE in turns)."""
    rows, rows0, n_units, n_seqs = grp.rows[0], grp.tiles[0].rows, grp.count, grp.seqs
    p = 0
    for run, q_run in zip(grp.runs, grp.q_runs):
        n = (run.token_end - run.token_start) * setup.group
        heads = run.kv_end - run.kv_start
        for h in range(heads):
            for t, p0, p1 in rows.pieces[h]:
                # piece (s, h) of unit u -> buf[p0:p1, t, u, slot + s, row0 + (s heads + h) n ...]
                dst = grp.q_buf[p0:p1, t].ap([[rows.tiles * n_units * n_seqs * rows0, p1 - p0],
                                              [n_seqs * rows0, n_units], [rows0 + heads * n, run.seqs], [1, n]],
                                             offset=grp.pieces[p].slot * rows0 + grp.pieces[p].row0 + h * n)
                nisa.tensor_copy(dst, q_run[p0:p1, :, t, :].reshape((p1 - p0, n_units, run.seqs, n)),
                                 engine=setup.q_copies.next())
        p += run.seqs * heads
    grp.q_runs = []


def load_split_queries(setup: DecodeSetup, grp: UnitGroup) -> None:
    """HBM -> SBUF: Q^T [parts, tile, tokens * G] of a split unit's sequence and KV head (the row
    tiles holding the head), one DMA."""
    run, rows = grp.runs[0], grp.rows[0]
    cols = (run.token_end - run.token_start) * setup.group
    q_unit = nl.ndarray((setup.tiling.parts, rows.tiles, cols), dtype=setup.q_t.dtype, buffer=nl.sbuf)
    nisa.dma_copy(q_unit, setup.q_t[:, run.first_seq, rows.tile0:rows.tile0 + rows.tiles,
                                    run.token_start * setup.group:run.token_end * setup.group])
    grp.q_buf = q_unit


def setup_unit_tiles(setup: DecodeSetup, grp: UnitGroup, u: int):
    """Per tile of unit u of the group: its stationaries, -sink rows, one-hot and query positions
    (for masks), and a RowState when it spans several key chunks. Returns [TileSetup]."""
    tiles = setup.units[grp.first + u].tiles
    qpos_cols = None
    if any([any(t.masks) for t in tiles]) and not grp.packed:
        qpos_cols = load_split_query_positions(setup, grp, tiles)
    unit_setup = []
    for j, tile in enumerate(tiles):
        load_layout_constants(setup, grp, tile, setup.unit_tile0[grp.first + u] + j, len(tiles) > 1)
        qpos_col = None
        if grp.packed:
            stationaries = [[grp.q_buf[p0:p1, t, u, piece.slot, :] for t, p0, p1 in grp.rows[0].pieces[piece.kv]]
                            for piece in grp.pieces]
            if any(tile.masks):
                qpos_col = load_packed_query_positions(setup, grp, u, tile)
        else:
            col0, col1 = tile.token_start * setup.group, tile.token_end * setup.group
            stationaries = [[grp.q_buf[p0:p1, t, col0:col1] for t, p0, p1 in grp.rows[0].pieces[0]]]
            if any(tile.masks):
                qpos_col = qpos_cols[0:tile.tokens, j:j + 1]
        n_chunks = sum([1 for c0, c1 in grp.chunks if max(c0, tile.key_start) < min(c1, tile.key_end)])
        unit_setup.append(TileSetup(stationaries, qpos_col, RowState(tile.rows, n_chunks) if n_chunks > 1 else None))
    return unit_setup


def load_layout_constants(setup: DecodeSetup, grp: UnitGroup, tile, tile_index: int, batched: bool) -> None:
    """HBM -> SBUF: the sink logits of the tile's layout on first sight (as one partition's row: a
    transfer on one DMA engine; `negated_sink` turns them into the -m start column), its mask one-hot
    once a tile of the layout needs masks (or shares batches with other tiles)."""
    key = (tile.rows, grp.layout)
    if key not in setup.per_layout:
        consts = LayoutConstants()
        if setup.sink_rows is not None:
            consts.sink_row = nl.ndarray((1, tile.rows), dtype=nl.float32, buffer=nl.sbuf)
            nisa.dma_copy(consts.sink_row, setup.sink_rows[tile_index, 0:tile.rows, :].reshape((1, tile.rows)))
        setup.per_layout[key] = consts
    consts = setup.per_layout[key]
    if (any(tile.masks) or batched) and consts.onehot is None:
        consts.onehot = nl.ndarray((tile.tokens, tile.rows), dtype=nl.bfloat16, buffer=nl.sbuf)
        nisa.dma_copy(consts.onehot, setup.tile_onehot[tile_index, 0:tile.tokens, 0:tile.rows])


def negated_sink(consts: LayoutConstants):
    """The layout's [rows, 1] fp32 column of negated sink logits (None without sinks): its loaded row
    transposed on TensorE and negated, before the first softmax that needs it."""
    if consts.sink_row is not None and consts.neg_sink is None:
        rows = consts.sink_row.shape[1]
        sink_t = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_transpose(sink_t, consts.sink_row)
        consts.neg_sink = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_scalar(consts.neg_sink, sink_t, nl.multiply, -1.0)
    return consts.neg_sink


def load_split_query_positions(setup: DecodeSetup, grp: UnitGroup, tiles):
    """HBM -> SBUF: query positions of a split unit's tokens as columns [tokens per tile, tile]."""
    run, per_tile = grp.runs[0], grp.split_tokens
    b, t0 = run.first_seq, run.token_start
    qpos_cols = nl.ndarray((per_tile, len(tiles)), dtype=nl.float32, buffer=nl.sbuf)
    full = sum([1 for t in tiles if t.tokens == per_tile])
    nisa.dma_copy(qpos_cols[:, 0:full], setup.qpos[b, t0:t0 + full * per_tile].reshape((full, per_tile))
                  .permute((1, 0)))
    if full < len(tiles):
        last = tiles[full]
        nisa.dma_copy(qpos_cols[0:last.tokens, full:full + 1],
                      setup.qpos[b:b + 1, t0 + last.token_start:t0 + last.token_end])
    return qpos_cols


def load_packed_query_positions(setup: DecodeSetup, grp: UnitGroup, u: int, tile):
    """HBM -> SBUF: query positions [tokens, 1] of a packed tile of unit u, one DMA per sequence."""
    qpos_col = nl.ndarray((tile.tokens, 1), dtype=nl.float32, buffer=nl.sbuf)
    tok = 0
    for s, run in grp.unit_sequences(u):
        n = run.token_end - run.token_start
        nisa.dma_copy(qpos_col[tok:tok + n, :], setup.qpos[s:s + 1, run.token_start:run.token_end])
        tok += n
    return qpos_col


def load_key_positions(setup: DecodeSetup, grp: UnitGroup, u: int, c0: int, c1: int):
    """HBM -> SBUF: key positions [c0, c1) of unit u's sequences, one row per new token of its tiles."""
    tokens = grp.tiles[0].token_end if grp.packed else grp.split_tokens
    kpos_rows = nl.ndarray((tokens, c1 - c0), dtype=nl.float32, buffer=nl.sbuf)
    tok = 0
    for s, run in grp.unit_sequences(u):
        n = (run.token_end - run.token_start) if grp.packed else grp.split_tokens
        nisa.dma_copy(kpos_rows[tok:tok + n, :], setup.kpos[s:s + 1, c0:c1].broadcast(0, n))
        tok += n
    return kpos_rows


def load_chunk_keys(setup: DecodeSetup, grp: UnitGroup, c0: int, c1: int):
    """HBM -> SBUF: per run, the key chunk [c0, c1) of K^T [parts, seq, tile, keys] (the row tiles
    holding its KV heads) for all the group's units, one DMA each. Returns the K^T parts."""
    k_sb = []
    for run, rows in zip(grp.runs, grp.rows):
        n_seq = grp.count * run.seqs
        k_part = nl.ndarray((setup.tiling.parts, n_seq, rows.tiles, c1 - c0), dtype=setup.k_t.dtype, buffer=nl.sbuf)
        src = setup.k_t[run.first_seq:run.first_seq + n_seq, :, rows.tile0:rows.tile0 + rows.tiles, c0:c1]
        nisa.dma_copy(k_part, src.permute((1, 0, 2, 3)))
        k_sb.append(k_part)
    return k_sb


def load_chunk_values(setup: DecodeSetup, grp: UnitGroup, c0: int, c1: int):
    """HBM -> SBUF: per run, the key chunk [c0, c1) of V [128, seq, key tile, kv, Dv] for all the
    group's units (`load_value_tiles`). Returns the V parts."""
    return [load_value_tiles(setup.v[run.first_seq:run.first_seq + grp.count * run.seqs, :, run.kv_start:run.kv_end],
                             c0, c1) for run in grp.runs]


def load_value_tiles(v_seqs, c0: int, c1: int):
    """HBM -> SBUF: the values of key slots [c0, c1) (a `key_chunks` chunk) of [seq, S, kv, Dv] rows
    in `value_rows` order as [128 keys, seq, key tile, kv, Dv], slot c0 + 128 j + p on partition p,
    tile j: the chunk's tiles inside its block's transposed ones in one DMA (partition p reads rows
    m p + j0 .. m p + j0 + n - 1, all KV heads, as one run), a part-filled last tile in a second."""
    n_seq, n_slots, heads, dv = v_seqs.shape
    base = c0 // CHUNK_KEYS * CHUNK_KEYS
    m = min(CHUNK_KEYS, n_slots - base) // P_MAX          # the block's transposed tiles
    j0, full = (c0 - base) // P_MAX, (c1 - c0) // P_MAX
    v_sb = nl.ndarray((P_MAX, n_seq, (c1 - c0 + P_MAX - 1) // P_MAX, heads, dv), dtype=v_seqs.dtype, buffer=nl.sbuf)
    block = v_seqs[:, base:base + m * P_MAX].reshape((n_seq, P_MAX, m, heads, dv))
    if full:
        nisa.dma_copy(v_sb[:, :, 0:full], block[:, :, j0:j0 + full].permute((1, 0, 2, 3, 4)))
    tail = (c1 - c0) - full * P_MAX
    if tail:
        j = j0 + full
        src = block[:, 0:tail, j] if j < m else v_seqs[:, base + j * P_MAX:base + j * P_MAX + tail]
        nisa.dma_copy(v_sb[0:tail, :, full], src.permute((1, 0, 2, 3)))
    return v_sb


def score_batch(setup: DecodeSetup, step: ChunkStep, u: int, batch: TileBatch) -> BatchWork:
    """A TileBatch of unit u against the step's key chunk, up to its scores in PSUM (`decode_scores`)."""
    grp, ci = step.grp, step.ci
    tiles = setup.units[grp.first + u].tiles
    c0, c1 = grp.chunks[ci]
    state = grp.tile_setup[u][batch.first].state
    if state is None:
        state = RowState(batch.rows, 1, batch.count)
    consts = setup.per_layout[(batch.rows, grp.layout)]
    ends = []           # end of each tile's own logit columns
    for j in batch.tiles():
        a, b = max(c0, tiles[j].key_start), min(c1, tiles[j].key_end)
        ends.append(b - a + batch.lead)
    scores = decode_scores(setup, grp, u, ci, batch, step.k_sb, step.kpos_rows[u], consts.onehot, ends)
    return BatchWork(u, batch, state, consts, ends, scores)


def softmax_batch(setup: DecodeSetup, grp: UnitGroup, work: BatchWork) -> BatchWork:
    """The online-softmax step and P^T of a scored batch (its score PSUM released before the
    transposes)."""
    neg_sink = negated_sink(work.consts)
    work.alpha, work.probs_t = softmax_transposed(work.take_scores(), work.batch, work.state, neg_sink, work.ends,
                                                  setup.evict, setup.no_dma if grp.packed else setup.split_dma)
    if grp.columns and neg_sink is not None:
        work.sink_diag = sink_diagonal(setup, work.state, neg_sink)
    return work


def sink_diagonal(setup: DecodeSetup, state: RowState, neg_sink):
    """diag(exp(sink - m)) [rows, rows] bf16: the sink's share of each row's denominator on the
    diagonal, for `column_outputs` (bf16 like the probabilities it joins)."""
    rows = state.rows
    sink_share = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.activation(sink_share, nl.exp, neg_sink, bias=state.neg_m, scale=-1.0)         # exp(sink - m)
    diag = nl.ndarray((rows, rows), dtype=nl.bfloat16, buffer=nl.sbuf)
    nisa.tensor_scalar(diag, column_constants(setup).identity[0:rows, 0:rows], nl.multiply, sink_share)
    return diag


def batch_pv(setup: DecodeSetup, step: ChunkStep, work: BatchWork):
    """P V of a softmaxed batch into PSUM: O^T [Dv, rows] of a packed tile (`packed_pv_t`), else O
    [rows, n, Dv]."""
    grp, u, batch = step.grp, work.u, work.batch
    c0, _ = grp.chunks[step.ci]
    if grp.columns:
        return column_outputs(setup, grp, u, work, step.v_sb, c0)
    if grp.packed:
        return packed_pv_t(setup, grp, u, batch, work.probs_t, step.v_sb, c0)
    tiles = setup.units[grp.first + u].tiles
    o_psum = nl.ndarray((batch.rows, batch.count, setup.dv), dtype=nl.float32, buffer=nl.psum)
    for i, j in enumerate(batch.tiles()):
        # key tiles past the tile's own columns hold only zeros: skipped
        v_tile0 = (max(c0, tiles[j].key_start) - batch.lead - c0) // P_MAX
        pv_matmuls(o_psum[:, i, :], work.probs_t[:, i], step.v_sb[0][:, u * grp.runs[0].seqs, :, 0, :], v_tile0,
                   work.ends[i])
    return o_psum


def update_batch(setup: DecodeSetup, step: ChunkStep, work: BatchWork, product) -> None:
    """The output update of a batch from its P V (`batch_pv`; a packed tile's O^T evicted and
    transposed back first), on the last chunk into the group's rows."""
    grp, u, batch = step.grp, work.u, work.batch
    if grp.columns:         # O^T / l straight into the group's columns
        denom = nl.ndarray((setup.dv, batch.rows), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_copy(denom, product[1], engine=nisa.scalar_engine)
        nisa.tensor_tensor(grp.result[:, u, 0:batch.rows], product[0], denom, nl.divide)
        work.probs_t, work.sink_diag, work.product = None, None, None
        return
    o_psum = product
    if grp.packed:
        o_t = nl.ndarray((setup.dv, batch.rows), dtype=nl.float32, buffer=nl.sbuf)
        setup.evict.copy(o_t, product)
        o_psum = nl.ndarray((batch.rows, 1, setup.dv), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_transpose(o_psum[:, 0, :], o_t)
    work.probs_t, work.product = None, None
    tiles = setup.units[grp.first + u].tiles
    update_output(work.state, o_psum, work.alpha, grp.result[0:batch.rows, batch.tile_slice(u * len(tiles)), :],
                  setup.evict)


def decode_scores(setup: DecodeSetup, grp: UnitGroup, u: int, ci: int, batch: TileBatch, k_sb, kpos_rows, onehot,
                  ends):
    """The batch's logits [rows, n, slot] in PSUM (columns start at a 128-aligned key so P^T tiles
    line up with V tiles): QK per piece, MASK_BIAS on the tile's masked key ranges (indicators from
    the positions) and on the batch's columns past the tile's own keys."""
    tiles = setup.units[grp.first + u].tiles
    c0, _ = grp.chunks[ci]
    lead, width = batch.lead, batch.width
    scores = score_tile(batch.rows, batch.count, width)
    for i, j in enumerate(batch.tiles()):
        tile, tile_setup = tiles[j], grp.tile_setup[u][j]
        a = max(c0, tile.key_start)
        for p, piece in enumerate(grp.pieces):
            seq = u * grp.runs[piece.run].seqs + piece.seq
            qk_matmuls(scores[:, i, :], tile_setup.stationaries[p],
                       [k_sb[piece.run][p0:p1, seq, t, :] for t, p0, p1 in grp.rows[piece.run].pieces[piece.kv]],
                       lead, width, a - c0, first=p == 0)
        for mask in tile.masks[ci]:
            engine = nisa.vector_engine if setup.mask_vector.take() else nisa.gpsimd_engine
            indicator = masked_indicator(kpos_rows[0:tile.tokens, mask.first - c0:mask.end - c0], tile_setup.qpos_col,
                                         mask.end - mask.first, mask.late, setup.window if mask.early else None,
                                         engine)
            mask_matmuls(scores[:, i, :], onehot, indicator, mask.first - a + lead, mask.end - a + lead)
        if ends[i] < width:
            # the batch's later columns: keys no query of this tile sees
            mask_matmuls(scores[:, i, :], onehot, setup.ones[0:tile.tokens, 0:width - ends[i]], ends[i], width)
    return scores


def column_outputs(setup: DecodeSetup, grp: UnitGroup, u: int, work: BatchWork, v_sb, c0: int):
    """A packed tile that sees all its keys in this chunk, computed as it is stored: O^T [Dv, rows]
    (`packed_pv_t`) and its denominators l on every partition, [Dv, rows] = ones^T P^T (+ ones^T
    diag(exp(sink - m))), both fp32 in PSUM; `update_batch` divides. l sums the bf16 probabilities
    the P V used, so each output is a convex combination of values (the max's probability, 1, stays
    exact, unlike a normalized P), and no transposes back to rows and forth to columns are needed.
    Returns (O^T, l)."""
    batch = work.batch
    o_t = packed_pv_t(setup, grp, u, batch, work.probs_t, v_sb, c0)
    ones = column_constants(setup).ones
    denom = nl.ndarray((setup.dv, batch.rows), dtype=nl.float32, buffer=nl.psum)
    n_kt = (batch.width + P_MAX - 1) // P_MAX
    for kt in range(n_kt):
        kw = min(P_MAX, batch.width - kt * P_MAX)
        nisa.nc_matmul(denom, ones[0:kw, 0:setup.dv], work.probs_t[0:kw, 0, kt, :], accumulate=kt > 0)
    if work.sink_diag is not None:
        nisa.nc_matmul(denom, ones[0:batch.rows, 0:setup.dv], work.sink_diag, accumulate=True)
    return o_t, denom


class ColumnConstants(nl.NKIObject):
    """SBUF constants of `column_outputs`: ones [128, 128] and the identity [128, 128], bf16."""

    def __init__(self):
        self.ones = nl.ndarray((P_MAX, P_MAX), dtype=nl.bfloat16, buffer=nl.sbuf)
        nisa.memset(self.ones, 1.0, engine=nisa.gpsimd_engine)
        self.identity = nl.ndarray((P_MAX, P_MAX), dtype=nl.bfloat16, buffer=nl.sbuf)
        nisa.affine_select(self.identity, [[-1, P_MAX]], 1, self.ones, 0.0)     # 1 where partition == column


def column_constants(setup: DecodeSetup) -> ColumnConstants:
    """The launch's ColumnConstants, made on first use."""
    if setup.columns is None:
        setup.columns = ColumnConstants()
    return setup.columns


def packed_pv_t(setup: DecodeSetup, grp: UnitGroup, u: int, batch: TileBatch, probs_t, v_sb, c0: int):
    """P V of a packed tile, transposed: O^T[dv, piece rows] = V_piece^T @ P^T[:, piece rows] per
    piece. Returns O^T [Dv, rows] fp32 in PSUM."""
    v_tile0 = (max(c0, setup.units[grp.first + u].tiles[0].key_start) - batch.lead - c0) // P_MAX
    n_kt = (batch.width + P_MAX - 1) // P_MAX
    o_t_psum = nl.ndarray((setup.dv, batch.rows), dtype=nl.float32, buffer=nl.psum)
    for piece in grp.pieces:
        seq = u * grp.runs[piece.run].seqs + piece.seq
        rows = slice(piece.row0, piece.row0 + piece.rows)
        for kt in range(n_kt):
            kw = min(P_MAX, batch.width - kt * P_MAX)
            nisa.nc_matmul(o_t_psum[:, rows], v_sb[piece.run][0:kw, seq, v_tile0 + kt, piece.kv, :],
                           probs_t[0:kw, 0, kt, rows], accumulate=kt > 0)
    return o_t_psum


def masked_indicator(kpos, qpos_col, width: int, late: bool, early_window, engine):
    """[tokens, width] bf16: 1.0 where key j is masked for token t: k > q (when `late`), or
    k <= q - window (when `early_window` is the window, else None).

    `kpos` [tokens, width] fp32 (each token's row of key positions), `qpos_col` [tokens, 1].
    On VectorE one tensor_scalar per test; GpSimd (whose tensor_scalar is rsqrt only) compares
    against the query column broadcast, shifted by the window first."""
    tokens = kpos.shape[0]
    tests = []
    if late:
        tests.append((nl.greater, 0.0))
    if early_window is not None:
        tests.append((nl.less_equal, -float(early_window)))
    parts = []
    for op, bound in tests:
        part = nl.ndarray((tokens, width), dtype=nl.bfloat16, buffer=nl.sbuf)
        if engine == nisa.vector_engine:
            nisa.tensor_scalar(part, kpos, nl.subtract, qpos_col, op1=op, operand1=bound)
        else:
            limit = qpos_col
            if bound != 0.0:
                limit = nl.ndarray((tokens, 1), dtype=nl.float32, buffer=nl.sbuf)
                nisa.tensor_scalar(limit, qpos_col, nl.add, bound)
            nisa.tensor_tensor(part, kpos, limit.broadcast(1, width), op, engine=engine)
        parts.append(part)
    if len(parts) == 1:
        return parts[0]
    both = nl.ndarray((tokens, width), dtype=nl.bfloat16, buffer=nl.sbuf)
    nisa.tensor_tensor(both, parts[0], parts[1], nl.add, engine=engine)
    return both


def unit_batches(tiles, setup, c0: int, c1: int, group: int, packed: bool):
    """A unit's row tiles that meet key chunk [c0, c1), in batches processed together: the
    prefill kernel's `tile_batches` over the split tiles (visible keys [key_start, key_end) in
    place of the prefill's [lo, q1)); a packed tile goes alone. Returns [TileBatch]."""
    if packed:
        tile = tiles[0]
        a, b = max(c0, tile.key_start), min(c1, tile.key_end)
        lead = (a - c0) % P_MAX
        return [TileBatch(0, 1, 1, lead, b - a + lead, tile.rows)] if a < b else []
    return tile_batches([RowTile(t.key_end - t.tokens, t.key_end, t.key_start, s.state) for t, s in zip(tiles, setup)],
                        c0, c1, group)


def unit_groups(units, tiling, dv: int, programs: int):
    """Consecutive units that share their Q^T, K^T, V and output DMAs: [(first unit, count)].

    A group's units are packed tiles of one run each, unit u + 1 holding the same tokens and KV
    heads of the sequences right after unit u's, with the same keys; a group holds at most
    ceil(units / programs) units (so LNC=2 still splits the work) and GROUP_SBUF_BYTES per
    partition of Q^T (zero-padded per piece), K^T and V chunks."""
    cap = (len(units) + programs - 1) // programs
    groups = []
    for ui, unit in enumerate(units):
        single = len(unit.runs) == 1 and len(unit.tiles) == 1
        run, tile = unit.runs[0], unit.tiles[0]
        heads = run.seqs * (run.kv_end - run.kv_start)
        keys = min(CHUNK_KEYS, tile.key_end - tile.key_start)
        row_tiles = run.seqs * run_rows(tiling, run).tiles
        unit_bytes = 2 * (row_tiles * (2 * tile.rows + keys) + heads * ((keys + P_MAX - 1) // P_MAX) * dv)
        if groups and single and heads > 1:
            first, n = groups[-1]
            prev = units[ui - 1]
            joins = (len(prev.runs) == 1 and len(prev.tiles) == 1 and n < cap
                     and (n + 1) * unit_bytes <= GROUP_SBUF_BYTES
                     and prev.runs[0] == run._replace(first_seq=run.first_seq - run.seqs)
                     and same_keys(prev.tiles[0], tile) and first + n == ui)
            if joins:
                groups[-1] = (first, n + 1)
                continue
        groups.append((ui, 1))
    return groups


def same_keys(a, b) -> bool:
    """Two plan tiles with the same rows, tokens and key range (their masks may differ)."""
    return (a.rows, a.token_start, a.token_end, a.key_start, a.key_end) == \
        (b.rows, b.token_start, b.token_end, b.key_start, b.key_end)


# --------------------------------------------------------------------------- host launchers

def visible_keys(k_positions, q_positions, window):
    """Indices of the keys some query can see (older keys left the window), in cache order."""
    k_positions = np.asarray(k_positions)
    keep = k_positions <= np.max(q_positions)
    if window is not None:
        keep &= k_positions > np.min(q_positions) - window
    return np.flatnonzero(keep)


def checked_visible_keys(problems, window, sink):
    """Validate the problems (ValueError naming the problem and the limit); per problem the indices
    of its keys some query sees."""
    hq, d = problems[0].q.shape[1:]
    kv_heads, dv = problems[0].k.shape[1], problems[0].v.shape[2]
    kept = []
    for i, p in enumerate(problems):
        check_attention_shapes(p.q, p.k, p.v, sink, window)
        if p.q.shape[1:] != (hq, d) or p.k.shape[1] != kv_heads or p.v.shape[2] != dv:
            raise ValueError(f"attention_decode: problem {i} has heads/dims q {p.q.shape}, k {p.k.shape}, "
                             f"v {p.v.shape}, unlike problem 0 (q {problems[0].q.shape}, k {problems[0].k.shape})")
        if len(p.q_positions) != p.q.shape[0] or len(p.k_positions) != p.k.shape[0]:
            raise ValueError(f"attention_decode: problem {i}: {len(p.q_positions)} query positions for "
                             f"{p.q.shape[0]} queries, {len(p.k_positions)} key positions for {p.k.shape[0]} keys")
        if p.q.shape[0] == 0:
            raise ValueError(f"attention_decode: problem {i} has no query tokens")
        idx = visible_keys(p.k_positions, p.q_positions, window)
        kp, qp = np.asarray(p.k_positions)[idx][None, :], np.asarray(p.q_positions)[:, None]
        sees = (kp <= qp) & ((kp > qp - window) if window is not None else True)
        if not sees.any(axis=1).all():
            t = int(np.flatnonzero(~sees.any(axis=1))[0])
            raise ValueError(f"attention_decode: problem {i}, query {t} (position {qp[t, 0]}) sees no key; "
                             f"a query must see at least itself")
        kept.append(idx)
    return kept


def kernel_inputs(problems, kept, order, slots: int, t_max: int, s_max: int, scale: float):
    """The kernel's q_t, k_t, v (bf16 device tensors, filled on the device) and kpos, qpos (host) for
    the problems (problem order[slot] in slot `slot`, keys `kept` of each); unused sequence slots
    are dummies with one key at position 0."""
    import torch
    hq, d = problems[0].q.shape[1:]
    kv_heads, dv = problems[0].k.shape[1], problems[0].v.shape[2]
    group = hq // max(1, kv_heads)
    tiling = head_row_tiling(kv_heads, d)
    where = device()
    q_t = torch.zeros((tiling.parts, slots, tiling.tiles, t_max * group), dtype=torch.bfloat16, device=where)
    k_t = torch.zeros((slots, tiling.parts, tiling.tiles, s_max), dtype=torch.bfloat16, device=where)
    v_dev = torch.zeros((slots, s_max, kv_heads, dv), dtype=torch.bfloat16, device=where)
    kpos = np.full((slots, s_max), EMPTY_POSITION, np.float32)
    kpos[len(problems):, 0] = 0.0     # dummy sequences: one zero key at position 0, their query's own
    qpos = np.zeros((slots, t_max), np.float32)
    for slot, b in enumerate(order):
        p, idx = problems[b], kept[b]
        t_len, s_len = p.q.shape[0], len(idx)
        keys = to_device(np.asarray(idx, np.int64))
        q_t[:, slot, :, :t_len * group] = tiled_rows(scaled_rows_t(p.q, kv_heads, scale), kv_heads)
        k_t[slot, :, :, :s_len] = tiled_rows(on_device(p.k, np.float32)[keys].permute(1, 2, 0), kv_heads)
        v_dev[slot, to_device(value_rows(np.arange(s_len), s_max))] = on_device(p.v, np.float32)[keys].to(v_dev.dtype)
        kpos[slot, :s_len] = np.asarray(p.k_positions)[idx]
        qpos[slot, :t_len] = np.asarray(p.q_positions)
        qpos[slot, t_len:] = qpos[slot, t_len - 1]      # padding tokens see what the last one sees
    return q_t, k_t, v_dev, kpos, qpos


def launch_plan(plan: DecodePlan, onehot, sink_rows, q_t, k_t, v, kpos, qpos, window, lnc, tuning):
    """One launch of the kernel on a finished plan and its tensors (`plan_tensors`): (rows [plan
    rows, Dv] float32 device tensor, cost report); the kernel may return them transposed
    (`transposed_rows`)."""
    o_rows, rep = launch(attention_decode_kernel, q_t, k_t, v, kpos, qpos, onehot, sink_rows, plan.kernel_plan,
                         None if window is None else int(window), report=True, lnc=lnc, splits_lnc=True, **tuning)
    o_rows = o_rows.float()
    return (o_rows.T if transposed_rows(plan.kernel_plan[1]) else o_rows), rep


def attention_decode(problems, scale: float, window=None, sink=None, lnc: int | None = None, shape=None,
                     **tuning):
    """Host launcher with the semantics of `ReferenceOps.attention`: each problem has q [T, Hq, D],
    k [S, Hkv, D], v [S, Hkv, Dv] (cached keys in cache order, then the new ones), q_positions
    [T], k_positions [S]. All problems go into one kernel launch.

    `shape` None (ragged): keys no query can see (older than every query's window) are dropped on
    the host, the rest keep their order (a ring buffer stays wrapped), and the plan follows the
    key counts and positions. `shape=(batch, tokens, keys)` (a static bucket): every launch has
    exactly that many sequences, new tokens and key slots (problems padded, extra sequences
    dummies), and the plan depends on the shape only: every tile reads all key slots and masks
    them from the positions at run time (`static_key_ranges`), so any lengths and positions
    inside the bucket reuse one compiled kernel, and the plan tensors are made and uploaded once
    per shape (`static_plan_tensors`). q, k, v: host arrays or device tensors; positions host
    arrays. Returns (list of out [T, Hq, Dv] float32 device tensors, cost report or None)."""
    if not problems:
        return [], None
    hq = problems[0].q.shape[1]
    kv_heads, dv = problems[0].k.shape[1], problems[0].v.shape[2]
    group = hq // max(1, kv_heads)
    kept = checked_visible_keys(problems, window, sink)
    n = len(problems)
    q_lens = [p.q.shape[0] for p in problems]
    if shape is None:
        k_lens = [len(idx) for idx in kept]
        order = sorted(range(n), key=lambda b: -k_lens[b])   # similar key counts share tiles
        plan = plan_decode_units([q_lens[b] for b in order], [k_lens[b] for b in order], kv_heads, group)
        slots, t_max, s_max = n, max(q_lens), max(k_lens)
    else:
        slots, t_max, s_max = (int(v) for v in shape)
        kept = [np.arange(p.k.shape[0]) for p in problems]
        check_static_shape(problems, slots, t_max, s_max)
        order = list(range(n))
        plan, onehot, sink_rows = static_plan_tensors((slots, t_max, s_max), kv_heads, group, window, sink)
    q_t, k_t, v_dev, kpos, qpos = kernel_inputs(problems, kept, order, slots, t_max, s_max, scale)
    if shape is None:
        limit_keys(plan, kpos, qpos, window)
        onehot, sink_rows = plan_tensors(plan, sink)
    o_rows, rep = launch_plan(plan, onehot, sink_rows, q_t, k_t, v_dev, kpos, qpos, window, lnc, tuning)
    outs = [o_rows[to_device(output_rows(plan, order.index(b), q_lens[b], hq))].reshape(q_lens[b], hq, dv)
            for b in range(n)]
    return outs, rep


def check_static_shape(problems, batch: int, tokens: int, keys: int) -> None:
    """A ValueError naming the limit when the problems do not fit the static shape."""
    if len(problems) > batch:
        raise ValueError(f"attention: {len(problems)} sequences exceed the bucket's batch {batch}")
    for i, p in enumerate(problems):
        if p.q.shape[0] > tokens or p.k.shape[0] > keys:
            raise ValueError(f"attention: problem {i} has {p.q.shape[0]} new tokens and {p.k.shape[0]} keys; "
                             f"the bucket holds {tokens} tokens and {keys} key slots per sequence")


def attention_decode_cache(q, k_cache_t, v_cache, key_positions, q_positions, scale: float, window=None,
                           sink=None, keys: int | None = None, lnc: int | None = None, **tuning):
    """Host launcher over a static KV cache held in the kernel's layout (`StaticKVCache`): the
    cache buffers go to the kernel as they are, no relayout copy.

    q              [B, T, Hq, D]     the new tokens' queries (a host array or device tensor of any
                                     float dtype; cast to bf16 after
                                     multiplying by `scale`).
    k_cache_t      [B, P, T, S]      bf16 keys (`tiled_rows` of K^T), the new tokens' keys already written.
    v_cache        [B, S, Hkv, Dv]   bf16 values, slot s in row `value_rows(s, S)`.
    key_positions  [B, S]            fp32 slot positions, EMPTY_POSITION for empty slots.
    q_positions    [B, T]            fp32 positions of the new tokens.
    keys           the slots [0, keys) every tile reads (None: all S), e.g. a decode bucket's
                   context on a full layer whose cache is sized for the largest bucket.
    The plan depends on (B, T, keys) only, like `attention_decode(..., shape=...)`: lengths and
    positions are runtime tensors, and the plan tensors stay on the device between launches
    (`static_plan_tensors`). Returns (out [B, T, Hq, Dv] float32 device tensor, cost report or None)."""
    import torch
    batch, t_len, hq, d = q.shape
    kv_heads, s_max = v_cache.shape[2], k_cache_t.shape[3]
    keys = s_max if keys is None else int(keys)
    tiling = head_row_tiling(kv_heads, d)
    if k_cache_t.shape[:3] != (batch, tiling.parts, tiling.tiles) or not 1 <= keys <= s_max:
        raise ValueError(f"attention_decode_cache: k_cache_t {k_cache_t.shape} must be [{batch}, {tiling.parts}, "
                         f"{tiling.tiles}, S] ({kv_heads} KV heads of {d} rows) with S >= keys = {keys} (q {q.shape})")
    if hq % kv_heads or np.shape(q_positions) != (batch, t_len) or np.shape(key_positions) != (batch, s_max):
        raise ValueError(f"attention_decode_cache: q {q.shape}, q_positions {np.shape(q_positions)} (must be "
                         f"[{batch}, {t_len}]), key_positions {np.shape(key_positions)} (must be [{batch}, {s_max}]) "
                         f"and {kv_heads} KV heads do not fit together")
    plan, onehot, sink_rows = static_plan_tensors((batch, t_len, keys), kv_heads, hq // kv_heads, window, sink)
    q_t = on_device(tiled_rows(torch.stack([scaled_rows_t(q[b], kv_heads, scale) for b in range(batch)]),
                               kv_heads).movedim(0, 1), BF16)
    o_rows, rep = launch_plan(plan, onehot, sink_rows, q_t, k_cache_t, v_cache, key_positions, q_positions, window,
                              lnc, tuning)
    rows = RESIDENT.lookup(static_output_rows(batch, t_len, keys, kv_heads, hq // kv_heads,
                                              None if window is None else int(window)))
    return o_rows[rows].reshape(batch, t_len, hq, v_cache.shape[3]), rep
