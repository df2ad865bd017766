"""Model level: KV-cache decode, ragged batches, generation, checkpoint round trip, expert subsets."""

import json
import os

import numpy as np
import pytest

from mimo_v2_flash import MiMoV2FlashModel, load_config
from mimo_v2_flash.model import sample


@pytest.fixture(scope="module")
def model():
    return MiMoV2FlashModel.random("tiny", seed=3)


def test_logits_shape_dtype_and_determinism(model):
    ids = np.arange(24).reshape(2, 12)
    logits = model.forward(ids)
    assert logits.shape == (2, 12, model.config.vocab_size) and logits.dtype == np.float32
    np.testing.assert_array_equal(logits, MiMoV2FlashModel.random("tiny", seed=3).forward(ids))
    assert not np.array_equal(logits, MiMoV2FlashModel.random("tiny", seed=4).forward(ids))


def test_batch_rows_are_independent(model):
    ids = np.random.default_rng(0).integers(0, 512, (3, 10))
    batched = model.forward(ids)
    for b in range(3):
        np.testing.assert_allclose(batched[b], model.forward(ids[b:b + 1])[0], rtol=1e-5, atol=1e-5)


def test_prefill_then_decode_equals_full_forward_past_the_window(model):
    window = model.config.window_keys                    # 16 keys: 50 tokens wrap the ring 3 times
    ids = np.random.default_rng(1).integers(0, 512, (2, 50))
    full = model.forward(ids)
    cache = model.new_cache(2)
    parts = [model.forward(ids[:, :window + 3], cache)]
    parts += [model.forward(ids[:, t:t + 1], cache) for t in range(window + 3, 50)]
    np.testing.assert_allclose(np.concatenate(parts, axis=1), full, rtol=1e-4, atol=1e-4)
    swa = cache.layers[1]
    assert swa.k.shape[1] == window                      # constant memory: only the window
    np.testing.assert_array_equal(np.sort(swa.pos[0]), np.arange(50 - window, 50))


def test_chunked_prefill_longer_than_window(model):
    ids = np.random.default_rng(2).integers(0, 512, (1, 60))
    full = model.forward(ids)
    cache = model.new_cache(1)
    chunks = [model.forward(ids[:, a:b], cache) for a, b in [(0, 25), (25, 26), (26, 60)]]
    np.testing.assert_allclose(np.concatenate(chunks, axis=1), full, rtol=1e-4, atol=1e-4)


def test_ragged_batch_equals_separate_sequences(model):
    rng = np.random.default_rng(5)
    histories = [rng.integers(0, 512, n) for n in (3, 20, 9)]
    news = [rng.integers(0, 512, n) for n in (5, 1, 17)]
    cache = model.new_cache(3)
    model.forward_ragged(histories, cache)
    got = model.forward_ragged(news, cache)
    for h, n, g in zip(histories, news, got):
        want = model.forward(np.concatenate([h, n])[None])[0, len(h):]
        np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(cache.seq_lens, [8, 21, 26])


def test_greedy_generation_matches_stepwise_argmax(model):
    prompt = np.random.default_rng(6).integers(0, 512, (2, 7))
    out = model.generate(prompt, max_new_tokens=6)
    seq = prompt.copy()
    for _ in range(6):
        nxt = model.forward(seq)[:, -1].argmax(-1)
        seq = np.concatenate([seq, nxt[:, None]], axis=1)
    np.testing.assert_array_equal(out, seq)


def test_generation_stop_tokens_and_sampling(model):
    prompt = np.random.default_rng(7).integers(0, 512, (2, 5))
    greedy = model.generate(prompt, max_new_tokens=5)
    stop = int(greedy[0, 6])                               # the second token row 0 generates
    stopped = model.generate(prompt, max_new_tokens=5, stop_tokens=[stop])
    assert (stopped[0, 6:] == stop).all()
    first = np.argmax(greedy[1, 5:] == stop) if stop in greedy[1, 5:] else 5
    np.testing.assert_array_equal(stopped[1, 5:5 + first], greedy[1, 5:5 + first])
    np.testing.assert_array_equal(model.generate(prompt, 4, temperature=1.0, top_k=1), greedy[:, :9])
    a = model.generate(prompt, 4, temperature=1.0, seed=11)
    np.testing.assert_array_equal(a, model.generate(prompt, 4, temperature=1.0, seed=11))


def test_top_p_keeps_the_smallest_nucleus():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    rng = np.random.default_rng(0)
    draws = {sample(logits, 1.0, None, 0.75, rng) for _ in range(300)}
    assert draws == {0, 1}
    assert {sample(logits, 1.0, 3, None, rng) for _ in range(300)} == {0, 1, 2}


def test_save_then_from_pretrained_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = MiMoV2FlashModel.from_pretrained(tmp_path)
    ids = np.arange(10)[None]
    np.testing.assert_array_equal(loaded.forward(ids), model.forward(ids))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["model.layers.1.mlp.experts.3.down_proj.weight"] == "model_1_linear_fc2.safetensors"
    assert index["weight_map"]["lm_head.weight"] == "model_final.safetensors"


def test_expert_subset_routes_only_to_loaded_experts(model, tmp_path):
    subset = [0, 2, 3, 5, 7, 8, 11, 13, 14]
    small = MiMoV2FlashModel.random("tiny", seed=3, expert_subset=subset)
    assert not any(".experts.1." in name for name in small.weights)
    seen = []
    small.expert_executor = lambda layer, x, ids, w: (seen.append(ids), small.ops.experts(x, layer, ids, w))[1]
    small.forward(np.arange(30)[None])
    assert set(np.concatenate(seen).ravel()) <= set(subset)
    # With every expert "in the subset" the model is exactly the full one.
    everything = MiMoV2FlashModel(model.config, model.weights, expert_subset=range(16))
    np.testing.assert_array_equal(everything.forward(np.arange(9)[None]), model.forward(np.arange(9)[None]))
    # A subset read from a checkpoint loads only those experts.
    model.save_pretrained(tmp_path)
    loaded = MiMoV2FlashModel.from_pretrained(tmp_path, expert_subset=subset)
    assert {n.split(".")[5] for n in loaded.weights if ".experts." in n} == {str(e) for e in subset}
    np.testing.assert_allclose(loaded.forward(np.arange(9)[None]),
                               MiMoV2FlashModel(model.config, model.weights, subset).forward(np.arange(9)[None]))


def test_expert_subset_errors():
    with pytest.raises(ValueError, match="at least num_experts_per_tok"):
        MiMoV2FlashModel.random("tiny", expert_subset=[0, 1, 2])
    with pytest.raises(ValueError, match="outside 0..15"):
        MiMoV2FlashModel.random("tiny", expert_subset=range(10, 20))


@pytest.mark.parametrize("ids, error, message", [
    (np.array([[1, 2, 512]]), ValueError, "token id 512 outside the vocabulary 0..511"),
    (np.array([[-1]]), ValueError, "token id -1"),
    (np.zeros((1, 0), np.int64), ValueError, "empty"),
    (np.array([[0.5]]), TypeError, "integer token ids"),
    (np.array([1, 2, 3]), ValueError, r"\[batch, tokens\]"),
])
def test_bad_token_input(model, ids, error, message):
    with pytest.raises(error, match=message):
        model.forward(ids)


def test_cache_batch_mismatch_and_position_limit(model):
    with pytest.raises(ValueError, match="cache holds 2 sequences"):
        model.forward(np.zeros((3, 1), np.int64), model.new_cache(2))
    short = MiMoV2FlashModel(load_config("tiny").replace(max_position_embeddings=8), model.weights)
    with pytest.raises(ValueError, match="max_position_embeddings=8"):
        short.forward(np.zeros((1, 9), np.int64))


def test_checkpoint_errors_name_what_is_wrong(model, tmp_path):
    model.save_pretrained(tmp_path)
    os.remove(tmp_path / "model_2_linear_fc1.safetensors")
    with pytest.raises(ValueError, match="model_2_linear_fc1.safetensors"):
        MiMoV2FlashModel.from_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"]["model.layers.3.self_attn.o_proj.weight"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="model.layers.3.self_attn.o_proj.weight"):
        MiMoV2FlashModel.from_pretrained(tmp_path)
