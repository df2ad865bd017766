"""prepare_weights on the Hub-layout fixture: both layouts (a shared replicated file, or
self-contained rank files) at world sizes 1/2/4 (bf16 and fp8), each source tensor converted once,
expert subset, layer range, loading, verify, resume, bad input, CLI, download planning."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from types import SimpleNamespace

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file as load_torch

from hub_fixture import rewrite_shard, to_numpy, write_hub_fixture
from mimo_v2_flash import MiMoV2FlashModel
from mimo_v2_flash.checkpoint import (MANIFEST_FILE, REPLICATED_FILE, CheckpointError, PreparedCheckpoint,
                                      expert_file_name, rank_file_name)
from mimo_v2_flash.placement import ExpertPlacement
from mimo_v2_flash.weights import HUB_F32, kernel_name, model_tensors, mtp_tensors, scale_name
from mimo_prepare_weights import convert as convert_module
from mimo_prepare_weights import download as download_module
from mimo_prepare_weights.__main__ import main as cli
from mimo_prepare_weights.convert import PER_RANK, SHARED, PrepareError, convert

# Trainium e4m3 has the same 3 mantissa bits as the Hub's e4m3fn: requantising moves a value by at
# most 2^-4 of itself, or 2^-10 of its block scale below the normal range.
E4M3_RELATIVE, E4M3_SUBNORMAL_ABS = 2.0 ** -4, 2.0 ** -10


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    return write_hub_fixture(tmp_path_factory.mktemp("hub") / "ckpt")


@pytest.fixture(scope="module")
def bf16_expected(hub):
    """What a bf16 conversion must hold: the dequantised weights rounded to BF16 (F32 stays F32)."""
    f32 = {s.name for s in model_tensors(hub.config) if s.hub_dtype == HUB_F32}
    return {name: w if name in f32 else w.astype(ml_dtypes.bfloat16).astype(np.float32)
            for name, w in hub.expected.items()}


@pytest.fixture
def hub_copy(hub, tmp_path):
    shutil.copytree(hub.path, tmp_path / "ckpt")
    return str(tmp_path / "ckpt")


def prompt(config, shape=(2, 7)):
    return np.random.default_rng(3).integers(0, config.vocab_size, shape)


REAL_CONVERT_TENSOR = convert_module.convert_tensor


def count_conversions(monkeypatch) -> Counter:
    """Counts, by Hub name, the source tensors the converter converts from now on."""
    counts = Counter()

    def counting(checkpoint, spec, dtype):
        counts[spec.name] += 1
        return REAL_CONVERT_TENSOR(checkpoint, spec, dtype)
    monkeypatch.setattr(convert_module, "convert_tensor", counting)
    return counts


def rank_file_sets(layout, world_size):
    """The files each rank reads, in the layout's naming."""
    if layout == SHARED:
        return [[REPLICATED_FILE, expert_file_name(r, world_size)] for r in range(world_size)]
    return [[rank_file_name(r, world_size)] for r in range(world_size)]


def load_rank_raw(out, manifest, rank):
    """A rank's tensors read straight from its files by the safetensors package (torch binding:
    the only one that reads F8_E4M3)."""
    files = next(r["files"] for r in manifest["ranks"] if r["rank"] == rank)
    return {n: to_numpy(t) for f in files for n, t in load_torch(out / f).items()}


@pytest.mark.parametrize("layout", [SHARED, PER_RANK])
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_every_rank_holds_exactly_the_expected_tensors(hub, bf16_expected, tmp_path, monkeypatch,
                                                       world_size, layout):
    out = tmp_path / "out"
    conversions = count_conversions(monkeypatch)
    result = convert(hub.path, out, world_size=world_size, progress=False, replicated=layout)
    # every source tensor is converted exactly once, however many ranks hold it
    assert conversions == Counter(s.name for s in model_tensors(hub.config) + mtp_tensors(hub.config))
    file_sets = rank_file_sets(layout, world_size)
    files = list(dict.fromkeys(name for names in file_sets for name in names))
    assert result.written == files and result.skipped == []
    assert sorted(os.listdir(out)) == sorted([MANIFEST_FILE] + files)
    manifest = json.load(open(out / MANIFEST_FILE))
    assert manifest["complete"] and manifest["world_size"] == world_size
    assert manifest["replicated"] == layout
    assert [f["name"] for f in manifest["files"]] == files
    assert all(len(f["sha256"]) == 64 for f in manifest["files"])
    tensors_of = {f["name"]: f["tensors"] for f in manifest["files"]}
    replicated = {kernel_name(s) for s in model_tensors(hub.config, experts=[]) + mtp_tensors(hub.config)}
    if layout == SHARED:
        assert set(tensors_of[REPLICATED_FILE]) == replicated
    placement = ExpertPlacement.contiguous(hub.config.n_routed_experts, world_size)
    prepared = PreparedCheckpoint(out)
    for rank in range(world_size):
        assert manifest["ranks"][rank] == {"rank": rank, "experts": placement.experts_of(rank),
                                           "files": file_sets[rank]}
        specs = model_tensors(hub.config, experts=placement.experts_of(rank)) + mtp_tensors(hub.config)
        # the rank's file set holds each of its tensors exactly once (shared: experts files hold
        # no replicated tensor)
        held = Counter(n for f in file_sets[rank] for n in tensors_of[f])
        assert held == Counter(kernel_name(s) for s in specs)
        # the raw files, read by the safetensors package: kernel names, [in, out] projections
        raw = {n: a for f in file_sets[rank] for n, a in load_numpy(out / f).items()}
        for spec in specs:
            stored = raw[kernel_name(spec)].astype(np.float32)
            want = bf16_expected[spec.name]
            np.testing.assert_array_equal(stored, want.T if kernel_name(spec) != spec.name else want)
        # and through the loader, back in Hub layout
        _, weights = prepared.load(rank)
        assert set(weights) == {s.name for s in specs}
        for name, w in weights.items():
            np.testing.assert_array_equal(w, bf16_expected[name], err_msg=name)


def test_loaded_model_logits_match_reference(hub, bf16_expected, tmp_path):
    out = tmp_path / "out"
    convert(hub.path, out, world_size=2, progress=False)
    ids = prompt(hub.config)
    whole = MiMoV2FlashModel.from_pretrained(out)              # every rank's experts
    want = MiMoV2FlashModel(hub.config, bf16_expected).forward(ids)
    np.testing.assert_allclose(whole.forward(ids), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    # a single process running rank 1's file: the router chooses among rank 1's experts
    rank1 = MiMoV2FlashModel.from_pretrained(out, rank=1)
    assert rank1.expert_subset == list(range(8, 16))
    want = MiMoV2FlashModel(hub.config, bf16_expected, expert_subset=range(8, 16)).forward(ids)
    np.testing.assert_allclose(rank1.forward(ids), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    # with an expert-parallel executor the router may pick any expert; the executor runs it
    calls = []
    def executor(layer, x, ids_, w):
        calls.append(np.unique(ids_))
        return np.zeros_like(x)
    ep = MiMoV2FlashModel.from_pretrained(out, rank=0, expert_executor=executor)
    assert ep.expert_subset is None
    ep.forward(ids)
    assert max(int(c.max()) for c in calls) >= 8      # experts of rank 1 were chosen too


@pytest.mark.parametrize("layout", [SHARED, PER_RANK])
def test_fp8_output_is_trainium_e4m3_within_quantisation_error(hub, tmp_path, layout):
    out = tmp_path / "out"
    convert(hub.path, out, world_size=2, dtype="fp8", progress=False, replicated=layout)
    prepared = PreparedCheckpoint(out)
    manifest = json.load(open(out / MANIFEST_FILE))
    for rank in range(2):
        raw = load_rank_raw(out, manifest, rank)
        _, loaded = prepared.load(rank)
        for spec in model_tensors(hub.config, experts=prepared.experts_of(rank)) + mtp_tensors(hub.config):
            name = kernel_name(spec)
            if spec.name not in hub.scales:          # not FP8 on the Hub: bf16 / f32 as for bf16
                assert raw[name].dtype in (ml_dtypes.bfloat16, np.float32)
                continue
            q, scale = raw[name].astype(np.float32), raw[scale_name(name)]
            assert q.shape == spec.shape[::-1] and scale.shape == (-(-q.shape[0] // 128), -(-q.shape[1] // 128))
            assert np.abs(q).max() == 240.0           # Trainium's range, reached, never exceeded
            expanded = np.repeat(np.repeat(scale, 128, 0), 128, 1)[: q.shape[0], : q.shape[1]]
            decoded = (q * expanded).T                # independent decode, back to [out, in]
            np.testing.assert_array_equal(loaded[spec.name], decoded)
            want = hub.expected[spec.name]
            err = np.abs(decoded - want)
            assert (err <= E4M3_RELATIVE * np.abs(want) + E4M3_SUBNORMAL_ABS * expanded.T + 1e-12).all(), name


def test_expert_subset_and_layer_range(hub, bf16_expected, tmp_path):
    subset = list(range(8)) + [12]
    out = tmp_path / "out"
    assert cli([hub.path, str(out), "--world-size", "2", "--expert-subset", "0-7,12", "--layers", "0:2",
                "--no-progress"]) == 0
    manifest = json.load(open(out / MANIFEST_FILE))
    assert manifest["experts"] == subset and manifest["layers"] == [0, 1]
    assert [r["experts"] for r in manifest["ranks"]] == [list(range(8)), [12]]
    assert not any(".layers.2." in n or ".layers.3." in n for f in manifest["files"] for n in f["tensors"])
    model = MiMoV2FlashModel.from_pretrained(out)
    assert model.config.num_hidden_layers == 2 and model.expert_subset == subset
    config2 = hub.config.replace(num_hidden_layers=2)
    weights2 = {s.name: bf16_expected[s.name] for s in model_tensors(config2, experts=subset)}
    assert set(model.weights) == set(weights2)
    ids = prompt(hub.config)
    want = MiMoV2FlashModel(config2, weights2, expert_subset=subset).forward(ids)
    np.testing.assert_allclose(model.forward(ids), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_rank_without_experts_gets_an_empty_experts_file(hub, bf16_expected, tmp_path):
    out = tmp_path / "out"      # of 4 contiguous ranks, rank 2 (experts 8..11) keeps none
    convert(hub.path, out, world_size=4, expert_subset=list(range(8)) + [12], layers=[0, 1], progress=False)
    manifest = json.load(open(out / MANIFEST_FILE))
    assert [r["experts"] for r in manifest["ranks"]] == [[0, 1, 2, 3], [4, 5, 6, 7], [], [12]]
    empty = next(f for f in manifest["files"] if f["name"] == expert_file_name(2, 4))
    assert empty["tensors"] == {} and os.path.getsize(out / empty["name"]) == empty["size"]
    _, weights = PreparedCheckpoint(out).load(2)
    assert set(weights) == {s.name for s in model_tensors(hub.config, layers=[0, 1], experts=[])}
    np.testing.assert_array_equal(weights["lm_head.weight"], bf16_expected["lm_head.weight"])


def test_layer_range_not_from_zero_is_stored_but_not_runnable(hub, tmp_path):
    out = tmp_path / "out"
    convert(hub.path, out, layers=[1, 2], expert_subset=range(8), progress=False)
    names = json.load(open(out / MANIFEST_FILE))["files"][0]["tensors"]
    assert any(".layers.1." in n for n in names) and not any(".layers.0." in n for n in names)
    with pytest.raises(CheckpointError, match="holds layers 1..2; a runnable model needs the layers from 0"):
        MiMoV2FlashModel.from_pretrained(out)


def flip_byte(path, offset_from_end=1000):
    data = bytearray(open(path, "rb").read())
    data[-offset_from_end] ^= 0x01
    open(path, "wb").write(bytes(data))


def test_verify_passes_then_catches_a_flipped_byte(hub, tmp_path, capsys):
    out = tmp_path / "out"
    convert(hub.path, out, world_size=2, progress=False)        # shared layout
    assert cli(["--verify", str(out), "--no-progress"]) == 0
    assert "3 ok, 0 failed" in capsys.readouterr().out
    flip_byte(out / REPLICATED_FILE)
    assert cli(["--verify", str(out), "--no-progress"]) == 1
    printed = capsys.readouterr().out
    assert f"{REPLICATED_FILE:<40} sha256 mismatch" in printed
    assert f"{expert_file_name(1, 2):<40} ok" in printed and "2 ok, 1 failed" in printed


def test_shared_layout_rank_reads_only_its_own_file_set(hub, bf16_expected, tmp_path):
    out = tmp_path / "out"
    convert(hub.path, out, world_size=2, progress=False)
    os.remove(out / expert_file_name(1, 2))          # a host that received only rank 0's files
    _, weights = PreparedCheckpoint(out).load(0)
    np.testing.assert_array_equal(weights["lm_head.weight"], bf16_expected["lm_head.weight"])
    with pytest.raises(CheckpointError, match=f"{expert_file_name(1, 2)}: file not found"):
        PreparedCheckpoint(out).load(1)


@pytest.mark.parametrize("layout", [SHARED, PER_RANK])
def test_interrupted_run_resumes_and_rewrites_only_what_is_needed(hub, tmp_path, monkeypatch, layout):
    out = tmp_path / "out"
    files = list(dict.fromkeys(name for names in rank_file_sets(layout, 2) for name in names))
    finished, rank1_file = files[:-1], files[-1]

    def failing(checkpoint, spec, dtype):
        if ".experts.12." in spec.name:      # an expert of rank 1 (of 2)
            raise RuntimeError("simulated crash")
        return REAL_CONVERT_TENSOR(checkpoint, spec, dtype)
    monkeypatch.setattr(convert_module, "convert_tensor", failing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        convert(hub.path, out, world_size=2, progress=False, replicated=layout)
    # every file before rank 1's is complete; rank 1's left neither a final nor a partial file
    assert sorted(os.listdir(out)) == sorted([MANIFEST_FILE] + finished)
    with pytest.raises(CheckpointError, match="conversion not complete"):
        MiMoV2FlashModel.from_pretrained(out)
    mtimes = {name: os.path.getmtime(out / name) for name in finished}

    conversions = count_conversions(monkeypatch)
    result = convert(hub.path, out, world_size=2, progress=False, replicated=layout)
    assert result.skipped == finished and result.written == [rank1_file]
    assert {name: os.path.getmtime(out / name) for name in finished} == mtimes
    # only rank 1's experts are converted again; in the per-rank layout its replicated tensors
    # are copied from the finished rank 0 file
    assert conversions == Counter(s.name for s in model_tensors(hub.config, experts=range(8, 16))
                                  if ".experts." in s.name)
    assert cli(["--verify", str(out), "--no-progress"]) == 0

    flip_byte(out / files[0])            # a corrupt finished file is redone, nothing else
    result = convert(hub.path, out, world_size=2, progress=False, replicated=layout)
    assert result.written == [files[0]] and result.skipped == files[1:]
    assert cli(["--verify", str(out), "--no-progress"]) == 0

    with pytest.raises(PrepareError, match="different settings \\('dtype' differs\\)"):
        convert(hub.path, out, world_size=2, dtype="fp8", progress=False, replicated=layout)
    other = PER_RANK if layout == SHARED else SHARED
    with pytest.raises(PrepareError, match="different settings \\('replicated' differs\\)"):
        convert(hub.path, out, world_size=2, progress=False, replicated=other)


# ---- bad input: a clear error and no output that looks complete -----------------------------------
def remove_shard(path):
    os.remove(os.path.join(path, "model_3_linear_fc2.safetensors"))


def drop_tensor(path):
    rewrite_shard(path, "model_2.safetensors", lambda t: t.pop("model.layers.2.self_attn.attention_sink_bias"))


def wrong_shape(path):
    def edit(t):
        t["model.layers.1.mlp.gate.e_score_correction_bias"] = np.zeros(15, np.float32)
    rewrite_shard(path, "model_1.safetensors", edit)


def wrong_dtype(path):
    def edit(t):
        t["model.norm.weight"] = t["model.norm.weight"].astype(np.float32).astype(ml_dtypes.float8_e4m3fn)
    rewrite_shard(path, "model_final.safetensors", edit)


def bad_scale_shape(path):
    def edit(t):
        name = "model.layers.3.self_attn.v_proj.weight_scale_inv"
        t[name] = np.concatenate([t[name], t[name]])
    rewrite_shard(path, "model_3.safetensors", edit)


def truncate(path):
    file = os.path.join(path, "model_1_linear_fc1.safetensors")
    data = open(file, "rb").read()
    open(file, "wb").write(data[: len(data) // 2])


@pytest.mark.parametrize("corrupt, message", [
    (remove_shard, r"model_3_linear_fc2.safetensors: shard file missing"),
    (drop_tensor, r"model_2.safetensors: tensor 'model.layers.2.self_attn.attention_sink_bias' listed in "
                  "the index is absent"),
    (wrong_shape, r"'model.layers.1.mlp.gate.e_score_correction_bias' has shape \[15\], the config expects \[16\]"),
    (wrong_dtype, r"'model.norm.weight' has dtype F8_E4M3; the table stores it as BF16"),
    (bad_scale_shape, r"layer 3 K/V scales have 4 and 4 rows, which fit no grouping"),
    (truncate, r"model_1_linear_fc1.safetensors: truncated or padded file"),
], ids=lambda x: getattr(x, "__name__", ""))
def test_bad_source_is_reported_before_any_output(hub_copy, tmp_path, corrupt, message):
    corrupt(hub_copy)
    out = tmp_path / "out"
    with pytest.raises(PrepareError, match=message):
        convert(hub_copy, out, world_size=2, progress=False)
    assert not out.exists()


def test_world_size_must_divide_experts_unless_placement_given(hub, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(PrepareError, match="world size 3 does not divide the 16 experts; give an explicit "
                                           "placement table"):
        convert(hub.path, out, world_size=3, progress=False)
    assert not out.exists()
    table = tmp_path / "placement.json"
    table.write_text(json.dumps([list(range(0, 6)), list(range(6, 11)), list(range(11, 16))]))
    assert cli([hub.path, str(out), "--placement", str(table), "--no-progress"]) == 0
    manifest = json.load(open(out / MANIFEST_FILE))
    assert manifest["world_size"] == 3 and manifest["ranks"][2]["experts"] == list(range(11, 16))
    assert cli([hub.path, str(tmp_path / "x"), "--world-size", "5", "--no-progress"]) == 2
    assert "world size 5 does not divide" in capsys.readouterr().err


def test_weight_dtype_flag_and_its_deprecated_alias(hub, tmp_path, capsys):
    assert cli([hub.path, str(tmp_path / "a"), "--world-size", "2", "--weight-dtype", "fp8", "--no-progress"]) == 0
    assert "deprecated" not in capsys.readouterr().err
    assert cli([hub.path, str(tmp_path / "b"), "--world-size", "2", "--dtype", "fp8", "--no-progress"]) == 0
    assert "prepare-weights: warning: --dtype is deprecated; use --weight-dtype" in capsys.readouterr().err
    manifests = [json.load(open(tmp_path / name / MANIFEST_FILE)) for name in "ab"]
    assert [m["dtype"] for m in manifests] == ["fp8", "fp8"]
    assert manifests[0]["files"] == manifests[1]["files"]      # the same bytes, the same hashes


def test_unknown_replicated_layout(hub, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(PrepareError, match=r"replicated layout must be one of \('shared', 'per-rank'\), "
                                           "got 'none'"):
        convert(hub.path, out, replicated="none", progress=False)
    assert not out.exists()
    with pytest.raises(SystemExit):
        cli([hub.path, str(out), "--replicated", "none"])
    assert "invalid choice: 'none'" in capsys.readouterr().err


def test_output_directory_not_writable(hub, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(PrepareError, match=r"a_file/out: output directory is not writable"):
        convert(hub.path, blocker / "out", progress=False)


# ---- download planning (no network) ----------------------------------------------------------------
class NoNetwork:
    def __call__(self, *args, **kwargs):
        raise AssertionError("the network was used")


def test_needed_shards_for_layers_and_expert_subset(hub):
    index = json.load(open(os.path.join(hub.path, "model.safetensors.index.json")))["weight_map"]
    shards = download_module.needed_shards(hub.config, index, layers=[0, 1], experts=[0, 3])
    assert shards == ["model_0.safetensors", "model_1.safetensors", "model_1_linear_fc1.safetensors",
                      "model_1_linear_fc2.safetensors", "model_embedding.safetensors",
                      "model_final.safetensors"]
    patterns = download_module.allow_patterns(shards)
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json"} <= set(patterns)


def test_offline_download_uses_local_files_only(hub, monkeypatch, capsys):
    for name in ("snapshot_download", "hf_hub_download", "HfApi"):
        monkeypatch.setattr(download_module, name, NoNetwork())
    shards = download_module.download("any/repo", hub.path, layers=[0, 1], experts=[0], offline=True)
    size = sum(os.path.getsize(os.path.join(hub.path, s)) for s in shards)
    printed = capsys.readouterr().out
    assert f"6 shard(s), {size / 1e9:.2f} GB (local files in {hub.path})" in printed
    assert "share one shard pair" in printed


def test_offline_download_names_a_missing_shard(hub, tmp_path, monkeypatch):
    for name in ("snapshot_download", "hf_hub_download", "HfApi"):
        monkeypatch.setattr(download_module, name, NoNetwork())
    partial = tmp_path / "partial"
    shutil.copytree(hub.path, partial, ignore=shutil.ignore_patterns("model_2.safetensors", "model_3.safetensors"))
    with pytest.raises(PrepareError, match=r"offline, and 2 needed file\(s\) are not there \(first: model_2"):
        download_module.download("any/repo", partial, layers=[0, 2, 3], offline=True)


def test_online_download_requests_only_needed_patterns(hub, tmp_path, monkeypatch, capsys):
    local = tmp_path / "local"
    calls = {}

    def fake_hf_hub_download(repo_id, filename, revision=None, local_dir=None):
        os.makedirs(local_dir, exist_ok=True)
        shutil.copy(os.path.join(hub.path, filename), os.path.join(local_dir, filename))

    class FakeApi:
        def get_paths_info(self, repo_id, paths, revision=None):
            calls["sized"] = list(paths)
            return [SimpleNamespace(path=p, size=1_000_000_000) for p in paths]

    def fake_snapshot_download(repo_id, revision=None, local_dir=None, allow_patterns=None):
        calls["snapshot"] = (repo_id, revision, local_dir, allow_patterns)

    monkeypatch.setattr(download_module, "check_hub_reachable", lambda: None)   # no network here
    monkeypatch.setattr(download_module, "hf_hub_download", fake_hf_hub_download)
    monkeypatch.setattr(download_module, "HfApi", FakeApi)
    monkeypatch.setattr(download_module, "snapshot_download", fake_snapshot_download)
    shards = download_module.download("XiaomiMiMo/MiMo-V2-Flash", local, revision="abc", layers=[0],
                                      offline=False)
    assert shards == ["model_0.safetensors", "model_embedding.safetensors", "model_final.safetensors"]
    repo, revision, local_dir, patterns = calls["snapshot"]
    assert (repo, revision, local_dir) == ("XiaomiMiMo/MiMo-V2-Flash", "abc", str(local))
    assert set(shards) <= set(patterns) and "model.safetensors.index.json" in patterns
    assert not any("linear_fc" in p for p in patterns)
    assert "3 shard(s), 3.00 GB (XiaomiMiMo/MiMo-V2-Flash@abc)" in capsys.readouterr().out


def test_run_example_download_mode_offline(hub, bf16_expected, tmp_path, capsys):
    import run_example
    out = tmp_path / "prepared"
    code = run_example.main(["--mode", "download", "--offline", "--local-dir", hub.path,
                             "--output-dir", str(out), "--num-layers", "2", "--expert-subset", "0-7",
                             "--world-size", "2", "--batch", "1", "--seq-len", "5",
                             "--max-new-tokens", "3"])
    assert code == 0
    printed = capsys.readouterr().out
    config2 = hub.config.replace(num_hidden_layers=2)
    weights2 = {s.name: bf16_expected[s.name] for s in model_tensors(config2, experts=range(8))}
    reference = MiMoV2FlashModel(config2, weights2, expert_subset=range(8))
    ids = np.random.default_rng(0).integers(0, config2.vocab_size, (1, 5))
    want = reference.generate(ids, max_new_tokens=3)[0, 5:]
    assert f"generated[0]  {' '.join(map(str, want))}" in printed
