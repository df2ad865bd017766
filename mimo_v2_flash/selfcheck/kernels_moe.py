"""Self-checks of the MoE kernels: the sigmoid top-8 router and the grouped
expert FFN (kernels/router.py, kernels/expert_ffn.py), at the full MiMo shapes.

Error measures: router, the chosen expert sets must equal the reference's (rows whose 8th and 9th
selection values are within 1e-5 excepted), and max |weight error| <= 1e-6 after aligning by id;
expert FFN, max |out - reference| / max |reference| <= 1e-2 (bf16 weights) or 2e-2 (FP8 weights,
also rounded to bf16 on chip), the reference in fp32 on the bf16 x and the exact weights.

Roofline (stricter than the simulator report's, which counts the bytes the kernel moves): the
problem's own FLOPs and bytes. Router: 2*T*H*E fp32 FLOPs at the fp32 TensorE rate (19.75 TFLOPS
per core), bytes = router weight + x + outputs. Expert FFN: 6*H*I FLOPs per row at the bf16 rate
(79 TFLOPS; FP8 weights still multiply bf16 activations), bytes = each routed expert's weights
once + x + out; one NeuronCore-v3 (362.5 GB/s of HBM).

The problem builders and rooflines are shared with tests/test_kernel_router.py,
tests/test_kernel_expert_ffn.py and benchmarks/kernels/bench_router.py, bench_expert_ffn.py.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from mimo_kernels.expert_ffn import ExpertWeights, expert_ffn
from mimo_kernels.launch import to_host
from mimo_kernels.router import route
from mimo_kernels.trn2 import TRN2
from .. import reference as ref
from ..fp8 import TRAINIUM_E4M3, dequantize, quantize_blocks
from . import CheckResult, relative_error

TOPIC = "kernels_moe"
BF16 = np.dtype(ml_dtypes.bfloat16)
HIDDEN, INTER, EXPERTS, TOP_K = 4096, 2048, 256, 8
LOCAL_EXPERTS = 8                        # 256 experts over 32 expert-parallel ranks
FFN_TOL = {"bf16": 1e-2, "fp8": 2e-2}
ROUTER_NEAR_TIE, ROUTER_WEIGHT_TOL = 1e-5, 1e-6
PEAK_FP32, PEAK_BF16, HBM_BYTES_PER_S = TRN2.peak_flops_fp32, TRN2.peak_flops_bf16, TRN2.hbm_bytes_per_s_core


# ----------------------------------------------------------------------- problems (shared with tests)

def random_experts(experts, hidden, inter, dtype, seed=0) -> ExpertWeights:
    """Random local experts in the kernel layout [in, out]: bf16, or Trainium FP8 + block scales."""
    rng = np.random.default_rng(seed)
    mats = {"gate": [], "up": [], "down": []}
    scales = {"gate": [], "up": [], "down": []}
    for _ in range(experts):
        for name, (rows, cols) in (("gate", (hidden, inter)), ("up", (hidden, inter)),
                                   ("down", (inter, hidden))):
            m = rng.standard_normal((rows, cols), dtype=np.float32) / np.float32(np.sqrt(rows))
            if dtype == "bf16":
                mats[name].append(m.astype(BF16))
            else:
                q, s = quantize_blocks(m, TRAINIUM_E4M3)
                mats[name].append(q)
                scales[name].append(s)
    stacked = [np.stack(mats[k]) for k in ("gate", "up", "down")]
    if dtype == "bf16":
        return ExpertWeights(*stacked)
    return ExpertWeights(*stacked, *(np.stack(scales[k]) for k in ("gate", "up", "down")))


def reference_expert(weights: ExpertWeights):
    """expert e -> Hub-layout fp32 (gate [I, H], up [I, H], down [H, I]) of the kernel's weights."""
    def expert(e):
        if weights.fp8:
            mats = (dequantize(weights.gate[e], weights.gate_scale[e]),
                    dequantize(weights.up[e], weights.up_scale[e]),
                    dequantize(weights.down[e], weights.down_scale[e]))
        else:
            mats = tuple(m[e].astype(np.float32) for m in (weights.gate, weights.up, weights.down))
        return tuple(m.T for m in mats)
    return expert


def random_routing(tokens, k, experts, seed, empty=()):
    """Each token picks k distinct local experts (never those in `empty`), weights in [0.05, 0.3]."""
    rng = np.random.default_rng(seed)
    pool = [e for e in range(experts) if e not in empty]
    ids = np.stack([rng.choice(pool, size=k, replace=False) for _ in range(tokens)])
    return ids, rng.uniform(0.05, 0.3, size=ids.shape).astype(np.float32)


def reference_moe(x, ids, routing_weights, weights: ExpertWeights):
    """reference.moe on the bf16-rounded x; empty slots (-1) go to expert 0 with weight 0."""
    xr = np.asarray(x, np.float32).astype(BF16).astype(np.float32)
    return ref.moe(xr, np.where(ids < 0, 0, ids), np.where(ids < 0, 0, routing_weights),
                   reference_expert(weights))


def random_router(tokens, hidden, experts, seed):
    """x [T, H], Hub-layout gate [E, H] and correction bias [E], fp32."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, hidden)).astype(np.float32)
    gate = (rng.standard_normal((experts, hidden)) / np.sqrt(hidden)).astype(np.float32)
    return x, gate, (0.1 * rng.standard_normal(experts)).astype(np.float32)


# ----------------------------------------------------------------------- rooflines

def router_roofline_s(tokens, hidden=HIDDEN, experts=EXPERTS):
    flops = 2 * tokens * hidden * experts
    hbm = 4 * (hidden * experts + tokens * hidden + experts) + tokens * TOP_K * 8
    return max(flops / PEAK_FP32, hbm / HBM_BYTES_PER_S), flops, hbm


def ffn_roofline_s(rows, tokens, routed_experts, weight_itemsize, hidden=HIDDEN, inter=INTER):
    flops = 6 * hidden * inter * rows
    hbm = routed_experts * 3 * hidden * inter * weight_itemsize + tokens * hidden * (2 + 4) + rows * 8
    return max(flops / PEAK_BF16, hbm / HBM_BYTES_PER_S), flops, hbm


# ----------------------------------------------------------------------- checks

def _router_check(tokens):
    x, gate, bias = random_router(tokens, HIDDEN, EXPERTS, seed=tokens)
    ids, weights, rep = to_host(route(x, gate.T, bias, report=True))
    want_ids, want_w = ref.router(x, gate, bias, TOP_K)
    choice = -np.sort(-(ref.router_scores(x, gate) + bias), axis=1)
    clear = choice[:, 7] - choice[:, 8] > ROUTER_NEAR_TIE
    order, want_order = np.argsort(ids, 1), np.argsort(want_ids, 1)
    same = (np.take_along_axis(ids, order, 1) == np.take_along_axis(want_ids, want_order, 1)).all(1)
    err = float(np.abs(np.take_along_axis(weights, order, 1)
                       - np.take_along_axis(want_w, want_order, 1))[same].max())
    ok = bool(same[clear].all()) and err <= ROUTER_WEIGHT_TOL
    roof, _, _ = router_roofline_s(tokens)
    return CheckResult(TOPIC, "router (fp32, top-8)", f"T={tokens} H={HIDDEN} E={EXPERTS}", err,
                       ROUTER_WEIGHT_TOL, ok, rep.estimated_time_s * 1e6, roof * 1e6,
                       note=f"ids equal on {int(same.sum())}/{tokens} tokens "
                            f"({int((~clear).sum())} near-ties)")


def _ffn_check(name, weights, dtype, tokens, k, seed, empty=()):
    x = np.random.default_rng(seed).standard_normal((tokens, HIDDEN)).astype(np.float32)
    ids, w = random_routing(tokens, k, weights.num_experts, seed, empty)
    out, rep = to_host(expert_ffn(x, ids, w, weights, report=True))
    err = relative_error(out, reference_moe(x, ids, w, weights))
    rows = tokens * k
    roof, _, _ = ffn_roofline_s(rows, tokens, len(np.unique(ids)), weights.gate.dtype.itemsize)
    return CheckResult(TOPIC, f"expert_ffn {dtype} {name}",
                       f"{rows} rows/{weights.num_experts} experts {HIDDEN}x{INTER}", err,
                       FFN_TOL[dtype], err <= FFN_TOL[dtype], rep.estimated_time_s * 1e6, roof * 1e6)


def checks(quick: bool):
    for tokens in (1, 129):
        yield _router_check(tokens)
    bf16 = random_experts(LOCAL_EXPERTS, HIDDEN, INTER, "bf16", seed=1)
    yield _ffn_check("decode", bf16, "bf16", tokens=8, k=1, seed=2)
    yield _ffn_check("prefill-like", bf16, "bf16", tokens=64, k=4, seed=3, empty=(5,))
    del bf16
    fp8 = random_experts(2 if quick else LOCAL_EXPERTS, HIDDEN, INTER, "fp8", seed=4)
    yield _ffn_check("decode", fp8, "fp8", tokens=8, k=1, seed=5)
