"""Host-side plan of a cached-attention launch (`decode.py`): which rows of which sequences, KV
heads and new tokens share a score tile, which keys each tile reads, which key ranges need the
position mask, and the plan tensors (per-tile mask one-hot, sink rows). All of it is computed on
the host before the launch; the kernel receives the plan as a compile-time argument (nested
tuples; `typed_units` gives the records their field names back at trace time). The plan of a
static shape depends on that shape only: it and its tensors are made once and stay on the device
(`static_plan_tensors`).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import numpy as np

from mimo_kernels.launch import RESIDENT
from mimo_kernels.trn2 import TRN2
from .flash import CHUNK_KEYS, MASK_BIAS, P_MAX
from .host import BF16


def key_chunks(lo: int, hi: int):
    """The key chunks [c0, c1) a unit reading slots [lo, hi) goes through: at most CHUNK_KEYS each,
    inside one block of `value_rows` (blocks of CHUNK_KEYS slots from slot 0) and starting at a
    whole 128-key tile of it (a chunk's keys before `lo` are read but no query sees them)."""
    first = lo // P_MAX * P_MAX
    return [(max(first, b), min(hi, b + CHUNK_KEYS)) for b in range(lo // CHUNK_KEYS * CHUNK_KEYS, hi, CHUNK_KEYS)]


def value_rows(slots, n_slots: int) -> np.ndarray:
    """The value buffer's row of each key slot (of `n_slots`): in every block of CHUNK_KEYS slots
    (the last one may be shorter) the block's m whole 128-key tiles are stored transposed, slot
    block + 128 j + p in row block + m p + j, so the V load of a chunk gives partition p its keys
    p, p + 128, ... as one contiguous run; slots past the block's whole tiles keep their row.
    The key (K^T) and position buffers keep slot order."""
    slots = np.asarray(slots)
    base = slots // CHUNK_KEYS * CHUNK_KEYS
    tiles = np.minimum(CHUNK_KEYS, n_slots - base) // P_MAX
    tile, part = np.divmod(slots - base, P_MAX)
    return np.where(tile < tiles, base + part * tiles + tile, slots)


class RowTiling(NamedTuple):
    """The QK contraction rows of consecutive KV heads in partition tiles: `tiles` tiles of `parts`
    partitions; per head its pieces ((tile, first partition, end partition), ...)."""
    parts: int
    tiles: int
    pieces: tuple


@lru_cache(maxsize=None)
def head_row_tiling(heads: int, d_head: int) -> RowTiling:
    """Tiles of the K^T / Q^T rows of `heads` consecutive KV heads (head h: rows h D .. h D + D - 1,
    as they lie in HBM): the tallest tile (<= 128 partitions, dividing the rows) whose pieces of
    every head start on a partition TensorE accepts for their size (`allowed_start_partitions`), so
    that one DMA brings a key chunk of all the heads on as many DMA engines as possible
    (4 x 192 rows -> 6 x 128, pieces 128 + 64 and 64 + 128; one head of 192 -> 2 x 96)."""
    rows = heads * d_head
    for parts in range(min(P_MAX, rows), 0, -1):
        if rows % parts:
            continue
        pieces = tuple(tuple((t, max(h * d_head - t * parts, 0), min((h + 1) * d_head - t * parts, parts))
                             for t in range(h * d_head // parts, ((h + 1) * d_head - 1) // parts + 1))
                       for h in range(heads))
        if all(p0 in TRN2.allowed_start_partitions(p1 - p0) for head in pieces for _, p0, p1 in head):
            return RowTiling(parts, rows // parts, pieces)
    raise ValueError(f"no partition tiling of {heads} heads x {d_head} rows")


def tiled_rows(rows_t, kv_heads: int):
    """[..., Hkv, D, N] (K^T or Q^T per KV head) -> [..., P, T, N]: the Hkv x D rows in the kernel's
    partition tiles (`head_row_tiling`), row h D + d at [p, t] with t P + p = h D + d, so that a
    partition's rows of all tiles are contiguous (one run per sequence when N is the whole extent)."""
    *lead, heads, d_head, n = rows_t.shape
    tiling = head_row_tiling(kv_heads, d_head)
    return rows_t.reshape(*lead, tiling.tiles, tiling.parts, n).swapaxes(-3, -2)


def untiled_rows(tiled, kv_heads: int):
    """The inverse of `tiled_rows`: [..., P, T, N] -> [..., Hkv, D, N]."""
    *lead, parts, tiles, n = tiled.shape
    return tiled.swapaxes(-3, -2).reshape(*lead, kv_heads, parts * tiles // kv_heads, n)


class KeyMask(NamedTuple):
    """Keys [first, end) of a chunk holding masked (query, key) pairs of a tile: `late` keys later
    than some query (or padding), `early` keys outside some query's window."""
    first: int
    end: int
    late: bool
    early: bool


class Run(NamedTuple):
    """Sequences first_seq .. first_seq + seqs - 1, KV heads [kv_start, kv_end), new tokens
    [token_start, token_end) of a unit; rows ordered (sequence, KV head, token, query head)."""
    first_seq: int
    seqs: int
    kv_start: int
    kv_end: int
    token_start: int
    token_end: int


class PlanTile(NamedTuple):
    """A row tile: `rows` rows, tokens [token_start, token_end) of its unit's run (all of them when
    packed), cache keys [key_start, key_end) (the others are invisible to its queries), and per key
    chunk of the unit (`key_chunks` of its key range) the KeyMasks to apply
    (empty: no mask)."""
    rows: int
    token_start: int
    token_end: int
    key_start: int
    key_end: int
    masks: tuple

    @property
    def tokens(self) -> int:
        return self.token_end - self.token_start


class PlanUnit(NamedTuple):
    """Row tiles sharing their Q, K, V and position loads: either one tile holding all the runs'
    rows (short sequences packed), or one run of one sequence and KV head whose tiles split the
    tokens."""
    runs: tuple
    tiles: tuple


def typed_units(units):
    """The kernel's plan units (plain nested tuples once they are kernel arguments) as records."""
    typed = []
    for runs, tiles in units:
        plan_tiles = []
        for rows, ta, tb, k_lo, k_hi, masks in tiles:
            chunks = tuple([tuple([KeyMask(*m) for m in chunk]) for chunk in masks])
            plan_tiles.append(PlanTile(rows, ta, tb, k_lo, k_hi, chunks))
        typed.append(PlanUnit(tuple([Run(*r) for r in runs]), tuple(plan_tiles)))
    return typed


@dataclass
class DecodePlan:
    """Static structure of one launch: `units` for the kernel (see `attention_decode_kernel`), and
    for every output row its sequence, token and query head; per tile its tokens (sequence, token)."""
    group: int
    units: list          # [PlanUnit] whose tiles are lists until the key ranges are set
    row_seq: np.ndarray
    row_token: np.ndarray
    row_head: np.ndarray
    tile_tokens: list

    @property
    def kernel_plan(self):
        return self.group, tuple(PlanUnit(unit.runs, tuple(unit.tiles)) for unit in self.units)

    @property
    def tiles(self) -> list:
        return [tile for unit in self.units for tile in unit.tiles]


class PlanRows:
    """The rows of a plan under construction: per row its sequence, token and query head."""

    def __init__(self, group: int):
        self.group = group
        self.seq, self.token, self.head = [], [], []

    def add(self, b: int, g: int, tokens) -> None:
        for t in tokens:
            self.seq.extend([b] * self.group)
            self.token.extend([t] * self.group)
            self.head.extend(range(g * self.group, (g + 1) * self.group))


def plan_decode_units(q_lens, k_lens, kv_heads: int, group: int) -> DecodePlan:
    """Pack the sequences of a batch (in this order; put similar key counts next to each other)
    into row tiles of at most 128 rows.

    A sequence whose rows (Hkv * T * G) fit in 128 is packed whole with its neighbours into one
    tile (consecutive sequences with the same token count form one run); a longer one gets one
    unit per KV head whose tiles take `128 // G` tokens each. Tiles read keys [0, S) of their
    sequences; `limit_keys` narrows that to the visible ones and marks the chunks needing masks."""
    rows, tile_tokens, units = PlanRows(group), [], []

    def add_packed(runs):
        n_rows, tokens = 0, []
        for run in runs:
            for b in range(run.first_seq, run.first_seq + run.seqs):
                tokens += [(b, t) for t in range(run.token_start, run.token_end)]
                for g in range(run.kv_start, run.kv_end):
                    rows.add(b, g, range(run.token_start, run.token_end))
                    n_rows += (run.token_end - run.token_start) * group
        keys = max(k_lens[b] for run in runs for b in range(run.first_seq, run.first_seq + run.seqs))
        units.append(PlanUnit(tuple(runs), [PlanTile(n_rows, 0, len(tokens), 0, keys, ())]))
        tile_tokens.append(tokens)

    per_tile = max(1, P_MAX // group)
    pending, pending_rows = [], 0
    for b in range(len(q_lens)):
        rows_b = kv_heads * q_lens[b] * group
        if rows_b > P_MAX:
            for g in range(kv_heads):
                tiles = []
                for ta in range(0, q_lens[b], per_tile):
                    tb = min(q_lens[b], ta + per_tile)
                    tiles.append(PlanTile((tb - ta) * group, ta, tb, 0, k_lens[b], ()))
                    rows.add(b, g, range(ta, tb))
                    tile_tokens.append([(b, t) for t in range(ta, tb)])
                units.append(PlanUnit((Run(b, 1, g, g + 1, 0, q_lens[b]),), tiles))
            continue
        if pending_rows + rows_b > P_MAX:
            add_packed(pending)
            pending, pending_rows = [], 0
        last = pending[-1] if pending else None
        if last and last.first_seq + last.seqs == b and last.token_end == q_lens[b]:
            pending[-1] = last._replace(seqs=last.seqs + 1)
        else:
            pending.append(Run(b, 1, 0, kv_heads, 0, q_lens[b]))
        pending_rows += rows_b
    if pending:
        add_packed(pending)
    return DecodePlan(group, units, np.array(rows.seq), np.array(rows.token), np.array(rows.head), tile_tokens)


def limit_keys(plan: DecodePlan, kpos, qpos, window) -> None:
    """Per tile: the keys to read, [first, 1 + last) index of a key any of its queries sees, and
    per key chunk of its unit the ranges holding masked (query, key) pairs (a later key or
    padding, one outside the window)."""
    tile_tokens = iter(plan.tile_tokens)
    for unit in plan.units:
        seen = []
        for i, tokens in zip(range(len(unit.tiles)), tile_tokens):
            seqs = np.array([b for b, _ in tokens])
            q = qpos[seqs, [t for _, t in tokens]][:, None]
            late = kpos[seqs] > q
            early = kpos[seqs] <= q - window if window is not None else np.zeros_like(late)
            visible = np.flatnonzero((~late & ~early).any(axis=0))
            unit.tiles[i] = unit.tiles[i]._replace(key_start=int(visible.min()), key_end=int(visible.max()) + 1)
            seen.append((late.any(axis=0), early.any(axis=0)))
        chunks = key_chunks(min(t.key_start for t in unit.tiles), max(t.key_end for t in unit.tiles))
        for i, (late, early) in enumerate(seen):
            tile = unit.tiles[i]
            unit.tiles[i] = tile._replace(masks=tuple(
                mask_regions(late, early, max(c0, tile.key_start), min(c1, tile.key_end)) for c0, c1 in chunks))


def mask_regions(late, early, a: int, b: int):
    """Key ranges of [a, b) holding the masked (query, key) pairs of a tile: `late` / `early`
    [keys] flag keys later than some query (or padding) / outside some query's window. One
    range spans each kind's masked keys (both kinds merged when the ranges overlap): a tuple of
    KeyMask."""
    regions = []
    for flags, is_late in ((late, True), (early, False)):
        cols = a + np.flatnonzero(flags[a:b])
        if len(cols):
            regions.append(KeyMask(int(cols[0]), int(cols[-1]) + 1, is_late, not is_late))
    if len(regions) == 2 and regions[0].first < regions[1].end and regions[1].first < regions[0].end:
        regions = [KeyMask(min(r.first for r in regions), max(r.end for r in regions), True, True)]
    return tuple(regions)


def static_key_ranges(plan: DecodePlan, keys: int, window) -> None:
    """The shape-only counterpart of `limit_keys`: every tile reads key slots [0, keys) and every
    chunk is masked from the positions at run time (late keys and padding; with a window also
    keys outside it)."""
    masks = tuple((KeyMask(c0, c1, True, window is not None),) for c0, c1 in key_chunks(0, keys))
    for unit in plan.units:
        for i, tile in enumerate(unit.tiles):
            unit.tiles[i] = tile._replace(key_start=0, key_end=keys, masks=masks)


def plan_tensors(plan: DecodePlan, sink):
    """The plan's tensors: the mask one-hot (`plan_onehot`) and the sink rows (`plan_sink_rows`;
    None without sinks)."""
    return plan_onehot(plan), None if sink is None else plan_sink_rows(plan, sink)


def plan_onehot(plan: DecodePlan) -> np.ndarray:
    """Per tile the mask one-hot [tiles, NT, 128] bf16: MASK_BIAS where tile row r belongs to tile
    token t."""
    onehot = np.zeros((len(plan.tiles), max(len(tok) for tok in plan.tile_tokens), P_MAX), BF16)
    row0 = 0
    for ti, (tile, tokens) in enumerate(zip(plan.tiles, plan.tile_tokens)):
        rows = np.arange(tile.rows)
        where = {tok: i for i, tok in enumerate(tokens)}
        token_of_row = [where[(s, t)] for s, t in zip(plan.row_seq[row0 + rows], plan.row_token[row0 + rows])]
        onehot[ti, token_of_row, rows] = MASK_BIAS
        row0 += tile.rows
    return onehot


def plan_sink_rows(plan: DecodePlan, sink) -> np.ndarray:
    """Per tile the sink rows [tiles, 128, 1] fp32: each row's query head's sink logit."""
    sink_rows = np.zeros((len(plan.tiles), P_MAX, 1), np.float32)
    row0 = 0
    for ti, tile in enumerate(plan.tiles):
        sink_rows[ti, :tile.rows, 0] = np.asarray(sink, np.float32)[plan.row_head[row0:row0 + tile.rows]]
        row0 += tile.rows
    return sink_rows


# A generation's static shapes (its buckets, per layer kind) and, for the sink rows, the layers with
# sinks: the caches keep all of them, so no plan tensor is rebuilt or uploaded after the warmup.
STATIC_PLANS = 64
STATIC_SINK_ROWS = 256


def static_plan_tensors(shape, kv_heads: int, group: int, window, sink):
    """The plan of a static launch shape (batch, tokens, keys) and its tensors, made once: (plan,
    one-hot, sink rows or None). They depend on the shape, the heads, whether a window masks and
    the sink values only (lengths and positions are runtime tensors: `static_key_ranges`), so the
    tensors are device-resident (`launch.RESIDENT`, counted as "plans"): a shape uploads them at its
    first launch only. All three are shared: treat them as read-only."""
    key = (*(int(n) for n in shape), int(kv_heads), int(group), None if window is None else int(window))
    plan, onehot = static_plan(*key)
    sink_rows = None if sink is None else static_sink_rows(key, np.asarray(sink, np.float32).tobytes())
    return plan, onehot, sink_rows


@lru_cache(maxsize=STATIC_PLANS)
def static_plan(batch: int, tokens: int, keys: int, kv_heads: int, group: int, window):
    """(plan, resident one-hot) of `static_plan_tensors`."""
    plan = plan_decode_units([tokens] * batch, [keys] * batch, kv_heads, group)
    static_key_ranges(plan, keys, window)
    return plan, resident_plan_tensor(plan_onehot(plan))


@lru_cache(maxsize=STATIC_SINK_ROWS)
def static_sink_rows(key: tuple, sink: bytes) -> np.ndarray:
    """The resident sink rows of `static_plan(*key)` for a float32 sink vector given by its bytes."""
    plan, _ = static_plan(*key)
    return resident_plan_tensor(plan_sink_rows(plan, np.frombuffer(sink, np.float32)))


def output_rows(plan: DecodePlan, slot: int, t_len: int, hq: int) -> np.ndarray:
    """The plan row holding each (token, head) output of sequence slot `slot`'s first `t_len`
    tokens, [t_len * Hq] int64 in (token, head) order: the gather that puts the rows back."""
    mine = np.flatnonzero((plan.row_seq == slot) & (plan.row_token < t_len))
    rows = np.zeros(t_len * hq, np.int64)
    rows[plan.row_token[mine] * hq + plan.row_head[mine]] = mine
    return rows


@lru_cache(maxsize=STATIC_PLANS)
def static_output_rows(batch: int, tokens: int, keys: int, kv_heads: int, group: int, window) -> np.ndarray:
    """The resident gather of `output_rows` for every sequence slot of `static_plan(...)`,
    [batch * tokens * Hq] (the output rows of a static launch in (sequence, token, head) order)."""
    plan, _ = static_plan(batch, tokens, keys, kv_heads, group, window)
    return resident_plan_tensor(np.concatenate([output_rows(plan, b, tokens, kv_heads * group)
                                                for b in range(batch)]))


def resident_plan_tensor(array: np.ndarray) -> np.ndarray:
    """`array` made read-only (every launch of its shape shares it) and registered with
    `launch.RESIDENT` as "plans": uploaded once, its device copy passed to every launch."""
    array.flags.writeable = False
    return RESIDENT.resident(array, kind="plans")
