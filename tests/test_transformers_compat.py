"""Living beside transformers: import names that do not collide, and checkpoints that transformers'
native `MiMoV2FlashForCausalLM` loads as exactly this project's model.

The import tests run in subprocesses so that the working directory (repository root or
elsewhere) decides what Python finds, as it does for a user. The transformers tests need
transformers (the test extra installs it); they compare logits at 1e-4 relative, positions past
the sliding window included, so a window read one key wider fails.
"""

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from mimo_v2_flash import MiMoV2FlashModel, load_config
from mimo_v2_flash.checkpoint import TransformersCompatibilityWarning

REPO = Path(__file__).resolve().parents[1]


def _run(code: str, cwd, env_extra: dict | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(env_extra or {})
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"in {cwd}:\n{result.stderr[-3000:]}"
    return result.stdout


def _installed(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.skipif(not _installed("transformers"), reason="transformers is not installed")
@pytest.mark.parametrize("where", ["repository root", "elsewhere"])
def test_transformers_and_the_project_import_side_by_side(where, tmp_path):
    cwd = REPO if where == "repository root" else tmp_path
    out = _run("""
        import transformers
        from transformers import MiMoV2FlashForCausalLM
        from mimo_v2_flash import MiMoV2FlashModel
        import kernels, mimo_kernels.backend
        print(kernels.__file__)
        print(MiMoV2FlashForCausalLM.__module__, MiMoV2FlashModel.__module__)
    """, cwd)
    kernels_file, modules = out.strip().splitlines()
    # Hugging Face's `kernels` (a transformers requirement), not the repository's kernels/ folder.
    hf_kernels = importlib.metadata.distribution("kernels")
    assert Path(kernels_file).resolve() == Path(hf_kernels.locate_file("kernels/__init__.py")).resolve()
    assert modules == "transformers.models.mimo_v2_flash.modeling_mimo_v2_flash mimo_v2_flash.model"


def test_a_stand_in_kernels_distribution_wins_over_the_repository_folder(tmp_path):
    """Without Hugging Face's `kernels` installed, a stand-in distribution of that name shows the
    same rule: a regular package anywhere on the path outranks the repository's kernels/ folder,
    which has no __init__.py, even from the repository root."""
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("STAND_IN = True\n")
    info = site / "kernels-0.0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 0.0.1\n")
    out = _run("""
        import importlib.metadata
        import kernels
        from mimo_kernels.rmsnorm import rmsnorm
        from mimo_v2_flash import MiMoV2FlashModel
        print(getattr(kernels, "STAND_IN", False), importlib.metadata.version("kernels"))
    """, REPO, {"PYTHONPATH": str(site)})
    assert out.split() == ["True", "0.0.1"]


@pytest.fixture(scope="module")
def transformers_api():
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    if not hasattr(transformers, "MiMoV2FlashForCausalLM"):
        pytest.skip(f"transformers {transformers.__version__} has no native MiMoV2FlashForCausalLM")
    transformers.logging.set_verbosity_error()
    return transformers, torch


def _hf_logits(transformers_api, path, ids, **kwargs):
    transformers, torch = transformers_api
    model = transformers.MiMoV2FlashForCausalLM.from_pretrained(path, **kwargs)
    with torch.no_grad():
        return model, model(torch.tensor(ids)).logits.float().numpy()


@pytest.mark.parametrize("convention", ["hf", "sglang"])
def test_transformers_loads_a_saved_checkpoint_as_the_same_model(transformers_api, tmp_path, convention):
    config = load_config("tiny").replace(sliding_window_convention=convention)
    model = MiMoV2FlashModel.random(config, seed=5)
    model.save_pretrained(tmp_path)
    window = config.window_keys
    ids = np.random.default_rng(1).integers(0, config.vocab_size, (2, 3 * window))  # well past the window
    hf_model, theirs = _hf_logits(transformers_api, tmp_path, ids)
    assert hf_model.config.sliding_window == window
    ours = model.forward(ids)
    scale = np.abs(ours).max()
    for position in (0, window - 1, window, window + 1, 3 * window - 1):
        np.testing.assert_allclose(theirs[:, position], ours[:, position], rtol=0, atol=1e-4 * scale,
                                   err_msg=f"position {position} (window {window} keys)")
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-4 * scale)
    # The saved file also reads back here as the same config.
    assert MiMoV2FlashModel.from_pretrained(tmp_path).config == config


def test_transformers_greedy_generation_matches(transformers_api, tmp_path):
    """Decoding through transformers' cache (SWA layers past the window) picks our tokens."""
    transformers, torch = transformers_api
    model = MiMoV2FlashModel.random("tiny", seed=8)
    model.save_pretrained(tmp_path)
    hf_model = transformers.MiMoV2FlashForCausalLM.from_pretrained(tmp_path)
    prompt = np.random.default_rng(2).integers(0, 512, (1, 12))
    new = 10   # 12 + 10 positions cross the 16-key window while decoding
    ours = model.generate(prompt, max_new_tokens=new, stop_tokens=[])
    theirs = hf_model.generate(torch.tensor(prompt), max_new_tokens=new, min_new_tokens=new,
                               do_sample=False, eos_token_id=None, pad_token_id=0)
    np.testing.assert_array_equal(theirs.numpy(), ours)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_saved_dtype_is_labelled_truthfully(transformers_api, tmp_path, dtype):
    _, torch = transformers_api
    model = MiMoV2FlashModel.random("tiny", seed=1)
    model.config.quantization_config = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    model.save_pretrained(tmp_path, dtype=dtype)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["torch_dtype"] == written["dtype"] == dtype
    assert "quantization_config" not in written          # nothing written is FP8
    hf_model, theirs = _hf_logits(transformers_api, tmp_path, np.arange(20)[None])
    assert hf_model.dtype == getattr(torch, dtype)        # transformers' default dtype="auto"
    if dtype == "float32":
        np.testing.assert_allclose(theirs, model.forward(np.arange(20)[None]), rtol=0,
                                   atol=1e-4 * np.abs(theirs).max())


def test_configs_transformers_cannot_build_warn_when_saved(tmp_path):
    config = load_config("tiny").replace(swa_num_key_value_heads=8)
    assert config.transformers_differences() == [
        "swa_num_key_value_heads=8 is not twice num_key_value_heads=2"]
    model = MiMoV2FlashModel.random(config, seed=0)
    with pytest.warns(TransformersCompatibilityWarning, match="swa_num_key_value_heads=8"):
        model.save_pretrained(tmp_path)
    subset = MiMoV2FlashModel.random("tiny", seed=0, expert_subset=range(8))
    with pytest.warns(TransformersCompatibilityWarning, match="initialise them at random"):
        subset.save_pretrained(tmp_path / "subset")
