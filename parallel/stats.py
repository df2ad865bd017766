"""Expert-parallel statistics: bytes per phase, rows, expert load, imbalance, dropped tokens.

Every MoE layer call on every rank leaves one `LayerRecord`; rank 0 gathers all ranks' records
and `summarize` turns them into per-rank totals and per-(step, layer) balance figures.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

PHASES = ("layout", "dispatch", "combine")


@dataclass
class Traffic:
    """Bytes this rank sent to and received from other ranks, per phase (its own slice of a
    collective, which never leaves the process, is not counted)."""
    sent: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PHASES, 0))
    received: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PHASES, 0))

    def add(self, phase: str, sent: int, received: int) -> None:
        self.sent[phase] += int(sent)
        self.received[phase] += int(received)

    @property
    def total_sent(self) -> int:
        return sum(self.sent.values())

    @property
    def total_received(self) -> int:
        return sum(self.received.values())


@dataclass
class LayerRecord:
    """One MoE layer call on one rank."""
    rank: int
    step: int
    layer: int
    mode: str
    tokens: int                 # tokens this rank routed
    assignments: int            # (token, expert) pairs those tokens chose: tokens * top_k
    rows_sent: int              # dispatch rows sent to other ranks (padding rows included)
    rows_received: int          # dispatch rows received from other ranks
    local_experts: list[int]    # global ids of this rank's experts
    expert_rows: list[int]      # rows each local expert computed (its load)
    traffic: Traffic            # measured by the communicator
    predicted: Traffic          # predicted by the dispatch plan and layout
    seconds: float              # wall time of the whole MoE layer on this rank

    def to_dict(self) -> dict:
        return asdict(self)


class EPStats:
    """The records of one rank; the caller advances `step` once per forward pass."""

    def __init__(self, rank: int):
        self.rank = rank
        self.step = 0
        self.records: list[LayerRecord] = []

    def next_step(self) -> None:
        self.step += 1

    def add(self, record: LayerRecord) -> None:
        self.records.append(record)


def summarize(records: list[LayerRecord], world_size: int) -> dict:
    """Per-rank totals and per-(step, layer) balance from every rank's records.

    Imbalance is max / mean of computed rows, over ranks and over experts; dropped tokens are
    the assignments routed minus the rows the experts computed (0 for every mode: none drop).
    """
    ranks = []
    for r in range(world_size):
        mine = [rec for rec in records if rec.rank == r]
        ranks.append({
            "rank": r,
            "layer_calls": len(mine),
            "tokens": sum(rec.tokens for rec in mine),
            "rows_sent": sum(rec.rows_sent for rec in mine),
            "rows_received": sum(rec.rows_received for rec in mine),
            "bytes_sent": sum(rec.traffic.total_sent for rec in mine),
            "bytes_received": sum(rec.traffic.total_received for rec in mine),
            "expert_rows": sum(sum(rec.expert_rows) for rec in mine),
            "seconds": sum(rec.seconds for rec in mine),
        })
    layers = []
    for key in sorted({(rec.step, rec.layer) for rec in records}):
        group = [rec for rec in records if (rec.step, rec.layer) == key]
        per_rank = np.zeros(world_size)
        per_expert = {}
        for rec in group:
            per_rank[rec.rank] += sum(rec.expert_rows)
            per_expert.update(zip(rec.local_experts, rec.expert_rows))
        expert_load = np.array([per_expert[e] for e in sorted(per_expert)], np.float64)
        layers.append({
            "step": key[0], "layer": key[1], "modes": sorted({rec.mode for rec in group}),
            "ranks_reporting": len(group),
            "rank_imbalance": _max_over_mean(per_rank),
            "expert_imbalance": _max_over_mean(expert_load),
            "dropped_tokens": sum(rec.assignments for rec in group) - int(per_rank.sum()),
        })
    return {"ranks": ranks, "layers": layers,
            "dropped_tokens": sum(entry["dropped_tokens"] for entry in layers),
            "max_rank_imbalance": max((entry["rank_imbalance"] for entry in layers), default=1.0),
            "max_expert_imbalance": max((entry["expert_imbalance"] for entry in layers), default=1.0)}


def _max_over_mean(values: np.ndarray) -> float:
    mean = float(values.mean()) if values.size else 0.0
    return float(values.max()) / mean if mean > 0 else 1.0


def format_table(summary: dict) -> str:
    """The per-rank statistics table rank 0 prints."""
    head = (f"{'rank':>4} {'MoE calls':>9} {'tokens':>7} {'rows sent':>9} {'rows recv':>9} "
            f"{'MB sent':>9} {'MB recv':>9} {'expert rows':>11} {'MoE s':>7}")
    lines = [head, "-" * len(head)]
    for r in summary["ranks"]:
        lines.append(f"{r['rank']:>4} {r['layer_calls']:>9} {r['tokens']:>7} {r['rows_sent']:>9} "
                     f"{r['rows_received']:>9} {r['bytes_sent'] / 1e6:>9.3f} {r['bytes_received'] / 1e6:>9.3f} "
                     f"{r['expert_rows']:>11} {r['seconds']:>7.3f}")
    lines.append(f"imbalance (max/mean, worst layer): ranks {summary['max_rank_imbalance']:.2f}, "
                 f"experts {summary['max_expert_imbalance']:.2f}; dropped tokens {summary['dropped_tokens']}")
    return "\n".join(lines)
