"""`import mimo_v2_flash` stays light: heavy modules load when the code that needs them runs
(ml_dtypes alone costs ~0.5 s of import). Checked by what a fresh interpreter has loaded, not by
timing (benchmarks time; tests do not)."""

import subprocess
import sys

HEAVY = ("numpy", "ml_dtypes", "safetensors", "tokenizers", "jinja2", "torch", "transformers", "tqdm")


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


def test_package_import_loads_nothing_heavy():
    assert _loaded_after("import mimo_v2_flash; mimo_v2_flash.load_config('tiny')") == set()


def test_model_import_loads_numpy_only():
    assert _loaded_after("from mimo_v2_flash import MiMoV2FlashModel") == {"numpy"}


def test_lazy_names_resolve_and_unknown_names_fail():
    import mimo_v2_flash
    from mimo_v2_flash.model import MiMoV2FlashModel
    assert mimo_v2_flash.MiMoV2FlashModel is MiMoV2FlashModel
    assert set(mimo_v2_flash.__all__) <= set(dir(mimo_v2_flash))
    try:
        mimo_v2_flash.NoSuchName
    except AttributeError as err:
        assert "NoSuchName" in str(err)
    else:
        raise AssertionError("an unknown name resolved")
