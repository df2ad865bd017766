"""Numerics: storage dtypes, one rounding per instruction, fp32 engines, int casts."""
import ml_dtypes
import numpy as np
import pytest

from mimo_kernels.backend import nki, nl, nisa, simulate

BF16 = ml_dtypes.bfloat16


def run(body, *arrays, **options):
    return simulate(nki.jit(body), **options)(*arrays)


def test_float8_e4m3_is_trainium_e4m3_with_max_240():
    assert nl.float8_e4m3 == np.dtype(ml_dtypes.float8_e4m3)
    assert float(ml_dtypes.finfo(nl.float8_e4m3).max) == 240.0
    assert float(ml_dtypes.finfo(nl.float8_e4m3fn).max) == 448.0     # the OCP variant differs


def test_dtypes_compare_equal_to_names():
    assert nl.bfloat16 == "bfloat16" and nl.float32 == "float32" and nl.int32 == np.int32


def _copy_kernel(dst_dtype):
    def k(a):
        out = nl.ndarray(a.shape, dtype=dst_dtype, buffer=nl.shared_hbm)
        t = nl.load(a)
        d = nl.ndarray(a.shape, dtype=dst_dtype)
        nisa.tensor_copy(d, t)
        nl.store(out, d)
        return out
    return k


def test_float_to_int_rounds_half_even_and_saturates():
    a = np.array([[0.5, 1.5, 2.5, -0.5, -1.5, 3e9, -3e9, 300.7]], np.float32)
    np.testing.assert_array_equal(run(_copy_kernel(nl.int32), a),
                                  [[0, 2, 2, 0, -2, 2147483647, -2147483648, 301]])
    np.testing.assert_array_equal(run(_copy_kernel(nl.int8), a), [[0, 2, 2, 0, -2, 127, -128, 127]])
    np.testing.assert_array_equal(run(_copy_kernel(nl.uint8), a), [[0, 2, 2, 0, 0, 255, 0, 255]])


def test_float_to_bf16_and_fp8_round_to_nearest_even():
    a = np.array([[1 + 2 ** -8, 1 + 3 * 2 ** -8, 250.0, 232.0]], np.float32)
    out = run(_copy_kernel(nl.bfloat16), a)
    np.testing.assert_array_equal(out.astype(np.float32)[0, :2], [1.0, 1 + 2 ** -6])
    fp8 = run(_copy_kernel(nl.float8_e4m3), a).astype(np.float32)
    assert fp8[0, 3] == 224.0 or fp8[0, 3] == 240.0          # tie at 232 -> even mantissa (224)
    assert fp8[0, 3] == 224.0


def test_activation_rounds_once_into_bf16():
    def k(a):
        out = nl.ndarray(a.shape, dtype=nl.bfloat16, buffer=nl.shared_hbm)
        t = nl.load(a)
        d = nl.ndarray(a.shape, dtype=nl.bfloat16)
        nisa.activation(d, nl.exp, t, scale=0.37, bias=0.11)
        nl.store(out, d)
        return out
    a = np.random.default_rng(0).uniform(-3, 3, (128, 256)).astype(BF16)
    ref = np.exp(a.astype(np.float32) * np.float32(0.37) + np.float32(0.11)).astype(BF16)
    out = run(k, a)
    assert np.mean(out.astype(np.float32) == ref.astype(np.float32)) > 0.999


def test_matmul_accumulates_in_fp32_and_rounds_at_eviction():
    def k(aT, b):
        out = nl.ndarray((128, 256), dtype=nl.bfloat16, buffer=nl.shared_hbm)
        acc = nl.ndarray((128, 256), dtype=nl.float32, buffer=nl.psum)
        for kk in range(4):
            nisa.nc_matmul(acc, nl.load(aT[kk * 128:(kk + 1) * 128, :]), nl.load(b[kk * 128:(kk + 1) * 128, :]))
        res = nl.ndarray((128, 256), dtype=nl.bfloat16)
        nisa.tensor_copy(res, acc)
        nl.store(out, res)
        return out
    rng = np.random.default_rng(1)
    aT = rng.standard_normal((512, 128)).astype(BF16)
    b = rng.standard_normal((512, 256)).astype(BF16)
    ref = (aT.astype(np.float64).T @ b.astype(np.float64)).astype(np.float32).astype(BF16)
    out = run(k, aT, b)
    # fp32 accumulation differs from float64 by far less than a bf16 ulp: nearly all equal.
    assert np.mean(out.astype(np.float32) == ref.astype(np.float32)) > 0.99


def test_fp32_storage_from_environment(monkeypatch):
    monkeypatch.setenv("NKI_SIM_FP32_STORAGE", "1")

    def k(a):
        out = nl.ndarray(a.shape, dtype=nl.bfloat16, buffer=nl.shared_hbm)
        nl.store(out, nl.multiply(nl.load(a), 1.0 / 3.0, dtype=nl.bfloat16))
        return out
    a = np.ones((2, 2), np.float32).astype(BF16)
    out = run(k, a)
    assert out.dtype == np.float32
    assert out[0, 0] == np.float32(np.float32(1.0) * np.float32(1.0 / 3.0))


def test_precise_fp_zero_also_selects_fp32_storage(monkeypatch):
    monkeypatch.setenv("NKI_PRECISE_FP", "0")
    out = run(_copy_kernel(nl.bfloat16), np.array([[1 + 2 ** -10]], np.float32))
    assert out.dtype == np.float32 and out[0, 0] == 1 + 2 ** -10


def test_int_arithmetic_computes_in_fp32():
    def k(a):
        out = nl.ndarray(a.shape, dtype=nl.int32, buffer=nl.shared_hbm)
        nl.store(out, nl.add(nl.load(a), 1))
        return out
    a = np.array([[16777216, 5]], np.int32)          # 2^24 + 1 is not an fp32 value
    np.testing.assert_array_equal(run(k, a), [[16777216, 6]])


def test_bitvec_ops_use_bit_patterns():
    def k(a):
        out = nl.ndarray(a.shape, dtype=nl.int32, buffer=nl.shared_hbm)
        t = nl.load(a)
        d = nl.ndarray(a.shape, dtype=nl.int32)
        nisa.tensor_scalar(d, t, nl.bitwise_and, 0xFF, op1=nl.left_shift, operand1=4)
        nl.store(out, d)
        return out
    a = np.array([[0x12345678, 0x7FFFFFFF]], np.int32)
    np.testing.assert_array_equal(run(k, a), [[0x780, 0xFF0]])


def test_type_promotion_of_nl_binary_ops():
    def k(a, b):
        out = nl.ndarray(a.shape, dtype=nl.float32, buffer=nl.shared_hbm)
        c = nl.add(nl.load(a), nl.load(b))         # (fp16, bf16) -> fp32
        assert c.dtype == nl.float32
        e = nl.multiply(nl.load(b), 2)               # (bf16, int) -> bf16
        assert e.dtype == nl.bfloat16
        g = nl.greater(nl.load(b), nl.load(b))       # comparisons keep the input dtype (NKI 0.6 stubs)
        assert g.dtype == nl.bfloat16
        nl.store(out, c)
        return out
    a = np.ones((2, 2), np.float16)
    b = np.ones((2, 2), BF16)
    np.testing.assert_array_equal(run(k, a, b), 2 * np.ones((2, 2)))


@pytest.mark.parametrize("fn,ref", [
    (nl.sigmoid, lambda x: 1 / (1 + np.exp(-x))),
    (nl.silu, lambda x: x / (1 + np.exp(-x))),
    (nl.tanh, np.tanh),
    (nl.gelu, lambda x: 0.5 * x * (1 + np.vectorize(__import__("math").erf)(x / np.sqrt(2)))),
    (nl.square, np.square),
    (nl.exp, np.exp),
])
def test_activation_functions_use_exact_math(fn, ref):
    def k(a):
        out = nl.ndarray(a.shape, dtype=nl.float32, buffer=nl.shared_hbm)
        nl.store(out, fn(nl.load(a)))
        return out
    x = np.linspace(-6, 6, 512, dtype=np.float32).reshape(4, 128)
    np.testing.assert_allclose(run(k, x), ref(x.astype(np.float64)), rtol=2e-6, atol=1e-6)


def test_right_shift_is_logical_and_bitvec_results_wrap():
    def k(a):
        out = nl.ndarray(a.shape, dtype=nl.int32, buffer=nl.shared_hbm)
        t = nl.load(a)
        d = nl.ndarray(a.shape, dtype=nl.int32)
        nisa.tensor_scalar(d, t, nl.right_shift, 28)
        nl.store(out, d)
        return out
    a = np.array([[-1, 0x70000000]], np.int32)
    np.testing.assert_array_equal(run(k, a), [[0xF, 0x7]])
