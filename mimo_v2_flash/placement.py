"""Expert placement: which rank owns each routed expert (the same table for every MoE layer).

Lives beside the model because both the per-rank weight files (`prepare_weights`) and the
expert-parallel runtime (`parallel`) read it; load-aware placement is computed in `parallel`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class PlacementError(ValueError):
    pass


@dataclass(frozen=True)
class ExpertPlacement:
    rank_of: tuple[int, ...]     # rank_of[e] = rank owning expert e
    world_size: int

    def __post_init__(self):
        table = np.asarray(self.rank_of)
        if table.ndim != 1 or len(table) == 0:
            raise PlacementError("placement table must be a non-empty list of ranks, one per expert")
        bad = np.nonzero((table < 0) | (table >= self.world_size))[0]
        if len(bad):
            raise PlacementError(f"placement puts expert {int(bad[0])} on rank {int(table[bad[0]])}, "
                                 f"outside 0..{self.world_size - 1}")

    @property
    def num_experts(self) -> int:
        return len(self.rank_of)

    @classmethod
    def contiguous(cls, num_experts: int, world_size: int) -> "ExpertPlacement":
        """Rank r owns experts r*E/R .. (r+1)*E/R - 1; E must divide evenly."""
        if world_size <= 0:
            raise PlacementError(f"world size must be positive, got {world_size}")
        if num_experts % world_size:
            raise PlacementError(f"world size {world_size} does not divide the {num_experts} experts; "
                                 "give an explicit placement table")
        per = num_experts // world_size
        return cls(tuple(e // per for e in range(num_experts)), world_size)

    @classmethod
    def from_table(cls, table, world_size: int, num_experts: int | None = None) -> "ExpertPlacement":
        """Accept either rank_of (one rank per expert) or experts per rank (a list of lists);
        every expert must appear exactly once."""
        table = list(table)
        if table and isinstance(table[0], (list, tuple)):
            if len(table) != world_size:
                raise PlacementError(f"placement lists {len(table)} ranks but world size is {world_size}")
            owners: dict[int, int] = {}
            for rank, experts in enumerate(table):
                for e in experts:
                    if e in owners:
                        raise PlacementError(f"expert {e} is placed twice (ranks {owners[e]} and {rank})")
                    owners[int(e)] = rank
            total = num_experts if num_experts is not None else len(owners)
            missing = [e for e in range(total) if e not in owners]
            if missing or len(owners) != total:
                raise PlacementError(f"expert {missing[0] if missing else max(owners)} is "
                                     f"{'not placed' if missing else 'outside the expert range'}")
            table = [owners[e] for e in range(total)]
        if num_experts is not None and len(table) != num_experts:
            raise PlacementError(f"placement has {len(table)} experts, the model has {num_experts}")
        return cls(tuple(int(r) for r in table), world_size)

    def experts_of(self, rank: int) -> list[int]:
        return [e for e, r in enumerate(self.rank_of) if r == rank]

    def as_array(self) -> np.ndarray:
        return np.asarray(self.rank_of, np.int64)

    def to_json(self) -> dict:
        return {"world_size": self.world_size, "rank_of": list(self.rank_of)}

    @classmethod
    def from_json(cls, data: dict) -> "ExpertPlacement":
        return cls(tuple(data["rank_of"]), int(data["world_size"]))
