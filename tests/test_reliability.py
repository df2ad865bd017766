"""Bad input, careless or hostile: each gets a clear error naming what is wrong, and
a refused write leaves nothing behind, inside OUTPUT or outside it."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
from contextlib import contextmanager

import numpy as np
import pytest

from hub_fixture import rewrite_shard, write_hub_fixture
from mimo_v2_flash import MiMoV2FlashModel, load_config
from mimo_v2_flash.checkpoint import (INDEX_FILE, MANIFEST_FILE, CheckpointError, PreparedCheckpoint,
                                      expert_file_name, load_hub_checkpoint)
from mimo_v2_flash.config import ConfigError, MiMoV2FlashConfig
from mimo_v2_flash.fileguard import DirectoryLock
from mimo_v2_flash.safetensors_io import SafetensorsError, SafetensorsFile, SafetensorsWriter, TensorEntry
from mimo_prepare_weights import convert as convert_module
from mimo_prepare_weights import download as download_module
from mimo_prepare_weights.__main__ import main as cli
from mimo_prepare_weights.convert import PrepareError, convert

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    return write_hub_fixture(tmp_path_factory.mktemp("hub") / "ckpt")


@pytest.fixture
def source(hub, tmp_path):
    shutil.copytree(hub.path, tmp_path / "ckpt")
    return str(tmp_path / "ckpt")


@pytest.fixture(scope="module")
def prepared(hub, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "out"
    convert(hub.path, out, world_size=2, progress=False)
    return out


@pytest.fixture
def outside(tmp_path):
    """A file outside every directory under test, and its bytes: it must never change."""
    path = tmp_path / "precious.txt"
    path.write_bytes(b"do not touch")
    return path


def tree(path) -> dict[str, bytes]:
    """Every file under `path` (relative name -> bytes, symlinks as their target)."""
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            out[os.path.relpath(full, path)] = os.readlink(full) if os.path.islink(full) else open(full, "rb").read()
    return out


@contextmanager
def no_hang(seconds=20):
    """Fail instead of hanging (a FIFO read would block forever)."""
    def alarm(*_):
        raise TimeoutError(f"hung for {seconds} s")
    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ---- 2. symlinks in OUTPUT are never followed ------------------------------------------------
@pytest.mark.parametrize("planted", ["replicated.safetensors.partial", "manifest.json.partial",
                                     ".write-probe.partial", expert_file_name(1, 2)])
def test_symlink_planted_in_output_is_refused_and_nothing_outside_changes(hub, tmp_path, outside, planted):
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(outside, out / planted)
    with pytest.raises(PrepareError, match=f"{planted}: is a symlink"):
        convert(hub.path, out, world_size=2, progress=False)
    assert outside.read_bytes() == b"do not touch"
    assert sorted(os.listdir(out)) == [planted]          # nothing written beside it


def test_writer_never_writes_through_a_symlink(tmp_path, outside):
    os.symlink(outside, tmp_path / "x.safetensors.partial")
    with pytest.raises(SafetensorsError, match="is a symlink; refusing to write through it"):
        SafetensorsWriter(tmp_path / "x.safetensors", [TensorEntry("a", "F32", (2,))])
    assert outside.read_bytes() == b"do not touch"


def test_verify_fails_a_file_replaced_by_a_symlink_even_with_identical_bytes(hub, tmp_path, capsys):
    out = tmp_path / "out"
    convert(hub.path, out, world_size=2, progress=False)
    name = expert_file_name(0, 2)
    shutil.move(out / name, tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", out / name)
    assert cli(["--verify", str(out), "--no-progress"]) == 1
    assert f"{name}" in capsys.readouterr().out and "is a symlink" in (
        dict(convert_module.manifest_io.verify(str(out), progress=False))[name])


# ---- 3. names from an index or a manifest stay inside their directory -----------------------------
@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/dir.safetensors", "*",
                                   "model_[0-9].safetensors", ".hidden"])
def test_index_names_outside_the_directory_or_globs_are_refused(source, tmp_path, shard):
    index_path = os.path.join(source, INDEX_FILE)
    index = json.load(open(index_path))
    index["weight_map"]["model.norm.weight"] = shard
    json.dump(index, open(index_path, "w"))
    with pytest.raises(PrepareError, match="is not a plain file name inside the directory"):
        convert(source, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(CheckpointError, match=f"file name {re.escape(repr(shard))} is not a plain file name"):
        download_module.download("XiaomiMiMo/MiMo-V2-Flash", source, offline=True, log=lambda *_: None)


@pytest.mark.parametrize("bad", ["../../precious.txt", "/etc/hostname"])
def test_manifest_names_outside_the_directory_are_refused(prepared, tmp_path, bad, capsys):
    out = tmp_path / "copy"
    shutil.copytree(prepared, out)
    manifest = json.load(open(out / MANIFEST_FILE))
    manifest["files"][0]["name"] = bad
    manifest["ranks"][0]["files"][0] = bad
    json.dump(manifest, open(out / MANIFEST_FILE, "w"))
    assert cli(["--verify", str(out), "--no-progress"]) == 2
    err = capsys.readouterr()
    assert "is not a plain file name" in err.err and "bytes" not in err.out    # no size of it printed
    with pytest.raises(CheckpointError, match="is not a plain file name"):
        PreparedCheckpoint(out)


# ---- 4. memory bombs ------------------------------------------------------------------------------
@pytest.mark.parametrize("key, value", [("num_hidden_layers", 1_000_000_000), ("hidden_size", 1_000_000)])
def test_config_file_with_huge_sizes_fails_naming_the_key(tmp_path, key, value):
    data = load_config("tiny").to_hub_dict()
    data[key] = value
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=f"config.json: config key '{key}'={value} exceeds the limit"):
        MiMoV2FlashConfig.from_json(tmp_path)


# ---- 5. safetensors offsets and header types ------------------------------------------------------
def raw_safetensors(path, header: dict, data: bytes) -> str:
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)
    return str(path)


@pytest.mark.parametrize("header, message", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, "overlapping or aliasing offsets"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, "overlaps the previous tensor"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, "leaves a hole before it"),
    ({"a": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}, "expected a list of non-negative integers"),
    ({"a": {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}}, "expected a list of non-negative"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8]}}, "data_offsets \\[0.0, 8\\]"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 9]}}, "expected \\[begin, end\\]"),
    ({"a": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}}, "has dtype \\['F32'\\]"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "extra": 1}}, "malformed header entry"),
    ({"a": [1, 2, 3]}, "malformed header entry"),
    ({"__metadata__": {"k": 5}, "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
     "__metadata__ must map strings to strings"),
    ({"a": {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 8]}}, "needs"),
])
def test_malformed_safetensors_headers_are_refused(tmp_path, header, message):
    path = raw_safetensors(tmp_path / "bad.safetensors", header, bytes(8))
    with pytest.raises(SafetensorsError, match=message):
        SafetensorsFile(path)


def test_a_file_the_official_library_writes_still_reads(prepared):
    for name in os.listdir(prepared):
        if name.endswith(".safetensors"):
            assert SafetensorsFile(prepared / name).keys()


# ---- 6. non-finite weights: refused while converting and loading, nothing half-written --------------
def put_nan_in_last_expert(path):
    name = "model.layers.3.mlp.experts.15.down_proj.weight"      # rank 1's, converted last

    def edit(t):
        t[name].reshape(-1).view(np.uint8)[5] = 0x7F              # e4m3fn NaN
    rewrite_shard(path, "model_3_linear_fc2.safetensors", edit)
    return name


@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_nan_weight_refused_while_converting_and_output_left_as_before(source, tmp_path, outside, dtype):
    name = put_nan_in_last_expert(source)
    out = tmp_path / "out"
    with pytest.raises(PrepareError, match=f"tensor '{name}': non-finite value nan at index .*nothing was kept"):
        convert(source, out, world_size=2, dtype=dtype, progress=False)
    assert not out.exists()                               # it did not exist before the run
    assert outside.read_bytes() == b"do not touch"


def test_nan_refusal_in_an_existing_output_restores_it(source, tmp_path):
    out = tmp_path / "out"
    convert(source, out, world_size=2, progress=False)
    before = tree(out)
    os.remove(out / expert_file_name(1, 2))               # to be rewritten, from a now-bad source
    shard = os.path.join(source, "model_3_linear_fc2.safetensors")
    stamp = os.stat(shard)
    put_nan_in_last_expert(source)                        # silent corruption: same size and time
    assert os.path.getsize(shard) == stamp.st_size
    os.utime(shard, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    with pytest.raises(PrepareError, match="non-finite"):
        convert(source, out, world_size=2, progress=False)
    after = tree(out)
    assert expert_file_name(1, 2) not in after and not [n for n in after if n.endswith(".partial")]
    assert {n: b for n, b in before.items() if n != expert_file_name(1, 2)} == after


def test_nan_weight_refused_when_loading(source, prepared, tmp_path):
    put_nan_in_last_expert(source)
    with pytest.raises(CheckpointError, match="non-finite value nan"):
        load_hub_checkpoint(source)
    out = tmp_path / "copy"
    shutil.copytree(prepared, out)
    path = out / "replicated.safetensors"
    handle = SafetensorsFile(path)
    begin, _ = handle.offsets["model.norm.weight"]
    with open(path, "r+b") as f:                          # one BF16 value -> NaN (0x7FC0)
        f.seek(handle.data_start + begin)
        f.write(struct.pack("<H", 0x7FC0))
    with pytest.raises(CheckpointError, match="replicated.safetensors: tensor 'model.norm.weight': non-finite"):
        PreparedCheckpoint(out).load(0)


# ---- 7. resume notices a changed source shard ------------------------------------------------------
def interrupted_conversion(monkeypatch, source, out, **kwargs):
    real = convert_module.convert_tensor

    def failing(checkpoint, spec, dtype):
        if ".experts.12." in spec.name:
            raise RuntimeError("simulated crash")
        return real(checkpoint, spec, dtype)
    monkeypatch.setattr(convert_module, "convert_tensor", failing)
    with pytest.raises(RuntimeError):
        convert(source, out, world_size=2, progress=False, **kwargs)
    monkeypatch.setattr(convert_module, "convert_tensor", real)


def test_resume_refuses_after_a_source_shard_changed(source, tmp_path, monkeypatch):
    out = tmp_path / "out"
    interrupted_conversion(monkeypatch, source, out)
    rewrite_shard(source, "model_1.safetensors", lambda t: t["model.layers.1.input_layernorm.weight"].__imul__(2))
    with pytest.raises(PrepareError, match="source shard model_1.safetensors changed \\(size or modification"):
        convert(source, out, world_size=2, progress=False)


def test_resume_with_hashed_sources_ignores_a_touch_but_not_new_bytes(source, tmp_path, monkeypatch):
    out = tmp_path / "out"
    interrupted_conversion(monkeypatch, source, out, hash_sources=True)
    shard = os.path.join(source, "model_1.safetensors")
    os.utime(shard, ns=(1, 1))                            # copied: same bytes, new time
    result = convert(source, out, world_size=2, progress=False, hash_sources=True)
    assert result.skipped and result.written
    data = bytearray(open(shard, "rb").read())
    data[-1] ^= 1
    open(shard, "wb").write(bytes(data))
    with pytest.raises(PrepareError, match="source shard model_1.safetensors changed \\(sha256 differs\\)"):
        convert(source, out, world_size=2, progress=False, hash_sources=True)


# ---- 8, 9: generation limits and ragged slots ---------------------------------------------------
@pytest.fixture(scope="module")
def model():
    return MiMoV2FlashModel.random("tiny")


def test_generate_past_the_position_limit_is_refused_before_any_work(model, monkeypatch):
    monkeypatch.setattr(model, "forward_ragged", lambda *a, **k: pytest.fail("forward ran"))
    limit = model.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"reaches position {limit + 1}, beyond max_position_embeddings={limit}"):
        model.generate(np.zeros((1, 10), np.int64), max_new_tokens=limit - 9)


def test_expert_parallel_generation_past_the_position_limit_is_refused_before_any_collective(model, monkeypatch):
    """The expert-parallel path checks the limit as `generate` does: no forward, no collective
    (the communicator and executor are absent here, so touching either would fail differently)."""
    from mimo_parallel.run import generate_data_parallel
    monkeypatch.setattr(model, "forward_ragged", lambda *a, **k: pytest.fail("forward ran"))
    limit = model.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"prompt of 10 tokens \\+ max_new_tokens={limit - 9} reaches position "
                                         f"{limit + 1}, beyond max_position_embeddings={limit}"):
        generate_data_parallel(model, None, None, np.zeros((2, 10), np.int64), max_new_tokens=limit - 9)
    with pytest.raises(ValueError, match=f"reaches position {limit + 1}"):     # a rank with no sequences too
        generate_data_parallel(model, None, None, np.zeros((0, 10), np.int64), max_new_tokens=limit - 9)


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.5), "temperature must be a finite number >= 0"),
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
    (dict(temperature=1.0, top_p=1.5), "top_p must be in \\(0, 1\\]"),
    (dict(temperature=1.0, top_k=0), "top_k must be an integer >= 1"),
    (dict(max_new_tokens=2.5), "max_new_tokens must be an integer >= 0"),
])
def test_sampling_settings_out_of_range(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        model.generate(np.zeros((1, 3), np.int64), **{"max_new_tokens": 2, **kwargs})


@pytest.mark.parametrize("slots, error, message", [
    ([0], ValueError, "seq_indices has 1 entries for 2 sequences"),
    ([0, -1], ValueError, "seq_indices\\[1\\]=-1 outside the cache slots 0..1"),
    ([1, 1], ValueError, "names a slot twice"),
    ([0, 2], ValueError, "seq_indices\\[1\\]=2 outside the cache slots 0..1"),
    ([0, 1.0], TypeError, "must be an integer slot"),
])
def test_forward_ragged_validates_seq_indices(model, slots, error, message):
    cache = model.new_cache(2)
    with pytest.raises(error, match=message):
        model.forward_ragged([[1, 2], [3]], cache, slots)
    assert list(cache.seq_lens) == [0, 0]


def test_nan_logits_raise_instead_of_emitting_token_zero():
    from mimo_v2_flash.model import sample
    with pytest.raises(FloatingPointError, match="NaN logits"):
        sample(np.full(8, np.nan, np.float32), 0.0, None, None, np.random.default_rng(0))


# ---- 11. clear messages instead of tracebacks ----------------------------------------------------
def config_dir(tmp_path, kind):
    path = tmp_path / "cfg"
    path.mkdir()
    target = path / "config.json"
    if kind == "directory":
        target.mkdir()
    elif kind == "loop":
        os.symlink(path / "loop2", target)
        os.symlink(target, path / "loop2")
    elif kind == "binary":
        target.write_bytes(bytes(range(256)) * 4)
    elif kind == "deep":
        target.write_text("[" * 100_000 + "]" * 100_000)
    elif kind == "fifo":
        os.mkfifo(target)
    elif kind == "nan":
        target.write_text('{"hidden_size": NaN}')
    elif kind == "list":
        target.write_text("[1, 2]")
    return path


@pytest.mark.parametrize("kind, message", [
    ("directory", "config.json: the config file is a directory, not a regular file"),
    ("loop", "config.json: cannot open the config file \\(symlink loop"),
    ("binary", "config.json: config file is not UTF-8 text"),
    ("deep", "config.json: config file is nested too deeply"),
    ("fifo", "config.json: the config file is a FIFO, not a regular file"),
    ("nan", "config.json: not valid JSON \\(NaN is not a JSON value\\)"),
    ("list", "config.json: config file must be a JSON object, got list"),
])
def test_run_example_config_problems_are_one_message(tmp_path, capsys, kind, message):
    import run_example
    with no_hang():
        code = run_example.main(["--mode", "random", "--config", str(config_dir(tmp_path, kind))])
    assert code == 2 and re.search(message, capsys.readouterr().err)


def test_fifo_in_place_of_a_shard_is_refused_without_hanging(source, tmp_path):
    shard = os.path.join(source, "model_2.safetensors")
    os.remove(shard)
    os.mkfifo(shard)
    with no_hang(), pytest.raises(PrepareError, match="model_2.safetensors: the file is a FIFO"):
        convert(source, tmp_path / "out", progress=False)


@pytest.mark.parametrize("argv, message", [
    (["--num-layers", "0"], "--num-layers must be >= 1, got 0"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (["--ep-placement", "p.json"], "--ep-placement applies to expert-parallel runs under torchrun only"),
    (["--ep-mode", "allgather"], "--ep-mode applies to expert-parallel runs under torchrun only"),
    (["--max-new-tokens", "-3"], "--max-new-tokens must be >= 0"),
])
def test_run_example_flags_out_of_range(argv, message, capsys, monkeypatch):
    import run_example
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit) as exit_:
        run_example.main(["--mode", "random", *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("make, option, message", [
    (lambda o: o.GenerationOptions(max_new_tokens=-1), "max_new_tokens", "must be >= 0, got -1"),
    (lambda o: o.GenerationOptions(max_new_tokens=2.5), "max_new_tokens", "must be >= 0, got 2.5"),
    (lambda o: o.GenerationOptions(seed=-3), "seed", "must be >= 0, got -3"),
    (lambda o: o.GenerationOptions(draft_tokens=0), "draft_tokens", "must be >= 1, got 0"),
    (lambda o: o.GenerationOptions(temperature=float("inf")), "temperature", "must be a finite number >= 0"),
    (lambda o: o.GenerationOptions(speculative="eagle"), "speculative", "must be one of (None, 'mtp'), got 'eagle'"),
    (lambda o: o.GenerationOptions(backend="cuda"), "backend", "must be one of ('reference', 'nki'), got 'cuda'"),
    (lambda o: o.GenerationOptions(weight_dtype="int4"), "weight_dtype", "must be one of ('bf16', 'fp8')"),
    (lambda o: o.ExpertParallelOptions(mode="ring"), "mode", "must be one of ('auto', 'alltoallv',"),
    (lambda o: o.ExpertParallelOptions(wire_dtype="float16"), "wire_dtype", "must be one of ('float32', 'bfloat16')"),
    (lambda o: o.ExpertParallelOptions(allgather_max_tokens=-1), "allgather_max_tokens", "must be >= 0, got -1"),
    (lambda o: o.ExpertParallelOptions(timeout=float("nan")), "timeout", "must be a positive number of seconds"),
    (lambda o: o.ExpertParallelOptions(liveness=0), "liveness", "must be a positive number of seconds, got 0"),
])
def test_run_options_name_the_option_out_of_range(make, option, message):
    from mimo_parallel import options
    with pytest.raises(options.OptionError) as err:
        make(options)
    assert err.value.option == option and str(err.value).startswith(f"{option} {message}")


@pytest.mark.parametrize("settings, message", [
    (dict(dtype="fp16"), r"output dtype must be one of \('bf16', 'fp8'\), got 'fp16'"),
    (dict(world_size=0), "world_size must be an integer >= 1, got 0"),
    (dict(world_size=2.0), "world_size must be an integer >= 1, got 2.0"),
    (dict(layers=["a"]), r"layers must be integers, got \['a'\]"),
    (dict(expert_subset=[None]), r"expert_subset must be integers"),
])
def test_convert_options_name_the_option(settings, message):
    from mimo_prepare_weights.convert import ConvertOptions
    with pytest.raises(PrepareError, match=message):
        ConvertOptions(**settings)


def test_convert_options_agree_with_the_placement_table(hub, tmp_path):
    from mimo_prepare_weights.convert import ConvertOptions
    from mimo_v2_flash.placement import ExpertPlacement
    assert ConvertOptions(layers=(3, 1, 3), expert_subset=range(4, 0, -1)).layers == (1, 3)    # sorted, unique
    with pytest.raises(PrepareError, match="world_size is 4, the placement table is for 2 ranks"):
        ConvertOptions(world_size=4, placement=ExpertPlacement.contiguous(16, 2))
    with pytest.raises(PrepareError, match="the placement table has 8 experts, the checkpoint has 16"):
        convert(hub.path, tmp_path / "out", placement=ExpertPlacement.contiguous(8, 2), progress=False)
    assert not (tmp_path / "out").exists()


def test_run_example_random_mode_catches_model_errors(capsys):
    import run_example
    assert run_example.main(["--mode", "random", "--prompt-ids", "1,2,99999"]) == 2
    assert "token id 99999 is outside the model's vocabulary" in capsys.readouterr().err


def test_download_without_network_fails_fast_with_one_message(hub, tmp_path, monkeypatch, capsys):
    import time

    import run_example
    monkeypatch.setattr(download_module.hf_constants, "ENDPOINT", "http://127.0.0.1:9")   # nothing listens
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for key in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(key, raising=False)
    t0 = time.perf_counter()
    code = run_example.main(["--mode", "download", "--local-dir", str(tmp_path / "dl"),
                             "--output-dir", str(tmp_path / "out")])
    assert code == 2 and time.perf_counter() - t0 < 10
    err = capsys.readouterr().err
    assert "cannot reach the Hub at http://127.0.0.1:9" in err and "Traceback" not in err


def test_source_equal_to_output_is_refused(source):
    before = tree(source)
    with pytest.raises(PrepareError, match="the output directory is the source checkpoint"):
        convert(source, source, progress=False)
    assert tree(source) == before


def test_concurrent_conversion_is_refused_naming_the_holder(hub, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with DirectoryLock(str(out), PrepareError, "a test holding the lock"):
        with pytest.raises(PrepareError, match=f"locked by pid {os.getpid()} on .*a test holding the lock"):
            convert(hub.path, out, progress=False)
    assert os.listdir(out) == []                          # the holder's note is gone with the lock
    convert(hub.path, out, progress=False)                # and the next run takes it


def test_kernel_input_checks_survive_python_O():
    code = ("import numpy as np\n"
            "from mimo_kernels.rmsnorm import rmsnorm\n"
            "from mimo_kernels.checks import KernelInputError\n"
            "try:\n"
            "    rmsnorm(np.ones((4, 256), np.float32), np.ones(255, np.float32))\n"
            "except KernelInputError as err:\n"
            "    print('refused:', err)\n")
    out = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert "refused: rmsnorm: weight shape (255,) must be (256,)" in out.stdout, out.stderr


def test_placement_table_problems_are_messages(hub, tmp_path, capsys):
    table = tmp_path / "placement.json"
    table.write_bytes(b"\xff\xfe binary")
    assert cli([hub.path, str(tmp_path / "out"), "--placement", str(table), "--no-progress"]) == 2
    assert "placement table is not UTF-8 text" in capsys.readouterr().err


def _placement_file(tmp_path, content):
    path = tmp_path / "placement.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "fifo":
        os.mkfifo(path)
    elif content == "directory":
        path.mkdir()
    elif content == "loop":
        os.symlink(path, path)
    elif content != "missing":
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


@pytest.mark.parametrize("content, world_size, message", [
    ("missing", None, "placement table not found"),
    ("directory", None, "the placement table is a directory, not a regular file"),
    ("fifo", None, "the placement table is a FIFO, not a regular file"),
    ("loop", None, "symlink loop"),
    (b"\xff\xfe", None, "placement table is not UTF-8 text"),
    ("[0, 1", None, "not valid JSON"),
    ("[0, NaN]", None, "not valid JSON .*NaN is not a JSON value"),
    ({"world_size": 2, "rank_of": [0] * 8 + [1] * 8}, 4, "placement is for 2 ranks, the world size is 4"),
    ([[0, 1], [2, 3]], 4, "placement lists 2 ranks but world size is 4"),
    ([list(range(8)), list(range(8, 15)) + [99]], None, r"expert 99 \(rank 1's list\) is outside the expert "
                                                         r"range 0\.\.15"),
    ([[-1] + list(range(8)), list(range(8, 16))], None, r"expert -1 \(rank 0's list\) is outside the expert "
                                                       r"range 0\.\.15"),
    ([list(range(9)), list(range(8, 16))], None, r"expert 8 is placed twice \(ranks 0 and 1\)"),
    ([list(range(7)), list(range(8, 16))], None, "expert 7 is not placed"),
    ([0] * 8 + [5] * 8, 2, "placement puts expert 8 on rank 5, outside 0..1"),
    ([0] * 15 + [-1], None, "placement puts expert 15 on rank -1, ranks start at 0"),
    ([0] * 15 + [1.5], None, "placement table entry 15 is 1.5, expected an integer rank"),
    ([True] * 16, None, "placement table entry 0 is True, expected an integer rank"),
    ([[0, 1], 2], None, r"placement table entry 1 is 2, expected a list of integer expert ids"),
    ([], None, "placement table must be a non-empty list"),
    ({"world_size": 2}, None, 'a placement object holds "rank_of"'),
    ({"world_size": 2, "rank_of": [0, 1] * 8, "layers": 3}, None, 'a placement object holds "rank_of"'),
    ({"world_size": "2", "rank_of": [0, 1] * 8}, None, '"world_size" must be a positive integer, got \'2\''),
    ([0, 1] * 4, 2, "placement has 8 experts, the model has 16"),
])
def test_placement_loader_names_the_file_and_the_problem(tmp_path, content, world_size, message):
    from mimo_v2_flash.placement import ExpertPlacement, PlacementError
    path = _placement_file(tmp_path, content)
    with no_hang(), pytest.raises(PlacementError, match=f"^{re.escape(str(path))}: .*{message}"):
        ExpertPlacement.load(path, world_size, num_experts=16)


def test_placement_loader_reads_every_form_alike(tmp_path):
    from mimo_parallel.run import resolve_placement
    from mimo_v2_flash.placement import ExpertPlacement, PlacementError
    rank_of = [1, 0, 2, 2, 0, 1]
    forms = [rank_of, [[1, 4], [0, 5], [2, 3]], {"world_size": 3, "rank_of": rank_of},
             {"world_size": 3, "rank_of": [[1, 4], [0, 5], [2, 3]]}]
    for i, form in enumerate(forms):
        path = tmp_path / f"p{i}.json"
        path.write_text(json.dumps(form))
        assert ExpertPlacement.load(path) == ExpertPlacement(tuple(rank_of), 3)
        assert ExpertPlacement.load(path, 3, 6).experts_of(2) == [2, 3]
        assert resolve_placement(str(path), 6, 3).rank_of == tuple(rank_of)     # --ep-placement
    os.symlink(tmp_path / "p0.json", tmp_path / "link.json")       # a user-given path: links are followed
    assert ExpertPlacement.load(tmp_path / "link.json").world_size == 3
    assert ExpertPlacement.load(tmp_path / "p0.json", world_size=4).world_size == 4   # a bare table: the run's
    (tmp_path / "negative.json").write_text("[[0, -2], [1]]")
    with pytest.raises(PlacementError, match="negative.json: expert -2 \\(rank 0's list\\) is outside the expert "
                                             "ids from 0"):
        ExpertPlacement.load(tmp_path / "negative.json")


def test_bad_placement_file_stops_prepare_and_download_before_any_work(hub, tmp_path, capsys):
    import run_example
    table = _placement_file(tmp_path, [[0, 1], [1, 2]])
    assert cli([hub.path, str(tmp_path / "out"), "--placement", str(table), "--no-progress"]) == 2
    assert f"{table}: expert 1 is placed twice (ranks 0 and 1)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    code = run_example.main(["--mode", "download", "--offline", "--local-dir", str(tmp_path / "nothing-here"),
                             "--output-dir", str(tmp_path / "out"), "--placement", str(table)])
    assert code == 2 and f"{table}: expert 1 is placed twice" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_sigkill_mid_file_leaves_a_resumable_directory(hub, tmp_path):
    """A conversion killed while writing (stale .partial, stale lock note) resumes, verifies."""
    out = tmp_path / "out"
    code = ("import os, signal\n"
            "from mimo_prepare_weights import convert as c\n"
            "real = c.convert_tensor\n"
            "def dying(checkpoint, spec, dtype):\n"
            "    if '.experts.12.' in spec.name:\n"
            "        os.kill(os.getpid(), signal.SIGKILL)\n"
            "    return real(checkpoint, spec, dtype)\n"
            "c.convert_tensor = dying\n"
            f"c.convert({hub.path!r}, {str(out)!r}, world_size=2, progress=False)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=300, cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL
    left = os.listdir(out)
    assert expert_file_name(1, 2) + ".partial" in left and ".lock" in left
    result = convert(hub.path, out, world_size=2, progress=False)
    assert result.written == [expert_file_name(1, 2)] and len(result.skipped) == 2
    assert cli(["--verify", str(out), "--no-progress"]) == 0
    assert not [n for n in os.listdir(out) if n.endswith(".partial") or n == ".lock"]


@pytest.mark.parametrize("key, value, message", [
    ("layers", "0:4", "'layers' must be a list of non-negative integers"),
    ("experts", [1.5], "'experts' must be a list of non-negative integers"),
    ("ranks", 7, "manifest.json"),
])
def test_prepared_manifest_fields_are_type_checked(prepared, tmp_path, key, value, message):
    out = tmp_path / "copy"
    shutil.copytree(prepared, out)
    manifest = json.load(open(out / MANIFEST_FILE))
    manifest[key] = value
    json.dump(manifest, open(out / MANIFEST_FILE, "w"))
    with pytest.raises(CheckpointError, match=message):
        PreparedCheckpoint(out)
