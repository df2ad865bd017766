"""Self-checks of the basic kernels at the full MiMo shapes: RMSNorm (alone and
fused with the residual add), partial RoPE, token embedding, the linear projections (q, k, v, o,
lm_head; bf16 and FP8 block-scaled), the dense SwiGLU MLP, and the fused kernels of the decoder
layer: input norm + q|k|v + RoPE, o_proj + residual add + post-attention norm (kernels/rmsnorm.py,
rope.py, embedding.py, linear.py, dense_mlp.py, norm_qkv_rope.py, linear_add_rmsnorm.py).

Error measure: max |kernel - reference| / max |reference|, the reference (mimo_v2_flash.reference)
in fp32 on the same bf16-rounded inputs and, for FP8, on the exactly dequantised weights.
Tolerances: 1e-2 (bf16 outputs), 5e-3 for RoPE (its only error is the output rounding, <= 2^-8;
tight enough to catch fp32 angles at position ~262k), 0 for the embedding gather (bit copy).

Roofline (stricter than the simulator report's, which counts the bytes the kernel really moves,
re-reads included): the problem's own FLOPs and bytes on one NeuronCore-v3, max(FLOPs / 79 TFLOPS,
bytes / 362.5 GB/s). Bytes = inputs read once + outputs written once (RoPE: x in and out, not the
cos/sin table; dense MLP: x, the three weights, y, not the h scratch). FP8 weights still multiply
bf16 activations, so their FLOPs count at the bf16 rate.

The shape tables, problem builders and `run_*` functions are shared with the kernels' tests
(tests/test_kernel_*.py) and benchmarks (benchmarks/kernels/bench_*.py); `zeros=True` builds the
benchmarks' zero-valued inputs (the cost model does not depend on values).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from mimo_kernels.dense_mlp import dense_mlp
from mimo_kernels.embedding import embed
from mimo_kernels.launch import to_host
from mimo_kernels.linear import linear
from mimo_kernels.linear_add_rmsnorm import linear_add_rmsnorm
from mimo_kernels.norm_qkv_rope import norm_qkv_rope
from mimo_kernels.rmsnorm import add_rmsnorm, rmsnorm
from mimo_kernels.rope import rope
from mimo_kernels.trn2 import TRN2
from .. import reference as ref
from ..fp8 import TRAINIUM_E4M3, dequantize, quantize_blocks
from . import CheckResult, relative_error

TOPIC = "kernels_basic"
BF16 = np.dtype(ml_dtypes.bfloat16)
FP8 = np.dtype(ml_dtypes.float8_e4m3)
HIDDEN, HEADS, HEAD_DIM, ROTARY, VOCAB, DENSE_INTER = 4096, 64, 192, 64, 152576, 16384
MAX_POSITION = 262144
EPS = 1e-5
THETA = {"full": 5e6, "swa": 1e4}
# q and k alone, and q | k side by side (the heads the fused norm_qkv_rope kernel rotates).
ROPE_HEADS = {"q": HEADS, "k_full": 4, "k_swa": 8, "qk_full": HEADS + 4, "qk_swa": HEADS + 8}
# (in, out) of every projection the kernels serve; o_proj and lm_head are bf16 in the checkpoint.
# qkv_*: q | k | v concatenated, the projection inside NkiOps.norm_qkv_rope's one launch.
PROJECTIONS = {"q": (4096, 12288), "k_full": (4096, 768), "k_swa": (4096, 1536),
               "v_full": (4096, 512), "v_swa": (4096, 1024), "qkv_full": (4096, 12288 + 768 + 512),
               "qkv_swa": (4096, 12288 + 1536 + 1024), "o": (8192, 4096), "lm_head": (4096, VOCAB)}
FP8_PROJECTIONS = ("q", "k_full", "k_swa", "v_full", "v_swa", "qkv_full", "qkv_swa")
TOL = {"bf16": 1e-2, "rope": 5e-3, "embedding": 0.0}
KV_HEADS = {"full": 4, "swa": 8}
PEAK_BF16, HBM_BYTES_PER_S = TRN2.peak_flops_bf16, TRN2.hbm_bytes_per_s_core


# ----------------------------------------------------------------------- problem builders

def roofline(flops, hbm_bytes):
    """(roofline seconds, bound) of a problem on one NeuronCore-v3."""
    compute, memory = flops / PEAK_BF16, hbm_bytes / HBM_BYTES_PER_S
    return max(compute, memory), ("tensor" if compute > memory else "hbm")


def activations(tokens, features, seed, zeros=False):
    if zeros:
        return np.zeros((tokens, features), BF16)
    return np.random.default_rng(seed).standard_normal((tokens, features), dtype=np.float32).astype(BF16)


def patterned_table(vocab, hidden):
    """A finite bf16 table whose rows all differ (columns 0, 1 encode the row id in 14-bit pieces),
    built in uint16 without fp32 temporaries (the MiMo table is 1.25 GB)."""
    rows = np.arange(vocab, dtype=np.uint32)
    bits = rows.astype(np.uint16)[:, None] * np.uint16(40503) + \
        np.arange(hidden, dtype=np.uint16)[None, :] * np.uint16(769)
    bits &= np.uint16(0x3FFF)                     # exponent field < 0xFF: no inf / NaN patterns
    bits[:, 0] = rows & 0x3FFF
    bits[:, 1] = rows >> 14
    return bits.view(BF16)


def rolled_weight(k, n, seed):
    """A bf16 [k, n] weight made of row-rolled copies of one random [k, k] block: cheap at lm_head
    size (1.25 GB), and every k-column slice differs."""
    base = (np.random.default_rng(seed).standard_normal((k, k), dtype=np.float32) / np.float32(64)).astype(BF16)
    w = np.empty((k, n), BF16)
    for j, c0 in enumerate(range(0, n, k)):
        c1 = min(n, c0 + k)
        w[:, c0:c1] = np.roll(base, j, axis=0)[:, :c1 - c0]
    return w


def prepared_weight(k, n, dtype, seed, zeros=False):
    """(kernel-layout weight [k, n], scale or None, exact fp32 [k, n] for the reference or None)."""
    if zeros:
        if dtype == "bf16":
            return np.zeros((k, n), BF16), None, None
        return np.zeros((k, n), FP8), np.ones((k // 128, n // 128), np.float32), None
    w = np.random.default_rng(seed).standard_normal((k, n), dtype=np.float32) * np.float32(k ** -0.5)
    return kernel_layout(w, dtype)


def kernel_layout(w, dtype):
    """(kernel weight, scale or None, the exact fp32 values it holds) of a float32 [in, out] weight:
    bf16, or Trainium FP8 with 128x128 block scales (`dtype` "bf16" or "fp8")."""
    if dtype == "bf16":
        w = w.astype(BF16)
        return w, None, w.astype(np.float32)
    q, scale = quantize_blocks(w, TRAINIUM_E4M3)
    return q, scale, dequantize(q, scale)


# ----------------------------------------------------------------------- one run per kernel
# Each returns (output, report, reference or None, flops, hbm_bytes, shapes).

def run_rmsnorm(tokens, fused, zeros=False):
    x, delta = activations(tokens, HIDDEN, 1, zeros), activations(tokens, HIDDEN, 2, zeros)
    w = np.ones(HIDDEN, BF16) if zeros else (1 + 0.1 * activations(1, HIDDEN, 3)[0].astype(np.float32)).astype(BF16)
    tensors = 4 if fused else 2
    hbm = tensors * tokens * HIDDEN * 2 + HIDDEN * 2
    if fused:
        (total, y), rep = to_host(add_rmsnorm(x, delta, w, EPS, report=True))
        s = (x.astype(np.float32) + delta.astype(np.float32)).astype(BF16).astype(np.float32)
    else:
        y, rep = to_host(rmsnorm(x, w, EPS, report=True))
        s = x.astype(np.float32)
    want = None if zeros else ref.rmsnorm(s, w.astype(np.float32), EPS)
    return y, rep, want, 0, hbm, f"H={HIDDEN} bf16"


def run_rope(tokens, which, theta, zeros=False):
    heads = ROPE_HEADS[which]
    x = activations(tokens, heads * HEAD_DIM, 4, zeros).reshape(tokens, heads, HEAD_DIM)
    positions = (np.zeros(tokens, np.int64) if zeros else
                 np.random.default_rng(5).integers(MAX_POSITION - 70000, MAX_POSITION, tokens))
    out, rep = to_host(rope(x, positions, theta, ROTARY, report=True))
    want = None if zeros else ref.apply_partial_rope(x.astype(np.float32), positions, ROTARY, theta)
    hbm = 2 * x.size * 2 + tokens * 4
    return out, rep, want, 0, hbm, f"{heads}x{HEAD_DIM} rot {ROTARY} theta {theta:g}"


def run_embedding(tokens, table):
    ids = np.random.default_rng(6).integers(0, VOCAB, tokens)
    ids[0] = VOCAB - 1
    out, rep = to_host(embed(ids, table, report=True))
    return out, rep, table[ids].astype(np.float32), 0, 2 * tokens * HIDDEN * 2 + tokens * 4, \
        f"V={VOCAB} H={HIDDEN} bf16"


def run_linear(tokens, name, dtype, zeros=False, weight=None):
    k, n = PROJECTIONS[name]
    w, scale, exact = weight or prepared_weight(k, n, dtype, seed=7, zeros=zeros)
    x = activations(tokens, k, 8, zeros)
    y, rep = to_host(linear(x, w, scale, report=True))
    want = None if exact is None else x.astype(np.float32) @ exact
    hbm = tokens * (k + n) * 2 + w.nbytes + (0 if scale is None else scale.nbytes)
    return y, rep, want, 2 * tokens * k * n, hbm, f"{k}->{n} {dtype}"


def run_dense_mlp(tokens, dtype, zeros=False, weights=None):
    weights = weights or [prepared_weight(a, b, dtype, seed=9 + i, zeros=zeros)
                          for i, (a, b) in enumerate(((HIDDEN, DENSE_INTER),) * 2 + ((DENSE_INTER, HIDDEN),))]
    x = activations(tokens, HIDDEN, 10, zeros)
    scales = None if dtype == "bf16" else [s for _, s, _ in weights]
    y, rep = to_host(dense_mlp(x, *(w for w, _, _ in weights), scales=scales, report=True))
    exact = [e for _, _, e in weights]
    want = None if zeros or exact[0] is None else ref.swiglu(x.astype(np.float32), *(e.T for e in exact))
    hbm = 2 * tokens * HIDDEN * 2 + sum(w.nbytes + (0 if s is None else s.nbytes) for w, s, _ in weights)
    return y, rep, want, 6 * tokens * HIDDEN * DENSE_INTER, hbm, f"{HIDDEN}->{DENSE_INTER}->{HIDDEN} {dtype}"


def run_norm_qkv_rope(tokens, kind, dtype, zeros=False, weight=None):
    """The decoder layer's input norm + fused q|k|v projection + RoPE of q and k (one launch)."""
    kv = KV_HEADS[kind]
    k, n = PROJECTIONS[f"qkv_{kind}"]
    w, scale, exact = weight or prepared_weight(k, n, dtype, seed=12, zeros=zeros)
    x = activations(tokens, k, 13, zeros)
    norm = np.ones(k, BF16)
    positions = (np.zeros(tokens, np.int64) if zeros else
                 np.random.default_rng(14).integers(MAX_POSITION - 70000, MAX_POSITION, tokens))
    (q, kk, v), rep = to_host(norm_qkv_rope(x, norm, w, positions, THETA[kind], (HEADS, kv), HEAD_DIM, ROTARY,
                                            scale=scale, eps=EPS, report=True))
    out = np.concatenate([q.reshape(tokens, -1), kk.reshape(tokens, -1), v], axis=1)
    want = None
    if exact is not None:
        y = ref.rmsnorm(x.astype(np.float32), norm.astype(np.float32), EPS) @ exact
        qk = ref.apply_partial_rope(y[:, :(HEADS + kv) * HEAD_DIM].reshape(tokens, HEADS + kv, HEAD_DIM),
                                    positions, ROTARY, THETA[kind])
        want = np.concatenate([qk.reshape(tokens, -1), y[:, (HEADS + kv) * HEAD_DIM:]], axis=1)
    hbm = tokens * (k + n) * 2 + w.nbytes + (0 if scale is None else scale.nbytes) + k * 2
    return out, rep, want, 2 * tokens * k * n, hbm, f"{k}->{n} {dtype} norm+rope"


def run_linear_add_rmsnorm(tokens, zeros=False, weight=None):
    """o_proj (bf16 on the Hub) + residual add + post-attention norm (one launch)."""
    k, n = PROJECTIONS["o"]
    w, _, exact = weight or prepared_weight(k, n, "bf16", seed=15, zeros=zeros)
    a, residual = activations(tokens, k, 16, zeros), activations(tokens, n, 17, zeros)
    norm = np.ones(n, BF16)
    (total, y), rep = to_host(linear_add_rmsnorm(a, w, residual, norm, eps=EPS, report=True))
    want = None
    if exact is not None:
        s = (residual.astype(np.float32) + (a.astype(np.float32) @ exact).astype(BF16)).astype(BF16)
        want = ref.rmsnorm(s.astype(np.float32), norm.astype(np.float32), EPS)
    hbm = tokens * (k + 3 * n) * 2 + w.nbytes + n * 2
    return y, rep, want, 2 * tokens * k * n, hbm, f"{k}->{n} bf16 +res+norm"


# ----------------------------------------------------------------------- checks

def _result(name, tokens, tolerance, run):
    out, rep, want, flops, hbm, shapes = run
    err = relative_error(out, want)
    roof, _ = roofline(flops, hbm)
    return CheckResult(TOPIC, name, f"T={tokens} {shapes}", err, tolerance, err <= tolerance,
                       rep.estimated_time_s * 1e6, roof * 1e6)


def checks(quick: bool):
    yield _result("rmsnorm", 129, TOL["bf16"], run_rmsnorm(129, fused=False))
    yield _result("add_rmsnorm", 129, TOL["bf16"], run_rmsnorm(129, fused=True))
    yield _result("rope q", 129, TOL["rope"], run_rope(129, "q", THETA["full"]))
    yield _result("rope k (8 KV heads)", 129, TOL["rope"], run_rope(129, "k_swa", THETA["swa"]))
    if not quick:
        yield _result("rope k (4 KV heads)", 7, TOL["rope"], run_rope(7, "k_full", THETA["full"]))
    yield _result("embedding", 129, TOL["embedding"], run_embedding(129, patterned_table(VOCAB, HIDDEN)))
    yield _result("linear q bf16", 1, TOL["bf16"], run_linear(1, "q", "bf16"))
    yield _result("linear q fp8", 1, TOL["bf16"], run_linear(1, "q", "fp8"))
    yield _result("linear o bf16", 129, TOL["bf16"], run_linear(129, "o", "bf16"))
    yield _result("linear v (8 KV) bf16", 64, TOL["bf16"], run_linear(64, "v_swa", "bf16"))
    if not quick:
        yield _result("linear k (4 KV) fp8", 129, TOL["bf16"], run_linear(129, "k_full", "fp8"))
    lm_head = (rolled_weight(HIDDEN, VOCAB, seed=11), None, None)
    y, rep, _, flops, hbm, shapes = run_linear(1, "lm_head", "bf16", weight=lm_head)
    x = activations(1, HIDDEN, 8).astype(np.float32)
    err = max(relative_error(y[:, c:c + 16384], x @ lm_head[0][:, c:c + 16384].astype(np.float32))
              for c in range(0, VOCAB, 16384))
    yield CheckResult(TOPIC, "linear lm_head bf16", f"T=1 {shapes}", err, TOL["bf16"], err <= TOL["bf16"],
                      rep.estimated_time_s * 1e6, roofline(flops, hbm)[0] * 1e6)
    del lm_head
    for dtype in ("bf16", "fp8"):
        yield _result(f"dense_mlp {dtype}", 1, TOL["bf16"], run_dense_mlp(1, dtype))
    yield _result("norm_qkv_rope swa fp8", 1, TOL["bf16"], run_norm_qkv_rope(1, "swa", "fp8"))
    if not quick:
        yield _result("norm_qkv_rope full bf16", 129, TOL["bf16"], run_norm_qkv_rope(129, "full", "bf16"))
    yield _result("linear_add_rmsnorm o bf16", 1, TOL["bf16"], run_linear_add_rmsnorm(1))
