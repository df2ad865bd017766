"""Flash-style prefill attention for MiMo-V2-Flash: causal full and sliding-window GQA with sinks.

Q/K head dim 192 (the QK contraction is split over partition tiles 128 + 64 and accumulated in
PSUM), V head dim 128, grouped-query attention without copying K/V per query head: the query
heads of one KV head are packed into the rows of one score tile.

Rows. A score tile holds 128 rows = `128 // G` consecutive tokens x the G query heads of one KV
head (row `t * G + i` is token t, head `g * G + i`). All rows share the KV head's keys, so one
matmul computes the scores of every head of the group, and a window of W keys costs about
`W + 128 / G` key columns per tile instead of the `W + 127` of a 128-token query block.

Q arrives multiplied by the softmax scale (on the device the scale folds into W_q), so the PSUM
scores are the logits. Per row tile and key chunk (up to 2048 keys = 4 PSUM banks of fp32):

    S      = Q K^T               TensorE, 128 + 64 contraction rows accumulated in PSUM
    S     += onehot^T @ masked   TensorE, only on boundary columns (causal diagonal, window edge)
    m      = max(m, rowmax(S))                                          VectorE reduce, GpSimd max
    P      = exp(S - m), rowsum  ScalarE (P in bf16), per tile only up to its last unmasked key
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

Engine balance (the cost report decides): per key column TensorE spends 2 cycles on QK (the
64-row half of the contraction costs as much as the 128-row half), 1 on the P transpose and 1 on
PV; VectorE reads every score once (row max), ScalarE once (exp), and the PSUM -> SBUF eviction
of P^T is split between them (`evict_vector_share`). Row tiles whose keys fit one chunk are
processed up to BATCH_TILES at a time, so the row max, the P^T eviction and the final 1/l scaling
are one instruction per batch (a window of 128 keys gives ~143-key tiles, where per-instruction
costs would otherwise dominate); `output_scalar_share` of the tiles instead get their 1/l scaling
one by one on ScalarE (0.4 for full attention, whose VectorE carries the long row maxes; 0 for
sliding windows). A batch shares its widest tile's logit columns for QK and the row max; the exp
and PV of each tile stop at its own last unmasked key (the rest of its P is zeroed by one GpSimd
memset per batch). `dma_transpose_share`
moves that share of the P transposes to the DMA queues: one SBUF -> SBUF 3-D `dma_transpose` per
batch, taking work off TensorE, VectorE and ScalarE. SBUF -> SBUF DMA transposes run at up to
50 % of DMA throughput (Trainium2 architecture guide; the cost model charges exactly that), so
the DMA queues saturate early for short sequences: full attention uses 0.5 below
LONG_PREFILL_TOKENS tokens and 0.75 from there (swept under the cost model: T = 512 52 % of
roofline at 0.5 vs 43 % at 0.75; T = 4096 69 % vs 75 %), sliding windows 0 (closer to
HBM-bound). The rate is an upper bound from the documentation, so this share is the first knob
to revisit on hardware.

The device helpers below are shared with `kernels/attention_decode.py`.
"""
from __future__ import annotations

import numpy as np
import ml_dtypes

from mimo_kernels.backend import nki, nl, nisa
from mimo_kernels.launch import launch
from mimo_kernels.checks import KernelInputError

P_MAX = nl.tile_size.pmax                       # partitions: score rows, keys per PV matmul
MATMUL_COLS = nl.tile_size.gemm_moving_fmax     # keys per QK matmul (one PSUM bank of fp32)
BANK_FP32 = nl.tile_size.psum_bank_fmax
CHUNK_KEYS = 4 * BANK_FP32                      # keys per softmax step (4 PSUM banks of scores)
SUPER_TOKENS = 1024                             # tokens whose row tiles share one K/V chunk load
BATCH_TILES = 8                                 # single-chunk row tiles per softmax instruction
MASK_BIAS = -1.0e30                             # added to masked logits (finite in bf16 and fp32)
NEG_MAX_CAP = -0.5 * MASK_BIAS                  # bound of -m: a fully masked row keeps exp() == 0
EVICT_VECTOR_SHARE = 0.3                        # share of P^T evictions on VectorE (rest ScalarE)
FULL_OUTPUT_SCALAR_SHARE = 0.4                  # share of row tiles whose O / l runs on ScalarE
# Share of P transposes done by DMA for full attention, short and long sequences (see docstring).
FULL_DMA_TRANSPOSE_SHARE = {"short": 0.5, "long": 0.75}
LONG_PREFILL_TOKENS = 2048
BF16 = ml_dtypes.bfloat16


# --------------------------------------------------------------------------- device helpers

class Share(nl.NKIObject):
    """Deterministic split of a stream of decisions: `take()` is True for `share` of the calls
    (Bresenham-style), `take_count(n)` for about `share * n` of n items."""

    def __init__(self, share: float):
        self.share = share
        self.acc = 0.0

    def take(self) -> bool:
        return self.take_count(1) == 1

    def take_count(self, n: int) -> int:
        before = int(self.acc)
        self.acc += self.share * n
        return int(self.acc) - before


class EvictEngines(nl.NKIObject):
    """PSUM -> SBUF copies go to VectorE for `vector_share` of them, ScalarE otherwise (the two
    engines that read PSUM; GpSimd cannot). The final O / l of batched row tiles is one VectorE
    instruction per batch, except `output_scalar_share` of the tiles, scaled one by one on
    ScalarE."""

    def __init__(self, vector_share: float, output_scalar_share: float = 0.0):
        self.vector = Share(vector_share)
        self.output_scalar = Share(output_scalar_share)

    def next(self):
        return nisa.vector_engine if self.vector.take() else nisa.scalar_engine

    def copy(self, dst, src, scale=None):
        """dst = src (* scale, a [P, 1] fp32 column) on the next engine."""
        engine = self.next()
        if scale is None:
            nisa.tensor_copy(dst, src, engine=engine)
        elif engine == nisa.vector_engine:
            nisa.tensor_scalar(dst, src, nl.multiply, scale)
        else:
            nisa.activation(dst, nl.copy, src, scale=scale)


class RowState(nl.NKIObject):
    """Online-softmax state of n row tiles processed together: negated running max (-m) and
    denominator l, [rows, n] fp32; the fp32 output accumulator O [rows, Dv] of a (lone) tile
    that spans several key chunks."""

    def __init__(self, rows: int, chunks: int, n: int = 1):
        self.rows = rows
        self.n = n
        self.chunks_left = chunks
        self.neg_m = None
        self.denom = None
        self.o_acc = None

    @property
    def first(self) -> bool:
        return self.neg_m is None


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


def bank_pieces(col0: int, col1: int):
    """Split score columns [col0, col1) at PSUM bank boundaries (a TensorE output fits one bank)."""
    pieces = []
    c = col0
    while c < col1:
        end = min(col1, (c // MATMUL_COLS + 1) * MATMUL_COLS)
        pieces.append((c, end))
        c = end
    return pieces


def slot_width(width: int) -> int:
    """Columns reserved per row tile in a batched score tile: a power of two >= width inside one
    PSUM bank (so no tile's scores straddle banks), whole banks beyond."""
    if width > BANK_FP32:
        return (width + BANK_FP32 - 1) // BANK_FP32 * BANK_FP32
    slot = P_MAX
    while slot < width:
        slot *= 2
    return slot


def score_tile(rows: int, n: int, width: int):
    """A [rows, n, slot_width(width)] fp32 PSUM tile: scores of n row tiles for one key chunk."""
    return nl.ndarray((rows, n, slot_width(width)), dtype=nl.float32, buffer=nl.psum)


def qk_matmuls(scores, q_parts, k_parts, col0: int, col1: int, key0: int, first: bool):
    """scores[:, col0:col1] (+)= sum over D partition tiles of Q^T[d, rows].T @ K^T[d, keys].

    `scores` is one tile's [rows, C] PSUM view; `q_parts` / `k_parts`: per D tile, [d, rows]
    stationaries and [d, keys] moving tiles; score column c holds key column
    `key0 + c - col0` of the K^T tiles."""
    for c0, c1 in bank_pieces(col0, col1):
        k0 = key0 + c0 - col0
        for i, (q_part, k_part) in enumerate(zip(q_parts, k_parts)):
            nisa.nc_matmul(scores[:, c0:c1], q_part, k_part[:, k0:k0 + (c1 - c0)],
                           accumulate=not (first and i == 0))


def mask_matmuls(scores, onehot, masked, col0: int, col1: int):
    """scores[:, col0:col1] += onehot^T @ masked: MASK_BIAS on the masked (row, key) pairs."""
    for c0, c1 in bank_pieces(col0, col1):
        nisa.nc_matmul(scores[:, c0:c1], onehot, masked[:, c0 - col0:c1 - col0], accumulate=True)


def softmax_step(scores, probs, col0: int, col1: int, state: RowState, neg_sink=None, ends=None):
    """One online-softmax step over logit columns [col0, col1) of n row tiles.

    `scores` [rows, n, C] PSUM, `probs` [rows, n, >= col1] bf16 SBUF (receives exp(S - m)),
    `neg_sink` [rows, 1] (-sink per row) or None, `ends` None or per tile the end of its own
    columns (<= col1; the batch's later columns are masked for it: exp() is skipped there and
    the caller zeroes them). Updates `state` (-m, l) and returns alpha = exp(m_old - m_new)
    [rows, n] (None on the first step). The [rows, n] bookkeeping runs on GpSimd, which is
    otherwise idle."""
    rows, n = state.rows, state.n
    gpsimd = nisa.gpsimd_engine
    neg_rowmax = nl.ndarray((rows, n), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_reduce(neg_rowmax, nl.maximum, scores[:, :, col0:col1], axis=2, negate=True)
    neg_m = nl.ndarray((rows, n), dtype=nl.float32, buffer=nl.sbuf)
    alpha = None
    if state.first and neg_sink is None:
        nisa.tensor_scalar(neg_m, neg_rowmax, nl.minimum, NEG_MAX_CAP)   # GpSimd: rsqrt only
    elif state.first:
        # the sink is the first "key": m = max(rowmax, sink)
        nisa.tensor_tensor(neg_m, neg_rowmax, neg_sink.broadcast(1, n), nl.minimum, engine=gpsimd)
    else:
        nisa.tensor_tensor(neg_m, neg_rowmax, state.neg_m, nl.minimum, engine=gpsimd)
        alpha = nl.ndarray((rows, n), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_tensor(alpha, neg_m, state.neg_m, nl.subtract, engine=gpsimd)
        nisa.activation(alpha, nl.exp, alpha)                       # exp(m_old - m_new)
    rowsum = nl.ndarray((rows, n), dtype=nl.float32, buffer=nl.sbuf)
    for j in range(n):
        end = col1 if ends is None else ends[j]
        # PSUM -> SBUF as bf16 probabilities; the row sums come from the fp32 values
        nisa.activation(probs[:, j, col0:end], nl.exp, scores[:, j, col0:end], bias=neg_m[:, j:j + 1],
                        reduce_op=nl.add, reduce_res=rowsum[:, j:j + 1],
                        reduce_cmd=nisa.reduce_cmd.reset_reduce)
    if alpha is not None:
        denom = nl.ndarray((rows, n), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_tensor(denom, state.denom, alpha, nl.multiply, engine=gpsimd)
        nisa.tensor_tensor(denom, denom, rowsum, nl.add, engine=gpsimd)
    elif neg_sink is None:
        denom = rowsum
    else:
        denom = nl.ndarray((rows, n), dtype=nl.float32, buffer=nl.sbuf)
        if n == 1:
            nisa.activation(denom, nl.exp, neg_sink, bias=neg_m, scale=-1.0)    # exp(sink - m)
        else:
            nisa.tensor_tensor(denom, neg_m, neg_sink.broadcast(1, n), nl.subtract, engine=gpsimd)
            nisa.activation(denom, nl.exp, denom)                   # exp(sink - m)
        nisa.tensor_tensor(denom, denom, rowsum, nl.add, engine=gpsimd)
    state.neg_m, state.denom = neg_m, denom
    return alpha


def transpose_probs(probs, width: int, evict: EvictEngines, dma_share: Share):
    """P [rows, n, >= 128 * ceil(width / 128)] bf16 (zero past `width`) -> P^T in SBUF as
    [128 keys, n, key tile, rows].

    Most 128 x 128 blocks go through TensorE transposes into PSUM, evicted one PSUM bank at a
    time; the last `dma_share` of them through SBUF -> SBUF DMA transposes."""
    rows, n = probs.shape[0], probs.shape[1]
    n_kt = (width + P_MAX - 1) // P_MAX
    blocks = [(j, kt) for j in range(n) for kt in range(n_kt)]
    n_pe = len(blocks) - dma_share.take_count(len(blocks))
    probs_t = nl.ndarray((P_MAX, n, n_kt, rows), dtype=nl.bfloat16, buffer=nl.sbuf)
    flat_t = probs_t.reshape((P_MAX, n * n_kt, rows))
    if n_pe:
        # blocks at a 128-column stride, so none straddles a PSUM bank whatever `rows` is
        probs_t_psum = nl.ndarray((P_MAX, n_pe, P_MAX), dtype=nl.bfloat16, buffer=nl.psum)
        for i, (j, kt) in enumerate(blocks[:n_pe]):
            nisa.nc_transpose(probs_t_psum[:, i, 0:rows], probs[:, j, kt * P_MAX:(kt + 1) * P_MAX])
        per_bank = BANK_FP32 * 4 // (P_MAX * 2)          # bf16 [128, 128] blocks per PSUM bank
        for b0 in range(0, n_pe, per_bank):
            b1 = min(n_pe, b0 + per_bank)
            evict.copy(flat_t[:, b0:b1, :], probs_t_psum[:, b0:b1, 0:rows])     # PSUM -> SBUF
    if n_pe < len(blocks):
        # SBUF -> SBUF: the remaining blocks (a suffix in (tile, key tile) order) in one 3-D DMA
        # transpose, [rows, block, 128 keys] -> [128 keys, block, rows]
        blocks_src = probs.reshape((rows, n * n_kt, P_MAX))
        nisa.dma_transpose(flat_t[:, n_pe:, :], blocks_src[:, n_pe:, :], axes=(2, 1, 0))
    return probs_t


def zero_probs_margins(probs, lead: int, width: int):
    """Zero P's columns before `lead` (keys before the tile's window, kept for 128-key alignment)
    and from `width` (the narrowest tile's end of exp columns) to the end of P's last 128-key
    tile, so every transpose is a full block (one memset over the whole tile when both margins
    exist; the exp overwrites the middle)."""
    end = probs.shape[2]
    if lead and end > width:
        nisa.memset(probs[:, :, 0:end], 0.0, engine=nisa.gpsimd_engine)
    elif lead:
        nisa.memset(probs[:, :, 0:lead], 0.0, engine=nisa.gpsimd_engine)
    elif end > width:
        nisa.memset(probs[:, :, width:end], 0.0, engine=nisa.gpsimd_engine)


def pv_matmuls(o_psum, probs_t, v_sb, v_tile0: int, width: int):
    """o_psum [rows, Dv] = sum over key tiles of P^T[keys, rows].T @ V[keys, Dv] for one row
    tile (`probs_t` [128, key tile, rows], `v_sb` [128, key tile, Dv])."""
    n_kt = (width + P_MAX - 1) // P_MAX
    for kt in range(n_kt):
        kw = min(P_MAX, width - kt * P_MAX)
        nisa.nc_matmul(o_psum, probs_t[0:kw, kt, :], v_sb[0:kw, v_tile0 + kt, :], accumulate=kt > 0)


def update_output(state: RowState, o_psum, alpha, result, evict: EvictEngines):
    """Fold a chunk's P V [rows, n, Dv] into the output; on the last chunk write O / l (bf16) into
    `result` [rows, n, Dv]. Single-chunk tiles are finished straight from PSUM; a tile with several
    chunks (n = 1) keeps O in SBUF."""
    state.chunks_left -= 1
    last = state.chunks_left == 0
    rows, n = state.rows, state.n
    if alpha is None and last:
        recip = nl.ndarray((rows, n), dtype=nl.float32, buffer=nl.sbuf)
        nisa.reciprocal(recip, state.denom)
        if n == 1:
            evict.copy(result[:, 0, :], o_psum[:, 0, :], scale=recip)   # PSUM -> SBUF, * 1/l, bf16
            return
        # PSUM -> SBUF, * 1/l, bf16: ScalarE takes its share of the tiles one at a time (a scale
        # column per instruction), VectorE the rest in one instruction (1/l broadcast over Dv)
        on_scalar = evict.output_scalar.take_count(n)
        for j in range(on_scalar):
            nisa.activation(result[:, j, :], nl.copy, o_psum[:, j, :], scale=recip[:, j:j + 1])
        if on_scalar < n:
            nisa.tensor_tensor(result[:, on_scalar:n, :], o_psum[:, on_scalar:n, :],
                               recip[:, on_scalar:n].expand_dim(2).broadcast(2, o_psum.shape[2]), nl.multiply)
        return
    if not (n == 1):
        raise KernelInputError(
            f"a row tile spanning several key chunks is processed alone, not {n} at a time")
    if alpha is None:
        state.o_acc = nl.ndarray((rows, o_psum.shape[2]), dtype=nl.float32, buffer=nl.sbuf)
        evict.copy(state.o_acc, o_psum[:, 0, :])
    else:
        nisa.scalar_tensor_tensor(state.o_acc, state.o_acc, nl.multiply, alpha, nl.add, o_psum[:, 0, :])
    if last:
        recip = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.reciprocal(recip, state.denom)
        nisa.tensor_tensor(result[:, 0, :], state.o_acc, recip.broadcast(1, state.o_acc.shape[1]), nl.multiply,
                           engine=nisa.gpsimd_engine)


def load_key_tiles(v_heads, c0: int, c1: int):
    """HBM -> SBUF: keys [c0, c1) of a [..., S, Dv] tensor as [128 keys, ..., key tile, Dv]
    (key c0 + 128 * kt + p on partition p); full tiles in one DMA, a ragged tail in a second."""
    lead = tuple(v_heads.shape[:-2])
    dv = v_heads.shape[-1]
    n_tiles = (c1 - c0 + P_MAX - 1) // P_MAX
    v_sb = nl.ndarray((P_MAX,) + lead + (n_tiles, dv), dtype=v_heads.dtype, buffer=nl.sbuf)
    keys_axis = len(lead)
    full = (c1 - c0) // P_MAX
    if full:
        src = v_heads[..., c0:c0 + full * P_MAX, :].reshape(lead + (full, P_MAX, dv))
        order = (keys_axis + 1,) + tuple(range(keys_axis + 1)) + (keys_axis + 2,)
        nisa.dma_copy(v_sb[..., 0:full, :], src.permute(order))
    tail = (c1 - c0) - full * P_MAX
    if tail:
        src = v_heads[..., c0 + full * P_MAX:c1, :]
        order = (keys_axis,) + tuple(range(keys_axis)) + (keys_axis + 1,)
        nisa.dma_copy(v_sb[0:tail, ..., full, :], src.permute(order))
    return v_sb


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


def store_rows(out_rows, row0: int, result, tile_rows):
    """SBUF [R, tiles, Dv] -> HBM rows row0...: one DMA for the full tiles, one for a ragged last."""
    rows_per_tile, _, dv = result.shape
    full = sum([1 for rows in tile_rows if rows == rows_per_tile])
    if full:
        dst = out_rows[row0:row0 + full * rows_per_tile, :].reshape((full, rows_per_tile, dv))
        nisa.dma_copy(dst.permute((1, 0, 2)), result[:, 0:full, :])
    if full < len(tile_rows):
        rows = tile_rows[full]
        start = row0 + full * rows_per_tile
        nisa.dma_copy(out_rows[start:start + rows, :], result[0:rows, full, :])


# --------------------------------------------------------------------------- the kernel

@nki.jit
def attention_prefill_kernel(q_t, k_t, v, sink_rows, window, dma_transpose_share=None,
                             evict_vector_share=EVICT_VECTOR_SHARE, output_scalar_share=None):
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
    Returns   [Hkv, T*G, Dv] bf16, rows in q_t's column order (token-major, then head).

    Loop: KV head -> super block of SUPER_TOKENS tokens (its Q^T stays in SBUF) -> key chunk of
    CHUNK_KEYS (K^T and V loaded once per super block) -> row tile. With LNC=2 the KV heads are
    split between the two cores. The three shares tune the engine balance (module docstring;
    None = the default for the attention type).
    """
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
    tokens_per_tile = P_MAX // group
    rows_per_tile = tokens_per_tile * group
    if sink_rows is not None:
        if not (sink_rows.shape == (kv_heads, rows_per_tile, 1)):
            raise KernelInputError(f"sink_rows {sink_rows.shape} must be [{kv_heads}, {rows_per_tile}, 1]")
    out = nl.ndarray((kv_heads, total_rows, dv), dtype=q_t.dtype, buffer=nl.shared_hbm)
    d_tiles = [(d0, min(d_head, d0 + P_MAX)) for d0 in range(0, d_head, P_MAX)]

    onehot = onehot_mask_rows(tokens_per_tile, group)
    indicators = {}          # (tokens, width, k0 - q0) -> masked indicator tile, built once
    if output_scalar_share is None:
        output_scalar_share = FULL_OUTPUT_SCALAR_SHARE if window is None else 0.0
    evict = EvictEngines(evict_vector_share, output_scalar_share)
    if dma_transpose_share is None:
        length = "long" if seq_len >= LONG_PREFILL_TOKENS else "short"
        dma_transpose_share = FULL_DMA_TRANSPOSE_SHARE[length] if window is None else 0.0
    dma_share = Share(dma_transpose_share)

    for g in range(nl.program_id(0), kv_heads, nl.num_programs(0)):
        neg_sink = None
        if sink_rows is not None:
            sink = nl.ndarray((rows_per_tile, 1), dtype=nl.float32, buffer=nl.sbuf)
            nisa.dma_copy(sink, sink_rows[g])
            neg_sink = nl.ndarray((rows_per_tile, 1), dtype=nl.float32, buffer=nl.sbuf)
            nisa.tensor_scalar(neg_sink, sink, nl.multiply, -1.0)
        for s0 in range(0, seq_len, SUPER_TOKENS):
            s1 = min(seq_len, s0 + SUPER_TOKENS)
            k_lo = 0 if window is None else max(0, s0 - window + 1)
            chunks = [(c0, min(s1, c0 + CHUNK_KEYS)) for c0 in range(k_lo, s1, CHUNK_KEYS)]
            tiles = []           # (q0, q1, first key, RowState of a tile spanning several chunks)
            for q0 in range(s0, s1, tokens_per_tile):
                q1 = min(s1, q0 + tokens_per_tile)
                lo = 0 if window is None else max(0, q0 - window + 1)
                n_chunks = sum([1 for c0, c1 in chunks if max(c0, lo) < min(c1, q1)])
                tiles.append((q0, q1, lo, RowState((q1 - q0) * group, n_chunks) if n_chunks > 1 else None))
            # HBM -> SBUF: Q^T of the super block, one DMA per D partition tile
            q_sb = []
            for d0, d1 in d_tiles:
                q_part = nl.ndarray((d1 - d0, (s1 - s0) * group), dtype=q_t.dtype, buffer=nl.sbuf)
                nisa.dma_copy(q_part, q_t[g, d0:d1, s0 * group:s1 * group])
                q_sb.append(q_part)
            result = nl.ndarray((rows_per_tile, len(tiles), dv), dtype=out.dtype, buffer=nl.sbuf)
            for c0, c1 in chunks:
                # HBM -> SBUF: K^T chunk per D tile, V chunk with keys on partitions
                k_sb = []
                for d0, d1 in d_tiles:
                    k_part = nl.ndarray((d1 - d0, c1 - c0), dtype=k_t.dtype, buffer=nl.sbuf)
                    nisa.dma_copy(k_part, k_t[g, d0:d1, c0:c1])
                    k_sb.append(k_part)
                v_sb = load_key_tiles(v[g], c0, c1)      # [128, key tile, Dv]
                for t_first, t_step, n, lead, width, rows in tile_batches(tiles, c0, c1, group):
                    state = tiles[t_first][3] or RowState(rows, 1, n)
                    members = [tiles[t_first + j * t_step] for j in range(n)]
                    # end of each tile's own logit columns; the batch's later ones are masked for it
                    ends = [min(c1, q1) - max(c0, lo) + lead for _, q1, lo, _ in members]
                    scores = score_tile(rows, n, width)
                    for j in range(n):
                        q0, q1, lo, _ = tiles[t_first + j * t_step]
                        a = max(c0, lo)
                        r0 = (q0 - s0) * group
                        qk_matmuls(scores[:, j, :], [q_part[:, r0:r0 + rows] for q_part in q_sb], k_sb,
                                   lead, width, a - c0, first=True)
                        a_aligned = a - lead
                        for m0, m1 in boundary_regions(q0, q1, a, a_aligned + width, window):
                            key = (q1 - q0, m1 - m0, m0 - q0)
                            if key not in indicators:
                                indicators[key] = static_mask_indicator(*key, window)
                            mask_matmuls(scores[:, j, :], onehot[0:q1 - q0, 0:rows], indicators[key],
                                         m0 - a_aligned, m1 - a_aligned)
                    probs = nl.ndarray((rows, n, (width + P_MAX - 1) // P_MAX * P_MAX), dtype=nl.bfloat16,
                                       buffer=nl.sbuf)
                    zero_probs_margins(probs, lead, min(ends))
                    alpha = softmax_step(scores, probs, lead, width, state,
                                         None if neg_sink is None else neg_sink[0:rows], ends)
                    del scores
                    probs_t = transpose_probs(probs, width, evict, dma_share)
                    del probs
                    o_psum = nl.ndarray((rows, n, dv), dtype=nl.float32, buffer=nl.psum)
                    for j in range(n):
                        # key tiles past the tile's own columns hold only zeros: skipped
                        a_aligned = max(c0, members[j][2]) - lead
                        pv_matmuls(o_psum[:, j, :], probs_t[:, j], v_sb, (a_aligned - c0) // P_MAX, ends[j])
                    del probs_t
                    t_last = t_first + (n - 1) * t_step
                    update_output(state, o_psum, alpha, result[0:rows, t_first:t_last + 1:t_step, :], evict)
                    del o_psum
                del k_sb, v_sb
            store_rows(out[g], s0 * group, result, [(q1 - q0) * group for q0, q1, _, _ in tiles])
            del q_sb, result
    return out


def batch_fits_psum(n: int, width: int) -> bool:
    """n row tiles of `width` logit columns fit the PSUM budget: scores in 4 banks, P^T blocks in
    2 (16 blocks of 128 x 128 bf16), the P V outputs [rows, n, 128] fp32 in 2."""
    n_kt = (width + P_MAX - 1) // P_MAX
    return n * slot_width(width) <= CHUNK_KEYS and n * n_kt <= 16 and n <= 8


def tile_batches(tiles, c0: int, c1: int, group: int):
    """Row tiles that meet key chunk [c0, c1), in batches processed together.

    Single-chunk tiles with the same rows and lead (offset of the tile's first key past a 128-key
    boundary of the chunk) batch up to BATCH_TILES at a constant tile step, so one strided view
    addresses their results; they share the batch's widest logit range (lead + keys), and each
    tile's extra columns are keys after its last query, masked by the causal boundary region. A
    tile spanning several chunks goes alone. Returns [(first tile, step, n, lead, width, rows)]."""
    batches = []
    candidates = {}          # (lead, rows) -> [(tile, first key, width)]
    for t, (q0, q1, lo, multi) in enumerate(tiles):
        a, b = max(c0, lo), min(c1, q1)
        if a >= b:
            continue            # this chunk is entirely outside the tile's window
        lead = (a - c0) % P_MAX
        if multi:
            batches.append((t, 1, 1, lead, b - a + lead, multi.rows))
        else:
            candidates.setdefault((lead, (q1 - q0) * group), []).append((t, a, b - a + lead))
    for (lead, rows), members in candidates.items():
        i = 0
        while i < len(members):
            t_first, _, width = members[i]
            n, step = 1, None
            while i + n < len(members) and n < BATCH_TILES:
                t_next, _, w_next = members[i + n]
                if step is not None and t_next - members[i + n - 1][0] != step:
                    break
                wider = max(width, w_next)
                fits = batch_fits_psum(n + 1, wider) and \
                    all([a - lead + wider <= c1 for _, a, _ in members[i:i + n + 1]])
                if not fits:
                    break
                step, width, n = t_next - members[i + n - 1][0], wider, n + 1
            batches.append((t_first, step or 1, n, lead, width, rows))
            i += n
    return batches


# --------------------------------------------------------------------------- host launcher

def check_attention_shapes(q, k, v, sink, window):
    """Validate reference-layout inputs (q [T, Hq, D], k [S, Hkv, D], v [S, Hkv, Dv]); raises
    ValueError naming the offending shape or limit."""
    if q.ndim != 3 or k.ndim != 3 or v.ndim != 3:
        raise ValueError(f"attention: q, k, v must be 3-D [tokens, heads, dim], got shapes "
                         f"{q.shape}, {k.shape}, {v.shape}")
    hq, d = q.shape[1:]
    s, hkv, dk = k.shape
    if dk != d:
        raise ValueError(f"attention: k head dim {dk} differs from q head dim {d} (k {k.shape}, q {q.shape})")
    if v.shape[:2] != (s, hkv):
        raise ValueError(f"attention: v {v.shape} must be [{s}, {hkv}, Dv] to match k {k.shape}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"attention: {hq} query heads are not a multiple of {hkv} KV heads")
    if hq // hkv > P_MAX:
        raise ValueError(f"attention: {hq // hkv} query heads per KV head exceed the {P_MAX} score rows")
    if v.shape[2] > P_MAX:
        raise ValueError(f"attention: V head dim {v.shape[2]} exceeds {P_MAX} (PV outputs and PSUM "
                         f"budget are sized for it)")
    if sink is not None and np.shape(sink) != (hq,):
        raise ValueError(f"attention: sink must have one logit per query head, shape ({hq},), got "
                         f"{np.shape(sink)}")
    if window is not None and (int(window) != window or window < 1):
        raise ValueError(f"attention: window must be a positive number of keys, got {window!r}")


def to_rows_t(q, kv_heads: int, scale: float):
    """q [T, Hq, D] -> [Hkv, D, T*G] bf16: Q * scale, transposed per KV head (column t*G + i)."""
    t_len, hq, d = q.shape
    group = hq // kv_heads
    scaled = np.asarray(q, np.float32) * np.float32(scale)
    return np.ascontiguousarray(
        scaled.reshape(t_len, kv_heads, group, d).transpose(1, 3, 0, 2).reshape(kv_heads, d, t_len * group)
    ).astype(BF16)


def from_rows(o_rows, t_len: int):
    """[Hkv, T*G, Dv] -> [T, Hq, Dv] float32."""
    kv_heads, total, dv = o_rows.shape
    group = total // t_len
    return np.asarray(o_rows, dtype=np.float32).reshape(kv_heads, t_len, group, dv) \
        .transpose(1, 0, 2, 3).reshape(t_len, kv_heads * group, dv)


def sink_per_row(sink, kv_heads: int, group: int):
    """[Hkv, R, 1] fp32: the sink logit of row r (head g*G + r % G) of a row tile."""
    rows = (P_MAX // group) * group
    heads = np.arange(kv_heads)[:, None] * group + np.arange(rows)[None, :] % group
    return np.asarray(sink, np.float32)[heads][..., None]


def attention_prefill(q, k, v, scale: float, window=None, sink=None, lnc: int | None = None, **tuning):
    """Host launcher: prefill attention of one fresh sequence (queries = keys = the same T
    tokens, positions 0..T-1) on the backend (simulator or device).

    q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, Dv] (any float dtype; cast to bf16, Q after
    multiplying by `scale`), sink [Hq] or None; `tuning`: the kernel's share parameters.
    Returns (out [T, Hq, Dv] float32, cost report or None)."""
    check_attention_shapes(q, k, v, sink, window)
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"attention_prefill: queries and keys are the same tokens; q has {q.shape[0]} "
                         f"tokens, k has {k.shape[0]} (use attention_decode for keys with a history)")
    t_len, hq, _ = q.shape
    kv_heads = k.shape[1]
    q_t = to_rows_t(q, kv_heads, scale)
    k_t = np.ascontiguousarray(np.asarray(k, np.float32).transpose(1, 2, 0)).astype(BF16)
    v_dev = np.ascontiguousarray(np.asarray(v, np.float32).transpose(1, 0, 2)).astype(BF16)
    sink_rows = None if sink is None else sink_per_row(sink, kv_heads, hq // kv_heads)
    o_rows, rep = launch(attention_prefill_kernel, q_t, k_t, v_dev, sink_rows, None if window is None else int(window),
                         report=True, lnc=lnc, splits_lnc=True, **tuning)
    return from_rows(o_rows, t_len), rep
