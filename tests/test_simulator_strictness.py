"""One test per strictness rule: a kernel that breaks it raises the documented error."""
import ml_dtypes
import numpy as np
import pytest

from mimo_kernels.backend import nki, nl, nisa, simulate
from mimo_kernels.simulator import errors as E


def run(kernel_body, *arrays, **options):
    """Run ``kernel_body`` (a plain function) as a kernel on the simulator."""
    return simulate(nki.jit(kernel_body), **options)(*arrays)


X = np.ones((128, 64), np.float32)


def raises(exc, *fragments):
    """pytest.raises that also checks the message names instruction / operand / shape / limit."""
    class _Check:
        def __enter__(self):
            self.ctx = pytest.raises(exc)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc_info):
            handled = self.ctx.__exit__(*exc_info)
            message = str(self.info.value)
            for fragment in fragments:
                assert fragment in message, f"{fragment!r} not in {message!r}"
            return handled
    return _Check()


# --------------------------------------------------------------------------- partitions

def test_partition_dim_over_128_on_allocation():
    def k():
        nl.ndarray((256, 64), dtype=nl.float32, buffer=nl.sbuf)
    with raises(E.PartitionLimitError, "partition dimension 256", "maximum 128"):
        run(k)


def test_partition_dim_over_128_on_load():
    def k(a):
        nl.load(a)
    with raises(E.PartitionLimitError, "load", "256", "128"):
        run(k, np.ones((256, 4), np.float32))


def test_partition_mismatch_tensor_tensor():
    def k(a, b):
        x, y = nl.load(a), nl.load(b)
        out = nl.ndarray((128, 64), dtype=nl.float32)
        nisa.tensor_tensor(out, x, y, nl.add)
    with raises(E.PartitionMismatchError, "tensor_tensor", "data1[128, 64]", "data2[64, 64]"):
        run(k, X, np.ones((64, 64), np.float32))


def test_partition_broadcast_needs_broadcast_to():
    def k(a, b):
        nl.add(nl.load(a), nl.load(b))
    with raises(E.PartitionMismatchError, "nl.add", "[1, 64]", "broadcast_to"):
        run(k, X, np.ones((1, 64), np.float32))


def test_partition_broadcast_with_broadcast_to_works():
    def k(a, b):
        out = nl.ndarray(a.shape, dtype=a.dtype, buffer=nl.shared_hbm)
        nl.store(out, nl.add(nl.load(a), nl.broadcast_to(nl.load(b), a.shape)))
        return out
    b = np.arange(64, dtype=np.float32)[None]
    out, rep = simulate(nki.jit(k), report=True)(X, b)
    np.testing.assert_array_equal(out, X + b)
    assert rep.engines["TensorE"].instructions == 1      # the ones-matmul


def test_column_broadcast_is_allowed():
    def k(a, c):
        out = nl.ndarray(a.shape, dtype=a.dtype, buffer=nl.shared_hbm)
        nl.store(out, nl.multiply(nl.load(a), nl.load(c)))
        return out
    c = np.arange(128, dtype=np.float32)[:, None]
    np.testing.assert_array_equal(run(k, X, c), X * c)


# --------------------------------------------------------------------------- matmul limits and buffers

def _matmul(stationary_shape, moving_shape, dst_shape, moving_buffer=nl.sbuf, dst_buffer=nl.psum):
    def k():
        s = nl.zeros(stationary_shape, dtype=nl.bfloat16)
        m = nl.zeros(moving_shape, dtype=nl.bfloat16, buffer=moving_buffer)
        d = nl.ndarray(dst_shape, dtype=nl.float32, buffer=dst_buffer)
        nisa.nc_matmul(d, s, m)
    return k


def test_matmul_stationary_free_over_128():
    with raises(E.TileSizeError, "nc_matmul", "M=256", "128"):
        run(_matmul((128, 256), (128, 512), (128, 512)))


def test_matmul_moving_free_over_512():
    with raises(E.TileSizeError, "nc_matmul", "N=1024", "512"):
        run(_matmul((128, 128), (128, 1024), (128, 1024)))


@pytest.mark.parametrize("position, size, shapes, fragments", [
    ((0, 0), (48, 128), ((32, 128), (32, 64)), ("tile_size (48, 128)", "32, 64 or 128")),
    ((32, 0), (64, 128), ((64, 128), (64, 64)), ("tile_position (32, 0)", "multiples of tile_size")),
    ((0, 64), (128, 128), ((64, 128), (64, 64)), ("tile_position (0, 64)", "inside the 128 x 128")),
    ((0, 0), (64, 128), ((128, 128), (128, 64)), ("stationary [128, 128]", "tile_size (64, 128)")),
    ((0, 0), (128, 64), ((128, 128), (128, 64)), ("stationary [128, 128]", "tile_size (128, 64)")),
])
def test_matmul_pe_tile_limits(position, size, shapes, fragments):
    """nc_matmul tiling mode: tiles of 32 / 64 / 128 PEs, starts at multiples of the size inside
    the array, the stationary no larger than the tile."""
    (sk, sm), (mk, mn) = shapes

    def k():
        s = nl.zeros((sk, sm), dtype=nl.bfloat16)
        m = nl.zeros((mk, mn), dtype=nl.bfloat16)
        d = nl.ndarray((sm, mn), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(d, s, m, tile_position=position, tile_size=size)
    with raises(E.TileSizeError, "nc_matmul", *fragments):
        run(k)


def test_matmul_double_row_without_column_tiling():
    def k():
        s = nl.zeros((64, 2, 64), dtype=nl.float8_e4m3)
        m = nl.zeros((64, 2, 64), dtype=nl.float8_e4m3)
        d = nl.ndarray((64, 64), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(d, s, m, perf_mode=nisa.matmul_perf_mode.double_row, tile_position=(0, 64),
                       tile_size=(64, 64))
    with raises(E.UnsupportedError, "double_row", "column tiling"):
        run(k)


def test_matmul_contraction_mismatch():
    with raises(E.PartitionMismatchError, "nc_matmul", "stationary[128, 128]", "moving[64, 512]"):
        run(_matmul((128, 128), (64, 512), (128, 512)))


def test_matmul_contraction_over_128_double_row_only_for_fp8():
    def k():
        s = nl.zeros((128, 2, 64), dtype=nl.bfloat16)
        m = nl.zeros((128, 2, 64), dtype=nl.bfloat16)
        d = nl.ndarray((64, 64), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(d, s, m, perf_mode=nisa.matmul_perf_mode.double_row)
    with raises(E.DtypeError, "double_row", "fp8"):
        run(k)


def test_matmul_operand_in_psum():
    with raises(E.MemoryRegionError, "'moving'", "nc_matmul", "'sbuf'", "'psum'"):
        run(_matmul((128, 128), (128, 512), (128, 512), moving_buffer=nl.psum))


def test_matmul_result_not_in_psum():
    with raises(E.MemoryRegionError, "'dst'", "nc_matmul", "'psum'", "'sbuf'"):
        run(_matmul((128, 128), (128, 512), (128, 512), dst_buffer=nl.sbuf))


def test_matmul_dst_must_be_fp32():
    def k():
        s = nl.zeros((128, 128), dtype=nl.bfloat16)
        d = nl.ndarray((128, 128), dtype=nl.bfloat16, buffer=nl.psum)
        nisa.nc_matmul(d, s, s)
    with raises(E.DtypeError, "nc_matmul", "float32"):
        run(k)


def test_matmul_fp32_paired_with_bf16():
    def k():
        s = nl.zeros((128, 128), dtype=nl.float32)
        m = nl.zeros((128, 128), dtype=nl.bfloat16)
        d = nl.ndarray((128, 128), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(d, s, m)
    with raises(E.DtypeError, "fp32 operands must be paired"):
        run(k)


def test_matmul_accumulate_true_on_memset_psum():
    def k():
        s = nl.zeros((128, 128), dtype=nl.bfloat16)
        d = nl.zeros((128, 128), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(d, s, s, accumulate=True)
    with raises(E.AccumulationError, "accumulate=True", "not written by a matmul"):
        run(k)


def test_matmul_reused_psum_after_read_is_ambiguous():
    def k():
        s = nl.zeros((128, 128), dtype=nl.bfloat16)
        d = nl.ndarray((128, 128), dtype=nl.float32, buffer=nl.psum)
        o = nl.ndarray((128, 128), dtype=nl.float32)
        nisa.nc_matmul(d, s, s)
        nisa.tensor_copy(o, d)
        nisa.nc_matmul(d, s, s)                 # new group without accumulate=False
    with raises(E.AccumulationError, "ambiguous", "accumulate=False"):
        run(k)


def test_matmul_explicit_new_group_is_fine():
    def k(a):
        out = nl.ndarray((128, 128), dtype=nl.float32, buffer=nl.shared_hbm)
        s = nl.load(a)
        d = nl.ndarray((128, 128), dtype=nl.float32, buffer=nl.psum)
        o = nl.ndarray((128, 128), dtype=nl.float32)
        nisa.nc_matmul(d, s, s)
        nisa.tensor_copy(o, d)
        nisa.nc_matmul(d, s, s, accumulate=False)
        nisa.nc_matmul(d, s, s)                 # accumulates onto the new group
        nisa.tensor_copy(o, d)
        nl.store(out, o)
        return out
    a = np.eye(128, dtype=np.float32).astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(run(k, a), 2 * np.eye(128))


# --------------------------------------------------------------------------- PSUM banks and capacity

def test_matmul_output_crossing_a_psum_bank():
    def k():
        s = nl.zeros((128, 128), dtype=nl.bfloat16)
        m = nl.zeros((128, 512), dtype=nl.bfloat16)
        d = nl.ndarray((128, 1024), dtype=nl.float32, buffer=nl.psum)     # two banks
        nisa.nc_matmul(d[:, 256:768], s, m)
    with raises(E.TileSizeError, "nc_matmul", "bank", "2 KiB"):
        run(k)


def test_psum_over_eight_banks():
    def k():
        tiles = [nl.ndarray((128, 512), dtype=nl.float32, buffer=nl.psum) for _ in range(9)]
        return tiles
    with raises(E.CapacityError, "PSUM", "8 banks"):
        run(k)


def test_psum_tensor_over_16_kib():
    def k():
        nl.ndarray((128, 8192), dtype=nl.float32, buffer=nl.psum)
    with raises(E.PartitionLimitError, "16 KiB"):
        run(k)


def test_sbuf_capacity_exceeded():
    def k():
        a = nl.ndarray((128, 32 * 1024), dtype=nl.float32)      # 128 KiB per partition
        b = nl.ndarray((128, 32 * 1024), dtype=nl.float32)      # + 128 KiB > 224 KiB
        return a, b
    with raises(E.CapacityError, "SBUF", "229,376"):
        run(k)


def test_sbuf_tiles_freed_when_unreferenced():
    def k(a):
        out = nl.ndarray(a.shape, dtype=a.dtype, buffer=nl.shared_hbm)
        for _ in range(4):
            big = nl.ndarray((128, 32 * 1024), dtype=nl.float32)  # 128 KiB, freed after use
            nisa.memset(big, 0.0)
            del big
        nl.store(out, nl.load(a))
        return out
    _, rep = simulate(nki.jit(k), report=True)(X)
    assert rep.sbuf_peak_bytes_per_partition == 128 * 1024


# --------------------------------------------------------------------------- buffers of compute engines

def test_compute_engine_reading_hbm():
    def k(a):
        out = nl.ndarray((128, 64), dtype=nl.float32)
        nisa.tensor_copy(out, a)
    with raises(E.MemoryRegionError, "'src'", "tensor_copy", "psum|sbuf", "'hbm'"):
        run(k, X)


def test_nl_math_on_hbm():
    def k(a):
        nl.exp(a)
    with raises(E.MemoryRegionError, "exp", "'hbm'"):
        run(k, X)


def test_gpsimd_cannot_read_psum():
    def k():
        t = nl.zeros((128, 64), dtype=nl.float32, buffer=nl.psum)
        nl.rsqrt(t)
    with raises(E.MemoryRegionError, "GpSimd", "psum"):
        run(k)


def test_iota_dst_must_be_sbuf():
    def k():
        t = nl.ndarray((128, 8), dtype=nl.float32, buffer=nl.psum)
        nisa.iota(t, pattern=[[1, 8]])
    with raises(E.MemoryRegionError, "iota", "'sbuf'"):
        run(k)


def test_vector_engine_both_inputs_in_psum():
    def k():
        a = nl.zeros((128, 64), dtype=nl.float32, buffer=nl.psum)
        b = nl.zeros((128, 64), dtype=nl.float32, buffer=nl.psum)
        d = nl.ndarray((128, 64), dtype=nl.float32)
        nisa.tensor_tensor(d, a, b, nl.add)
    with raises(E.MemoryRegionError, "both be in PSUM"):
        run(k)


# --------------------------------------------------------------------------- reductions

def test_reduction_over_partition_axis():
    def k(a):
        t = nl.load(a)
        d = nl.ndarray((1, 64), dtype=nl.float32)
        nisa.tensor_reduce(d, nl.add, t, axis=0)
    with raises(E.ReductionAxisError, "tensor_reduce", "partition axis 0"):
        run(k, X)


def test_nl_sum_over_partition_axis():
    def k(a):
        nl.sum(nl.load(a), axis=0)
    with raises(E.ReductionAxisError, "partition axis"):
        run(k, X)


def test_reduction_must_use_trailing_axes():
    def k(a):
        t = nl.load(a.reshape((128, 8, 8)))
        d = nl.ndarray((128, 8), dtype=nl.float32)
        nisa.tensor_reduce(d, nl.add, t, axis=1)
    with raises(E.ReductionAxisError, "last contiguous free axes"):
        run(k, X)


# --------------------------------------------------------------------------- indexing

def test_out_of_bounds_slice():
    def k(a):
        nl.load(a[0:128, 60:70])
    with raises(E.OutOfBoundsError, "dimension 1", "[60, 69]", "64"):
        run(k, X)


def test_out_of_bounds_int_index():
    def k(a):
        nl.load(a[128])
    with raises(E.OutOfBoundsError, "dimension 0", "128"):
        run(k, X)


def test_indirect_dma_out_of_bounds_and_skip():
    def k(table, ids, mode):
        out = nl.ndarray((4, 8), dtype=table.dtype, buffer=nl.shared_hbm)
        idx = nl.ndarray((4, 1), dtype=nl.int32)
        nisa.dma_copy(idx, ids)
        rows = nl.zeros((4, 8), dtype=table.dtype)
        nisa.dma_copy(rows, table.ap([[8, 4], [1, 8]], vector_offset=idx), oob_mode=mode)
        nl.store(out, rows)
        return out
    table = np.arange(80, dtype=np.float32).reshape(10, 8)
    ids = np.array([[1], [9], [10], [0]], np.int32)
    with raises(E.OutOfBoundsError, "dma_copy", "oob_mode"):
        run(k, table, ids, nisa.oob_mode.error)
    out = run(k, table, ids, nisa.oob_mode.skip)
    np.testing.assert_array_equal(out, np.stack([table[1], table[9], np.zeros(8), table[0]]))


def test_strided_partition_slice_of_sbuf():
    def k(a):
        t = nl.load(a)
        nl.exp(t[0:128:2, :])
    with raises(E.UnsupportedError, "partition"):
        run(k, X)


def test_step_slices_and_int_indices_on_every_dim():
    def k(a):
        out = nl.ndarray((4, 3), dtype=a.dtype, buffer=nl.shared_hbm)
        t = nl.load(a[2:6, 1, 0:9:3])           # HBM [8, 4, 9]: int drops dim 1 -> [4, 3]
        assert tuple(t.shape) == (4, 3)
        s = nl.load(a[0:4])                      # [4, 4, 9] tile
        assert tuple(s[:, 0].shape) == (4, 9) and tuple(s[0, 0, 3].shape) == (1, 1)
        assert tuple(s[:, 0, 3].shape) == (4, 1)
        nl.store(out, t)
        return out
    a = np.arange(8 * 4 * 9, dtype=np.float32).reshape(8, 4, 9)
    np.testing.assert_array_equal(run(k, a), a[2:6, 1, 0:9:3])


def test_dma_shape_transposition_is_rejected():
    def k(a):
        t = nl.ndarray((64, 128), dtype=nl.float32)
        nisa.dma_copy(t, a)
    with raises(E.ShapeMismatchError, "dma_copy", "[64, 128]", "[128, 64]"):
        run(k, X)


# --------------------------------------------------------------------------- kernel interface

def test_output_must_be_shared_hbm():
    def k(a):
        out = nl.ndarray(a.shape, dtype=a.dtype, buffer=nl.hbm)
        nl.store(out, nl.load(a))
        return out
    with raises(E.OutputBufferError, "shared_hbm", "in hbm"):
        run(k, X)


def test_output_sbuf_tile_rejected():
    def k(a):
        return nl.load(a)
    with raises(E.OutputBufferError, "shared_hbm", "sbuf"):
        run(k, X)


def test_output_not_fully_written():
    def k(a):
        out = nl.ndarray(a.shape, dtype=a.dtype, buffer=nl.shared_hbm)
        nl.store(out[0:64, :], nl.load(a[0:64, :]))
        return out
    with raises(E.OutputNotWrittenError, "4096 of 8192", "[64, 0]"):
        run(k, X)


def test_unknown_keyword_argument():
    def k(a):
        t = nl.load(a)
        nisa.tensor_copy(t, t, dtype=nl.float32)
    with pytest.raises(TypeError, match="unexpected keyword argument 'dtype'"):
        run(k, X)


def test_jit_rejects_platform_target_and_unknown_options():
    with pytest.raises(E.UnsupportedError, match="platform_target"):
        nki.jit(lambda a: a, platform_target="trn2")
    with pytest.raises(TypeError, match="unexpected keyword"):
        nki.jit(lambda a: a, fast=True)


def test_grid_must_be_lnc_1_or_2():
    with raises(E.UnsupportedError, "kernel[4]", "1 or 2"):
        nki.jit(lambda a: a)[4]


def test_api_outside_kernel():
    with raises(E.NkiContextError, "outside a running kernel"):
        nl.ndarray((128, 4), dtype=nl.float32)


def test_float64_inputs_are_rejected():
    def k(a):
        return a
    with raises(E.DtypeError, "float64", "64-bit"):
        run(k, np.ones((4, 4)))


def test_item_assignment_is_not_an_instruction():
    def k(a):
        t = nl.load(a)
        t[0:4, :] = 0.0
    with raises(E.UnsupportedError, "tensor_copy"):
        run(k, X)


def test_nl_matmul_needs_transpose_x():
    def k(a):
        t = nl.load(a)
        nl.matmul(t, t)
    with raises(E.UnsupportedError, "transpose_x=True"):
        run(k, X)


# --------------------------------------------------------------------------- uninitialised memory

def test_read_of_uninitialised_sbuf():
    def k():
        t = nl.ndarray((128, 64), dtype=nl.float32, name="scratch")
        nl.exp(t)
    with raises(E.UninitializedReadError, "activation", "'scratch'", "8192 of 8192", "[0, 0]"):
        run(k)


def test_read_of_partially_written_int_tile():
    def k():
        t = nl.ndarray((8, 16), dtype=nl.int32, name="ids")
        nisa.memset(t[:, 0:8], 0)
        d = nl.ndarray((8, 16), dtype=nl.int32)
        nisa.tensor_copy(d, t)
    with raises(E.UninitializedReadError, "tensor_copy", "'ids'", "64 of 128", "[0, 8]"):
        run(k)


def test_new_tensors_are_nan_filled():
    def k():
        out = nl.ndarray((4, 4), dtype=nl.float32, buffer=nl.shared_hbm)
        return out
    out = run(k, check_outputs_written=False)
    assert np.isnan(out).all()


def test_scalar_accumulator_read_before_reset():
    def k(a):
        t = nl.load(a)
        d = nl.ndarray((128, 64), dtype=nl.float32)
        r = nl.ndarray((128, 1), dtype=nl.float32)
        nisa.activation(d, nl.exp, t, reduce_op=nl.add, reduce_res=r)
    with raises(E.UninitializedReadError, "accumulator registers", "reset_reduce"):
        run(k, X)


# --------------------------------------------------------------------------- other instruction limits

def test_max8_needs_at_least_8_elements():
    def k(a):
        t = nl.load(a[:, 0:4])
        d = nl.ndarray((128, 8), dtype=nl.float32)
        nisa.max8(d, t)
    with raises(E.TileSizeError, "max8", "4 elements", "8 to 16384"):
        run(k, X)


def test_activation_scale_vector_must_be_fp32():
    def k(a):
        t = nl.load(a)
        s = nl.zeros((128, 1), dtype=nl.bfloat16)
        d = nl.ndarray((128, 64), dtype=nl.float32)
        nisa.activation(d, nl.exp, t, scale=s)
    with raises(E.DtypeError, "activation", "scale", "float32"):
        run(k, X)


def test_tensor_engine_transpose_output_over_128_partitions():
    def k():
        t = nl.zeros((128, 256), dtype=nl.bfloat16)
        d = nl.ndarray((256, 128), dtype=nl.bfloat16, buffer=nl.psum)
    with raises(E.PartitionLimitError, "256"):
        run(k)


def test_vector_engine_transpose_limit():
    def k():
        t = nl.zeros((64, 64), dtype=nl.float32)
        d = nl.ndarray((64, 64), dtype=nl.float32)
        nisa.nc_transpose(d, t, engine=nisa.engine.vector)
    with raises(E.TileSizeError, "nc_transpose", "[32, 32]"):
        run(k)


def test_memset_int_needs_int_value():
    def k():
        t = nl.ndarray((4, 4), dtype=nl.int32)
        nisa.memset(t, 1.5)
    with raises(E.DtypeError, "memset", "integer"):
        run(k)


def test_access_pattern_on_a_view_stays_in_bounds():
    def k(a):     # the view starts at row 125, so 4 rows from its base leave the tensor
        t = nl.ndarray((4, 64), dtype=nl.float32)
        nisa.dma_copy(t, a[125:].ap([[64, 4], [1, 64]]))
    with raises(E.OutOfBoundsError, "ap", "outside"):
        run(k, X)


def test_access_pattern_out_of_bounds():
    def k(a):
        t = nl.ndarray((4, 64), dtype=nl.float32)
        nisa.dma_copy(t, a.ap([[64, 4], [1, 64]], offset=126 * 64))
    with raises(E.OutOfBoundsError, "ap", "outside"):
        run(k, X)
