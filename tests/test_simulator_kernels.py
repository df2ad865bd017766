"""Small kernels in the NKI 0.6 dialect, run on the CPU simulator and compared with NumPy.

Tolerances: fp32 kernels match NumPy to 1e-5 relative (engines compute in fp32); bf16 kernels to
2e-2 relative (one bf16 rounding of the output, ~3.9e-3, plus the inputs' and intermediates').
"""
import ml_dtypes
import numpy as np
import pytest

from mimo_kernels.backend import nki, nl, nisa, simulate

BF16 = ml_dtypes.bfloat16
DTYPES = [np.float32, BF16]
TOL = {np.float32: dict(rtol=1e-5, atol=1e-5), BF16: dict(rtol=2e-2, atol=2e-2)}
P = nl.tile_size.pmax


def rand(shape, dtype, seed=0, low=-1.0, high=1.0):
    rng = np.random.default_rng(seed)
    return rng.uniform(low, high, size=shape).astype(np.float32).astype(dtype)


def f32(x):
    return np.asarray(x).astype(np.float32)


# --------------------------------------------------------------------------- vector add

@nki.jit
def add_kernel(a, b):
    """a, b: [R, C] in HBM, rows on partitions in tiles of 128 (ragged last tile)."""
    out = nl.ndarray(a.shape, dtype=a.dtype, buffer=nl.shared_hbm)
    rows, cols = a.shape
    for i in nl.affine_range((rows + P - 1) // P):
        r0, r1 = i * P, min(rows, (i + 1) * P)
        x = nl.load(a[r0:r1, :])                  # HBM -> SBUF
        y = nl.load(b[r0:r1, :])
        nl.store(out[r0:r1, :], nl.add(x, y))     # VectorE, SBUF -> HBM
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(128, 512), (300, 77)])
def test_vector_add(dtype, shape):
    a, b = rand(shape, dtype, 1), rand(shape, dtype, 2)
    out = simulate(add_kernel)(a, b)
    assert out.dtype == np.dtype(dtype) and out.shape == shape
    np.testing.assert_allclose(f32(out), f32(a) + f32(b), **TOL[dtype])


# --------------------------------------------------------------------------- tiled matmul

@nki.jit
def matmul_kernel(lhsT, rhs):
    """lhsT: [K, M] (contraction on partitions), rhs: [K, N] -> out [M, N] = lhsT.T @ rhs."""
    K, M = lhsT.shape
    _, N = rhs.shape
    TM, TK, TN = nl.tile_size.gemm_stationary_fmax, nl.tile_size.pmax, nl.tile_size.gemm_moving_fmax
    out = nl.ndarray((M, N), dtype=lhsT.dtype, buffer=nl.shared_hbm)
    for m in nl.affine_range((M + TM - 1) // TM):
        m0, m1 = m * TM, min(M, (m + 1) * TM)
        for n in nl.affine_range((N + TN - 1) // TN):
            n0, n1 = n * TN, min(N, (n + 1) * TN)
            acc = nl.ndarray((m1 - m0, n1 - n0), dtype=nl.float32, buffer=nl.psum)
            for k in nl.affine_range((K + TK - 1) // TK):
                k0, k1 = k * TK, min(K, (k + 1) * TK)
                a = nl.load(lhsT[k0:k1, m0:m1])
                b = nl.load(rhs[k0:k1, n0:n1])
                nisa.nc_matmul(acc, a, b)          # first write overwrites, then accumulates
            res = nl.ndarray(acc.shape, dtype=out.dtype, buffer=nl.sbuf)
            nisa.tensor_copy(res, acc)             # PSUM -> SBUF with cast
            nl.store(out[m0:m1, n0:n1], res)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kmn", [(128, 128, 512), (300, 200, 600)])
def test_tiled_matmul(dtype, kmn):
    K, M, N = kmn
    lhsT, rhs = rand((K, M), dtype, 3), rand((K, N), dtype, 4)
    out = simulate(matmul_kernel)(lhsT, rhs)
    np.testing.assert_allclose(f32(out), f32(lhsT).T @ f32(rhs), rtol=TOL[dtype]["rtol"], atol=2e-4 if dtype is np.float32 else 5e-2)


# --------------------------------------------------------------------------- transpose

@nki.jit
def transpose_kernel(x):
    """x: [R <= 128, C <= 128] -> out [C, R] through TensorE into PSUM."""
    out = nl.ndarray((x.shape[1], x.shape[0]), dtype=x.dtype, buffer=nl.shared_hbm)
    t = nl.load(x)
    tp = nl.ndarray(out.shape, dtype=x.dtype, buffer=nl.psum)
    nisa.nc_transpose(tp, t)
    res = nl.ndarray(out.shape, dtype=x.dtype, buffer=nl.sbuf)
    nisa.tensor_copy(res, tp)
    nl.store(out, res)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_transpose(dtype):
    x = rand((128, 96), dtype, 5)
    out = simulate(transpose_kernel)(x)
    np.testing.assert_array_equal(f32(out), f32(x).T)      # bit-exact


# --------------------------------------------------------------------------- row softmax

@nki.jit
def softmax_kernel(x):
    """Softmax over the free axis of x [R, C]; rows on partitions."""
    out = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.shared_hbm)
    rows, cols = x.shape
    for i in nl.affine_range((rows + P - 1) // P):
        r0, r1 = i * P, min(rows, (i + 1) * P)
        p = r1 - r0
        t = nl.load(x[r0:r1, :])
        neg_max = nl.ndarray((p, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_reduce(neg_max, nl.maximum, t, axis=1, negate=True)
        e = nl.ndarray((p, cols), dtype=nl.float32, buffer=nl.sbuf)
        row_sum = nl.ndarray((p, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.activation(e, nl.exp, t, bias=neg_max, reduce_op=nl.add, reduce_res=row_sum,
                        reduce_cmd=nisa.reduce_cmd.reset_reduce)
        inv = nl.ndarray((p, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.reciprocal(inv, row_sum)
        res = nl.ndarray((p, cols), dtype=x.dtype, buffer=nl.sbuf)
        nisa.tensor_scalar(res, e, nl.multiply, inv)
        nl.store(out[r0:r1, :], res)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax(dtype):
    x = rand((200, 300), dtype, 6, -4, 4)
    out = simulate(softmax_kernel)(x)
    ref = np.exp(f32(x) - f32(x).max(1, keepdims=True))
    ref /= ref.sum(1, keepdims=True)
    np.testing.assert_allclose(f32(out), ref, **TOL[dtype])


# --------------------------------------------------------------------------- RMS-style reduction

@nki.jit
def rmsnorm_kernel(x, w, eps):
    """y = x * rsqrt(mean(x^2) + eps) * w; x [T, H] (tokens on partitions), w [H]."""
    T, H = x.shape
    out = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.shared_hbm)
    # Weight broadcast to all partitions by the DMA (partition stride 0 on the HBM side).
    w_tile = nl.ndarray((P, H), dtype=w.dtype, buffer=nl.sbuf)
    nisa.dma_copy(w_tile, w.ap([[0, P], [1, H]]))
    for i in nl.affine_range((T + P - 1) // P):
        r0, r1 = i * P, min(T, (i + 1) * P)
        p = r1 - r0
        t = nl.load(x[r0:r1, :])
        sq = nl.ndarray((p, H), dtype=nl.float32, buffer=nl.sbuf)
        ss = nl.ndarray((p, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.activation(sq, nl.square, t, reduce_op=nl.add, reduce_res=ss,
                        reduce_cmd=nisa.reduce_cmd.reset_reduce)
        rstd = nl.ndarray((p, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_scalar(rstd, ss, nl.multiply, 1.0 / H, op1=nl.add, operand1=eps)
        nisa.activation(rstd, nl.rsqrt, rstd)
        y = nl.ndarray((p, H), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_scalar(y, t, nl.multiply, rstd)
        res = nl.ndarray((p, H), dtype=x.dtype, buffer=nl.sbuf)
        nisa.tensor_tensor(res, y, w_tile[0:p, :], nl.multiply)
        nl.store(out[r0:r1, :], res)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_rmsnorm(dtype):
    x, w = rand((160, 256), dtype, 7), rand((256,), dtype, 8, 0.5, 1.5)
    out = simulate(rmsnorm_kernel)(x, w, 1e-6)
    xf = f32(x)
    ref = xf / np.sqrt((xf ** 2).mean(1, keepdims=True) + 1e-6) * f32(w)
    np.testing.assert_allclose(f32(out), ref, **TOL[dtype])


@nki.jit
def rms_nl_kernel(x):
    """The nl.* wrapper form: nl.sum over a free axis gives a [P, 1] column."""
    out = nl.ndarray((x.shape[0], 1), dtype=nl.float32, buffer=nl.shared_hbm)
    t = nl.load(x)
    ms = nl.multiply(nl.sum(nl.square(t), axis=1, dtype=nl.float32), 1.0 / x.shape[1])
    nl.store(out, nl.rsqrt(ms))
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_nl_wrappers(dtype):
    x = rand((128, 64), dtype, 9)
    out = simulate(rms_nl_kernel)(x)
    ref = 1 / np.sqrt((f32(x) ** 2).mean(1, keepdims=True))
    np.testing.assert_allclose(out, ref, rtol=1e-5 if dtype is np.float32 else 2e-2)


# --------------------------------------------------------------------------- top-8 and the next 8

@nki.jit
def top16_kernel(scores):
    """scores [T <= 128, E]: the 16 largest values per row and their indices (max8 twice)."""
    T, E = scores.shape
    vals_out = nl.ndarray((T, 16), dtype=nl.float32, buffer=nl.shared_hbm)
    idx_out = nl.ndarray((T, 16), dtype=nl.uint32, buffer=nl.shared_hbm)
    s = nl.load(scores)
    vals = nl.ndarray((T, 16), dtype=nl.float32, buffer=nl.sbuf)
    idx = nl.ndarray((T, 16), dtype=nl.uint32, buffer=nl.sbuf)
    nisa.max8(vals[:, 0:8], s)
    nisa.nc_find_index8(idx[:, 0:8], s, vals[:, 0:8])
    rest = nl.ndarray((T, E), dtype=s.dtype, buffer=nl.sbuf)
    nisa.nc_match_replace8(rest, s, vals[:, 0:8], imm=float("-inf"))
    nisa.max8(vals[:, 8:16], rest)
    nisa.nc_find_index8(idx[:, 8:16], rest, vals[:, 8:16])
    nl.store(vals_out, vals)
    nl.store(idx_out, idx)
    return vals_out, idx_out


@pytest.mark.parametrize("dtype", DTYPES)
def test_top16_with_max8(dtype):
    T, E = 128, 256
    rng = np.random.default_rng(10)
    scores = np.stack([rng.permutation(E) for _ in range(T)]).astype(np.float32) / E   # distinct
    scores = scores.astype(dtype)
    vals, idx = simulate(top16_kernel)(scores)
    ref_idx = np.argsort(-f32(scores), axis=1, kind="stable")[:, :16]
    np.testing.assert_array_equal(idx, ref_idx.astype(np.uint32))
    np.testing.assert_array_equal(vals, np.take_along_axis(f32(scores), ref_idx, 1))


def test_find_index8_duplicates_and_missing():
    @nki.jit
    def k(data, vals):
        out = nl.ndarray((1, 8), dtype=nl.uint32, buffer=nl.shared_hbm)
        idx = nl.ndarray((1, 8), dtype=nl.uint32, buffer=nl.sbuf)
        nisa.nc_find_index8(idx, nl.load(data), nl.load(vals))
        nl.store(out, idx)
        return out
    data = np.array([[5, 1, 5, 2, 5, 3, 0, 0, 9, 9]], np.float32)
    vals = np.array([[5, 5, 9, 7, 5, 3, 2, 1]], np.float32)
    out = simulate(k)(data, vals)
    assert out.tolist() == [[0, 2, 8, 0xFFFFFFFF, 4, 5, 3, 1]]


# --------------------------------------------------------------------------- affine_select causal mask

@nki.jit
def causal_kernel(s, q0, k0):
    """Keep s[q, k] where key k0+k <= query q0+q, else fp32 min (q on partitions)."""
    Q, K = s.shape
    out = nl.ndarray(s.shape, dtype=s.dtype, buffer=nl.shared_hbm)
    t = nl.load(s)
    masked = nl.ndarray((Q, K), dtype=s.dtype, buffer=nl.sbuf)
    nisa.affine_select(masked, pattern=[[-1, K]], channel_multiplier=1, on_true_tile=t,
                       on_false_value=nl.fp32.min, cmp_op=nl.greater_equal, offset=q0 - k0)
    nl.store(out, masked)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_affine_select_causal(dtype):
    s = rand((128, 200), dtype, 11)
    out = simulate(causal_kernel)(s, 128, 64)
    q = 128 + np.arange(128)[:, None]
    k = 64 + np.arange(200)[None, :]
    fill = f32(np.array([nl.fp32.min], np.float32).astype(dtype))[0]
    np.testing.assert_array_equal(f32(out), np.where(k <= q, f32(s), fill))


# --------------------------------------------------------------------------- iota

@nki.jit
def iota_kernel():
    out = nl.ndarray((128, 4, 6), dtype=nl.int32, buffer=nl.shared_hbm)
    t = nl.ndarray((128, 4, 6), dtype=nl.int32, buffer=nl.sbuf)
    nisa.iota(t, pattern=[[10, 4], [1, 6]], offset=3, channel_multiplier=100)
    nl.store(out, t)
    return out


def test_iota():
    out = simulate(iota_kernel)()
    p, a, b = np.meshgrid(np.arange(128), np.arange(4), np.arange(6), indexing="ij")
    np.testing.assert_array_equal(out, 3 + 100 * p + 10 * a + b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_iota_float_dst(dtype):
    @nki.jit
    def k():
        out = nl.ndarray((4, 8), dtype=dtype, buffer=nl.shared_hbm)
        t = nl.ndarray((4, 8), dtype=dtype, buffer=nl.sbuf)
        nisa.iota(t, pattern=[[1, 8]], channel_multiplier=8)
        nl.store(out, t)
        return out
    np.testing.assert_array_equal(f32(simulate(k)()), np.arange(32, dtype=np.float32).reshape(4, 8))


# --------------------------------------------------------------------------- gathers and runtime loops

@nki.jit
def embedding_kernel(table, ids):
    """Row gather: out[t, :] = table[ids[t], :] with an indirect DMA (ids on partitions)."""
    V, H = table.shape
    T = ids.shape[0]
    out = nl.ndarray((T, H), dtype=table.dtype, buffer=nl.shared_hbm)
    idx = nl.ndarray((T, 1), dtype=nl.int32, buffer=nl.sbuf)
    nisa.dma_copy(idx, ids.reshape((T, 1)))
    rows = nl.ndarray((T, H), dtype=table.dtype, buffer=nl.sbuf)
    nisa.dma_copy(rows, table.ap([[H, T], [1, H]], vector_offset=idx, indirect_dim=0))
    nl.store(out, rows)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_embedding_gather(dtype):
    table = rand((1000, 64), dtype, 12)
    ids = np.random.default_rng(13).integers(0, 1000, size=100).astype(np.int32)
    out = simulate(embedding_kernel)(table, ids)
    np.testing.assert_array_equal(f32(out), f32(table)[ids])


def test_fori_loop_with_register_bound():
    @nki.jit
    def k(x, n_rows):
        """Copy the first n_rows (a runtime value) rows of x, one row per iteration."""
        R, C = x.shape
        out = nl.ndarray((R, C), dtype=x.dtype, buffer=nl.shared_hbm)
        nl.store(out, nl.zeros((R, C), dtype=x.dtype))
        n_sb = nl.ndarray((1, 1), dtype=nl.int32, buffer=nl.sbuf)
        nisa.dma_copy(n_sb, n_rows)
        n_reg = nisa.register_alloc()
        nisa.register_load(n_reg, n_sb)

        def body(i):
            row = nl.ndarray((1, C), dtype=x.dtype, buffer=nl.sbuf)
            nisa.dma_copy(row, x.ap([[C, 1], [1, C]], scalar_offset=i))
            nisa.dma_copy(out.ap([[C, 1], [1, C]], scalar_offset=i), row)
        nl.fori_loop(0, n_reg, body)
        return out
    x = rand((6, 5), np.float32, 14)
    out = simulate(k)(x, np.array([[4]], np.int32))
    np.testing.assert_array_equal(out[:4], x[:4])
    np.testing.assert_array_equal(out[4:], 0)


# --------------------------------------------------------------------------- SPMD

@nki.jit
def spmd_add_kernel(a, b):
    """Each of the two programs (LNC=2) handles half of the rows."""
    out = nl.ndarray(a.shape, dtype=a.dtype, buffer=nl.shared_hbm)
    half = a.shape[0] // nl.num_programs()
    r0 = nl.program_id(0) * half
    x = nl.load(a[r0:r0 + half, :])
    y = nl.load(b[r0:r0 + half, :])
    nl.store(out[r0:r0 + half, :], nl.multiply(x, y))
    return out


def test_spmd_two_programs():
    a, b = rand((256, 64), np.float32, 15), rand((256, 64), np.float32, 16)
    out, rep = simulate(spmd_add_kernel[2], report=True)(a, b)
    np.testing.assert_allclose(out, a * b, rtol=1e-6)
    assert rep.num_programs == 2
    assert rep.engines["VectorE"].instructions == 2


def test_jit_call_runs_simulator_and_keeps_report():
    a, b = rand((128, 32), np.float32, 17), rand((128, 32), np.float32, 18)
    out = add_kernel(a, b)
    np.testing.assert_allclose(out, a + b)
    assert add_kernel.last_report.engines["DMA"].instructions == 3


def test_nl_matmul_and_transpose_wrappers():
    @nki.jit
    def k(aT, b):
        out = nl.ndarray((aT.shape[1], b.shape[1]), dtype=nl.float32, buffer=nl.shared_hbm)
        res = nl.matmul(nl.load(aT), nl.load(b), transpose_x=True)     # PSUM fp32
        nl.store(out, nl.copy(res))
        return out
    aT, b = rand((64, 32), np.float32, 19), rand((64, 48), np.float32, 20)
    np.testing.assert_allclose(simulate(k)(aT, b), aT.T @ b, rtol=1e-5, atol=1e-5)


def test_fp32_storage_switch_keeps_precision():
    a = np.array([[1.0, 2.0 ** -9]], np.float32).astype(BF16)
    b = np.array([[2.0 ** -9, 1.0]], np.float32).astype(BF16)
    precise = simulate(add_kernel)(a, b)
    wide = simulate(add_kernel, fp32_storage=True)(a, b)
    assert precise.dtype == BF16 and f32(precise)[0, 0] == 1.0      # 1 + 2^-9 rounds to 1 in bf16
    assert wide.dtype == np.float32 and wide[0, 0] == 1.0 + 2.0 ** -9
