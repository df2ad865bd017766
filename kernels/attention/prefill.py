"""Flash-style prefill attention for MiMo-V2-Flash: causal full and sliding-window GQA with sinks.

Q/K head dim 192 (the QK contraction is split over partition tiles 128 + 64 and accumulated in
PSUM), V head dim 128, grouped-query attention without copying K/V per query head: the query
heads of one KV head are packed into the rows of one score tile.

Rows. A score tile holds 128 rows = `128 // G` consecutive tokens x the G query heads of one KV
head (row `t * G + i` is token t, head `g * G + i`). All rows share the KV head's keys, so one
matmul computes the scores of every head of the group, and a window of W keys costs about
`W + 128 / G` key columns per tile instead of the `W + 127` of a 128-token query block.

Q arrives multiplied by the softmax scale (on the device the scale folds into W_q), so the PSUM
scores are the logits. Per row tile and key chunk (up to 1024 keys = 2 PSUM banks of fp32):

    S      = Q K^T               TensorE, 128 + 64 contraction rows accumulated in PSUM (the
                                 64-row passes of two PSUM banks side by side on the two row
                                 halves of the PE array)
    S     += onehot^T @ masked   TensorE, only on boundary columns (causal diagonal, window edge)
    -m     = min(-m, min(-S))    VectorE, one tensor_scalar_reduce per tile: S negated in place,
                                 the accumulator loaded with -m (reduce_cmd=load_reduce)
    P      = exp(S - m), rowsum  ScalarE (P in bf16; scale -1 undoes the negation), per tile only
                                 up to its last unmasked key
    P^T    = transpose(P)        TensorE 128 x 128 blocks evicted PSUM -> SBUF, or DMA transposes
    O      = O * exp(m_old - m) + P^T^T @ V                             TensorE + VectorE (fp32)
    l      = l * exp(m_old - m) + rowsum                                GpSimd

and at the end `out = O / l` in bf16. Key chunks entirely outside a tile's causal window are
never visited. A sink logit starts the running state as an extra key with no value: m = sink,
l = 1, O = 0, which puts `exp(sink - m)` into the softmax denominator exactly.

Masking without touching the score tile: boundary columns get `-1e30` added through an extra
PSUM-accumulating matmul of a one-hot [tokens, rows] stationary (`-1e30` where the row belongs to
the token) against a 0/1 "masked" indicator [tokens, columns]; this costs a 64-cycle matmul per
boundary region instead of a VectorE pass over the scores.

Pipeline (the cost model schedules each engine's instructions in program order, an instruction
waiting for the data it reads, so a batch's chain QK -> row max -> exp -> P transposes -> PV ->
output update issued in one piece leaves every engine waiting for the one before it: at T = 512
that order took 430 us against 131 us of busiest-engine time). Every batch is a `BatchWork` that
`run_pipeline` moves through six stages of one engine each (scores, softmax, transposes, P^T
evictions, P V, output update), issued skewed (PIPELINE_STAGES) so that what a stage reads was
written a step earlier and no engine's queue waits for another engine's work of the same step
(with four stages, where the eviction and the output update followed the transposes and the P V
of the same step, T = 4096 took 8.2 ms instead of 7.7). Two score tiles are live at once, so a
key chunk is 1024 keys (2 PSUM banks of fp32) and a batch's scores fit 2 banks.
Loads run one key chunk ahead (the next chunk's K^T and V, with its super block's Q^T when it is
the block's first, are issued when the current chunk's first batch starts); the kernel's first
block loads its Q^T in FIRST_BLOCK_Q_PIECES column pieces so the first row tiles start early,
and the last block stores its result in LAST_BLOCK_STORE_PIECES pieces of row tiles, each when
its tiles are done. Super blocks are SUPER_TOKENS = 512 tokens and head groups hold
HEAD_GROUP_SBUF_BYTES, so the three blocks the pipeline can hold at once fit SBUF (loading the next
chunk later, when the works of the chunk before have left the pipeline, would leave two and allow
larger groups, but under the cost model the shorter lead costs more than the transfers saved).

Engine balance (the cost report decides): per key column TensorE spends 1.5 cycles on QK (a pass
costs its moving columns whatever its rows, so the 64-row passes pair up on the PE array's row
tiles), 1 on the P transpose and 1 on PV, against 2.5 of roofline; VectorE reads every score once
(row max), ScalarE once (exp), and the PSUM -> SBUF eviction
of P^T is split between them (`evict_vector_share`; VectorE copies bf16 out of PSUM in its 2x
mode, ScalarE at 1x). Row tiles whose keys fit one chunk are processed up to BATCH_TILES at a
time, so the P^T eviction and the final 1/l scaling are one instruction per batch (a window of
128 keys gives ~143-key tiles, where per-instruction costs would otherwise dominate);
`output_scalar_share` of the tiles instead get their 1/l scaling one by one on ScalarE. A batch
shares its widest tile's logit columns for QK; the row max, exp and PV of each tile stop at its
own last unmasked key (the rest of its P is zeroed by one GpSimd memset per batch).
`dma_transpose_share` moves that share of the P transposes to the DMA queues, a whole batch at
a time (one SBUF -> SBUF 3-D `dma_transpose` per batch, each transfer paying its ~1.3 us setup),
taking work off TensorE, VectorE and ScalarE. SBUF -> SBUF DMA transposes run at up to 50 % of
DMA throughput (Trainium2 architecture guide; the cost model charges exactly that): ~2 ns of DMA
per key column of 128 rows against 0.4 ns of TensorE plus ~1 ns of PSUM eviction, and in the
in-order DMA queues a transpose waits for its exp while the loads behind it wait for the
transpose. DEFAULT_SHARES holds the values swept under the cost model (no DMA transposes: at
T = 4096, with the four-stage pipeline and unpaired 64-row passes, a share of 0.2 took 9.9 ms
against 8.3 ms without, 0.4 10.3 ms; with the six stages the eviction share barely matters: 0.3
7.69 ms against 7.71 at 0.4). The
transpose rate is an upper bound from the documentation, so that share is the first knob to
revisit on hardware.

DMA transfers: every transfer pays its setup, so the KV heads of a super block go in groups
(as many as HEAD_GROUP_SBUF_BYTES holds): one DMA per group for each Q^T partition tile, each key
chunk's K^T tiles and V, and the output; the sinks of all heads are one DMA. A transfer over at
most 64 partitions (the 64-row half of Q^T and K^T) uses 8 of the 16 DMA engines, so a large one
goes as two transfers of half the columns side by side (`load_columns`). The output is stored
tile-major ([Hkv, R, tiles, Dv], the launcher reorders it), so each partition writes one long
contiguous run instead of a 256-byte row per tile.

The device helpers shared with the decode kernel are in `flash.py`.
"""
from __future__ import annotations

from mimo_kernels.backend import nki, nl, nisa
from mimo_kernels.launch import launch
from mimo_kernels.checks import KernelInputError
from .flash import (BANK_FP32, MASK_BIAS, P_MAX, EvictEngines, RowState, RowTile, Share, contraction_tiles,
                    QkJob, load_key_tiles, mask_matmuls, pv_matmuls, qk_batch_matmuls, score_tile, softmax_probs,
                    finish_transpose, start_transpose, tile_batches, update_output)
from .host import check_attention_shapes, from_rows, kv_layout, sink_per_row, to_rows_t

SUPER_TOKENS = 512                              # tokens whose row tiles share one K/V chunk load
HEAD_GROUP_SBUF_BYTES = 64 * 1024               # per partition: a head group's Q^T, result, K/V (3 groups live)
PIPELINE_SCORE_COLUMNS = 2 * BANK_FP32          # fp32 score columns of a batch: two score tiles in flight
PREFILL_CHUNK_KEYS = PIPELINE_SCORE_COLUMNS     # keys per softmax step
FIRST_BLOCK_Q_PIECES = 2                        # the first block's Q^T loads in this many column pieces
# run_pipeline's stages: (name, steps behind the newest work), in issue order within a step
PIPELINE_STAGES = (("evict", 3), ("scores", 0), ("softmax", 1), ("transpose", 2), ("pv", 4), ("update", 5))
LAST_BLOCK_STORE_PIECES = 2                     # the last block's result stores in this many tile pieces
SPLIT_ELEMENTS = 4096                           # per partition: a <= 64-partition load this big goes as two
# The engine shares by attention type and length (module docstring), swept under the cost model:
# (P transposes by DMA, P^T evictions on VectorE (rest ScalarE), row tiles whose O / l runs on
# ScalarE). Long full attention runs most tiles alone over several key chunks, whose row maxes and
# output updates load VectorE, so it evicts more on ScalarE.
DEFAULT_SHARES = {"full_short": (0.0, 0.9, 1.0), "full_long": (0.0, 0.4, 0.8), "swa": (0.0, 0.8, 1.0)}
LONG_PREFILL_TOKENS = 2048


# --------------------------------------------------------------------------- the kernel

@nki.jit
def attention_prefill_kernel(q_t, k_t, v, sink_rows, window, dma_transpose_share=None, evict_vector_share=None,
                             output_scalar_share=None):
    """Causal (window=None) or sliding-window (window=W keys, the query included) prefill
    attention of one fresh sequence: queries and keys are the same T tokens (positions 0..T-1).

    q_t       [Hkv, D, T*G] bf16  Q * softmax scale, transposed per KV head: column t*G + i =
                                  token t, query head g*G + i. D (192) lands on partitions in
                                  tiles of 128 + 64.
    k_t       [Hkv, D, T]   bf16  K transposed (D on partitions, keys on the free axis).
    v         [Hkv, T, Dv]  bf16  V (value scale already applied); keys on partitions.
    sink_rows [Hkv, R, 1]   fp32  or None: the sink logit of each row of a row tile
                                  (R = (128 // G) * G; row r has head g*G + r % G).
    window    int or None         keys a query sees, itself included.
    Returns   [Hkv, R, ceil(T*G / R), Dv] bf16, tile-major by partition: [g, r, i] is row
              i*R + r in q_t's column order (token-major, then head), so each partition stores
              one long contiguous run (rows past T*G are zeros).

    Work: super blocks of SUPER_TOKENS tokens x groups of KV heads (their Q^T and result stay in
    SBUF), each through the key chunks of its window (K^T and V loaded once per chunk), each chunk
    in batches of row tiles per head, run as a pipeline (`run_pipeline`). With LNC=2 the KV heads
    are split between the two cores. The three shares tune the engine balance (module docstring;
    None = the default for the attention type).
    """
    kv_heads, _, total_rows = q_t.shape
    seq_len = k_t.shape[2]
    group = check_prefill_inputs(q_t, k_t, v, sink_rows, window)
    setup = PrefillSetup(q_t.shape[1], seq_len, group, window, dma_transpose_share, evict_vector_share,
                         output_scalar_share)
    n_tiles = (seq_len + setup.tokens_per_tile - 1) // setup.tokens_per_tile
    out = nl.ndarray((kv_heads, setup.rows_per_tile, n_tiles, v.shape[2]), dtype=q_t.dtype, buffer=nl.shared_hbm)
    core, cores = nl.program_id(0), nl.num_programs(0)
    heads = HeadRange(core, cores, len(range(core, kv_heads, cores)))
    neg_sinks = None if sink_rows is None else load_neg_sinks(sink_rows[heads.slice()], setup.rows_per_tile)
    blocks = []
    for s0 in range(0, seq_len, setup.super_tokens):
        s1 = min(seq_len, s0 + setup.super_tokens)
        per_group = heads_per_group(setup, s1 - s0, v.shape[2])
        for h0 in range(0, heads.count, per_group):
            n = min(per_group, heads.count - h0)
            sinks = None if neg_sinks is None else neg_sinks[:, h0:h0 + n, :]
            blocks.append(SuperBlock(setup, heads.subrange(h0, n), sinks, s0, s1, not blocks))
    blocks[-1].pieces = LAST_BLOCK_STORE_PIECES
    run_pipeline(setup, PrefillTensors(q_t, k_t, v, out), blocks)
    return out


def heads_per_group(setup, tokens: int, dv: int) -> int:
    """KV heads whose super blocks run together (their Q^T, K^T / V chunk loads and output store
    one DMA each, each transfer paying its setup): as many as HEAD_GROUP_SBUF_BYTES per partition
    holds of their Q^T, result and two key chunks (the pipeline loads the next before the last is
    done)."""
    keys = min(PREFILL_CHUNK_KEYS, tokens + (0 if setup.window is None else setup.window))
    per_head = 2 * (len(setup.d_tiles) * tokens * setup.group + 2 * len(setup.d_tiles) * keys
                    + ((tokens + setup.tokens_per_tile - 1) // setup.tokens_per_tile + 2 * (keys // P_MAX + 1)) * dv)
    return max(1, HEAD_GROUP_SBUF_BYTES // per_head)


class HeadRange(nl.NKIObject):
    """KV heads first, first + step, ... (count of them)."""

    def __init__(self, first: int, step: int, count: int):
        self.first, self.step, self.count = first, step, count

    def slice(self):
        return slice(self.first, self.first + (self.count - 1) * self.step + 1, self.step)

    def subrange(self, h0: int, n: int):
        """Heads h0 .. h0 + n - 1 of this range."""
        return HeadRange(self.first + h0 * self.step, self.step, n)


class PrefillTensors(nl.NKIObject):
    """The launch's HBM tensors: inputs q_t, k_t, v and the output."""
    q_t: object
    k_t: object
    v: object
    out: object


def load_neg_sinks(sink_heads, rows: int):
    """HBM [heads, rows, 1] -> SBUF [rows, heads, 1] fp32, negated (the -m start of each row), one DMA."""
    sink = nl.ndarray((rows, sink_heads.shape[0], 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(sink, sink_heads.permute((1, 0, 2)))
    neg_sink = nl.ndarray((rows, sink_heads.shape[0], 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_scalar(neg_sink, sink, nl.multiply, -1.0)
    return neg_sink


def load_chunk(k_heads, v_heads, setup, chunk):
    """HBM -> SBUF: keys [c0, c1) of the given heads: K^T per D tile [d, heads, keys] and V
    [128, heads, key tile, Dv], one DMA each."""
    c0, c1 = chunk
    k_sb = []
    for d0, d1 in setup.d_tiles:
        k_part = nl.ndarray((d1 - d0, k_heads.shape[0], c1 - c0), dtype=k_heads.dtype, buffer=nl.sbuf)
        load_columns(k_part, k_heads[:, d0:d1, c0:c1].permute((1, 0, 2)), 0, c1 - c0)
        k_sb.append(k_part)
    return k_sb, load_key_tiles(v_heads, c0, c1)


def load_columns(dst, src, col0: int, col1: int):
    """HBM -> SBUF: columns [col0, col1) of the last axis of `src` [partitions, ..., columns] into
    the same columns of `dst`. A transfer over at most 64 partitions uses only 8 of the 16 DMA
    engines, so a large one goes as two transfers of half the columns, which run side by side."""
    per_partition = col1 - col0
    for extent in dst.shape[1:-1]:
        per_partition *= extent
    half_engines = dst.shape[0] <= P_MAX // 2 and per_partition >= SPLIT_ELEMENTS
    cuts = [col0, (col0 + col1) // 2, col1] if half_engines else [col0, col1]
    for a, b in zip(cuts[:-1], cuts[1:]):
        nisa.dma_copy(dst[..., a:b], src[..., a:b])


def super_block_chunks(setup, s0: int, s1: int):
    """The key chunks [(c0, c1)] the window of tokens [s0, s1) meets."""
    k_lo = 0 if setup.window is None else max(0, s0 - setup.window + 1)
    return [(c0, min(s1, c0 + PREFILL_CHUNK_KEYS)) for c0 in range(k_lo, s1, PREFILL_CHUNK_KEYS)]


def check_prefill_inputs(q_t, k_t, v, sink_rows, window) -> int:
    """KernelInputError naming the tensor unless the shapes fit the kernel; returns the group size G."""
    kv_heads, d_head, total_rows = q_t.shape
    seq_len = k_t.shape[2]
    dv = v.shape[2]
    if not (seq_len >= 1 and total_rows % seq_len == 0):
        raise KernelInputError(f"q_t columns {total_rows} must be T * G for T = {seq_len} (k_t's last dim)")
    group = total_rows // seq_len
    if not (group <= P_MAX):
        raise KernelInputError(f"group size G = {group} query heads per KV head exceeds {P_MAX}")
    if not (k_t.shape[:2] == (kv_heads, d_head)):
        raise KernelInputError(f"k_t {k_t.shape} must be [{kv_heads}, {d_head}, T]")
    if not (v.shape[:2] == (kv_heads, seq_len)):
        raise KernelInputError(f"v {v.shape} must be [{kv_heads}, {seq_len}, Dv]")
    if not (dv <= P_MAX):
        raise KernelInputError(f"V head dim {dv} exceeds {P_MAX}")
    if not (window is None or window >= 1):
        raise KernelInputError(f"window {window} must be >= 1 key")
    rows_per_tile = (P_MAX // group) * group
    if sink_rows is not None:
        if not (sink_rows.shape == (kv_heads, rows_per_tile, 1)):
            raise KernelInputError(f"sink_rows {sink_rows.shape} must be [{kv_heads}, {rows_per_tile}, 1]")
    return group


class PrefillSetup(nl.NKIObject):
    """What every super block of a launch shares: the row-tile shape, the contraction tiles, the
    mask one-hot and the boundary indicators (built once), the engine shares."""

    def __init__(self, d_head: int, seq_len: int, group: int, window, dma_transpose_share, evict_vector_share,
                 output_scalar_share):
        self.group = group
        self.window = window
        self.tokens_per_tile = P_MAX // group
        self.rows_per_tile = self.tokens_per_tile * group
        # whole row tiles per super block, so only the sequence's last tile can be ragged
        self.super_tokens = SUPER_TOKENS // self.tokens_per_tile * self.tokens_per_tile
        self.d_tiles = contraction_tiles(d_head)
        self.onehot = onehot_mask_rows(self.tokens_per_tile, group)
        self.indicators = {}          # (tokens, width, k0 - q0) -> masked indicator tile
        kind = "swa" if window is not None else "full_long" if seq_len >= LONG_PREFILL_TOKENS else "full_short"
        defaults = DEFAULT_SHARES[kind]
        dma_transpose_share = defaults[0] if dma_transpose_share is None else dma_transpose_share
        evict_vector_share = defaults[1] if evict_vector_share is None else evict_vector_share
        output_scalar_share = defaults[2] if output_scalar_share is None else output_scalar_share
        self.evict = EvictEngines(evict_vector_share, output_scalar_share)
        self.dma_share = Share(dma_transpose_share)
        self.all_by_dma, self.none_by_dma = Share(1.0), Share(0.0)

    def indicator(self, tokens: int, width: int, key_minus_query: int):
        """The masked indicator of a boundary region (static_mask_indicator), built on first use."""
        key = (tokens, width, key_minus_query)
        if key not in self.indicators:
            self.indicators[key] = static_mask_indicator(tokens, width, key_minus_query, self.window)
        return self.indicators[key]


class SuperBlock(nl.NKIObject):
    """Tokens [s0, s1) of a group of KV heads (HeadRange) and the key chunks their window meets.
    `load` brings their Q^T into SBUF (one DMA per D partition tile for the whole group) and makes
    the result tile and the row tiles; the result goes out in `pieces` DMAs of consecutive row
    tiles, each as soon as the works of its tiles are done (`finished`): one for most blocks, whose
    store overlaps the next blocks' work, LAST_BLOCK_STORE_PIECES for the kernel's last, whose
    store nothing else hides."""

    def __init__(self, setup: PrefillSetup, heads, neg_sinks, s0: int, s1: int, first: bool):
        self.heads, self.neg_sinks, self.s0, self.s1, self.first = heads, neg_sinks, s0, s1, first
        self.chunks = super_block_chunks(setup, s0, s1)
        self.q_sb = None
        self.result = None
        self.tiles = None
        self.pieces = 1
        self.pending = None           # per store piece: (work, row tile) pairs not yet output

    def load(self, setup: PrefillSetup, tensors):
        group, heads, s0, s1 = setup.group, self.heads, self.s0, self.s1
        self.tiles = [super_block_tiles(setup, self.chunks, s0, s1) for _ in range(heads.count)]
        n_tiles = len(self.tiles[0])
        # Q^T [d, head, columns] per D tile; the kernel's first block in pieces of columns, so the
        # first row tiles start before the rest has arrived
        columns = (s1 - s0) * group
        pieces = FIRST_BLOCK_Q_PIECES if self.first else 1
        self.q_sb = [nl.ndarray((d1 - d0, heads.count, columns), dtype=tensors.q_t.dtype, buffer=nl.sbuf)
                     for d0, d1 in setup.d_tiles]
        for i in range(pieces):
            a, b = columns * i // pieces, columns * (i + 1) // pieces
            for (d0, d1), q_part in zip(setup.d_tiles, self.q_sb):
                load_columns(q_part, tensors.q_t[heads.slice(), d0:d1, s0 * group:s1 * group].permute((1, 0, 2)), a, b)
        dv = tensors.v.shape[2]
        self.result = nl.ndarray((setup.rows_per_tile, heads.count, n_tiles, dv), dtype=tensors.out.dtype,
                                 buffer=nl.sbuf)
        if self.tiles[0][-1].token_end - self.tiles[0][-1].token_start < setup.tokens_per_tile:
            nisa.memset(self.result[:, :, n_tiles - 1, :], 0.0, engine=nisa.gpsimd_engine)
        self.pieces = min(self.pieces, n_tiles)
        self.pending = [0] * self.pieces

    def piece(self, tile: int) -> int:
        return tile * self.pieces // self.result.shape[2]

    def expect(self, tiles):
        """Works for these row tiles were made (counted until `finished`)."""
        for t in tiles:
            self.pending[self.piece(t)] += 1

    def finished(self, setup: PrefillSetup, tiles, out):
        """The output of a work of these row tiles is written: store every piece now complete
        (SBUF -> HBM, one contiguous run per partition and head; a ragged last tile's rows past
        T * G are zeros), and release the block's SBUF tiles after the last."""
        n_tiles = self.result.shape[2]
        tile0 = self.s0 // setup.tokens_per_tile
        for t in tiles:
            p = self.piece(t)
            self.pending[p] -= 1
            if self.pending[p] == 0:
                t0 = (p * n_tiles + self.pieces - 1) // self.pieces        # the tiles t with piece(t) == p
                t1 = ((p + 1) * n_tiles + self.pieces - 1) // self.pieces
                nisa.dma_copy(out[self.heads.slice(), :, tile0 + t0:tile0 + t1, :].permute((1, 0, 2, 3)),
                              self.result[:, :, t0:t1, :])
        if sum(self.pending) == 0:
            self.q_sb, self.result, self.tiles = None, None, None


class BatchWork(nl.NKIObject):
    """One TileBatch of one head of a super block against one key chunk, and what its pipeline
    stages hand on: scores (PSUM) -> alpha and P (SBUF) -> P^T (PSUM, then SBUF) -> P V (PSUM)."""

    def __init__(self, block: SuperBlock, h: int, batch, chunk, k_sb, v_sb):
        self.block, self.h, self.batch, self.chunk = block, h, batch, chunk
        self.k_sb, self.v_sb = k_sb, v_sb
        self.prefetch = False             # starting this work loads the next key chunk
        self.scores = self.state = self.ends = self.alpha = self.probs = self.probs_t = None
        self.transposing = self.o_psum = None


def chunk_works(setup: PrefillSetup, tensors, block: SuperBlock, chunk):
    """Load key chunk `chunk` of a super block (its Q^T first when it is the block's first chunk)
    and return its BatchWorks, head by head."""
    heads = block.heads
    k_sb, v_sb = load_chunk(tensors.k_t[heads.slice()], tensors.v[heads.slice()], setup, chunk)
    if block.q_sb is None:
        block.load(setup, tensors)
    works = []
    for h in range(heads.count):
        for batch in tile_batches(block.tiles[h], chunk[0], chunk[1], setup.group, PIPELINE_SCORE_COLUMNS):
            works.append(BatchWork(block, h, batch, chunk, [k[:, h, :] for k in k_sb], v_sb[:, h]))
            block.expect(batch.tiles())
    works[0].prefetch = True
    return works


def run_pipeline(setup: PrefillSetup, tensors, blocks):
    """Every BatchWork of the super blocks through six stages, one engine's work each, issued
    skewed (PIPELINE_STAGES: name, steps behind the newest work, in issue order within a step), so
    that what an instruction reads was written a step earlier and no engine's in-order queue waits
    on another engine's work of the same step:

        scores      QK and mask matmuls (TensorE)
        softmax     row max (VectorE), bookkeeping (GpSimd), exp (ScalarE)
        transpose   P^T by TensorE into PSUM (or by DMA)
        evict       P^T PSUM -> SBUF (VectorE / ScalarE)
        pv          P V (TensorE)
        update      output update (VectorE / ScalarE / GpSimd), a store piece once its row tiles
                    are done (SuperBlock.finished)

    Two score tiles are live at once (hence PIPELINE_SCORE_COLUMNS, 2 PSUM banks each). Key chunks
    (and a block's Q^T with its first chunk) are loaded one chunk ahead: the next when the first
    work of the current one starts."""
    plan = []
    for block in blocks:
        for chunk in block.chunks:
            plan.append((block, chunk))
    queue = []
    loaded = 0
    depth = max([lag for _, lag in PIPELINE_STAGES])
    flight = [None] * depth            # works in flight: [i] is i + 1 steps behind the newest
    while loaded < len(plan) or queue or any([w is not None for w in flight]):
        if not queue and loaded < len(plan):
            queue = chunk_works(setup, tensors, plan[loaded][0], plan[loaded][1])
            loaded += 1
        work = None
        if queue:
            work = queue.pop(0)
            if work.prefetch and loaded < len(plan):
                queue = queue + chunk_works(setup, tensors, plan[loaded][0], plan[loaded][1])
                loaded += 1
        for stage, lag in PIPELINE_STAGES:
            w = work if lag == 0 else flight[lag - 1]
            if w is not None:
                run_stage(setup, stage, w, tensors.out)
        flight = [work] + flight[:depth - 1]


def run_stage(setup: PrefillSetup, stage: str, work: BatchWork, out):
    if stage == "scores":
        work.scores = prefill_scores(setup, work)
    elif stage == "softmax":
        softmax_stage(work)
    elif stage == "transpose":
        transpose_stage(setup, work)
    elif stage == "evict":
        work.probs_t = finish_transpose(work.transposing, setup.evict)
        work.transposing = None
    elif stage == "pv":
        pv_stage(work)
    else:
        update_stage(setup, work, out)


def softmax_stage(work: BatchWork):
    """Row max and exp of the work's scores (released here): its alpha and P."""
    batch, block = work.batch, work.block
    tiles = block.tiles[work.h]
    members = [tiles[t] for t in batch.tiles()]
    work.state = tiles[batch.first].state
    if work.state is None:
        work.state = RowState(batch.rows, 1, batch.count)
    c0, c1 = work.chunk
    # end of each tile's own logit columns; the batch's later ones are masked for it
    work.ends = [min(c1, t.token_end) - max(c0, t.key_start) + batch.lead for t in members]
    neg_sink = None if block.neg_sinks is None else block.neg_sinks[0:batch.rows, work.h, :]
    work.alpha, work.probs = softmax_probs(work.scores, batch, work.state, neg_sink, work.ends)
    work.scores = None


def transpose_stage(setup: PrefillSetup, work: BatchWork):
    """The transposes of the work's P: all its blocks by TensorE or all by one DMA transpose (each
    transfer pays its setup), keeping the DMA share near `dma_transpose_share`."""
    batch = work.batch
    n_blocks = batch.count * ((batch.width + P_MAX - 1) // P_MAX)
    by_dma = setup.all_by_dma if setup.dma_share.take_all(n_blocks) else setup.none_by_dma
    work.transposing = start_transpose(work.probs, batch.width, by_dma)
    work.probs = None


def pv_stage(work: BatchWork):
    """P V of the work's tiles into PSUM."""
    batch, c0 = work.batch, work.chunk[0]
    tiles = work.block.tiles[work.h]
    work.o_psum = nl.ndarray((batch.rows, batch.count, work.v_sb.shape[-1]), dtype=nl.float32, buffer=nl.psum)
    for j, t in enumerate(batch.tiles()):
        # key tiles past the tile's own columns hold only zeros: skipped
        first_key = max(c0, tiles[t].key_start) - batch.lead
        pv_matmuls(work.o_psum[:, j, :], work.probs_t[:, j], work.v_sb, (first_key - c0) // P_MAX, work.ends[j])
    work.probs_t = None


def update_stage(setup: PrefillSetup, work: BatchWork, out):
    """The output update of the work's tiles; stores a piece of the block when its tiles are done."""
    batch, block = work.batch, work.block
    update_output(work.state, work.o_psum, work.alpha, block.result[0:batch.rows, work.h, batch.tile_slice(), :],
                  setup.evict)
    work.o_psum = None
    block.finished(setup, batch.tiles(), out)


def super_block_tiles(setup: PrefillSetup, chunks, s0: int, s1: int):
    """The row tiles of tokens [s0, s1): [RowTile], a RowState of its own for a tile whose window
    meets several key chunks."""
    tiles = []
    for q0 in range(s0, s1, setup.tokens_per_tile):
        q1 = min(s1, q0 + setup.tokens_per_tile)
        lo = 0 if setup.window is None else max(0, q0 - setup.window + 1)
        n_chunks = sum([1 for c0, c1 in chunks if max(c0, lo) < min(c1, q1)])
        tiles.append(RowTile(q0, q1, lo, RowState((q1 - q0) * setup.group, n_chunks) if n_chunks > 1 else None))
    return tiles


def prefill_scores(setup: PrefillSetup, work: BatchWork):
    """The work's logits [rows, n, slot] in PSUM: QK per tile over its columns from `lead`, plus
    MASK_BIAS on its boundary regions (causal diagonal, window edge) through the one-hot matmul."""
    batch, block = work.batch, work.block
    rows, lead, width = batch.rows, batch.lead, batch.width
    c0 = work.chunk[0]
    tiles = block.tiles[work.h]
    q_parts = [q_part[:, work.h, :] for q_part in block.q_sb]
    scores = score_tile(rows, batch.count, width)
    jobs = []
    for j, t in enumerate(batch.tiles()):
        r0 = (tiles[t].token_start - block.s0) * setup.group
        jobs.append(QkJob(scores[:, j, :], [q_part[:, r0:r0 + rows] for q_part in q_parts], work.k_sb, lead, width,
                          max(c0, tiles[t].key_start) - c0, True))
    qk_batch_matmuls(jobs)
    for j, t in enumerate(batch.tiles()):
        q0, q1 = tiles[t].token_start, tiles[t].token_end
        a = max(c0, tiles[t].key_start)
        a_aligned = a - lead
        for m0, m1 in boundary_regions(q0, q1, a, a_aligned + width, setup.window):
            mask_matmuls(scores[:, j, :], setup.onehot[0:q1 - q0, 0:rows], setup.indicator(q1 - q0, m1 - m0, m0 - q0),
                         m0 - a_aligned, m1 - a_aligned)
    return scores


def onehot_mask_rows(tokens: int, group: int):
    """[tokens, tokens * group] bf16: MASK_BIAS where row r belongs to token r // group, else 0.

    The stationary of the mask matmul: `S[r, j] += onehot[t(r), r] * masked[t(r), j]`."""
    rows = tokens * group
    filled = nl.ndarray((tokens, rows), dtype=nl.bfloat16, buffer=nl.sbuf)
    nisa.memset(filled, MASK_BIAS, engine=nisa.gpsimd_engine)
    lower = nl.ndarray((tokens, rows), dtype=nl.bfloat16, buffer=nl.sbuf)
    # keep where r - group * t >= 0
    nisa.affine_select(lower, pattern=[[1, rows]], channel_multiplier=-group, on_true_tile=filled,
                       on_false_value=0.0, cmp_op=nl.greater_equal)
    onehot = nl.ndarray((tokens, rows), dtype=nl.bfloat16, buffer=nl.sbuf)
    # keep where group * t + group - 1 - r >= 0
    nisa.affine_select(onehot, pattern=[[-1, rows]], channel_multiplier=group, on_true_tile=lower,
                       on_false_value=0.0, cmp_op=nl.greater_equal, offset=group - 1)
    return onehot


def static_mask_indicator(tokens: int, width: int, key_minus_query: int, window):
    """[tokens, width] bf16, 1.0 where key `k0 + j` is masked for query `q0 + t`.

    `key_minus_query = k0 - q0`; masked iff k > q (causal) or k <= q - window."""
    ones = nl.ndarray((tokens, width), dtype=nl.bfloat16, buffer=nl.sbuf)
    nisa.memset(ones, 1.0, engine=nisa.gpsimd_engine)
    causal = nl.ndarray((tokens, width), dtype=nl.bfloat16, buffer=nl.sbuf)
    # (k - q) = key_minus_query + j - t > 0  -> masked
    nisa.affine_select(causal, pattern=[[1, width]], channel_multiplier=-1, on_true_tile=ones,
                       on_false_value=0.0, cmp_op=nl.greater, offset=key_minus_query)
    if window is None:
        return causal
    both = nl.ndarray((tokens, width), dtype=nl.bfloat16, buffer=nl.sbuf)
    # keep the causal bit where (k - q) + window > 0, else masked by the window
    nisa.affine_select(both, pattern=[[1, width]], channel_multiplier=-1, on_true_tile=causal,
                       on_false_value=1.0, cmp_op=nl.greater, offset=key_minus_query + window)
    return both


def boundary_regions(q0: int, q1: int, a: int, b: int, window):
    """Key ranges inside [a, b) where some query of tokens [q0, q1) is masked: the causal
    diagonal (keys > q0) and, with a window, the lower edge (keys < q1 - window)."""
    regions = []
    lo = max(a, q0 + 1)
    if lo < b:
        regions.append((lo, b))
    if window is not None:
        hi = min(b, q1 - window)
        if a < hi:
            regions.append((a, hi))
    return regions



# --------------------------------------------------------------------------- host launcher

def attention_prefill(q, k, v, scale: float, window=None, sink=None, lnc: int | None = None, **tuning):
    """Host launcher: prefill attention of one fresh sequence (queries = keys = the same T
    tokens, positions 0..T-1) on the backend (simulator or device).

    q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, Dv] (host arrays or device tensors of any float dtype;
    cast to bf16 on the device, Q after multiplying by `scale`), sink [Hq] or None; `tuning`: the
    kernel's share parameters. Returns (out [T, Hq, Dv] float32 device tensor, cost report or None)."""
    check_attention_shapes(q, k, v, sink, window)
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"attention_prefill: queries and keys are the same tokens; q has {q.shape[0]} "
                         f"tokens, k has {k.shape[0]} (use attention_decode for keys with a history)")
    t_len, hq, _ = q.shape
    kv_heads = k.shape[1]
    q_t = to_rows_t(q, kv_heads, scale)
    k_t, v_dev = kv_layout(k, (1, 2, 0)), kv_layout(v, (1, 0, 2))
    sink_rows = None if sink is None else sink_per_row(sink, kv_heads, hq // kv_heads)
    o_rows, rep = launch(attention_prefill_kernel, q_t, k_t, v_dev, sink_rows, None if window is None else int(window),
                         report=True, lnc=lnc, splits_lnc=True, **tuning)
    # [Hkv, R, tiles, Dv] (tile-major: one run per partition) -> [Hkv, T*G, Dv]
    o_rows = o_rows.permute(0, 2, 1, 3).reshape(kv_heads, -1, o_rows.shape[3])[:, :q_t.shape[2]]
    return from_rows(o_rows, t_len), rep
