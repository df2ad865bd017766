"""RMSNorm over the hidden dim, optionally fused with the residual add that precedes it.

    rmsnorm:      y = x / sqrt(mean(x^2) + eps) * weight            (statistics in fp32)
    add_rmsnorm:  s = x + delta;  returns (s, rmsnorm(s))            (s rounded to x's dtype)

Arguments (HBM): x, delta [T, H] (bf16 or fp32, any T >= 1), weight [H]. Outputs have x's dtype.

Two tile layouts, chosen per group of tokens:

* token-major, for every full tile of 128 tokens: tokens on partitions, H on the free axis, so each
  partition moves one contiguous H-element row per DMA (the ideal DMA shape). The sum of squares is
  one ScalarE activation with its accumulator reduction; `x * rstd * weight` one VectorE
  scalar_tensor_tensor. The weight row is broadcast to the 128 partitions once, on TensorE (a
  ones[1, 128] matmul), instead of a 128x larger broadcast DMA: DMA is the bound engine here.
* hidden-major, for the last T % 128 tokens (all of decode): partition p holds hidden elements
  [p*J, (p+1)*J) of every token (J = H / 128), so all 128 lanes work even for one token, where
  token-major would leave 127 lanes idle and pay H cycles per instruction. Per-token sums of squares
  are a free-axis reduction per partition plus a cross-partition sum on TensorE (a ones[128, 128]
  fp32 matmul, which also leaves every token's total on every partition). Each partition moves
  J-element (64 B for H = 4096 bf16) runs per token: fine for a tail, poor for a full tile.

Under the cost model full tiles are HBM-bound (x in, y out, plus delta in and s out when fused):
they move in chunks of ROW_CHUNK_TILES tiles per DMA (each transfer pays ~1.3 us of setup), each
chunk's loads issued before the previous chunk's work and stores, so the in-order DMA queues never
hold a load behind a store that waits for compute (T = 4096: 605 -> 317 us, 44% -> 83% of the
roofline at the achievable DMA rate). Decode is bound by the fixed latency of a kernel's first
DMA (2 us against 0.05 us of data at one token) and, near 64 tokens, by the tail's four passes.
That is why the decoder layer runs its norms fused into their neighbours (kernels/norm_qkv_rope.py:
`normalise_transposed` normalises the x^T a projection loads; kernels/linear_add_rmsnorm.py).

LNC=2: the programs take alternate token tiles, a decode tail cut into one piece per program.
"""
from __future__ import annotations

import numpy as np
import ml_dtypes

from mimo_kernels.backend import nki, nl, nisa
from mimo_kernels.launch import launch, on_device
from mimo_kernels.checks import KernelInputError

P = nl.tile_size.pmax
PSUM_FMAX = nl.tile_size.psum_bank_fmax      # fp32 elements of one PSUM bank per partition
# Fewer tail rows than this take the hidden-major layout (all 128 lanes, but J-element DMA runs,
# which the DMA engines move far below their rate); more take whole contiguous rows.
TOKEN_MAJOR_MIN_ROWS = 32
ROW_CHUNK_TILES = 2          # consecutive 128-token tiles moved by one DMA


def _broadcast_row(row, rows_out):
    """Copy `row` [1, H] (SBUF) to every partition of `rows_out` [P, H] (SBUF) on TensorE.

    out[p, h] = ones[0, p] * row[0, h]: a K=1 matmul per 512 columns into PSUM, evicted by ScalarE.
    fp32 operands when the row is fp32 (TensorE pairs fp32 only with fp32), so the copy is exact.
    """
    H = row.shape[1]
    ones = nl.ndarray((1, P), dtype=row.dtype, buffer=nl.sbuf)
    nisa.memset(dst=ones, value=1.0)
    for c0 in range(0, H, PSUM_FMAX):
        c1 = min(H, c0 + PSUM_FMAX)
        bank = nl.ndarray((P, c1 - c0), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(dst=bank, stationary=ones, moving=row[:, c0:c1])
        nisa.tensor_copy(dst=rows_out[:, c0:c1], src=bank, engine=nisa.engine.scalar)   # PSUM -> SBUF


def load_weight_rows(weight):
    """weight [H] (HBM) on every row of an SBUF [128, H] tile: one 1-row DMA, then `_broadcast_row`."""
    H = weight.shape[0]
    w_row = nl.ndarray((1, H), dtype=weight.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=w_row, src=weight.reshape((1, H)))             # HBM -> SBUF, 1 row
    weight_rows = nl.ndarray((P, H), dtype=weight.dtype, buffer=nl.sbuf)
    _broadcast_row(w_row, weight_rows)
    return weight_rows


def _rows_view(t, t0, blocks, n):
    """HBM rows t0 .. t0 + (blocks - 1) * 128 + n - 1 of t [T, H] as [n or 128, blocks, H] (row
    t0 + b * 128 + p at (p, b)): the layout of a chunk of token-major tiles."""
    if blocks == 1:
        return t[t0:t0 + n, :].expand_dim(1)
    return t[t0:t0 + blocks * P, :].reshape((blocks, P, t.shape[1])).permute((1, 0, 2))


def _row_chunks(tiles):
    """Token-major tiles [(t0, n)] in chunks [(t0, blocks, rows)] of up to ROW_CHUNK_TILES
    consecutive full tiles (a ragged tile, or a tile not following its predecessor, alone)."""
    chunks = []
    for t0, n in tiles:
        if chunks:
            c0, blocks, rows = chunks[-1]
            if n == P and rows == P and blocks < ROW_CHUNK_TILES and t0 == c0 + blocks * P:
                chunks[-1] = (c0, blocks + 1, rows)
                continue
        chunks.append((t0, 1, n))
    return chunks


def _load_chunk(x, delta, chunk):
    """HBM -> SBUF: a chunk's rows of x (and of delta), one DMA each."""
    t0, blocks, rows = chunk
    x_tile = nl.ndarray((rows, blocks, x.shape[1]), dtype=x.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=x_tile, src=_rows_view(x, t0, blocks, rows))
    d_tile = None
    if delta is not None:
        d_tile = nl.ndarray((rows, blocks, x.shape[1]), dtype=delta.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=d_tile, src=_rows_view(delta, t0, blocks, rows))
    return x_tile, d_tile


def _token_major_tiles(x, delta, weight_rows, y, total, tiles, eps):
    """Token-major tiles [(t0, n)] (n <= 128 tokens on partitions, whole rows, so every DMA moves
    contiguous rows), in chunks of ROW_CHUNK_TILES tiles per DMA (each transfer pays its setup);
    weight_rows [P, H] holds the weight on every row. Each chunk's rows are loaded before the
    previous chunk's work and stores are issued: the DMA queues run in order, and a load issued
    after a store would wait for the compute that store waits for."""
    H = x.shape[1]
    chunks = _row_chunks(tiles)
    ahead = _load_chunk(x, delta, chunks[0])
    for i, (t0, blocks, rows) in enumerate(chunks):
        x_tile, d_tile = ahead
        if i + 1 < len(chunks):
            ahead = _load_chunk(x, delta, chunks[i + 1])
        if d_tile is not None:
            s_tile = nl.ndarray((rows, blocks, H), dtype=total.dtype, buffer=nl.sbuf)
            # The add runs on GpSimd, the least busy engine of this layout.
            nisa.tensor_tensor(dst=s_tile, data1=x_tile, data2=d_tile, op=nl.add, engine=nisa.engine.gpsimd)
            nisa.dma_copy(dst=_rows_view(total, t0, blocks, rows), src=s_tile)   # the new residual
            x_tile = s_tile
        y_tile = nl.ndarray((rows, blocks, H), dtype=y.dtype, buffer=nl.sbuf)
        for b in range(blocks):
            squares = nl.ndarray((rows, H), dtype=x.dtype, buffer=nl.sbuf)      # by-product, unused
            sum_sq = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
            nisa.activation(dst=squares, op=nl.square, data=x_tile[:, b, :], reduce_op=nl.add,
                            reduce_res=sum_sq, reduce_cmd=nisa.reduce_cmd.reset_reduce)   # fp32 row sums
            normalise_rows(y_tile[:, b, :], x_tile[:, b, :], sum_sq, weight_rows, eps)
        nisa.dma_copy(dst=_rows_view(y, t0, blocks, rows), src=y_tile)     # SBUF -> HBM


def normalise_rows(y_rows, x_rows, sum_sq, weight_rows, eps):
    """y_rows = x_rows * rsqrt(sum_sq / H + eps) * weight (SBUF [n, H]; sum_sq [n, 1] fp32 sums of
    squares; weight_rows [P, H] the weight on every row)."""
    n, H = x_rows.shape
    rstd = nl.ndarray((n, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.activation(dst=rstd, op=nl.rsqrt, data=sum_sq, scale=1.0 / H, bias=eps)
    nisa.scalar_tensor_tensor(dst=y_rows, data=x_rows, op0=nl.multiply, operand0=rstd,
                              op1=nl.multiply, operand1=weight_rows[0:n, :])


def store_normalised_rows(x_rows, sum_sq, weight_rows, y, t0, eps):
    """y[t0 .. t0+n-1] = x_rows * rsqrt(sum_sq / H + eps) * weight (`normalise_rows`), stored."""
    y_tile = nl.ndarray(x_rows.shape, dtype=y.dtype, buffer=nl.sbuf)
    normalise_rows(y_tile, x_rows, sum_sq, weight_rows, eps)
    nisa.dma_copy(dst=y[t0:t0 + x_rows.shape[0], :], src=y_tile)          # SBUF -> HBM


def _hidden_major(view, t0, n):
    """HBM rows t0 .. t0+n-1 of `view` [T, H] seen as [P, n, J]: element (p, t, j) = view[t0+t, p*J+j]."""
    H = view.shape[1]
    return view[t0:t0 + n, :].reshape((n, P, H // P)).permute((1, 0, 2))


def _hidden_major_tile(x, delta, weight_cols, ones, y, total, t0, n, eps):
    """Tokens t0 .. t0+n-1 (n < 128), hidden split over partitions; weight_cols [P, J] = weight as [P, J]."""
    H = x.shape[1]
    J = H // P
    x_tile = nl.ndarray((P, n, J), dtype=x.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=x_tile, src=_hidden_major(x, t0, n))              # HBM -> SBUF, J-element runs
    if delta is not None:
        d_tile = nl.ndarray((P, n, J), dtype=delta.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=d_tile, src=_hidden_major(delta, t0, n))
        s_tile = nl.ndarray((P, n, J), dtype=total.dtype, buffer=nl.sbuf)
        nisa.tensor_tensor(dst=s_tile, data1=x_tile, data2=d_tile, op=nl.add, engine=nisa.engine.gpsimd)
        nisa.dma_copy(dst=_hidden_major(total, t0, n), src=s_tile)
        x_tile = s_tile
    squares = nl.ndarray((P, n, J), dtype=nl.float32, buffer=nl.sbuf)
    nisa.activation(dst=squares, op=nl.square, data=x_tile)
    partial = nl.ndarray((P, n), dtype=nl.float32, buffer=nl.sbuf)      # this partition's share
    nisa.tensor_reduce(dst=partial, op=nl.add, data=squares, axis=2)
    sum_sq = nl.ndarray((P, n), dtype=nl.float32, buffer=nl.psum)
    # Cross-partition sum: ones[P, P].T @ partial puts every token's total on every partition.
    nisa.nc_matmul(dst=sum_sq, stationary=ones, moving=partial)
    rstd = nl.ndarray((P, n), dtype=nl.float32, buffer=nl.sbuf)
    nisa.activation(dst=rstd, op=nl.rsqrt, data=sum_sq, scale=1.0 / H, bias=eps)   # PSUM -> SBUF
    # Four passes over [P, n*J] (square, reduce, two multiplies) on three engines: ScalarE, the
    # fastest, takes two; the add of the fused form shares GpSimd with the weight multiply.
    scaled = nl.ndarray((P, n, J), dtype=nl.float32, buffer=nl.sbuf)
    for t in range(n):      # ScalarE reads one tensor per instruction: rstd as its scale column
        nisa.activation(dst=scaled[:, t, :], op=nl.copy, data=x_tile[:, t, :], scale=rstd[:, t:t + 1])
    y_tile = nl.ndarray((P, n, J), dtype=y.dtype, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=y_tile, data1=scaled, data2=weight_cols.expand_dim(1).broadcast(1, n),
                       op=nl.multiply, engine=nisa.engine.gpsimd)
    nisa.dma_copy(dst=_hidden_major(y, t0, n), src=y_tile)


def _token_tiles(T, programs):
    """(first token, tokens, token-major?) of every tile: full 128-token tiles, then the tail, a
    short tail cut into one piece per program (so both cores of LNC=2 share a decode batch)."""
    full_tiles, tail = divmod(T, P)
    tiles = [(i * P, P, True) for i in range(full_tiles)]
    t0 = full_tiles * P
    if tail >= TOKEN_MAJOR_MIN_ROWS:
        tiles.append((t0, tail, True))
    elif tail:
        piece = -(-tail // programs)
        tiles += [(a, min(piece, T - a), False) for a in range(t0, T, piece)]
    return tiles


def rmsnorm_rows(x, delta, weight, y, total, eps):
    """y (and total = x + delta when delta is given) for this program's share of the token tiles:
    at LNC=2 each program takes every other tile, so every row is written by one program."""
    T, H = x.shape
    if not (T >= 1):
        raise KernelInputError(f"rmsnorm: no tokens (x shape {x.shape})")
    if not (tuple(weight.shape) == (H,)):
        raise KernelInputError(f"rmsnorm: weight shape {weight.shape} must be ({H},) for x {x.shape}")
    if not (delta is None or tuple(delta.shape) == (T, H)):
        raise KernelInputError(f"rmsnorm: delta shape {delta.shape} must equal x shape {x.shape}")
    share, shares = nl.program_id(0), nl.num_programs(0)
    mine = _token_tiles(T, shares)[share::shares]
    layouts = [token_major for _, _, token_major in mine]
    if True in layouts:
        weight_rows = load_weight_rows(weight)
    if False in layouts:
        if not (H % P == 0):
            raise KernelInputError(
                f"rmsnorm: hidden size {H} must be a multiple of {P} (hidden-major tail tile)")
        weight_cols = nl.ndarray((P, H // P), dtype=weight.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=weight_cols, src=weight.reshape((P, H // P)))   # HBM -> SBUF, J per partition
        ones = nl.ndarray((P, P), dtype=nl.float32, buffer=nl.sbuf)
        nisa.memset(dst=ones, value=1.0)
    rows_tiles = [(t0, n) for t0, n, token_major in mine if token_major]
    if rows_tiles:
        _token_major_tiles(x, delta, weight_rows, y, total, rows_tiles, eps)
    for t0, n, token_major in mine:
        if not token_major:
            _hidden_major_tile(x, delta, weight_cols, ones, y, total, t0, n, eps)


def load_weight_transposed(weight):
    """weight [H] (HBM) as SBUF [128, H/128], element (k, kt) = weight[kt*128 + k]: the layout of
    x^T (`normalise_transposed`)."""
    H = weight.shape[0]
    if not (H % P == 0 and H // P <= P):
        raise KernelInputError(f"rmsnorm: hidden size {H} must be a multiple of {P} and at most {P * P} "
                               f"(transposed layout)")
    # Rows of 128 contiguous elements, transposed on TensorE: a DMA straight into [128, H/128]
    # would move 2-byte runs, which hold the DMA queues for microseconds at the kernel's start.
    rows = nl.ndarray((H // P, P), dtype=weight.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=rows, src=weight.reshape((H // P, P)))
    bank = nl.ndarray((P, H // P), dtype=weight.dtype, buffer=nl.psum)
    nisa.nc_transpose(dst=bank, data=rows)
    weight_t = nl.ndarray((P, H // P), dtype=weight.dtype, buffer=nl.sbuf)
    nisa.tensor_copy(dst=weight_t, src=bank, engine=nisa.engine.scalar)              # PSUM -> SBUF
    return weight_t


def normalise_transposed(x_t, weight_t, eps):
    """RMSNorm of tokens held transposed, in place: x_t [128, KT, T] (SBUF, element (k, kt, t) =
    x[t, kt*128 + k], the layout a projection contracts over) becomes x * rstd * weight.

    Statistics in fp32: per partition a sum of squares over its KT elements of every token, then a
    ones[128, 128] matmul sums the partitions and leaves every token's total on every partition,
    which is where the multiply needs it. So a fused kernel normalises what the projection loaded
    anyway, with no normalised copy written to and read back from HBM. 128 tokens at a time (the
    fp32 squares of a 1024-token group would not fit in SBUF).
    """
    _, KT, T = x_t.shape
    ones = nl.ndarray((P, P), dtype=nl.float32, buffer=nl.sbuf)
    nisa.memset(dst=ones, value=1.0)
    for t0 in range(0, T, P):
        n = min(P, T - t0)
        block = x_t[:, :, t0:t0 + n]
        squares = nl.ndarray((P, n, KT), dtype=nl.float32, buffer=nl.sbuf)
        nisa.activation(dst=squares.permute((0, 2, 1)), op=nl.square, data=block)
        partial = nl.ndarray((P, n), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_reduce(dst=partial, op=nl.add, data=squares, axis=2)
        sum_sq = nl.ndarray((P, n), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(dst=sum_sq, stationary=ones, moving=partial)
        rstd = nl.ndarray((P, n), dtype=nl.float32, buffer=nl.sbuf)
        nisa.activation(dst=rstd, op=nl.rsqrt, data=sum_sq, scale=1.0 / (KT * P), bias=eps)   # PSUM -> SBUF
        scaled = nl.ndarray((P, KT, n), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_tensor(dst=scaled, data1=block, data2=rstd.expand_dim(1).broadcast(1, KT), op=nl.multiply,
                           engine=nisa.engine.gpsimd)
        nisa.tensor_tensor(dst=block, data1=scaled, data2=weight_t.expand_dim(2).broadcast(2, n),
                           op=nl.multiply)


@nki.jit
def rmsnorm_kernel(x, weight, eps=1e-5):
    """y [T, H] = rmsnorm(x [T, H]) * weight [H]; y has x's dtype."""
    y = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.shared_hbm)
    rmsnorm_rows(x, None, weight, y, None, eps)
    return y


@nki.jit
def add_rmsnorm_kernel(x, delta, weight, eps=1e-5):
    """(s, y): s = x + delta (in x's dtype), y = rmsnorm(s) * weight; both [T, H]."""
    total = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.shared_hbm)
    y = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.shared_hbm)
    rmsnorm_rows(x, delta, weight, y, total, eps)
    return total, y


# --------------------------------------------------------------------------- host launchers

BF16 = np.dtype(ml_dtypes.bfloat16)


def _activations(name, a, dtype):
    if np.ndim(a) != 2:
        raise ValueError(f"{name} must be [tokens, hidden], got shape {tuple(np.shape(a))}")
    return on_device(a, dtype)


def rmsnorm(x, weight, eps=1e-5, dtype=BF16, report=False):
    """Host launcher with the semantics of `ReferenceOps.rmsnorm`: x [T, H] (a float array or device
    tensor), weight [H] (HF layout = kernel layout). Activations travel in `dtype` (bf16 by default),
    the weight in bf16. Returns y [T, H] in `dtype` as a device tensor (`launch.to_host` reads it
    back), plus the simulator's cost report when `report=True`."""
    x = _activations("x", x, dtype)
    w = np.ascontiguousarray(weight, dtype=BF16)
    return launch(rmsnorm_kernel, x, w, eps=float(eps), report=report, splits_lnc=True)


def add_rmsnorm(x, delta, weight, eps=1e-5, dtype=BF16, report=False):
    """Host launcher with the semantics of `ReferenceOps.add_rmsnorm`: returns (x + delta,
    rmsnorm(x + delta)) in `dtype`, device tensors (the sum is rounded to `dtype` before it is normalised), plus the
    report when `report=True`."""
    x = _activations("x", x, dtype)
    delta = _activations("delta", delta, dtype)
    if x.shape != delta.shape:
        raise ValueError(f"add_rmsnorm: delta shape {tuple(delta.shape)} differs from x shape {tuple(x.shape)}")
    w = np.ascontiguousarray(weight, dtype=BF16)
    return launch(add_rmsnorm_kernel, x, delta, w, eps=float(eps), report=report, splits_lnc=True)
