"""One test per documented rule (mimo_kernels.simulator.rules): the violating snippet raises an
error that names the rule; the allowed form next to it runs."""
import numpy as np
import pytest

from mimo_kernels.backend import nki, nl, nisa, simulate
from mimo_kernels.simulator import errors as E
from mimo_kernels.simulator.rules import AMBIGUOUS, RULES

X = np.ones((128, 64), np.float32)


def run(body, *arrays, **options):
    return simulate(nki.jit(body), **options)(*arrays)


def breaks(rule, error=E.NkiError):
    """pytest.raises for ``error`` whose message cites ``[rule <rule>: ...]``."""
    assert rule in RULES
    return pytest.raises(error, match=rf"\[rule {rule}: ")


def test_tensor_tensor_runs_on_vector_or_gpsimd_only():
    def k(a, engine):
        x = nl.load(a)
        out = nl.ndarray(x.shape, dtype=nl.float32)
        nisa.tensor_tensor(out, x, x, nl.add, engine=engine)
    run(k, X, nisa.engine.gpsimd)
    with breaks("engine-tensor-tensor", E.EngineRuleError):
        run(k, X, nisa.engine.scalar)


def test_memset_runs_on_vector_or_gpsimd_only():
    def k(engine):
        t = nl.ndarray((128, 8), dtype=nl.float32)
        nisa.memset(t, 0.0, engine=engine)
    run(k, nisa.engine.vector)
    with breaks("engine-memset", E.EngineRuleError):
        run(k, nisa.engine.scalar)


def test_gpsimd_tensor_scalar_only_for_rsqrt():
    def k(a, op):
        x = nl.load(a)
        out = nl.ndarray(x.shape, dtype=nl.float32)
        nisa.tensor_scalar(out, x, op0=op, operand0=0.0 if op is nl.rsqrt else 2.0,
                           engine=nisa.engine.gpsimd)
    run(k, X, nl.rsqrt)
    with breaks("gpsimd-tensor-scalar", E.EngineRuleError):
        run(k, X, nl.multiply)
    run(k, X, nl.multiply, lenient=("gpsimd-tensor-scalar",))


def test_activation_only_documented_functions():
    def k(a):
        x = nl.load(a)
        out = nl.ndarray(x.shape, dtype=nl.float32)
        nisa.activation(out, nl.cos, x)
    with breaks("activation-table", E.ActivationRangeError):
        run(k, X)
    run(lambda a: nl.store(nl.ndarray(a.shape, dtype=a.dtype, buffer=nl.shared_hbm), nl.cos(nl.load(a))), X)


def test_activation_input_range_and_sin_without_range_reduction():
    def act(a, op):
        x = nl.load(a)
        out = nl.ndarray(x.shape, dtype=nl.float32)
        nisa.activation(out, op, x)
    run(act, np.full((128, 4), 3.0, np.float32), nl.sin)
    with breaks("activation-range", E.ActivationRangeError):
        run(act, np.full((128, 4), 9.0, np.float32), nl.sin)
    with breaks("activation-range", E.ActivationRangeError):
        run(act, np.zeros((128, 4), np.float32), nl.log)
    with breaks("activation-range", E.ActivationRangeError):
        run(act, np.full((128, 4), 1e-30, np.float32), nl.rsqrt)

    def sin_kernel(a):                       # nl.sin range-reduces first
        out = nl.ndarray(a.shape, dtype=a.dtype, buffer=nl.shared_hbm)
        nl.store(out, nl.sin(nl.load(a)))
        return out
    np.testing.assert_allclose(run(sin_kernel, np.full((128, 4), 9.0, np.float32)), np.sin(9.0), rtol=1e-6)


def _transpose(a, dge):
    dst = nl.ndarray(a.shape[::-1], dtype=a.dtype, buffer=nl.sbuf)
    nisa.dma_transpose(dst=dst, src=a, dge_mode=dge)


def test_dma_transpose_two_byte_dtypes():
    run(_transpose, np.ones((16, 128), np.float16), nisa.dge_mode.unknown)
    with breaks("dma-transpose-2-byte", E.DtypeError):
        run(_transpose, np.ones((16, 128), np.float32), nisa.dge_mode.unknown)
    run(_transpose, np.ones((16, 128), np.float32), nisa.dge_mode.unknown,
        lenient=("dma-transpose-2-byte",))


def test_dma_transpose_source_shape_per_dge_mode():
    run(_transpose, np.ones((16, 128), np.float16), nisa.dge_mode.hwdge)
    with breaks("dma-transpose-shape", E.TileSizeError):
        run(_transpose, np.ones((32, 128), np.float16), nisa.dge_mode.hwdge)
    run(_transpose, np.ones((32, 128), np.float16), nisa.dge_mode.unknown)


@pytest.mark.parametrize("rows,start,ok", [(128, 0, True), (96, 32, False), (64, 64, True),
                                           (64, 32, False), (32, 96, True), (32, 16, False),
                                           (16, 48, False)])
def test_start_partition_rule(rows, start, ok):
    def k():
        t = nl.ndarray((128, 8), dtype=nl.float32)
        nisa.memset(t[start:start + rows, :], 1.0)
    if ok:
        run(k)
    else:
        with breaks("start-partition", E.StartPartitionError):
            run(k)


def test_free_size_limits_of_compute_operands():
    def k(buffer, free):
        t = nl.ndarray((2, free), dtype=nl.float32 if buffer is nl.psum else nl.bfloat16, buffer=buffer)
        nisa.memset(t, 0.0)
    run(k, nl.sbuf, 64 * 1024)
    with breaks("engine-free-size", E.TileSizeError):
        run(k, nl.sbuf, 64 * 1024 + 1)
    run(k, nl.psum, 4 * 1024)


def test_accumulate_none_strict_per_bank():
    def k(explicit):
        s = nl.zeros((128, 128), dtype=nl.bfloat16)
        acc = nl.ndarray((128, 512), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(acc[:, 0:128], s, s)
        nisa.nc_matmul(acc[:, 128:256], s, s, accumulate=False if explicit else None)
    run(k, True)
    with breaks("psum-accumulate-per-bank", E.AccumulationError):
        run(k, False)
    run(k, False, lenient=("psum-accumulate-per-bank",))


def test_python_subset_generators_sets_and_dict_keys():
    def gen(a):
        x = nl.load(a)
        return sum(i for i in range(3))

    def set_literal(a):
        return {1, 2}

    def int_dict(a):
        return {1: a}

    def wide_int(a):
        return 2 ** 40 + 0 * 4294967296000

    for body in (gen, set_literal, int_dict, wide_int):
        with breaks("python-subset", E.PythonSubsetError):
            run(body, X)

    def kernel(a, n):
        return None
    with breaks("python-subset", E.PythonSubsetError):
        run(kernel, X, 2 ** 33)
    with breaks("python-subset", E.PythonSubsetError):
        run(kernel, X, {3: 1})


def test_python_subset_follows_helpers():
    with breaks("python-subset", E.PythonSubsetError):
        run(_kernel_with_generator_helper, X)


def _generator_helper(n):
    return list(i for i in range(n))


def _kernel_with_generator_helper(a):
    _generator_helper(3)


def test_only_ambiguous_rules_can_be_loosened():
    with pytest.raises(ValueError, match="not switchable"):
        run(lambda: None, lenient=("start-partition",))
    assert set(AMBIGUOUS) <= set(RULES)


def test_simulator_layers_import_one_way():
    """memory (tensors) never imports the API modules built on it (isa, language): no cycle."""
    import ast
    import mimo_kernels.simulator.memory as memory
    tree = ast.parse(open(memory.__file__).read())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                for alias in node.names} | {node.module for node in ast.walk(tree)
                                            if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & {"isa", "language", "isa_ext"}


def test_machine_description_feeds_the_simulator():
    from mimo_kernels.trn2 import TRN2
    assert nl.tile_size.pmax == TRN2.partitions
    assert nl.tile_size.gemm_moving_fmax == TRN2.gemm_moving_fmax
    assert nl.tile_size.sbuf_size_bytes == TRN2.sbuf_bytes_per_partition
    assert TRN2.dma_engines_for(128) == 16 and TRN2.dma_engines_for(9) == 2
