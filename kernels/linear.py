"""Linear projection y = x @ W with W in the prepared layout [in, out] (K = in on partitions).

    linear_kernel(x [T, K], w [K, N])                                  bf16 weights
    linear_kernel(x [T, K], w [K, N] float8_e4m3, w_scale [K/128, N/128] fp32)
        FP8 (Trainium e4m3, +-240) with one fp32 multiplier per 128x128 block:
        W[k, n] = w[k, n] * w_scale[k // 128, n // 128]

x: bf16 (or fp32, rounded to bf16 for TensorE), any T >= 1; K and N multiples of 128. y [T, N]
has x's dtype, accumulated in fp32 PSUM. MiMo uses it for q (4096 -> 12288), k (4096 -> 768 /
1536), v (4096 -> 512 / 1024), o (8192 -> 4096), the dense MLP's down projection (16384 -> 4096)
and lm_head (4096 -> 152576).

The tiled matmul (`project`) is shared with the dense SwiGLU kernel (kernels/dense_mlp.py), which
passes two weights (gate and up: h = silu(x Wg) * (x Wu) on PSUM eviction). x is transposed on TensorE once per token group
(x^T: K on partitions, up to 1024 tokens resident in SBUF); weights are streamed from HBM in column
groups as [128, K/128, cols] (cols-element contiguous runs per partition; 1024 columns at decode,
2 KiB bf16 runs), once per token group. A column group's output, its token blocks side by side in
one SBUF tile, is one store, issued only after the next group's weight loads, so the weight
stream never waits behind a store; at decode the outputs
are stored in batches (every store between two weight loads, over all 16 DMA engines, holds one
engine they wait for) and the last group streams in K chunks, so that only the matmuls of a
small last chunk come after the last weight byte.
At prefill a large K (o_proj's 8192, the dense MLP's 16384) would leave one column group only 128
or 256 columns of all K in the weight budget (256- or 512-byte runs, streamed at half or two
thirds of the DMA rate) and x^T only 256 or 512 tokens (every group reads all the weights): such
weights stream as [128, 32 K blocks, 512 columns] parts into PSUM accumulators that stay open over
K, with up to 512 tokens per group (`_k_split_column_group`).
Per block of up to 128 tokens, one of two matmul forms:

* weights moving (blocks of more than 64 tokens):
  `nc_matmul(stationary=x^T[128 k, tokens], moving=W[128 k, <=512 n])` accumulates y over K in one
  PSUM bank: 512 TensorE cycles per 128x512 weight chunk, full PE use for 128-token blocks.
* weights stationary (blocks of at most 64 tokens: decode, or the tail of a prefill):
  `nc_matmul(stationary=W[128 k, 128 n], moving=x^T[128 k, tokens])` accumulates y^T over K:
  64 cycles per 128x128 block instead of 512 per 128x512 for a block of any size, then y^T is
  transposed back on TensorE. At decode every weight byte is read once and TensorE needs about
  half the DMA time, so the projection is HBM-bound.

FP8 weights:
* more than 64 tokens: each weight tile is dequantised to bf16 in SBUF after the load (one multiply
  per 128-row K block by its row of block scales, in turns over GpSimd, ScalarE and VectorE
  weighted by their rates), paid once per token group and hidden under the matmuls of its token
  blocks: the block scales all come first by one DMA, and the next column group's tiles are
  loaded and dequantised before this group's matmuls are issued.
* at most 64 tokens (decode): dequantising would cost an engine pass per weight element, slower
  than the DMA of the fp8 bytes. The 128x128 block scale goes on the activations instead: per K
  block, one instruction forms x^T[128 k, T] * scale[kb, nb] for every column block nb of the group,
  and the fp8 block is the stationary operand as stored (weights-stationary form above). All the
  block scales come first, by one DMA with one long run per partition (per group they would move
  in 64 B runs at a fifth of the DMA rate); groups of 2048 columns give 2 KiB fp8 runs at K = 4096,
  and every output is stored after the last weight load.
FP8 weights may arrive as uint8 HBM tensors of the same bytes (torch has no Trainium e4m3; see
`launch.to_device`): `as_fp8` reinterprets them with `.view(nl.float8_e4m3)`.

LNC=2: the programs split the output, column groups (each program streams its share of the
weights past the whole x^T: what decode needs) or, with several token groups, whole groups.
Either way every output element is written by exactly one program.
"""
from __future__ import annotations

import numpy as np
import ml_dtypes

from mimo_kernels.backend import nki, nl, nisa
from mimo_kernels.launch import launch, on_device
from mimo_kernels.checks import KernelInputError

P = nl.tile_size.pmax                               # partitions, and the K / FP8 block size
MOVING_FMAX = nl.tile_size.gemm_moving_fmax         # 512 columns per matmul (one PSUM bank of fp32)
PSUM_BANK_BYTES = nl.tile_size.psum_bank_fmax_bytes

X_T_BUDGET = 64 * 1024        # SBUF bytes per partition for the transposed token group
WEIGHT_BUDGET = 32 * 1024     # SBUF bytes per partition for one (bf16) weight column group
# Prefill with a large K (the dense MLP's down projection, K = 16384): weights in K parts, so the
# x^T of a token group may take more (each group streams all the weights once) and the group's
# accumulators stay open in PSUM over K.
K_SPLIT_X_T_BUDGET = 128 * 1024
K_SPLIT_PSUM_BANKS = 4
SBUF_MARGIN = 8 * 1024       # per partition, for what `_fp8_prefill_plan` does not count (epilogues, scratch)
# Decode (every block weights-stationary, x^T small): 1024-column groups, i.e. 2 KiB bf16 runs per
# partition and row, the run length from which the DMA engines reach their rate. The budget is
# shared by the weights of a group (gate and up), and two groups are live at a time (the next
# one loads while the previous one's output waits to be stored).
STATIONARY_WEIGHT_BUDGET = 64 * 1024
STATIONARY_COLS = 1024
SCALED_WEIGHT_BUDGET = 64 * 1024   # fp8 bytes per partition of a weight group (activations-scaled)
PSUM_ACC_BYTES = 6 * PSUM_BANK_BYTES   # accumulators of the activations-scaled schedule
MAX_TOKEN_GROUP = 1024
STORE_BATCH_BYTES = 16 * 1024   # SBUF bytes per partition of decode outputs stored together
DEQUANT_PASS_ELEMS = 2048    # elements per partition of one FP8 dequantisation instruction
FP8_SCALED_ACTIVATIONS_MAX_TOKENS = 64
WEIGHTS_STATIONARY_MAX_TOKENS = 64   # token blocks this short put the weights on the stationary side

# Engines that can take an element-wise pass over SBUF operands (rotated to share the load), and
# the ones that may read PSUM (GpSimd cannot).
SBUF_ENGINES = (nisa.engine.vector, nisa.engine.gpsimd, nisa.engine.scalar)
# The dequantisation's turns at prefill: a two-input multiply costs VectorE 2 cycles per element
# at 0.96 GHz and GpSimd / ScalarE one at 1.2 GHz, so VectorE takes one turn in five.
DEQUANT_ENGINES = (nisa.engine.gpsimd, nisa.engine.scalar, nisa.engine.vector, nisa.engine.gpsimd,
                   nisa.engine.scalar)
PSUM_ENGINES = (nisa.engine.vector, nisa.engine.scalar)


class EngineRotation(nl.NKIObject):
    """Independent element-wise instructions spread over the engines that can run them, in turns
    (at trace time): `next()` returns engines[first_turn], engines[first_turn + 1], ...,
    cyclically."""

    def __init__(self, engines, first_turn: int = 0):
        self.engines = engines
        self.turn = first_turn

    def next(self):
        engine = self.engines[self.turn % len(self.engines)]
        self.turn += 1
        return engine


def _is_fp8(dtype) -> bool:
    return dtype == nl.float8_e4m3


def _element_bytes(dtype) -> int:
    """Bytes per element of the dtypes a projection handles (fp32, bf16, fp8)."""
    return 4 if dtype == nl.float32 else (1 if _is_fp8(dtype) else 2)


def as_fp8(w):
    """A weight given as uint8 HBM bytes (the device path: Trainium FP8 has no torch dtype) seen as
    float8_e4m3, the dtype its bytes hold; any other weight as given."""
    return w.view(nl.float8_e4m3) if w is not None and w.dtype == nl.uint8 else w


def lnc_share():
    """(this program, programs): the split of a kernel's work over the cores of the launch's LNC."""
    return nl.program_id(0), nl.num_programs(0)


def check_projection(x, weights, scales):
    """Validate shapes and dtypes of x [T, K] against weights [K, N] (+ scales); return T, K, N."""
    T, K = x.shape
    K_w, N = weights[0].shape
    if not (T >= 1):
        raise KernelInputError(f"linear: no tokens (x shape {x.shape})")
    if not (K_w == K):
        raise KernelInputError(
            f"linear: weight shape {weights[0].shape} must be [K={K}, N] for x {x.shape} ([in, out] layout)")
    if not (K % P == 0 and N % P == 0):
        raise KernelInputError(f"linear: sizes K={K} and N={N} must be multiples of {P}")
    for w, s in zip(weights, scales):
        if not (tuple(w.shape) == (K, N)):
            raise KernelInputError(f"linear: weight shapes differ: {w.shape} vs {(K, N)}")
        if s is None:
            if not (w.dtype == nl.bfloat16):
                raise KernelInputError(
                    f"linear: weight dtype {w.dtype} must be bfloat16, or float8_e4m3 with a scale")
        else:
            if not (_is_fp8(w.dtype)):
                raise KernelInputError(
                    f"linear: a scale was given but the weight dtype is {w.dtype}, not float8_e4m3")
            if not (tuple(s.shape) == (K // P, N // P)):
                raise KernelInputError(
                    f"linear: scale shape {s.shape} must be {(K // P, N // P)} (one fp32 multiplier per 128x128 block)")
            if not (s.dtype == nl.float32):
                raise KernelInputError(f"linear: scale dtype {s.dtype} must be float32")
    return T, K, N


def load_x_transposed(x, t0, tokens):
    """x^T for tokens t0 .. t0+tokens-1: SBUF [128, K/128, tokens] bf16, element (k, kt, t) = x[t0+t, kt*128+k].

    Per block of <= 128 tokens and per PSUM bank's worth of K blocks: one DMA of those columns of
    the rows, a TensorE transpose per 128-column K block into the bank, one eviction to SBUF with
    the bf16 cast.
    """
    K = x.shape[1]
    KT = K // P
    x_t = nl.ndarray((P, KT, tokens), dtype=nl.bfloat16, buffer=nl.sbuf)
    for b0 in range(0, tokens, P):
        tb = min(P, tokens - b0)
        per_bank = max(1, PSUM_BANK_BYTES // (tb * _element_bytes(x.dtype)))        # transposes per PSUM bank
        evictions = EngineRotation(PSUM_ENGINES)
        for k0 in range(0, KT, per_bank):
            n = min(per_bank, KT - k0)
            rows = nl.ndarray((tb, n * P), dtype=x.dtype, buffer=nl.sbuf)
            nisa.dma_copy(dst=rows, src=x[t0 + b0:t0 + b0 + tb, k0 * P:(k0 + n) * P])   # HBM -> SBUF
            bank = nl.ndarray((P, n, tb), dtype=x.dtype, buffer=nl.psum)
            for j in range(n):
                nisa.nc_transpose(dst=bank[:, j, :], data=rows[:, j * P:(j + 1) * P])
            nisa.tensor_copy(dst=x_t[:, k0:k0 + n, b0:b0 + tb], src=bank,
                             engine=evictions.next())                   # PSUM -> SBUF + cast to bf16
    return x_t


def tail_chunks(n):
    """Sizes of the DMAs that stream the last `n` rows (K blocks) of a weight before its final
    matmuls: half first, then the rest but n/8, then those n/8, so only the matmuls of the small
    last chunk remain after the last byte (each further DMA would cost its ~1.3 us setup)."""
    first = (n + 1) // 2
    last = n // 8
    return [c for c in (first, n - first - last, last) if c > 0]


def _weight_columns(w, n0, cols):
    """HBM view of W[:, n0:n0+cols] as [128, K/128, cols]: partition k holds rows k, 128+k, ..."""
    K, N = w.shape
    return w.reshape((K // P, P, N))[:, :, n0:n0 + cols].permute((1, 0, 2))


def _load_raw_columns(w, n0, cols, k_chunks, kb0=0):
    """Weight columns n0 .. n0+cols-1 of the K blocks kb0 .. kb0+sum(k_chunks)-1 as stored, SBUF
    [128, sum(k_chunks), cols], by one DMA per entry of `k_chunks` (K blocks each; cols-element
    runs per partition)."""
    raw = nl.ndarray((P, sum(k_chunks), cols), dtype=w.dtype, buffer=nl.sbuf)
    columns = _weight_columns(w, n0, cols)
    k0 = 0
    for kn in k_chunks:
        nisa.dma_copy(dst=raw[:, k0:k0 + kn, :], src=columns[:, kb0 + k0:kb0 + k0 + kn, :])
        k0 += kn
    return raw


class BlockScales(nl.NKIObject):
    """A FP8 weight's fp32 block scales for the dequantisation at prefill: all of them in SBUF
    (`resident`, [128, K/128, N/128] as `_load_all_scales` puts them), or fetched per tile from
    HBM (`hbm` [K/128, N/128]) where SBUF has no room for them all; `ahead`: each column group's
    tiles are loaded and dequantised one group ahead (`_fp8_prefill_plan`)."""

    def __init__(self, hbm, resident, ahead: bool):
        self.hbm, self.resident, self.ahead = hbm, resident, ahead

    def tile(self, kb0: int, kbs: int, nb0: int, blocks: int):
        """The scales of K blocks kb0 .. kb0+kbs-1 and column blocks nb0 .., [128, kbs, blocks]."""
        if self.resident is not None:
            return self.resident[:, kb0:kb0 + kbs, nb0:nb0 + blocks]
        NB = self.hbm.shape[1]
        scales = nl.ndarray((P, kbs, blocks), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=scales, src=self.hbm.ap([[0, P], [NB, kbs], [1, blocks]], offset=kb0 * NB + nb0))
        return scales


def _fp8_prefill_plan(token_group, KT, N, col_group, n_weights, k_part):
    """(block scales resident in SBUF, tiles loaded one group ahead) for FP8 weights at prefill.
    All the scales by one DMA save their per-group 16-byte runs (a twentieth of the DMA rate);
    loading the next group's tiles before this group's matmuls are issued keeps the dequantising
    engines from waiting in their in-order queues behind this group's evictions while TensorE
    waits for them. Each only when SBUF holds it beside x^T, two groups' bf16 tiles (the loop
    allocates the next before the last dies), one fp8 tile, two output tiles and SBUF_MARGIN; the
    K-split path's x^T leaves no room for either."""
    if k_part < KT:
        return False, False
    tiles = n_weights * KT * col_group * 2
    outputs = 2 * ((token_group + P - 1) // P) * col_group * 2
    base = token_group * KT * 2 + 2 * tiles + KT * col_group + outputs + SBUF_MARGIN
    scales = n_weights * KT * (N // P) * 4
    resident = base + scales <= nl.tile_size.sbuf_size_bytes
    return resident, resident and base + scales + tiles <= nl.tile_size.sbuf_size_bytes


def load_weight_tile(w, scales, n0, cols, first_turn=0, k_chunks=None, kb0=0, kbs=None):
    """Weight columns n0 .. n0+cols-1 of K blocks kb0 .. kb0+kbs-1 (default all) as bf16 SBUF
    [128, kbs, cols] (FP8: dequantised on chip with `scales`, a BlockScales, the engines taking
    turns from `first_turn`); `k_chunks`: K blocks per DMA (default one DMA)."""
    KT = w.shape[0] // P - kb0 if kbs is None else kbs
    raw = _load_raw_columns(w, n0, cols, [KT] if k_chunks is None else k_chunks, kb0)
    if scales is None:
        return raw
    blocks = cols // P
    scales = scales.tile(kb0, KT, n0 // P, blocks)
    tile = nl.ndarray((P, KT, cols), dtype=nl.bfloat16, buffer=nl.sbuf)
    per_pass = max(1, DEQUANT_PASS_ELEMS // cols)                # K blocks per instruction
    tile_blocks, raw_blocks = tile.reshape((P, KT, blocks, P)), raw.reshape((P, KT, blocks, P))
    dequant = EngineRotation(DEQUANT_ENGINES, first_turn)
    for k0 in range(0, KT, per_pass):
        k1 = min(KT, k0 + per_pass)
        # K block kt = scale row kt: each 128-column block times its scale, [128, kb, blocks, 128].
        scale_blocks(tile_blocks[:, k0:k1], raw_blocks[:, k0:k1], scales[:, k0:k1, :], dequant.next())
    return tile


def scale_blocks(dst, data, scale, engine):
    """dst[p, a, b, c] = data[p, a, b, c] * scale[p, a, b] (fp32 scales) on `engine`: one
    tensor_tensor on VectorE or GpSimd; ScalarE reads one tensor per instruction, so there one
    activation per (a, b) takes the scale as its [P, 1] `scale` column (rows of 128+ elements
    keep ScalarE above its minimum instruction interval)."""
    if engine == nisa.engine.scalar:
        for a in range(dst.shape[1]):
            for b in range(dst.shape[2]):
                nisa.activation(dst=dst[:, a, b, :], op=nl.copy, data=data[:, a, b, :],
                                scale=scale[:, a, b:b + 1])
        return
    nisa.tensor_tensor(dst=dst, data1=data, data2=scale.expand_dim(3).broadcast(3, dst.shape[3]),
                       op=nl.multiply, engine=engine)


def evict(dst, accs, step):
    """PSUM accumulators -> `dst` (SBUF, output dtype); a single weight's copy runs on the PSUM
    engine of turn `step`.

    One weight: a copy with the cast. Two weights (SwiGLU gate and up): dst = silu(gate) * up,
    ScalarE applying silu on its way out of PSUM and VectorE (tensor_tensor runs on VectorE or
    GpSimd, and GpSimd cannot read PSUM) multiplying by `up` straight from PSUM.
    """
    if len(accs) == 1:
        nisa.tensor_copy(dst=dst, src=accs[0], engine=EngineRotation(PSUM_ENGINES, step).next())
        return
    gate, up = accs
    act = nl.ndarray(dst.shape, dtype=nl.float32, buffer=nl.sbuf)
    nisa.activation(dst=act, op=nl.silu, data=gate)                     # ScalarE, PSUM -> SBUF
    nisa.tensor_tensor(dst=dst, data1=act, data2=up, op=nl.multiply)


def _weights_stationary_block(tiles, x_block, scale_tiles, y_tile, step):
    """y_tile [T, nbs*128] for T <= 64 tokens from weight tiles [128, K/128, nbs*128] (SBUF).

    `nc_matmul(stationary=W[128 k, 128 n], moving=x^T[128 k, T])` accumulates y^T[128 n, T] over K
    in PSUM (64 TensorE cycles per 128x128 weight block, where the weights-moving form pays 512 per
    512 columns whatever the token count); the eviction runs on y^T and TensorE transposes it back.
    x_block: x^T of the tokens, [128, K/128, T]. scale_tiles: None (bf16 tiles), or per weight the
    block scales [128, K/128, nbs] of raw fp8 tiles, applied to the activations (module doc).
    """
    KT, cols = tiles[0].shape[1], tiles[0].shape[2]
    T = x_block.shape[2]
    nbs = cols // P
    padded = 1 << (T - 1).bit_length()          # accumulator stride: no slice straddles a PSUM bank
    accs = [nl.ndarray((P, nbs, padded), dtype=nl.float32, buffer=nl.psum) for _ in tiles]
    scaling = EngineRotation(SBUF_ENGINES)
    for kt in range(KT):
        for i, (tile, acc) in enumerate(zip(tiles, accs)):
            if scale_tiles is not None:
                # x^T block kt times every column block's scale, in one instruction: [128 k, nbs, T].
                x_scaled = nl.ndarray((P, nbs, T), dtype=nl.bfloat16, buffer=nl.sbuf)
                scale_blocks(x_scaled.expand_dim(1),
                             x_block[:, kt, :].expand_dim(1).broadcast(1, nbs).expand_dim(1),
                             scale_tiles[i][:, kt, :].expand_dim(1), scaling.next())
            for nb in range(nbs):
                moving = x_block[:, kt, :] if scale_tiles is None else x_scaled[:, nb, :]
                # Blocks nb share PSUM banks: start each block's group explicitly.
                nisa.nc_matmul(dst=acc[:, nb, 0:T], stationary=tile[:, kt, nb * P:(nb + 1) * P],
                               moving=moving, accumulate=kt > 0)
    y_t = nl.ndarray((P, nbs, T), dtype=y_tile.dtype, buffer=nl.sbuf)  # y^T: output columns on partitions
    evict(y_t, [acc[:, :, 0:T] for acc in accs], step)
    # Back to tokens on partitions: one TensorE transpose per 128-column block, a PSUM bank at a time.
    per_bank = PSUM_BANK_BYTES // (P * _element_bytes(y_tile.dtype))
    evictions = EngineRotation(PSUM_ENGINES, step)
    for j0 in range(0, nbs, per_bank):
        n = min(per_bank, nbs - j0)
        bank = nl.ndarray((T, n * P), dtype=y_tile.dtype, buffer=nl.psum)
        for j in range(n):
            nisa.nc_transpose(dst=bank[:, j * P:(j + 1) * P], data=y_t[:, j0 + j, :])
        nisa.tensor_copy(dst=y_tile[:, j0 * P:(j0 + n) * P], src=bank, engine=evictions.next())


def _weights_moving_block(tiles, x_t, b0, tb, y_tile, step):
    """y_tile [tb, cols] for tokens b0 .. b0+tb-1 of the group: weights are the moving operand."""
    KT = x_t.shape[1]
    accs = []
    for tile in tiles:
        acc = nl.ndarray((tb, tile.shape[2]), dtype=nl.float32, buffer=nl.psum)
        for kt in range(KT):                                           # fp32 accumulation over K
            nisa.nc_matmul(dst=acc, stationary=x_t[:, kt, b0:b0 + tb], moving=tile[:, kt, :])
        accs.append(acc)
    evict(y_tile, accs, step)


def _store(pending, y, epilogue):
    """Store the pending outputs [(y_tile [rows, blocks, cols], t0, n0, tokens)] (after `epilogue`)
    and empty the list: the tile's blocks hold tokens t0 .., `rows` each (the last one ragged),
    columns n0 ..; the whole blocks go in one DMA.

    Called once the next column group's weight loads are issued: a store waits for its tile's
    matmuls and evictions, and issued first it would hold the DMA queues the weight stream
    needs, stalling that stream once per column group."""
    for y_tile, t0, n0, tokens in pending:
        rows, blocks, cols = y_tile.shape
        if epilogue is not None:
            epilogue(y_tile, t0, n0, tokens)
        full = tokens // rows
        if full:
            dst = y[t0:t0 + full * rows, n0:n0 + cols].reshape((full, rows, cols))
            nisa.dma_copy(dst=dst.permute((1, 0, 2)), src=y_tile[:, 0:full, :])             # SBUF -> HBM
        if full < blocks:
            tail = tokens - full * rows
            nisa.dma_copy(dst=y[t0 + full * rows:t0 + tokens, n0:n0 + cols], src=y_tile[0:tail, full, :])
    pending.clear()


def _project_token_group(x, g0, tg, weights, scales, col_group, k_part, y, columns, hooks):
    """Tokens g0 .. g0+tg-1: x^T resident, every weight column group streamed once past it, in
    parts of `k_part` K blocks (fewer than K / 128: `_k_split_column_group`).
    `columns` = (share, shares): this program takes column groups share, share + shares, ...

    A function of its own so that the group's x^T is freed before the next group's is loaded.
    """
    prologue, epilogue = hooks
    x_t = load_x_transposed(x, g0, tg)
    if prologue is not None:
        prologue(x_t)
    N = weights[0].shape[1]
    KT = x.shape[1] // P
    share, shares = columns
    # Decode: the outputs are small, so they are stored in batches (a store between two weight
    # loads holds a DMA engine the next load, over all 16, waits for), each tile's epilogue run
    # as soon as it is computed, and the last group streams in K chunks so that its matmuls
    # follow the chunks, not the last byte.
    decode = tg <= WEIGHTS_STATIONARY_MAX_TOKENS
    pending = []
    pending_bytes = 0                                              # per partition
    starts = list(range(share * col_group, N, shares * col_group))
    ahead = not decode and scales[0] is not None and scales[0].ahead
    prefetched = None
    for i, n0 in enumerate(starts):
        cols = min(col_group, N - n0)
        if k_part < KT:
            _k_split_column_group(x_t, g0, weights, scales, n0, cols, k_part, y, pending, epilogue)
            continue
        k_chunks = tail_chunks(KT) if decode and n0 + shares * col_group >= N else None
        tiles = prefetched if prefetched is not None else _load_group(weights, scales, n0, cols, k_chunks)
        prefetched = None
        if ahead and i + 1 < len(starts):
            prefetched = _load_group(weights, scales, starts[i + 1], min(col_group, N - starts[i + 1]), None)
        if not decode or pending_bytes >= STORE_BATCH_BYTES:
            _store(pending, y, None if decode else epilogue)
            pending_bytes = 0
        # the group's token blocks side by side, so the column group's output is one store
        y_group = nl.ndarray((min(P, tg), (tg + P - 1) // P, cols), dtype=y.dtype, buffer=nl.sbuf)
        for b0 in range(0, tg, P):
            tb = min(P, tg - b0)
            step = n0 // col_group + b0 // P                       # rotates the eviction engines
            y_tile = y_group[0:tb, b0 // P, :]
            if tb <= WEIGHTS_STATIONARY_MAX_TOKENS:                # a short block: decode or a tail
                _weights_stationary_block(tiles, x_t[:, :, b0:b0 + tb], None, y_tile, step)
            else:
                _weights_moving_block(tiles, x_t, b0, tb, y_tile, step)
        if decode and epilogue is not None:
            epilogue(y_group, g0, n0, tg)
        pending.append((y_group, g0, n0, tg))
        pending_bytes += cols * _element_bytes(y.dtype)
    _store(pending, y, None if decode else epilogue)


def _load_group(weights, scales, n0, cols, k_chunks, kb0=0, kbs=None):
    """The bf16 tiles of every weight's columns n0 .. n0+cols-1, K blocks kb0 .. kb0+kbs-1 (default
    all; `load_weight_tile`)."""
    return [load_weight_tile(w, s, n0, cols, i, k_chunks, kb0, kbs) for i, (w, s) in enumerate(zip(weights, scales))]


def _k_split_column_group(x_t, g0, weights, scales, n0, cols, k_part, y, pending, epilogue):
    """Columns n0 .. n0+cols-1 of every token block of the group, the weights streamed in parts of
    `k_part` K blocks: each part's matmuls accumulate into the blocks' PSUM accumulators, which
    stay open over K. (A large K in one tile would leave the weight budget only 128 columns, whose
    256-byte runs the DMA streams at half its rate; and the token group x^T could not grow.) The
    pending outputs are stored after the first part's loads are issued; the group's output tile
    [128, blocks, cols] is stored by one DMA."""
    KT, tg = x_t.shape[1], x_t.shape[2]
    blocks = [(b0, min(P, tg - b0)) for b0 in range(0, tg, P)]
    accs = [[nl.ndarray((tb, cols), dtype=nl.float32, buffer=nl.psum) for _ in weights] for _, tb in blocks]
    for kb0 in range(0, KT, k_part):
        kbs = min(k_part, KT - kb0)
        tiles = _load_group(weights, scales, n0, cols, None, kb0, kbs)
        if kb0 == 0:
            _store(pending, y, epilogue)
        for (b0, tb), block_accs in zip(blocks, accs):
            for tile, acc in zip(tiles, block_accs):
                for kt in range(kbs):
                    nisa.nc_matmul(dst=acc, stationary=x_t[:, kb0 + kt, b0:b0 + tb], moving=tile[:, kt, :],
                                   accumulate=kb0 + kt > 0)
    y_tile = nl.ndarray((blocks[0][1], len(blocks), cols), dtype=y.dtype, buffer=nl.sbuf)
    for b, ((b0, tb), block_accs) in enumerate(zip(blocks, accs)):
        evict(y_tile[0:tb, b, :], block_accs, n0 // MOVING_FMAX + b)
    pending.append((y_tile, g0, n0, tg))                             # one store for the blocks


def _project_weights_moving(x, weights, scales, y, hooks):
    """With several token groups the programs of LNC=2 take whole groups (rows), otherwise column
    groups: every output element is written by one program, and x^T is loaded once per group.
    At prefill a K too large for MOVING_FMAX columns of all K in WEIGHT_BUDGET streams its weights
    in K parts (`_k_split_column_group`), with a larger x^T budget and at most K_SPLIT_PSUM_BANKS
    accumulators."""
    T, K = x.shape
    KT = K // P
    token_group = min(MAX_TOKEN_GROUP, max(P, X_T_BUDGET // (KT * 2) // P * P))
    k_part = KT
    if T <= WEIGHTS_STATIONARY_MAX_TOKENS:     # decode: x^T is small, so larger weight groups fit
        col_group = max(P, min(STATIONARY_COLS, STATIONARY_WEIGHT_BUDGET // (KT * 2 * len(weights)) // P * P))
    elif WEIGHT_BUDGET // (KT * 2) < MOVING_FMAX:
        col_group = MOVING_FMAX
        k_part = WEIGHT_BUDGET // (MOVING_FMAX * 2)
        token_group = min(K_SPLIT_PSUM_BANKS // len(weights) * P,
                          max(P, K_SPLIT_X_T_BUDGET // (KT * 2) // P * P))
    else:
        col_group = max(P, min(MOVING_FMAX, WEIGHT_BUDGET // (KT * 2) // P * P))
    if scales[0] is not None:
        resident, ahead = _fp8_prefill_plan(token_group, KT, weights[0].shape[1], col_group, len(weights), k_part)
        scales = tuple([BlockScales(sc, _load_all_scales(sc) if resident else None, ahead) for sc in scales])
    groups = list(range(0, T, token_group))
    share, shares = lnc_share()
    if len(groups) >= shares:
        groups, columns = groups[share::shares], (0, 1)
    else:
        columns = (share, shares)
    for g0 in groups:
        _project_token_group(x, g0, min(token_group, T - g0), weights, scales, col_group, k_part, y, columns,
                             hooks)


def _load_all_scales(scale):
    """Every block scale on all 128 partitions, SBUF [128, K/128, N/128] fp32, by one DMA whose
    source is the whole (contiguous) scale tensor read once per partition: one run of K/128 x
    N/128 fp32 per partition. Per column group the scales would move in runs of one row of the
    group's blocks (64 B for 16 blocks), which the DMA streams at a fifth of its rate."""
    KB, NB = scale.shape
    st = nl.ndarray((P, KB * NB), dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=st, src=scale.ap([[0, P], [1, KB * NB]]))
    return st.reshape((P, KB, NB))


def _project_activations_scaled(x, weights, scales, y, hooks):
    T, K = x.shape
    N = weights[0].shape[1]
    KT, NB = K // P, N // P
    padded = 1 << (T - 1).bit_length()
    blocks = max(1, min(NB, SCALED_WEIGHT_BUDGET // (KT * P),
                        PSUM_ACC_BYTES // (4 * padded * len(weights))))
    prologue, epilogue = hooks
    x_t = load_x_transposed(x, 0, T)
    if prologue is not None:
        prologue(x_t)
    all_scales = [_load_all_scales(s) for s in scales]
    share, shares = lnc_share()
    pending = []
    for step, nb0 in enumerate(range(share * blocks, NB, shares * blocks)):      # LNC=2: column groups
        nbs = min(blocks, NB - nb0)
        cols = nbs * P
        raws = []
        # The last group in K chunks: its matmuls follow the chunks as they land, not the last byte.
        k_chunks = tail_chunks(KT) if nb0 + shares * blocks >= NB else [KT]
        for w in weights:
            raws.append(_load_raw_columns(w, nb0 * P, cols, k_chunks))     # fp8 as stored
        y_tile = nl.ndarray((T, 1, cols), dtype=y.dtype, buffer=nl.sbuf)
        _weights_stationary_block(raws, x_t, [st[:, :, nb0:nb0 + nbs] for st in all_scales], y_tile[:, 0, :], step)
        if epilogue is not None:
            epilogue(y_tile, 0, nb0 * P, T)
        pending.append((y_tile, 0, nb0 * P, T))
    # All stores after the last weight load: a store between two weight loads would hold a DMA
    # engine the next load (over all 16) waits for; at the end the stores run side by side.
    _store(pending, y, None)


def project(x, weights, scales, y, epilogue=None, prologue=None):
    """y [T, N] from x [T, K] and one or two weights [K, N] of one dtype (see module doc).

    One weight: y = x @ W. Two weights (SwiGLU gate and up): y = silu(x @ W_0) * (x @ W_1), both
    products accumulated side by side in PSUM and combined on eviction. FP8 weights may come as
    uint8 bytes (`as_fp8`). `prologue(x_t)`, if given, may rewrite each loaded x^T [128, K/128,
    tokens] (SBUF) before it is used; `epilogue(y_tile, t0, n0, tokens)` each output tile before
    it is stored: a whole SBUF tensor [rows, blocks, columns] holding tokens t0 .. t0+tokens-1 in
    blocks of `rows` (tokens on partitions; the last block may be ragged, its other rows never
    written), columns n0 ... At LNC=2 the
    programs split the output (columns, or token groups at prefill), each element written once.
    """
    weights = tuple([as_fp8(w) for w in weights])
    T, _, _ = check_projection(x, weights, scales)
    if not (len(weights) in (1, 2)):
        raise KernelInputError(f"project: one weight, or a gate and an up weight; got {len(weights)}")
    if scales[0] is not None and T <= FP8_SCALED_ACTIVATIONS_MAX_TOKENS:
        _project_activations_scaled(x, weights, scales, y, (prologue, epilogue))
    else:
        _project_weights_moving(x, weights, scales, y, (prologue, epilogue))


@nki.jit
def linear_kernel(x, w, w_scale=None):
    """y [T, N] = x [T, K] @ W [K, N] (see module doc for dtypes and layouts)."""
    y = nl.ndarray((x.shape[0], w.shape[1]), dtype=x.dtype, buffer=nl.shared_hbm)
    project(x, (w,), (w_scale,), y)
    return y


# --------------------------------------------------------------------------- host side

BF16 = np.dtype(ml_dtypes.bfloat16)
FP8 = np.dtype(ml_dtypes.float8_e4m3)


def kernel_weight(weight, scale=None):
    """Check a prepared weight: bf16 [in, out], or (float8_e4m3 [in, out], fp32 scale) as is; the
    FP8 weight may also be its bytes as uint8 (how `launch.to_device` passes FP8 to torch)."""
    weight = np.asarray(weight)
    if scale is None:
        if weight.dtype != BF16:
            raise TypeError(f"linear: weight dtype {weight.dtype} must be bfloat16 (prepared layout [in, out]); "
                            f"FP8 weights need their block scale")
        return np.ascontiguousarray(weight), None
    if weight.dtype not in (FP8, np.dtype(np.uint8)):
        raise TypeError(f"linear: a block scale was given, so the weight must be float8_e4m3, got {weight.dtype} "
                        f"(FP8 may also come as its bytes in uint8)")
    return np.ascontiguousarray(weight), np.ascontiguousarray(scale, dtype=np.float32)


def linear(x, weight, scale=None, dtype=BF16, report=False):
    """Host launcher with the semantics of `ReferenceOps.linear`, but taking the PREPARED weight:
    x [T, K] (a float array or device tensor, sent as `dtype`), weight [K, N] = W_hf.T in bf16, or float8_e4m3 with
    `scale` [K/128, N/128] fp32 multipliers (`mimo_v2_flash.fp8.quantize_blocks(W_hf.T, TRAINIUM_E4M3)`;
    the weight may be those bytes as uint8).
    Returns y [T, N] in `dtype` (a device tensor), plus the cost report when `report=True`."""
    if np.ndim(x) != 2:
        raise ValueError(f"linear: x must be [tokens, in], got shape {tuple(np.shape(x))}")
    weight, scale = kernel_weight(weight, scale)
    args = (on_device(x, dtype), weight) + (() if scale is None else (scale,))
    return launch(linear_kernel, *args, report=report, splits_lnc=True)
