"""Self-checks behind `run_example.py --mode test`: kernels and model paths against the reference.

Each topic module in `TOPICS` defines `checks(quick: bool) -> Iterable[CheckResult]`; `quick`
skips the slowest cases (full MiMo shapes are never skipped for kernels: that is the point).
The problems a topic builds (shape tables, inputs, reference measures, rooflines) are also what
the kernels' tests and benchmarks run; the tolerances here are the self-checks' own (each test
states its own).
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass

import numpy as np

TOPICS = ["reference", "kernels_moe", "kernels_basic", "kernels_attention", "decoder_layer"]


def relative_error(got, want) -> float:
    """max |got - want| / max |want|: the error measure of the kernel and layer checks."""
    return float(np.abs(np.asarray(got, np.float32) - want).max() / np.abs(want).max())


@dataclass
class CheckResult:
    topic: str
    name: str                    # kernel or check name
    shapes: str                  # the problem, e.g. "T=129 H=4096 bf16"
    max_error: float             # the error measure the tolerance applies to
    tolerance: float
    passed: bool
    estimated_us: float | None = None   # simulator cost model (an estimate, not a measurement)
    roofline_us: float | None = None    # max(FLOPs / peak, HBM bytes / bandwidth)
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.estimated_us and self.roofline_us:
            return self.roofline_us / self.estimated_us
        return None

    def to_dict(self) -> dict:
        return {**asdict(self), "roofline_fraction": self.ratio}


def run_checks(topics=None, quick: bool = False) -> list[CheckResult]:
    results = []
    for topic in topics or TOPICS:
        module = importlib.import_module(f"{__name__}.{topic}")
        try:
            results.extend(module.checks(quick))
        except Exception as err:  # a crashing check is a failed check, reported, not hidden
            results.append(CheckResult(topic, "(crashed)", "", float("nan"), 0.0, False,
                                       note=f"{type(err).__name__}: {err}"))
    return results


def format_table(results: list[CheckResult]) -> str:
    def fmt(value, spec):
        width = int(spec.split(".")[0])
        return f"{'-':>{width}}" if value is None else format(value, spec)
    header = f"{'topic':<10} {'check':<28} {'shapes':<34} {'max err':>9} {'tol':>8} {'ok':>4} " \
             f"{'est us':>9} {'roof us':>9} {'roof/est':>8}"
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(f"{r.topic:<10} {r.name:<28} {r.shapes:<34} {r.max_error:>9.2e} {r.tolerance:>8.1e} "
                     f"{'yes' if r.passed else 'NO':>4} {fmt(r.estimated_us, '9.1f')} "
                     f"{fmt(r.roofline_us, '9.1f')} {fmt(r.ratio, '8.0%')}")
    return "\n".join(lines)
