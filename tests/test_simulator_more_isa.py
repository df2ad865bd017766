"""Less common instructions: dma_compute scatter-add, predicated copy, select_reduce, bn_stats."""
import numpy as np
import pytest

from mimo_kernels.backend import nki, nl, nisa, simulate
from mimo_kernels.simulator import errors as E


def run(body, *arrays):
    return simulate(nki.jit(body))(*arrays)


def test_dma_compute_scatter_add_rows():
    def k(base, rows, ids):
        out = nl.ndarray(base.shape, dtype=base.dtype, buffer=nl.shared_hbm)
        nisa.dma_copy(out, base)                                   # HBM -> HBM
        idx = nl.ndarray((ids.shape[0], 1), dtype=nl.int32)
        nisa.dma_copy(idx, ids)
        r = nl.load(rows)
        view = out.ap([[base.shape[1], ids.shape[0]], [1, base.shape[1]]], vector_offset=idx)
        nisa.dma_compute(view, [view, r], nl.add)                  # out[ids] += rows
        return out
    base = np.arange(40, dtype=np.float32).reshape(10, 4)
    rows = np.ones((3, 4), np.float32)
    ids = np.array([[7], [2], [5]], np.int32)
    ref = base.copy()
    ref[[7, 2, 5]] += 1
    np.testing.assert_array_equal(run(k, base, rows, ids), ref)


def test_dma_compute_rejects_duplicate_indices():
    def k(base, ids):
        out = nl.ndarray(base.shape, dtype=base.dtype, buffer=nl.shared_hbm)
        nisa.dma_copy(out, base)
        idx = nl.ndarray((2, 1), dtype=nl.int32)
        nisa.dma_copy(idx, ids)
        view = out.ap([[4, 2], [1, 4]], vector_offset=idx)
        nisa.dma_compute(view, [view, nl.zeros((2, 4), dtype=nl.float32)], nl.add)
        return out
    with pytest.raises(E.UnsupportedError, match="duplicate"):
        run(k, np.zeros((4, 4), np.float32), np.array([[1], [1]], np.int32))


def test_tensor_copy_predicated_and_select_reduce():
    def k(a, m):
        out = nl.ndarray(a.shape, dtype=a.dtype, buffer=nl.shared_hbm)
        mx = nl.ndarray((a.shape[0], 1), dtype=nl.float32, buffer=nl.shared_hbm)
        t, pred = nl.load(a), nl.load(m)
        d = nl.zeros(a.shape, dtype=a.dtype)
        nisa.tensor_copy_predicated(d, t, pred)
        s = nl.ndarray(a.shape, dtype=a.dtype)
        r = nl.ndarray((a.shape[0], 1), dtype=nl.float32)
        nisa.select_reduce(s, pred, d, -1.0, reduce_res=r, reduce_op=nl.maximum)
        nl.store(out, s)
        nl.store(mx, r)
        return out, mx
    a = np.random.default_rng(0).standard_normal((16, 32)).astype(np.float32)
    m = (np.random.default_rng(1).random((16, 32)) > 0.5).astype(np.uint8)
    out, mx = run(k, a, m)
    ref = np.where(m != 0, a, -1.0)
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(mx[:, 0], ref.max(1))


def test_bn_stats_and_aggr_give_mean_and_variance():
    def k(a):
        out = nl.ndarray((a.shape[0], 2), dtype=nl.float32, buffer=nl.shared_hbm)
        t = nl.load(a)
        n_chunks = a.shape[1] // 512
        stats = nl.ndarray((a.shape[0], 6 * n_chunks), dtype=nl.float32)
        for j in range(n_chunks):
            nisa.bn_stats(stats[:, 6 * j:6 * j + 6], t[:, 512 * j:512 * (j + 1)])
        mv = nl.ndarray((a.shape[0], 2), dtype=nl.float32)
        nisa.bn_aggr(mv, stats)
        nl.store(out, mv)
        return out
    a = np.random.default_rng(2).standard_normal((64, 1536)).astype(np.float32) * 3 + 1
    out = run(k, a)
    np.testing.assert_allclose(out[:, 0], a.mean(1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[:, 1], a.var(1), rtol=1e-4)
