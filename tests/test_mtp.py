"""MTP layers and self-speculative decoding: loading, the MTP forward against the reference
functions, greedy speculative == plain greedy, the accept path, the sampling distribution, and
the cache rollback (docs/mtp.md)."""

from __future__ import annotations

import numpy as np
import pytest

from hub_fixture import write_hub_fixture
from mimo_v2_flash import MiMoV2FlashModel, load_config
from mimo_v2_flash import reference as ref
from mimo_v2_flash.checkpoint import CheckpointError, load_hub_checkpoint
from mimo_v2_flash.layer import TokenBatch
from mimo_v2_flash.model import sampling_probs
from mimo_v2_flash.mtp import MtpLayers, MtpUnavailable
from mimo_v2_flash.speculative import MtpSpeculator, speculative_loop
from mimo_v2_flash.weights import EMBED, LM_HEAD, mtp_prefix, mtp_tensors


@pytest.fixture(scope="module")
def tiny():
    return MiMoV2FlashModel.random("tiny", seed=0)


# ---- loading ---------------------------------------------------------------------------------------
def test_hub_checkpoint_loads_mtp_layers_exactly(tmp_path):
    hub = write_hub_fixture(tmp_path / "ckpt")
    config, weights = load_hub_checkpoint(hub.path)
    assert config.mtp_num_layers == 3
    names = [spec.name for spec in mtp_tensors(config)]
    assert len(names) == 3 * 14
    for name in names:
        np.testing.assert_array_equal(weights[name], hub.expected[name], err_msg=name)
    # FP8 blocks were really used for q/k/v and the MLP (the fixture's expected != the known floats).
    q = mtp_prefix(1) + "self_attn.k_proj.weight"
    assert not np.array_equal(hub.expected[q], hub.known[q])
    model = MiMoV2FlashModel.from_pretrained(hub.path)
    out, timing = model.generate(np.array([[5, 6, 7]]), max_new_tokens=4, speculative="mtp", draft_tokens=3,
                                 return_timing=True)
    np.testing.assert_array_equal(out, model.generate(np.array([[5, 6, 7]]), max_new_tokens=4))


def test_checkpoint_without_mtp_loads_and_refuses_speculation(tmp_path):
    hub = write_hub_fixture(tmp_path / "ckpt", mtp=False)
    model = MiMoV2FlashModel.from_pretrained(hub.path)
    assert not any(".mtp." in name for name in model.weights)
    model.generate(np.array([[1, 2]]), max_new_tokens=2)
    with pytest.raises(MtpUnavailable, match="model_mtp.safetensors"):
        model.generate(np.array([[1, 2]]), max_new_tokens=2, speculative="mtp")


def test_partial_mtp_index_is_an_error(tmp_path):
    import json
    hub = write_hub_fixture(tmp_path / "ckpt")
    index_path = tmp_path / "ckpt" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"][mtp_prefix(2) + "eh_proj.weight"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="eh_proj"):
        load_hub_checkpoint(hub.path)


def test_bad_speculative_arguments(tiny):
    with pytest.raises(ValueError, match="supported methods"):
        tiny.generate(np.array([[1]]), max_new_tokens=2, speculative="eagle")
    with pytest.raises(ValueError, match="number of MTP layers"):
        tiny.generate(np.array([[1]]), max_new_tokens=2, speculative="mtp", draft_tokens=4)
    no_mtp = MiMoV2FlashModel.random(load_config("tiny").replace(mtp_num_layers=0))
    with pytest.raises(MtpUnavailable, match="mtp_num_layers=0"):
        no_mtp.generate(np.array([[1]]), max_new_tokens=2, speculative="mtp", draft_tokens=1)


# ---- the MTP forward ---------------------------------------------------------------------------------
def reference_mtp_layer(config, weights, index, tokens, hidden, positions):
    """MTP layer `index` over one whole sequence, written with the reference functions only."""
    p = mtp_prefix(index)
    w = lambda name: weights[p + name]                                  # noqa: E731
    heads, kv, d, dv = (config.swa_num_attention_heads, config.swa_num_key_value_heads,
                        config.swa_head_dim, config.swa_v_head_dim)
    eps = config.layernorm_epsilon
    x = ref.mtp_combine(weights[EMBED][tokens], hidden, w("enorm.weight"), w("hnorm.weight"),
                        w("eh_proj.weight"), eps)
    xn = ref.rmsnorm(x, w("input_layernorm.weight"), eps)
    n = len(tokens)
    q = ref.apply_partial_rope(ref.linear(xn, w("self_attn.q_proj.weight")).reshape(n, heads, d), positions,
                               config.rotary_dim, config.swa_rope_theta)
    k = ref.apply_partial_rope(ref.linear(xn, w("self_attn.k_proj.weight")).reshape(n, kv, d), positions,
                               config.rotary_dim, config.swa_rope_theta)
    v = ref.linear(xn, w("self_attn.v_proj.weight")).reshape(n, kv, dv) * np.float32(config.attention_value_scale)
    attn = ref.attention(q, k, v, positions, positions, config.softmax_scale, config.window_keys,
                         w("self_attn.attention_sink_bias"))
    h = x + ref.linear(attn.reshape(n, heads * dv), w("self_attn.o_proj.weight"))
    h2 = h + ref.swiglu(ref.rmsnorm(h, w("pre_mlp_layernorm.weight"), eps), w("mlp.gate_proj.weight"),
                        w("mlp.up_proj.weight"), w("mlp.down_proj.weight"))
    return ref.mtp_logits(h2, w("final_layernorm.weight"), weights[LM_HEAD], eps), h2


@pytest.mark.parametrize("index", [0, 2])
def test_mtp_layer_with_cache_matches_reference_functions(tiny, index):
    """Chunks through the ring-buffer cache (window 16 wrapped) == one reference pass."""
    config, mtp = tiny.config, MtpLayers(tiny)
    rng = np.random.default_rng(3)
    n = 40
    tokens = rng.integers(0, config.vocab_size, n)
    hidden = rng.standard_normal((n, config.hidden_size)).astype(np.float32)
    want_logits, want_h = reference_mtp_layer(config, tiny.weights, index, tokens, hidden, np.arange(n))
    cache = mtp.new_cache(1)
    got_logits, got_h = [], []
    for start, stop in [(0, 21), (21, 22), (22, 25), (25, 40)]:
        batch = TokenBatch([0], [0], [stop - start], np.arange(start, stop))
        logits, h = mtp.forward(index, tokens[start:stop], hidden[start:stop], batch, cache)
        got_logits.append(logits)
        got_h.append(h)
    np.testing.assert_allclose(np.concatenate(got_h), want_h, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.concatenate(got_logits), want_logits, rtol=1e-4, atol=1e-4)


# ---- greedy speculative == plain greedy ----------------------------------------------------------
@pytest.mark.parametrize("preset,batch,draft", [("tiny", 1, 1), ("tiny", 1, 3), ("tiny", 4, 2),
                                                ("tiny", 4, 4), ("small", 4, 3)])
def test_greedy_speculative_equals_plain_greedy(preset, batch, draft):
    """Random weights (drafts mostly rejected), ragged batch via a stop token, window wrapped."""
    config = load_config(preset).replace(mtp_num_layers=4)
    model = MiMoV2FlashModel.random(config, seed=1)
    rng = np.random.default_rng(batch + draft)
    prompts = rng.integers(0, config.vocab_size, (batch, 2 * config.sliding_window + 3))
    plain = model.generate(prompts, max_new_tokens=12)
    stop = [int(plain[-1, prompts.shape[1] + 4])] if batch > 1 else None   # the last row stops early
    plain = model.generate(prompts, max_new_tokens=12, stop_tokens=stop)
    spec, timing = model.generate(prompts, max_new_tokens=12, stop_tokens=stop, speculative="mtp",
                                  draft_tokens=draft, return_timing=True)
    np.testing.assert_array_equal(spec, plain)
    stats = timing["speculative"]
    assert stats["drafted"] > 0 and stats["main_passes"] <= 11


def predicting_mtp_model(preset: str, attention_scale: float, seed: int = 0) -> MiMoV2FlashModel:
    """A model whose next token depends almost only on the current one (o_proj scaled down,
    MLP outputs zero) and whose MTP layers compute exactly that map: o_proj and down_proj zero,
    eh_proj = [I, 0], enorm = 1, final_layernorm = model.norm. Drafts are then (nearly) right."""
    config = load_config(preset)
    model = MiMoV2FlashModel.random(config, seed=seed)
    w = model.weights
    h = config.hidden_size
    for name in list(w):
        if name.endswith("o_proj.weight"):
            w[name] = w[name] * (0.0 if ".mtp." in name else attention_scale)
        if name.endswith("down_proj.weight"):
            w[name] = np.zeros_like(w[name])
    for index in range(config.mtp_num_layers):
        p = mtp_prefix(index)
        w[p + "eh_proj.weight"] = np.concatenate([np.eye(h), np.zeros((h, h))], axis=1).astype(np.float32)
        w[p + "enorm.weight"] = np.ones(h, np.float32)
        w[p + "final_layernorm.weight"] = w["model.norm.weight"].copy()
    return model


@pytest.mark.parametrize("batch,draft", [(1, 3), (4, 2)])
def test_accept_path_with_predicting_mtp_layers(batch, draft):
    model = predicting_mtp_model("tiny", attention_scale=0.3)
    rng = np.random.default_rng(7)
    prompts = rng.integers(0, model.config.vocab_size, (batch, 20))
    plain = model.generate(prompts, max_new_tokens=24)
    spec, timing = model.generate(prompts, max_new_tokens=24, speculative="mtp", draft_tokens=draft,
                                  return_timing=True)
    np.testing.assert_array_equal(spec, plain)
    stats = timing["speculative"]
    # Most drafts are right (whole steps accepted), some are not (the rollback path runs too).
    assert stats["mean_acceptance_length"] > 1 + 0.5 * draft, stats
    assert stats["accepted"] < stats["drafted"], stats
    assert stats["tokens_per_main_pass"] > 1.5 * batch, stats


# ---- sampling: rejection sampling keeps the distribution --------------------------------------------
def test_speculative_sampling_matches_the_target_distribution():
    """The first two sampled tokens after one prompt, 1500 independent sequences: the joint distribution of
    (t1, t2) matches the exact one from the main model (chi-square, ~5 sigma bound), while the
    same statistic rejects a biased sampler (drafts always kept)."""
    config = load_config("tiny").replace(vocab_size=8, num_hidden_layers=2, hybrid_layer_pattern=[0, 1],
                                         moe_layer_freq=[0, 1], mtp_num_layers=2)
    model = MiMoV2FlashModel.random(config, seed=4)
    temperature, vocab = 2.0, config.vocab_size
    prompt = np.array([3, 1, 4, 1, 5])
    p1 = sampling_probs(model.forward(prompt[None])[0, -1], temperature, None, None)
    seconds = model.forward(np.concatenate([np.tile(prompt, (vocab, 1)), np.arange(vocab)[:, None]], axis=1))
    p2 = np.stack([sampling_probs(row[-1], temperature, None, None) for row in seconds])
    exact = (p1[:, None] * p2).reshape(-1)

    n = 1500
    prompts = np.tile(prompt, (n, 1))

    def chi_square(speculator):
        out, _, _ = speculative_loop(speculator, prompts, 3, set())     # t2 is drafted and verified
        first, second = out[:, len(prompt)], out[:, len(prompt) + 1]
        counts = np.bincount(first * vocab + second, minlength=vocab * vocab)
        seen = exact > 0
        assert counts[~seen].sum() == 0
        return float(((counts[seen] - n * exact[seen]) ** 2 / (n * exact[seen])).sum()), speculator.stats

    stat, stats = chi_square(MtpSpeculator(model, 1, temperature, rng=np.random.default_rng(0)))
    df = vocab * vocab - 1
    bound = df + 5 * np.sqrt(2 * df)
    assert 0 < stats.accepted < stats.drafted         # both paths of the rejection sampler ran
    print("chi-square", stat, "bound", bound, "acceptance", stats.accepted / stats.drafted)
    assert stat < bound, (stat, bound)

    class AlwaysKeep(MtpSpeculator):
        def _accept(self, drafts, draft_probs, logits):
            return len(drafts), drafts + [self._choose(logits[len(drafts)])]

    biased, _ = chi_square(AlwaysKeep(model, 1, temperature, rng=np.random.default_rng(0)))
    print("biased chi-square", biased)
    assert biased > bound, (biased, bound)


# ---- cache rollback --------------------------------------------------------------------------------
def cached_entries(layer_cache, seq):
    """{position: (k, v)} of one sequence's valid cache slots."""
    valid = np.nonzero(layer_cache.pos[seq] >= 0)[0]
    return {int(layer_cache.pos[seq, s]): (layer_cache.k[seq, s], layer_cache.v[seq, s]) for s in valid}


def assert_same_entries(got, want, what):
    assert sorted(got) == sorted(want), what
    for position in want:
        np.testing.assert_allclose(got[position][0], want[position][0], rtol=1e-4, atol=1e-4,
                                   err_msg=f"{what} position {position} keys")
        np.testing.assert_allclose(got[position][1], want[position][1], rtol=1e-4, atol=1e-4,
                                   err_msg=f"{what} position {position} values")


@pytest.mark.parametrize("draft", [1, 3])
def test_caches_after_rejections_equal_plain_decoding(tiny, draft):
    """After speculative steps with rejections (window of 16 wrapped), every main layer's cache
    holds exactly the entries of plain decoding of the committed tokens, and every MTP layer's
    cache exactly those of running it on the committed tokens from scratch."""
    config = tiny.config
    rng = np.random.default_rng(11)
    prompts = [rng.integers(0, config.vocab_size, n) for n in (19, 6)]
    speculator = MtpSpeculator(tiny, draft)
    speculator.prefill(prompts, 30)                              # ragged prompts: 19 and 6 tokens
    for _ in range(6):
        speculator.step([0, 1])
    assert speculator.stats.accepted < speculator.stats.drafted      # rejections happened
    plain = tiny.new_cache(2)
    committed = [s.tokens for s in speculator.sequences]
    _, plain_hidden = tiny.forward_ragged([t[:-1] for t in committed], plain, [0, 1], return_hidden=True)
    for layer in range(config.num_hidden_layers):
        for seq in (0, 1):
            assert_same_entries(cached_entries(speculator.cache.layers[layer], seq),
                                cached_entries(plain.layers[layer], seq), f"main layer {layer} seq {seq}")
    np.testing.assert_array_equal(speculator.cache.seq_lens, [len(t) - 1 for t in committed])
    mtp = speculator.mtp
    for index in range(draft):
        fresh = mtp.new_cache(2)
        for seq, s in enumerate(speculator.sequences):
            done = s.mtp_done[index]
            assert done >= len(s.tokens) - 1 - index - (draft + 1)     # at most one step behind
            batch = TokenBatch([seq], [0], [done], np.arange(done))
            mtp.forward(index, np.array(s.tokens[index + 1:index + 1 + done]), plain_hidden[seq][:done],
                        batch, fresh)
            assert_same_entries(cached_entries(speculator.mtp_cache.layers[index], seq),
                                cached_entries(fresh.layers[index], seq), f"MTP layer {index} seq {seq}")


# ---- through the NKI kernels (simulator) ---------------------------------------------------------
def test_mtp_layer_through_kernels_matches_reference(tiny):
    """The MTP layer on NkiOps (bf16 activations between kernels) within 2e-2 of the reference."""
    nki = MiMoV2FlashModel(tiny.config, tiny.weights, backend="nki")
    rng = np.random.default_rng(5)
    n = 24
    tokens = rng.integers(0, tiny.config.vocab_size, n)
    hidden = rng.standard_normal((n, tiny.config.hidden_size)).astype(np.float32)
    for index in (0, 1):
        outs = []
        kernels = MtpLayers(nki)
        for mtp in (kernels, MtpLayers(tiny)):
            cache = mtp.new_cache(1)
            outs.append([np.concatenate(parts) for parts in zip(*[
                mtp.forward(index, tokens[a:b], hidden[a:b], TokenBatch([0], [0], [b - a], np.arange(a, b)), cache)
                for a, b in [(0, 20), (20, 24)]])])
        for got, want in zip(*outs):
            assert np.abs(got - want).max() <= 2e-2 * np.abs(want).max()
        # Every op of the layer went through a kernel.
        assert {"embed", "rmsnorm", "linear", "norm_qkv_rope", "attention", "linear_add_rmsnorm",
                "dense_mlp"} <= set(kernels.ops.cost_summary()["ops"])


@pytest.mark.parametrize("predicting", [False, True])
def test_greedy_speculative_through_kernels_equals_plain(predicting):
    """backend="nki": speculative greedy == plain greedy on the same backend, ragged batch of 2,
    window wrapped; with random MTP layers (rejections) and with predicting ones (acceptances)."""
    if predicting:
        weights = predicting_mtp_model("tiny", attention_scale=0.3).weights
    else:
        weights = MiMoV2FlashModel.random("tiny", seed=2).weights
    model = MiMoV2FlashModel(load_config("tiny"), weights, backend="nki")
    prompts = np.random.default_rng(2).integers(0, model.config.vocab_size, (2, 20))
    plain = model.generate(prompts, max_new_tokens=10)
    spec, timing = model.generate(prompts, max_new_tokens=10, speculative="mtp", draft_tokens=2,
                                  return_timing=True)
    np.testing.assert_array_equal(spec, plain)
    stats = timing["speculative"]
    assert (stats["accepted"] > stats["drafted"] / 2) if predicting else stats["accepted"] < stats["drafted"]


def test_prepare_weights_replicates_mtp_layers_on_every_rank(tmp_path):
    from mimo_prepare_weights.convert import convert
    from mimo_v2_flash.checkpoint import PreparedCheckpoint
    hub = write_hub_fixture(tmp_path / "hub")
    convert(hub.path, tmp_path / "out", world_size=2, progress=False)
    prepared = PreparedCheckpoint(tmp_path / "out")
    for rank in range(2):
        _, weights = prepared.load(rank)
        for spec in mtp_tensors(hub.config):
            np.testing.assert_allclose(weights[spec.name], hub.expected[spec.name], rtol=2 ** -8, atol=1e-6)
    model = MiMoV2FlashModel.from_pretrained(tmp_path / "out")
    prompts = np.array([[3, 4, 5, 6]])
    np.testing.assert_array_equal(model.generate(prompts, max_new_tokens=6, speculative="mtp", draft_tokens=2),
                                  model.generate(prompts, max_new_tokens=6))
    # Without MTP layers in the source, the prepared files have none either.
    no_mtp = write_hub_fixture(tmp_path / "hub2", mtp=False)
    convert(no_mtp.path, tmp_path / "out2", world_size=2, progress=False)
    model = MiMoV2FlashModel.from_pretrained(tmp_path / "out2")
    with pytest.raises(MtpUnavailable):
        model.generate(prompts, max_new_tokens=2, speculative="mtp")


# ---- under torchrun, expert parallel ----------------------------------------------------------------
@pytest.mark.parametrize("world,draft", [(2, 3), (4, 2)])
def test_speculative_under_torchrun_equals_single_process_plain_greedy(world, draft, tmp_path):
    """run_example --speculative mtp on 2 and 4 ranks (3 sequences: at 4 ranks one rank idles and
    still joins every verify pass's MoE collectives): the tokens of plain single-process greedy."""
    import json
    import os
    import subprocess
    import sys

    from test_parallel_torchrun import REPO, launch
    common = ["run_example.py", "--mode", "random", "--batch", "3", "--seq-len", "20", "--max-new-tokens", "8",
              "--seed", "3"]
    single = subprocess.run([sys.executable, *common, "--json", str(tmp_path / "single.json")], cwd=REPO,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert single.returncode == 0, single.stderr
    expected = json.loads((tmp_path / "single.json").read_text())["tokens"]
    code, _, output = launch(world, [*common, "--speculative", "mtp", "--draft-tokens", str(draft),
                                     "--json", str(tmp_path / "ep.json")], 400)
    assert code == 0, output[-3000:]
    ep = json.loads((tmp_path / "ep.json").read_text())
    assert ep["tokens"] == expected
    stats = [s for s in ep["speculative"] if s is not None]
    assert len(stats) == world and sum(s["drafted"] for s in stats) > 0
    calls = [r["layer_calls"] for r in ep["ep"]["ranks"]]
    assert calls == [calls[0]] * world             # every rank took part in every MoE layer
    assert "speculative[rank 0]" in output


def test_run_example_single_process_speculative_prints_statistics(capsys):
    import run_example
    argv = ["--mode", "random", "--config", "tiny", "--batch", "2", "--seq-len", "8", "--max-new-tokens", "6",
            "--speculative", "mtp", "--draft-tokens", "2", "--no-progress"]
    assert run_example.main(argv) == 0
    spec = capsys.readouterr().out
    assert run_example.main(argv[:-5] + ["--no-progress"]) == 0
    plain = capsys.readouterr().out
    assert "tokens per main-model pass" in spec and "KV cache" in spec

    def tokens(out):
        return [line.split(None, 1)[1] for line in out.splitlines() if line.startswith("generated[")]
    assert tokens(spec) == tokens(plain) and len(tokens(spec)) == 2
