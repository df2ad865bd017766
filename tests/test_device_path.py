"""The device launch path on the simulator: `launch` (kernel[lnc] with torch tensors), the
kernel-specialization counter, static-shape buckets, the static KV cache and the fixed-shape
expert block plan.

Tolerances: bucketed (padded) launches against exact-shape launches of the same kernels: equal
bit for bit where the kernel's per-row arithmetic is unchanged (rmsnorm, experts), 1e-6 relative
for attention (masked padding adds exact zeros; the shape changes only the tiling). The static
cache against the ragged cache on the reference backend: 1e-6 relative on the logits (same
arithmetic, masked empty slots contribute exactly zero).
"""

import ml_dtypes
import numpy as np
import pytest
import torch

from mimo_kernels import launch as launch_module
from mimo_kernels.attention import attention_decode
from mimo_kernels.backend import IS_SIMULATOR, NKI_VERSION, describe
from mimo_kernels.expert_ffn import ExpertWeights, expert_ffn, plan_blocks, plan_blocks_static, static_block_shape
from mimo_kernels.launch import (TRANSFERS, VARIANTS, VariantCounter, launch, runtime_lnc, to_host,
                                 variant_key)
from mimo_kernels.rmsnorm import rmsnorm, rmsnorm_kernel
from mimo_v2_flash import MiMoV2FlashModel
from mimo_v2_flash.buckets import Bucket, BucketTable, powers_of_two
from mimo_v2_flash.device_report import DeviceReport, byte_size
from mimo_v2_flash.layer import AttentionInput
from mimo_v2_flash.static_kv_cache import StaticKVCache

BF16 = np.dtype(ml_dtypes.bfloat16)


def rel(a, b):
    return float(np.abs(np.asarray(a, np.float32) - b).max() / max(np.abs(b).max(), 1e-30))


# ---------------------------------------------------------------- backend and launch

def test_backend_reports_the_bundled_simulator_and_never_calls_it_real():
    assert IS_SIMULATOR
    assert NKI_VERSION.endswith("+cpu-sim")
    text = describe()
    assert "bundled CPU simulator" in text and "real" not in text.lower()


def test_runtime_lnc_follows_the_neuron_variable(monkeypatch):
    monkeypatch.delenv("NEURON_LOGICAL_NC_CONFIG", raising=False)
    assert runtime_lnc() == 1                                   # the simulator; a trn2 device defaults to 2
    monkeypatch.setenv("NEURON_LOGICAL_NC_CONFIG", "2")
    assert runtime_lnc() == 2
    monkeypatch.setenv("NEURON_LOGICAL_NC_CONFIG", "4")
    with pytest.raises(ValueError, match="NEURON_LOGICAL_NC_CONFIG='4'.*1 or 2"):
        runtime_lnc()


def test_launch_passes_torch_tensors_to_the_kernel_at_the_runtime_lnc(monkeypatch):
    seen = []
    real_call = type(rmsnorm_kernel).__call__

    def spy(kernel, *args, **kwargs):
        seen.append((kernel.num_programs, [type(a).__name__ for a in args]))
        return real_call(kernel, *args, **kwargs)
    monkeypatch.setattr(type(rmsnorm_kernel), "__call__", spy)
    x = np.random.default_rng(0).standard_normal((5, 256)).astype(BF16)
    w = (1 + 0.1 * np.random.default_rng(1).standard_normal(256)).astype(BF16)
    y = to_host(launch(rmsnorm_kernel, x, w, eps=1e-6))
    assert seen == [(1, ["Tensor", "Tensor"])]                  # kernel[1](torch tensors)
    assert isinstance(y, np.ndarray) and y.dtype == BF16
    xf = x.astype(np.float32)
    want = xf / np.sqrt((xf ** 2).mean(-1, keepdims=True) + 1e-6) * w.astype(np.float32)
    assert rel(y, want) < 1e-2


def test_lnc2_runs_only_launches_declared_to_split(monkeypatch):
    monkeypatch.setenv("NEURON_LOGICAL_NC_CONFIG", "2")
    x = np.ones((5, 256), BF16)
    # Every launcher here declares its kernel's split; the guard is for a launch that does not.
    with pytest.raises(launch_module.LncError, match="rmsnorm_kernel is not declared to split.*=1"):
        launch(rmsnorm_kernel, x, np.ones(256, BF16), eps=1e-6)
    assert rel(to_host(launch(rmsnorm_kernel, x, np.ones(256, BF16), eps=1e-6, splits_lnc=True)),
               to_host(launch(rmsnorm_kernel, x, np.ones(256, BF16), eps=1e-6, lnc=1))) == 0
    rng = np.random.default_rng(2)
    problem = AttentionInput(rng.standard_normal((1, 8, 64)).astype(np.float32),
                             rng.standard_normal((9, 2, 64)).astype(np.float32),
                             rng.standard_normal((9, 2, 64)).astype(np.float32), np.array([8]), np.arange(9))
    got, _ = to_host(attention_decode([problem], 0.125))          # the attention kernels split: LNC=2
    want, _ = to_host(attention_decode([problem], 0.125, lnc=1))
    assert rel(got[0], want[0]) < 1e-6


def test_to_device_is_a_zero_copy_torch_view_on_the_cpu():
    a = np.arange(6, dtype=np.float32).astype(BF16)
    t = launch_module.to_device(a)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16
    a[0] = 5                                     # a view: the tensor sees the change
    assert float(t[0]) == 5.0
    np.testing.assert_array_equal(launch_module.to_host(t), a)


# ---------------------------------------------------------------- host <-> device traffic

def moved(mark) -> dict[str, int]:
    """The bytes per kind `TRANSFERS` counted after `mark`, kinds with none left out."""
    return {kind: n for kind, n in TRANSFERS.since(mark).items() if n}


def test_resident_arrays_upload_once_and_torch_tensors_pass_untouched(monkeypatch):
    seen = []
    real_call = type(rmsnorm_kernel).__call__

    def spy(kernel, *args, **kwargs):
        seen.append(args)
        return real_call(kernel, *args, **kwargs)
    monkeypatch.setattr(type(rmsnorm_kernel), "__call__", spy)
    x = np.random.default_rng(3).standard_normal((4, 256)).astype(BF16)
    w = launch_module.RESIDENT.resident((1 + np.arange(256) / 256).astype(BF16))
    start = TRANSFERS.mark()
    want = to_host(launch(rmsnorm_kernel, x, w, eps=1e-6))   # registered before `start`: no weight bytes
    kept = launch(rmsnorm_kernel, x, w, eps=1e-6)
    assert isinstance(kept, torch.Tensor)                    # a launch reads nothing back by itself
    assert moved(start) == {"activations": 2 * x.nbytes, "readback": want.nbytes}
    assert TRANSFERS.tensors_since(start, "readback") == 1                  # one read: the to_host
    x_dev = launch_module.to_device(x)
    start = TRANSFERS.mark()
    np.testing.assert_array_equal(to_host(launch(rmsnorm_kernel, x_dev, w, eps=1e-6)), want)
    assert seen[-1][0] is x_dev                              # a device tensor reaches the kernel as is
    assert moved(start) == {"readback": want.nbytes}
    fresh = np.ones(512, np.float32)
    start = TRANSFERS.mark()
    launch_module.RESIDENT.resident(fresh)
    launch_module.RESIDENT.resident(fresh)                  # a second registration uploads nothing
    assert moved(start) == {"weights": fresh.nbytes}
    assert TRANSFERS.tensors_since(start, "weights") == 1
    held = len(launch_module.RESIDENT)
    del fresh                                                # the entry goes with its host array
    assert len(launch_module.RESIDENT) == held - 1


def _kernel_layout_bytes(ops) -> int:
    arrays = [a for pair in ops._prepared.values() for a in pair if a is not None]
    for stack, local_of in ops._expert_stacks.values():       # and the global -> local expert id table
        arrays += [a for a in stack.kernel_args() if a is not None] + [local_of]
    return sum(a.nbytes for a in arrays)


def test_weights_upload_once_at_warmup_and_decode_steps_move_only_activations():
    """Warmup uploads every weight once (and the attention plans of its shapes); a generation then
    uploads no weights and no plans, a decode step's 21 launches upload only a few hundred bytes
    (token ids, positions, the router's masked bias: the activations stay on the device), and the
    step reads back one tensor, its sampled ids."""
    from mimo_kernels.rope import _tables as rope_tables
    model = MiMoV2FlashModel.random("tiny", seed=2, backend="nki")
    start = TRANSFERS.mark()
    report = DeviceReport()
    tables_before = {key: id(t) for key, t in rope_tables.items()}
    model.warmup(BucketTable.for_generation(2, 9, 6))
    report.warmed()
    uploaded = TRANSFERS.since(start)["weights"]
    new_tables = sum(t.nbytes for key, t in rope_tables.items() if tables_before.get(key) != id(t))
    assert uploaded == _kernel_layout_bytes(model.ops) + new_tables     # every weight once, nothing else
    mark = TRANSFERS.mark()
    prompt = np.random.default_rng(4).integers(0, 512, (2, 9))
    model.generate(prompt, max_new_tokens=6)
    after = TRANSFERS.since(mark)
    assert after["weights"] == 0 and after["plans"] == 0                 # the warmup uploaded the plans
    decode = TRANSFERS.since(model.ops.passes[1].transfer_mark)["activations"] / 5
    # The 2 token ids (int32) and per layer the 2 positions of norm + q|k|v + RoPE, of the
    # attention's queries and of the new KV slots: no activation travels (lm_head's unused position
    # and table and the routers' masked correction biases are resident).
    assert decode == 2 * 4 + 4 * 3 * 2 * 4
    steps = model.ops.passes[1:]
    launches = [sum(op.launches for op in step.ops.values()) for step in steps]
    # embed, 4 x (norm_qkv_rope, attention, linear_add_rmsnorm), the dense MLP of layer 0,
    # 3 x (router, experts), the final norm and lm_head
    assert launches == [21] * 5
    assert TRANSFERS.tensors_since(steps[0].transfer_mark, "readback") == 5           # one read per step
    assert TRANSFERS.since(steps[0].transfer_mark)["readback"] == 5 * 2 * 8           # of 2 int64 ids
    assert report.readback_line(model.ops.passes).startswith(
        f"device->host: 1 read, {byte_size(16)} per decode step")


def test_static_attention_plans_upload_once_and_give_the_outputs_of_fresh_plans(monkeypatch):
    """Decode steps of one static shape on a resident SWA cache with sinks: the first launch uploads
    the plan tensors (one-hot, sink rows), the second only its queries and positions; a launch on
    plan tensors rebuilt and uploaded per launch (the previous behaviour) gives the same outputs
    bit for bit."""
    import mimo_kernels.attention.decode as decode_module
    from mimo_kernels.attention import attention_decode_cache
    from mimo_kernels.attention.plan import (plan_decode_units, plan_tensors, static_key_ranges, static_output_rows,
                                             static_plan, static_plan_tensors, static_sink_rows)
    from mimo_v2_flash.static_kv_cache import StaticLayerKVCache
    static_plan.cache_clear()                   # this shape's plans may not come from an earlier test
    static_sink_rows.cache_clear()
    static_output_rows.cache_clear()
    rng = np.random.default_rng(12)
    batch, hq, hkv, d, window = 2, 4, 2, 64, 8
    cache = StaticLayerKVCache(batch, hkv, d, d, window, context=32, resident=True)
    for b, n in enumerate((12, 5)):                                       # a wrapped ring, a short one
        cache.store(b, np.arange(n), rng.standard_normal((n, hkv, d)), rng.standard_normal((n, hkv, d)))
    sink = rng.standard_normal(hq).astype(np.float32)
    q = rng.standard_normal((2, batch, 1, hq, d)).astype(np.float32)
    qpos = np.array([[11], [4]], np.float32)
    queries = q[0].nbytes + qpos.nbytes              # host queries (scaled and cast on the device), positions
    outputs = batch * hq * d * 4                     # the outputs [B, 1, Hq, Dv] fp32, read back by to_host

    def step(i):
        mark = TRANSFERS.mark()
        out, _ = to_host(attention_decode_cache(q[i], cache.k, cache.v, cache.pos, qpos, 0.125, window, sink))
        return out, moved(mark)
    first, first_moved = step(0)
    _, onehot, sink_rows = static_plan_tensors((batch, 1, window), hkv, hq // hkv, window, sink)
    plans = onehot.nbytes + sink_rows.nbytes + batch * hq * 8     # and the output rows' gather (int64)
    assert first_moved == {"plans": plans, "activations": queries, "readback": outputs}
    second, second_moved = step(1)
    assert second_moved == {"activations": queries, "readback": outputs}  # no plan bytes

    def fresh_plan_tensors(shape, kv_heads, group, window, sink):
        plan = plan_decode_units([shape[1]] * shape[0], [shape[2]] * shape[0], kv_heads, group)
        static_key_ranges(plan, shape[2], window)
        return (plan,) + plan_tensors(plan, sink)
    monkeypatch.setattr(decode_module, "static_plan_tensors", fresh_plan_tensors)
    for i, want in enumerate((first, second)):
        got, got_moved = step(i)
        np.testing.assert_array_equal(got, want)
        assert got_moved == {"activations": queries + plans - batch * hq * 8, "readback": outputs}


# ---------------------------------------------------------------- the variant counter

def test_variant_key_is_shapes_dtypes_and_constants():
    a, b = np.zeros((4, 8), np.float32), np.ones((4, 8), np.float32)
    key = variant_key(rmsnorm_kernel, 2, (a,), {"eps": 1e-6})
    assert key == variant_key(rmsnorm_kernel, 2, (torch.from_numpy(b),), {"eps": 1e-6})   # values don't matter
    assert key != variant_key(rmsnorm_kernel, 1, (a,), {"eps": 1e-6})                      # LNC does
    assert key != variant_key(rmsnorm_kernel, 2, (np.zeros((5, 8), np.float32),), {"eps": 1e-6})
    assert key != variant_key(rmsnorm_kernel, 2, (a.astype(BF16),), {"eps": 1e-6})
    assert key != variant_key(rmsnorm_kernel, 2, (a,), {"eps": 1e-5})                      # constants do


def test_counter_counts_distinct_launches():
    counter = VariantCounter()
    assert counter.record(("k", 1)) and not counter.record(("k", 1)) and counter.record(("k", 2))
    assert len(counter) == 2 and counter.since(1) == [("k", 2)] and counter.by_kernel() == {"k": 2}


def test_exact_shape_launches_create_a_variant_per_token_count():
    w = np.ones(256, BF16)
    start = len(VARIANTS)
    for n in (3, 4, 3, 5):      # an eps no other test uses: the counter is process-wide
        rmsnorm(np.ones((n, 256), np.float32), w, eps=1.25e-3)
    assert len(VARIANTS) - start == 3


# ---------------------------------------------------------------- buckets

def test_bucket_table_picks_the_smallest_fitting_bucket():
    assert powers_of_two(3, 40) == (4, 8, 16, 32, 64)
    table = BucketTable(batches=(1, 2, 4), prefill_tokens=(16, 64), decode_contexts=(64, 256))
    assert table.prefill(3, 17) == Bucket("prefill", 4, 64, 64)
    assert table.decode(1, 65) == Bucket("decode", 1, 1, 256)
    assert table.decode(2, 64).rows == 2 and Bucket("prefill", 2, 64, 64).rows == 128
    assert Bucket("decode", 2, 1, 256).attention_keys(None) == 256
    assert Bucket("decode", 2, 1, 256).attention_keys(128) == 129
    assert Bucket("decode", 1, 1, 16).attention_keys(16) == 17      # a ring as large as the context
    assert len(table.buckets()) == 3 * 2 + 3 * 2
    with pytest.raises(ValueError, match="no bucket holds decode context 300: the largest is 256"):
        table.decode(1, 300)
    with pytest.raises(ValueError, match="no bucket holds batch 5"):
        table.prefill(5, 8)
    gen = BucketTable.for_generation(batch=3, prompt_len=20, max_new_tokens=40)
    assert (gen.batches, gen.prefill_tokens, gen.decode_contexts) == ((4,), (32,), (64,))


def test_bucketed_generation_compiles_nothing_new_after_warmup_and_keeps_the_tokens():
    prompt = np.random.default_rng(4).integers(0, 512, (2, 9))
    exact = MiMoV2FlashModel.random("tiny", seed=2, backend="nki")
    want = exact.generate(prompt, max_new_tokens=6)
    model = MiMoV2FlashModel.random("tiny", seed=2, backend="nki")
    model.warmup(BucketTable.for_generation(2, 12, 20))        # room for other lengths in the buckets
    mark = len(VARIANTS)
    np.testing.assert_array_equal(model.generate(prompt, max_new_tokens=6), want)
    model.generate(prompt[:, :12 - 3], max_new_tokens=19)      # other lengths inside the same buckets
    model.generate(prompt[:1, :5], max_new_tokens=3)           # a smaller batch is padded
    assert VARIANTS.since(mark) == []
    assert model.ops.passes[0].tokens == 2 * 9        # the first generation's prefill: warmup costs dropped


def test_static_shape_attention_equals_the_exact_shape_launch():
    rng = np.random.default_rng(7)
    hq, hkv, d, dv, window = 8, 2, 64, 64, 16
    problems = []
    for t_len, history in ((1, 20), (1, 5), (3, 9)):
        qpos = np.arange(history, history + t_len)
        kpos = np.arange(history + t_len)
        problems.append(AttentionInput(rng.standard_normal((t_len, hq, d)).astype(np.float32),
                                       rng.standard_normal((len(kpos), hkv, d)).astype(np.float32),
                                       rng.standard_normal((len(kpos), hkv, dv)).astype(np.float32), qpos, kpos))
    for w in (None, window):
        want, _ = to_host(attention_decode(problems, 0.125, w))
        got, _ = to_host(attention_decode(problems, 0.125, w, shape=(4, 4, 32)))
        for g, e in zip(got, want):
            assert g.shape == e.shape and rel(g, e) < 1e-6
    with pytest.raises(ValueError, match="problem 0 has 1 new tokens and 21 keys; the bucket holds 4 tokens and 16"):
        attention_decode(problems, 0.125, None, shape=(4, 4, 16))


# ---------------------------------------------------------------- static expert blocks

def test_static_block_plan_holds_the_exact_plan_and_only_padding_after_it():
    """The block plan computed with torch operations on device tensors (routing bookkeeping on the
    device) equals the host plan of the same ragged routing (slots of -1, a token with none)."""
    rng = np.random.default_rng(3)
    tokens, k, experts = 7, 3, 6
    ids = np.array([rng.choice(experts, k, replace=False) for _ in range(tokens)])
    ids[2, 1] = ids[5, 0] = -1
    ids[4] = -1                                                  # a token computed elsewhere entirely
    weights = rng.random((tokens, k)).astype(np.float32)
    block_rows, num_blocks = static_block_shape(tokens, k, experts)
    assert (block_rows, num_blocks) == (4, 6 + 5)                # ceil(21 / 4) + E - 1
    on_device = plan_blocks_static(launch_module.to_device(ids), launch_module.to_device(weights), experts,
                                   block_rows, num_blocks)
    assert all(isinstance(t, torch.Tensor) for t in (on_device.block_expert, on_device.row_token,
                                                     on_device.row_weight, on_device.block_gathers))
    start = TRANSFERS.mark()
    static = on_device.on_host()
    assert TRANSFERS.tensors_since(start, "readback") == 1
    flat = ids.reshape(-1)
    keep = flat >= 0
    order = np.argsort(flat[keep], kind="stable")
    exact = plan_blocks(np.bincount(flat[keep], minlength=experts), np.repeat(np.arange(tokens), k)[keep][order],
                        weights.reshape(-1)[keep][order], tokens, block_rows)
    n = exact.num_blocks
    np.testing.assert_array_equal(static.block_expert[:n], exact.block_expert)
    np.testing.assert_array_equal(static.row_token[:n * block_rows], exact.row_token)
    np.testing.assert_array_equal(static.row_weight[:n * block_rows], exact.row_weight)
    np.testing.assert_array_equal(static.block_gathers[:n], exact.block_gathers)
    assert (static.row_token[n * block_rows:] == tokens).all() and (static.row_weight[n * block_rows:] == 0).all()
    assert not static.block_gathers[n:].any()
    with pytest.raises(ValueError, match="3 blocks of 1 rows cannot hold every routing of 7 tokens x 3 experts"):
        plan_blocks_static(ids, weights, experts, 1, 3)


def test_static_shape_experts_equal_the_exact_launch_bit_for_bit():
    rng = np.random.default_rng(5)
    tokens, k, experts, hidden, inter = 5, 2, 4, 128, 128
    stack = ExpertWeights(*(0.05 * rng.standard_normal(s) for s in
                            ((experts, hidden, inter), (experts, hidden, inter), (experts, inter, hidden))))
    stack = ExpertWeights(stack.gate.astype(BF16), stack.up.astype(BF16), stack.down.astype(BF16))
    x = rng.standard_normal((tokens, hidden)).astype(np.float32)
    ids = np.array([rng.choice(experts, k, replace=False) for _ in range(tokens)])
    w = rng.random((tokens, k)).astype(np.float32)
    want = to_host(expert_ffn(x, ids, w, stack))
    got = to_host(expert_ffn(x, ids, w, stack, shape=static_block_shape(8, k, experts)))
    np.testing.assert_array_equal(got, want)


def test_expert_parallel_slots_run_the_kernel_at_a_fixed_shape_with_the_exact_results():
    """The receive side of the static exchange: R slots of rows (padding rows: ids -1) through
    `OpsLocalExperts(static=True)` give the exact launch's rows bit for bit, and other routings
    of the same slot count launch no new specialization."""
    from mimo_parallel.executor import OpsLocalExperts
    model = MiMoV2FlashModel.random("tiny", seed=3, backend="nki")
    config, layer, rng = model.config, 1, np.random.default_rng(6)
    mine = list(range(config.n_routed_experts // 2))             # rank 0 of 2
    rows, k = 16, config.num_experts_per_tok
    exact, static = OpsLocalExperts(model.ops, mine), OpsLocalExperts(model.ops, mine, static=True)
    new_keys = []
    for real in (5, 11):
        x = np.zeros((rows, config.hidden_size), np.float32)
        x[:real] = rng.standard_normal((real, config.hidden_size))
        ids = np.full((rows, k), -1)
        ids[:real] = [np.where(rng.random(k) < 0.5, rng.choice(len(mine), k, replace=False), -1) for _ in range(real)]
        w = np.where(ids >= 0, rng.random((rows, k)), 0).astype(np.float32)
        mark = len(VARIANTS)
        got = static(layer, x, ids, w)
        new_keys.append([key for key in VARIANTS.since(mark) if key[0] == "expert_ffn_kernel"])
        np.testing.assert_array_equal(got[:real], exact(layer, x[:real], ids[:real], w[:real]))
        assert not got[real:].any()                                 # padding slots contribute nothing
    assert new_keys[1] == []                                        # another routing: no new variant


# ---------------------------------------------------------------- static KV cache

def test_static_cache_gives_the_ragged_cache_logits():
    model = MiMoV2FlashModel.random("tiny", seed=3)
    window = model.config.window_keys
    ids = np.random.default_rng(1).integers(0, 512, (2, 2 * window + 7))
    ragged, static = model.new_cache(2), StaticKVCache(model.config, 2, context=64, dtype=np.float32)
    split = window + 3
    for cache in (ragged, static):
        model.forward(ids[:, :split], cache)
    for t in range(split, ids.shape[1]):                  # decode steps wrap the SWA ring
        want = model.forward(ids[:, t:t + 1], ragged)
        got = model.forward(ids[:, t:t + 1], static)
        assert rel(got, want) < 1e-6, t
    assert static.layers[1].k.shape[3] == window and static.layers[0].k.shape[3] == 64     # [B, P, T, slots]
    assert static.nbytes == sum(c.k.nbytes + c.v.nbytes for c in static.layers)
    with pytest.raises(ValueError, match="position 64 of sequence 0 is beyond its context of 64"):
        model.forward_ragged([np.zeros(64 - ids.shape[1] + 1, np.int64)], static, [0])


# ---------------------------------------------------------------- prepared weights, kernel layout

@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_prepared_weights_load_straight_into_the_kernel_layout(tmp_path, dtype):
    from mimo_prepare_weights.convert import convert
    from mimo_v2_flash.checkpoint import KernelLayoutWeights, PreparedCheckpoint

    MiMoV2FlashModel.random("tiny", seed=6).save_pretrained(tmp_path / "hub")
    convert(tmp_path / "hub", tmp_path / "prepared", world_size=2, dtype=dtype, progress=False, log=lambda *a: None)
    direct = MiMoV2FlashModel.from_pretrained(tmp_path / "prepared", backend="nki", weight_dtype=dtype)
    assert isinstance(direct.weights, KernelLayoutWeights)
    config, hub_layout = PreparedCheckpoint(tmp_path / "prepared").load()
    via_float32 = MiMoV2FlashModel(config, hub_layout, backend="nki", weight_dtype=dtype)
    ids = np.random.default_rng(0).integers(0, 512, (1, 6))
    np.testing.assert_array_equal(direct.forward(ids), via_float32.forward(ids))
    o_proj = "model.layers.1.self_attn.o_proj.weight"
    weight, _ = direct.ops.kernel_weight(o_proj)
    assert isinstance(weight, np.memmap) or isinstance(weight.base, np.memmap)   # the file's bytes, no copy
    np.testing.assert_array_equal(direct.weights[o_proj], hub_layout[o_proj])    # Hub view on demand


# ---------------------------------------------------------------- sampling on the device

def test_device_sampler_follows_the_numpy_rule():
    from mimo_v2_flash.device_sampling import DeviceSampler
    from mimo_v2_flash.model import sample
    rng = np.random.default_rng(0)
    for _ in range(20):
        logits = rng.standard_normal(50).astype(np.float32)
        logits[rng.integers(50)] = logits.max()                       # a tie: the lower id wins
        assert DeviceSampler(0.0, None, None, 0)([logits]) == [sample(logits, 0.0, None, None, rng)]
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    draws = [DeviceSampler(1.0, None, 0.7, seed)([logits])[0] for seed in range(200)]
    assert set(draws) == {0, 1}                                        # the smallest set reaching 0.7
    assert abs(draws.count(0) / 200 - 0.5 / 0.8) < 0.1
    assert {DeviceSampler(1.0, 2, None, seed)([logits])[0] for seed in range(50)} == {0, 1}
    rows = [launch_module.to_device(rng.standard_normal(50).astype(np.float32)) for _ in range(3)]
    start = TRANSFERS.mark()
    tokens = DeviceSampler(0.0, None, None, 0)(rows)                   # a batch's rows: one read of 3 ids
    assert TRANSFERS.tensors_since(start, "readback") == 1 and TRANSFERS.since(start)["readback"] == 3 * 8
    assert tokens == [int(np.argmax(launch_module.to_host(row))) for row in rows]


def test_a_decode_step_reads_back_only_the_sampled_token_ids():
    """A kernel-backend generation inside warmed buckets keeps every activation on the device: each
    pass (the prefill and every decode step) is followed by one read, the batch's token ids (8 B
    each), nothing else comes back, and the tokens are the reference backend's."""
    from mimo_v2_flash.buckets import BucketTable
    prompts = np.random.default_rng(4).integers(0, 512, (2, 6))
    model = MiMoV2FlashModel.random("tiny", seed=2, backend="nki")
    model.warmup(BucketTable.for_generation(2, 6, 4))
    start = TRANSFERS.mark()
    got = model.generate(prompts, max_new_tokens=4)
    passes = model.ops.passes
    assert len(passes) == 4                                            # the prefill and 3 decode steps
    for i, p in enumerate(passes):
        end = passes[i + 1].transfer_mark if i + 1 < len(passes) else TRANSFERS.mark()
        reads = TRANSFERS.tensors_since(p.transfer_mark, "readback") - TRANSFERS.tensors_since(end, "readback")
        read_bytes = TRANSFERS.since(p.transfer_mark)["readback"] - TRANSFERS.since(end)["readback"]
        assert (reads, read_bytes) == (1, 2 * 8), i
    assert TRANSFERS.tensors_since(start, "readback") == len(passes)
    np.testing.assert_array_equal(got, MiMoV2FlashModel.random("tiny", seed=2).generate(prompts, max_new_tokens=4))


def test_generate_prints_the_memory_budget_and_the_variant_count(tmp_path, capsys):
    import run_example
    from mimo_prepare_weights.convert import convert
    MiMoV2FlashModel.random("tiny", seed=6).save_pretrained(tmp_path / "hub")
    convert(tmp_path / "hub", tmp_path / "prepared", world_size=1, progress=False, log=lambda *a: None)
    argv = ["--mode", "generate", "--weights", str(tmp_path / "prepared"), "--backend", "nki",
            "--batch", "1", "--seq-len", "4", "--max-new-tokens", "3", "--no-progress"]
    assert run_example.main(argv) == 0
    out = capsys.readouterr().out
    assert "memory budget per rank: weights bf16, KV bf16 bucket 1 x 8" in out and "fits" in out
    assert "kernel variants:" in out and "0 new after warmup" in out
