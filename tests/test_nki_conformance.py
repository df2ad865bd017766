"""Conformance: public NKI kernels written by AWS, run unchanged on our simulator.

The kernels are NOT part of this repository.  They are read from local checkouts of the public
repositories, named by environment variables (see docs/simulator.md, "Conformance corpus"):

* ``MIMO_NKI_LIBRARY``: a clone of https://github.com/aws-neuron/nki-library (the NKI Library;
  kernels under ``src/nkilib_src/nkilib``, each with a PyTorch reference ``*_torch.py``);
* ``MIMO_NKI_SDK``: a clone of https://github.com/aws-neuron/aws-neuron-sdk (the tutorial
  kernels under ``nki/examples``).

Each test skips with the reason when its checkout is absent.  The simulator is put in place of
the ``nki`` package for the kernels' own ``import nki`` lines (``sys.modules``), the kernel runs
with the inputs of the repository's own tests, and its outputs are compared with the repository's
own reference (``*_torch.py`` or the example's NumPy reference; where a reference cannot be
imported on a CPU, an independent NumPy formulation of it).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import mimo_kernels.simulator as sim

LIBRARY_ENV = "MIMO_NKI_LIBRARY"
SDK_ENV = "MIMO_NKI_SDK"


# --------------------------------------------------------------------------- import shim

def _nki_modules() -> dict:
    """The simulator under the module names the public kernels import."""
    return {"nki": sim, "nki.language": sim.language, "nki.isa": sim.isa,
            "nki.isa.constants": sim.isa.constants, "nki.typing": sim.typing}


@pytest.fixture(scope="module", autouse=True)
def nki_shim():
    """Map ``nki`` to the simulator while this module runs, then restore ``sys.modules``."""
    saved = {name: sys.modules.get(name) for name in _nki_modules()}
    sys.modules.update(_nki_modules())
    yield
    for name, module in saved.items():
        if module is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = module


def _checkout(env: str, marker: str) -> Path:
    root = os.environ.get(env)
    if not root:
        pytest.skip(f"{env} is not set: point it at a local clone of the public repository "
                    f"(docs/simulator.md, 'Conformance corpus')")
    path = Path(root)
    if not (path / marker).exists():
        pytest.skip(f"{env}={root} does not look like the expected checkout (no {marker})")
    return path


def _library_module(name: str):
    """``nkilib.<name>`` from the NKI Library checkout (imported as the package ``nkilib``)."""
    src = _checkout(LIBRARY_ENV, "src/nkilib_src/nkilib") / "src" / "nkilib_src"
    if str(src) not in sys.path:
        sys.path.insert(0, str(src))
    return importlib.import_module(f"nkilib.{name}")


def _sdk_file(relative: str) -> types.ModuleType:
    """A file of the SDK checkout's ``nki/`` folder, imported under a private module name."""
    path = _checkout(SDK_ENV, "nki/examples") / "nki" / relative
    name = "nki_sdk_" + relative.replace("/", "_").replace("-", "_").removesuffix(".py")
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- helpers

def _torch_ref(fn, **kwargs) -> dict:
    """Call a PyTorch reference with NumPy arguments; NumPy outputs (fp32 for floats)."""
    torch = pytest.importorskip("torch")

    def to_torch(v):
        if isinstance(v, np.ndarray):
            return torch.from_numpy(v.astype(np.float32) if v.dtype.kind == "f" else v)
        return v
    out = fn(**{k: to_torch(v) for k, v in kwargs.items()})
    if isinstance(out, (tuple, list)):
        out = {f"output_{i}": v for i, v in enumerate(out)}
    elif not isinstance(out, dict):
        out = {"output": out}
    return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy() for k, v in out.items()}


def _close(actual, expected, rtol, atol, what=""):
    np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(expected, np.float32),
                               rtol=rtol, atol=atol, err_msg=what)


def _run(kernel, lnc: int = 1, lenient=None, **inputs):
    """As the library's own simulator harness: ``simulate(kernel)[lnc](**inputs)``; ``lenient``
    names the ambiguous rules (docs/simulator.md) a public kernel reads the other way."""
    return sim.simulate(sim.Kernel(kernel)[lnc], lenient=lenient)(**inputs)


# --------------------------------------------------------------------------- SDK tutorials

def test_sdk_tensor_addition():
    mod = _sdk_file("examples/tensor_addition/tensor_addition_nki_kernels.py")
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((256, 1024), np.float32), rng.standard_normal((256, 1024), np.float32)
    _close(_run(mod.nki_tensor_add, a_input=a, b_input=b), a + b, 0, 0)


def test_sdk_simulate_example():
    mod = _sdk_file("examples/simulate/nki_simulate_example.py")
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((128, 512), np.float32), rng.standard_normal((128, 512), np.float32)
    _close(_run(mod.add_kernel, a_ptr=a, b_ptr=b), a + b, 0, 0)


def test_sdk_getting_started():
    mod = _sdk_file("examples/getting_started_baremetal.py")
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((128, 512), np.float32), rng.standard_normal((128, 512), np.float32)
    _close(_run(mod.nki_tensor_add_kernel, a_input=a, b_input=b), a + b, 0, 0)


def test_sdk_transpose2d():
    mod = _sdk_file("examples/transpose2d/transpose2d_nki_kernels.py")
    p, x, y = 5, 3, 4
    a = np.arange(p * x * y, dtype=np.int8).reshape(p, x * y)
    expected = np.transpose(a.reshape(p, x, y), (0, 2, 1)).reshape(p, x * y)
    np.testing.assert_array_equal(_run(mod.tensor_transpose2D_kernel_, in_tensor=a, shape2D=(x, y)), expected)


def test_sdk_average_pool2d():
    mod = _sdk_file("examples/average_pool2d/average_pool2d_nki_kernels.py")
    x = np.arange(2 * 6 * 6, dtype=np.float16).reshape(2, 6, 6)
    out = _run(mod.tensor_avgpool_kernel, in_tensor=x, pool_size=2)
    np.testing.assert_array_equal(out, mod.np_average_pool_2D(x, 2))


@pytest.mark.parametrize("variant,shape", [
    ("nki_matmul_basic_", (128, 64, 512)),
    ("nki_matmul_tiled_", (256, 256, 1024)),
    ("nki_matmul_hoist_load_", (256, 256, 1024)),
    ("nki_matmul_block_free_dimension_", (256, 512, 2048)),
    ("nki_matmul_fully_optimized_", (1024, 2048, 1024)),
])
def test_sdk_matrix_multiplication(variant, shape):
    mod = _sdk_file("examples/matrix_multiplication/matrix_multiplication_nki_kernels.py")
    k, m, n = shape
    rng = np.random.default_rng(3)
    import ml_dtypes
    lhs_t = rng.standard_normal((k, m), np.float32).astype(ml_dtypes.bfloat16)
    rhs = rng.standard_normal((k, n), np.float32).astype(ml_dtypes.bfloat16)
    kwargs = {"TILES_IN_BLOCK_M": 8, "TILES_IN_BLOCK_N": 2, "TILES_IN_BLOCK_K": 8} \
        if variant == "nki_matmul_fully_optimized_" else {}
    out = _run(getattr(mod, variant), lhsT=lhs_t, rhs=rhs, **kwargs)
    expected = lhs_t.astype(np.float32).T @ rhs.astype(np.float32)
    _close(out, expected, 2e-2, 2e-1)


def _mamba_reference(delta, u, a, b, c):
    """NumPy form of the SDK's mamba_torch.mamba_layer (that file needs torch_xla)."""
    delta_a = np.exp(delta[:, :, None, :] * a[None, :, :, None])
    delta_bu = delta[:, :, None, :] * b[:, None, :, :] * u[:, :, None, :]
    state = np.zeros(delta_a.shape[:-1], np.float64)
    scan = np.empty_like(delta_a, dtype=np.float64)
    for i in range(delta_a.shape[-1]):
        state = delta_a[..., i] * state + delta_bu[..., i]
        scan[..., i] = state
    return (c[:, None, :, :] * scan).sum(axis=-2)


@pytest.mark.parametrize("version", ["mamba_v1", "mamba_v2", "mamba_v3"])
def test_sdk_fused_mamba(version):
    mod = _sdk_file("examples/fused_mamba/mamba_nki_kernels.py")
    rng = np.random.default_rng(4)
    batch, channels, seq, state = 1, 256, 512, 16
    delta = rng.uniform(0.01, 0.1, (batch, channels, seq)).astype(np.float32)
    u = rng.standard_normal((batch, channels, seq), np.float32)
    a = -rng.uniform(0.5, 1.5, (channels, state)).astype(np.float32)
    b = rng.standard_normal((batch, state, seq), np.float32)
    c = rng.standard_normal((batch, state, seq), np.float32)
    out = _run(getattr(mod, version), delta=delta, u=u, A=a, B=b, C=c)
    _close(out, _mamba_reference(delta, u, a, b, c), 1e-3, 1e-3)


# --------------------------------------------------------------------------- NKI Library

def test_library_cumsum():
    kernel = _library_module("core.cumsum.cumsum").cumsum
    ref = _library_module("core.cumsum.cumsum_torch").cumsum_torch_ref
    x = np.random.default_rng(5).standard_normal((200, 3000)).astype(np.float32)
    _close(_run(kernel, x=x), _torch_ref(ref, x=x)["output_0"], 1e-4, 1e-3)


def _sparse_columns(t, e, k, dtype, seed=0):
    rng = np.random.default_rng(seed)
    flat = rng.permutation(np.concatenate([np.ones(k * e), np.zeros((t - k) * e)]))
    return flat.reshape(t, e).astype(dtype)


@pytest.mark.xfail(raises=sim.UninitializedReadError, strict=True,
                   reason="the kernel transposes a tile of which it wrote only columns 0, 16, ..., 112 "
                          "(nonzero_with_count then reads only those lanes); harmless garbage on "
                          "hardware, but our simulator rejects every read of never-written memory")
@pytest.mark.parametrize("dtype", [np.int32, np.float32])
def test_library_find_nonzero_indices(dtype):
    kernel = _library_module("core.subkernels.find_nonzero_indices").find_nonzero_indices
    ref = _library_module("core.subkernels.find_nonzero_indices_torch").find_nonzero_indices_torch_ref
    x = _sparse_columns(1024, 32, 4, dtype)
    indices, counts = _run(kernel, lnc=2, input_tensor=x, chunk_size=1024)
    expected = _torch_ref(ref, input_tensor=x)
    np.testing.assert_array_equal(indices, expected["indices"])
    np.testing.assert_array_equal(counts.reshape(-1), expected["nonzero_counts"])


@pytest.mark.parametrize("lnc,batch,seqlen,hidden", [(1, 1, 8, 2048), (2, 2, 8, 3072)])
def test_library_rmsnorm_tkg(lnc, batch, seqlen, hidden):
    kernel = _library_module("core.subkernels.rmsnorm_tkg").rmsnorm_tkg
    refs = _library_module("core.subkernels.rmsnorm_torch")
    rng = np.random.default_rng(6)
    x = rng.standard_normal((batch, seqlen, hidden)).astype(np.float16)
    gamma = rng.standard_normal((1, hidden)).astype(np.float16)
    out = np.zeros((128, batch * seqlen, hidden // 128), np.float16)
    result = _run(kernel, lnc=lnc, input=x, gamma=gamma, output=out)
    ref = refs.rmsnorm_tkg_torch_ref if lnc == 2 else refs.rmsnorm_tkg_torch_ref_lnc1
    expected = _torch_ref(ref, input=x, gamma=gamma, output=out.copy())["out"]
    _close(result, expected, 2e-2, 1e-5)
    _close(out, expected, 2e-2, 1e-5, "the output argument is updated in place")


@pytest.mark.parametrize("lnc,batch,seqlen,hidden", [(1, 1, 8, 2048), (2, 2, 8, 3072)])
def test_library_layernorm_tkg(lnc, batch, seqlen, hidden):
    kernel = _library_module("core.subkernels.layernorm_tkg").layernorm_tkg
    refs = _library_module("core.subkernels.layernorm_torch")
    rng = np.random.default_rng(7)
    x = rng.standard_normal((batch, seqlen, hidden)).astype(np.float16)
    gamma = rng.standard_normal((1, hidden)).astype(np.float16)
    beta = rng.standard_normal((1, hidden)).astype(np.float16)
    out = np.zeros((128, batch * seqlen, hidden // 128), np.float16)
    result = _run(kernel, lnc=lnc, input=x, gamma=gamma, output=out, beta=beta)
    ref = refs.layernorm_tkg_torch_ref if lnc == 2 else refs.layernorm_tkg_torch_ref_lnc1
    expected = _torch_ref(ref, input=x, gamma=gamma, output=out.copy(), beta=beta)["out"]
    _close(result, expected, 2e-2, 2e-3)     # fp16 output; outputs near 0 come from cancellation


@pytest.mark.parametrize("contiguous", [True, False])
def test_library_rope(contiguous):
    kernel = _library_module("core.embeddings.rope").RoPE
    ref = _library_module("core.embeddings.rope_torch").rope_torch_ref
    rng = np.random.default_rng(8)
    d_head, b, heads, s = 128, 1, 2, 64
    x = rng.standard_normal((d_head, b, heads, s)).astype(np.float32)
    cos = rng.standard_normal((d_head // 2, b, s)).astype(np.float32)
    sin = rng.standard_normal((d_head // 2, b, s)).astype(np.float32)
    out = _run(kernel, lnc=2, x_in=x, cos=cos, sin=sin, lnc_shard=True, contiguous_layout=contiguous)
    expected = _torch_ref(ref, x_in=x, cos=cos, sin=sin, lnc_shard=True, contiguous_layout=contiguous)
    _close(out, expected["x_out"], 1e-4, 1e-4)


@pytest.mark.parametrize("lnc", [1, 2])
def test_library_cascaded_max(lnc):
    kernel = _library_module("core.max.cascaded_max").cascaded_max
    ref = _library_module("core.max.cascaded_max_torch").cascaded_max_torch_ref
    x = np.random.default_rng(9).standard_normal((2, 1, 4096)).astype(np.float32)
    values, indices = _run(kernel, lnc=lnc, input_tensor=x)
    expected = _torch_ref(ref, input_tensor=x)
    _close(values, expected["max_values"], 0, 0)
    np.testing.assert_array_equal(indices, expected["max_indices"])


def test_library_indexed_flatten():
    kernel = _library_module("core.subkernels.indexed_flatten").indexed_flatten
    ref = _library_module("core.subkernels.indexed_flatten_torch").indexed_flatten_torch_ref
    t, e, f_len = 4096, 2, 128
    x = np.arange(e * t, dtype=np.int32).reshape(e, t)
    offsets = np.array([0, 1024], np.int32)
    kwargs = dict(f_len=f_len, output_len=4096, padding_val=-1)
    out = _run(kernel, lnc=2, input_tensor=x, row_offsets=offsets, **kwargs)
    expected = _torch_ref(ref, input_tensor=x, row_offsets=offsets, **kwargs)["flattened_array"]
    np.testing.assert_array_equal(out, expected)


def test_library_dynamic_elementwise_add():
    kernel = _library_module("experimental.dynamic_shapes.dynamic_elementwise_add").dynamic_elementwise_add
    import ml_dtypes
    rng = np.random.default_rng(10)
    a = rng.standard_normal((512, 512)).astype(ml_dtypes.bfloat16)
    b = rng.standard_normal((512, 512)).astype(ml_dtypes.bfloat16)
    tiles = np.array([[512 // 128]], np.int32)          # the runtime tile count, as the library's test
    out = _run(kernel, input_a=a, input_b=b, num_m_tiles=tiles)
    expected = (a.astype(np.float32) + b.astype(np.float32)).astype(ml_dtypes.bfloat16)
    _close(out, expected, 0, 0)


@pytest.mark.parametrize("dtype", [np.float32, "bfloat16"])
def test_library_rope_hf(dtype):
    kernel = _library_module("core.embeddings.rope_hf").rope_hf
    ref = _library_module("core.embeddings.rope_hf_torch").rope_hf_torch_ref
    import ml_dtypes
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype
    rng = np.random.default_rng(12)
    b, qh, kvh, s, d = 1, 4, 2, 256, 64
    q = rng.standard_normal((b, qh, s, d)).astype(np_dtype)
    k = rng.standard_normal((b, kvh, s, d)).astype(np_dtype)
    angles = rng.uniform(0, 6.3, (b, s, d // 2))
    cos = np.cos(np.concatenate([angles, angles], -1)).astype(np_dtype)
    sin = np.sin(np.concatenate([angles, angles], -1)).astype(np_dtype)
    q_out, k_out = np.zeros_like(q), np.zeros_like(k)
    got_q, got_k = _run(kernel, lnc=2, q=q, k=k, q_out=q_out, k_out=k_out, cos=cos, sin=sin)
    expected = _torch_ref(ref, q=q.astype(np.float32), k=k.astype(np.float32), q_out=q_out.astype(np.float32),
                          k_out=k_out.astype(np.float32), cos=cos.astype(np.float32), sin=sin.astype(np.float32))
    tol = 2e-2 if dtype == "bfloat16" else 1e-5
    _close(got_q, expected["q_out"], tol, tol)
    _close(got_k, expected["k_out"], tol, tol)
    _close(q_out, expected["q_out"], tol, tol, "q_out is updated in place")


def test_library_cross_entropy_forward():
    kernel = _library_module("experimental.loss.cross_entropy").cross_entropy_forward
    ref = _library_module("experimental.loss.cross_entropy_torch").cross_entropy_forward_torch_ref
    import ml_dtypes
    rng = np.random.default_rng(13)
    positions, vocab = 128, 4096
    logits = rng.standard_normal((positions, vocab)).astype(ml_dtypes.bfloat16)
    targets = rng.integers(0, vocab, positions).astype(np.int32)
    loss, lse = _run(kernel, logits_hbm=logits, targets_hbm=targets, positions_per_batch=64,
                     chunk_size=4096, dtype=sim.language.bfloat16)
    expected = _torch_ref(ref, logits=logits.astype(np.float32), targets=targets.astype(np.int64))
    _close(loss, expected["output_0"], 2e-2, 2e-2)
    _close(lse, expected["output_1"], 2e-2, 2e-2)


@pytest.mark.parametrize("width,kernel_size,stride,pad", [(512, 64, (1, 1), ((0, 0), (0, 0))),
                                                         (512, 7, (1, 2), ((0, 0), (5, 5)))])
def test_library_depthwise_conv1d(width, kernel_size, stride, pad):
    kernel = _library_module("experimental.conv.depthwise_conv1d").depthwise_conv1d_implicit_gemm
    torch = pytest.importorskip("torch")
    import ml_dtypes
    rng = np.random.default_rng(14)
    channels = 16
    img = rng.standard_normal((1, channels, 1, width)).astype(ml_dtypes.bfloat16)
    filt = rng.standard_normal((channels, 1, 1, kernel_size)).astype(ml_dtypes.bfloat16)
    out = _run(kernel, lnc=2, img_ref=img, filter_ref=filt, padding=pad, stride=stride, rhs_dilation=(1, 1),
               lhs_dilation=(1, 1), feature_group_count=channels, batch_group_count=1)
    # The library test's golden: torch depthwise conv2d.
    expected = torch.nn.functional.conv2d(torch.from_numpy(img.astype(np.float32)),
                                          torch.from_numpy(filt.astype(np.float32)), stride=stride,
                                          padding=(0, pad[1][0]), groups=channels).numpy()
    _close(out, expected, 2e-2, 5e-2)


@pytest.mark.parametrize("case", [(1, 16, 32, 20, 3, 1, 0, 0, 1, False, None),
                                  (2, 64, 128, 40, 5, 2, 2, 2, 2, True, "GELU")])
def test_library_conv1d(case):
    kernel = _library_module("experimental.conv.conv1d").conv1d
    ref = _library_module("experimental.conv.conv1d_torch").conv1d_torch_ref
    act_type = _library_module("core.utils.common_types").ActFnType
    batch, c_in, c_out, length, k, stride, pad_l, pad_r, dilation, use_bias, act = case
    rng = np.random.default_rng(15)
    x = rng.standard_normal((batch, c_in, length)).astype(np.float32)
    filters = (rng.standard_normal((k, c_in, c_out)) / np.sqrt(k * c_in)).astype(np.float32)
    bias = rng.standard_normal((c_out,)).astype(np.float32) if use_bias else None
    kwargs = dict(stride=stride, padding=(pad_l, pad_r), dilation=dilation,
                  activation_fn=None if act is None else getattr(act_type, act), lnc_shard=False)
    out = _run(kernel, x_in=x, filters=filters, bias=bias, **kwargs)
    expected = _torch_ref(ref, x_in=x, filters=filters, bias=bias, **kwargs)
    _close(out, next(iter(expected.values())), 1e-3, 1e-3)


def test_sdk_index_and_layout_examples():
    rng = np.random.default_rng(16)
    split = _sdk_file("examples/index-case-1.py")
    x = rng.standard_normal((4, 5)).astype(np.float32)
    even, odd = _run(split.tensor_split_kernel_, in_tensor=x)
    _close(even, x[:, 0::2], 0, 0)
    _close(odd, x[:, 1::2], 0, 0)
    exp_pass = _sdk_file("examples/layout-pass.py")
    y = rng.standard_normal((128, 512)).astype(np.float32)
    _close(_run(exp_pass.tensor_exp_kernel_, in_tensor=y), np.exp(y), 1e-5, 1e-6)


@pytest.mark.parametrize("lnc,batch,vocab,k", [(1, 8, 3168, 8), (2, 16, 8192, 64)])
def test_library_rotational_topk(lnc, batch, vocab, k):
    pytest.importorskip("scipy", reason="the NKI Library's top-k host configuration imports scipy")
    topk = _library_module("core.topk.rotational_topk")
    utils = _library_module("core.topk.rotational_topk_utils")
    ref = _library_module("core.topk.torch_ref").topk_torch_ref
    x = np.random.default_rng(17).standard_normal((batch, vocab)).astype(np.float32)
    # The configuration is built on the host, as the library's test does.
    topk_config = utils.create_topk_config(inp_shape=(batch, 1, vocab), inp_dtype=sim.language.float32, k=k,
                                           sorted=True, num_programs=lnc)
    config = utils.create_rotational_topk_config(inp_shape=x.shape, topk_config=topk_config)
    config = topk.prepare_rotational_constants(config)
    values, indices = _run(topk.rotational_topk, lnc=lnc, inp=x, config=config)
    expected = _torch_ref(ref, inp=x, config=config)
    _close(values, expected["topk_values"], 1e-3, 1e-5)
    # Indices may differ on ties; they must point at the returned values.
    np.testing.assert_array_equal(np.take_along_axis(x, indices.astype(np.int64), axis=1), values)


@pytest.mark.parametrize("lnc,batch,heads,s_tkg,h,bias,transpose_out",
                         [(1, 4, 2, 1, 1024, True, False), (2, 16, 8, 1, 3072, False, True)])
def test_library_output_projection_tkg(lnc, batch, heads, s_tkg, h, bias, transpose_out):
    kernel = _library_module("core.output_projection.output_projection_tkg").output_projection_tkg
    ref = _library_module("core.output_projection.output_projection_tkg_torch").output_projection_tkg_torch_ref
    quant = _library_module("core.utils.common_types").QuantizationType
    import ml_dtypes
    rng = np.random.default_rng(18)
    d_head = 128
    attention = rng.standard_normal((d_head, batch, heads, s_tkg)).astype(ml_dtypes.bfloat16)
    weight = (rng.standard_normal((d_head * heads, h)) / np.sqrt(d_head * heads)).astype(ml_dtypes.bfloat16)
    b = rng.standard_normal((1, h)).astype(ml_dtypes.bfloat16) if bias else None
    kwargs = dict(quantization_type=quant.NONE, weight_scale=None, input_scale=None,
                  TRANSPOSE_OUT=transpose_out, OUT_IN_SB=False)
    # With TRANSPOSE_OUT the kernel packs several token groups into one PSUM bank, each starting
    # with accumulate=None: AWS's own kernel relies on the per-element reading of "first write".
    lenient = ("psum-accumulate-per-bank",) if transpose_out else None
    out = _run(kernel, lnc=lnc, lenient=lenient, attention=attention, weight=weight, bias=b, **kwargs)
    f32 = (lambda a: None if a is None else a.astype(np.float32))
    expected = _torch_ref(ref, attention=f32(attention), weight=f32(weight), bias=f32(b), **kwargs)
    _close(out, next(iter(expected.values())), 2e-2, 2e-2)


@pytest.mark.parametrize("quantized", ["float8_e4m3fn", "float4_e2m1fn"])
def test_sdk_mx_matmul_needs_trn3(quantized):
    """The MX deep-dive kernel: the packed x4 views and scale loads run; its nc_matmul_mx is a
    NeuronCore-v4 (trn3) instruction, which the Trainium2 simulator refuses by name."""
    folder = _checkout(SDK_ENV, "nki/examples") / "nki" / "deep-dives" / "src" / "mxfp-matmul"
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    mx = _sdk_file("deep-dives/src/mxfp-matmul/mx_kernels.py")
    cpu = importlib.import_module("mx_cpu_utils")
    import ml_dtypes
    dtype = getattr(ml_dtypes, quantized)
    x4 = {"float8_e4m3fn": sim.language.float8_e4m3fn_x4, "float4_e2m1fn": sim.language.float4_e2m1fn_x4}[quantized]
    _, _, st_data, st_scale = cpu.generate_stabilized_mx_data(dtype, (128, 128 * 4))
    _, _, mv_data, mv_scale = cpu.generate_stabilized_mx_data(dtype, (128, 512 * 4))
    with pytest.raises(sim.UnsupportedError, match="nc_matmul_mx is available only on NeuronCore-v4"):
        _run(mx.kernel_offline_quantized_mx_matmul, stationary_mx_data=st_data, stationary_mx_scale=st_scale,
             moving_mx_data=mv_data, moving_mx_scale=mv_scale, mx_dtype=x4)


@pytest.mark.parametrize("module,error,reason", [
    ("core.qkv.qkv", TypeError,
     "decorated @nki.jit(debug_kernel=..., show_compiler_tb=..., experimental_flags=...): keywords the "
     "NKI docs do not list, which the simulator rejects"),
    ("core.router_topk.router_topk", ModuleNotFoundError,
     "imports neuronxcc.nki.typing, the legacy (pre-0.3) package, not the current nki dialect"),
])
def test_library_kernels_outside_the_documented_surface(module, error, reason):
    """Library kernels that cannot run on a simulator of the documented NKI 0.6 surface."""
    with pytest.raises(error):
        _library_module(module)
