"""MiMo's sigmoid top-8 router (noaux_tc): fp32 logits, sigmoid, biased selection, renormalised weights.

    logits = x @ W                 x [T, H] fp32, W [H, E] fp32 ([in, out]), fp32 on TensorE
    s      = sigmoid(logits)       the unbiased scores
    chosen = top-8 of s + bias     the bias (e_score_correction_bias) selects only
    w      = s[chosen] / (sum + 1e-20) * routed_scaling_factor

Outputs per token: expert ids [T, 8] uint32 and weights [T, 8] fp32, ordered by descending
weight (the unbiased score). The set of ids is the reference's; the reference lists them by
descending biased score instead, and the MoE sum does not depend on the order.

Layout and engines, per block of up to 128 tokens:

* The router weight W [H, E] (4 MiB fp32) is loaded once, partition-major (hidden row p*H/128 + k
  on partition p, so each partition's rows are one contiguous run in HBM), in two chunks (three
  quarters, then a quarter; three chunks when TensorE also transposes the only block's x^T),
  each chunk as two DMAs over 64 partitions. At decode this stream is the whole cost: every DMA
  costs ~1.3 us of setup, and the last chunk's matmuls run after its last byte, one expert tile
  at a time so the first tile's sigmoid overlaps the second's matmuls.
* x^T [H on partitions, tokens], in the same partition-major order (the contraction dim must sit
  on partitions). fp32 cannot be DMA-transposed (2-byte data only), so it comes either by one
  strided DMA (runs of H/128 elements per partition and token: a third of the DMA rate) or as
  rows (one contiguous DMA) and TensorE transposes of the columns k, k + H/128, ... (exact in
  fp32, at a quarter of TensorE's rate). Up to 32 tokens always by the strided DMA (issued before
  the weight); larger blocks split the two ways, STRIDED_X_SHARE of them by DMA, which balances
  the DMA queues and TensorE in prefill. Each block's x is requested X_LOOKAHEAD blocks ahead, so
  its load is queued before the outputs of the blocks being computed.
* logits^T [experts on partitions, tokens] = W-tile.T @ x^T: the router weight is the stationary
  operand (128 experts) and the block's tokens stream as the moving operand, which is as fast as
  the other orientation for full tiles and 2x faster for a few tokens (a matmul costs max(64, N)
  moving columns, 4 cycles each in fp32). The contraction loop is outermost so the first block
  follows the weight chunks as they land.
* ScalarE applies the sigmoid while evicting PSUM; TensorE transposes the scores (fp32, exact)
  back to [tokens, experts] so the top-8 instructions see one token per partition; VectorE adds
  the selection bias there (loaded once, broadcast to a block's partitions by a stride-0 read).
* VectorE: max8 gives the 8 largest selection values; nc_match_replace8
  marks exactly the 8 positions holding them (ties at the 8th place go to the lowest expert id,
  as in the reference's stable sort, and never select more or fewer than 8); one instruction
  turns the halved scores (s/2, ScalarE) outside those 8 into s/2 - 1 < 0 <= s/2, so a second
  max8 and nc_find_index8 give the halved weights and their expert ids, aligned, with no
  gather; ScalarE sums the 8 and one divide normalises (halving cancels in the ratio).
* The ids and weights of a chunk of 512 tokens leave together (one DMA each for its whole
  blocks): every DMA pays ~1.3 us of setup on the engines it uses.

LNC=2: the two programs take alternate chunks of 512 tokens (a program without tokens loads
nothing), each writing only its tokens' rows.

Expert subsets: a disallowed expert gets a selection bias of -1e30 (done by the launcher), so it
can never be chosen while at least 8 experts are allowed.
"""
from __future__ import annotations

import numpy as np

from mimo_kernels.backend import nki, nl, nisa
from mimo_kernels.launch import launch, on_device
from mimo_kernels.checks import KernelInputError
from mimo_kernels.linear import tail_chunks

P = nl.tile_size.pmax                          # partitions: hidden rows per contraction tile
EXPERT_TILE = nl.tile_size.gemm_stationary_fmax   # experts per matmul (stationary free size)
TOKEN_CHUNK = nl.tile_size.gemm_moving_fmax    # tokens per matmul (moving free size)
PSUM_FMAX = nl.tile_size.psum_bank_fmax        # fp32 elements per partition of one PSUM bank
TOP_K = 8                                      # what max8 / nc_find_index8 produce
DISALLOWED_BIAS = -1e30                        # selection bias of an expert that must not be chosen
CHOSEN_MARK = float(np.finfo(np.float32).min)  # what nc_match_replace8 writes over the chosen 8
WEIGHT_EPSILON = 1e-20                         # the reference's guard: s / (sum + 1e-20)
X_TRANSPOSES_PER_BANK = PSUM_FMAX // P         # [P, tokens <= 128] fp32 transposes per PSUM bank
DIRECT_X_TOKENS = 32                           # up to this many tokens, x^T comes by one strided DMA
STRIDED_X_SHARE = 0.45        # of larger token blocks, this share gets x^T by strided DMA, not TensorE
X_LOOKAHEAD = 2              # token blocks whose x is requested before the current block's compute


def _weight_chunks(KT, transposes_first):
    """Contraction rows per partition of each router-weight DMA. Every DMA costs ~1.3 us of
    setup, and the matmuls of the last one run after the last byte: three quarters, then a
    quarter (TensorE, 2.4x faster than the stream, finishes the first chunk while the second
    lands). When TensorE also transposes the only block's x^T before its matmuls, it needs
    longer: half, then the rest but an eighth, then the eighth (`tail_chunks`)."""
    if transposes_first:
        return tail_chunks(KT)
    first = KT * 3 // 4
    return [c for c in (first, KT - first) if c > 0]


def _load_weight(w, chunks):
    """w_sb[p, k, e] = w[p*KT + k, e] (partition-major: one contiguous run per partition and
    chunk). Each chunk is two DMAs over 64 partitions (8 DMA engines each), so a token load can
    run beside one of them."""
    H, E = w.shape
    KT = H // P
    w_sb = nl.ndarray((P, KT, E), dtype=nl.float32, buffer=nl.sbuf)
    half = P // 2
    k0 = 0
    for kn in chunks:
        for p0 in (0, half):
            nisa.dma_copy(dst=w_sb[p0:p0 + half, k0:k0 + kn, :],
                          src=w.ap([[KT * E, half], [1, kn * E]], offset=p0 * KT * E + k0 * E))
        k0 += kn
    return w_sb


def _load_bias_rows(bias, rows):
    """bias_rows[t, e] = bias[e] on `rows` partitions (one per token of a block; a stride-0
    partition read of the 1 KiB bias): added to the scores once they are back in [tokens, experts]."""
    E = bias.shape[0]
    bias_rows = nl.ndarray((rows, E), dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=bias_rows, src=bias.ap([[0, rows], [1, E]]))
    return bias_rows


def _request_x(x, t0, ts, index):
    """Start loading the x of token block `index` (tokens t0 .. t0 + ts, ts <= 128). Returns
    (xT, rows): xT[p, t, k] = x[t0 + t, p*KT + k] (hidden on partitions, partition-major) by one
    strided DMA (runs of KT elements per partition and token) for up to DIRECT_X_TOKENS tokens and
    for a STRIDED_X_SHARE of the blocks, spread evenly; otherwise the rows (one contiguous DMA) that
    `_transpose_rows` turns into xT on TensorE. The strided DMA moves 128-byte runs at a third of
    the DMA rate, TensorE transposes fp32 at a quarter of its rate (a DMA transpose would need
    2-byte data); sharing the blocks keeps both queues busy."""
    H = x.shape[1]
    KT = H // P
    if ts <= DIRECT_X_TOKENS or int((index + 1) * STRIDED_X_SHARE) > int(index * STRIDED_X_SHARE):
        xT = nl.ndarray((P, ts, KT), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=xT, src=x.ap([[KT, P], [H, ts], [1, KT]], offset=t0 * H))
        return xT, None
    rows = nl.ndarray((ts, H), dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=rows, src=x[t0:t0 + ts, :])                  # HBM -> SBUF
    return None, rows


def _transpose_rows(rows, KT):
    """xT[p, t, k] = rows[t, p*KT + k]: TensorE transposes of the columns k, k + KT, ... (exact in
    fp32), evicted a PSUM bank at a time."""
    ts, H = rows.shape
    xT = nl.ndarray((P, ts, KT), dtype=nl.float32, buffer=nl.sbuf)
    for k0 in range(0, KT, X_TRANSPOSES_PER_BANK):
        kn = min(X_TRANSPOSES_PER_BANK, KT - k0)
        bank = nl.ndarray((P, kn, ts), dtype=nl.float32, buffer=nl.psum)
        for j in range(kn):
            nisa.nc_transpose(dst=bank[:, j, :], data=rows[:, k0 + j:H:KT])
        nisa.tensor_copy(dst=xT[:, :, k0:k0 + kn].permute((0, 2, 1)), src=bank)
    return xT


def _token_blocks(T, programs, me):
    """(first token, tokens) of this program's blocks of up to 128 tokens; with LNC=2 the programs
    take alternate chunks of TOKEN_CHUNK tokens."""
    blocks = []
    for t0 in range(me * TOKEN_CHUNK, T, programs * TOKEN_CHUNK):
        t1 = min(t0 + TOKEN_CHUNK, T)
        blocks += [(s0, min(P, t1 - s0)) for s0 in range(t0, t1, P)]
    return blocks


def _scores_and_selection(xT, w_sb, bias_rows, E, tail_rows):
    """sigmoid(x @ W) halved, and sigmoid + bias, for one token block, [ts tokens on
    partitions, E] each: logits^T per expert tile (W stationary, tokens moving), k outer so the
    first block follows the weight DMAs, except over the last `tail_rows` rows (the last weight
    DMA), which finish one expert tile at a time so the first tile's sigmoid runs beside the next
    tile's matmuls. Sigmoid on ScalarE while evicting, TensorE transposes back (fp32, exact),
    then the bias (VectorE) and the halved scores (ScalarE) per tile, so the first tile's run
    beside the second's transpose."""
    ts, KT = xT.shape[1], xT.shape[2]
    tiles = [(e0, nl.ndarray((min(EXPERT_TILE, E - e0), ts), dtype=nl.float32, buffer=nl.psum))
             for e0 in range(0, E, EXPERT_TILE)]
    for k in range(KT - tail_rows):
        for e0, logits_T in tiles:
            nisa.nc_matmul(dst=logits_T, stationary=w_sb[:, k, e0:e0 + logits_T.shape[0]], moving=xT[:, :, k])
    scores = nl.ndarray((ts, E), dtype=nl.float32, buffer=nl.psum)
    halves = nl.ndarray((ts, E), dtype=nl.float32, buffer=nl.sbuf)
    selection = nl.ndarray((ts, E), dtype=nl.float32, buffer=nl.sbuf)
    sigmoids = []
    for e0, logits_T in tiles:
        e1 = e0 + logits_T.shape[0]
        for k in range(KT - tail_rows, KT):
            nisa.nc_matmul(dst=logits_T, stationary=w_sb[:, k, e0:e1], moving=xT[:, :, k])
        s_T = nl.ndarray((e1 - e0, ts), dtype=nl.float32, buffer=nl.sbuf)
        nisa.activation(dst=s_T, op=nl.sigmoid, data=logits_T)     # PSUM -> SBUF, fp32
        sigmoids.append((e0, e1, s_T))
    for e0, e1, s_T in sigmoids:
        nisa.nc_transpose(dst=scores[:, e0:e1], data=s_T)
        nisa.tensor_tensor(dst=selection[:, e0:e1], data1=scores[:, e0:e1], data2=bias_rows[:ts, e0:e1], op=nl.add)
        nisa.activation(dst=halves[:, e0:e1], op=nl.copy, data=scores[:, e0:e1], scale=0.5)
    return halves, selection


def _top8_tokens(halves, selection, top_ids, top_weights, routed_scaling_factor):
    """Top-8 for the tokens of `halves` (= sigmoid scores / 2) and `selection` (= scores + bias)
    [ts, E] (SBUF, tokens on partitions) -> top_ids, top_weights [ts, 8] (SBUF).

    The weights are formed from half the scores (exact in fp32; the ratio is the same), which
    leaves [-1, -0.5] free for the unchosen: one instruction marks them, with no tie against a
    chosen score in [0, 0.5]. ScalarE sums the 8 while VectorE finds their ids."""
    ts, E = selection.shape
    top_selection = nl.ndarray((ts, TOP_K), dtype=nl.float32, buffer=nl.sbuf)
    nisa.max8(dst=top_selection, src=selection)
    # Replace exactly one occurrence per top value: 8 positions, ties resolved to the lower id.
    replaced = nl.ndarray((ts, E), dtype=nl.float32, buffer=nl.sbuf)
    nisa.nc_match_replace8(dst=replaced, data=selection, vals=top_selection, imm=CHOSEN_MARK)
    masked = nl.ndarray((ts, E), dtype=nl.float32, buffer=nl.sbuf)    # s/2 chosen, s/2 - 1 otherwise
    nisa.scalar_tensor_tensor(dst=masked, data=replaced, op0=nl.not_equal, operand0=CHOSEN_MARK,
                              op1=nl.subtract, operand1=halves, reverse1=True)
    top_halves = nl.ndarray((ts, TOP_K), dtype=nl.float32, buffer=nl.sbuf)
    nisa.max8(dst=top_halves, src=masked)
    nisa.nc_find_index8(dst=top_ids, data=masked, vals=top_halves)      # duplicates: successive ids
    # sum(s/2 + eps/16) over the 8 = (sum(s) + eps) / 2, the reference's denominator halved.
    total = nl.ndarray((ts, 1), dtype=nl.float32, buffer=nl.sbuf)
    unused = nl.ndarray((ts, TOP_K), dtype=nl.float32, buffer=nl.sbuf)
    nisa.activation(dst=unused, op=nl.copy, data=top_halves, bias=WEIGHT_EPSILON / (2 * TOP_K),
                    reduce_op=nl.add, reduce_res=total, reduce_cmd=nisa.reduce_cmd.reset_reduce)
    nisa.tensor_scalar(dst=top_weights, data=top_halves, op0=nl.divide, operand0=total,
                       op1=nl.multiply, operand1=float(routed_scaling_factor))


def _store_chunk(top_ids, top_weights, ids, weights, c0, tokens):
    """Rows c0 .. c0 + tokens of ids and weights from [P, blocks, 8] SBUF tiles (token c0 + b*P + p
    at [p, b]): the whole blocks by one DMA each, a partial last block by another (each DMA pays
    ~1.3 us, so a chunk's outputs go out together)."""
    full, rest = divmod(tokens, P)
    for dst, src in ((ids, top_ids), (weights, top_weights)):
        if full:
            nisa.dma_copy(dst=dst.ap([[TOP_K, P], [TOP_K * P, full], [1, TOP_K]], offset=c0 * TOP_K),
                          src=src[:, 0:full, :])
        if rest:
            nisa.dma_copy(dst=dst[c0 + full * P:c0 + tokens, :], src=src[0:rest, full, :])


@nki.jit
def router_kernel(x, w, bias, routed_scaling_factor=1.0):
    """Sigmoid top-8 routing of every token.

    x [T, H] fp32 (tokens, hidden); w [H, E] fp32 ([in, out]); bias [E] fp32, the selection-only
    bias (e_score_correction_bias, DISALLOWED_BIAS for experts that must not be chosen).
    H a multiple of 128; 8 <= E <= 512. Returns (ids [T, 8] uint32, weights [T, 8] fp32).
    """
    T, H = x.shape
    E = w.shape[1]
    if not (x.dtype == nl.float32 and w.dtype == nl.float32 and bias.dtype == nl.float32):
        raise KernelInputError(
            f"router: x, w and bias must be float32 (fp32 routing), got {x.dtype}, {w.dtype}, {bias.dtype}")
    if not (H % P == 0):
        raise KernelInputError(f"router: hidden size {H} must be a multiple of {P}")
    if not (tuple(w.shape) == (H, E)):
        raise KernelInputError(f"router: w shape {tuple(w.shape)} must be [hidden {H}, experts]")
    if not (TOP_K <= E <= PSUM_FMAX):
        raise KernelInputError(f"router: {E} experts; supported {TOP_K}..{PSUM_FMAX}")
    if not (tuple(bias.shape) == (E,)):
        raise KernelInputError(f"router: bias shape {tuple(bias.shape)} must be ({E},)")
    KT = H // P
    ids = nl.ndarray((T, TOP_K), dtype=nl.uint32, buffer=nl.shared_hbm)
    weights = nl.ndarray((T, TOP_K), dtype=nl.float32, buffer=nl.shared_hbm)
    blocks = _token_blocks(T, nl.num_programs(0), nl.program_id(0))
    if len(blocks) == 0:
        return ids, weights

    # The first tokens before the router weight (it then streams while nothing else waits); later
    # blocks' x X_LOOKAHEAD blocks ahead, so their loads never queue behind a block's outputs.
    pending = [_request_x(x, *blocks[0], 0)]
    single_transposed_block = len(blocks) == 1 and pending[0][0] is None
    chunks = _weight_chunks(KT, single_transposed_block)
    w_sb = _load_weight(w, chunks)                            # resident: 4 MiB at the MiMo shape
    tail_rows = chunks[-1]
    bias_rows = _load_bias_rows(bias, min(P, T))
    for i in range(1, min(X_LOOKAHEAD, len(blocks))):
        pending.append(_request_x(x, *blocks[i], i))
    for i, (t0, ts) in enumerate(blocks):
        if i + X_LOOKAHEAD < len(blocks):
            pending.append(_request_x(x, *blocks[i + X_LOOKAHEAD], i + X_LOOKAHEAD))
        xT, rows = pending.pop(0)
        if xT is None:
            xT = _transpose_rows(rows, KT)
        c0, b = t0 - t0 % TOKEN_CHUNK, t0 % TOKEN_CHUNK // P          # chunk start, block in it
        if b == 0:
            top_ids = nl.ndarray((P, TOKEN_CHUNK // P, TOP_K), dtype=nl.uint32, buffer=nl.sbuf)
            top_weights = nl.ndarray((P, TOKEN_CHUNK // P, TOP_K), dtype=nl.float32, buffer=nl.sbuf)
        halves, selection = _scores_and_selection(xT, w_sb, bias_rows, E, tail_rows)
        _top8_tokens(halves, selection, top_ids[:ts, b, :], top_weights[:ts, b, :], routed_scaling_factor)
        if i + 1 == len(blocks) or blocks[i + 1][0] % TOKEN_CHUNK == 0:
            _store_chunk(top_ids, top_weights, ids, weights, c0, t0 + ts - c0)
    return ids, weights


# --------------------------------------------------------------------------- host launcher

def routing_bias(correction_bias, allowed=None, experts: int | None = None) -> np.ndarray:
    """The bias the kernel adds to the scores: `correction_bias` [E] as float32, with
    DISALLOWED_BIAS on the experts `allowed` [E] (bool, None: all) excludes. Entries of exactly
    DISALLOWED_BIAS are experts excluded already (a bias this function made), so a caller can
    prepare the bias once and keep it resident: a float32 [E] bias with `allowed` None is returned
    as is."""
    bias = np.asarray(correction_bias, dtype=np.float32)
    bias = bias if bias.ndim == 1 else bias.reshape(-1)      # a 1-D float32 array stays the same object
    experts = bias.size if experts is None else experts
    if bias.shape != (experts,):
        raise ValueError(f"router: correction_bias has {bias.size} entries for {experts} experts")
    excluded = bias == np.float32(DISALLOWED_BIAS)
    if not np.all(np.isfinite(bias)) or np.abs(bias[~excluded]).max(initial=0.0) >= 1e29:
        raise ValueError("router: correction_bias must be finite and far from the disallowed bias -1e30 "
                         "(entries of exactly -1e30 mark excluded experts)")
    if allowed is not None:
        allowed = np.asarray(allowed, dtype=bool)
        if allowed.shape != bias.shape:
            raise ValueError(f"router: allowed has shape {allowed.shape}, expected {bias.shape}")
        excluded = excluded | ~allowed
    if (~excluded).sum() < TOP_K:
        raise ValueError(f"router: only {int((~excluded).sum())} experts are allowed but top_k is {TOP_K}")
    if allowed is None:
        return bias
    return np.where(excluded, np.float32(DISALLOWED_BIAS), bias).astype(np.float32)


def route(x, gate_weight_t, correction_bias, top_k=TOP_K, routed_scaling_factor=1.0, allowed=None,
          report=False, lnc=None):
    """Host launcher with the semantics of `ReferenceOps.router` / `reference.router`.

    x [T, H] (a float array or device tensor; routed in fp32), gate_weight_t [H, E] fp32 in the kernel layout
    [in, out] (the Hub's `mlp.gate.weight` [E, H] transposed), correction_bias [E], allowed [E]
    bool or None (expert subsets: only allowed experts are chosen); lnc: the logical-core degree
    (default the runtime's; at 2 the cores take alternate chunks of 512 tokens). Returns (ids [T, 8] int64,
    weights [T, 8] float32) as device tensors, plus the simulator's cost report when `report=True`.
    """
    x = on_device(x, np.float32)
    w = np.ascontiguousarray(gate_weight_t, dtype=np.float32)
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(f"router: x {tuple(x.shape)} must be [tokens, hidden] and gate_weight_t {w.shape} "
                         f"[hidden, experts] with the same hidden size")
    if top_k != TOP_K:
        raise ValueError(f"router: top_k={top_k}; the kernel selects exactly {TOP_K} (max8)")
    bias = routing_bias(correction_bias, allowed, w.shape[1])
    if x.shape[0] == 0:
        empty = (on_device(np.zeros((0, TOP_K), np.int64)), on_device(np.zeros((0, TOP_K), np.float32)))
        return (*empty, None) if report else empty
    result = launch(router_kernel, x, w, bias, float(routed_scaling_factor), report=report,
                    lnc=lnc, splits_lnc=True)
    (ids, weights), rep = (result, None) if not report else (result[0], result[1])
    ids = ids.long()
    return (ids, weights, rep) if report else (ids, weights)
