"""The decoder layer and the model built from the NKI kernels (NkiOps on the simulator) against
the NumPy reference.

Tolerances (bf16 activations between kernels, fp32 accumulation): a layer's output and its update
`out - x` within `LAYER_TOL` of the reference's max |value|; every op on identical inputs within
`OP_TOL`, and routing choosing exactly the reference's experts. The full-shape layer tests take about 30 s
of CPU each (weights ~8 s, simulation ~20 s); the rest use the 4-layer "tiny" preset.
"""

import inspect

import numpy as np
import pytest

import run_example
from mimo_v2_flash import MiMoV2FlashModel, load_config
from mimo_v2_flash.layer import CheckedOps, ReferenceOps
from mimo_v2_flash.mtp import MtpLayers
from mimo_v2_flash.nki_ops import NkiOps
from mimo_v2_flash.ops import DecoderOps
from mimo_v2_flash.selfcheck.decoder_layer import (
    LAYER_STEPS, compare_fp8_layers, compare_layer, compare_tiny_model, relative_error)
from mimo_v2_flash.weights import random_weights

LAYER_TOL = 2e-2    # a layer's output and update, the tiny model's logits: relative to the reference's max
OP_TOL = 2e-2       # each op on identical inputs, relative to the reference's max
EVERY_LAYER_OP = {"norm_qkv_rope", "attention", "linear_add_rmsnorm", "router", "experts"}


@pytest.mark.parametrize("kind", ["full", "swa"])
def test_full_shape_layer_prefill_then_decode_matches_reference(kind):
    steps = compare_layer(kind)
    assert [s.tokens for s in steps] == list(LAYER_STEPS)
    for step in steps:
        assert step.error <= LAYER_TOL, f"{kind} T={step.tokens}: layer output error {step.error:.2e}"
        assert step.update_error <= LAYER_TOL, f"{kind} T={step.tokens}: update error {step.update_error:.2e}"
        differences = dict(step.differences)
        assert set(differences) == EVERY_LAYER_OP
        assert differences.pop("router") == 0.0, "routing differs on identical input"
        worst = max(differences, key=differences.get)
        assert differences[worst] <= OP_TOL, f"{kind} T={step.tokens}: {worst} differs by {differences[worst]:.2e}"
        total = step.cost["total"]
        assert set(step.cost["ops"]) == EVERY_LAYER_OP
        assert 0 < total["roofline_us"] <= total["estimated_us"]


@pytest.fixture(scope="module")
def tiny():
    return compare_tiny_model()


def test_tiny_model_same_greedy_tokens_and_logits(tiny):
    np.testing.assert_array_equal(tiny.tokens_nki, tiny.tokens_reference)
    assert tiny.logits_error <= LAYER_TOL
    differences = dict(tiny.differences)
    assert set(differences) == EVERY_LAYER_OP | {"embed", "dense_mlp", "logits"}
    assert differences.pop("router") == 0.0
    assert max(differences.values()) <= OP_TOL, differences


def test_cost_summary_splits_prefill_and_decode_passes(tiny):
    prefill, decode = tiny.cost["prefill"], tiny.cost["decode"]
    assert (prefill["passes"], prefill["tokens"]) == (1, 8)
    assert (decode["passes"], decode["tokens"]) == (3, 3)      # 4 new tokens: 3 decode forwards
    layers = load_config("tiny").num_hidden_layers
    for summary in (prefill, decode):
        ops = summary["ops"]
        assert ops["embed"]["calls"] == ops["logits"]["calls"] == summary["passes"]
        assert ops["logits"]["launches"] == summary["passes"]              # final norm + lm_head fused
        assert ops["linear_add_rmsnorm"]["calls"] == layers * summary["passes"]
        assert summary["total"]["estimated_us"] == pytest.approx(sum(o["estimated_us"] for o in ops.values()))
        in_layers = sum(o["estimated_us"] for op, o in ops.items() if op not in ("embed", "logits"))
        assert summary["per_layer_us"] == pytest.approx(in_layers / (layers * summary["passes"]))
        assert summary["per_token_us"] == pytest.approx(summary["total"]["estimated_us"] / summary["tokens"])
    assert prefill["per_pass_us"] > decode["per_pass_us"] > 0


def test_ragged_batch_mixing_fresh_and_cached_sequences():
    """One forward where sequence 1 starts fresh (prefill kernel) while sequence 0 continues its
    cache (cached-attention kernel), against the reference doing the same."""
    models = [MiMoV2FlashModel.random("tiny", seed=5, backend=b) for b in ("reference", "nki")]
    rng = np.random.default_rng(5)
    first, fresh, more = (rng.integers(0, 512, n) for n in (20, 6, 3))
    outs = []
    for model in models:
        cache = model.new_cache(2)
        model.forward_ragged([first], cache, [0])
        outs.append(model.forward_ragged([more, fresh], cache, [0, 1]))
    for got, want in zip(outs[1], outs[0]):
        assert relative_error(got, want) <= LAYER_TOL


def test_fp8_weights_match_reference_on_the_same_quantised_weights():
    errors = compare_fp8_layers()
    assert len(errors) == load_config("tiny").num_hidden_layers + 1
    assert max(errors) <= LAYER_TOL, errors


def interface_mismatches(backend: type) -> list[str]:
    """Methods of `DecoderOps` that `backend` lacks or declares with other parameters (names,
    order, defaults)."""
    out = []
    for name, want in inspect.getmembers(DecoderOps, inspect.isfunction):
        if name.startswith("_"):
            continue
        got = getattr(backend, name, None)
        if got is None:
            out.append(f"{name}: missing")
            continue
        params = [(p.name, p.default) for p in inspect.signature(got).parameters.values()]
        expected = [(p.name, p.default) for p in inspect.signature(want).parameters.values()]
        if params != expected:
            out.append(f"{name}{inspect.signature(got)} != {name}{inspect.signature(want)}")
    return out


def test_both_backends_implement_the_decoder_ops_interface():
    """ReferenceOps and NkiOps have every DecoderOps method with its exact parameters; CheckedOps
    (which forwards them) and the MTP block's backend pass the runtime protocol check."""
    config = load_config("tiny")
    weights = random_weights(config, seed=1)
    assert {"embed", "rmsnorm", "linear", "attention", "logits"} <= {
        name for name, _ in inspect.getmembers(DecoderOps, inspect.isfunction)}
    for backend in (ReferenceOps, NkiOps):
        assert interface_mismatches(backend) == [], backend.__name__
    reference, kernels = ReferenceOps(config, weights), NkiOps(config, weights)
    mtp = MtpLayers(MiMoV2FlashModel(config, weights))
    for ops in (reference, kernels, CheckedOps(kernels, reference), mtp.ops):
        assert isinstance(ops, DecoderOps)

    class OldLinear(ReferenceOps):       # the interface before (layer, role): a weight name
        def linear(self, x, weight_name):
            ...
    [mismatch] = interface_mismatches(OldLinear)
    assert mismatch.startswith("linear(self, x, weight_name) != linear(self, x")
    assert not isinstance(object(), DecoderOps)


def test_weights_are_converted_once_into_the_kernel_layout():
    config = load_config("tiny")
    weights = random_weights(config, seed=1)
    name = "model.layers.1.self_attn.q_proj.weight"
    bf16 = NkiOps(config, weights)
    w, scale = bf16.kernel_weight(name)
    assert scale is None and w.dtype.name == "bfloat16" and w.shape == weights[name].T.shape
    np.testing.assert_allclose(w.astype(np.float32), weights[name].T, rtol=2 ** -8)
    assert bf16.kernel_weight(name)[0] is w
    q, scale = NkiOps(config, weights, weight_dtype="fp8").kernel_weight(name)
    assert q.dtype.name == "float8_e4m3" and scale.shape == (config.hidden_size // 128, w.shape[1] // 128)
    o_proj = "model.layers.1.self_attn.o_proj.weight"       # bf16 on the Hub: stays bf16
    assert NkiOps(config, weights, weight_dtype="fp8").kernel_weight(o_proj)[1] is None
    with pytest.raises(ValueError, match="weight_dtype"):
        NkiOps(config, weights, weight_dtype="int8")


def test_routing_to_an_expert_that_is_not_loaded_is_an_error():
    config = load_config("tiny")
    subset = list(range(8))
    weights = random_weights(config, seed=1, experts=subset)
    allowed = np.zeros(config.n_routed_experts, bool)
    allowed[subset] = True
    ops = NkiOps(config, weights, allowed)
    x = np.ones((2, config.hidden_size), np.float32)
    ids = np.array([[0, 1, 2, 3, 4, 5, 6, 9]] * 2)
    with pytest.raises(KeyError, match="expert 9 is not loaded"):
        ops.experts(x, 1, ids, np.full(ids.shape, 0.125, np.float32))
    with pytest.raises(KeyError, match="expert 9 is not loaded"):
        ReferenceOps(config, weights, allowed).experts(x, 1, ids, np.full(ids.shape, 0.125, np.float32))


def test_run_example_random_mode_through_kernels(capsys):
    argv = ["--mode", "random", "--batch", "1", "--seq-len", "8", "--max-new-tokens", "4"]
    assert run_example.main(argv + ["--backend", "nki"]) == 0
    kernels = capsys.readouterr().out
    assert run_example.main(argv) == 0
    reference = capsys.readouterr().out
    generated = [next(line.split()[1:] for line in out.splitlines() if line.startswith("generated[0]"))
                 for out in (kernels, reference)]
    assert generated[0] == generated[1]
    assert "Trainium2 estimate" in kernels and "Trainium2 estimate" not in reference


def test_bucketed_decode_reads_the_static_cache_in_place(monkeypatch):
    """Decode steps of a warmed bucket (3 sequences in a batch-4 bucket, the SWA ring wrapping, one
    step leaving sequence 1 out) launch the cached-attention kernel on the StaticKVCache's own
    resident buffers: the launch receives the cache's k, v and positions arrays and uploads only
    its arguments that are not resident (queries, positions; the plan tensors are resident too),
    and nothing new compiles. The attention op
    reading the cache in place is within OP_TOL of the reference on identical inputs (CheckedOps,
    whose gather writes the cache), and the plain run, which writes only the new slots
    (`write_cache`), gives the checked run's logits bit for bit."""
    import mimo_kernels.attention.decode as decode_module
    from mimo_kernels.launch import RESIDENT, TRANSFERS, VARIANTS
    from mimo_v2_flash.buckets import BucketTable
    from mimo_v2_flash.static_kv_cache import EMPTY_POSITION, StaticKVCache

    rng = np.random.default_rng(8)
    prompt, steps = rng.integers(0, 512, (3, 14)), rng.integers(0, 512, (4, 3))
    checked = MiMoV2FlashModel.random("tiny", seed=8, backend="nki", check_reference=True)
    plain = MiMoV2FlashModel.random("tiny", seed=8, backend="nki")
    plain.warmup(BucketTable.for_generation(3, 14, 4))
    checked.buckets = plain.buckets
    caches = [model.new_cache(3) for model in (checked, plain)]
    assert isinstance(caches[1], StaticKVCache) and caches[1].layers[0].k.shape[0] == 4    # the bucket's batch
    for model, cache in zip((checked, plain), caches):
        model.forward_ragged(list(prompt), cache)
    checked.ops.differences.clear()
    launches = []

    def spy(kernel, *args, **kwargs):
        mark = TRANSFERS.mark()
        out = real_launch(kernel, *args, **kwargs)
        launches.append((args, TRANSFERS.since(mark)["activations"]))
        return out
    real_launch = decode_module.launch
    monkeypatch.setattr(decode_module, "launch", spy)
    variants = len(VARIANTS)
    for i, tokens in enumerate(steps):
        slots = [0, 2] if i == 2 else [0, 1, 2]
        want = checked.forward_ragged([tokens[s:s + 1] for s in slots], caches[0], slots)
        launches.clear()
        got = plain.forward_ragged([tokens[s:s + 1] for s in slots], caches[1], slots)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)
        assert len(launches) == plain.config.num_hidden_layers
        for layer, (args, uploaded) in zip(caches[1].layers, launches):
            buffers = (layer.k, layer.v, layer.pos)
            assert all(a is b for a, b in zip(args[1:4], buffers))          # the cache's arrays themselves
            others = [a for a in args if isinstance(a, np.ndarray) and RESIDENT.lookup(a) is None]   # not the plans
            assert uploaded == sum(a.nbytes for a in others) < layer.k.nbytes
    assert 0 < checked.ops.differences["attention"] <= OP_TOL
    assert len(VARIANTS) == variants                                         # all inside the warmed buckets
    ring = caches[1].layers[1]                                               # positions 0..17 went through it
    assert ring.k.shape[3] == plain.config.window_keys == 16
    np.testing.assert_array_equal(np.sort(ring.pos[0]), np.arange(2, 18))
    assert (ring.pos[3] == EMPTY_POSITION).all()                             # the bucket's unused slot
