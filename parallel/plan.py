"""The dispatch plan of one MoE layer on one rank, and the bytes each mode moves: pure NumPy.

From this rank's routing (expert ids and weights [N, k]) and the placement, the plan says per
token which ranks it goes to (each rank once, however many of the token's experts live there)
and per destination rank the rows to send: token indices in token order, the destination's
local expert ids and the routing weights of each row. Rows are grouped by destination rank,
ascending, which is the order `all_to_all_single` splits its input in.

After the counts exchange every rank knows the `Layout` (rows every rank sends every other
rank, tokens per rank); `predict_traffic` then gives the exact bytes each collective moves in
each mode, which the runtime measures independently and the tests compare.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import comb

import ml_dtypes
import numpy as np

from mimo_v2_flash.placement import ExpertPlacement

from .stats import Traffic

MODES = ("alltoallv", "alltoall_padded", "allgather")
WIRE_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
LAYOUT_FIELDS = 2          # the counts exchange sends [layer, tokens, counts to each rank...] (int32)
COUNT_BYTES = 4            # counts travel as int32 (what the Neuron collectives carry natively)


@dataclass(frozen=True)
class RowFormat:
    """Wire layout of a dispatched row: hidden [H] in the wire dtype, then `top_k` int32 expert
    ids (-1: that slot's expert is not on the receiving rank) and `top_k` float32 weights.
    A combine row (one partial) is hidden [H] in the wire dtype. Rows travel as uint8 bytes so
    one collective carries all three fields."""
    hidden_size: int
    top_k: int
    wire_dtype: str = "float32"

    def __post_init__(self):
        if self.wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"wire dtype {self.wire_dtype!r} is not one of {sorted(WIRE_DTYPES)}")

    @property
    def _hidden_bytes(self) -> int:
        return self.hidden_size * WIRE_DTYPES[self.wire_dtype].itemsize

    @property
    def dispatch_row_bytes(self) -> int:
        return self._hidden_bytes + 8 * self.top_k

    @property
    def combine_row_bytes(self) -> int:
        return self._hidden_bytes

    def encode(self, x: np.ndarray, ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """x [M, H], ids [M, k], weights [M, k] -> uint8 [M, dispatch_row_bytes]."""
        m, hb, k = len(x), self._hidden_bytes, self.top_k
        rows = np.empty((m, self.dispatch_row_bytes), np.uint8)
        rows[:, :hb] = self.encode_partial(x)
        rows[:, hb:hb + 4 * k] = np.ascontiguousarray(ids, np.int32).view(np.uint8).reshape(m, 4 * k)
        rows[:, hb + 4 * k:] = np.ascontiguousarray(weights, np.float32).view(np.uint8).reshape(m, 4 * k)
        return rows

    def decode(self, rows: np.ndarray):
        """uint8 [M, dispatch_row_bytes] -> (x float32 [M, H], ids int32 [M, k], weights float32 [M, k])."""
        hb, k = self._hidden_bytes, self.top_k
        x = self.decode_partial(rows[:, :hb])
        ids = self.expert_ids(rows)
        weights = np.ascontiguousarray(rows[:, hb + 4 * k:]).view(np.float32)
        return x, ids, weights

    def expert_ids(self, rows: np.ndarray) -> np.ndarray:
        """The ids field of rows [..., dispatch_row_bytes] -> int32 [..., k], hidden left encoded."""
        hb, k = self._hidden_bytes, self.top_k
        return np.ascontiguousarray(rows[..., hb:hb + 4 * k]).view(np.int32)

    def encode_partial(self, y: np.ndarray) -> np.ndarray:
        """[M, H] -> uint8 [M, combine_row_bytes] (rounded once to the wire dtype)."""
        wire = np.ascontiguousarray(y, np.float32).astype(WIRE_DTYPES[self.wire_dtype])
        return wire.view(np.uint8).reshape(len(y), self._hidden_bytes)

    def decode_partial(self, rows: np.ndarray) -> np.ndarray:
        """uint8 [M, combine_row_bytes] -> float32 [M, H]."""
        wire = np.ascontiguousarray(rows).view(WIRE_DTYPES[self.wire_dtype])
        return wire.astype(np.float32).reshape(len(rows), self.hidden_size)


def local_expert_index(placement: ExpertPlacement) -> np.ndarray:
    """[E] position of each expert among its owner's experts (owners list them ascending)."""
    rank_of = placement.as_array()
    index = np.zeros(len(rank_of), np.int64)
    for r in range(placement.world_size):
        mine = np.nonzero(rank_of == r)[0]
        index[mine] = np.arange(len(mine))
    return index


@dataclass(frozen=True)
class DispatchPlan:
    """What one rank sends in one MoE layer. S = rows, R = ranks, N = tokens, k = top_k."""
    rank: int
    world_size: int
    destinations: np.ndarray   # [N, R] bool: token n goes to rank r
    token_of_row: np.ndarray   # [S] token index of each row; rows grouped by destination rank
    send_counts: np.ndarray    # [R] rows for each destination rank (this rank's own included)
    local_ids: np.ndarray      # [S, k] int32 destination-local expert index per slot, or -1
    weights: np.ndarray        # [S, k] float32 routing weight per slot, 0 where local_ids is -1

    @property
    def num_tokens(self) -> int:
        return len(self.destinations)

    @property
    def offsets(self) -> np.ndarray:
        """[R + 1] first row of each destination's segment."""
        return np.concatenate([[0], np.cumsum(self.send_counts)])

    @property
    def remote_rows(self) -> int:
        return int(self.send_counts.sum() - self.send_counts[self.rank])

    def predicted_dispatch_bytes(self, fmt: RowFormat) -> int:
        """Bytes this rank's alltoallv dispatch sends to other ranks: one row per (token, remote rank)."""
        return self.remote_rows * fmt.dispatch_row_bytes


def build_plan(expert_ids: np.ndarray, expert_weights: np.ndarray, placement: ExpertPlacement,
               rank: int) -> DispatchPlan:
    """The plan for routing `expert_ids` / `expert_weights` [N, k] from `rank`."""
    ids = np.asarray(expert_ids)
    weights = np.asarray(expert_weights)
    if ids.ndim != 2 or weights.shape != ids.shape:
        raise ValueError(f"expert ids {ids.shape} and weights {weights.shape} must both be [tokens, top_k]")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"expert ids must be integers, got dtype {ids.dtype}")
    num_experts, world = placement.num_experts, placement.world_size
    if ids.size and (ids.min() < 0 or ids.max() >= num_experts):
        bad = ids[(ids < 0) | (ids >= num_experts)][0]
        raise ValueError(f"expert id {int(bad)} outside the placement's 0..{num_experts - 1}")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside 0..{world - 1}")
    ids = ids.astype(np.int64)
    dest = placement.as_array()[ids]                                   # [N, k] owner of each choice
    n = len(ids)
    destinations = np.zeros((n, world), bool)
    destinations[np.arange(n)[:, None], dest] = True
    row_rank, row_token = np.nonzero(destinations.T)                   # rank-major, tokens ascending
    here = dest[row_token] == row_rank[:, None]                        # [S, k] slots for that rank
    local = np.where(here, local_expert_index(placement)[ids[row_token]], -1).astype(np.int32)
    w = np.where(here, weights[row_token], 0).astype(np.float32)
    return DispatchPlan(rank, world, destinations, row_token.astype(np.int64),
                        destinations.sum(axis=0).astype(np.int64), local, w)


@dataclass(frozen=True)
class Layout:
    """What every rank knows after one MoE layer's counts exchange."""
    counts: np.ndarray   # [R, R] rows rank s sends rank d
    tokens: np.ndarray   # [R] tokens each rank routes

    @property
    def capacity(self) -> int:
        """Rows per (source, destination) slot in the padded mode: the largest count, so no row drops."""
        return int(self.counts.max()) if self.counts.size else 0

    @property
    def max_tokens(self) -> int:
        return int(self.tokens.max()) if self.tokens.size else 0


def predict_traffic(mode: str, layout: Layout, rank: int, fmt: RowFormat) -> Traffic:
    """Bytes `rank` sends to / receives from other ranks in one MoE layer of `mode`.

    layout: an all-gather of R + 2 int32 per rank. alltoallv: exactly the rows routed.
    alltoall_padded: R - 1 slots of `capacity` rows each way. allgather: every rank's tokens
    (padded to the largest count) to every other rank, partials back the same way.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: expected one of {MODES}")
    world = len(layout.tokens)
    others = world - 1
    traffic = Traffic()
    traffic.add("layout", others * (world + LAYOUT_FIELDS) * COUNT_BYTES, others * (world + LAYOUT_FIELDS) * COUNT_BYTES)
    if mode == "alltoallv":
        out_rows = int(layout.counts[rank].sum() - layout.counts[rank, rank])
        in_rows = int(layout.counts[:, rank].sum() - layout.counts[rank, rank])
    elif mode == "alltoall_padded":
        out_rows = in_rows = others * layout.capacity
    else:
        out_rows = in_rows = others * layout.max_tokens
    traffic.add("dispatch", out_rows * fmt.dispatch_row_bytes, in_rows * fmt.dispatch_row_bytes)
    traffic.add("combine", in_rows * fmt.combine_row_bytes, out_rows * fmt.combine_row_bytes)
    return traffic


def expected_remote_copies(num_experts: int, world_size: int, top_k: int) -> float:
    """Expected (token, remote rank) copies per token under uniform random top-k routing and a
    placement with E / R experts per rank: R (1 - C(E - E/R, k) / C(E, k)) distinct ranks, of
    which (R - 1) / R are remote. The all-gather baseline sends R - 1 copies per token."""
    per_rank = num_experts // world_size
    distinct = world_size * (1 - comb(num_experts - per_rank, top_k) / comb(num_experts, top_k))
    return distinct * (world_size - 1) / world_size
