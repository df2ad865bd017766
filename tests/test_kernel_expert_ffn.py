"""Grouped expert FFN (kernels/expert_ffn.py) on the simulator against reference.moe.

Error measure: max |kernel - reference| / max |reference| over the output [T, H]. The reference
runs in fp32 on the bf16-rounded x the kernel reads and on the exact weights the kernel gets
(bf16 values, or FP8 values times their block scales). Tolerances `TOL` by weight dtype: bf16
(the kernel rounds h = silu(g) * u to bf16 once; observed ~2e-3); FP8 twice that (the dequantised
weights are rounded to bf16 on chip as well; observed ~4e-3, up to 7e-3 for a single token).
"""
import ml_dtypes
import numpy as np
import pytest

from mimo_kernels.backend import simulate
from mimo_kernels.expert_ffn import (BlockPlan, ExpertWeights, choose_block_rows, expert_ffn,
                                expert_ffn_kernel, grouped_expert_ffn, plan_blocks,
                                plan_blocks_static, static_block_shape)
from mimo_kernels.launch import to_host
from mimo_v2_flash.selfcheck.kernels_moe import (random_experts as make_weights, random_routing as routing,
                                                 reference_moe, relative_error)

BF16 = np.dtype(ml_dtypes.bfloat16)
TOL = {"bf16": 1e-2, "fp8": 2e-2}       # relative error by weight dtype (module doc)
FULL = dict(hidden=4096, inter=2048, experts=8)


def check(x, ids, w, weights, tol, **kwargs):
    out = to_host(expert_ffn(x, ids, w, weights, **kwargs))
    assert out.shape == x.shape and out.dtype == np.float32
    want = reference_moe(x, ids, w, weights)
    err = relative_error(out, want)
    assert err < tol, f"relative error {err:.2e} >= {tol}"
    return out, want


@pytest.fixture(scope="module")
def full_bf16():
    return make_weights(FULL["experts"], FULL["hidden"], FULL["inter"], "bf16", seed=1)


# ----------------------------------------------------------------------- small and ragged shapes

@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
@pytest.mark.parametrize("tokens", [1, 7, 129, 1000])
def test_small_shapes(tokens, dtype):
    """hidden 256, intermediate 128 (the tiny preset), 4 local experts, expert 2 never routed."""
    weights = make_weights(4, 256, 128, dtype, seed=tokens)
    x = np.random.default_rng(tokens).standard_normal((tokens, 256)).astype(np.float32)
    ids, w = routing(tokens, 2, 4, seed=tokens, empty=(2,))
    out, _ = check(x, ids, w, weights, TOL[dtype])
    assert np.isfinite(out).all()


def test_unrouted_tokens_get_zero_and_slots_can_be_empty():
    """ids -1 mark empty slots; a token with no expert gets exactly 0."""
    weights = make_weights(3, 256, 256, "bf16", seed=3)
    x = np.random.default_rng(3).standard_normal((9, 256)).astype(np.float32)
    ids, w = routing(9, 2, 3, seed=3)
    ids[4] = -1
    ids[6, 1] = -1
    out, want = check(x, ids, w, weights, TOL["bf16"])
    assert (out[4] == 0).all()


def test_no_tokens():
    """A rank that received nothing (expert-parallel idle step) gets an empty result, no launch."""
    weights = make_weights(2, 256, 128, "bf16", seed=3)
    out = to_host(expert_ffn(np.zeros((0, 256), np.float32), np.zeros((0, 8), np.int64),
                             np.zeros((0, 8), np.float32), weights))
    assert out.shape == (0, 256)


def test_block_plan_layout():
    """Expert 0: 3 rows -> one block with a padding row; expert 1 empty; expert 2: 5 rows -> two."""
    plan = plan_blocks([3, 0, 5], [4, 1, 0, 2, 3, 4, 5, 6], np.arange(1, 9, dtype=np.float32) / 10,
                       num_tokens=7, block_rows=4)
    np.testing.assert_array_equal(plan.block_expert, [0, 2, 2])
    np.testing.assert_array_equal(plan.row_token, [4, 1, 0, 7, 2, 3, 4, 5, 6, 7, 7, 7])
    np.testing.assert_allclose(plan.row_weight, [.1, .2, .3, 0, .4, .5, .6, .7, .8, 0, 0, 0])
    np.testing.assert_array_equal(plan.block_gathers, [0, 1, 0])   # token 4 is back in block 1


def test_static_plan_flags_the_same_read_backs():
    """plan_blocks_static (tensor ops, static shape) flags the blocks that must read their tokens'
    sums back exactly as plan_blocks does, and none of its padding-only blocks."""
    rng = np.random.default_rng(15)
    ids = np.array([rng.choice(6, 3, replace=False) for _ in range(9)])
    w = rng.random(ids.shape).astype(np.float32)
    block_rows, num_blocks = static_block_shape(9, 3, 6)
    static = plan_blocks_static(ids, w, 6, block_rows, num_blocks).on_host()
    order = np.argsort(ids.reshape(-1), kind="stable")
    exact = plan_blocks(np.bincount(ids.reshape(-1), minlength=6), np.repeat(np.arange(9), 3)[order],
                        w.reshape(-1)[order], 9, block_rows)
    n = exact.num_blocks
    assert exact.block_gathers.any()
    np.testing.assert_array_equal(static.block_gathers[:n], exact.block_gathers)
    assert not static.block_gathers[n:].any()


@pytest.mark.parametrize("block_rows", [1, 8, 64, 384, 512])
def test_padding_rows_do_not_contaminate(block_rows):
    """Forced block sizes leave many padding rows (they read token T-1 and carry weight 0)."""
    weights = make_weights(3, 256, 128, "bf16", seed=4)
    x = np.random.default_rng(4).standard_normal((20, 256)).astype(np.float32)
    ids, w = routing(20, 2, 3, seed=4)
    check(x, ids, w, weights, TOL["bf16"], block_rows=block_rows)


def test_padding_only_block_changes_nothing():
    """A bucketed block count (an extra block of padding rows) leaves every token's sum unchanged."""
    weights = make_weights(2, 256, 128, "bf16", seed=5)
    x = np.random.default_rng(5).standard_normal((6, 256)).astype(BF16)
    plan = plan_blocks([3, 2], [0, 2, 5, 1, 5], np.full(5, 0.25, np.float32), num_tokens=6, block_rows=4)
    run = simulate(expert_ffn_kernel)
    exact = run(x, plan.row_token, plan.row_weight, plan.block_expert, *weights.kernel_args())
    padded = BlockPlan(4, np.append(plan.block_expert, 1).astype(np.int32),
                       np.append(plan.row_token, np.full(4, 6)).astype(np.int32),
                       np.append(plan.row_weight, np.zeros(4)).astype(np.float32))
    flagged = run(x, plan.row_token, plan.row_weight, plan.block_expert, *weights.kernel_args(),
                  block_gathers=plan.block_gathers)      # token 5 is in both blocks: flags [0, 1]
    np.testing.assert_array_equal(plan.block_gathers, [0, 1])
    more = run(x, padded.row_token, padded.row_weight, padded.block_expert, *weights.kernel_args())
    np.testing.assert_array_equal(more, exact)
    np.testing.assert_array_equal(flagged, exact)
    assert exact.shape == (1, 7, 256)                 # one program's sums, row 6 the padding's
    assert (exact[0, 6] == 0).all() and (exact[0, [3, 4]] == 0).all()


def test_block_size_choice():
    """Few rows: the block just covers the largest expert; many rows: 512-row blocks."""
    assert choose_block_rows([1, 0, 1], 4096, 2048, 2) == 1
    assert choose_block_rows([3, 7, 0], 4096, 2048, 2) == 8
    assert choose_block_rows([4096] * 8, 4096, 2048, 2) == 512
    assert choose_block_rows([0, 0], 4096, 2048, 2) == 1


# ----------------------------------------------------------------------- full MiMo shapes

def test_full_decode_bf16(full_bf16):
    """8 local experts of 4096 x 2048, decode: 8 tokens with one local expert each (8 rows)."""
    x = np.random.default_rng(6).standard_normal((8, 4096)).astype(np.float32)
    ids, w = routing(8, 1, 8, seed=6)
    check(x, ids, w, full_bf16, TOL["bf16"])


def test_full_prefill_like_bf16(full_bf16):
    """256 rows over 8 experts, expert 5 empty: 64 tokens with 4 local experts each."""
    x = np.random.default_rng(7).standard_normal((64, 4096)).astype(np.float32)
    ids, w = routing(64, 4, 8, seed=7, empty=(5,))
    check(x, ids, w, full_bf16, TOL["bf16"])


def test_full_decode_fp8():
    """FP8 (Trainium e4m3, 128x128 block scales) at full size: 2 experts, 3 tokens, 4 rows."""
    weights = make_weights(2, FULL["hidden"], FULL["inter"], "fp8", seed=8)
    x = np.random.default_rng(8).standard_normal((3, 4096)).astype(np.float32)
    ids = np.array([[0, 1], [1, -1], [0, -1]])
    w = np.array([[0.6, 0.4], [1.0, 0.0], [0.3, 0.0]], np.float32)
    check(x, ids, w, weights, TOL["fp8"])


@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_lnc2_programs_take_alternate_blocks(dtype):
    """LNC=2: program l sums blocks l, l+2, ... into its own partial output; tokens with rows in
    blocks of both programs (k=3 of 4 experts) get the same result as at LNC=1."""
    weights = make_weights(4, 256, 256, dtype, seed=12)
    x = np.random.default_rng(12).standard_normal((40, 256)).astype(np.float32)
    ids, w = routing(40, 3, 4, seed=12)
    out, _ = check(x, ids, w, weights, TOL[dtype], lnc=2)
    np.testing.assert_allclose(out, to_host(expert_ffn(x, ids, w, weights, lnc=1)), rtol=0, atol=1e-6)


def test_lnc2_full_decode_fp8():
    """LNC=2 at the MiMo shape: 2 FP8 experts, 5 tokens (2 blocks, one per program)."""
    weights = make_weights(2, FULL["hidden"], FULL["inter"], "fp8", seed=13)
    x = np.random.default_rng(13).standard_normal((5, 4096)).astype(np.float32)
    ids, w = routing(5, 1, 2, seed=13)
    check(x, ids, w, weights, TOL["fp8"], lnc=2)


@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_full_striped_blocks(dtype, lnc1_and_lnc2):
    """The striped path at the MiMo shape with several stripes of each weight (bf16: 2 gate / up
    pairs and 2 down stripes; FP8: 4 and 4, dequantised one stripe ahead), 128-row blocks, 3
    experts of 2 blocks each. Every token has rows in 2 experts, so later blocks read their sums
    back, and each block writes the previous block's sums back between its own weight stripes.
    LNC=2 (alternate blocks) gives LNC=1's result bit for bit."""
    weights = make_weights(3, FULL["hidden"], FULL["inter"], dtype, seed=15)
    x = np.random.default_rng(15).standard_normal((240, 4096)).astype(np.float32)
    ids, w = routing(240, 2, 3, seed=15)
    assert (np.bincount(ids.reshape(-1), minlength=3) > 128).all()       # 2 blocks per expert
    outputs = []

    def run():
        out, rep = expert_ffn(x, ids, w, weights, block_rows=128, report=True)
        outputs.append(out)
        return out, rep
    lnc1_and_lnc2(run)
    err = relative_error(outputs[0], reference_moe(x, ids, w, weights))
    assert err < TOL[dtype], f"relative error {err:.2e} >= {TOL[dtype]}"


@pytest.mark.parametrize("rows", [2, 200])
def test_fp8_weights_as_uint8_bytes(rows):
    """FP8 weights passed as uint8 arrays of the same bytes (how torch carries them to the
    device) give exactly the float8_e4m3 result, on the streaming (2 rows per block) and the
    striped (200 rows: 256-row blocks) paths."""
    weights = make_weights(2, 256, 128, "fp8", seed=14)
    x = np.random.default_rng(14).standard_normal((rows, 256)).astype(BF16)
    plan = plan_blocks([rows, 0], np.arange(rows), np.full(rows, 0.5, np.float32), num_tokens=rows,
                       block_rows=2 if rows == 2 else 256)
    run = simulate(expert_ffn_kernel)
    tables = (x, plan.row_token, plan.row_weight, plan.block_expert)
    as_fp8 = run(*tables, *weights.kernel_args())
    gate, up, down, *scales = weights.kernel_args()
    as_bytes = run(*tables, gate.view(np.uint8), up.view(np.uint8), down.view(np.uint8), *scales)
    np.testing.assert_array_equal(as_bytes, as_fp8)
    want = reference_moe(np.asarray(x, np.float32), np.zeros((rows, 1), np.int64),
                         np.full((rows, 1), 0.5, np.float32), weights)
    assert relative_error(as_fp8[0, :rows], want) < TOL["fp8"]


# ----------------------------------------------------------------------- misuse

def test_bad_inputs_are_rejected():
    weights = make_weights(2, 256, 128, "bf16", seed=9)
    x = np.zeros((4, 256), np.float32)
    ids, w = np.array([[0], [1], [0], [1]]), np.ones((4, 1), np.float32)
    with pytest.raises(ValueError, match="expert ids must lie in -1..1"):
        expert_ffn(x, ids + 1, w, weights)
    with pytest.raises(ValueError, match=r"x \(4, 128\) must be \[tokens, hidden 256\]"):
        expert_ffn(x[:, :128], ids, w, weights)
    with pytest.raises(ValueError, match="block_rows=1024; use 1..128 or a multiple of 128 up to 512"):
        expert_ffn(x, ids, w, weights, block_rows=1024)
    with pytest.raises(ValueError, match="lists a token twice"):
        grouped_expert_ffn(x, [2, 0], [1, 1], [0.5, 0.5], weights)
    with pytest.raises(ValueError, match="group sizes sum to 3 rows"):
        grouped_expert_ffn(x, [2, 1], [0, 1], [0.5, 0.5], weights)
    bad = ExpertWeights(weights.gate, weights.up, weights.down[:, :, :128])
    with pytest.raises(ValueError, match=r"down has shape \(2, 128, 128\), expected \(2, 128, 256\)"):
        expert_ffn(x, ids, w, bad)
    fp8 = make_weights(2, 256, 128, "fp8", seed=9)
    with pytest.raises(ValueError, match="FP8 needs up_scale"):
        expert_ffn(x, ids, w, ExpertWeights(fp8.gate, fp8.up, fp8.down, fp8.gate_scale, None, fp8.down_scale))


def test_kernel_rejects_unaligned_hidden():
    """The kernel itself names the limit when called directly with an unsupported shape."""
    x = np.zeros((2, 200), BF16)
    w = np.zeros((1, 200, 128), BF16)
    with pytest.raises(AssertionError, match="hidden 200 and intermediate 128 must be multiples of 128"):
        simulate(expert_ffn_kernel)(x, np.zeros(1, np.int32), np.zeros(1, np.float32),
                                    np.zeros(1, np.int32), w, w, np.zeros((1, 128, 200), BF16))
