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


def _row_tiled_pair(tile_rows, positions):
    """Matmuls with K = tile_rows (moving N = 512) at the given PE tile positions (None: untiled):
    the report and the time after the operands' memsets."""
    def body():
        n = len(positions)
        stationary = nl.zeros((tile_rows, n, 128), dtype=nl.bfloat16)     # both ready at once
        moving = nl.zeros((tile_rows, n, 512), dtype=nl.bfloat16)
        for i, pos in enumerate(positions):
            d = nl.ndarray((128, 512), dtype=nl.float32, buffer=nl.psum)
            kw = {} if pos is None else dict(tile_position=pos, tile_size=(tile_rows, 128))
            nisa.nc_matmul(d, stationary[:, i, :], moving[:, i, :], **kw)
    rep = report_of(body)
    return rep, rep.estimated_time_s - rep.engines["VectorE"].time_s     # after the operands' memsets


def test_row_tiled_matmuls_on_disjoint_rows_run_side_by_side():
    """nc_matmul tiling mode: two 64-row tiles of the PE array run in parallel, so two K = 64
    matmuls take the time of one; untiled (or on the same rows) they run one after the other."""
    one = 512 / 2.4e9
    apart, matmuls = _row_tiled_pair(64, [(0, 0), (64, 0)])
    assert matmuls == pytest.approx(one)
    assert apart.engines["TensorE"].time_s == pytest.approx(one)       # two halves of the array busy
    assert apart.engines["TensorE"].cycles == 2 * 512
    assert _row_tiled_pair(32, [(0, 0), (96, 0)])[1] == pytest.approx(one)
    for positions in ([(0, 0), (0, 0)], [None, None], [(0, 0), None], [(64, 0), None]):
        assert _row_tiled_pair(64, positions)[1] == pytest.approx(2 * one), positions


def test_row_tiled_matmul_numerics_equal_untiled():
    def body(a, b):
        out = nl.ndarray((2, 32, 16), dtype=nl.float32, buffer=nl.shared_hbm)
        for i in range(2):
            d = nl.ndarray((32, 16), dtype=nl.float32, buffer=nl.psum)
            nisa.nc_matmul(d, nl.load(a[i]), nl.load(b[i]), tile_position=(32 * i, 96), tile_size=(32, 32))
            nl.store(out[i], nl.copy(d))
        return out
    rng = np.random.default_rng(1)
    a = rng.uniform(-2, 2, (2, 32, 32)).astype(BF16)
    b = rng.uniform(-2, 2, (2, 32, 16)).astype(BF16)
    out = simulate(nki.jit(body))(a, b)
    ref = np.einsum("ikm,ikn->imn", a.astype(np.float32), b.astype(np.float32))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-4)


def test_vector_instruction_cost():
    """memset N cycles; tensor_tensor two inputs 2N (fp32: no fast mode) plus the static overhead
    of 100 cycles because it reads what the previous VectorE instruction wrote."""
    def body():
        a = nl.zeros((128, 512), dtype=nl.float32)
        d = nl.ndarray((128, 512), dtype=nl.float32)
        nisa.tensor_tensor(d, a, a, nl.add)
    ve = report_of(body).engines["VectorE"]
    assert ve.instructions == 2                          # memset + tensor_tensor
    assert ve.cycles == 512 + (2 * 512 + 100)
    assert ve.time_s == pytest.approx(ve.cycles / 0.96e9)
    assert ve.by_op == {"memset": 1, "tensor_tensor": 1}


def test_vector_fast_mode_only_where_its_conditions_hold():
    def body(dtype, psum_src):
        src = nl.ndarray((128, 512), dtype=nl.float32 if psum_src else dtype,
                         buffer=nl.psum if psum_src else nl.sbuf)
        nisa.memset(src, 1.0, engine=nisa.engine.gpsimd) if not psum_src else \
            nisa.memset(src, 1.0)
        d = nl.ndarray((128, 512), dtype=dtype)
        nisa.tensor_copy(d, src)
        r = nl.ndarray((128, 512), dtype=nl.float32)
        nisa.reciprocal(r, d)
    def cycles(dtype, psum_src=False):
        rep = report_of(lambda: body(dtype, psum_src))
        return rep.engines["VectorE"]
    bf16 = cycles(nl.bfloat16)
    assert bf16.by_op["tensor_copy"] == 1
    # bf16 SBUF -> SBUF contiguous: 4x (512 / 4 = 128 cycles); reciprocal 8N (+100: dependent).
    assert bf16.cycles == 128 + (8 * 512 + 100)
    fp32 = cycles(nl.float32)
    assert fp32.cycles == 512 + (8 * 512 + 100)


def test_gpsimd_and_scalar_costs():
    def body():
        t = nl.ndarray((128, 100), dtype=nl.float32)
        nisa.iota(t, pattern=[[1, 100]])
        d = nl.ndarray((128, 100), dtype=nl.float32)
        nisa.activation(d, nl.exp, t)
    rep = report_of(body)
    assert rep.engines["GpSimd"].cycles == 150 + 100
    assert rep.engines["ScalarE"].cycles == 100            # max(MIN_II, N)
    assert rep.engines["ScalarE"].time_s == pytest.approx(100 / 1.2e9)


def _transfer_s(nbytes, partitions, run_bytes, rate=1.0):
    engines = min(16, -(-partitions // 8))
    bandwidth = engines * 23e9 * TRN2.dma_achieved_fraction * run_bytes / (run_bytes + 256) * rate
    return 1.3e-6 + nbytes / bandwidth


def test_hbm_bound_copy_is_a_chain_of_transfers():
    """Each 128-row tile loads (16 DMA engines, 8 KiB runs) and stores after its load."""
    rows, cols = 128 * 16, 2048

    def body(a):
        out = nl.ndarray(a.shape, dtype=a.dtype, buffer=nl.shared_hbm)
        for i in range(rows // 128):
            nl.store(out[i * 128:(i + 1) * 128, :], nl.load(a[i * 128:(i + 1) * 128, :]))
        return out
    a = np.zeros((rows, cols), np.float32)
    rep = report_of(body, a)
    assert rep.hbm_bytes == 2 * a.nbytes
    assert rep.roofline_time_s == pytest.approx(2 * a.nbytes / (2.9e12 / 8))
    assert rep.busiest_engine == "DMA"
    per_tile = _transfer_s(128 * cols * 4, 128, cols * 4)
    assert rep.estimated_time_s == pytest.approx(2 * (rows // 128) * per_tile, rel=1e-6)
    assert rep.roofline_bound == "memory"


def test_dma_uses_one_engine_per_8_partitions_and_penalises_short_runs():
    def rows8(a):
        t = nl.ndarray((8, 4096), dtype=nl.float32)
        nisa.dma_copy(t, a)

    def strided(a):                                   # 64-byte runs per partition
        t = nl.ndarray((128, 4, 16), dtype=nl.float32)
        nisa.dma_copy(t, a.reshape((128, 64, 16))[:, 0:64:16, :])
    narrow = report_of(rows8, np.zeros((8, 4096), np.float32))
    assert narrow.estimated_time_s == pytest.approx(_transfer_s(8 * 4096 * 4, 8, 4096 * 4))
    short = report_of(strided, np.zeros((128, 1024), np.float32))
    assert short.estimated_time_s == pytest.approx(_transfer_s(128 * 64 * 4, 128, 64))


def test_indirect_dma_charges_descriptors_to_gpsimd():
    def body(table, idx):
        i = nl.load(idx)
        t = nl.ndarray((128, 64), dtype=nl.float32)
        nisa.dma_copy(t, table.ap(pattern=[[64, 128], [1, 64]], vector_offset=i, indirect_dim=0))
    rep = report_of(body, np.zeros((512, 64), np.float32), np.arange(128, dtype=np.int32)[:, None])
    assert rep.engines["GpSimd"].cycles == 150 + 128   # one descriptor per gathered row
    assert rep.engines["DMA"].instructions == 2


def test_estimate_includes_dependency_stalls_between_overlap_and_serial():
    def body(a):
        out = nl.ndarray(a.shape, dtype=a.dtype, buffer=nl.shared_hbm)
        t = nl.load(a)
        nl.store(out, nl.exp(t))
        return out
    rep = report_of(body, np.zeros((128, 512), np.float32))
    times = {k: v.time_s for k, v in rep.engines.items()}
    assert rep.overlapped_time_s == pytest.approx(max(times.values()))
    assert rep.serial_time_s == pytest.approx(sum(times.values()))
    # load -> exp -> store depend on each other: nothing overlaps.
    assert rep.estimated_time_s == pytest.approx(rep.serial_time_s)
    assert rep.overlapped_time_s < rep.estimated_time_s


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
    assert two.estimated_time_s == pytest.approx(one.estimated_time_s / 2, rel=0.05)
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
    """SBUF -> SBUF DMA transposes at up to 50% of the DMA rate, HBM -> SBUF up to 90% (trn2
    guide), pro-rated when the output is not whole [128, 16] blocks."""
    def on_chip():
        src = nl.zeros((128, 128), dtype=nl.bfloat16)
        dst = nl.ndarray((128, 128), dtype=nl.bfloat16, buffer=nl.sbuf)
        nisa.dma_transpose(dst=dst, src=src)

    def from_hbm(a):
        dst = nl.ndarray(a.shape[::-1], dtype=nl.bfloat16, buffer=nl.sbuf)
        nisa.dma_transpose(dst=dst, src=a)

    nbytes = 128 * 128 * 2
    assert report_of(on_chip).engines["DMA"].time_s == pytest.approx(_transfer_s(nbytes, 128, 256, 0.5))
    hbm = report_of(from_hbm, np.zeros((128, 128), BF16))
    assert hbm.engines["DMA"].time_s == pytest.approx(_transfer_s(nbytes, 128, 256, 0.9))
    odd = report_of(from_hbm, np.zeros((120, 96), BF16))     # dst [96, 120]: 0.75 x 120/128
    assert odd.estimated_time_s == pytest.approx(
        _transfer_s(96 * 120 * 2, 96, 240, 0.9 * 0.75 * 120 / 128))
