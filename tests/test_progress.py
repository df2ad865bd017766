"""Progress bars: shown on a terminal once a step passes the delay, off elsewhere or when asked."""

import numpy as np
import pytest

from mimo_v2_flash import MiMoV2FlashModel, progress
from mimo_v2_flash.progress import PROGRESS_ENV, progress_bar, progress_enabled


@pytest.mark.parametrize("setting, explicit, want", [
    (None, None, False),    # pytest captures stderr: not a terminal
    ("1", None, True), ("0", None, False), ("0", True, True), ("1", False, False)])
def test_when_bars_show(monkeypatch, setting, explicit, want):
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    if setting is not None:
        monkeypatch.setenv(PROGRESS_ENV, setting)
    assert progress_enabled(explicit) is want


def test_generation_shows_a_bar_past_the_delay(monkeypatch, capsys):
    model = MiMoV2FlashModel.random("tiny", seed=0)
    monkeypatch.setattr(progress, "DELAY_S", 0.0)
    monkeypatch.setenv(PROGRESS_ENV, "1")
    model.generate(np.arange(4)[None], max_new_tokens=3)
    assert "generating" in capsys.readouterr().err
    monkeypatch.setenv(PROGRESS_ENV, "0")
    model.generate(np.arange(4)[None], max_new_tokens=3)
    assert capsys.readouterr().err == ""


def test_quick_steps_show_no_bar(capsys):
    assert list(progress_bar(range(3), enabled=True, desc="quick")) == [0, 1, 2]   # under the 2 s delay
    assert capsys.readouterr().err == ""


def test_run_example_no_progress_turns_bars_off(monkeypatch, capsys):
    import run_example
    monkeypatch.setattr(progress, "DELAY_S", 0.0)
    monkeypatch.setenv(PROGRESS_ENV, "1")
    assert run_example.main(["--mode", "random", "--no-progress", "--max-new-tokens", "2", "--seq-len", "4"]) == 0
    assert "generating" not in capsys.readouterr().err
