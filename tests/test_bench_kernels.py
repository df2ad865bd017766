"""benchmarks/bench_kernels.py without simulating: merging per-run JSON files and the tables."""

import importlib.util
import json
from dataclasses import asdict
from pathlib import Path

import pytest

from mimo_kernels.trn2 import TRN2

_SPEC = importlib.util.spec_from_file_location(
    "bench_kernels", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_kernels.py")
bench_kernels = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench_kernels)


def _row(kernel, tokens, estimated_us, topic="kernels_moe"):
    row = dict(kernel=kernel, shapes="H=4096 E=256 fp32", tokens=tokens, estimated_us=estimated_us,
               roofline_us=10.0, bound="hbm", goal=0.7, hbm_bytes=2.9e6, topic=topic)
    row["roofline_fraction"] = row["roofline_us"] / estimated_us
    row["achievable_fraction"] = bench_kernels.achievable_fraction(row)
    row["meets_goal"] = bench_kernels.meets_goal(row)
    return row


def _write(path, rows, wall_s, machine=None):
    path.write_text(json.dumps({"timestamp": 0, "machine": machine or asdict(TRN2),
                                "wall_s": wall_s, "rows": rows}))
    return str(path)


def test_merge_keeps_order_and_later_file_replaces_same_row(tmp_path):
    first = _write(tmp_path / "a.json", [_row("router", 1, 40.0), _row("router", 8, 41.0)],
                   {"kernels_moe": 100.0})
    second = _write(tmp_path / "b.json", [_row("router", 8, 20.0), _row("router", 512, 90.0)],
                    {"kernels_attention": 7.0})
    rows, wall_s = bench_kernels.merge_runs([first, second])
    assert [(r["tokens"], r["estimated_us"]) for r in rows] == [(1, 40.0), (8, 20.0), (512, 90.0)]
    assert wall_s == {"kernels_moe": 100.0, "kernels_attention": 7.0}


def test_merge_refuses_other_machine_and_non_bench_files(tmp_path):
    other = dict(asdict(TRN2), dma_achieved_fraction=TRN2.dma_achieved_fraction / 2)
    stale = _write(tmp_path / "stale.json", [_row("router", 1, 40.0)], {}, machine=other)
    with pytest.raises(ValueError, match="stale.json: written with a different Trn2Model"):
        bench_kernels.merge_runs([stale])
    junk = tmp_path / "junk.json"
    junk.write_text("[1, 2]")
    with pytest.raises(ValueError, match="junk.json: not a bench_kernels JSON file"):
        bench_kernels.merge_runs([str(junk)])


def test_tables_show_percentages_and_verdict():
    # 10 us roofline over 40 us: 25% of the peak; the achievable roofline is
    # 2.9 MB / (362.5 GB/s x 0.7) = 11.4 us, so 29% of achievable, under the 70% goal.
    row = _row("router", 1, 40.0)
    achievable_us = row["hbm_bytes"] / TRN2.hbm_bytes_per_s_core / TRN2.dma_achieved_fraction * 1e6
    assert row["achievable_fraction"] == pytest.approx(achievable_us / 40.0)
    text = bench_kernels.format_rows([row]).splitlines()[2].split()
    assert text[-4:] == ["25%", f"{achievable_us / 40:.0%}", "70%", "no"]
    markdown = bench_kernels.format_markdown([dict(row, shapes="q|k|v")]).splitlines()
    assert markdown[0].startswith("| kernel | shapes | T |")
    assert markdown[2] == (f"| router | q\\|k\\|v | 1 | hbm | 40.0 | 10.0 | 25% | "
                           f"{achievable_us / 40:.0%} | 70% | no |")


def test_a_run_stopped_early_keeps_its_finished_rows(tmp_path, monkeypatch):
    def bench(token_counts):
        for tokens in token_counts:
            if tokens == 512:
                raise KeyboardInterrupt                     # the run is stopped at T = 512
            yield {k: v for k, v in _row("router", tokens, 40.0).items()
                   if k in ("kernel", "shapes", "tokens", "estimated_us", "roofline_us", "bound", "goal",
                            "hbm_bytes")}
    fake_topic = type("FakeTopic", (), {"bench": staticmethod(bench)})
    monkeypatch.setattr(bench_kernels.importlib, "import_module", lambda name: fake_topic)
    path = tmp_path / "partial.json"
    with pytest.raises(KeyboardInterrupt):
        bench_kernels.main(["--topics", "kernels_moe", "--tokens", "1,8,512", "--json", str(path)])
    run = json.loads(path.read_text())
    assert run["complete"] is False
    assert [r["tokens"] for r in run["rows"]] == [1, 8]
    rows, _ = bench_kernels.merge_runs([str(path)])
    assert rows[1]["roofline_fraction"] == pytest.approx(10.0 / 40.0)
