"""The simulator's scope: every public API is tested and documented (docs/simulator.md, "Scope").

The first test enforces the rule: each public callable of the simulator's ``nl`` and ``nisa``
namespaces must be named (as ``nl.NAME`` / ``nisa.NAME``) in a test file under tests/ and listed
in docs/simulator.md.  The other tests cover the APIs that no kernel of this project uses, each
against a NumPy formulation of its NKI documentation ("SDK": the API stubs
``nki/api/nki/language/__init__.py`` and ``nki/api/nki/isa/__init__.py`` of aws-neuron-sdk),
with a strictness case where the documentation states a limit.
"""
import math
import re
import types
from pathlib import Path

import numpy as np
import pytest

import mimo_kernels.simulator as sim
from mimo_kernels.simulator import errors as E
from test_simulator_surface import load, store     # HBM -> SBUF tile, tile -> shared_hbm output

nki, nl, nisa = sim, sim.language, sim.isa
ROOT = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(23)


def run(body, *arrays, lnc=None):
    """Simulate ``body`` as a kernel: without a launch grid, or as ``kernel[lnc]``."""
    kernel = nki.jit(body)
    return nki.simulate(kernel if lnc is None else kernel[lnc])(*arrays)


def f32(*shape, lo=-2.0, hi=2.0):
    return RNG.uniform(lo, hi, shape).astype(np.float32)


# --------------------------------------------------------------------------- the scope rule

def public_callables(module) -> list:
    return sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))
                  and not isinstance(getattr(module, n), types.ModuleType))


def test_every_public_api_is_tested_and_documented():
    from mimo_kernels import backend
    if not backend.IS_SIMULATOR:
        pytest.skip("the Neuron nki package is in use; the scope rule is about the bundled simulator")
    tests = "\n".join(p.read_text() for p in sorted((ROOT / "tests").glob("*.py")))
    docs = open(ROOT / "docs" / "simulator.md").read()
    prose = re.sub(r"```.*?```", "", docs, flags=re.S)        # API names are listed in code spans
    doc_spans = " ".join(re.findall(r"`([^`]+)`", prose))
    failures = []
    for alias, module in (("nl", backend.nl), ("nisa", backend.nisa)):
        for name in public_callables(module):
            if not re.search(rf"\b{alias}\.{name}\b", tests):
                failures.append(f"{alias}.{name}: no test under tests/ names it")
            if not re.search(rf"(?<![\w.]){name}\b", doc_spans):
                failures.append(f"{alias}.{name}: not listed in docs/simulator.md")
    assert not failures, ("public simulator APIs must be tested and documented, or removed "
                          "(docs/simulator.md, 'Scope'):\n  " + "\n  ".join(failures))


def test_internal_helpers_are_not_public():
    public = set(public_callables(nl)) | set(public_callables(nisa))
    leaked = {"violation", "lowered_activations", "runtime_int", "bind_element_wise_api", "ndarray_type",
              "allocate", "current", "strict", "static_cast", "DynamicSlice"} & public
    assert not leaked
    assert not {n for n in public if n.endswith("Error")}, "exception classes belong to simulator.errors"


def test_nki_classes():
    def k(x):
        t = load(x)
        reg = nisa.register_alloc(3)
        assert isinstance(t, nl.NkiTensor) and isinstance(t.buffer, nl.MemoryRegion)
        assert nl.sbuf is nl.MemoryRegion.sbuf and isinstance(reg, nisa.VirtualRegister)
        return store(t)
    x = f32(4, 8)
    np.testing.assert_array_equal(run(k, x), x)


# --------------------------------------------------------------------------- nl element-wise

def _erf(x):
    return np.vectorize(math.erf)(x.astype(np.float64))


def _softplus(x):
    return np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0)


# Names from the SDK stubs; the two GELU approximations are the standard formulas (the docs name
# them "Gelu with Tanh / Sigmoid Approximation", nki.api.shared.rst activation table).
UNARY = [
    (nl.relu, lambda x: np.maximum(x, 0.0), (-3, 3)),
    (nl.gelu_apprx_tanh, lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3))),
     (-4, 4)),
    (nl.gelu_apprx_sigmoid, lambda x: x / (1 + np.exp(-1.702 * x)), (-4, 4)),
    (nl.softplus, _softplus, (-6, 6)),
    (nl.mish, lambda x: x * np.tanh(_softplus(x)), (-6, 6)),
    (nl.erf, _erf, (-3, 3)),
    (nl.tan, np.tan, (-1.2, 1.2)),
    (nl.arctan, np.arctan, (-1.5, 1.5)),            # valid input range [-pi/2, pi/2]
    (nl.sign, np.sign, (-3, 3)),
    (nl.floor, np.floor, (-5, 5)),
    (nl.ceil, np.ceil, (-5, 5)),
    (nl.trunc, np.trunc, (-5, 5)),
    (nl.negative, np.negative, (-5, 5)),
    (nl.abs, np.abs, (-5, 5)),
    (nl.sqrt, np.sqrt, (0.01, 9)),
    (nl.reciprocal, lambda x: 1 / x, (0.5, 4)),
]


@pytest.mark.parametrize("fn,ref,bounds", UNARY, ids=[u[0].__name__ for u in UNARY])
def test_unary_elementwise(fn, ref, bounds):
    x = f32(128, 96, lo=bounds[0], hi=bounds[1])
    if fn in (nl.sign, nl.floor, nl.ceil, nl.trunc):
        x[:, :6] = [0.0, -2.0, 3.0, -0.5, 0.5, -1e-3]       # zeros, integers, both signs
    out = run(lambda x: store(fn(load(x))), x)
    np.testing.assert_allclose(out, ref(x.astype(np.float64)), rtol=2e-6, atol=2e-6)


def test_unary_dtype_and_arctan_range():
    x = f32(16, 32, lo=-1, hi=1)
    out = run(lambda x: store(nl.relu(load(x), dtype=nl.bfloat16)), x)
    assert out.dtype.name == "bfloat16"
    np.testing.assert_allclose(out.astype(np.float32), np.maximum(x, 0), rtol=1 / 128)
    with pytest.raises(E.ActivationRangeError, match=r"arctan"):     # documented range [-pi/2, pi/2]
        run(lambda x: store(nl.arctan(load(x))), x * 3)


COMPARE = [(nl.equal, np.equal), (nl.not_equal, np.not_equal), (nl.less_equal, np.less_equal)]


@pytest.mark.parametrize("fn,ref", COMPARE, ids=[c[0].__name__ for c in COMPARE])
def test_comparisons_give_one_or_zero(fn, ref):
    x = np.round(f32(64, 40)).astype(np.float32)
    y = np.round(f32(64, 40)).astype(np.float32)
    out = run(lambda x, y: store(fn(load(x), load(y), dtype=nl.uint8)), x, y)    # the docs' boolean form
    np.testing.assert_array_equal(out, ref(x, y).astype(np.uint8))
    scalar = run(lambda x: store(fn(load(x), 0.0, dtype=nl.uint8)), x)
    np.testing.assert_array_equal(scalar, ref(x, 0.0).astype(np.uint8))


LOGICAL = [(nl.logical_and, np.logical_and), (nl.logical_or, np.logical_or), (nl.logical_xor, np.logical_xor)]


@pytest.mark.parametrize("fn,ref", LOGICAL, ids=[c[0].__name__ for c in LOGICAL])
def test_logical_on_zero_one_tiles(fn, ref):
    a = RNG.integers(0, 2, (32, 48)).astype(np.float32)
    b = RNG.integers(0, 2, (32, 48)).astype(np.float32)
    out = run(lambda a, b: store(fn(load(a), load(b), dtype=nl.float32)), a, b)
    np.testing.assert_array_equal(out, ref(a, b).astype(np.float32))


BITWISE = [(nl.bitwise_or, np.bitwise_or), (nl.bitwise_xor, np.bitwise_xor)]


@pytest.mark.parametrize("fn,ref", BITWISE, ids=[c[0].__name__ for c in BITWISE])
def test_bitwise_on_integers(fn, ref):
    a = RNG.integers(-2 ** 20, 2 ** 20, (32, 48)).astype(np.int32)
    b = RNG.integers(-2 ** 20, 2 ** 20, (32, 48)).astype(np.int32)
    out = run(lambda a, b: store(fn(load(a), load(b))), a, b)
    np.testing.assert_array_equal(out, ref(a, b))
    with pytest.raises(E.DtypeError):                      # docs: "Inputs must be integer typed"
        run(lambda a: store(fn(load(a), load(a))), a.astype(np.float32))


def test_minimum_power_divide_where():
    x, y = f32(64, 40, lo=0.5, hi=2), f32(64, 40, lo=-2, hi=2)

    def k(x, y):
        xt, yt = load(x), load(y)
        return (store(nl.minimum(xt, yt)), store(nl.minimum(xt, 1.0)), store(nl.power(xt, yt)),
                store(nl.divide(xt, 4.0)), store(nl.where(nl.greater(yt, 0.0), xt, yt)))
    mn, mn_scalar, pw, dv, wh = run(k, x, y)
    np.testing.assert_array_equal(mn, np.minimum(x, y))
    np.testing.assert_array_equal(mn_scalar, np.minimum(x, 1.0))
    np.testing.assert_allclose(pw, np.power(x.astype(np.float64), y), rtol=1e-5)
    np.testing.assert_allclose(dv, x / 4.0, rtol=1e-7)
    np.testing.assert_array_equal(wh, np.where(y > 0, x, y))

    def two_numbers(x):
        nl.not_equal(1.0, 2.0)                          # docs: "At least one of x, y must be a tile"
        return store(load(x))
    with pytest.raises(TypeError, match="at least one operand must be a tile"):
        run(two_numbers, x)


# --------------------------------------------------------------------------- nl reductions

REDUCE = [(nl.max, np.max), (nl.min, np.min), (nl.prod, np.prod), (nl.mean, np.mean)]


@pytest.mark.parametrize("fn,ref", REDUCE, ids=[c[0].__name__ for c in REDUCE])
def test_reductions_over_trailing_free_axes(fn, ref):
    x = f32(32, 6, 10, lo=0.8, hi=1.2)
    out = run(lambda x: store(fn(load(x), axis=(1, 2), keepdims=True)), x)
    np.testing.assert_allclose(out, ref(x.astype(np.float64), axis=(1, 2), keepdims=True), rtol=1e-5)
    with pytest.raises(E.ReductionAxisError):         # docs: "not partition dimension (0)"
        run(lambda x: store(fn(load(x), axis=0)), x)


def test_all_reduction():
    x = (RNG.random((32, 20)) > 0.1).astype(np.float32)
    x[0] = 1.0
    out = run(lambda x: store(nl.all(load(x), axis=1, dtype=nl.uint8)), x)
    np.testing.assert_array_equal(out[:, 0], np.all(x != 0, axis=1).astype(np.uint8))
    assert out[0, 0] == 1 and out[:, 0].min() == 0


# --------------------------------------------------------------------------- nl creation

def test_full_ones_zeros_like_empty_like():
    x = f32(16, 8)

    def k(x):
        t = load(x)
        filled, ones, zeros = nl.full((16, 8), 2.5, nl.float32), nl.ones((16, 8), nl.int32), nl.zeros_like(t)
        empty = nl.empty_like(t)
        assert empty.shape == t.shape and empty.dtype == t.dtype and empty.buffer is t.buffer
        return store(filled), store(ones), store(zeros)
    filled, ones, zeros = run(k, x)
    np.testing.assert_array_equal(filled, np.full((16, 8), 2.5, np.float32))
    np.testing.assert_array_equal(ones, np.ones((16, 8), np.int32))
    np.testing.assert_array_equal(zeros, np.zeros_like(x))
    with pytest.raises(E.UninitializedReadError):      # an empty tile has no values to read
        run(lambda x: store(nl.empty_like(load(x))), x)


def test_rand_and_random_seed():
    def k(seed):
        s = load(seed)
        nl.random_seed(s)
        a = nl.rand((64, 32), nl.float32)
        nl.random_seed(s)
        b = nl.rand((64, 32), nl.float32)
        return store(a), store(b)
    a, b = run(k, np.array([[42]], np.int32))
    c, _ = run(k, np.array([[7]], np.int32))
    assert 0.0 <= a.min() and a.max() < 1.0 and abs(float(a.mean()) - 0.5) < 0.05   # uniform [0, 1)
    np.testing.assert_array_equal(a, b)                 # the same seed gives the same values
    assert not np.array_equal(a, c)

    def int_seed(x):
        nl.random_seed(42)                              # docs: a [1, 1] tensor with a 32-bit seed
        return store(load(x))
    with pytest.raises(TypeError, match=r"\[1, 1\] int32/uint32 tensor"):
        run(int_seed, np.zeros((1, 1), np.float32))


# --------------------------------------------------------------------------- nl loops and SPMD

def test_static_loop_aliases():
    x = f32(8, 4)

    def k(x):
        acc = nl.zeros((8, 4), nl.float32)
        t = load(x)
        for _ in nl.sequential_range(2):
            for _ in nl.static_range(3):
                nisa.tensor_tensor(acc, acc, t, nl.add)
        return store(acc)
    np.testing.assert_allclose(run(k, x), 6 * x, rtol=1e-6)


def _count_down_kernel(n):
    """x: [10, 1].  Sums x[0..n-1] with a register-bounded dynamic_range and x[1..n] with a
    while_loop counting its condition register down from n."""
    def k(x):
        n_sb = nl.full((1, 1), n, nl.int32)
        n_reg = nisa.register_alloc()
        nisa.register_load(n_reg, n_sb)
        by_range = nl.zeros((1, 1), nl.float32)
        for i in nl.dynamic_range(n_reg):
            row = nl.ndarray((1, 1), nl.float32, buffer=nl.sbuf)
            nisa.dma_copy(row, x.ap([[1, 1], [1, 1]], scalar_offset=i))
            nisa.tensor_tensor(by_range, by_range, row, nl.add)
        by_while = nl.zeros((1, 1), nl.float32)
        seen = nl.ndarray((1, 1), nl.int32, buffer=nl.sbuf)

        def body(r):                                    # r: the current condition value
            nisa.register_store(seen, r)
            row = nl.ndarray((1, 1), nl.float32, buffer=nl.sbuf)
            nisa.dma_copy(row, x.ap([[1, 1], [1, 1]], scalar_offset=r))
            nisa.tensor_tensor(by_while, by_while, row, nl.add)
            nisa.tensor_scalar(seen, seen, nl.subtract, 1)
            nxt = nisa.register_alloc()
            nisa.register_load(nxt, seen)
            return nxt
        nl.while_loop(n_reg, body)
        return store(by_range), store(by_while)
    return k


def test_dynamic_range_and_while_loop():
    x = f32(1, 10)
    by_range, by_while = run(_count_down_kernel(6), x.reshape(10, 1))
    np.testing.assert_allclose(by_range[0, 0], x[0, :6].sum(), rtol=1e-6)
    np.testing.assert_allclose(by_while[0, 0], x[0, 1:7].sum(), rtol=1e-6)   # r = 6, 5, ..., 1
    zero, _ = run(_count_down_kernel(0), x.reshape(10, 1))
    assert zero[0, 0] == 0.0                           # a true while: init 0 never runs the body


def test_no_reorder_and_dynamic_loops():
    x = f32(8, 4)

    def ordered(x):
        with nl.no_reorder():
            out = store(nl.add(load(x), load(x)))
        return out
    np.testing.assert_array_equal(run(ordered, x), 2 * x)
    loops = {"fori_loop": lambda: nl.fori_loop(0, 2, lambda i: None),
             "while_loop": lambda: nl.while_loop(0, lambda r: r),
             "dynamic_range": lambda: list(nl.dynamic_range(2))}
    for name, loop in loops.items():
        def k(x, loop=loop):
            with nl.no_reorder():                       # docs: register loops are not supported here
                loop()
            return store(load(x))
        with pytest.raises(E.UnsupportedError, match=name):
            run(k, x)

    def register_step(x):
        list(nl.dynamic_range(0, 4, nisa.register_alloc(1)))
        return store(load(x))
    with pytest.raises(TypeError, match="compile-time positive integer"):   # docs: step is a constant
        run(register_step, x)


def test_program_ndim():
    def k(x):
        return store(nl.full((1, 1), nl.program_ndim(), nl.int32))
    x = np.zeros((1, 1), np.float32)
    assert run(k, x)[0, 0] == 0                        # docs: "0 if no grid"
    assert run(k, x, lnc=1)[0, 0] == 1
    assert run(k, x, lnc=2)[0, 0] == 1


# --------------------------------------------------------------------------- nl memory and misc

def test_load_transpose2d_and_transpose():
    x = f32(64, 128).astype(np.float16)

    def k(x):
        t = nl.load_transpose2d(x)
        cast = nl.load_transpose2d(x, dtype=nl.float32)
        back = nl.transpose(t)                          # [128, 64] -> PSUM [64, 128]
        return store(t), store(cast), store(nl.copy(back))
    t, cast, back = run(k, x)
    np.testing.assert_array_equal(t, x.T)
    assert cast.dtype == np.float32
    np.testing.assert_array_equal(cast, x.T.astype(np.float32))
    np.testing.assert_array_equal(back, x)
    with pytest.raises(E.DtypeError, match="2-byte"):   # DMA transpose: "src.dtype is 2 bytes"
        run(lambda x: store(nl.load_transpose2d(x)), x.astype(np.float32))


def test_device_print(capsys):
    x = np.arange(6, dtype=np.float32).reshape(2, 3)

    def k(x):
        t = load(x)
        nl.device_print("tile:", t)
        nl.device_print("hbm:", x)
        return store(t)
    run(k, x)
    printed = capsys.readouterr().out
    assert "tile: [[0. 1. 2.]\n [3. 4. 5.]]" in printed and "hbm: [[0. 1. 2.]" in printed

    def psum_print(x):
        nl.device_print("psum:", nl.zeros((2, 3), nl.float32, buffer=nl.psum))    # docs: SBUF or HBM
        return store(load(x))
    with pytest.raises(E.MemoryRegionError, match="SBUF or HBM"):
        run(psum_print, x)


# --------------------------------------------------------------------------- nisa

def test_activation_reduce():
    x, bias = f32(96, 70), f32(96, 1)

    def k(x, bias):
        out = nl.ndarray((96, 70), nl.float32, buffer=nl.sbuf)
        total = nl.ndarray((96, 1), nl.float32, buffer=nl.sbuf)
        nisa.activation_reduce(out, nl.exp, load(x), reduce_op=nl.add, reduce_res=total, bias=load(bias),
                               scale=0.5)
        return store(out), store(total)
    out, total = run(k, x, bias)
    ref = np.exp(x.astype(np.float64) * 0.5 + bias)
    np.testing.assert_allclose(out, ref, rtol=1e-5)
    np.testing.assert_allclose(total[:, 0], ref.sum(axis=1), rtol=1e-5)

    def wide_result(x, bias):                         # docs: one element per partition
        out = nl.ndarray((96, 70), nl.float32, buffer=nl.sbuf)
        nisa.activation_reduce(out, nl.exp, load(x), reduce_op=nl.add,
                               reduce_res=nl.ndarray((96, 2), nl.float32, buffer=nl.sbuf))
        return store(out)
    with pytest.raises(E.ShapeMismatchError, match="reduce_res"):
        run(wide_result, x, bias)


@pytest.mark.parametrize("red,ref", [(nl.add, np.sum), (nl.maximum, np.max), (nl.minimum, np.min)],
                         ids=["add", "maximum", "minimum"])
def test_tensor_scalar_reduce(red, ref):
    x, col = f32(64, 5, 12), f32(64, 1)

    def k(x, col):
        out = nl.ndarray((64, 5, 12), nl.float32, buffer=nl.sbuf)
        res = nl.ndarray((64, 1), nl.float32, buffer=nl.sbuf)
        nisa.tensor_scalar_reduce(out, load(x), nl.subtract, load(col), reduce_op=red, reduce_res=res,
                                  reverse0=True)
        return store(out), store(res)
    out, res = run(k, x, col)
    expected = col[:, :, None] - x                      # reverse0: operand0 is the lhs
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    np.testing.assert_allclose(res[:, 0], ref(expected.reshape(64, -1), axis=1), rtol=1e-5, atol=1e-5)

    def bitvec(x, col):
        out = nl.ndarray((64, 60), nl.int32, buffer=nl.sbuf)
        xi = nl.ndarray((64, 60), nl.int32, buffer=nl.sbuf)
        nisa.memset(xi, 3)
        nisa.tensor_scalar_reduce(out, xi, nl.bitwise_and, 1, reduce_op=red)
        return store(out)
    with pytest.raises(E.UnsupportedError, match="bitvec"):   # docs: "Bitvec operators are not supported"
        run(bitvec, x, col)


def test_tensor_scalar_reduce_accumulator_commands():
    """reduce_cmd: load_reduce starts from reduce_init (a [P, 1] tile or a number), reduce continues
    the VectorE accumulators, reduce_res_negate negates the result; reduce without a reset raises."""
    x, y, init = f32(32, 40), f32(32, 24), f32(32, 1)

    def k(x, y, init):
        scratch = nl.ndarray((32, 40), nl.float32, buffer=nl.sbuf)
        first = nl.ndarray((32, 1), nl.float32, buffer=nl.sbuf)
        both = nl.ndarray((32, 1), nl.float32, buffer=nl.sbuf)
        capped = nl.ndarray((32, 1), nl.float32, buffer=nl.sbuf)
        nisa.tensor_scalar_reduce(scratch, load(x), nl.multiply, -1.0, reduce_op=nl.minimum, reduce_res=first,
                                  reduce_cmd=nisa.reduce_cmd.load_reduce, reduce_init=load(init),
                                  reduce_res_negate=True)
        nisa.tensor_scalar_reduce(scratch[:, 0:24], load(y), nl.multiply, -1.0, reduce_op=nl.minimum,
                                  reduce_res=both, reduce_cmd=nisa.reduce_cmd.reduce)
        nisa.tensor_scalar_reduce(scratch, load(x), nl.add, 0.0, reduce_op=nl.maximum, reduce_res=capped,
                                  reduce_cmd=nisa.reduce_cmd.load_reduce, reduce_init=0.5)
        return store(first), store(both), store(capped)
    first, both, capped = run(k, x, y, init)
    np.testing.assert_allclose(first[:, 0], -np.minimum(init[:, 0], (-x).min(axis=1)), rtol=1e-6)
    np.testing.assert_allclose(both[:, 0], np.minimum(-first[:, 0], (-y).min(axis=1)), rtol=1e-6)
    np.testing.assert_allclose(capped[:, 0], np.maximum(0.5, x.max(axis=1)), rtol=1e-6)

    def unset(x, y, init):
        scratch = nl.ndarray((32, 40), nl.float32, buffer=nl.sbuf)
        nisa.tensor_scalar_reduce(scratch, load(x), nl.add, 1.0, reduce_op=nl.add, reduce_init=load(init))
        return store(scratch)
    with pytest.raises(E.UnsupportedError, match="reduce_init"):
        run(unset, x, y, init)

    def no_reset(x, y, init):
        scratch = nl.ndarray((32, 40), nl.float32, buffer=nl.sbuf)
        nisa.tensor_scalar_reduce(scratch, load(x), nl.add, 1.0, reduce_op=nl.add, reduce_cmd=nisa.reduce_cmd.reduce)
        return store(scratch)
    with pytest.raises(E.UninitializedReadError, match="never reset"):
        run(no_reset, x, y, init)


def test_scalar_tensor_tensor():
    x, col, y = f32(48, 30), f32(48, 1), f32(48, 30)

    def k(x, col, y):
        a = nl.ndarray((48, 30), nl.float32, buffer=nl.sbuf)
        b = nl.ndarray((48, 30), nl.float32, buffer=nl.sbuf)
        xt, ct, yt = load(x), load(col), load(y)
        nisa.scalar_tensor_tensor(a, xt, nl.multiply, ct, nl.add, yt)
        nisa.scalar_tensor_tensor(b, xt, nl.subtract, 2.0, nl.subtract, yt, reverse0=True, reverse1=True)
        return store(a), store(b)
    a, b = run(k, x, col, y)
    np.testing.assert_allclose(a, x * col + y, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(b, y - (2.0 - x), rtol=1e-6, atol=1e-6)

    def both_psum(x, col, y):                           # docs: data and operand1 not both in PSUM
        p = nl.zeros((48, 30), nl.float32, buffer=nl.psum)
        out = nl.ndarray((48, 30), nl.float32, buffer=nl.sbuf)
        nisa.scalar_tensor_tensor(out, p, nl.multiply, 1.0, nl.add, p)
        return store(out)
    with pytest.raises(E.MemoryRegionError):
        run(both_psum, x, col, y)


def test_nc_n_gather():
    data = f32(32, 4, 25)
    idx = RNG.integers(0, 100, (32, 7, 3)).astype(np.uint32)

    def k(data, idx):
        out = nl.ndarray((32, 7, 3), nl.float32, buffer=nl.sbuf)
        nisa.nc_n_gather(out, load(data), load(idx))
        return store(out)
    out = run(k, data, idx)
    expected = np.take_along_axis(data.reshape(32, 100), idx.reshape(32, 21).astype(np.int64), axis=1)
    np.testing.assert_array_equal(out, expected.reshape(32, 7, 3))
    idx[5, 0, 0] = 100                                  # docs: indices in [0, data.size / data.shape[0])
    with pytest.raises(E.OutOfBoundsError, match="100"):
        run(k, data, idx)
    with pytest.raises(E.DtypeError, match="uint32"):   # docs: "The indices tile must be uint32"
        run(k, data, idx.astype(np.int32) % 100)


def test_register_move_and_store():
    def k(x):
        a = nisa.register_alloc()
        nisa.register_move(a, 17)
        b = nisa.register_alloc(0)
        nisa.register_move(b, a)
        sb = nl.ndarray((1, 1), nl.int32, buffer=nl.sbuf)
        nisa.register_store(sb, b)
        out = nl.ndarray((1, 1), nl.int32, buffer=nl.shared_hbm)
        nisa.register_store(out, a)                     # docs: HBM or SBUF
        return store(sb), out
    sb, hbm = run(k, np.zeros((1, 1), np.float32))
    assert sb[0, 0] == 17 and hbm[0, 0] == 17

    def two_elements(x):
        nisa.register_store(nl.ndarray((1, 2), nl.int32, buffer=nl.sbuf), nisa.register_alloc(1))
        return store(load(x))
    with pytest.raises(E.ShapeMismatchError, match="exactly one element"):
        run(two_elements, np.zeros((1, 1), np.float32))

    def move_from_tensor(x):                            # docs: "does not access SBUF, PSUM, or HBM"
        nisa.register_move(nisa.register_alloc(), nl.full((1, 1), 3, nl.int32))
        return store(load(x))
    with pytest.raises(TypeError, match="register_load"):
        run(move_from_tensor, np.zeros((1, 1), np.float32))


@pytest.mark.parametrize("api", [nisa.quantize_mx, nisa.nc_matmul_mx], ids=["quantize_mx", "nc_matmul_mx"])
def test_neuroncore_v4_instructions_raise(api):
    # The docs: "Available only on NeuronCore-v4 and newer"; the simulated target is Trainium2.
    def k(x):
        api()
        return store(load(x))
    with pytest.raises(E.UnsupportedError, match="NeuronCore-v4"):
        run(k, np.zeros((1, 1), np.float32))
