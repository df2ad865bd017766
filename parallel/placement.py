"""Load-aware expert placement, built on `mimo_v2_flash.placement.ExpertPlacement`.

Contiguous and explicit tables (with their validation) live in `mimo_v2_flash.placement`; this
module adds the placement computed from routing statistics: it balances the expected number of
expert rows (token-expert assignments) each rank computes, keeping the expert count per rank
equal (every expert's weights are the same size, so memory stays balanced too).
"""

from __future__ import annotations

import numpy as np

from mimo_v2_flash.placement import ExpertPlacement, PlacementError


def expert_load(expert_ids: np.ndarray, num_experts: int) -> np.ndarray:
    """Assignments per expert [E] from router choices `expert_ids` [..., k] (any leading shape)."""
    ids = np.asarray(expert_ids).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= num_experts):
        raise PlacementError(f"routing statistics hold expert id {int(ids[(ids < 0) | (ids >= num_experts)][0])} "
                             f"outside 0..{num_experts - 1}")
    return np.bincount(ids, minlength=num_experts).astype(np.int64)


def rank_loads(load: np.ndarray, placement: ExpertPlacement) -> np.ndarray:
    """Assignments per rank [R] under `placement`, from per-expert load [E]."""
    return np.bincount(placement.as_array(), weights=np.asarray(load, np.float64),
                       minlength=placement.world_size)


def imbalance(per_rank: np.ndarray) -> float:
    """max / mean (1.0 is perfect; 0 load everywhere counts as balanced)."""
    mean = float(np.mean(per_rank))
    return float(np.max(per_rank)) / mean if mean > 0 else 1.0


def load_aware_placement(load, world_size: int) -> ExpertPlacement:
    """Balance expected rows per rank: heaviest expert first onto the least-loaded rank that still
    has room, with ceil(E / R) experts per rank at most (exactly E / R when R divides E).

    `load` [E] (or [layers, E], summed over layers since one table serves every layer) is the
    number of assignments per expert seen in routing statistics (see `expert_load`). Ties go to
    the lower expert id and the lower rank, so the result is deterministic.
    """
    load = np.asarray(load, np.float64)
    if load.ndim == 2:
        load = load.sum(axis=0)
    if load.ndim != 1 or len(load) == 0:
        raise PlacementError(f"expert load must be [experts] or [layers, experts], got shape {np.shape(load)}")
    if (load < 0).any() or not np.isfinite(load).all():
        raise PlacementError("expert load must be finite and non-negative")
    if world_size <= 0 or world_size > len(load):
        raise PlacementError(f"world size {world_size} must be in 1..{len(load)} (one expert per rank at least)")
    room = -(-len(load) // world_size)
    rank_of = np.empty(len(load), np.int64)
    per_rank = np.zeros(world_size)
    count = np.zeros(world_size, np.int64)
    for e in np.argsort(-load, kind="stable"):
        open_ranks = np.nonzero(count < room)[0]
        r = open_ranks[np.argmin(per_rank[open_ranks])]
        rank_of[e] = r
        per_rank[r] += load[e]
        count[r] += 1
    return ExpertPlacement(tuple(int(r) for r in rank_of), world_size)
