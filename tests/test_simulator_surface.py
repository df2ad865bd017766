"""The documented NKI 0.6 surface added to the simulator: each API and semantic against
an independent NumPy formulation of its documentation (docs/simulator.md, "Surface")."""
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import pytest

from mimo_kernels.simulator import errors as E
import mimo_kernels.simulator as sim

nki, nl, nisa = sim, sim.language, sim.isa
RNG = np.random.default_rng(11)


def run(body, *arrays, lnc=1):
    kernel = nki.jit(body)
    return nki.simulate(kernel[lnc] if lnc > 1 else kernel)(*arrays)


def load(x):
    t = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.sbuf)
    nisa.dma_copy(t, x)
    return t


def store(t):
    out = nl.ndarray(t.shape, dtype=t.dtype, buffer=nl.shared_hbm)
    nisa.dma_copy(out, t)
    return out


# --------------------------------------------------------------------------- instructions

@pytest.mark.parametrize("reverse0,reverse1", [(False, False), (True, True)])
def test_tensor_tensor_scan(reverse0, reverse1):
    a = RNG.uniform(0.5, 1.0, (64, 300)).astype(np.float32)
    b = RNG.standard_normal((64, 300)).astype(np.float32)
    init = RNG.standard_normal((64, 1)).astype(np.float32)

    def k(a, b, init):
        out = nl.ndarray(a.shape, dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_tensor_scan(out, load(a), load(b), load(init), op0=nl.multiply, op1=nl.subtract,
                                reverse0=reverse0, reverse1=reverse1)
        return store(out)
    expected = np.empty_like(a)
    state = init[:, 0].astype(np.float64)
    for i in range(a.shape[1]):   # op1(op0(a, state), b), operands swapped by reverse1
        x = a[:, i] * state
        state = (b[:, i] - x) if reverse1 else (x - b[:, i])
        expected[:, i] = state
    np.testing.assert_allclose(run(k, a, b, init), expected, rtol=1e-4, atol=1e-4)


def test_nc_stream_shuffle_quadrants_and_keep():
    x = RNG.standard_normal((64, 8)).astype(np.float32)
    mask = [(i + 1) % 32 for i in range(32)]
    mask[5] = 255

    def k(x):
        dst = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.sbuf)
        nisa.memset(dst, 7.0)
        nisa.nc_stream_shuffle(dst=dst, src=load(x), shuffle_mask=mask)
        return store(dst)
    expected = np.empty_like(x)
    for p in range(64):
        q, i = divmod(p, 32)
        expected[p] = 7.0 if mask[i] == 255 else x[q * 32 + mask[i]]
    np.testing.assert_array_equal(run(k, x), expected)


def test_nc_stream_shuffle_broadcast_and_start_partition_rule():
    x = RNG.standard_normal((1, 16)).astype(np.float32)

    def k(x):
        dst = nl.ndarray((32, 16), dtype=x.dtype, buffer=nl.sbuf)
        nisa.nc_stream_shuffle(dst=dst, src=load(x), shuffle_mask=[0] * 32)
        return store(dst)
    np.testing.assert_array_equal(run(k, x), np.repeat(x, 32, axis=0))

    def bad(x):
        t = load(x)
        dst = nl.ndarray((128, 16), dtype=x.dtype, buffer=nl.sbuf)
        nisa.nc_stream_shuffle(dst=dst[16:48], src=t[16:48], shuffle_mask=list(range(32)))
    with pytest.raises(E.PartitionMismatchError, match="start partition"):
        run(bad, RNG.standard_normal((128, 16)).astype(np.float32))


def test_range_select_and_accumulator():
    x = RNG.standard_normal((8, 40)).astype(np.float32)
    lo = RNG.integers(0, 20, (8, 1)).astype(np.float32)
    hi = lo + RNG.integers(1, 20, (8, 1)).astype(np.float32)

    def k(x, lo, hi):
        out = nl.ndarray(x.shape, dtype=nl.float32, buffer=nl.sbuf)
        red = nl.ndarray((8, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.range_select(out, load(x), nl.greater_equal, nl.less, load(lo), load(hi), reduce_res=red,
                          range_start=3)
        return store(out), store(red)
    out, red = run(k, x, lo, hi)
    index = 3 + np.arange(40)[None, :]
    expected = np.where((index >= lo) & (index < hi), x, np.float32(-3.4028235e38))
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(red, expected.max(axis=1, keepdims=True))


def test_range_select_requires_fp32_min_fill():
    def k(x):
        b = nl.zeros((8, 1), dtype=nl.float32)
        nisa.range_select(nl.ndarray((8, 4), dtype=nl.float32), load(x), nl.less, nl.less, b, b,
                          on_false_value=0.0)
    with pytest.raises(E.UnsupportedError, match="FP32_MIN"):
        run(k, np.zeros((8, 4), np.float32))


def test_nonzero_with_count_lanes():
    x = (RNG.random((128, 12)) < 0.4).astype(np.float32)

    def k(x):
        out = nl.ndarray((128, 13), dtype=nl.int32, buffer=nl.sbuf)
        nisa.memset(out, 99)
        nisa.nonzero_with_count(out, load(x), index_offset=16, padding_val=-1)
        return store(out)
    out = run(k, x)
    expected = np.full((128, 13), 99, np.int32)
    for p in range(0, 128, 16):
        idx = np.flatnonzero(x[p]) + 16
        expected[p, :12] = -1
        expected[p, :idx.size] = idx
        expected[p, 12] = idx.size
    np.testing.assert_array_equal(out, expected)


def test_sendrecv_and_core_barrier_run_concurrently():
    x = RNG.standard_normal((2, 16, 8)).astype(np.float32)

    def k(x):
        me = nl.program_id(0)
        shared = nl.ndarray((2, 16, 8), dtype=x.dtype, buffer=nl.shared_hbm)
        mine = load(x[me])
        nisa.dma_copy(shared[me], mine)
        nisa.core_barrier(shared, cores=(0, 1))          # both halves written before anyone reads
        other = load(shared[1 - me])
        got = nl.ndarray((16, 8), dtype=x.dtype, buffer=nl.sbuf)
        nisa.sendrecv(src=other, dst=got, send_to_rank=1 - me, recv_from_rank=1 - me, pipe_id=0,
                      dma_engine=nisa.dma_engine.dma)
        out = nl.ndarray((2, 16, 8), dtype=x.dtype, buffer=nl.shared_hbm)
        nisa.dma_copy(out[me], got)                      # the peer sent back our own slice
        return out
    np.testing.assert_array_equal(run(k, x, lnc=2), x)


def test_core_barrier_needs_both_programs():
    def k(x):
        shared = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.shared_hbm)
        nisa.dma_copy(shared, x)
        if nl.program_id(0) == 0:
            nisa.core_barrier(shared, cores=(0, 1))
        return shared
    with pytest.raises(E.KernelInterfaceError, match="core_barrier"):
        run(k, np.zeros((4, 4), np.float32), lnc=2)
    with pytest.raises(E.UnsupportedError, match="LNC=2"):
        run(k, np.zeros((4, 4), np.float32))


# --------------------------------------------------------------------------- language

def test_shared_identity_matrix_and_constant():
    table = RNG.standard_normal((4, 6)).astype(np.float32)

    def k(x):
        eye = nl.shared_identity_matrix(n=32, dtype=nl.bfloat16)
        const = nl.shared_constant(table)
        out = nl.ndarray((32, 32), dtype=nl.bfloat16, buffer=nl.shared_hbm)
        nisa.dma_copy(out, eye)
        out2 = nl.ndarray(table.shape, dtype=nl.float32, buffer=nl.shared_hbm)
        nisa.dma_copy(out2, const)
        return out, out2
    eye, const = run(k, np.zeros((1, 1), np.float32))
    np.testing.assert_array_equal(eye.astype(np.float32), np.eye(32))
    np.testing.assert_array_equal(const, table)


def test_nkiobject_generated_init_and_post_init():
    class Tile(nl.NKIObject):
        size: int
        start: int = 0

        def __post_init__(self):
            self.end = self.start + self.size

    @dataclass(frozen=True)
    class Frozen(nl.NKIObject):
        eps: float = 1e-6

    t = Tile(4, start=2)
    assert (t.size, t.start, t.end) == (4, 2, 6)
    assert Tile(3).start == 0 and Tile(size=1) == Tile(1)
    assert Frozen().eps == 1e-6 and Frozen(0.5).eps == 0.5
    with pytest.raises(TypeError):
        Tile(1, 2, 3)


def test_nc_version_is_ordered():
    v = nisa.get_nc_version()
    assert v >= nisa.nc_version.gen3 and v >= 3 and v < nisa.nc_version.gen4 and v == 3
    assert nisa.constants.nc_version is nisa.nc_version


def test_jit_keywords():
    def body(x):
        return store(load(x))
    x = np.ones((4, 4), np.float32)
    for kw in ({"mode": "auto"}, {"compile_config": object()}, {"specialization_config": object()}):
        np.testing.assert_array_equal(nki.simulate(nki.jit(**kw)(body))(x), x)
    with pytest.raises(TypeError, match="debug_kernel"):
        nki.jit(debug_kernel=True)
    with pytest.raises(E.UnsupportedError, match="platform_target"):
        nki.jit(platform_target="trn2")


def test_packed_dtypes_move_but_do_not_compute():
    packed = RNG.integers(0, 2**32, (8, 4), dtype=np.uint32).view(nl.float8_e4m3fn_x4)
    assert nl.float8_e4m3fn_x4.itemsize == 4 and nl.float4_e2m1fn_x4.itemsize == 2
    assert nl.float8_e8m0fnu.itemsize == 1 and nl.float8_e5m2_x4.itemsize == 4

    def copy(x):
        return store(load(x))
    np.testing.assert_array_equal(run(copy, packed).view(np.uint32), packed.view(np.uint32))

    def math(x):
        out = nl.ndarray(x.shape, dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_copy(out, load(x))
    with pytest.raises(E.DtypeError, match="trn3"):
        run(math, packed)


# --------------------------------------------------------------------------- semantics

def test_ap_on_a_view_adds_the_view_base():
    x = np.arange(16 * 12, dtype=np.float32).reshape(16, 12)

    def k(x):
        view = x[2:10, 3:]                                    # base element 2 * 12 + 3
        out = nl.ndarray((4, 3), dtype=x.dtype, buffer=nl.shared_hbm)
        nisa.dma_copy(out, view.ap([[24, 4], [2, 3]], offset=1))
        return out
    flat = x.reshape(-1)
    base = 2 * 12 + 3 + 1
    expected = np.array([[flat[base + 24 * i + 2 * j] for j in range(3)] for i in range(4)])
    np.testing.assert_array_equal(run(k, x), expected)


def test_ap_dtype_reinterprets_bytes():
    x = RNG.standard_normal((8, 16)).astype(np.float32)

    def k(x):
        t = load(x)
        halves = t.ap([[32, 8], [1, 32]], dtype=nl.bfloat16)    # fp32 row = 2 x 16-bit words
        out = nl.ndarray((8, 32), dtype=nl.bfloat16, buffer=nl.shared_hbm)
        nisa.dma_copy(out, halves)
        back = nl.ndarray((8, 32), dtype=nl.bfloat16, buffer=nl.sbuf)
        nisa.dma_copy(back, out)
        again = nl.ndarray((8, 16), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_copy(again.ap([[32, 8], [1, 32]], dtype=nl.bfloat16), back)   # write through alias
        return out, store(again)
    words, again = run(k, x)
    np.testing.assert_array_equal(words.view(np.uint16), x.view(np.uint16))
    np.testing.assert_array_equal(again, x)


def test_dma_transpose_4d():
    x = RNG.standard_normal((2, 3, 4, 5)).astype(ml_dtypes.bfloat16)

    def k(x):
        out = nl.ndarray((5, 3, 4, 2), dtype=x.dtype, buffer=nl.shared_hbm)
        tile = nl.ndarray(out.shape, dtype=x.dtype, buffer=nl.sbuf)   # dst "must be a tile in SBUF"
        nisa.dma_transpose(tile, x)
        nisa.dma_copy(out, tile)
        return out
    np.testing.assert_array_equal(run(k, x), np.transpose(x, (3, 1, 2, 0)))


def test_ndarray_address_shares_and_counts_once():
    x = RNG.standard_normal((128, 64 * 1024 // 4)).astype(np.float32)   # 64 KiB per partition

    def k(x):
        for _ in range(6):      # 6 x 64 KiB > 224 KiB unless the address is shared
            a = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.sbuf, address=(0, 0))
            nisa.dma_copy(a, x)
        b = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.sbuf, address=(0, 0))
        return store(b)                                    # sees what was written through `a`
    np.testing.assert_array_equal(run(k, x), x)

    def clash(x):
        a = nl.ndarray((128, 4), dtype=nl.float32, buffer=nl.sbuf, address=(0, 0))
        b = nl.ndarray((128, 8), dtype=nl.float32, buffer=nl.sbuf, address=(0, 0))
        return a, b
    with pytest.raises(E.UnsupportedError, match="address"):
        run(clash, x)


def test_returning_a_reshape_of_an_output():
    x = RNG.standard_normal((4, 6)).astype(np.float32)

    def k(x):
        out = nl.ndarray((24,), dtype=x.dtype, buffer=nl.shared_hbm)
        flat = out.reshape((4, 6))
        nisa.dma_copy(flat, x)
        return flat
    np.testing.assert_array_equal(run(k, x), x)


def test_zero_size_views_may_exist_but_not_be_accessed():
    def k(x):
        empty = x[nl.ds(0, 0), :]
        assert empty.shape == (0, 4)
        return store(load(x))
    x = np.ones((4, 4), np.float32)
    np.testing.assert_array_equal(run(k, x), x)

    def access(x):
        t = nl.ndarray((4, 4), dtype=x.dtype, buffer=nl.sbuf)
        nisa.dma_copy(t[:, nl.ds(0, 0)], x[:, nl.ds(0, 0)])
    with pytest.raises(E.ShapeMismatchError, match="zero-size"):
        run(access, x)


def test_kernel_writes_its_input_in_place():
    x = RNG.standard_normal((8, 4)).astype(np.float32)
    original = x.copy()

    def k(x):
        nisa.dma_copy(x, nl.add(load(x), 1.0))
        return x
    out = run(k, x)
    np.testing.assert_allclose(out, original + 1, rtol=1e-6)
    np.testing.assert_allclose(x, original + 1, rtol=1e-6)       # the caller's array too


def test_vector_offset_ignores_the_leading_stride():
    table = np.arange(10 * 6, dtype=np.float32).reshape(10, 6)
    ids = np.array([[7], [0], [3]], np.int32)

    def k(table, ids):
        rows = nl.ndarray((3, 6), dtype=table.dtype, buffer=nl.sbuf)
        nisa.dma_copy(rows, table.ap([[999, 3], [1, 6]], vector_offset=load(ids), indirect_dim=0))
        return store(rows)
    np.testing.assert_array_equal(run(k, table, ids), table[[7, 0, 3]])


def test_ap_dtype_on_hbm_keeps_rows_for_vector_offset():
    table = RNG.integers(0, 2**32, (6, 4), dtype=np.uint32)
    ids = np.array([[4], [1]], np.int32)

    def k(table, ids):
        rows = nl.ndarray((2, 16), dtype=nl.uint8, buffer=nl.sbuf)
        nisa.dma_copy(rows, table.ap([[16, 2], [1, 16]], vector_offset=load(ids), indirect_dim=0, dtype=nl.uint8))
        return store(rows)
    np.testing.assert_array_equal(run(k, table, ids), table.view(np.uint8).reshape(6, 16)[[4, 1]])
