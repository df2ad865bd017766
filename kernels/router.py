"""MiMo's sigmoid top-8 router (noaux_tc): fp32 logits, sigmoid, biased selection, renormalised weights.

    logits = x @ W                 x [T, H] fp32, W [H, E] fp32 ([in, out]), fp32 on TensorE
    s      = sigmoid(logits)       the unbiased scores
    chosen = top-8 of s + bias     the bias (e_score_correction_bias) selects only
    w      = s[chosen] / (sum + 1e-20) * routed_scaling_factor

Outputs per token: expert ids [T, 8] uint32 and weights [T, 8] fp32, ordered by descending
weight (the unbiased score). The set of ids is the reference's; the reference lists them by
descending biased score instead, and the MoE sum does not depend on the order.

Layout and engines, per chunk of up to 512 tokens:

* The router weight W [H, E] (4 MiB fp32) is loaded once, partition-major (hidden row p*H/128 + k
  on partition p, so each partition's rows are one contiguous run in HBM), in three chunks of
  decreasing size (half, then the rest but H/1024 rows, then those), each chunk as two DMAs over
  64 partitions. At decode this stream is the whole cost; the small last chunk leaves few
  matmuls for after it.
* x^T [H on partitions, tokens], in the same partition-major order (the contraction dim must sit
  on partitions): up to 32 tokens by one strided DMA (runs of H/128 elements per partition and
  token, issued before the weight); more tokens as rows (one contiguous DMA per 128) and TensorE
  transposes of the columns k, k + H/128, ... (exact in fp32; a DMA transpose needs 2-byte data).
* logits^T [experts on partitions, tokens] = W-tile.T @ x^T: the router weight is the stationary
  operand (128 experts) and tokens stream as the moving operand (up to 512 per matmul), which is
  as fast as the other orientation for full tiles and 2x faster for a few tokens (a matmul costs
  max(64, N) moving columns, 4 cycles each in fp32). The contraction loop is outermost so every
  expert tile follows the weight chunks as they land.
* ScalarE applies the sigmoid while evicting PSUM; in that layout the selection bias is one value
  per partition (VectorE tensor_scalar, the bias loaded transposed as [128, E/128], last). TensorE
  transposes the scores and the selection values (fp32, exact) back to [tokens, experts] so the
  top-8 instructions see one token per partition.
* VectorE: max8 gives the 8 largest selection values; nc_match_replace8
  marks exactly the 8 positions holding them (ties at the 8th place go to the lowest expert id,
  as in the reference's stable sort, and never select more or fewer than 8); the unbiased
  scores outside those 8 are pushed below zero (s - 2 < 0 <= s), so a second max8 and
  nc_find_index8 on them give the weights and their expert ids, aligned, with no gather.

LNC=2: the two programs take alternate chunks of 512 tokens (a program without tokens loads
nothing), each writing only its tokens' rows.

Expert subsets: a disallowed expert gets a selection bias of -1e30 (done by the launcher), so it
can never be chosen while at least 8 experts are allowed.
"""
from __future__ import annotations

import numpy as np

from mimo_kernels.backend import nki, nl, nisa
from mimo_kernels.launch import launch
from mimo_kernels.checks import KernelInputError

P = nl.tile_size.pmax                          # partitions: hidden rows per contraction tile
EXPERT_TILE = nl.tile_size.gemm_stationary_fmax   # experts per matmul (stationary free size)
TOKEN_CHUNK = nl.tile_size.gemm_moving_fmax    # tokens per matmul (moving free size)
PSUM_FMAX = nl.tile_size.psum_bank_fmax        # fp32 elements per partition of one PSUM bank
TOP_K = 8                                      # what max8 / nc_find_index8 produce
DISALLOWED_BIAS = -1e30                        # selection bias of an expert that must not be chosen
UNCHOSEN_PENALTY = -2.0                        # moves unchosen sigmoid scores (in [0, 1]) below 0
X_TRANSPOSES_PER_BANK = PSUM_FMAX // P         # [P, tokens <= 128] fp32 transposes per PSUM bank
DIRECT_X_TOKENS = 32                           # up to this many tokens, x^T comes by one strided DMA


def _weight_chunks(KT):
    """Contraction rows per partition of each router-weight DMA: half first, then smaller ones,
    so only a few matmuls remain after the last byte arrives."""
    first = (KT + 1) // 2
    last = KT // 8
    return [c for c in (first, KT - first - last, last) if c > 0]


def _load_weight(w):
    """w_sb[p, k, e] = w[p*KT + k, e] (partition-major: one contiguous run per partition and
    chunk). Each chunk is two DMAs over 64 partitions (8 DMA engines each), so a token load can
    run beside one of them."""
    H, E = w.shape
    KT = H // P
    w_sb = nl.ndarray((P, KT, E), dtype=nl.float32, buffer=nl.sbuf)
    half = P // 2
    k0 = 0
    for kn in _weight_chunks(KT):
        for p0 in (0, half):
            nisa.dma_copy(dst=w_sb[p0:p0 + half, k0:k0 + kn, :],
                          src=w.ap([[KT * E, half], [1, kn * E]], offset=p0 * KT * E + k0 * E))
        k0 += kn
    return w_sb


def _load_bias_transposed(bias):
    """bias_T[p, c] = bias[c*P + p]: the selection bias of expert tile c on its partitions (one
    value per partition, added to sigmoid(logits)^T with tensor_scalar)."""
    E = bias.shape[0]
    full = E // P
    bias_T = nl.ndarray((P, -(-E // P)), dtype=nl.float32, buffer=nl.sbuf)
    if full:
        nisa.dma_copy(dst=bias_T[:, 0:full], src=bias.ap([[1, P], [P, full]]))
    if E % P:
        nisa.dma_copy(dst=bias_T[:E % P, full:full + 1], src=bias.ap([[1, E % P], [1, 1]], offset=full * P))
    return bias_T


def _load_x_transposed(x, t0, tc, xT):
    """xT[p, t, k] = x[t0 + t, p*KT + k] for t < tc (hidden on partitions, partition-major).

    Up to DIRECT_X_TOKENS tokens: one DMA (runs of KT elements per partition and token); more: 128
    tokens at a time, one contiguous row per token (DMA), then TensorE transposes (exact in fp32;
    a DMA transpose would need 2-byte data)."""
    H = x.shape[1]
    KT = xT.shape[2]
    if tc <= DIRECT_X_TOKENS:
        nisa.dma_copy(dst=xT, src=x.ap([[KT, P], [H, tc], [1, KT]], offset=t0 * H))
        return
    for s0 in range(0, tc, P):
        sc = min(P, tc - s0)
        rows = nl.ndarray((sc, H), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=rows, src=x[t0 + s0:t0 + s0 + sc, :])    # HBM -> SBUF
        for k0 in range(0, KT, X_TRANSPOSES_PER_BANK):
            kn = min(X_TRANSPOSES_PER_BANK, KT - k0)
            bank = nl.ndarray((P, kn, sc), dtype=nl.float32, buffer=nl.psum)
            for j in range(kn):
                nisa.nc_transpose(dst=bank[:, j, :], data=rows[:, k0 + j:H:KT])
            nisa.tensor_copy(dst=xT[:, s0:s0 + sc, k0:k0 + kn].permute((0, 2, 1)), src=bank)


def _top8_tokens(scores, selection, ids, weights, t0, routed_scaling_factor):
    """Top-8 for the tokens of `scores` and `selection` (= scores + bias) [ts, E] (PSUM, tokens on
    partitions) -> HBM rows t0..."""
    ts, E = scores.shape
    top_selection = nl.ndarray((ts, TOP_K), dtype=nl.float32, buffer=nl.sbuf)
    nisa.max8(dst=top_selection, src=selection)
    # Replace exactly one occurrence per top value: 8 positions, ties resolved to the lower id.
    replaced = nl.ndarray((ts, E), dtype=nl.float32, buffer=nl.sbuf)
    nisa.nc_match_replace8(dst=replaced, data=selection, vals=top_selection, imm=nl.fp32.min)
    unchosen = nl.ndarray((ts, E), dtype=nl.float32, buffer=nl.sbuf)     # 1.0 where not replaced
    nisa.tensor_tensor(dst=unchosen, data1=selection, data2=replaced, op=nl.equal)
    masked = nl.ndarray((ts, E), dtype=nl.float32, buffer=nl.sbuf)       # s chosen, s - 2 otherwise
    nisa.scalar_tensor_tensor(dst=masked, data=unchosen, op0=nl.multiply, operand0=UNCHOSEN_PENALTY,
                              op1=nl.add, operand1=scores)
    top_scores = nl.ndarray((ts, TOP_K), dtype=nl.float32, buffer=nl.sbuf)
    nisa.max8(dst=top_scores, src=masked)
    top_ids = nl.ndarray((ts, TOP_K), dtype=nl.uint32, buffer=nl.sbuf)
    nisa.nc_find_index8(dst=top_ids, data=masked, vals=top_scores)      # duplicates: successive ids
    total = nl.ndarray((ts, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_reduce(dst=total, op=nl.add, data=top_scores, axis=1)
    nisa.tensor_scalar(dst=total, data=total, op0=nl.add, operand0=1e-20)
    inverse = nl.ndarray((ts, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.reciprocal(dst=inverse, data=total)
    top_weights = nl.ndarray((ts, TOP_K), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=top_weights, data=top_scores, op0=nl.multiply, operand0=inverse,
                       op1=nl.multiply, operand1=float(routed_scaling_factor))
    nisa.dma_copy(dst=ids[t0:t0 + ts, :], src=top_ids)                  # SBUF -> HBM
    nisa.dma_copy(dst=weights[t0:t0 + ts, :], src=top_weights)


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
    programs, me = nl.num_programs(0), nl.program_id(0)
    chunks = list(range(me * TOKEN_CHUNK, T, programs * TOKEN_CHUNK))   # LNC=2: alternate chunks
    if len(chunks) == 0:
        return ids, weights

    # The first tokens before the router weight (it then streams while nothing else waits).
    xT = nl.ndarray((P, min(TOKEN_CHUNK, T - chunks[0]), KT), dtype=nl.float32, buffer=nl.sbuf)
    _load_x_transposed(x, chunks[0], xT.shape[1], xT)
    w_sb = _load_weight(w)                                    # resident: 4 MiB at the MiMo shape
    bias_T = _load_bias_transposed(bias)           # needed last, so queued last

    for t0 in chunks:
        tc = min(TOKEN_CHUNK, T - t0)
        if t0 != chunks[0]:
            xT = nl.ndarray((P, tc, KT), dtype=nl.float32, buffer=nl.sbuf)
            _load_x_transposed(x, t0, tc, xT)
        tiles = []                                   # per expert tile: logits^T [ec, tc] (PSUM)
        for e0 in range(0, E, EXPERT_TILE):
            tiles.append((e0, nl.ndarray((min(EXPERT_TILE, E - e0), tc), dtype=nl.float32, buffer=nl.psum)))
        for k in range(KT):                          # k outer: every tile follows the weight DMAs
            for e0, logits_T in tiles:
                nisa.nc_matmul(dst=logits_T, stationary=w_sb[:, k, e0:e0 + logits_T.shape[0]],
                               moving=xT[:, :, k])
        scores_T = []                                # sigmoid(logits)^T and + bias, [ec, tc] each
        for c, (e0, logits_T) in enumerate(tiles):
            ec = logits_T.shape[0]
            s_T = nl.ndarray((ec, tc), dtype=nl.float32, buffer=nl.sbuf)
            nisa.activation(dst=s_T, op=nl.sigmoid, data=logits_T)     # PSUM -> SBUF, fp32
            sel_T = nl.ndarray((ec, tc), dtype=nl.float32, buffer=nl.sbuf)
            nisa.tensor_scalar(dst=sel_T, data=s_T, op0=nl.add, operand0=bias_T[:ec, c:c + 1])
            scores_T.append((e0, ec, s_T, sel_T))
        for s0 in range(0, tc, P):
            ts = min(P, tc - s0)
            scores = nl.ndarray((ts, E), dtype=nl.float32, buffer=nl.psum)
            selection = nl.ndarray((ts, E), dtype=nl.float32, buffer=nl.psum)
            for e0, ec, s_T, sel_T in scores_T:     # back to tokens on partitions (exact)
                nisa.nc_transpose(dst=scores[:, e0:e0 + ec], data=s_T[:, s0:s0 + ts])
                nisa.nc_transpose(dst=selection[:, e0:e0 + ec], data=sel_T[:, s0:s0 + ts])
            _top8_tokens(scores, selection, ids, weights, t0 + s0, routed_scaling_factor)
    return ids, weights


# --------------------------------------------------------------------------- host launcher

def route(x, gate_weight_t, correction_bias, top_k=TOP_K, routed_scaling_factor=1.0, allowed=None,
          report=False, lnc=None):
    """Host launcher with the semantics of `ReferenceOps.router` / `reference.router`.

    x [T, H] (any float array; routed in fp32), gate_weight_t [H, E] fp32 in the kernel layout
    [in, out] (the Hub's `mlp.gate.weight` [E, H] transposed), correction_bias [E], allowed [E]
    bool or None (expert subsets: only allowed experts are chosen); lnc: the logical-core degree
    (default the runtime's; at 2 the cores take alternate chunks of 512 tokens). Returns (ids [T, 8] int64,
    weights [T, 8] float32), plus the simulator's cost report when `report=True`.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    w = np.ascontiguousarray(gate_weight_t, dtype=np.float32)
    bias = np.array(correction_bias, dtype=np.float32).reshape(-1)
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(f"router: x {x.shape} must be [tokens, hidden] and gate_weight_t {w.shape} "
                         f"[hidden, experts] with the same hidden size")
    if top_k != TOP_K:
        raise ValueError(f"router: top_k={top_k}; the kernel selects exactly {TOP_K} (max8)")
    if bias.shape != (w.shape[1],):
        raise ValueError(f"router: correction_bias has {bias.size} entries for {w.shape[1]} experts")
    if not np.all(np.isfinite(bias)) or np.abs(bias).max(initial=0.0) >= 1e29:
        raise ValueError("router: correction_bias must be finite and far from the disallowed bias -1e30")
    if allowed is not None:
        allowed = np.asarray(allowed, dtype=bool)
        if allowed.shape != bias.shape:
            raise ValueError(f"router: allowed has shape {allowed.shape}, expected {bias.shape}")
        if allowed.sum() < TOP_K:
            raise ValueError(f"router: only {int(allowed.sum())} experts are allowed but top_k is {TOP_K}")
        bias = np.where(allowed, bias, np.float32(DISALLOWED_BIAS)).astype(np.float32)
    if x.shape[0] == 0:
        empty = (np.zeros((0, TOP_K), np.int64), np.zeros((0, TOP_K), np.float32))
        return (*empty, None) if report else empty
    result = launch(router_kernel, x, w, bias, float(routed_scaling_factor), report=report,
                    lnc=lnc, splits_lnc=True)
    (ids, weights), rep = (result, None) if not report else (result[0], result[1])
    ids = ids.astype(np.int64)
    return (ids, weights, rep) if report else (ids, weights)
