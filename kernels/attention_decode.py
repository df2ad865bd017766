"""Attention of new tokens against a KV cache, for ragged batches: decode (one new token per
sequence) and prefill on a history (several new tokens on top of cached keys), full layers
(every cached key) and sliding-window layers (the ring buffer of the window).

Device layout of the cache (what the kernel reads; `kv_cache_to_device` converts the model's
`[B, slots, Hkv, D]` cache):

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

Masks (only on the chunks the plan flags: keys newer than some query, outside its window, or
padding): the 0/1 indicator [tokens, keys] = (k_pos > q_pos) [+ (k_pos <= q_pos - W)] is computed
on GpSimd from the positions, and added as MASK_BIAS through the one-hot matmul of the prefill
kernel. The softmax machinery is the prefill kernel's (`kernels/attention_prefill.py`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kernels.backend import nki, nl, nisa, simulate
from kernels.attention_prefill import (
    BF16, CHUNK_KEYS, MASK_BIAS, P_MAX, EvictEngines, RowState, Share, check_attention_shapes,
    load_key_tiles, mask_matmuls, pv_matmuls, qk_matmuls, score_tile, softmax_step, transpose_probs,
    update_output, zero_probs_margins)

EMPTY_POSITION = float(2 ** 30)      # key slot holding no key: later than every query
EVICT_VECTOR_SHARE = 0.5
PREFILL_MIN_TOKENS = 128          # shorter fresh prompts join the cached-attention launch


# --------------------------------------------------------------------------- the kernel

def masked_indicator(kpos, qpos_col, width: int, window):
    """[tokens, width] bf16: 1.0 where key j is masked for token t (k > q, or k <= q - window).

    `kpos` [tokens, width] fp32 (each token's row of key positions), `qpos_col` [tokens, 1]."""
    tokens = kpos.shape[0]
    late = nl.ndarray((tokens, width), dtype=nl.bfloat16, buffer=nl.sbuf)
    nisa.tensor_scalar(late, kpos, nl.subtract, qpos_col, op1=nl.greater, operand1=0.0,
                       engine=nisa.gpsimd_engine)
    if window is None:
        return late
    early = nl.ndarray((tokens, width), dtype=nl.bfloat16, buffer=nl.sbuf)
    nisa.tensor_scalar(early, kpos, nl.subtract, qpos_col, op1=nl.less_equal, operand1=-float(window),
                       engine=nisa.gpsimd_engine)
    both = nl.ndarray((tokens, width), dtype=nl.bfloat16, buffer=nl.sbuf)
    nisa.tensor_tensor(both, late, early, nl.add, engine=nisa.gpsimd_engine)
    return both


@nki.jit
def attention_decode_kernel(q_t, k_t, v, kpos, qpos, tile_onehot, sink_rows, plan, window,
                            evict_vector_share=EVICT_VECTOR_SHARE):
    """New tokens of a ragged batch against their sequences' cached keys.

    q_t         [B, Hkv, D, Tq*G] bf16  Q * softmax scale, transposed: column t*G + i = new token
                                        t, query head g*G + i of sequence b.
    k_t         [B, Hkv, D, S]    bf16  cache keys transposed (module docstring).
    v           [B, Hkv, S, Dv]   bf16  cache values.
    kpos        [B, S]            fp32  key positions (EMPTY_POSITION for empty slots).
    qpos        [B, Tq]           fp32  positions of the new tokens.
    tile_onehot [n_tiles, NT, 128] bf16 MASK_BIAS where a tile row belongs to tile token t.
    sink_rows   [n_tiles, 128, 1] fp32  or None: each tile row's sink logit.
    plan        (group, tiles), see `plan_decode_tiles`: per tile (rows, keys, masked chunk
                flags, runs); a run (b0, count, kv0, kv1, t0, t1) puts sequences b0 .. b0+count-1,
                KV heads [kv0, kv1), new tokens [t0, t1) into the tile's next rows, ordered
                (sequence, KV head, token, query head). Every run of a tile reads keys [0, keys).
    window      int or None             keys a query sees, itself included.
    Returns     [sum of tile rows, Dv] bf16: the tiles' rows, in plan order.

    Per tile and run, one DMA per D tile brings a key chunk of K^T, one brings V, one Q^T. LNC=2
    splits the tiles between the two cores.
    """
    n_seqs, kv_heads, d_head, q_cols = q_t.shape
    s_max = k_t.shape[3]
    dv = v.shape[3]
    group, tiles = plan
    assert k_t.shape[:3] == (n_seqs, kv_heads, d_head), f"k_t {k_t.shape} must be [{n_seqs}, {kv_heads}, {d_head}, S]"
    assert v.shape[:3] == (n_seqs, kv_heads, s_max), f"v {v.shape} must be [{n_seqs}, {kv_heads}, {s_max}, Dv]"
    assert kpos.shape == (n_seqs, s_max), f"kpos {kpos.shape} must be [{n_seqs}, {s_max}]"
    assert q_cols % group == 0 and qpos.shape == (n_seqs, q_cols // group), \
        f"qpos {qpos.shape} must be [{n_seqs}, {q_cols // group}] for q_t {q_t.shape} and G = {group}"
    total_rows = sum(tile[0] for tile in tiles)
    out = nl.ndarray((total_rows, dv), dtype=q_t.dtype, buffer=nl.shared_hbm)
    d_tiles = [(d0, min(d_head, d0 + P_MAX)) for d0 in range(0, d_head, P_MAX)]
    evict = EvictEngines(evict_vector_share)
    no_dma = Share(0.0)
    by_layout = {}           # tile layout -> (zero-padded Q^T buffers, -sink rows), set up once
    onehots = {}             # tile layout -> token one-hot of the mask matmul, loaded once

    row_base = 0
    for ti, (rows, keys, masked, runs) in enumerate(tiles):
        tile_row0 = row_base
        row_base += rows
        if ti % nl.num_programs(0) != nl.program_id(0):
            continue
        pieces = []          # (run, sequence in run, KV head in run, first row, rows)
        for ri, (_, count, kv0, kv1, t0, t1) in enumerate(runs):
            for bl in range(count):
                for j in range(kv1 - kv0):
                    pieces.append((ri, bl, j, len(pieces) and pieces[-1][3] + pieces[-1][4], (t1 - t0) * group))
        assert pieces[-1][3] + pieces[-1][4] == rows, f"tile {ti}: runs give a different row count than {rows}"
        tokens = sum(count * (t1 - t0) for _, count, _, _, t0, t1 in runs)
        layout = (rows, tuple((r0, n) for *_, r0, n in pieces),
                  tuple((kv0, kv1) for _, _, kv0, kv1, _, _ in runs))
        if layout not in by_layout:
            # once per layout: Q^T buffers zeroed outside each piece's columns, sinks
            buffers = None
            if len(pieces) > 1:
                buffers = []
                for d0, d1 in d_tiles:
                    buf = nl.ndarray((d1 - d0, len(pieces), rows), dtype=q_t.dtype, buffer=nl.sbuf)
                    nisa.memset(buf, 0.0, engine=nisa.gpsimd_engine)
                    buffers.append(buf)
            neg_sink = None
            if sink_rows is not None:
                sink = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
                nisa.dma_copy(sink, sink_rows[ti, 0:rows, :])
                neg_sink = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
                nisa.tensor_scalar(neg_sink, sink, nl.multiply, -1.0, engine=nisa.gpsimd_engine)
            by_layout[layout] = (buffers, neg_sink)
        buffers, neg_sink = by_layout[layout]
        if any(masked) and layout not in onehots:
            onehots[layout] = nl.ndarray((tokens, rows), dtype=nl.bfloat16, buffer=nl.sbuf)
            nisa.dma_copy(onehots[layout], tile_onehot[ti, 0:tokens, 0:rows])

        # HBM -> SBUF: Q^T stationaries, one DMA per run and D tile
        if buffers is None:
            b0, _, kv0, _, t0, t1 = runs[0]
            stationaries = []
            for d0, d1 in d_tiles:
                q_part = nl.ndarray((d1 - d0, rows), dtype=q_t.dtype, buffer=nl.sbuf)
                nisa.dma_copy(q_part, q_t[b0, kv0, d0:d1, t0 * group:t1 * group])
                stationaries.append([q_part])
        else:
            p = 0
            for b0, count, kv0, kv1, t0, t1 in runs:
                n = (t1 - t0) * group
                for buf, (d0, d1) in zip(buffers, d_tiles):
                    # piece p + m of the tile -> buffer [:, p + m, r0 + m n : r0 + (m + 1) n]
                    dst = buf.ap([[len(pieces) * rows, d1 - d0], [rows + n, count * (kv1 - kv0)], [1, n]],
                                 offset=p * rows + pieces[p][3])
                    src = q_t[b0:b0 + count, kv0:kv1, d0:d1, t0 * group:t1 * group].permute((2, 0, 1, 3))
                    nisa.dma_copy(dst, src)
                p += count * (kv1 - kv0)
            stationaries = [[buf[:, p, :] for p in range(len(pieces))] for buf in buffers]
        if any(masked):
            qpos_col = nl.ndarray((tokens, 1), dtype=nl.float32, buffer=nl.sbuf)
            tok = 0
            for b0, count, _, _, t0, t1 in runs:
                for b in range(b0, b0 + count):
                    nisa.dma_copy(qpos_col[tok:tok + t1 - t0, :], qpos[b:b + 1, t0:t1])
                    tok += t1 - t0

        chunks = [(c0, min(keys, c0 + CHUNK_KEYS)) for c0 in range(0, keys, CHUNK_KEYS)]
        state = RowState(rows, len(chunks))
        result = nl.ndarray((rows, 1, dv), dtype=out.dtype, buffer=nl.sbuf)
        for ci, (c0, c1) in enumerate(chunks):
            width = c1 - c0
            # HBM -> SBUF: per run, the key chunk of K^T (per D tile) and of V
            k_sb, v_sb = [], []
            for b0, count, kv0, kv1, _, _ in runs:
                parts = []
                for d0, d1 in d_tiles:
                    k_part = nl.ndarray((d1 - d0, count, kv1 - kv0, width), dtype=k_t.dtype, buffer=nl.sbuf)
                    nisa.dma_copy(k_part, k_t[b0:b0 + count, kv0:kv1, d0:d1, c0:c1].permute((2, 0, 1, 3)))
                    parts.append(k_part)
                k_sb.append(parts)
                v_sb.append(load_key_tiles(v[b0:b0 + count, kv0:kv1], c0, c1))  # [128, count, kv, kt, Dv]
            scores = score_tile(rows, 1, width)
            for p, (ri, bl, j, _, _) in enumerate(pieces):
                qk_matmuls(scores[:, 0, :], [s[p] for s in stationaries],
                           [part[:, bl, j, :] for part in k_sb[ri]], 0, width, 0, first=p == 0)
            if masked[ci]:
                kpos_rows = nl.ndarray((tokens, width), dtype=nl.float32, buffer=nl.sbuf)
                tok = 0
                for b0, count, _, _, t0, t1 in runs:
                    for b in range(b0, b0 + count):
                        # HBM -> SBUF: the sequence's key positions, once per new token
                        nisa.dma_copy(kpos_rows[tok:tok + t1 - t0, :], kpos[b:b + 1, c0:c1].broadcast(0, t1 - t0))
                        tok += t1 - t0
                mask_matmuls(scores[:, 0, :], onehots[layout],
                             masked_indicator(kpos_rows, qpos_col, width, window), 0, width)
            n_kt = (width + P_MAX - 1) // P_MAX
            probs = nl.ndarray((rows, 1, n_kt * P_MAX), dtype=nl.bfloat16, buffer=nl.sbuf)
            zero_probs_margins(probs, 0, width)
            alpha = softmax_step(scores, probs, 0, width, state, neg_sink)
            del scores
            probs_t = transpose_probs(probs, width, evict, no_dma)[:, 0]    # [128, key tile, rows]
            del probs
            o_psum = nl.ndarray((rows, 1, dv), dtype=nl.float32, buffer=nl.psum)
            if len(pieces) == 1:
                pv_matmuls(o_psum[:, 0, :], probs_t, v_sb[0][:, 0, 0], 0, width)
            else:
                # O^T[dv, piece rows] = V_piece^T @ P^T[:, piece rows], then one transpose back
                o_t_psum = nl.ndarray((dv, rows), dtype=nl.float32, buffer=nl.psum)
                for ri, bl, j, r0, n in pieces:
                    for kt in range(n_kt):
                        kw = min(P_MAX, width - kt * P_MAX)
                        nisa.nc_matmul(o_t_psum[:, r0:r0 + n], v_sb[ri][0:kw, bl, j, kt, :],
                                       probs_t[0:kw, kt, r0:r0 + n], accumulate=kt > 0)
                o_t = nl.ndarray((dv, rows), dtype=nl.float32, buffer=nl.sbuf)
                evict.copy(o_t, o_t_psum)
                nisa.nc_transpose(o_psum[:, 0, :], o_t)
                del o_t_psum, o_t
            del probs_t
            update_output(state, o_psum, alpha, result, evict)
            del o_psum, k_sb, v_sb
        nisa.dma_copy(out[tile_row0:tile_row0 + rows, :], result[:, 0, :])      # SBUF -> HBM
    return out


# --------------------------------------------------------------------------- host side

@dataclass
class DecodePlan:
    """Static structure of one launch: `kernel_plan` = (group, tiles) for the kernel, and where
    each tile row's output goes: `row_seq`, `row_token`, `row_head` [total rows]."""
    kernel_plan: tuple
    row_seq: np.ndarray
    row_token: np.ndarray
    row_head: np.ndarray
    tile_tokens: list          # per tile: [(sequence, token)] in tile token order


def plan_decode_tiles(q_lens, k_lens, kv_heads: int, group: int, order=None) -> DecodePlan:
    """Pack the sequences of a batch into row tiles of at most 128 rows.

    A sequence whose rows (Hkv * T * G) fit in 128 is packed whole, with its neighbours in
    `order` (sequences of similar key counts, so little padding), into tiles; consecutive
    sequences with the same token count form one run. A longer one gets its own tiles: per KV
    head, `128 // G` tokens each. `q_lens`, `k_lens`: new tokens and keys per sequence. Masked
    chunk flags are filled in by `mark_masked_chunks`."""
    order = list(range(len(q_lens))) if order is None else list(order)
    tiles, row_seq, row_token, row_head, tile_tokens = [], [], [], [], []

    def add_tile(runs):
        rows = 0
        tokens = []
        keys = 0
        for b0, count, kv0, kv1, t0, t1 in runs:
            for b in range(b0, b0 + count):
                keys = max(keys, k_lens[b])
                tokens += [(b, t) for t in range(t0, t1)]
                for g in range(kv0, kv1):
                    for t in range(t0, t1):
                        row_seq.extend([b] * group)
                        row_token.extend([t] * group)
                        row_head.extend(range(g * group, (g + 1) * group))
                        rows += group
        tiles.append([rows, keys, None, tuple(runs)])
        tile_tokens.append(tokens)

    pending, pending_rows = [], 0
    for b in order:
        rows_b = kv_heads * q_lens[b] * group
        if rows_b > P_MAX:
            per_tile = max(1, P_MAX // group)
            for g in range(kv_heads):
                for t0 in range(0, q_lens[b], per_tile):
                    add_tile([(b, 1, g, g + 1, t0, min(q_lens[b], t0 + per_tile))])
            continue
        if pending_rows + rows_b > P_MAX:
            add_tile(pending)
            pending, pending_rows = [], 0
        last = pending[-1] if pending else None
        if last and last[0] + last[1] == b and last[5] == q_lens[b]:
            pending[-1] = (last[0], last[1] + 1, 0, kv_heads, 0, q_lens[b])
        else:
            pending.append((b, 1, 0, kv_heads, 0, q_lens[b]))
        pending_rows += rows_b
    if pending:
        add_tile(pending)
    return DecodePlan((group, tiles), np.array(row_seq), np.array(row_token), np.array(row_head),
                      tile_tokens)


def mark_masked_chunks(plan: DecodePlan, kpos, qpos, k_lens, window) -> None:
    """Flag the key chunks of each tile where some (token, key) pair is masked: a key later than
    the query, outside its window, or past the sequence's keys (padding)."""
    for tile, tokens in zip(plan.kernel_plan[1], plan.tile_tokens):
        keys = tile[1]
        flags = []
        for c0 in range(0, keys, CHUNK_KEYS):
            c1 = min(keys, c0 + CHUNK_KEYS)
            seqs = np.array([b for b, _ in tokens])
            k = kpos[seqs, c0:c1]
            q = qpos[seqs, [t for _, t in tokens]][:, None]
            hidden = k > q
            if window is not None:
                hidden |= k <= q - window
            flags.append(bool(hidden.any()))
        tile[2] = tuple(flags)
    plan.kernel_plan = (plan.kernel_plan[0], tuple(tuple(t) for t in plan.kernel_plan[1]))


def visible_keys(k_positions, q_positions, window):
    """Indices of the keys some query can see (older keys left the window), in cache order."""
    k_positions = np.asarray(k_positions)
    keep = k_positions <= np.max(q_positions)
    if window is not None:
        keep &= k_positions > np.min(q_positions) - window
    return np.flatnonzero(keep)


def attention_decode(problems, scale: float, window=None, sink=None, lnc: int = 1, **tuning):
    """Host launcher with the semantics of `ReferenceOps.attention`: each problem has q [T, Hq, D],
    k [S, Hkv, D], v [S, Hkv, Dv] (cached keys in cache order, then the new ones), q_positions
    [T], k_positions [S]. All problems go into one kernel launch.

    Keys no query can see (older than every query's window) are dropped on the host; the rest
    keep their order (a ring buffer stays wrapped). Returns (list of out [T, Hq, Dv] float32,
    cost report or None)."""
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
        kp = np.asarray(p.k_positions)[idx]
        for t, qp in enumerate(np.asarray(p.q_positions)):
            if not np.any((kp <= qp) & ((kp > qp - window) if window is not None else True)):
                raise ValueError(f"attention_decode: problem {i}, query {t} (position {qp}) sees no key; "
                                 f"a query must see at least itself")
        kept.append(idx)
    n = len(problems)
    q_lens = [p.q.shape[0] for p in problems]
    k_lens = [len(idx) for idx in kept]
    order = sorted(range(n), key=lambda b: -k_lens[b])   # similar key counts share tiles
    plan = plan_decode_tiles([q_lens[b] for b in order], [k_lens[b] for b in order], kv_heads, group)
    t_max, s_max = max(q_lens), max(k_lens)
    q_t = np.zeros((n, kv_heads, d, t_max * group), BF16)
    k_t = np.zeros((n, kv_heads, d, s_max), BF16)
    v_dev = np.zeros((n, kv_heads, s_max, dv), BF16)
    kpos = np.full((n, s_max), EMPTY_POSITION, np.float32)
    qpos = np.zeros((n, t_max), np.float32)
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
    mark_masked_chunks(plan, kpos, qpos, [k_lens[b] for b in order], window)
    tiles = plan.kernel_plan[1]
    n_tok = max(len(tokens) for tokens in plan.tile_tokens)
    onehot = np.zeros((len(tiles), n_tok, P_MAX), BF16)
    sink_rows = None if sink is None else np.zeros((len(tiles), P_MAX, 1), np.float32)
    row0 = 0
    for ti, (tile, tokens) in enumerate(zip(tiles, plan.tile_tokens)):
        rows = tile[0]
        where = {tok: i for i, tok in enumerate(tokens)}
        for r in range(rows):
            onehot[ti, where[(plan.row_seq[row0 + r], plan.row_token[row0 + r])], r] = MASK_BIAS
        if sink is not None:
            sink_rows[ti, :rows, 0] = np.asarray(sink, np.float32)[plan.row_head[row0:row0 + rows]]
        row0 += rows
    kernel = attention_decode_kernel if lnc == 1 else attention_decode_kernel[lnc]
    o_rows, rep = simulate(kernel, report=True)(q_t, k_t, v_dev, kpos, qpos, onehot, sink_rows,
                                                plan.kernel_plan, None if window is None else int(window),
                                                **tuning)
    outs = [np.zeros((t, hq, dv), np.float32) for t in q_lens]
    o_rows = np.asarray(o_rows, np.float32)
    for r in range(len(o_rows)):
        outs[order[plan.row_seq[r]]][plan.row_token[r], plan.row_head[r]] = o_rows[r]
    return outs, rep


def is_fresh_prefill(problem) -> bool:
    """True when the keys are exactly the queries' tokens at consecutive positions (no history)."""
    qp, kp = np.asarray(problem.q_positions), np.asarray(problem.k_positions)
    return len(qp) == len(kp) and np.array_equal(qp, kp) and bool(np.all(np.diff(qp) == 1))


def attention_batch(problems, scale: float, window=None, sink=None, prefill_min_tokens: int = PREFILL_MIN_TOKENS,
                    lnc: int = 1):
    """`ReferenceOps.attention` for the NKI backend: problems -> (outputs, cost reports).

    A fresh sequence of at least `prefill_min_tokens` tokens runs the prefill kernel (it skips the
    key blocks outside the causal window; one launch per sequence); every other problem (decode
    steps, prefill on a history, short prompts) shares one launch of the cached-attention kernel.
    Outputs are [T, Hq, Dv] float32 in problem order."""
    from kernels.attention_prefill import attention_prefill
    outputs, reports = [None] * len(problems), []
    cached = [i for i, p in enumerate(problems)
              if not (is_fresh_prefill(p) and len(p.q_positions) >= prefill_min_tokens)]
    for i in sorted(set(range(len(problems))) - set(cached)):
        p = problems[i]
        outputs[i], rep = attention_prefill(p.q, p.k, p.v, scale, window, sink, lnc=lnc)
        reports.append(rep)
    if cached:
        outs, rep = attention_decode([problems[i] for i in cached], scale, window, sink, lnc=lnc)
        for i, o in zip(cached, outs):
            outputs[i] = o
        reports.append(rep)
    return outputs, reports
