"""Expert placement: which rank owns each routed expert (the same table for every MoE layer).

Lives beside the model because both the per-rank weight files (`prepare_weights`) and the
expert-parallel runtime (`parallel`) read it; load-aware placement is computed in `parallel`.
`ExpertPlacement.load` is the one reader of placement files (prepare-weights `--placement`,
run_example.py `--ep-placement`); a prepared manifest's placement goes through the same
`from_json`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .jsonfile import read_json


class PlacementError(ValueError):
    pass


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclass(frozen=True)
class ExpertPlacement:
    rank_of: tuple[int, ...]     # rank_of[e] = rank owning expert e
    world_size: int

    def __post_init__(self):
        if not _is_int(self.world_size) or self.world_size <= 0:
            raise PlacementError(f"world size must be a positive integer, got {self.world_size!r}")
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
            table = cls._owners(table, world_size, num_experts)
        if num_experts is not None and len(table) != num_experts:
            raise PlacementError(f"placement has {len(table)} experts, the model has {num_experts}")
        return cls(tuple(int(r) for r in table), world_size)

    @staticmethod
    def _owners(experts_per_rank, world_size: int, num_experts: int | None) -> list[int]:
        """Expert lists, one per rank -> rank_of, refusing a duplicate, a gap or an unknown expert."""
        if len(experts_per_rank) != world_size:
            raise PlacementError(f"placement lists {len(experts_per_rank)} ranks but world size is {world_size}")
        owners: dict[int, int] = {}
        for rank, experts in enumerate(experts_per_rank):
            for e in experts:
                e = int(e)
                if e < 0 or (num_experts is not None and e >= num_experts):
                    limit = "ids from 0" if num_experts is None else f"range 0..{num_experts - 1}"
                    raise PlacementError(f"expert {e} (rank {rank}'s list) is outside the expert {limit}")
                if e in owners:
                    raise PlacementError(f"expert {e} is placed twice (ranks {owners[e]} and {rank})")
                owners[e] = rank
        total = num_experts if num_experts is not None else max(owners, default=-1) + 1
        missing = [e for e in range(total) if e not in owners]
        if missing or not owners:
            raise PlacementError(f"expert {missing[0] if missing else 0} is not placed")
        return [owners[e] for e in range(total)]

    def experts_of(self, rank: int) -> list[int]:
        return [e for e, r in enumerate(self.rank_of) if r == rank]

    def as_array(self) -> np.ndarray:
        return np.asarray(self.rank_of, np.int64)

    def to_json(self) -> dict:
        return {"world_size": self.world_size, "rank_of": list(self.rank_of)}

    @classmethod
    def from_json(cls, data, world_size: int | None = None, num_experts: int | None = None) -> "ExpertPlacement":
        """A placement from parsed JSON: {"world_size": R, "rank_of": table} (what `to_json`
        writes), or the table alone, where a table is a rank_of list (one rank per expert) or a
        list of expert lists (one per rank). `world_size` / `num_experts`, when given, must match;
        a bare rank_of list without them is over max(rank) + 1 ranks."""
        declared = None
        if isinstance(data, dict):
            unknown = sorted(set(data) - {"world_size", "rank_of"})
            if "rank_of" not in data or unknown:
                raise PlacementError('a placement object holds "rank_of" and optionally "world_size"; got keys '
                                     f"{sorted(data)}")
            declared = data.get("world_size")
            if declared is not None and (not _is_int(declared) or declared <= 0):
                raise PlacementError(f'"world_size" must be a positive integer, got {declared!r}')
            data = data["rank_of"]
        nested = _check_table(data)
        if declared is not None and world_size is not None and declared != world_size:
            raise PlacementError(f"placement is for {declared} ranks, the world size is {world_size}")
        world = declared or world_size or (len(data) if nested else max(data) + 1)
        return cls.from_table(data, world, num_experts)

    @classmethod
    def load(cls, path, world_size: int | None = None, num_experts: int | None = None) -> "ExpertPlacement":
        """The placement file at `path` (any form `from_json` takes); every problem is a
        PlacementError naming the file: missing, not a regular file, not UTF-8 JSON, a table of
        the wrong shape, an expert out of range or placed twice, the wrong world size or expert count."""
        data = read_json(path, PlacementError, "placement table", expect=None)
        try:
            return cls.from_json(data, world_size, num_experts)
        except PlacementError as err:
            raise PlacementError(f"{path}: {err}") from None


def _check_table(table) -> bool:
    """A non-empty rank_of list of integers, or a non-empty list of integer lists; returns
    whether it is the nested form."""
    if not isinstance(table, list) or not table:
        raise PlacementError("placement table must be a non-empty list: a rank per expert, or an expert "
                             f"list per rank; got {type(table).__name__} {table!r:.60}")
    nested = isinstance(table[0], list)
    for i, entry in enumerate(table):
        values = entry if nested and isinstance(entry, list) else [entry]
        if isinstance(entry, list) != nested or not all(_is_int(v) for v in values):
            kind = "a list of integer expert ids" if nested else "an integer rank"
            raise PlacementError(f"placement table entry {i} is {entry!r:.60}, expected {kind}")
        if not nested and entry < 0:
            raise PlacementError(f"placement puts expert {i} on rank {entry}, ranks start at 0")
    return nested
