"""Token embedding: out[t, :] = table[ids[t], :], an indirect-DMA row gather.

Arguments (HBM): ids [T] int32 (0 <= id < V), table [V, H] (bf16 for MiMo: [152576, 4096]).
Returns [T, H] in the table's dtype.

The rows go HBM -> HBM in one DMA per 128 tokens: the ids of a tile sit one per partition in SBUF
and drive the gather (`table.ap(..., vector_offset=ids)`, the documented indirect access on the
partition dim), so nothing passes through SBUF and no engine but DMA works. All full tiles' ids load
in one DMA. Out-of-range ids are a runtime error of the DMA (oob_mode.error), and the host launcher
rejects them before launching with a message naming the id. LNC=2: the programs take alternate
full tiles, and the tail cut into one piece per program.
"""
from __future__ import annotations

import numpy as np

from mimo_kernels.backend import nki, nl, nisa
from mimo_kernels.launch import is_tensor, launch, on_device
from mimo_kernels.checks import KernelInputError

P = nl.tile_size.pmax


def _gather_rows(table, id_column, out, t0, n):
    """out[t0:t0+n, :] = table[id_column[i], :] for the n ids of `id_column` [n, 1] (SBUF)."""
    H = table.shape[1]
    nisa.dma_copy(dst=out[t0:t0 + n, :],
                  src=table.ap([[H, n], [1, H]], vector_offset=id_column, indirect_dim=0))


@nki.jit
def embedding_kernel(ids, table):
    """out [T, H] = table [V, H] rows at ids [T] (int32)."""
    (T,) = ids.shape
    V, H = table.shape
    if not (T >= 1):
        raise KernelInputError("embedding: no tokens")
    out = nl.ndarray((T, H), dtype=table.dtype, buffer=nl.shared_hbm)
    share, shares = nl.program_id(0), nl.num_programs(0)      # LNC=2: tiles, or the tail, split
    full_tiles, tail = divmod(T, P)
    mine = list(range(share, full_tiles, shares))
    if mine:
        # All full tiles' ids in one DMA: column i holds the ids of tokens i*128 .. i*128+127.
        ids_full = nl.ndarray((P, full_tiles), dtype=ids.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=ids_full, src=ids[0:full_tiles * P].reshape((full_tiles, P)).permute((1, 0)))
        for i in mine:
            _gather_rows(table, ids_full[:, i:i + 1], out, i * P, P)
    if tail:
        piece = -(-tail // shares)
        for t0 in range(full_tiles * P + share * piece, T, shares * piece):
            n = min(piece, T - t0)
            ids_tail = nl.ndarray((n, 1), dtype=ids.dtype, buffer=nl.sbuf)
            nisa.dma_copy(dst=ids_tail, src=ids[t0:t0 + n].reshape((n, 1)))
            _gather_rows(table, ids_tail, out, t0, n)
    return out


def embed(ids, table, report=False):
    """Host launcher with the semantics of `ReferenceOps.embed`: ids (int array or device tensor, any
    shape), table [V, H] as stored (bf16 for MiMo; HF layout = kernel layout). Returns [*ids.shape, H]
    in the table's dtype (a device tensor), plus the cost report when `report=True`. Host ids are
    checked against the vocabulary; device ids are not (that would read them back)."""
    V = table.shape[0]
    if not is_tensor(ids):
        ids = np.asarray(ids)
        if ids.dtype.kind not in "iu":
            raise TypeError(f"embed: token ids must be integers, got dtype {ids.dtype}")
        bad = (ids < 0) | (ids >= V)
        if bad.any():
            raise ValueError(f"embed: token id {ids[bad].reshape(-1)[0]} is outside the vocabulary [0, {V})")
    elif ids.is_floating_point() or ids.is_complex():
        raise TypeError(f"embed: token ids must be integers, got dtype {ids.dtype}")
    flat = on_device(ids.reshape(-1), np.int32)
    result = launch(embedding_kernel, flat, np.ascontiguousarray(table), report=report, splits_lnc=True)
    out, rep = result if report else (result, None)
    out = out.reshape(tuple(ids.shape) + (table.shape[1],))
    return (out, rep) if report else out
