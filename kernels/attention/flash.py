"""Device helpers shared by the two attention kernels (`prefill.py`, `decode.py`): the online
softmax over PSUM score tiles, the QK / mask / PV matmuls, the P transposes, the output update,
K / V chunk loads, the batching of row tiles that share one softmax instruction, and the prefill's
split of the head dim over partition tiles (128 + 64; the decode kernel's row tiles are in `plan.py`).

Everything here runs at trace time inside a kernel (plain functions the NKI compiler inlines and
classes deriving from `NKIObject`); the algorithm is described in `prefill.py`'s docstring.
"""
from __future__ import annotations

from mimo_kernels.backend import nl, nisa
from mimo_kernels.checks import KernelInputError

P_MAX = nl.tile_size.pmax                       # partitions: score rows, keys per PV matmul
MATMUL_COLS = nl.tile_size.gemm_moving_fmax     # keys per QK matmul (one PSUM bank of fp32)
HALF_ROWS = P_MAX // 2                          # a row tile of the PE array (nc_matmul tile_size)
BANK_FP32 = nl.tile_size.psum_bank_fmax
CHUNK_KEYS = 4 * BANK_FP32                      # keys per softmax step (4 PSUM banks of scores)
BATCH_TILES = 8                                 # single-chunk row tiles per softmax instruction
MASK_BIAS = -1.0e30                             # added to masked logits (finite in bf16 and fp32)
NEG_MAX_CAP = -0.5 * MASK_BIAS                  # bound of -m: a fully masked row keeps exp() == 0


class Share(nl.NKIObject):
    """Deterministic split of a stream of decisions: `take()` is True for `share` of the calls
    (Bresenham-style), `take_count(n)` for about `share * n` of n items, `take_all(n)` True when
    taking all n items keeps the items taken nearest `share` of those seen."""

    def __init__(self, share: float):
        self.share = share
        self.acc = 0.0
        self.seen = 0
        self.taken = 0

    def take_all(self, n: int) -> bool:
        self.seen += n
        take = self.taken + n / 2 <= self.share * self.seen
        if take:
            self.taken += n
        return take

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


class QkJob(nl.NKIObject):
    """The QK of one tile's score view: scores[:, col0:col1] (+)= sum over D partition tiles of
    Q^T[d, rows].T @ K^T[d, keys]; `q_parts` / `k_parts` per D tile, score column c holds key
    column `key0 + c - col0` of the K^T tiles; `first`: the view starts a new accumulation."""
    scores: object
    q_parts: list
    k_parts: list
    col0: int
    col1: int
    key0: int
    first: bool


def qk_matmuls(scores, q_parts, k_parts, col0: int, col1: int, key0: int, first: bool):
    """The QK matmuls of one QkJob (the arguments are its fields)."""
    qk_batch_matmuls([QkJob(scores, q_parts, k_parts, col0, col1, key0, first)])


def qk_batch_matmuls(jobs):
    """The QK matmuls of several QkJobs, one per PSUM bank piece and D tile. The passes that start
    an accumulation and the full-height ones go first; the accumulating passes of D tiles of at
    most 64 rows (the 64 of 192) follow, alternating between the two 64-row halves of the PE array
    (nc_matmul row tiling), so each pair of them runs side by side in the time of one."""
    short = []
    for job in jobs:
        for c0, c1 in bank_pieces(job.col0, job.col1):
            k0 = job.key0 + c0 - job.col0
            for i, (q_part, k_part) in enumerate(zip(job.q_parts, job.k_parts)):
                dst, moving = job.scores[:, c0:c1], k_part[:, k0:k0 + (c1 - c0)]
                accumulate = not (job.first and i == 0)
                if q_part.shape[0] <= HALF_ROWS and accumulate:
                    short.append((dst, q_part, moving, accumulate))
                else:
                    nisa.nc_matmul(dst, q_part, moving, accumulate=accumulate)
    for n, (dst, q_part, moving, accumulate) in enumerate(short):
        nisa.nc_matmul(dst, q_part, moving, accumulate=accumulate, tile_position=((n % 2) * HALF_ROWS, 0),
                       tile_size=(HALF_ROWS, P_MAX))


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
    [rows, n] (None on the first step). Leaves -S in the tiles' own columns of `scores`. The
    denominator bookkeeping runs on GpSimd, which is otherwise idle."""
    rows, n = state.rows, state.n
    gpsimd = nisa.gpsimd_engine
    neg_m = nl.ndarray((rows, n), dtype=nl.float32, buffer=nl.sbuf)
    spans = [(col0, col1 if ends is None else ends[j]) for j in range(n)]
    for j, (a, b) in enumerate(spans):
        # the running -m starts at the sink's -logit (the sink is the first "key") or NEG_MAX_CAP
        start = state.neg_m[:, j:j + 1] if not state.first else NEG_MAX_CAP if neg_sink is None else neg_sink
        # one VectorE pass over the tile's own columns: the scores negated in place, and
        # -m = min(-m_old, min(-S)) through the accumulator loaded with -m_old
        nisa.tensor_scalar_reduce(scores[:, j, a:b], scores[:, j, a:b], nl.multiply, -1.0, reduce_op=nl.minimum,
                                  reduce_res=neg_m[:, j:j + 1], reduce_cmd=nisa.reduce_cmd.load_reduce,
                                  reduce_init=start)
    rowsum = nl.ndarray((rows, n), dtype=nl.float32, buffer=nl.sbuf)
    for j, (a, b) in enumerate(spans):
        # exp(-(-S) - m) PSUM -> SBUF as bf16 probabilities; the row sums come from the fp32 values
        nisa.activation(probs[:, j, a:b], nl.exp, scores[:, j, a:b], bias=neg_m[:, j:j + 1], scale=-1.0,
                        reduce_op=nl.add, reduce_res=rowsum[:, j:j + 1], reduce_cmd=nisa.reduce_cmd.reset_reduce)
    alpha = None
    if not state.first:
        alpha = nl.ndarray((rows, n), dtype=nl.float32, buffer=nl.sbuf)
        for j in range(n):
            nisa.activation(alpha[:, j:j + 1], nl.exp, state.neg_m[:, j:j + 1], bias=neg_m[:, j:j + 1],
                            scale=-1.0)                                 # exp(m_old - m_new)
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


def softmax_probs(scores, batch, state: RowState, neg_sink, ends):
    """The online-softmax step of a TileBatch over its logit columns [lead, width) of `scores`:
    (alpha as from softmax_step, P [rows, n, 128 * key tiles] bf16 in SBUF, zero outside each
    tile's own columns, ready for `transpose_probs`)."""
    n_kt = (batch.width + P_MAX - 1) // P_MAX
    probs = nl.ndarray((batch.rows, batch.count, n_kt * P_MAX), dtype=nl.bfloat16, buffer=nl.sbuf)
    zero_probs_margins(probs, batch.lead, min(ends))
    alpha = softmax_step(scores, probs, batch.lead, batch.width, state, neg_sink, ends)
    return alpha, probs


def softmax_transposed(scores, batch, state: RowState, neg_sink, ends, evict: EvictEngines, dma_share: Share):
    """`softmax_probs` (the scores are released before the transposes), then P^T in SBUF
    [128 keys, n, key tile, rows]. Returns (alpha, P^T)."""
    alpha, probs = softmax_probs(scores, batch, state, neg_sink, ends)
    del scores
    return alpha, transpose_probs(probs, batch.width, evict, dma_share)


def transpose_probs(probs, width: int, evict: EvictEngines, dma_share: Share):
    """P [rows, n, >= 128 * ceil(width / 128)] bf16 (zero past `width`) -> P^T in SBUF as
    [128 keys, n, key tile, rows]: `start_transpose` then `finish_transpose`."""
    return finish_transpose(start_transpose(probs, width, dma_share), evict)


class Transposing(nl.NKIObject):
    """P^T on its way to SBUF: `probs_t` [128 keys, n, key tile, rows] (its DMA-transposed blocks
    already written), the first `n_pe` blocks still in `psum` (None when there are none)."""
    probs_t: object
    psum: object
    n_pe: int


def start_transpose(probs, width: int, dma_share: Share):
    """The transposes of P's 128 x 128 blocks: most by TensorE into PSUM (evicted by
    `finish_transpose`), the last `dma_share` of them by one SBUF -> SBUF DMA transpose."""
    rows, n = probs.shape[0], probs.shape[1]
    n_kt = (width + P_MAX - 1) // P_MAX
    blocks = [(j, kt) for j in range(n) for kt in range(n_kt)]
    n_pe = len(blocks) - dma_share.take_count(len(blocks))
    probs_t = nl.ndarray((P_MAX, n, n_kt, rows), dtype=nl.bfloat16, buffer=nl.sbuf)
    psum = None
    if n_pe:
        # blocks at a 128-column stride, so none straddles a PSUM bank whatever `rows` is
        psum = nl.ndarray((P_MAX, n_pe, P_MAX), dtype=nl.bfloat16, buffer=nl.psum)
        for i, (j, kt) in enumerate(blocks[:n_pe]):
            nisa.nc_transpose(psum[:, i, 0:rows], probs[:, j, kt * P_MAX:(kt + 1) * P_MAX])
    if n_pe < len(blocks):
        # SBUF -> SBUF: the remaining blocks (a suffix in (tile, key tile) order) in one 3-D DMA
        # transpose, [rows, block, 128 keys] -> [128 keys, block, rows]
        flat_t = probs_t.reshape((P_MAX, n * n_kt, rows))
        blocks_src = probs.reshape((rows, n * n_kt, P_MAX))
        nisa.dma_transpose(flat_t[:, n_pe:, :], blocks_src[:, n_pe:, :], axes=(2, 1, 0))
    return Transposing(probs_t, psum, n_pe)


def finish_transpose(tr: Transposing, evict: EvictEngines):
    """Evict the TensorE-transposed blocks PSUM -> SBUF one PSUM bank at a time; returns P^T."""
    if tr.n_pe:
        _, n, n_kt, rows = tr.probs_t.shape
        flat_t = tr.probs_t.reshape((P_MAX, n * n_kt, rows))
        per_bank = BANK_FP32 * 4 // (P_MAX * 2)          # bf16 [128, 128] blocks per PSUM bank
        for b0 in range(0, tr.n_pe, per_bank):
            b1 = min(tr.n_pe, b0 + per_bank)
            evict.copy(flat_t[:, b0:b1, :], tr.psum[:, b0:b1, 0:rows])
    return tr.probs_t


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


def batch_fits_psum(n: int, width: int, score_columns: int = CHUNK_KEYS) -> bool:
    """n row tiles of `width` logit columns fit the PSUM budget: scores in `score_columns` fp32
    columns (4 banks by default), P^T blocks in 2 banks (16 blocks of 128 x 128 bf16), the P V
    outputs [rows, n, 128] fp32 in 2."""
    n_kt = (width + P_MAX - 1) // P_MAX
    return n * slot_width(width) <= score_columns and n * n_kt <= 16 and n <= 8


class RowTile(nl.NKIObject):
    """A row tile of one key-chunk loop: its queries are tokens [token_start, token_end) (in the
    prefill's positions; the decode kernel passes its visible keys' end in their place), it sees
    keys from `key_start`, and `state` is its own RowState when it spans several key chunks (None:
    single-chunk, batched with others)."""
    token_start: int
    token_end: int
    key_start: int
    state: RowState = None


class TileBatch(nl.NKIObject):
    """Row tiles first, first + step, ... (count of them) processed together for one key chunk:
    logit columns [lead, width) of a score tile of `rows` rows, lead = offset of the first key
    past a 128-key boundary of the chunk."""
    first: int
    step: int
    count: int
    lead: int
    width: int
    rows: int

    def tiles(self):
        """Indices of the batch's row tiles."""
        return list(range(self.first, self.first + self.count * self.step, self.step))

    def tile_slice(self, base: int = 0):
        """The batch's tiles as a strided slice of a [rows, tiles, Dv] result (tile base + first, ...)."""
        start = base + self.first
        return slice(start, start + (self.count - 1) * self.step + 1, self.step)


def tile_batches(tiles, c0: int, c1: int, group: int, score_columns: int = CHUNK_KEYS):
    """Row tiles (RowTile) that meet key chunk [c0, c1), in batches processed together.

    Single-chunk tiles with the same rows and lead (offset of the tile's first key past a 128-key
    boundary of the chunk) batch up to BATCH_TILES at a constant tile step, so one strided view
    addresses their results; they share the batch's widest logit range (lead + keys), and each
    tile's extra columns are keys after its last query, masked by the causal boundary region. A
    tile spanning several chunks goes alone. A batch's score tile holds at most `score_columns` fp32
    columns. Returns [TileBatch]."""
    batches = []
    candidates = {}          # (lead, rows) -> [BatchCandidate]
    for t, tile in enumerate(tiles):
        a, b = max(c0, tile.key_start), min(c1, tile.token_end)
        if a >= b:
            continue            # this chunk is entirely outside the tile's window
        lead = (a - c0) % P_MAX
        if tile.state is not None:
            batches.append(TileBatch(t, 1, 1, lead, b - a + lead, tile.state.rows))
        else:
            rows = (tile.token_end - tile.token_start) * group
            candidates.setdefault((lead, rows), []).append(BatchCandidate(t, a, b - a + lead))
    for (lead, rows), members in candidates.items():
        i = 0
        while i < len(members):
            batch = grow_batch(members, i, lead, c1, score_columns)
            batches.append(TileBatch(members[i].tile, batch.step, batch.count, lead, batch.width, rows))
            i += batch.count
    return batches


class BatchCandidate(nl.NKIObject):
    """A single-chunk row tile waiting for a batch: its index, first key and logit width."""
    tile: int
    first_key: int
    width: int


class GrownBatch(nl.NKIObject):
    """What `grow_batch` found: the tile step, the number of tiles and their widest logit range."""
    step: int
    count: int
    width: int


def grow_batch(members, i: int, lead: int, c1: int, score_columns: int):
    """The longest run of candidates from members[i] at a constant tile step (at most BATCH_TILES)
    whose widest logit range fits the PSUM budget and stays inside the chunk."""
    width = members[i].width
    n, step = 1, None
    while i + n < len(members) and n < BATCH_TILES:
        nxt = members[i + n]
        if step is not None and nxt.tile - members[i + n - 1].tile != step:
            break
        wider = max(width, nxt.width)
        fits = batch_fits_psum(n + 1, wider, score_columns) and \
            all([m.first_key - lead + wider <= c1 for m in members[i:i + n + 1]])
        if not fits:
            break
        step, width, n = nxt.tile - members[i + n - 1].tile, wider, n + 1
    return GrownBatch(step or 1, n, width)


def contraction_tiles(d_head: int):
    """Partition tiles of the QK contraction at full height: [(d0, d1)], 192 -> 128 + 64 (the prefill
    kernel: its Q^T and K^T load per tile)."""
    return [(d0, min(d_head, d0 + P_MAX)) for d0 in range(0, d_head, P_MAX)]

