"""Checkpoint reading: safetensors I/O, FP8 formats and blocks, the fused K/V scale grouping, the
Hub-layout fixture against its known weights, and every bad-input error."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings

import ml_dtypes
import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from hub_fixture import rewrite_shard, to_numpy, to_torch, write_hub_fixture
from mimo_v2_flash import MiMoV2FlashModel, fp8
from mimo_v2_flash.checkpoint import (PER_KV_HEAD, UNIFORM, CheckpointError, HubCheckpoint,
                                      ScaleGroupingWarning, kv_row_groups, load_hub_checkpoint)
from mimo_v2_flash.safetensors_io import SafetensorsError, SafetensorsFile, SafetensorsWriter, TensorEntry
from mimo_v2_flash.weights import model_tensors

# e4m3 keeps 3 mantissa bits: rounding a normal value moves it by at most 2^-4 of itself; below
# the smallest normal (2^-6) the spacing is 2^-9, so the absolute error is at most 2^-10 * scale.
E4M3_RELATIVE = 2.0 ** -4
E4M3_SUBNORMAL_ABS = 2.0 ** -10


def within_e4m3(got, want, scale):
    return np.abs(got - want) <= E4M3_RELATIVE * np.abs(want) + E4M3_SUBNORMAL_ABS * scale + 1e-12


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    return write_hub_fixture(tmp_path_factory.mktemp("hub") / "ckpt")


@pytest.fixture
def hub_copy(hub, tmp_path):
    """A private copy of the fixture for a test that corrupts it."""
    shutil.copytree(hub.path, tmp_path / "ckpt")
    return str(tmp_path / "ckpt")


# ---- FP8 formats and blocks ----------------------------------------------------------------------
def test_which_e4m3_is_which():
    assert float(ml_dtypes.finfo(fp8.OCP_E4M3.dtype).max) == 448.0 == fp8.OCP_E4M3.max
    assert float(ml_dtypes.finfo(fp8.TRAINIUM_E4M3.dtype).max) == 240.0 == fp8.TRAINIUM_E4M3.max
    codes = np.arange(256, dtype=np.uint8)
    ocp = codes.view(fp8.OCP_E4M3.dtype).astype(np.float32)
    trn = codes.view(fp8.TRAINIUM_E4M3.dtype).astype(np.float32)
    small = np.abs(ocp) <= 240
    np.testing.assert_array_equal(ocp[small], trn[small])     # same bits below 240
    for fmt, values in ((fp8.OCP_E4M3, ocp), (fp8.TRAINIUM_E4M3, trn)):   # the decode table
        np.testing.assert_array_equal(fp8.to_float32(codes.view(fmt.dtype)), values)
    assert np.isinf(np.float32(256).astype(fp8.TRAINIUM_E4M3.dtype).astype(np.float32))


@pytest.mark.parametrize("shape", [(128, 128), (130, 300), (1, 5), (384, 256)])
@pytest.mark.parametrize("fmt", [fp8.OCP_E4M3, fp8.TRAINIUM_E4M3], ids=lambda f: f.name)
def test_quantize_blocks_round_trip(shape, fmt):
    rng = np.random.default_rng(1)
    w = (rng.standard_normal(shape) * np.exp(rng.standard_normal(shape))).astype(np.float32)
    w[:, :3] = 0.0     # includes zero columns and, for (1, 5)-like shapes, near-empty blocks
    q, scale = fp8.quantize_blocks(w, fmt)
    assert q.dtype == fmt.dtype and scale.shape == (-(-shape[0] // 128), -(-shape[1] // 128))
    assert np.abs(q.astype(np.float32)).max() == fmt.max     # the largest block value hits the top
    back = fp8.dequantize(q, scale)
    expanded = np.repeat(np.repeat(scale, 128, 0), 128, 1)[: shape[0], : shape[1]]
    assert within_e4m3(back, w, expanded).all()


def test_quantize_rejects_non_finite():
    w = np.ones((4, 4), np.float32)
    w[1, 2] = np.inf
    with pytest.raises(fp8.Fp8RangeError, match="non-finite"):
        fp8.quantize_blocks(w, fp8.TRAINIUM_E4M3)


def test_fused_kv_row_groups_follow_spec():
    """Full layer, 2 KV heads, d=192, dv=128: K rows 0..127 -> k_scale[2h], K 128..191 and
    V 0..63 -> k_scale[2h+1], V 64..127 -> v_scale[h] (index 4 + h in [k_scale; v_scale])."""
    k, v = kv_row_groups(2, 192, 128, PER_KV_HEAD)
    for h in range(2):
        assert (k[h * 192: h * 192 + 128] == 2 * h).all()
        assert (k[h * 192 + 128: (h + 1) * 192] == 2 * h + 1).all()
        assert (v[h * 128: h * 128 + 64] == 2 * h + 1).all()
        assert (v[h * 128 + 64: (h + 1) * 128] == 4 + h).all()
    k, v = kv_row_groups(4, 192, 128, UNIFORM)
    np.testing.assert_array_equal(k, np.arange(768) // 128)
    np.testing.assert_array_equal(v, 6 + np.arange(512) // 128)


# ---- safetensors I/O -----------------------------------------------------------------------------
def test_writer_output_reads_with_the_safetensors_package(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"a.fp8": rng.standard_normal((3, 130)).astype(ml_dtypes.float8_e4m3fn),
              "b.bf16": rng.standard_normal((7,)).astype(ml_dtypes.bfloat16),
              "c.f32": rng.standard_normal((2, 2, 2)).astype(np.float32),
              "d.trn": np.float32([1.5, -240, 0.25]).astype(ml_dtypes.float8_e4m3)}
    entries = [TensorEntry(n, {"a.fp8": "F8_E4M3", "b.bf16": "BF16", "c.f32": "F32", "d.trn": "F8_E4M3"}[n],
                           a.shape) for n, a in arrays.items()]
    with SafetensorsWriter(tmp_path / "x.safetensors", entries, {"k": "v"}) as writer:
        for name, a in arrays.items():
            writer.write(name, a)
        digest = writer.finish()
    assert not os.path.exists(tmp_path / "x.safetensors.partial")
    loaded = {n: to_numpy(t) for n, t in load_file(tmp_path / "x.safetensors").items()}
    for name, a in arrays.items():
        np.testing.assert_array_equal(loaded[name].astype(np.float32), a.astype(np.float32))
    assert digest == hashlib.sha256((tmp_path / "x.safetensors").read_bytes()).hexdigest()


def test_reader_reads_files_of_the_safetensors_package(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"w": rng.standard_normal((129, 17)).astype(ml_dtypes.float8_e4m3fn),
              "s": rng.standard_normal((2, 1)).astype(np.float32),
              "n": rng.standard_normal((9,)).astype(ml_dtypes.bfloat16)}
    save_file({k: to_torch(a) for k, a in arrays.items()}, tmp_path / "y.safetensors")
    f = SafetensorsFile(tmp_path / "y.safetensors")
    for name, a in arrays.items():
        assert f.read(name).dtype == a.dtype
        np.testing.assert_array_equal(np.asarray(f.read(name)).astype(np.float32), a.astype(np.float32))


def test_writer_rejects_out_of_plan_and_leaves_no_file(tmp_path):
    entries = [TensorEntry("a", "F32", (2,)), TensorEntry("b", "F32", (3,))]
    with pytest.raises(SafetensorsError, match="expected tensor 'a' next"):
        with SafetensorsWriter(tmp_path / "z.safetensors", entries) as writer:
            writer.write("b", np.zeros(3, np.float32))
    with pytest.raises(SafetensorsError, match="planned F32 \\[3\\]"):
        with SafetensorsWriter(tmp_path / "z.safetensors", entries) as writer:
            writer.write("a", np.zeros(2, np.float32))
            writer.write("b", np.zeros(4, np.float32))
    with pytest.raises(SafetensorsError, match="only 1 of 2"):
        with SafetensorsWriter(tmp_path / "z.safetensors", entries) as writer:
            writer.write("a", np.zeros(2, np.float32))
            writer.finish()
    assert os.listdir(tmp_path) == []



def test_writer_copies_stored_bytes_from_another_file(tmp_path):
    rng = np.random.default_rng(1)
    arrays = {"w": rng.standard_normal((129, 17)).astype(ml_dtypes.float8_e4m3fn),
              "n": rng.standard_normal((9,)).astype(ml_dtypes.bfloat16)}
    save_file({k: to_torch(a) for k, a in arrays.items()}, tmp_path / "src.safetensors")
    source = SafetensorsFile(tmp_path / "src.safetensors")
    # chunks of 100 bytes cover the 2193-byte tensor exactly, in order
    chunks = [bytes(c) for c in source.iter_bytes("w", chunk_bytes=100)]
    assert [len(c) for c in chunks] == [100] * 21 + [93]
    assert b"".join(chunks) == arrays["w"].tobytes()

    entries = [TensorEntry("n", "BF16", (9,)), TensorEntry("w", "F8_E4M3", (129, 17))]
    with SafetensorsWriter(tmp_path / "copy.safetensors", entries) as writer:
        writer.copy(source, "n")
        writer.copy(source, "w")
        writer.finish()
    copied = {n: to_numpy(t) for n, t in load_file(tmp_path / "copy.safetensors").items()}
    for name, a in arrays.items():
        assert copied[name].tobytes() == a.tobytes()

    with pytest.raises(SafetensorsError, match="src.safetensors: has no tensor 'x' to copy"):
        with SafetensorsWriter(tmp_path / "bad.safetensors", [TensorEntry("x", "BF16", (9,))]) as writer:
            writer.copy(source, "x")
    with pytest.raises(SafetensorsError, match=r"tensor 'n' is BF16 \[9\], planned BF16 \[8\]"):
        with SafetensorsWriter(tmp_path / "bad.safetensors", [TensorEntry("n", "BF16", (8,))]) as writer:
            writer.copy(source, "n")
    assert sorted(os.listdir(tmp_path)) == ["copy.safetensors", "src.safetensors"]

# ---- the Hub fixture -----------------------------------------------------------------------------
def test_fixture_has_the_hub_layout(hub):
    files = set(os.listdir(hub.path))
    assert {"config.json", "model.safetensors.index.json", "model_embedding.safetensors",
            "model_final.safetensors", "model_0.safetensors", "model_3_linear_fc2.safetensors"} <= files
    config = json.load(open(os.path.join(hub.path, "config.json")))
    assert "layernorm_epsilon" in config and "hybrid_layer_pattern" in config
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    k = SafetensorsFile(os.path.join(hub.path, "model_0.safetensors"))
    assert k.entries["model.layers.0.self_attn.k_proj.weight"].dtype == "F8_E4M3"
    # 2 KV heads x 192 rows: the uniform grid would have 3 scale rows, the fused one has 4
    assert k.entries["model.layers.0.self_attn.k_proj.weight_scale_inv"].shape == (4, 2)
    assert k.entries["model.layers.0.self_attn.v_proj.weight_scale_inv"].shape == (2, 2)
    assert k.entries["model.layers.0.self_attn.o_proj.weight"].dtype == "BF16"


def test_grouping_detected_per_layer(hub):
    checkpoint = HubCheckpoint(hub.path)
    groupings = [checkpoint.kv_grouping(i) for i in range(hub.config.num_hidden_layers)]
    assert groupings == [PER_KV_HEAD if not hub.config.is_swa(i) else UNIFORM
                         for i in range(hub.config.num_hidden_layers)]


def test_dequantised_tensors_match_known_weights(hub):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ScaleGroupingWarning)
        config, weights = load_hub_checkpoint(hub.path)
    assert set(weights) == set(hub.known)
    for name, got in weights.items():
        # exact: the same float32 product q * scale the fixture computed
        np.testing.assert_allclose(got, hub.expected[name], rtol=1e-6, atol=0, err_msg=name)
        if name in hub.scales:
            assert within_e4m3(got, hub.known[name], hub.scales[name]).all(), name
        else:   # BF16 keeps 8 significant bits: relative error <= 2^-9
            np.testing.assert_allclose(got, hub.known[name], rtol=2.0 ** -8, atol=0, err_msg=name)


def test_reading_full_layer_kv_uniformly_would_be_wrong(hub):
    """The grouping matters: forcing the uniform grid on a fused full layer misreads V."""
    checkpoint = HubCheckpoint(hub.path)
    checkpoint._groupings[0] = UNIFORM
    spec = next(s for s in model_tensors(hub.config) if s.name == "model.layers.0.self_attn.v_proj.weight")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ScaleGroupingWarning)
        wrong = checkpoint.read(spec)
    assert not within_e4m3(wrong, hub.known[spec.name], hub.scales[spec.name]).all()


def test_reader_detects_uniform_full_layers(tmp_path):
    fixture = write_hub_fixture(tmp_path / "uniform", full_kv_grouping="uniform")
    checkpoint = HubCheckpoint(fixture.path)
    assert checkpoint.kv_grouping(0) == UNIFORM
    _, weights = load_hub_checkpoint(fixture.path, experts=[], layers=[0])
    for name in ("model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight"):
        np.testing.assert_allclose(weights[name], fixture.expected[name], rtol=1e-6, atol=0)


def test_model_logits_match_reference_built_from_known_weights(hub):
    model = MiMoV2FlashModel.from_pretrained(hub.path)
    reference = MiMoV2FlashModel(hub.config, hub.expected)
    ids = np.random.default_rng(0).integers(0, hub.config.vocab_size, (2, 9))
    want = reference.forward(ids)
    np.testing.assert_allclose(model.forward(ids), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_self_check_warns_on_blocks_far_below_448(hub_copy):
    def shrink_one_block(tensors):
        name = "model.layers.3.self_attn.k_proj.weight"
        q = tensors[name].astype(np.float32)
        q[:128, :128] /= 4          # this block now peaks at 112 instead of 448
        tensors[name] = q.astype(ml_dtypes.float8_e4m3fn)
    rewrite_shard(hub_copy, "model_3.safetensors", shrink_one_block)
    with pytest.warns(ScaleGroupingWarning, match="layer 3: 1 of 12 K/V scale blocks"):
        load_hub_checkpoint(hub_copy, experts=[], layers=[3])


# ---- bad input -----------------------------------------------------------------------------------
def edit_index(path, edit):
    index_path = os.path.join(path, "model.safetensors.index.json")
    index = json.load(open(index_path))
    edit(index["weight_map"])
    json.dump(index, open(index_path, "w"))


def test_missing_shard(hub_copy):
    os.remove(os.path.join(hub_copy, "model_2_linear_fc1.safetensors"))
    with pytest.raises(CheckpointError, match=r"model_2_linear_fc1.safetensors: shard file missing"):
        load_hub_checkpoint(hub_copy)


def test_tensor_listed_but_absent(hub_copy):
    rewrite_shard(hub_copy, "model_1.safetensors", lambda t: t.pop("model.layers.1.mlp.gate.weight"))
    with pytest.raises(CheckpointError, match=r"model_1.safetensors: tensor 'model.layers.1.mlp.gate.weight' "
                                              "listed in the index is absent"):
        load_hub_checkpoint(hub_copy)


def test_tensor_not_listed(hub_copy):
    edit_index(hub_copy, lambda m: m.pop("model.norm.weight"))
    with pytest.raises(CheckpointError, match=r"index.json: tensor 'model.norm.weight' is not listed"):
        load_hub_checkpoint(hub_copy)


def test_shape_disagrees_with_config(hub_copy):
    def cut(tensors):
        tensors["model.layers.2.input_layernorm.weight"] = tensors["model.layers.2.input_layernorm.weight"][:-1]
    rewrite_shard(hub_copy, "model_2.safetensors", cut)
    with pytest.raises(CheckpointError, match=r"'model.layers.2.input_layernorm.weight' has shape \[255\], "
                                              r"the config expects \[256\]"):
        load_hub_checkpoint(hub_copy)


def test_dtype_disagrees_with_table(hub_copy):
    def o_proj_as_fp8(tensors):
        name = "model.layers.1.self_attn.o_proj.weight"
        tensors[name] = tensors[name].astype(np.float32).astype(ml_dtypes.float8_e4m3fn)
    rewrite_shard(hub_copy, "model_1.safetensors", o_proj_as_fp8)
    with pytest.raises(CheckpointError, match=r"'model.layers.1.self_attn.o_proj.weight' has dtype F8_E4M3; "
                                              "the table stores it as BF16"):
        load_hub_checkpoint(hub_copy)


def test_kv_scale_shape_fits_no_grouping(hub_copy):
    def extra_row(tensors):
        name = "model.layers.0.self_attn.k_proj.weight_scale_inv"
        tensors[name] = np.concatenate([tensors[name], tensors[name][:1]])
    rewrite_shard(hub_copy, "model_0.safetensors", extra_row)
    with pytest.raises(CheckpointError, match=r"layer 0 K/V scales have 5 and 2 rows, which fit no grouping: "
                                              r"uniform .* need 3 and 2, fused per-KV-head .* need 4 and 2"):
        load_hub_checkpoint(hub_copy)


def test_projection_scale_shape_fits_no_grouping(hub_copy):
    def drop_row(tensors):
        name = "model.layers.2.mlp.experts.5.down_proj.weight_scale_inv"
        tensors[name] = tensors[name][:1]
    rewrite_shard(hub_copy, "model_2_linear_fc2.safetensors", drop_row)
    with pytest.raises(CheckpointError, match=r"experts.5.down_proj.weight_scale_inv' has shape \[1, 1\], "
                                              r"which fits no grouping of \[256, 128\]"):
        load_hub_checkpoint(hub_copy)


def test_truncated_shard(hub_copy):
    path = os.path.join(hub_copy, "model_final.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-100])
    with pytest.raises(CheckpointError, match=r"model_final.safetensors: truncated or padded file"):
        load_hub_checkpoint(hub_copy)
    open(path, "wb").write(data[:5])
    with pytest.raises(CheckpointError, match=r"model_final.safetensors: truncated safetensors file"):
        load_hub_checkpoint(hub_copy)
