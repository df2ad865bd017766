"""Attention of new tokens against a KV cache, for ragged batches: decode (one new token per
sequence) and prefill on a history (several new tokens on top of cached keys), full layers
(every cached key) and sliding-window layers (the ring buffer of the window).

Device layout of the cache (what the kernel reads; the model's `LayerKVCache` arrays
`k [B, slots, Hkv, D]`, `v`, `pos [B, slots]` map onto it by a transpose, slot order kept):

    k_t   [B, Hkv, D, S]   bf16  keys transposed: D on partitions, keys contiguous (one DMA
                                 brings a whole key chunk of all KV heads of a sequence)
    v     [B, Hkv, S, Dv]  bf16  values, keys on partitions when loaded
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
= V_piece^T P^T[:, piece rows]` (moving = the piece's P^T columns), and the tile's O^T is transposed
back once per chunk for the online-softmax rescale. Pieces of one tile cover the same key range
(sequences of similar length are packed together).

Masks (only over the key ranges the host plan flags: keys newer than some query or padding, and
keys outside some query's window): the 0/1 indicator [tokens, keys] = (k_pos > q_pos) and/or
(k_pos <= q_pos - W) is computed on GpSimd or VectorE from the positions over those columns only,
and added as MASK_BIAS through the one-hot matmul of the prefill kernel.

Batches. The single-chunk tiles of a split unit go through the softmax in batches (the prefill
kernel's `tile_batches`: same lead, constant tile step, PSUM budget), so the row max, the [rows, n]
bookkeeping, the P^T evictions and the final 1/l scaling are one instruction per batch. A batch
shares its widest logit range; a tile's columns past its own keys get MASK_BIAS through the same
one-hot matmul with an all-ones indicator, and its exp() and P V skip them. The softmax machinery is the prefill kernel's (`kernels/attention_prefill.py`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mimo_kernels.backend import nki, nl, nisa
from mimo_kernels.launch import launch
from mimo_kernels.attention_prefill import (
    BF16, CHUNK_KEYS, MASK_BIAS, P_MAX, EvictEngines, RowState, Share, attention_prefill,
    check_attention_shapes, load_key_tiles, mask_matmuls, pv_matmuls, qk_matmuls, score_tile, softmax_step, store_rows,
    tile_batches, transpose_probs, update_output, zero_probs_margins)
from mimo_kernels.checks import KernelInputError

EMPTY_POSITION = float(2 ** 30)      # key slot holding no key: later than every query
EVICT_VECTOR_SHARE = 0.2
MASK_VECTOR_SHARE = {"full": 0.0, "swa": 0.6}   # mask indicators on VectorE (GpSimd the rest)
# share of P^T blocks of split tiles transposed by SBUF -> SBUF DMA (packed decode tiles: none;
# the DMA queues carry their K / V)
SPLIT_DMA_TRANSPOSE_SHARE = {"full": 0.3, "swa": 0.0}
PREFILL_MIN_TOKENS = 128          # shorter fresh prompts join the cached-attention launch
GROUP_SBUF_BYTES = 96 * 1024     # per partition: Q^T, K^T and V chunks of units sharing their DMAs


# --------------------------------------------------------------------------- the kernel

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


@nki.jit
def attention_decode_kernel(q_t, k_t, v, kpos, qpos, tile_onehot, sink_rows, plan, window,
                            evict_vector_share=EVICT_VECTOR_SHARE, mask_vector_share=None,
                            split_dma_transpose_share=None):
    """New tokens of a ragged batch against their sequences' cached keys.

    q_t         [B, Hkv, D, Tq*G] bf16  Q * softmax scale, transposed: column t*G + i = new token
                                        t, query head g*G + i of sequence b.
    k_t         [B, Hkv, D, S]    bf16  cache keys transposed (module docstring).
    v           [B, Hkv, S, Dv]   bf16  cache values.
    kpos        [B, S]            fp32  key positions (EMPTY_POSITION for empty slots).
    qpos        [B, Tq]           fp32  positions of the new tokens.
    tile_onehot [tiles, NT, 128]  bf16  MASK_BIAS where a tile row belongs to tile token t.
    sink_rows   [tiles, 128, 1]   fp32  or None: each tile row's sink logit.
    plan        (group, units) from `plan_decode_units`. A unit shares its Q, K, V and position
                loads between its row tiles, and consecutive packed units of the same shape share
                their Q, K, V and output DMAs (`unit_groups`): `(runs, tiles)`; a run (b0, count, kv0, kv1, t0, t1)
                is sequences b0 .. b0+count-1, KV heads [kv0, kv1), new tokens [t0, t1), rows
                ordered (sequence, KV head, token, query head). Either one tile holds all the
                runs' rows (short sequences packed), or the unit has one run of one sequence and
                KV head and its tiles split the tokens. A tile (rows, ta, tb, k_lo, k_hi, masked):
                tokens [ta, tb) of the unit's run (all rows when packed), cache keys [k_lo, k_hi)
                (the others are invisible to its queries), masked[c] the key ranges of the unit's
                key chunk c (2048 keys from the smallest k_lo of the unit) that need the position
                mask, (first, end, late, early) from `mask_regions` (empty: no mask).
    window      int or None             keys a query sees, itself included.
    mask_vector_share                   share of the mask indicators computed on VectorE, GpSimd
                                        the rest (None: MASK_VECTOR_SHARE of the layer type).
    split_dma_transpose_share           share of the split tiles' P^T blocks transposed by DMA
                                        (None: SPLIT_DMA_TRANSPOSE_SHARE of the layer type).
    Returns     [sum of tile rows, Dv] bf16: the tiles' rows, in plan order.

    The head dim D splits into equal partition tiles (192 = 96 + 96; TensorE time does not depend
    on the contraction rows), so Q^T and each K^T chunk arrive in one DMA. LNC=2 splits the unit
    groups between the two cores.
    """
    n_seqs, kv_heads, d_head, q_cols = q_t.shape
    s_max = k_t.shape[3]
    dv = v.shape[3]
    group, units = plan
    if not (k_t.shape[:3] == (n_seqs, kv_heads, d_head)):
        raise KernelInputError(f"k_t {k_t.shape} must be [{n_seqs}, {kv_heads}, {d_head}, S]")
    if not (v.shape[:3] == (n_seqs, kv_heads, s_max)):
        raise KernelInputError(f"v {v.shape} must be [{n_seqs}, {kv_heads}, {s_max}, Dv]")
    if not (kpos.shape == (n_seqs, s_max)):
        raise KernelInputError(f"kpos {kpos.shape} must be [{n_seqs}, {s_max}]")
    if not (dv <= P_MAX):
        raise KernelInputError(f"V head dim {dv} exceeds {P_MAX} (V is a matmul stationary in packed tiles)")
    if not (q_cols % group == 0 and qpos.shape == (n_seqs, q_cols // group)):
        raise KernelInputError(
            f"qpos {qpos.shape} must be [{n_seqs}, {q_cols // group}] for q_t {q_t.shape} and G = {group}")
    out = nl.ndarray((sum([t[0] for _, tiles in units for t in tiles]), dv), dtype=q_t.dtype,
                     buffer=nl.shared_hbm)
    n_dp = (d_head + P_MAX - 1) // P_MAX
    dp = d_head // n_dp              # 192 -> 96 + 96: Q^T and K^T each load in one DMA
    if not (dp * n_dp == d_head):
        raise KernelInputError(f"head dim {d_head} must split into {n_dp} equal partition tiles")
    evict = EvictEngines(evict_vector_share)
    no_dma = Share(0.0)
    if split_dma_transpose_share is None:
        split_dma_transpose_share = SPLIT_DMA_TRANSPOSE_SHARE["full" if window is None else "swa"]
    split_dma = Share(split_dma_transpose_share)
    if mask_vector_share is None:
        mask_vector_share = MASK_VECTOR_SHARE["full" if window is None else "swa"]
    mask_vector = Share(mask_vector_share)
    memset_engines = [nisa.gpsimd_engine, nisa.vector_engine]     # memset: VectorE or GpSimd only
    padded_q = {}            # (packed-tile layout, units) -> Q^T buffer zeroed outside each piece, set up once
    per_layout = {}          # (rows, tile layout) -> [-sink rows, mask one-hot], loaded once
    ones = None              # [128, keys] 1.0: the mask of a batch's columns past a tile's own keys
    if any([len(tiles) > 1 for _, tiles in units]):    # (batches of 2+ tiles are <= CHUNK_KEYS / 2 wide)
        ones = nl.ndarray((P_MAX, CHUNK_KEYS // 2), dtype=nl.bfloat16, buffer=nl.sbuf)
        nisa.memset(ones, 1.0, engine=nisa.gpsimd_engine)
    unit_row0, unit_tile0 = [0], [0]
    for _, tiles in units:
        unit_row0.append(unit_row0[-1] + sum([t[0] for t in tiles]))
        unit_tile0.append(unit_tile0[-1] + len(tiles))

    for gi, (u_first, n_units) in enumerate(unit_groups(units, kv_heads, d_head, dv, nl.num_programs(0))):
        if gi % nl.num_programs(0) != nl.program_id(0):
            continue
        runs, tiles = units[u_first]
        seqs = sum([r[1] for r in runs])           # unit u of the group: runs shifted by u * seqs sequences
        packed = len(tiles) == 1 and (len(runs) > 1 or runs[0][1] > 1 or runs[0][3] - runs[0][2] > 1)
        pieces = []          # (run, sequence in run, KV head in run, first row, rows) of a packed tile
        piece_row = 0
        for ri, (_, count, kv0, kv1, t0, t1) in enumerate(runs):
            for bl in range(count):
                for j in range(kv1 - kv0):
                    pieces.append((ri, bl, j, piece_row, (t1 - t0) * group))
                    piece_row += (t1 - t0) * group
        if packed:
            if not (piece_row == tiles[0][0]):
                raise KernelInputError(f"unit {u_first}: runs give a different row count than {tiles[0][0]}")

        # HBM -> SBUF: Q^T of the group's units, one DMA per run
        if packed:
            rows0 = tiles[0][0]
            layout = (rows0, tuple([p[3:] for p in pieces]), tuple([r[2:4] for r in runs]))
            if (layout, n_units) not in padded_q:
                buf = nl.ndarray((dp, n_dp, n_units, len(pieces), rows0), dtype=q_t.dtype, buffer=nl.sbuf)
                for u in range(n_units):
                    nisa.memset(buf[:, :, u], 0.0, engine=memset_engines[(len(padded_q) + u) % 2])
                padded_q[(layout, n_units)] = buf
            buf = padded_q[(layout, n_units)]
            unit_size = len(pieces) * rows0
            p = 0
            for b0, count, kv0, kv1, t0, t1 in runs:
                n = (t1 - t0) * group
                # piece p + m of unit u -> buf[:, h, u, p + m, r0 + m n : r0 + (m + 1) n]
                dst = buf.ap([[n_dp * n_units * unit_size, dp], [n_units * unit_size, n_dp], [unit_size, n_units],
                              [rows0 + n, count * (kv1 - kv0)], [1, n]], offset=p * rows0 + pieces[p][3])
                src = q_t[b0:b0 + n_units * count, kv0:kv1, :, t0 * group:t1 * group]
                nisa.dma_copy(dst, src.reshape((n_units * count, kv1 - kv0, n_dp, dp, n)).permute((3, 2, 0, 1, 4)))
                p += count * (kv1 - kv0)
        else:
            b, _, g, _, t0, t1 = runs[0]
            q_unit = nl.ndarray((dp, n_dp, (t1 - t0) * group), dtype=q_t.dtype, buffer=nl.sbuf)
            nisa.dma_copy(q_unit, q_t[b, g, :, t0 * group:t1 * group].reshape((n_dp, dp, (t1 - t0) * group))
                          .permute((1, 0, 2)))
            layout = (tiles[0][0], g)

        # per unit and tile: its stationaries, -sink rows, one-hot and query positions (for masks)
        split_tokens = max([t[2] - t[1] for t in tiles])
        unit_lo, unit_hi = min([t[3] for t in tiles]), max([t[4] for t in tiles])
        chunks = [(c0, min(unit_hi, c0 + CHUNK_KEYS)) for c0 in range(unit_lo, unit_hi, CHUNK_KEYS)]
        tile_setup = []      # per unit: per tile (stationaries, query positions, RowState if several chunks)
        for u in range(n_units):
            tiles = units[u_first + u][1]
            unit_setup = []
            if any([any(t[5]) for t in tiles]) and not packed:
                # query positions of the split tokens as columns: [tokens per tile, tile]
                qpos_cols = nl.ndarray((split_tokens, len(tiles)), dtype=nl.float32, buffer=nl.sbuf)
                full = sum([1 for t in tiles if t[2] - t[1] == split_tokens])
                nisa.dma_copy(qpos_cols[:, 0:full], qpos[b, t0:t0 + full * split_tokens]
                              .reshape((full, split_tokens)).permute((1, 0)))
                if full < len(tiles):
                    ta, tb = tiles[full][1:3]
                    nisa.dma_copy(qpos_cols[0:tb - ta, full:full + 1], qpos[b:b + 1, t0 + ta:t0 + tb])
            for j, (rows, ta, tb, k_lo, k_hi, masked) in enumerate(tiles):
                key = (rows, layout)
                if key not in per_layout:
                    neg_sink = onehot = None
                    if sink_rows is not None:
                        sink = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
                        nisa.dma_copy(sink, sink_rows[unit_tile0[u_first + u] + j, 0:rows, :])
                        neg_sink = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
                        nisa.tensor_scalar(neg_sink, sink, nl.multiply, -1.0)
                    per_layout[key] = [neg_sink, onehot]
                if (any(masked) or len(tiles) > 1) and per_layout[key][1] is None:
                    onehot = nl.ndarray((tb - ta, rows), dtype=nl.bfloat16, buffer=nl.sbuf)
                    nisa.dma_copy(onehot, tile_onehot[unit_tile0[u_first + u] + j, 0:tb - ta, 0:rows])
                    per_layout[key][1] = onehot
                if packed:
                    stationaries = [[buf[:, h, u, p, :] for p in range(len(pieces))] for h in range(n_dp)]
                    qpos_col = None
                    if any(masked):
                        qpos_col = nl.ndarray((tb - ta, 1), dtype=nl.float32, buffer=nl.sbuf)
                        tok = 0
                        for b0, count, _, _, t0, t1 in runs:
                            for s in range(b0 + u * seqs, b0 + u * seqs + count):
                                nisa.dma_copy(qpos_col[tok:tok + t1 - t0, :], qpos[s:s + 1, t0:t1])
                                tok += t1 - t0
                else:
                    stationaries = [[q_unit[:, h, ta * group:tb * group]] for h in range(n_dp)]
                    qpos_col = qpos_cols[0:tb - ta, j:j + 1] if any(masked) else None
                n_chunks = sum([1 for c0, c1 in chunks if max(c0, k_lo) < min(c1, k_hi)])
                unit_setup.append((stationaries, qpos_col, RowState(rows, n_chunks) if n_chunks > 1 else None))
            tile_setup.append(unit_setup)
        result = nl.ndarray((max([t[0] for t in tiles]), n_units * len(tiles), dv), dtype=out.dtype, buffer=nl.sbuf)

        for ci, (c0, c1) in enumerate(chunks):
            # HBM -> SBUF: per run, the key chunk of K^T and of V for all the group's units
            k_sb, v_sb = [], []
            for b0, count, kv0, kv1, _, _ in runs:
                k_part = nl.ndarray((dp, n_dp, n_units * count, kv1 - kv0, c1 - c0), dtype=k_t.dtype, buffer=nl.sbuf)
                src = k_t[b0:b0 + n_units * count, kv0:kv1, :, c0:c1]
                nisa.dma_copy(k_part, src.reshape((n_units * count, kv1 - kv0, n_dp, dp, c1 - c0))
                              .permute((3, 2, 0, 1, 4)))
                k_sb.append(k_part)
                v_sb.append(load_key_tiles(v[b0:b0 + n_units * count, kv0:kv1], c0, c1))  # [128, seq, kv, kt, Dv]
            for u in range(n_units):
                tiles = units[u_first + u][1]
                kpos_rows = None
                if any([t[5][ci] for t in tiles]):
                    # HBM -> SBUF: key positions, one row per new token of the tile(s)
                    kpos_rows = nl.ndarray((tiles[0][2] if packed else split_tokens, c1 - c0), dtype=nl.float32,
                                           buffer=nl.sbuf)
                    tok = 0
                    for b0, count, _, _, t0, t1 in runs:
                        n = (t1 - t0) if packed else split_tokens
                        for s in range(b0 + u * seqs, b0 + u * seqs + count):
                            nisa.dma_copy(kpos_rows[tok:tok + n, :], kpos[s:s + 1, c0:c1].broadcast(0, n))
                            tok += n
                for t_first, step, nb, lead, width, rows in unit_batches(tiles, tile_setup[u], c0, c1, group, packed):
                    # logit columns start at a 128-aligned key so P^T tiles line up with V tiles
                    members = list(range(t_first, t_first + nb * step, step))
                    state = tile_setup[u][t_first][2] or RowState(rows, 1, nb)
                    neg_sink, onehot = per_layout[(rows, layout)]
                    tile_pieces = pieces if packed else [(0, 0, 0, 0, rows)]
                    scores = score_tile(rows, nb, width)
                    ends = []           # end of each tile's own logit columns
                    for i, j in enumerate(members):
                        _, ta, tb, k_lo, k_hi, masked = tiles[j]
                        stationaries, qpos_col, _ = tile_setup[u][j]
                        a, b = max(c0, k_lo), min(c1, k_hi)
                        for p, (ri, bl, kj, _, _) in enumerate(tile_pieces):
                            qk_matmuls(scores[:, i, :], [s[p] for s in stationaries],
                                       [k_sb[ri][:, h, u * runs[ri][1] + bl, kj, :] for h in range(n_dp)],
                                       lead, width, a - c0, first=p == 0)
                        for m0, m1, late, early in masked[ci]:
                            indicator = masked_indicator(kpos_rows[0:tb - ta, m0 - c0:m1 - c0], qpos_col, m1 - m0,
                                                         late, window if early else None,
                                                         nisa.vector_engine if mask_vector.take() else nisa.gpsimd_engine)
                            mask_matmuls(scores[:, i, :], onehot, indicator, m0 - a + lead, m1 - a + lead)
                        ends.append(b - a + lead)
                        if ends[-1] < width:
                            # the batch's later columns: keys no query of this tile sees
                            mask_matmuls(scores[:, i, :], onehot, ones[0:tb - ta, 0:width - ends[-1]], ends[-1], width)
                    n_kt = (width + P_MAX - 1) // P_MAX
                    probs = nl.ndarray((rows, nb, n_kt * P_MAX), dtype=nl.bfloat16, buffer=nl.sbuf)
                    zero_probs_margins(probs, lead, min(ends))
                    alpha = softmax_step(scores, probs, lead, width, state, neg_sink, ends)
                    del scores
                    # [128 keys, tile, key tile, rows]
                    probs_t = transpose_probs(probs, width, evict, no_dma if packed else split_dma)
                    del probs
                    o_psum = nl.ndarray((rows, nb, dv), dtype=nl.float32, buffer=nl.psum)
                    if len(tile_pieces) == 1:
                        for i, j in enumerate(members):
                            # key tiles past the tile's own columns hold only zeros: skipped
                            v_tile0 = (max(c0, tiles[j][3]) - lead - c0) // P_MAX
                            pv_matmuls(o_psum[:, i, :], probs_t[:, i], v_sb[0][:, u * runs[0][1], 0], v_tile0, ends[i])
                    else:
                        # O^T[dv, piece rows] = V_piece^T @ P^T[:, piece rows], then one transpose back
                        v_tile0 = (max(c0, tiles[0][3]) - lead - c0) // P_MAX
                        o_t_psum = nl.ndarray((dv, rows), dtype=nl.float32, buffer=nl.psum)
                        for ri, bl, kj, r0, n in tile_pieces:
                            for kt in range(n_kt):
                                kw = min(P_MAX, width - kt * P_MAX)
                                nisa.nc_matmul(o_t_psum[:, r0:r0 + n],
                                               v_sb[ri][0:kw, u * runs[ri][1] + bl, kj, v_tile0 + kt, :],
                                               probs_t[0:kw, 0, kt, r0:r0 + n], accumulate=kt > 0)
                        o_t = nl.ndarray((dv, rows), dtype=nl.float32, buffer=nl.sbuf)
                        evict.copy(o_t, o_t_psum)
                        nisa.nc_transpose(o_psum[:, 0, :], o_t)
                        del o_t_psum, o_t
                    del probs_t
                    jr = u * len(tiles) + t_first
                    update_output(state, o_psum, alpha, result[0:rows, jr:jr + (nb - 1) * step + 1:step, :], evict)
                    del o_psum
            del k_sb, v_sb
        store_rows(out, unit_row0[u_first], result,                                       # SBUF -> HBM
                   [t[0] for u in range(n_units) for t in units[u_first + u][1]])
    return out


def unit_batches(tiles, setup, c0: int, c1: int, group: int, packed: bool):
    """A unit's row tiles that meet key chunk [c0, c1), in batches processed together: the
    prefill kernel's `tile_batches` over the split tiles (visible keys [k_lo, k_hi) in place of
    the prefill's [lo, q1)); a packed tile goes alone. Returns [(first tile, step, n, lead, width,
    rows)]."""
    if packed:
        rows, _, _, k_lo, k_hi, _ = tiles[0]
        a, b = max(c0, k_lo), min(c1, k_hi)
        return [(0, 1, 1, (a - c0) % P_MAX, b - a + (a - c0) % P_MAX, rows)] if a < b else []
    return tile_batches([(k_hi - (tb - ta), k_hi, k_lo, state)
                             for (_, ta, tb, k_lo, k_hi, _), (_, _, state) in zip(tiles, setup)], c0, c1, group)


def unit_groups(units, kv_heads: int, d_head: int, dv: int, programs: int):
    """Consecutive units that share their Q^T, K^T, V and output DMAs: [(first unit, count)].

    A group's units are packed tiles of one run each, unit u + 1 holding the same tokens and KV
    heads of the sequences right after unit u's, with the same keys; a group holds at most
    ceil(units / programs) units (so LNC=2 still splits the work) and GROUP_SBUF_BYTES per
    partition of Q^T (zero-padded per piece), K^T and V chunks."""
    cap = (len(units) + programs - 1) // programs
    groups = []
    for ui, (runs, tiles) in enumerate(units):
        single = len(runs) == 1 and len(tiles) == 1
        b0, count, kv0, kv1, t0, t1 = runs[0]
        keys = min(CHUNK_KEYS, tiles[0][4] - tiles[0][3])
        n_dp = (d_head + P_MAX - 1) // P_MAX
        unit_bytes = 2 * (n_dp * count * (kv1 - kv0) * tiles[0][0] + n_dp * count * (kv1 - kv0) * keys
                          + count * (kv1 - kv0) * ((keys + P_MAX - 1) // P_MAX) * dv)
        if groups and single and count * (kv1 - kv0) > 1:
            first, n = groups[-1]
            p_runs, p_tiles = units[ui - 1]
            joins = (len(p_runs) == 1 and len(p_tiles) == 1 and n < cap
                     and (n + 1) * unit_bytes <= GROUP_SBUF_BYTES
                     and p_runs[0] == (b0 - count, count, kv0, kv1, t0, t1)
                     and p_tiles[0][0:5] == tiles[0][0:5] and first + n == ui)
            if joins:
                groups[-1] = (first, n + 1)
                continue
        groups.append((ui, 1))
    return groups


# --------------------------------------------------------------------------- host side

@dataclass
class DecodePlan:
    """Static structure of one launch: `units` for the kernel (see `attention_decode_kernel`), and
    for every output row its sequence, token and query head; per tile its tokens (sequence, token)."""
    group: int
    units: list
    row_seq: np.ndarray
    row_token: np.ndarray
    row_head: np.ndarray
    tile_tokens: list

    @property
    def kernel_plan(self):
        return self.group, tuple((runs, tuple(tuple(t) for t in tiles)) for runs, tiles in self.units)


def plan_decode_units(q_lens, k_lens, kv_heads: int, group: int) -> DecodePlan:
    """Pack the sequences of a batch (in this order; put similar key counts next to each other)
    into row tiles of at most 128 rows.

    A sequence whose rows (Hkv * T * G) fit in 128 is packed whole with its neighbours into one
    tile (consecutive sequences with the same token count form one run); a longer one gets one
    unit per KV head whose tiles take `128 // G` tokens each. Tiles read keys [0, S) of their
    sequences; `limit_keys` narrows that to the visible ones and marks the chunks needing masks."""
    row_seq, row_token, row_head, tile_tokens, units = [], [], [], [], []

    def add_rows(b, g, tokens):
        for t in tokens:
            row_seq.extend([b] * group)
            row_token.extend([t] * group)
            row_head.extend(range(g * group, (g + 1) * group))

    def add_packed(runs):
        rows, tokens = 0, []
        for b0, count, kv0, kv1, t0, t1 in runs:
            for b in range(b0, b0 + count):
                tokens += [(b, t) for t in range(t0, t1)]
                for g in range(kv0, kv1):
                    add_rows(b, g, range(t0, t1))
                    rows += (t1 - t0) * group
        keys = max(k_lens[b] for b0, count, *_ in runs for b in range(b0, b0 + count))
        units.append((tuple(runs), [[rows, 0, len(tokens), 0, keys, ()]]))
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
                    tiles.append([(tb - ta) * group, ta, tb, 0, k_lens[b], ()])
                    add_rows(b, g, range(ta, tb))
                    tile_tokens.append([(b, t) for t in range(ta, tb)])
                units.append((((b, 1, g, g + 1, 0, q_lens[b]),), tiles))
            continue
        if pending_rows + rows_b > P_MAX:
            add_packed(pending)
            pending, pending_rows = [], 0
        last = pending[-1] if pending else None
        if last and last[0] + last[1] == b and last[5] == q_lens[b]:
            pending[-1] = (last[0], last[1] + 1, 0, kv_heads, 0, q_lens[b])
        else:
            pending.append((b, 1, 0, kv_heads, 0, q_lens[b]))
        pending_rows += rows_b
    if pending:
        add_packed(pending)
    return DecodePlan(group, units, np.array(row_seq), np.array(row_token), np.array(row_head), tile_tokens)


def limit_keys(plan: DecodePlan, kpos, qpos, window) -> None:
    """Per tile: the keys to read, [first, 1 + last) index of a key any of its queries sees, and
    per key chunk of its unit the ranges holding masked (query, key) pairs (a later key or
    padding, one outside the window)."""
    tile_tokens = iter(plan.tile_tokens)
    for _, tiles in plan.units:
        seen = []
        for tile, tokens in zip(tiles, tile_tokens):
            seqs = np.array([b for b, _ in tokens])
            q = qpos[seqs, [t for _, t in tokens]][:, None]
            late = kpos[seqs] > q
            early = kpos[seqs] <= q - window if window is not None else np.zeros_like(late)
            sees = ~late & ~early
            visible = np.flatnonzero(sees.any(axis=0))
            tile[3], tile[4] = int(visible.min()), int(visible.max()) + 1
            seen.append((late.any(axis=0), early.any(axis=0)))
        unit_lo, unit_hi = min(t[3] for t in tiles), max(t[4] for t in tiles)
        for tile, (late, early) in zip(tiles, seen):
            tile[5] = tuple(mask_regions(late, early, max(c0, tile[3]), min(c0 + CHUNK_KEYS, tile[4]))
                            for c0 in range(unit_lo, unit_hi, CHUNK_KEYS))


def mask_regions(late, early, a: int, b: int):
    """Key ranges of [a, b) holding the masked (query, key) pairs of a tile: `late` / `early`
    [keys] flag keys later than some query (or padding) / outside some query's window. One
    range spans each kind's masked keys (both kinds merged when the ranges overlap), as
    (first, end, late, early) tuples."""
    regions = []
    for flags, is_late in ((late, True), (early, False)):
        cols = a + np.flatnonzero(flags[a:b])
        if len(cols):
            regions.append([int(cols[0]), int(cols[-1]) + 1, is_late, not is_late])
    if len(regions) == 2 and regions[0][0] < regions[1][1] and regions[1][0] < regions[0][1]:
        (m0, m1, _, _), (n0, n1, _, _) = regions
        regions = [[min(m0, n0), max(m1, n1), True, True]]
    return tuple(tuple(r) for r in regions)


def visible_keys(k_positions, q_positions, window):
    """Indices of the keys some query can see (older keys left the window), in cache order."""
    k_positions = np.asarray(k_positions)
    keep = k_positions <= np.max(q_positions)
    if window is not None:
        keep &= k_positions > np.min(q_positions) - window
    return np.flatnonzero(keep)


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
    inside the bucket reuse one compiled kernel. Returns (list of out [T, Hq, Dv] float32, cost
    report or None)."""
    if not problems:
        return [], None
    hq, d = problems[0].q.shape[1:]
    kv_heads, dv = problems[0].k.shape[1], problems[0].v.shape[2]
    group = hq // max(1, kv_heads)
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
    n = len(problems)
    q_lens = [p.q.shape[0] for p in problems]
    if shape is None:
        k_lens = [len(idx) for idx in kept]
        order = sorted(range(n), key=lambda b: -k_lens[b])   # similar key counts share tiles
        plan = plan_decode_units([q_lens[b] for b in order], [k_lens[b] for b in order], kv_heads, group)
        t_max, s_max = max(q_lens), max(k_lens)
    else:
        n_static, t_max, s_max = (int(v) for v in shape)
        kept = [np.arange(p.k.shape[0]) for p in problems]
        check_static_shape(problems, n_static, t_max, s_max)
        k_lens, order = [p.k.shape[0] for p in problems], list(range(n))
        plan = plan_decode_units([t_max] * n_static, [s_max] * n_static, kv_heads, group)
    slots = n if shape is None else n_static
    q_t = np.zeros((slots, kv_heads, d, t_max * group), BF16)
    k_t = np.zeros((slots, kv_heads, d, s_max), BF16)
    v_dev = np.zeros((slots, kv_heads, s_max, dv), BF16)
    kpos = np.full((slots, s_max), EMPTY_POSITION, np.float32)
    kpos[n:, 0] = 0.0                 # dummy sequences: one zero key at position 0, their query's own
    qpos = np.zeros((slots, t_max), np.float32)
    for slot, b in enumerate(order):
        p, idx = problems[b], kept[b]
        t_len, s_len = q_lens[b], k_lens[b]
        q = np.asarray(p.q, np.float32) * np.float32(scale)
        q_t[slot, :, :, :t_len * group] = q.reshape(t_len, kv_heads, group, d).transpose(1, 3, 0, 2) \
            .reshape(kv_heads, d, t_len * group)
        k_t[slot, :, :, :s_len] = np.asarray(p.k, np.float32)[idx].transpose(1, 2, 0)
        v_dev[slot, :, :s_len] = np.asarray(p.v, np.float32)[idx].transpose(1, 0, 2)
        kpos[slot, :s_len] = np.asarray(p.k_positions)[idx]
        qpos[slot, :t_len] = np.asarray(p.q_positions)
        qpos[slot, t_len:] = qpos[slot, t_len - 1]      # padding tokens see what the last one sees
    if shape is None:
        limit_keys(plan, kpos, qpos, window)
    else:
        static_key_ranges(plan, s_max, window)
    tiles = [t for _, unit_tiles in plan.units for t in unit_tiles]
    onehot = np.zeros((len(tiles), max(len(tok) for tok in plan.tile_tokens), P_MAX), BF16)
    sink_rows = None if sink is None else np.zeros((len(tiles), P_MAX, 1), np.float32)
    row0 = 0
    for ti, (tile, tokens) in enumerate(zip(tiles, plan.tile_tokens)):
        rows = np.arange(tile[0])
        where = {tok: i for i, tok in enumerate(tokens)}
        token_of_row = [where[(s, t)] for s, t in zip(plan.row_seq[row0 + rows], plan.row_token[row0 + rows])]
        onehot[ti, token_of_row, rows] = MASK_BIAS
        if sink is not None:
            sink_rows[ti, rows, 0] = np.asarray(sink, np.float32)[plan.row_head[row0 + rows]]
        row0 += tile[0]
    o_rows, rep = launch(attention_decode_kernel, q_t, k_t, v_dev, kpos, qpos, onehot, sink_rows,
                         plan.kernel_plan, None if window is None else int(window), report=True, lnc=lnc,
                         splits_lnc=True, **tuning)
    o_rows = np.asarray(o_rows, np.float32)
    outs = []
    for b in range(n):
        mine = (plan.row_seq == order.index(b)) & (plan.row_token < q_lens[b])
        out = np.zeros((q_lens[b], hq, dv), np.float32)
        out[plan.row_token[mine], plan.row_head[mine]] = o_rows[mine]
        outs.append(out)
    return outs, rep


def check_static_shape(problems, batch: int, tokens: int, keys: int) -> None:
    """A ValueError naming the limit when the problems do not fit the static shape."""
    if len(problems) > batch:
        raise ValueError(f"attention: {len(problems)} sequences exceed the bucket's batch {batch}")
    for i, p in enumerate(problems):
        if p.q.shape[0] > tokens or p.k.shape[0] > keys:
            raise ValueError(f"attention: problem {i} has {p.q.shape[0]} new tokens and {p.k.shape[0]} keys; "
                             f"the bucket holds {tokens} tokens and {keys} key slots per sequence")


def static_key_ranges(plan: DecodePlan, keys: int, window) -> None:
    """The shape-only counterpart of `limit_keys`: every tile reads key slots [0, keys) and every
    chunk is masked from the positions at run time (late keys and padding; with a window also
    keys outside it)."""
    for _, tiles in plan.units:
        for tile in tiles:
            tile[3], tile[4] = 0, keys
            tile[5] = tuple(((c0, min(c0 + CHUNK_KEYS, keys), True, window is not None),)
                            for c0 in range(0, keys, CHUNK_KEYS))


def is_fresh_prefill(problem) -> bool:
    """True when the keys are exactly the queries' tokens at consecutive positions (no history)."""
    qp, kp = np.asarray(problem.q_positions), np.asarray(problem.k_positions)
    return len(qp) == len(kp) and np.array_equal(qp, kp) and bool(np.all(np.diff(qp) == 1))


def attention_batch(problems, scale: float, window=None, sink=None, prefill_min_tokens: int = PREFILL_MIN_TOKENS,
                    lnc: int | None = None, shape=None):
    """`ReferenceOps.attention` for the NKI backend: problems -> (outputs, cost reports).

    A fresh sequence of at least `prefill_min_tokens` tokens runs the prefill kernel (it skips the
    key blocks outside the causal window; one launch per sequence); every other problem (decode
    steps, prefill on a history, short prompts) shares one launch of the cached-attention kernel.
    With a static `shape=(batch, tokens, keys)` the choice follows the bucket's `tokens`, a
    fresh prompt is padded to `tokens` (the padding comes after it, so the causal mask hides it)
    and the cached-attention launch has that shape (`attention_decode`).
    Outputs are [T, Hq, Dv] float32 in problem order."""
    outputs, reports = [None] * len(problems), []
    long_enough = (lambda p: len(p.q_positions) >= prefill_min_tokens) if shape is None else \
        (lambda p: shape[1] >= prefill_min_tokens)
    cached = [i for i, p in enumerate(problems) if not (is_fresh_prefill(p) and long_enough(p))]
    for i in sorted(set(range(len(problems))) - set(cached)):
        p = problems[i]
        q, k, v = (p.q, p.k, p.v) if shape is None else (pad_tokens(a, shape[1]) for a in (p.q, p.k, p.v))
        out, rep = attention_prefill(q, k, v, scale, window, sink, lnc=lnc)
        outputs[i] = out[:p.q.shape[0]]
        reports.append(rep)
    if cached:
        outs, rep = attention_decode([problems[i] for i in cached], scale, window, sink, lnc=lnc, shape=shape)
        for i, o in zip(cached, outs):
            outputs[i] = o
        reports.append(rep)
    return outputs, reports


def pad_tokens(a, tokens: int):
    """[T, ...] -> [tokens, ...] with zero rows after the T given ones."""
    if a.shape[0] > tokens:
        raise ValueError(f"attention: {a.shape[0]} tokens exceed the bucket's {tokens}")
    return np.concatenate([np.asarray(a, np.float32), np.zeros((tokens - a.shape[0],) + a.shape[1:], np.float32)])
