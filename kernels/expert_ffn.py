"""Grouped expert FFN: every row's SwiGLU through its expert, weighted, summed per token.

    out[t] = sum over rows r of token t:  weight[r] * down_e( silu(gate_e(x[t])) * up_e(x[t]) )

with e the row's (local) expert. This is the receiving side of expert parallelism: x holds each
received token once, and a token may have rows in several local experts.

Block layout (static shapes, as the NxD blockwise MoE kernels do). Rows are grouped by expert and
cut into blocks of B rows (B static, at most 128 or a multiple of 128 up to 512; the launcher picks
the power of two with the lowest estimated time, `choose_block_rows`); each block belongs to one
expert and the last block of an expert is padded. Three small tables carry the data-dependent part:

    block_expert [NB] int32     the local expert of each block (a runtime value)
    row_token    [NB * B] int32 the token of each row; T (one past the last token) for padding
    row_weight   [NB * B] fp32  the routing weight of each row; 0 for padding

The kernel's shapes depend only on (T, H, I, E, NB, B); the expert of a block reaches the weight
DMAs as a register (`scalar_offset`), so one compiled kernel serves any routing with the same
block count. Padding rows read token T-1 (the index is clamped), are multiplied by weight 0, and
land in the extra output row T, which the launcher drops: they cannot touch real tokens, and they
are computed like real rows, so the cost estimate counts them. Empty experts have no blocks: their
weights are never read. On hardware the host would round NB up to a bucket and the kernel would
stop at the real block count with a dynamic loop bound; here NB is exact.

Per block: gather the block's token rows of x (indirect DMA, bf16) and transpose them on TensorE
into x^T [hidden on partitions, rows]; gate / up with the weights stationary, g^T, u^T [128
intermediate, rows] accumulated in PSUM; ScalarE evicts silu(g), VectorE multiplies by u -> h^T
bf16; down with h^T stationary, y [rows, 512 hidden] per PSUM bank; each result times the row
weight is added to the token's running sum (gathered from the output, scattered back after the
next block's first weight DMAs are queued). Rows of one block have distinct tokens, so a scatter
never races with itself; on hardware the next block's gather must wait for this scatter (a
read-after-write through HBM at indirect addresses, which the simulator, executing in order, does
not check). Two ways to stream the weights:

* Streaming (blocks of at most STREAM_MAX_ROWS = 64 rows: decode, where the weight stream is the
  whole cost). Weights come in chunks of whole rows, 8 MiB per DMA over all 128 partitions with
  one contiguous run per partition: the gate / up contraction is partition-major (hidden row
  p*H/128 + k on partition p, x^T built to match), so a partition's rows are adjacent in HBM. All
  16 intermediate tiles accumulate at once (up to 8 per PSUM bank), so a chunk is used as soon as
  it lands. bf16: gate / up output tile j takes the columns q*I/128 + j, so h^T comes out
  partition-major too and the down weight streams the same way. FP8 weights feed TensorE as
  stored (fp8 stationary, bf16 moving): the 128x128 block scale is a per-(row block, column
  block) factor, and with the partition-major contraction every partition's rows lie in one row
  block (H/128 divides 128), so x^T is multiplied per output column block by a per-partition
  scale column (one VectorE tensor_scalar each, bf16 performance mode) and the PSUM sums need no
  correction; the down projection (standard layout, rows j*128 + p, 4 KiB runs) multiplies h^T
  per (row block, column block) on GpSimd, each 128-column block with its own scaled copy.
* Striped (larger blocks: prefill, where TensorE is the bound). Weights in column stripes [128,
  R/128, width]: gate / up 1024 columns (8 MiB bf16 per DMA, 2 KiB runs; FP8 512 columns, 512 B
  runs), down 2048 (4 KiB runs; FP8 1024, 1 KiB runs). Gate / up run on all (up to 512) rows per
  matmul instruction, a gate stripe's silu(g) waiting in SBUF (fp32) for the up stripe of the
  same columns, so one stripe is in use at a time; the down projection keeps 512 weight columns
  moving: with 512-row blocks the PE array is busy every cycle. No weight DMA waits for compute,
  so the DMA queue loads the next block's x rows and first stripes while this block computes;
  the previous block's sums (whose scatter waits for its last matmuls) are queued after this
  block's first up stripe. FP8 is dequantised on chip after the load, on ScalarE, one [128, 128]
  block per instruction (3*H*I/128 elements per partition and block whatever its rows, 164 us
  against a 512-row block's 334 us of TensorE), one stripe ahead of its use (`_StripeStream`).

A matmul costs max(64, N) TensorE cycles for N moving columns, so small blocks keep their weights
stationary (64 cycles per instruction) and large ones keep 512 columns moving.

LNC=2: program l of L takes blocks l, l+L, ... and sums them into its own slice out[l] of the
output [L, T+1, H]; the launcher adds the slices, so no two programs write one element and a
token with rows in blocks of both programs needs no synchronisation.

FP8 weights may also arrive as uint8 tensors holding the float8_e4m3 bytes (torch has no Trainium
e4m3 type, so the device launch passes them that way): the kernel reinterprets them with
`.view(nl.float8_e4m3)`.
"""
from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

from mimo_kernels.backend import nki, nl, nisa
from mimo_kernels.launch import is_tensor, launch, on_device, to_host
from mimo_kernels.checks import KernelInputError
from mimo_kernels.linear import PSUM_ENGINES, EngineRotation, scale_blocks
from mimo_kernels.trn2 import TRN2

P = nl.tile_size.pmax                              # partitions; also the FP8 scale block size
ROWS_PER_MATMUL = nl.tile_size.gemm_moving_fmax    # rows per gate/up matmul (moving free size)
DOWN_COLUMNS = nl.tile_size.gemm_moving_fmax       # hidden columns per down matmul = 1 PSUM bank
MAX_BLOCK_ROWS = nl.tile_size.gemm_moving_fmax     # rows per block
# Intermediate columns per gate / up DMA: runs of 2 KiB (bf16) per partition and row. FP8 keeps
# two stripes' dequantised copies in SBUF (see `_StripeStream`), so half as wide (512 B runs).
GATE_UP_STRIPE = 8 * nl.tile_size.gemm_stationary_fmax
GATE_UP_STRIPE_FP8 = 4 * nl.tile_size.gemm_stationary_fmax
# Hidden columns per down DMA: runs of 4 KiB (bf16) or 1 KiB (fp8, two stripes' dequantised
# copies in SBUF) per partition and row, against 1 KiB at one PSUM bank's 512 columns.
DOWN_STRIPE = 4 * DOWN_COLUMNS
DOWN_STRIPE_FP8 = 2 * DOWN_COLUMNS
TRANSPOSES_PER_BANK = nl.tile_size.psum_bank_fmax_bytes // (P * 2)   # bf16 [128, <=128] ones per bank
PSUM_FMAX = nl.tile_size.psum_bank_fmax        # fp32 elements per partition of one PSUM bank
STREAM_MAX_ROWS = 64                           # blocks up to this size take the streaming path
STREAM_CHUNK_BYTES = 64 * 1024                 # bytes per partition of one streamed weight DMA (8 MiB)

BF16 = np.dtype(ml_dtypes.bfloat16)
FP8 = np.dtype(ml_dtypes.float8_e4m3)


def _expert_slab(w, expert, pattern, offset=0):
    """View of expert `expert` (a register) of w [E, R, C] in HBM: `pattern` over one expert's
    [R, C] (flat element strides) from element `offset`, plus expert * R * C at run time."""
    R, C = w.shape[1], w.shape[2]
    return w.ap([[R * C, 1]] + pattern, offset=offset, scalar_offset=expert, indirect_dim=0)


def _load_weight_stripe(w, scale, expert, c0, width):
    """Columns c0 .. c0+width of expert `expert` of w [E, R, C] -> SBUF bf16 [P, R/P, width],
    tile[p, k, c] = w[expert, k*P + p, c0 + c] (HBM -> SBUF, one DMA of R*width elements).

    FP8: loaded as fp8, then multiplied by its block scale (scale: SBUF [P, R/P, C/P] fp32, the
    expert's scale grid on every partition) into bf16 on ScalarE, one [P, 128] block per
    instruction: GpSimd would hold up the weight DMAs' descriptors (it writes them in program
    order) and VectorE's turns would wait behind its PSUM evictions.
    """
    R, C = w.shape[1], w.shape[2]
    KT = R // P
    raw = nl.ndarray((P, KT, width), dtype=w.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=raw, src=_expert_slab(w, expert, [[C, P], [P * C, KT], [1, width]], offset=c0))
    if scale is None:
        return raw
    tile = nl.ndarray((P, KT, width), dtype=nl.bfloat16, buffer=nl.sbuf)
    blocks = width // P
    b0 = c0 // P
    scale_blocks(tile.reshape((P, KT, blocks, P)), raw.reshape((P, KT, blocks, P)),
                 scale[:, :, b0:b0 + blocks], nisa.engine.scalar)
    return tile


def _load_scales(scale, expert):
    """The expert's scale grid scale[expert] [R/P, C/P] on every partition: SBUF [P, R/P, C/P] fp32."""
    if scale is None:
        return None
    RB, CB = scale.shape[1], scale.shape[2]
    row = nl.ndarray((1, RB * CB), dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=row, src=_expert_slab(scale, expert, [[1, RB * CB]]))   # HBM -> 1 partition
    # To all partitions on TensorE (a ones-matmul), not with a 128x larger broadcast DMA.
    return nl.broadcast_to(row, (P, RB * CB)).reshape((P, RB, CB))


def _gather_rows_transposed(x, tokens, copies, xT, r0, partition_major=False):
    """x[tokens] ([n, H] bf16, n <= 128) -> xT[:, :, r0:r0+n] (hidden on partitions) via TensorE:
    xT[p, k, r] = x[token r, k*P + p], or x[token r, p*KT + k] with `partition_major`."""
    n = tokens.shape[0]
    H = x.shape[1]
    KT = H // P
    x_rows = nl.ndarray((n, H), dtype=x.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=x_rows, src=x.ap([[H, n], [1, H]], vector_offset=tokens, indirect_dim=0))
    for k0 in range(0, KT, TRANSPOSES_PER_BANK):
        kn = min(TRANSPOSES_PER_BANK, KT - k0)
        bank = nl.ndarray((P, kn, n), dtype=x.dtype, buffer=nl.psum)
        for j in range(kn):
            k = k0 + j
            columns = x_rows[:, k:H:KT] if partition_major else x_rows[:, k * P:(k + 1) * P]
            nisa.nc_transpose(dst=bank[:, j, :], data=columns)
        nisa.tensor_copy(dst=xT[:, k0:k0 + kn, r0:r0 + n], src=bank,
                         engine=copies.next())                   # PSUM -> SBUF


class _StripeStream(nl.NKIObject):
    """A block's weight stripes (gate and up in turns, then down) in their order of use, each
    loaded `ahead` stripes before it is taken. FP8 takes one ahead: ScalarE, which dequantises a
    stripe, also evicts PSUM in program order, so a stripe's dequantisation must be issued before
    the previous stripe's matmuls or TensorE would wait for it after each stripe."""

    def __init__(self, w, scales, expert, fp8):
        I, H = w[0].shape[2], w[2].shape[2]
        gate_up = GATE_UP_STRIPE_FP8 if fp8 else GATE_UP_STRIPE
        down = DOWN_STRIPE_FP8 if fp8 else DOWN_STRIPE
        self.order = []                      # (matrix, first column, width)
        for c0 in range(0, I, gate_up):
            self.order += [(0, c0, min(gate_up, I - c0)), (1, c0, min(gate_up, I - c0))]
        for c0 in range(0, H, down):
            self.order.append((2, c0, min(down, H - c0)))
        self.w, self.scales, self.expert = w, scales, expert
        self.ahead = 1 if fp8 else 0
        self.loaded = []
        self.issued = 0

    def take(self):
        while self.issued < len(self.order) and len(self.loaded) <= self.ahead:
            m, c0, width = self.order[self.issued]
            self.loaded.append(_load_weight_stripe(self.w[m], self.scales[m], self.expert, c0, width))
            self.issued += 1
        return self.loaded.pop(0)


def _gate_up(x, sources, stripes, copies, pending):
    """h^T [P, I/P, B] bf16: h^T[q, j, r] = silu(g) * u of row r at intermediate j*P + q, where
    sources[s] [n, 1] holds the tokens of rows s*n .. s*n+n-1. A gate stripe's silu(g) waits in
    SBUF for the up stripe of the same columns, so only one weight stripe is in use at a time.
    The previous block's sums are written back once the first up stripe is queued: that scatter
    waits for the previous block's last matmuls, and the DMA queue behind it must not hold up
    this block's first work."""
    KT = x.shape[1] // P
    B = sum([src.shape[0] for src in sources])
    I = stripes.w[0].shape[2]
    x_T = nl.ndarray((P, KT, B), dtype=nl.bfloat16, buffer=nl.sbuf)
    for s, source in enumerate(sources):
        _gather_rows_transposed(x, source, copies, x_T, s * P)
    h_T = nl.ndarray((P, I // P, B), dtype=nl.bfloat16, buffer=nl.sbuf)
    s0 = 0
    while s0 < I:
        g_w = stripes.take()                                                       # [P, KT, width]
        tiles = g_w.shape[2] // P
        act = nl.ndarray((P, tiles, B), dtype=nl.float32, buffer=nl.sbuf)
        _stripe_matmuls(x_T, g_w, act, None)
        del g_w                             # free before the up stripe is loaded
        u_w = stripes.take()
        if s0 == 0:
            pending.flush()
        _stripe_matmuls(x_T, u_w, act, h_T[:, s0 // P:s0 // P + tiles, :])
        del u_w
        s0 += tiles * P
    return h_T


def _stripe_matmuls(x_T, w, act, h_T):
    """For each 128-column tile t of the stripe w [P, KT, width]: gate (h_T None): act[:, t] =
    silu(w[:, :, tile].T @ x^T); up: h_T[:, t] = act[:, t] * (w[:, :, tile].T @ x^T)."""
    KT, B = x_T.shape[1], x_T.shape[2]
    for t in range(w.shape[2] // P):
        for c0 in range(0, B, ROWS_PER_MATMUL):
            c1 = min(B, c0 + ROWS_PER_MATMUL)
            acc = nl.ndarray((P, c1 - c0), dtype=nl.float32, buffer=nl.psum)
            for k in range(KT):
                nisa.nc_matmul(dst=acc, stationary=w[:, k, t * P:(t + 1) * P], moving=x_T[:, k, c0:c1])
            if h_T is None:
                nisa.activation(dst=act[:, t, c0:c1], op=nl.silu, data=acc)           # PSUM -> SBUF
            else:
                nisa.tensor_tensor(dst=h_T[:, t, c0:c1], data1=act[:, t, c0:c1], data2=acc,
                                   op=nl.multiply)


def _down_accumulate(h_T, stripes, sums, weights):
    """sums[s] [n, H] fp32 += weight[s] * (h^T[:, :, rows of s].T @ W_d) for each 128-row slice s."""
    IT = h_T.shape[1]
    H = stripes.w[2].shape[2]
    d0 = 0
    while d0 < H:
        d_w = stripes.take()                                                       # [P, IT, width]
        # Slice by slice, so on the last stripe each slice's sums are final (and can leave) early.
        for s, (acc, row_w) in enumerate(zip(sums, weights)):
            n = acc.shape[0]
            for b0 in range(0, d_w.shape[2], DOWN_COLUMNS):
                width = min(DOWN_COLUMNS, d_w.shape[2] - b0)
                y = nl.ndarray((n, width), dtype=nl.float32, buffer=nl.psum)
                for j in range(IT):
                    nisa.nc_matmul(dst=y, stationary=h_T[:, j, s * P:s * P + n],
                                   moving=d_w[:, j, b0:b0 + width])
                # PSUM -> SBUF: acc += row weight * y (the weight is one value per partition = row).
                view = acc[:, d0 + b0:d0 + b0 + width]
                nisa.scalar_tensor_tensor(dst=view, data=y, op0=nl.multiply, operand0=row_w, op1=nl.add,
                                          operand1=view)
        d0 += d_w.shape[2]
        del d_w


def _stream_scales_per_partition(scale, expert, select):
    """Scale grid scale[expert] [R/P, C/P] -> SBUF [P, C/P] fp32 for the partition-major contraction
    layout (row k*... of partition p lies in row block p // (P / (R/P))): one DMA of the grid with
    its row blocks on partitions, then an exact fp32 selection matmul (select [R/P, P] one-hot)."""
    RB, CB = scale.shape[1], scale.shape[2]
    grid = nl.ndarray((RB, CB), dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=grid, src=_expert_slab(scale, expert, [[CB, RB], [1, CB]]))    # HBM -> SBUF
    picked = nl.ndarray((P, CB), dtype=nl.float32, buffer=nl.psum)
    nisa.nc_matmul(dst=picked, stationary=select, moving=grid)
    columns = nl.ndarray((P, CB), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=columns, src=picked)                                        # PSUM -> SBUF
    return columns


def _chunk_rows(w):
    """Rows per partition of one streamed DMA of w [E, R, C] (whole rows, STREAM_CHUNK_BYTES)."""
    return max(1, min(w.shape[1] // P, STREAM_CHUNK_BYTES // (w.shape[2] * w.itemsize)))


def _row_chunk(w, expert, k0, partition_major):
    """Rows k0 .. k0+kn of every partition of expert `expert` of w [E, R, C] (HBM -> SBUF, one
    DMA of whole rows): tile[p, k, :] = W_e[p*KT + k0 + k, :] (partition-major, one contiguous run
    per partition) or W_e[(k0 + k)*P + p, :] (runs of one row)."""
    KT, C = w.shape[1] // P, w.shape[2]
    kn = min(_chunk_rows(w), KT - k0)
    chunk = nl.ndarray((P, kn, C), dtype=w.dtype, buffer=nl.sbuf)
    if partition_major:                   # one run per partition: [P, kn*C] on the HBM side
        pattern, offset = [[KT * C, P], [1, kn * C]], k0 * C
    else:
        pattern, offset = [[C, P], [P * C, kn], [1, C]], k0 * P * C
    nisa.dma_copy(dst=chunk, src=_expert_slab(w, expert, pattern, offset=offset))
    return chunk


def _stream_matrix(x_T, w, columns, expert, accs, first):
    """accs[j // G][:, j % G, :] = (W_e[:, tile j].T @ x^T for every output tile j, the weight
    streamed in chunks of whole rows, partition-major (`first`: the chunk of rows 0.., already
    issued). bf16: tile j is the columns q*C/P + j (so the result is partition-major too); FP8: the
    columns j*P + q, with x^T first scaled per output column block by `columns` [P, C/P]
    (per-partition scales), so TensorE multiplies the fp8 weights as stored."""
    KT, B = x_T.shape[1], x_T.shape[2]
    CT = w.shape[2] // P
    G = accs[0].shape[1]
    moving = None
    if columns is not None:
        moving = nl.ndarray((P, CT, KT, B), dtype=nl.bfloat16, buffer=nl.sbuf)
        for j in range(CT):               # bf16 in SBUF: VectorE performance mode
            nisa.tensor_scalar(dst=moving[:, j, :, :], data=x_T, op0=nl.multiply,
                               operand0=columns[:, j:j + 1])
    for k0 in range(0, KT, _chunk_rows(w)):
        chunk = first if k0 == 0 else _row_chunk(w, expert, k0, partition_major=True)
        first = None
        for kk in range(chunk.shape[1]):
            k = k0 + kk
            for j in range(CT):
                tile = chunk[:, kk, j:CT * P:CT] if moving is None else chunk[:, kk, j * P:(j + 1) * P]
                nisa.nc_matmul(dst=accs[j // G][:, j % G, :], stationary=tile,
                               moving=x_T[:, k, :] if moving is None else moving[:, j, k, :],
                               accumulate=k > 0)
        del chunk


def _stream_gate_up(x_T, w_gate, w_up, scales, expert, first):
    """h^T [P, I/P, B] bf16 of a small block: intermediate i = q*I/P + j at [q, j] (bf16 weights)
    or i = j*P + q (FP8, whose scales come in 128-column blocks)."""
    B = x_T.shape[2]
    IT = w_gate.shape[2] // P
    G = min(IT, PSUM_FMAX // B)
    banks = -(-IT // G)
    gate, up = [], []
    for _ in range(banks):
        gate.append(nl.ndarray((P, G, B), dtype=nl.float32, buffer=nl.psum))
        up.append(nl.ndarray((P, G, B), dtype=nl.float32, buffer=nl.psum))
    _stream_matrix(x_T, w_gate, scales[0], expert, gate, first)
    _stream_matrix(x_T, w_up, scales[1], expert, up, _row_chunk(w_up, expert, 0, partition_major=True))
    h_T = nl.ndarray((P, IT, B), dtype=nl.bfloat16, buffer=nl.sbuf)
    for g, (g_acc, u_acc) in enumerate(zip(gate, up)):
        n = min(G, IT - g * G)
        act = nl.ndarray((P, n, B), dtype=nl.float32, buffer=nl.sbuf)
        nisa.activation(dst=act, op=nl.silu, data=g_acc[:, :n, :])                # PSUM -> SBUF
        nisa.tensor_tensor(dst=h_T[:, g * G:g * G + n, :], data1=act, data2=u_acc[:, :n, :],
                           op=nl.multiply)
    return h_T


def _stream_down(h_T, w_down, grid, expert, acc, row_w):
    """acc [B, H] fp32 += row_w * (h^T.T @ W_d) for a small block; W_d streams in chunks of whole
    rows in h^T's layout (bf16: partition-major; FP8: tile[p, j, :] = W_e[j*P + p, :]). FP8
    (grid [P, I/P, H/P]: the scales on every partition): h^T is scaled per (row block j, column
    block) by one GpSimd instruction and each 128-column block multiplies its own scaled copy;
    all of W_d (fp8, half the bytes) is queued first, so that instruction, which waits for h^T,
    holds up no weight DMA's descriptors (GpSimd writes them in program order)."""
    IT, B = h_T.shape[1], h_T.shape[2]
    H = w_down.shape[2]
    HB = H // P
    major = grid is None
    chunks = []
    for j0 in range(0, IT, _chunk_rows(w_down)):
        if major and j0 > 0:
            chunks.append(None)                      # loaded when reached
        else:
            chunks.append(_row_chunk(w_down, expert, j0, partition_major=major))
    scaled = None
    if not major:
        scaled = nl.ndarray((P, HB, IT, B), dtype=nl.bfloat16, buffer=nl.sbuf)
        nisa.tensor_tensor(dst=scaled, data1=h_T.expand_dim(1).broadcast(1, HB),
                           data2=grid.permute((0, 2, 1)).expand_dim(3).broadcast(3, B),
                           op=nl.multiply, engine=nisa.engine.gpsimd)
    banks = []
    for d0 in range(0, H, DOWN_COLUMNS):
        banks.append(nl.ndarray((B, min(DOWN_COLUMNS, H - d0)), dtype=nl.float32, buffer=nl.psum))
    for c0, chunk in enumerate(chunks):
        j0 = c0 * _chunk_rows(w_down)
        if chunk is None:
            chunk = _row_chunk(w_down, expert, j0, partition_major=major)
        chunks[c0] = None
        for jj in range(chunk.shape[1]):
            j = j0 + jj
            for y_i, y in enumerate(banks):
                d0 = y_i * DOWN_COLUMNS
                if scaled is None:
                    nisa.nc_matmul(dst=y, stationary=h_T[:, j, :], moving=chunk[:, jj, d0:d0 + y.shape[1]],
                                   accumulate=j > 0)
                    continue
                for b0 in range(0, y.shape[1], P):
                    nisa.nc_matmul(dst=y[:, b0:b0 + P], stationary=scaled[:, (d0 + b0) // P, j, :],
                                   moving=chunk[:, jj, d0 + b0:d0 + b0 + P], accumulate=j > 0)
        del chunk
    for y_i, y in enumerate(banks):     # PSUM -> SBUF: acc += row weight * y (one weight per row)
        d0 = y_i * DOWN_COLUMNS
        view = acc[:, d0:d0 + y.shape[1]]
        nisa.scalar_tensor_tensor(dst=view, data=y, op0=nl.multiply, operand0=row_w, op1=nl.add,
                                  operand1=view)


def _zero_rows(out):
    """out [R, H] fp32 (HBM) = 0, 128 rows per DMA."""
    R, H = out.shape
    zeros = nl.ndarray((P, H), dtype=nl.float32, buffer=nl.sbuf)
    nisa.memset(dst=zeros, value=0.0)
    for r0 in range(0, R, P):
        n = min(P, R - r0)
        nisa.dma_copy(dst=out[r0:r0 + n, :], src=zeros[:n, :])


def _as_fp8(w):
    """FP8 weights may arrive as uint8 HBM tensors of the same bytes (torch has no Trainium e4m3):
    reinterpret them in place as float8_e4m3."""
    return w.view(nl.float8_e4m3) if w.dtype == nl.uint8 else w


def _check_inputs(x, row_token, row_weight, block_expert, w_gate, w_up, w_down, scales):
    """Shapes and dtypes of the kernel's inputs (weights already reinterpreted by `_as_fp8`)."""
    T, H = x.shape
    E, _, I = w_gate.shape
    NB = block_expert.shape[0]
    if not (NB >= 1):
        raise KernelInputError("expert_ffn: no blocks (block_expert is empty)")
    B = row_token.shape[0] // NB
    if not (x.dtype == nl.bfloat16):
        raise KernelInputError(f"expert_ffn: x must be bfloat16, got {x.dtype}")
    if not (H % P == 0 and I % P == 0):
        raise KernelInputError(f"expert_ffn: hidden {H} and intermediate {I} must be multiples of {P}")
    if not (tuple(w_gate.shape) == (E, H, I) and tuple(w_up.shape) == (E, H, I)):
        raise KernelInputError(
            f"expert_ffn: w_gate {tuple(w_gate.shape)} / w_up {tuple(w_up.shape)} must be [E, {H}, I]")
    if not (tuple(w_down.shape) == (E, I, H)):
        raise KernelInputError(f"expert_ffn: w_down {tuple(w_down.shape)} must be [{E}, {I}, {H}]")
    if not (1 <= B <= MAX_BLOCK_ROWS and (B <= P or B % P == 0) and tuple(row_token.shape) == (NB * B,)):
        raise KernelInputError(
            f"expert_ffn: row_token {tuple(row_token.shape)} must hold {NB} blocks of B rows, B <= {P} "
            f"or a multiple of {P} up to {MAX_BLOCK_ROWS}")
    if not (tuple(row_weight.shape) == (NB * B,)):
        raise KernelInputError(f"expert_ffn: row_weight {tuple(row_weight.shape)} must be ({NB * B},)")
    fp8 = w_gate.dtype == nl.float8_e4m3
    if not (fp8 or w_gate.dtype == nl.bfloat16):
        raise KernelInputError(
            f"expert_ffn: weights must be bfloat16 or float8_e4m3 (or its bytes as uint8), got {w_gate.dtype}")
    if not (w_up.dtype == w_gate.dtype and w_down.dtype == w_gate.dtype):
        raise KernelInputError("expert_ffn: mixed weight dtypes")
    if fp8:
        for name, s, shape in zip(("gate_scale", "up_scale", "down_scale"), scales,
                                  ((E, H // P, I // P), (E, H // P, I // P), (E, I // P, H // P))):
            if not (s is not None and tuple(s.shape) == shape and s.dtype == nl.float32):
                raise KernelInputError(
                    f"expert_ffn: fp8 weights need {name} float32 {list(shape)}, got "
                    f"{None if s is None else (tuple(s.shape), s.dtype)}")
    return B, fp8


def _streams(B, H, fp8):
    """Whether blocks of B rows take the streaming path (see the module docstring). FP8 needs each
    partition's hidden rows inside one 128-row scale block (H/128 dividing 128)."""
    KT = H // P
    return B <= STREAM_MAX_ROWS and (not fp8 or (KT <= P and P % KT == 0))


def _row_selector(KT):
    """[KT, P] fp32 one-hot: row block r -> the partitions p whose rows p*KT .. p*KT+KT-1 lie in it."""
    select = nl.ndarray((KT, P), dtype=nl.float32, buffer=nl.sbuf)
    owner = np.arange(P) // (P // KT)
    nisa.dma_copy(dst=select, src=nl.shared_constant(
        (owner[None, :] == np.arange(KT)[:, None]).astype(np.float32)))
    return select


class _Pending(nl.NKIObject):
    """The last block's token sums, written back (SBUF -> HBM scatter) only after the next block's
    first weight DMAs are queued, so the weight stream does not wait for that block's last
    matmuls."""

    def __init__(self, out, rows):
        self.out = out
        self.rows = rows            # this program's rows of `out`, zeroed at the first flush
        self.sums = []

    def flush(self):
        if self.rows is not None:   # after the first weight DMA, so that one starts at once
            _zero_rows(self.rows)
            self.rows = None
        H = self.out.shape[1]
        for acc, token in self.sums:
            n = acc.shape[0]
            nisa.dma_copy(dst=self.out.ap([[H, n], [1, H]], vector_offset=token, indirect_dim=0), src=acc)
        self.sums = []


def _gather_sums(out, token, flag):
    """The tokens' sums so far, out[token] (HBM -> SBUF gather). flag ([1, 1] int32 in SBUF, or
    None = 1): 0 when no token of the block had rows in an earlier block, so the sums are still 0
    and the gather runs zero times (a runtime loop bound)."""
    n, H = token.shape[0], out.shape[1]
    acc = nl.ndarray((n, H), dtype=nl.float32, buffer=nl.sbuf)
    if flag is None:
        nisa.dma_copy(dst=acc, src=out.ap([[H, n], [1, H]], vector_offset=token, indirect_dim=0))
        return acc
    nisa.memset(dst=acc, value=0.0, engine=nisa.engine.vector)
    count = nisa.register_alloc()
    nisa.register_load(count, flag)
    for _ in nl.dynamic_range(count):
        nisa.dma_copy(dst=acc, src=out.ap([[H, n], [1, H]], vector_offset=token, indirect_dim=0))
    return acc


def _stream_block(x, w, scales, select, expert, token, source, row_w, flag, pending, copies):
    """One block of at most STREAM_MAX_ROWS rows: weights streamed in chunks of whole rows."""
    w_gate, w_up, w_down = w
    B = token.shape[0]
    KT = x.shape[1] // P
    # The first weight DMA goes first; the small transfers then run side by side on the engines
    # it leaves (the previous block's write-back, this block's sums, x rows and scale grids).
    first = _row_chunk(w_gate, expert, 0, partition_major=True)
    pending.flush()
    acc = _gather_sums(pending.out, token, flag)
    x_T = nl.ndarray((P, KT, B), dtype=nl.bfloat16, buffer=nl.sbuf)
    _gather_rows_transposed(x, source, copies, x_T, 0, partition_major=True)
    columns = (None, None)
    if scales[0] is not None:
        columns = (_stream_scales_per_partition(scales[0], expert, select),
                   _stream_scales_per_partition(scales[1], expert, select))
    down_grid = _load_scales(scales[2], expert)                   # [P, I/P, H/P] or None
    h_T = _stream_gate_up(x_T, w_gate, w_up, columns, expert, first)
    _stream_down(h_T, w_down, down_grid, expert, acc, row_w)
    pending.sums.append((acc, token))


def _striped_block(x, w, scales, expert, columns, flag, pending, copies):
    """One block of any size: weights in column stripes, FP8 dequantised on chip. columns: per
    128-row slice, (tokens, source rows, row weights) [n, 1] each."""
    grids = [_load_scales(scale, expert) for scale in scales]
    stripes = _StripeStream(w, grids, expert, scales[0] is not None)
    h_T = _gate_up(x, [c[1] for c in columns], stripes, copies, pending)
    sums = []
    for c in columns:
        sums.append(_gather_sums(pending.out, c[0], flag))
    _down_accumulate(h_T, stripes, sums, [c[2] for c in columns])
    for acc, c in zip(sums, columns):
        pending.sums.append((acc, c[0]))


@nki.jit
def expert_ffn_kernel(x, row_token, row_weight, block_expert, w_gate, w_up, w_down,
                      gate_scale=None, up_scale=None, down_scale=None, block_gathers=None):
    """Blockwise grouped SwiGLU experts, summed per token (see the module docstring).

    x [T, H] bf16 (one row per token); row_token [NB*B] int32 (T = padding); row_weight [NB*B]
    fp32; block_expert [NB] int32 in 0..E-1; w_gate, w_up [E, H, I] and w_down [E, I, H] in the
    [in, out] layout, bf16 or float8_e4m3 (or uint8 holding float8_e4m3 bytes; then gate_scale,
    up_scale [E, H/128, I/128] and down_scale [E, I/128, H/128] fp32 multipliers). H and I
    multiples of 128; B <= 512. block_gathers [NB] int32 (optional): 1 if a token of the block has
    rows in an earlier block (its running sum must be read back), else 0. Returns out [L, T+1, H] fp32 (L = number of programs): program l
    sums the blocks l, l+L, ... into out[l]; the token sums are out.sum(0)[:T], row T collects
    what the padding rows added (0).
    """
    w = (_as_fp8(w_gate), _as_fp8(w_up), _as_fp8(w_down))
    scales = (gate_scale, up_scale, down_scale)
    B, fp8 = _check_inputs(x, row_token, row_weight, block_expert, *w, scales)
    if not fp8:
        scales = (None, None, None)
    T, H = x.shape
    NB = block_expert.shape[0]
    programs, me = nl.num_programs(0), nl.program_id(0)
    # 2-D in HBM (a gather's rows are H apart in the base tensor); row me*(T+1) + t = out[me, t].
    sums = nl.ndarray((programs * (T + 1), H), dtype=nl.float32, buffer=nl.shared_hbm)
    # The block tables, loaded once (HBM -> SBUF): block expert ids on one partition; each row's
    # token and weight with the rows of a 128-row slice on partitions, one column per slice.
    n = min(P, B)
    slices = NB * (B // n)
    experts = nl.ndarray((1, NB), dtype=nl.int32, buffer=nl.sbuf)
    nisa.dma_copy(dst=experts, src=block_expert.reshape((1, NB)))
    tokens = nl.ndarray((n, slices), dtype=nl.int32, buffer=nl.sbuf)
    nisa.dma_copy(dst=tokens, src=row_token.reshape((slices, n)).permute((1, 0)))
    row_weights = nl.ndarray((n, slices), dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=row_weights, src=row_weight.reshape((slices, n)).permute((1, 0)))
    sources = nl.ndarray((n, slices), dtype=nl.int32, buffer=nl.sbuf)   # padding (T) reads row T-1
    nisa.tensor_scalar(dst=sources, data=tokens, op0=nl.minimum, operand0=T - 1)
    if me > 0:                                                          # rows of out[me] in `sums`
        nisa.tensor_scalar(dst=tokens, data=tokens, op0=nl.add, operand0=me * (T + 1))
    gathers = None
    if block_gathers is not None:
        if not (tuple(block_gathers.shape) == (NB,) and block_gathers.dtype == nl.int32):
            raise KernelInputError(f"expert_ffn: block_gathers must be int32 ({NB},), got "
                                   f"{tuple(block_gathers.shape)} {block_gathers.dtype}")
        gathers = nl.ndarray((1, NB), dtype=nl.int32, buffer=nl.sbuf)
        nisa.dma_copy(dst=gathers, src=block_gathers.reshape((1, NB)))
    stream = _streams(B, H, fp8)
    select = _row_selector(H // P) if stream and fp8 else None
    copies = EngineRotation(PSUM_ENGINES)                                # PSUM evictions of x^T
    pending = _Pending(sums, sums[me * (T + 1):(me + 1) * (T + 1), :])

    for b in range(me, NB, programs):                 # LNC=2: the programs take alternate blocks
        expert = nisa.register_alloc()
        nisa.register_load(expert, experts[0:1, b:b + 1])          # runtime expert id of block b
        block = range(b * (B // n), (b + 1) * (B // n))            # this block's slice columns
        flag = None if gathers is None else gathers[0:1, b:b + 1]
        if stream:
            _stream_block(x, w, scales, select, expert, tokens[:, b:b + 1], sources[:, b:b + 1],
                          row_weights[:, b:b + 1], flag, pending, copies)
        else:
            columns = [(tokens[:, c:c + 1], sources[:, c:c + 1], row_weights[:, c:c + 1]) for c in block]
            _striped_block(x, w, scales, expert, columns, flag, pending, copies)
    pending.flush()
    return sums.reshape((programs, T + 1, H))


# --------------------------------------------------------------------------- host side

@dataclass
class ExpertWeights:
    """Local experts' SwiGLU weights in the kernel layout [in, out].

    gate, up [E, H, I] and down [E, I, H], bfloat16 or float8_e4m3 (Trainium e4m3, +-240); for
    FP8, *_scale are the float32 128x128 block multipliers [E, in/128, out/128].
    """
    gate: np.ndarray
    up: np.ndarray
    down: np.ndarray
    gate_scale: np.ndarray | None = None
    up_scale: np.ndarray | None = None
    down_scale: np.ndarray | None = None

    @property
    def num_experts(self) -> int:
        return self.gate.shape[0]

    @property
    def fp8(self) -> bool:
        return self.gate.dtype == FP8

    def validate(self) -> None:
        E, H, I = self.gate.shape
        for name, a, shape in (("gate", self.gate, (E, H, I)), ("up", self.up, (E, H, I)),
                               ("down", self.down, (E, I, H))):
            if a.shape != shape:
                raise ValueError(f"expert weights: {name} has shape {a.shape}, expected {shape}")
            if a.dtype not in (BF16, FP8):
                raise ValueError(f"expert weights: {name} is {a.dtype}; use bfloat16 or float8_e4m3")
        scales = (("gate_scale", self.gate_scale, (E, H // P, I // P)),
                  ("up_scale", self.up_scale, (E, H // P, I // P)),
                  ("down_scale", self.down_scale, (E, I // P, H // P)))
        for name, s, shape in scales:
            if self.fp8 and (s is None or s.shape != shape):
                raise ValueError(f"expert weights: FP8 needs {name} of shape {shape}, got "
                                 f"{None if s is None else s.shape}")

    def kernel_args(self):
        scales = (self.gate_scale, self.up_scale, self.down_scale) if self.fp8 else (None, None, None)
        return (self.gate, self.up, self.down) + tuple(
            None if s is None else np.ascontiguousarray(s, dtype=np.float32) for s in scales)


@dataclass
class BlockPlan:
    """Rows cut into blocks of `block_rows`, each block one expert (see the module docstring)."""
    block_rows: int
    block_expert: np.ndarray     # [NB] int32
    row_token: np.ndarray        # [NB * B] int32; num_tokens marks padding
    row_weight: np.ndarray       # [NB * B] float32; 0 for padding
    block_gathers: np.ndarray | None = None   # [NB] int32: 1 if a token has rows in an earlier block

    @property
    def num_blocks(self) -> int:
        return len(self.block_expert)

    def on_host(self) -> BlockPlan:
        """The tables as NumPy arrays (device tables read back: one counted read, `launch.to_host`)."""
        return BlockPlan(self.block_rows, *to_host((self.block_expert, self.row_token, self.row_weight,
                                                    self.block_gathers)))


# Block-size choice from the machine description's rates (TensorE cycles, HBM bandwidth).
def _block_time_s(block_rows: int, hidden: int, inter: int, weight_bytes: int) -> float:
    """Rough time of one block: the larger of its TensorE cycles and its weight stream."""
    gate_up = 2 * (hidden // P) * (inter // P) * sum(
        max(TRN2.min_ii_cycles, min(ROWS_PER_MATMUL, block_rows - c)) for c in range(0, block_rows, ROWS_PER_MATMUL))
    down = -(-block_rows // P) * (hidden // DOWN_COLUMNS) * (inter // P) * DOWN_COLUMNS
    return max((gate_up + down) / TRN2.tensor_hz, weight_bytes / TRN2.hbm_bytes_per_s_core)


def choose_block_rows(group_sizes, hidden: int, inter: int, weight_itemsize: int) -> int:
    """The power of two <= 512 minimising the estimated time of all blocks (weights stream once
    per block; padding rows cost TensorE time like real ones). Within 1% of the best time the
    largest block wins: fewer weight streams, less HBM traffic."""
    counts = [int(c) for c in group_sizes if c > 0]
    if not counts:
        return 1
    weight_bytes = 3 * hidden * inter * weight_itemsize
    largest = min(MAX_BLOCK_ROWS, 1 << (max(counts) - 1).bit_length())
    candidates = [1 << i for i in range(largest.bit_length())]
    times = {b: sum(-(-c // b) for c in counts) * _block_time_s(b, hidden, inter, weight_bytes)
             for b in candidates}
    best = min(times.values())
    return max(b for b, t in times.items() if t <= 1.01 * best)


def plan_blocks(group_sizes, row_token, row_weight, num_tokens: int, block_rows: int) -> BlockPlan:
    """Block tables for rows grouped by expert: expert e owns rows offsets[e] : offsets[e] +
    group_sizes[e] of row_token [N] / row_weight [N] (any group may be empty)."""
    sizes = np.asarray(group_sizes, dtype=np.int64)
    row_token = np.asarray(row_token, dtype=np.int64)
    row_weight = np.asarray(row_weight, dtype=np.float32)
    if sizes.ndim != 1 or (sizes < 0).any():
        raise ValueError(f"expert_ffn: group_sizes must be non-negative counts per expert, got {group_sizes}")
    if row_token.shape != (int(sizes.sum()),) or row_weight.shape != row_token.shape:
        raise ValueError(f"expert_ffn: group sizes sum to {int(sizes.sum())} rows but row_token has shape "
                         f"{row_token.shape} and row_weight {row_weight.shape}")
    if len(row_token) and (row_token.min() < 0 or row_token.max() >= num_tokens):
        raise ValueError(f"expert_ffn: row tokens must lie in 0..{num_tokens - 1}, got "
                         f"{row_token.min()}..{row_token.max()}")
    if not (1 <= block_rows <= MAX_BLOCK_ROWS and (block_rows <= P or block_rows % P == 0)):
        raise ValueError(f"expert_ffn: block_rows={block_rows}; use 1..{P} or a multiple of {P} "
                         f"up to {MAX_BLOCK_ROWS}")
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    experts, tokens, weights = [], [], []
    for e, (start, stop) in enumerate(zip(offsets[:-1], offsets[1:])):
        for b0 in range(start, stop, block_rows):
            n = min(block_rows, stop - b0)
            experts.append(e)
            tok = np.full(block_rows, num_tokens, np.int32)
            tok[:n] = row_token[b0:b0 + n]
            if len(np.unique(tok[:n])) != n:
                raise ValueError(f"expert_ffn: expert {e} lists a token twice")
            wt = np.zeros(block_rows, np.float32)
            wt[:n] = row_weight[b0:b0 + n]
            tokens.append(tok)
            weights.append(wt)
    seen, gathers = set(), []
    for tok in tokens:
        real = set(tok[tok < num_tokens].tolist())
        gathers.append(int(bool(real & seen)))
        seen |= real
    return BlockPlan(block_rows, np.asarray(experts, np.int32),
                     np.concatenate(tokens) if tokens else np.zeros(0, np.int32),
                     np.concatenate(weights) if weights else np.zeros(0, np.float32),
                     np.asarray(gathers, np.int32))


def grouped_expert_ffn(x, group_sizes, row_token, row_weight, weights: ExpertWeights,
                       block_rows: int | None = None, report=False, lnc: int | None = None):
    """Host launcher: rows grouped by local expert -> per-token sums out [T, H] float32.

    x [T, H] (any float array or device tensor; sent as bf16); group_sizes [E] rows per expert (zeros allowed);
    row_token [N], row_weight [N]: each row's token and routing weight, expert 0's rows first.
    block_rows: rows per block (default: `choose_block_rows`). lnc: the logical-core degree (default
    the runtime's; at 2 the two cores take alternate blocks). Returns out [T, H] (tokens without
    rows get 0), plus the cost report (None when nothing ran) when `report=True`.
    """
    weights.validate()
    x = on_device(x, BF16)
    if x.ndim != 2 or x.shape[1] != weights.gate.shape[1]:
        raise ValueError(f"expert_ffn: x {tuple(x.shape)} must be [tokens, hidden {weights.gate.shape[1]}]")
    if len(np.asarray(group_sizes)) != weights.num_experts:
        raise ValueError(f"expert_ffn: {len(np.asarray(group_sizes))} group sizes for "
                         f"{weights.num_experts} experts")
    T, H = x.shape
    I = weights.gate.shape[2]
    if block_rows is None:
        block_rows = choose_block_rows(group_sizes, H, I, weights.gate.dtype.itemsize)
    return run_blocks(x, plan_blocks(group_sizes, row_token, row_weight, T, block_rows), weights, report, lnc)


def run_blocks(x, plan: BlockPlan, weights: ExpertWeights, report=False, lnc: int | None = None):
    """Launch the kernel over a block plan; x [T, H] a bf16 device tensor. Returns out [T, H]
    float32, a device tensor (and the cost report, None when there are no blocks)."""
    T, H = x.shape
    if plan.num_blocks == 0:
        out = x.new_zeros((T, H)).float()
        return (out, None) if report else out
    result = launch(expert_ffn_kernel, x, plan.row_token, plan.row_weight, plan.block_expert,
                    *weights.kernel_args(), report=report, lnc=lnc, splits_lnc=True,
                    block_gathers=plan.block_gathers)
    out, rep = result if report else (result, None)
    out = out.sum(0)[:T]             # the programs' partial sums (LNC=2: two)
    return (out, rep) if report else out


def static_block_shape(rows: int, top_k: int, num_experts: int) -> tuple[int, int]:
    """(block rows B, block count NB) of a bucket of `rows` tokens with `top_k` experts each:
    B the power of two covering an even share of the rows per expert (at most 512), NB the worst
    case of any routing, ceil(rows * top_k / B) + E - 1 (every expert but one may end a block
    part-full)."""
    entries = rows * top_k
    block_rows = min(MAX_BLOCK_ROWS, 1 << max(0, -(-entries // num_experts) - 1).bit_length())
    return block_rows, -(-entries // block_rows) + num_experts - 1


def plan_blocks_static(ids, routing_weights, num_experts: int, block_rows: int, num_blocks: int) -> BlockPlan:
    """The block tables of `plan_blocks` at a fixed shape (`num_blocks` blocks of `block_rows`),
    computed with torch operations of static shape on the device of `ids` (stable sort, counts,
    prefix sums, one scatter): the routing bookkeeping of a step without a host round trip.

    ids [T, k] local expert ids (-1: a slot computed elsewhere), routing_weights [T, k] (device
    tensors, or host arrays, uploaded). `num_blocks` must hold the worst case of any routing
    (`static_block_shape`), so the plan never overflows and nothing is read back to check it.
    Unused blocks belong to the last expert and hold only padding rows (token T, weight 0).
    Returns a `BlockPlan` of device tensors."""
    import torch
    ids = on_device(ids, np.int64)
    tokens, top_k = ids.shape
    worst = -(-tokens * top_k // block_rows) + num_experts - 1
    if num_blocks < min(worst, tokens * top_k):
        raise ValueError(f"expert_ffn: {num_blocks} blocks of {block_rows} rows cannot hold every routing of "
                         f"{tokens} tokens x {top_k} experts among {num_experts} (worst case {worst} blocks: "
                         f"static_block_shape)")
    weights = on_device(routing_weights, np.float32).reshape(-1)
    where = ids.device
    key = torch.where(ids.reshape(-1) >= 0, ids.reshape(-1), num_experts)      # unused slots last
    order = torch.sort(key, stable=True).indices
    key, weights = key[order], weights[order]
    token = torch.arange(tokens, device=where).repeat_interleave(top_k)[order]
    counts = (key[:, None] == torch.arange(num_experts, device=where)[None, :]).sum(0)
    blocks = (counts + block_rows - 1) // block_rows
    expert = key.clamp(max=num_experts - 1)
    rank = torch.arange(len(key), device=where) - (torch.cumsum(counts, 0) - counts)[expert]
    dump = num_blocks * block_rows                                            # unused slots land here
    slot = torch.where(key < num_experts, (torch.cumsum(blocks, 0) - blocks)[expert] * block_rows + rank, dump)
    row_token = torch.full((dump + 1,), tokens, dtype=torch.int32, device=where).scatter(0, slot,
                                                                                        token.to(torch.int32))
    row_weight = torch.zeros(dump + 1, device=where).scatter(0, slot, torch.where(key < num_experts, weights, 0.0))
    block_expert = torch.searchsorted(torch.cumsum(blocks, 0), torch.arange(num_blocks, device=where), right=True)
    # A block reads its tokens' sums back only if one of them has rows in an earlier block.
    row_block = torch.arange(dump, device=where) // block_rows
    first = torch.full((tokens + 1,), num_blocks, device=where).scatter_reduce(0, row_token[:dump].long(), row_block,
                                                                               reduce="amin")
    later = (row_block > first[row_token[:dump].long()]) & (row_token[:dump] < tokens)
    return BlockPlan(block_rows, block_expert.clamp(max=num_experts - 1).to(torch.int32), row_token[:dump],
                     row_weight[:dump], later.reshape(num_blocks, block_rows).any(1).to(torch.int32))


def expert_ffn(x, ids, routing_weights, weights: ExpertWeights, block_rows: int | None = None,
               report=False, shape: tuple[int, int] | None = None, lnc: int | None = None):
    """Host launcher with the semantics of `ReferenceOps.experts` over local experts:
    out[t] = sum_j routing_weights[t, j] * expert_{ids[t, j]}(x[t]).

    ids [T, k] index the local experts of `weights` (-1 = no expert in this slot); x [T, H]; host
    arrays or device tensors. Returns out [T, H] float32 as a device tensor.
    `shape=(block_rows, num_blocks)` (a static bucket, `static_block_shape`): the block tables
    come from `plan_blocks_static` on the device, so the launch has that shape whatever the routing
    and nothing is read back (device ids are then not range-checked: that would read them back).
    Without a shape the plan is made on the host (`grouped_expert_ffn`; device ids are read back):
    rows sorted by expert (stable, so rows keep token order).
    """
    if np.ndim(ids) != 2 or tuple(np.shape(routing_weights)) != tuple(np.shape(ids)) \
            or np.shape(ids)[0] != np.shape(x)[0]:
        raise ValueError(f"expert_ffn: ids {tuple(np.shape(ids))} and weights {tuple(np.shape(routing_weights))} "
                         f"must both be [tokens {np.shape(x)[0]}, k]")
    if shape is None:
        ids, routing_weights = (np.asarray(a, dtype) for a, dtype in
                                zip(to_host((ids, routing_weights)), (np.int64, np.float32)))
    if not is_tensor(ids) and np.size(ids) and (np.max(ids) >= weights.num_experts or np.min(ids) < -1):
        raise ValueError(f"expert_ffn: expert ids must lie in -1..{weights.num_experts - 1}, got "
                         f"{np.min(ids)}..{np.max(ids)}")
    if shape is not None:
        weights.validate()
        plan = plan_blocks_static(ids, routing_weights, weights.num_experts, *shape)
        return run_blocks(on_device(x, BF16), plan, weights, report, lnc)
    token_of = np.repeat(np.arange(ids.shape[0]), ids.shape[1])
    flat_ids, flat_w = ids.reshape(-1), routing_weights.reshape(-1)
    keep = flat_ids >= 0
    order = np.argsort(flat_ids[keep], kind="stable")
    sizes = np.bincount(flat_ids[keep], minlength=weights.num_experts)
    return grouped_expert_ffn(x, sizes, token_of[keep][order], flat_w[keep][order], weights,
                              block_rows=block_rows, report=report, lnc=lnc)
