"""The kernel backend's static-shape buckets under torchrun + gloo (world size 2).

run_example.py --mode random --backend nki, one process against two ranks: the same greedy tokens
(padding rows and the static expert exchange change no real row's arithmetic), every bucket
compiled at warmup on every rank and no new kernel specialization after it, no weight bytes
uploaded after the warmup, and rank 0's kernel-output reads per decode step reported.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from test_parallel_torchrun import REPO, launch


@pytest.mark.parametrize("batch", [3, 1])      # shares of 2 and 1 sequences; rank 1 idle (only MoE layers)
def test_bucketed_generation_under_torchrun_compiles_nothing_after_warmup(batch, tmp_path):
    common = ["run_example.py", "--mode", "random", "--backend", "nki", "--num-layers", "2", "--batch", str(batch),
              "--seq-len", "6", "--max-new-tokens", "4", "--seed", "4", "--no-progress"]
    single = subprocess.run([sys.executable, *common, "--json", str(tmp_path / "single.json")], cwd=REPO,
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert single.returncode == 0, single.stderr[-3000:]
    assert re.search(r"kernel variants: \d+ compiled at warmup, 0 new after warmup", single.stdout), single.stdout
    expected = json.loads((tmp_path / "single.json").read_text())["tokens"]
    code, _, output = launch(2, [*common, "--json", str(tmp_path / "ep.json")], 900)
    assert code == 0, output[-3000:]
    assert json.loads((tmp_path / "ep.json").read_text())["tokens"] == expected
    variants = re.search(r"kernel variants: (\d+) compiled at warmup, (\d+) new after warmup \(every rank\)", output)
    assert variants is not None, output[-3000:]
    assert int(variants.group(1)) > 0 and variants.group(2) == "0"
    assert re.search(r"host->device: [\d.]+ [KMG]?B weights at warmup, 0 B weights after it", output), output[-3000:]
    assert re.search(r"device->host: \d+ reads?, [\d.]+ [KMG]?B per decode step .*\(rank 0\)", output), output[-3000:]
