"""Partial rotary position embedding (NeoX rotate-half) on the first R dims of every head.

    out[..., :R/2]  = x1 * cos - x2 * sin        x1 = x[..., :R/2], x2 = x[..., R/2:R]
    out[..., R/2:R] = x2 * cos + x1 * sin        cos, sin = cos/sin(p_t * theta^(-2i/R)), i < R/2
    out[..., R:]    = x[..., R:]                 (MiMo: R = 64 of D = 192, theta 5e6 / 1e4)

Angles: cos/sin come from a table [n_positions, R] fp32 (cos | sin), computed once per theta on the
host in float64 (`rope_table`) and gathered per token inside the kernel by an indirect DMA on the
token positions. Computing the angle on chip in fp32 would not do: at position ~262144 an fp32
angle p * inv_freq is off by up to ~0.015 rad (half an ulp of 2^18 is 2^-6), i.e. errors of 1.5% of
the value, and ScalarE `sin` is only specified on [-pi, pi], so it would also need an exact range
reduction. A float64 table rounded once to fp32 is exact to 6e-8. It costs 4*R bytes per token of
extra HBM reads (256 B against 49 KiB of q per token for MiMo).

Layout: tokens on partitions, `tpp` whole tokens per partition (all heads, contiguous in HBM, so each
partition moves tpp*heads*D contiguous elements per DMA); with fewer than 128 tokens (decode) a
token's heads spread over several partitions instead, its cos/sin row copied to them by a 0/1
selection matmul on TensorE, so that decode keeps all lanes busy. The rotation is six element-wise
instructions over [partitions, tpp, heads, R/2] spread over VectorE, GpSimd and ScalarE, with cos/sin
broadcast over heads by a stride-0 view. The untouched dims never leave the loaded tile: the rotated
halves are written back into it and the whole tile is stored. HBM-bound: x in, out out.
LNC=2: the programs take alternate tiles, the decode tile cut into one piece per program. The
decoder layer ropes q and k inside the projection instead (kernels/norm_qkv_rope.py).
"""
from __future__ import annotations

import numpy as np
import ml_dtypes

from mimo_kernels.backend import nki, nl, nisa
from mimo_kernels.launch import RESIDENT, launch, on_device
from mimo_kernels.checks import KernelInputError

P = nl.tile_size.pmax
TILE_ELEMS_PER_PARTITION = 12288   # x elements per partition per tile (24 KiB bf16): SBUF budget


def _token_tiles(tokens, heads, head_dim, programs=1):
    """(first token, tokens, tokens per partition, partitions per token) of each tile.

    Fill 128 partitions first: put more tokens on a partition only when more than 128 are left
    (an instruction costs a fixed 64 cycles plus one per element, so short rows waste lanes); when
    fewer than 128 are left (decode), cut them into one piece per program (LNC) and spread each
    token's heads over the most partitions that fit.
    """
    max_tpp = max(1, TILE_ELEMS_PER_PARTITION // (heads * head_dim))
    tiles = []
    t0 = 0
    while t0 < tokens:
        rest = tokens - t0
        if rest < P:
            piece = -(-rest // programs)
            for a in range(t0, tokens, piece):
                n = min(piece, tokens - a)
                ppt = max([d for d in range(1, heads + 1) if heads % d == 0 and n * d <= P])
                tiles.append((a, n, 1, ppt))
            return tiles
        tpp = min(max_tpp, rest // P)
        n = min(P, rest // tpp) * tpp
        tiles.append((t0, n, tpp, 1))
        t0 += n
    return tiles


def _gather_cos_sin(positions, cos_sin_table, t0, n, tpp, ppt, cos_sin):
    """cos_sin [partitions, tpp, R] (SBUF) = table rows of the tile's tokens, partition by partition."""
    parts, R = cos_sin.shape[0], cos_sin.shape[2]
    if ppt == 1:
        pos = nl.ndarray((parts, tpp), dtype=nl.int32, buffer=nl.sbuf)
        nisa.dma_copy(dst=pos, src=positions[t0:t0 + n].reshape((parts, tpp)))
        for j in range(tpp):
            # Indirect DMA: partition p receives table row positions[t0 + p*tpp + j].
            nisa.dma_copy(dst=cos_sin[:, j, :],
                          src=cos_sin_table.ap([[R, parts], [1, R]], vector_offset=pos[:, j:j + 1],
                                               indirect_dim=0))
        return
    # A token spans ppt partitions: gather one row per token, then copy row t to partitions
    # t*ppt .. t*ppt+ppt-1 with a 0/1 selection matmul on TensorE (fp32, exact).
    pos = nl.ndarray((n, 1), dtype=nl.int32, buffer=nl.sbuf)
    nisa.dma_copy(dst=pos, src=positions[t0:t0 + n].reshape((n, 1)))
    rows = nl.ndarray((n, R), dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=rows, src=cos_sin_table.ap([[R, n], [1, R]], vector_offset=pos, indirect_dim=0))
    ones = nl.ndarray((n, parts), dtype=nl.float32, buffer=nl.sbuf)
    nisa.memset(dst=ones, value=1.0)
    upper = nl.ndarray((n, parts), dtype=nl.float32, buffer=nl.sbuf)
    nisa.affine_select(dst=upper, pattern=[[1, parts]], channel_multiplier=-ppt, on_true_tile=ones,
                       on_false_value=0.0, cmp_op=nl.greater_equal)           # q - ppt*t >= 0
    select = nl.ndarray((n, parts), dtype=nl.float32, buffer=nl.sbuf)
    nisa.affine_select(dst=select, pattern=[[-1, parts]], channel_multiplier=ppt, on_true_tile=upper,
                       on_false_value=0.0, cmp_op=nl.greater_equal, offset=ppt - 1)   # q < ppt*(t+1)
    spread = nl.ndarray((parts, R), dtype=nl.float32, buffer=nl.psum)
    nisa.nc_matmul(dst=spread, stationary=select, moving=rows)
    nisa.tensor_copy(dst=cos_sin[:, 0, :], src=spread)                         # PSUM -> SBUF


def rotate_half(x1, x2, cos, sin):
    """x1, x2 (SBUF views of one shape) <- x1 * cos - x2 * sin, x2 * cos + x1 * sin, in place;
    cos and sin fp32 views of the same shape (broadcasts allowed)."""
    x1_cos, x2_sin, x2_cos, x1_sin = [nl.ndarray(x1.shape, dtype=nl.float32, buffer=nl.sbuf) for _ in range(4)]
    # tensor_tensor runs on VectorE or GpSimd only; GpSimd (N cycles at 1.2 GHz) takes four,
    # VectorE (2N at 0.96 GHz for two inputs) two.
    gpsimd = nisa.engine.gpsimd
    nisa.tensor_tensor(dst=x1_cos, data1=x1, data2=cos, op=nl.multiply)
    nisa.tensor_tensor(dst=x2_sin, data1=x2, data2=sin, op=nl.multiply, engine=gpsimd)
    nisa.tensor_tensor(dst=x2_cos, data1=x2, data2=cos, op=nl.multiply, engine=gpsimd)
    nisa.tensor_tensor(dst=x1_sin, data1=x1, data2=sin, op=nl.multiply, engine=gpsimd)
    # Rotated halves overwrite the loaded tile in place; dims R..D stay as loaded.
    nisa.tensor_tensor(dst=x1, data1=x1_cos, data2=x2_sin, op=nl.subtract)
    nisa.tensor_tensor(dst=x2, data1=x2_cos, data2=x1_sin, op=nl.add, engine=gpsimd)


def _load_tile(x, positions, cos_sin_table, tile):
    """HBM -> SBUF: a token tile (t0, n, tpp, ppt) of x as [parts, tpp, heads per partition, D]
    and its cos | sin rows [parts, tpp, R]."""
    t0, n, tpp, ppt = tile
    heads, D = x.shape[1], x.shape[2]
    shape = (n // tpp * ppt, tpp, heads // ppt, D)          # a contiguous view of x[t0:t0+n]
    x_tile = nl.ndarray(shape, dtype=x.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=x_tile, src=x[t0:t0 + n].reshape(shape))
    cos_sin = nl.ndarray((shape[0], tpp, cos_sin_table.shape[1]), dtype=nl.float32, buffer=nl.sbuf)
    _gather_cos_sin(positions, cos_sin_table, t0, n, tpp, ppt, cos_sin)
    return x_tile, cos_sin


@nki.jit
def rope_kernel(x, positions, cos_sin_table):
    """Partial rotate-half RoPE.

    x [T, heads, D] (bf16 or fp32), positions [T] int32 (0 <= p < n_positions), cos_sin_table
    [n_positions, R] fp32 with cos(p * f_i) in column i and sin(p * f_i) in column R/2 + i.
    Returns [T, heads, D] in x's dtype. Constraints: R even, R <= D.
    """
    T, heads, D = x.shape
    R = cos_sin_table.shape[1]
    half = R // 2
    if not (R % 2 == 0 and R <= D):
        raise KernelInputError(f"rope: table width {R} (rotary dim) must be even and <= head dim {D}")
    if not (tuple(positions.shape) == (T,)):
        raise KernelInputError(f"rope: positions shape {positions.shape} must be ({T},)")
    out = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.shared_hbm)
    share, shares = nl.program_id(0), nl.num_programs(0)
    tiles = _token_tiles(T, heads, D, shares)[share::shares]            # LNC=2: tiles split
    # Each tile's loads are issued before the previous tile's work and store: the DMA queues run
    # in order, and a load behind a store would wait for the compute the store waits for.
    ahead = _load_tile(x, positions, cos_sin_table, tiles[0]) if tiles else None
    for i, (t0, n, tpp, ppt) in enumerate(tiles):
        x_tile, cos_sin = ahead
        if i + 1 < len(tiles):
            ahead = _load_tile(x, positions, cos_sin_table, tiles[i + 1])
        hpp = heads // ppt                                  # heads per partition
        shape = x_tile.shape
        cos = cos_sin[:, :, 0:half].expand_dim(2).broadcast(2, hpp)     # [parts, tpp, hpp, R/2]
        sin = cos_sin[:, :, half:R].expand_dim(2).broadcast(2, hpp)
        x1 = x_tile[:, :, :, 0:half]
        x2 = x_tile[:, :, :, half:R]
        rotate_half(x1, x2, cos, sin)
        nisa.dma_copy(dst=out[t0:t0 + n].reshape(shape), src=x_tile)                # SBUF -> HBM
    return out


# --------------------------------------------------------------------------- host side

BF16 = np.dtype(ml_dtypes.bfloat16)
MIN_TABLE_POSITIONS = 4096
_tables: dict = {}


def rope_table(theta: float, rotary_dim: int, n_positions: int) -> np.ndarray:
    """cos | sin table [n_positions, rotary_dim] fp32, angles p * theta^(-2i/rotary_dim) in float64."""
    half = rotary_dim // 2
    inv_freq = theta ** (-np.arange(half, dtype=np.float64) * 2.0 / rotary_dim)
    angle = np.arange(n_positions, dtype=np.float64)[:, None] * inv_freq[None, :]
    return np.concatenate([np.cos(angle), np.sin(angle)], axis=1).astype(np.float32)


def cached_rope_table(theta: float, rotary_dim: int, max_position: int) -> np.ndarray:
    """The table for positions 0 .. max_position, cached per theta (length: a power of two >= 4096)."""
    n = max(MIN_TABLE_POSITIONS, 1 << int(max_position).bit_length())
    key = (float(theta), int(rotary_dim))
    table = _tables.get(key)
    if table is None or table.shape[0] < n:
        table = _tables[key] = RESIDENT.resident(rope_table(theta, rotary_dim, n))   # a constant: uploaded once
    return table


def positions_and_table(name, positions, tokens, theta, rotary_dim, max_position=None):
    """(positions [tokens] int32, cos | sin table) for a launch, after checking the positions:
    [tokens] non-negative ints below 2^31, at most `max_position` (the table's last row; default
    the largest given; a static-shape caller passes its bucket's, so the table's shape does not
    follow the data)."""
    positions = np.asarray(positions)
    if positions.shape != (tokens,):
        raise ValueError(f"{name}: positions shape {positions.shape} must be ({tokens},), one per token")
    if positions.size and (positions.min() < 0 or positions.max() >= 2 ** 31):
        raise ValueError(f"{name}: positions must lie in [0, 2^31), got range [{positions.min()}, {positions.max()}]")
    largest = int(positions.max(initial=0))
    if max_position is not None and largest > max_position:
        raise ValueError(f"{name}: position {largest} exceeds max_position={max_position}")
    table = cached_rope_table(theta, rotary_dim, largest if max_position is None else int(max_position))
    return positions.astype(np.int32), table


def rope(x, positions, theta, rotary_dim=64, dtype=BF16, report=False, max_position=None):
    """Host launcher with the semantics of `ReferenceOps.rope`: x [T, heads, D] (a float array or device tensor),
    positions [T] (non-negative ints), returns x with the first `rotary_dim` dims of every head
    rotated, in `dtype` (bf16 by default; a device tensor), plus the cost report when `report=True`.
    `max_position`: the largest position the table must cover (`positions_and_table`)."""
    if np.ndim(x) != 3:
        raise ValueError(f"rope: x must be [tokens, heads, head_dim], got shape {tuple(np.shape(x))}")
    positions, table = positions_and_table("rope", positions, np.shape(x)[0], theta, rotary_dim, max_position)
    return launch(rope_kernel, on_device(x, dtype), positions, table,
                  report=report, splits_lnc=True)
