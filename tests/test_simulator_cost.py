"""Cost model on cases with known answers, and the report object."""
import json

import ml_dtypes
import numpy as np
import pytest

from mimo_kernels.backend import nki, nl, nisa, simulate
from mimo_kernels.simulator import TRN2

BF16 = ml_dtypes.bfloat16
FP8 = ml_dtypes.float8_e4m3


def report_of(body, *arrays, **options):
    _, rep = simulate(nki.jit(body), report=True, **options)(*arrays)
    return rep


def _one_matmul(dtype, k=128, m=128, n=512, **kw):
    def body():
        s = nl.zeros((k, m), dtype=dtype)
        mv = nl.zeros((k, n), dtype=dtype)
        d = nl.ndarray((m, n), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(d, s, mv, **kw)
    return report_of(body)


def test_bf16_matmul_128x128x512_costs_512_columns():
    rep = _one_matmul(nl.bfloat16)
    te = rep.engines["TensorE"]
    assert rep.tensor_columns == 512 and te.cycles == 512 and te.instructions == 1
    assert te.time_s == pytest.approx(512 / 2.4e9)
    assert rep.matmul_flops == 2 * 128 * 128 * 512
    assert rep.roofline_compute_s == pytest.approx(2 * 128 * 128 * 512 / 79e12)


def test_fp32_matmul_is_four_times_slower():
    assert _one_matmul(nl.float32).engines["TensorE"].cycles == 4 * 512


def test_small_moving_matmul_pays_the_minimum_interval():
    assert _one_matmul(nl.bfloat16, n=16).engines["TensorE"].cycles == 64
    assert _one_matmul(nl.bfloat16, m=32, n=16).engines["TensorE"].cycles == 32


def test_fp8_double_row_doubles_flops_per_cycle():
    def body():
        s = nl.zeros((128, 2, 128), dtype=nl.float8_e4m3)
        mv = nl.zeros((128, 2, 512), dtype=nl.float8_e4m3)
        d = nl.ndarray((128, 512), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(d, s, mv, perf_mode=nisa.matmul_perf_mode.double_row)
    rep = report_of(body)
    assert rep.engines["TensorE"].cycles == 512
    assert rep.matmul_flops == 2 * 256 * 128 * 512
    assert rep.roofline_compute_s == pytest.approx(rep.matmul_flops / 158e12)


def test_double_row_matmul_numerics():
    def body(a, b):
        out = nl.ndarray((8, 16), dtype=nl.float32, buffer=nl.shared_hbm)
        d = nl.ndarray((8, 16), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(d, nl.load(a), nl.load(b), perf_mode=nisa.matmul_perf_mode.double_row)
        nl.store(out, nl.copy(d))
        return out
    rng = np.random.default_rng(0)
    a = rng.uniform(-2, 2, (128, 2, 8)).astype(FP8)
    b = rng.uniform(-2, 2, (128, 2, 16)).astype(FP8)
    out = simulate(nki.jit(body))(a, b)
    ref = a.astype(np.float32).reshape(256, 8).T @ b.astype(np.float32).reshape(256, 16)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-4)


def test_vector_instruction_cost():
    def body():
        a = nl.zeros((128, 512), dtype=nl.float32)
        d = nl.ndarray((128, 512), dtype=nl.float32)
        nisa.tensor_tensor(d, a, a, nl.add)
    ve = report_of(body).engines["VectorE"]
    assert ve.instructions == 2                          # memset + tensor_tensor
    assert ve.cycles == 2 * (64 + 512)
    assert ve.time_s == pytest.approx(2 * 576 / 0.96e9)
    assert ve.by_op == {"memset": 1, "tensor_tensor": 1}


def test_gpsimd_and_scalar_costs():
    def body():
        t = nl.ndarray((128, 100), dtype=nl.float32)
        nisa.iota(t, pattern=[[1, 100]])
        d = nl.ndarray((128, 100), dtype=nl.float32)
        nisa.activation(d, nl.exp, t)
    rep = report_of(body)
    assert rep.engines["GpSimd"].cycles == 150 + 100
    assert rep.engines["ScalarE"].cycles == 64 + 100
    assert rep.engines["ScalarE"].time_s == pytest.approx(164 / 1.2e9)


def test_hbm_bound_copy_costs_bytes_over_bandwidth():
    """Copy N bytes HBM -> SBUF -> HBM: 2N bytes of HBM traffic at 2.9 TB/s / 8 per core."""
    rows, cols = 128 * 64, 2048

    def body(a):
        out = nl.ndarray(a.shape, dtype=a.dtype, buffer=nl.shared_hbm)
        for i in range(rows // 128):
            nl.store(out[i * 128:(i + 1) * 128, :], nl.load(a[i * 128:(i + 1) * 128, :]))
        return out
    a = np.zeros((rows, cols), np.float32)
    n_bytes = a.nbytes
    rep = report_of(body, a)
    assert rep.hbm_bytes == 2 * n_bytes
    bandwidth = 2.9e12 / 8
    assert rep.roofline_time_s == pytest.approx(2 * n_bytes / bandwidth)
    assert rep.busiest_engine == "DMA"
    assert rep.estimated_time_s == pytest.approx(2 * n_bytes / bandwidth, rel=0.05)
    assert rep.roofline_bound == "memory"


def test_engines_overlap_estimate_is_busiest_plus_dma_latency():
    def body(a):
        out = nl.ndarray(a.shape, dtype=a.dtype, buffer=nl.shared_hbm)
        t = nl.load(a)
        nl.store(out, nl.exp(t))
        return out
    rep = report_of(body, np.zeros((128, 512), np.float32))
    times = {k: v.time_s for k, v in rep.engines.items()}
    assert rep.estimated_time_s == pytest.approx(max(times.values()) + TRN2.dma_fixed_s)
    assert rep.serial_time_s == pytest.approx(sum(times.values()) + TRN2.dma_fixed_s)
    assert rep.serial_time_s >= rep.estimated_time_s


def test_lnc2_halves_the_estimate_of_split_work():
    def body(a):
        out = nl.ndarray(a.shape, dtype=a.dtype, buffer=nl.shared_hbm)
        n = nl.num_programs()
        rows = a.shape[0] // n
        for i in range(rows // 128):
            r0 = nl.program_id(0) * rows + i * 128
            nl.store(out[r0:r0 + 128, :], nl.exp(nl.load(a[r0:r0 + 128, :])))
        return out
    a = np.zeros((2048, 1024), np.float32)
    one = simulate(nki.jit(body), report=True)(a)[1]
    two = simulate(nki.jit(body)[2], report=True)(a)[1]
    assert one.hbm_bytes == two.hbm_bytes
    assert two.estimated_time_s == pytest.approx((one.estimated_time_s - 2e-6) / 2 + 2e-6, rel=1e-6)
    assert two.roofline_time_s == pytest.approx(one.roofline_time_s / 2)


def test_report_table_and_json():
    rep = _one_matmul(nl.bfloat16)
    text = str(rep)
    for word in ("TensorE", "VectorE", "ScalarE", "GpSimd", "DMA", "estimated time", "roofline",
                 "SBUF peak", "PSUM peak", "not measurements"):
        assert word in text
    d = json.loads(rep.to_json())
    assert d["engines"]["TensorE"]["cycles"] == 512
    assert d["psum_peak_banks"] == 1
    assert d["sbuf_peak_bytes_per_partition"] == 128 * 2 + 512 * 2
    assert d["model"]["tensor_hz"] == 2.4e9


def test_custom_model_changes_the_estimate():
    from mimo_kernels.simulator import Trn2Model

    def body():
        s = nl.zeros((128, 128), dtype=nl.bfloat16)
        d = nl.ndarray((128, 128), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(d, s, s)
    fast = simulate(nki.jit(body), report=True, model=Trn2Model(tensor_hz=4.8e9))()[1]
    assert fast.engines["TensorE"].time_s == pytest.approx(128 / 4.8e9)


def test_dma_transposes_run_below_the_dma_rate():
    """SBUF -> SBUF DMA transposes at 50% of the DMA rate, HBM -> SBUF at 90% (trn2 guide)."""
    def on_chip():
        src = nl.zeros((128, 128), dtype=nl.bfloat16)
        dst = nl.ndarray((128, 128), dtype=nl.bfloat16, buffer=nl.sbuf)
        nisa.dma_transpose(dst=dst, src=src)

    def from_hbm(a):
        dst = nl.ndarray((128, 128), dtype=nl.bfloat16, buffer=nl.sbuf)
        nisa.dma_transpose(dst=dst, src=a)

    fixed = TRN2.dma_fixed_s / TRN2.dma_queues
    nbytes = 128 * 128 * 2
    rate = TRN2.hbm_bytes_per_s_core
    assert report_of(on_chip).engines["DMA"].time_s == pytest.approx(nbytes / (0.5 * rate) + fixed)
    hbm = report_of(from_hbm, np.zeros((128, 128), BF16))
    assert hbm.engines["DMA"].time_s == pytest.approx(nbytes / (0.9 * rate) + fixed)
