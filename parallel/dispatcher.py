"""Dispatch and combine of one MoE layer across ranks, in three modes.

Every mode starts with the same counts exchange: each rank all-gathers [layer, tokens, rows for
each rank], so every rank knows the whole `Layout` (and checks all ranks are in the same layer).
Then, with `compute(x [M, H], local_ids [M, k], weights [M, k]) -> partials [M, H]` running this
rank's experts on what it received:

* "alltoallv": each token's row goes once to each rank owning one of its experts, with that
  rank's local expert ids and weights (`all_to_all_single`, uneven splits); one partial per
  (token, rank) comes back the same way.
* "alltoall_padded": the same rows in equal splits, every (source, destination) slot padded to
  the layout's largest count, so nothing drops (the Neuron XLA process group has equal splits only).
* "allgather": every rank gathers every token (padded to the largest token count), computes its
  local experts' share, and the partials go back to each token's owner (a reduce-scatter done as
  an equal-split all_to_all plus a local sum) -- what existing Neuron stacks do; the baseline.

The sender sums the partials of a token in rank order 0..R-1, so the result does not depend on
timing. A rank with no tokens still enters every collective.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from mimo_v2_flash.placement import ExpertPlacement

from .comm import Communicator
from .plan import (LAYOUT_FIELDS, MODES, DispatchPlan, Layout, RowFormat, build_plan,
                   local_expert_index, predict_traffic)
from .stats import LayerRecord, Traffic


@dataclass(frozen=True)
class ModePolicy:
    """Chooses the mode of a layer from its layout (the same answer on every rank).

    All-gather at tiny batches (decode with a few tokens per rank: every local expert's weights
    are read anyway and the exchange is latency-bound), token all-to-all above; equal splits
    where the process group has no uneven all_to_all.
    """
    allgather_max_tokens: int = 1
    uneven_splits: bool = True

    def choose(self, layout: Layout) -> str:
        if layout.max_tokens <= self.allgather_max_tokens:
            return "allgather"
        return "alltoallv" if self.uneven_splits else "alltoall_padded"


class Dispatcher:
    """Moves one MoE layer's tokens to the experts' ranks and the partial outputs back."""

    def __init__(self, comm: Communicator, placement: ExpertPlacement, fmt: RowFormat,
                 mode: str = "auto", policy: ModePolicy | None = None):
        if mode != "auto" and mode not in MODES:
            raise ValueError(f"unknown expert-parallel mode {mode!r}: expected 'auto' or one of {MODES}")
        if mode == "alltoallv" and not comm.uneven_splits:
            raise ValueError(f"mode 'alltoallv' needs uneven splits, which backend {comm.backend!r} lacks; "
                             "use 'alltoall_padded'")
        if placement.world_size != comm.world_size:
            raise ValueError(f"placement is for {placement.world_size} ranks but the world size is "
                             f"{comm.world_size}")
        self.comm = comm
        self.placement = placement
        self.fmt = fmt
        self.mode = mode
        self.policy = policy or ModePolicy(uneven_splits=comm.uneven_splits)
        self.local_experts = placement.experts_of(comm.rank)
        self._local_index = local_expert_index(placement)
        self._rank_of = placement.as_array()

    def __call__(self, layer: int, x: np.ndarray, ids: np.ndarray, weights: np.ndarray, compute,
                 step: int = 0) -> tuple[np.ndarray, LayerRecord]:
        """x [N, H], ids [N, k], weights [N, k] of this rank's tokens -> (MoE output [N, H], record)."""
        start = time.perf_counter()
        if x.ndim != 2 or x.shape[1] != self.fmt.hidden_size or len(x) != len(ids):
            raise ValueError(f"layer {layer}: hidden states {x.shape} must be [tokens={len(ids)}, "
                             f"hidden={self.fmt.hidden_size}]")
        if ids.shape[1:] != (self.fmt.top_k,):
            raise ValueError(f"layer {layer}: expert ids {ids.shape} must be [tokens, top_k={self.fmt.top_k}]")
        plan = build_plan(ids, weights, self.placement, self.comm.rank)
        traffic = Traffic()
        layout = self._exchange_layout(layer, plan, traffic)
        mode = self.policy.choose(layout) if self.mode == "auto" else self.mode
        run = {"alltoallv": self._alltoallv, "alltoall_padded": self._padded, "allgather": self._allgather}[mode]
        out, expert_rows = run(layer, x, ids, weights, plan, layout, compute, traffic)
        row_bytes = self.fmt.dispatch_row_bytes      # rows on the wire, padding included
        record = LayerRecord(
            rank=self.comm.rank, step=step, layer=layer, mode=mode, tokens=len(x),
            assignments=int(ids.size), rows_sent=traffic.sent["dispatch"] // row_bytes,
            rows_received=traffic.received["dispatch"] // row_bytes, local_experts=list(self.local_experts),
            expert_rows=expert_rows.tolist(), traffic=traffic,
            predicted=predict_traffic(mode, layout, self.comm.rank, self.fmt),
            seconds=time.perf_counter() - start)
        return out, record

    # ---- counts exchange ---------------------------------------------------------------------
    def _exchange_layout(self, layer: int, plan: DispatchPlan, traffic: Traffic) -> Layout:
        mine = np.concatenate([[layer, plan.num_tokens], plan.send_counts]).astype(np.int32)
        table = self.comm.all_gather(mine, traffic, "layout", f"layer {layer} counts exchange")
        layers = table[:, 0]
        if (layers != layer).any():
            other = int(np.nonzero(layers != layer)[0][0])
            raise RuntimeError(f"rank {self.comm.rank} is in MoE layer {layer} but rank {other} is in layer "
                               f"{int(layers[other])}: every rank must call the layers in the same order")
        return Layout(counts=table[:, LAYOUT_FIELDS:], tokens=table[:, 1])

    # ---- modes: each returns (output [N, H], rows computed per local expert) ----------------------
    def _alltoallv(self, layer, x, ids, weights, plan, layout, compute, traffic):
        recv_counts = layout.counts[:, self.comm.rank]
        send = self.fmt.encode(x[plan.token_of_row], plan.local_ids, plan.weights)
        received = self.comm.all_to_all(send, plan.send_counts, recv_counts, traffic, "dispatch",
                                        f"layer {layer} dispatch (alltoallv)")
        partials, expert_rows = self._compute(received, compute)
        back = self.comm.all_to_all(partials, recv_counts, plan.send_counts, traffic, "combine",
                                    f"layer {layer} combine (alltoallv)")
        return self._sum_in_rank_order(len(x), plan, self.fmt.decode_partial(back)), expert_rows

    def _padded(self, layer, x, ids, weights, plan, layout, compute, traffic):
        world, cap, me = self.comm.world_size, layout.capacity, self.comm.rank
        dispatch_bytes, combine_bytes = self.fmt.dispatch_row_bytes, self.fmt.combine_row_bytes
        recv_counts = layout.counts[:, me]
        send = np.zeros((world, cap, dispatch_bytes), np.uint8)
        rows = self.fmt.encode(x[plan.token_of_row], plan.local_ids, plan.weights)
        _scatter_segments(send, rows, plan.send_counts)
        received = self.comm.all_to_all(send.reshape(world * cap, dispatch_bytes), [cap] * world, [cap] * world,
                                        traffic, "dispatch", f"layer {layer} dispatch (alltoall_padded)")
        valid = _gather_segments(received.reshape(world, cap, dispatch_bytes), recv_counts)  # padding never computed
        partials, expert_rows = self._compute(valid, compute)
        reply = np.zeros((world, cap, combine_bytes), np.uint8)
        _scatter_segments(reply, partials, recv_counts)
        back = self.comm.all_to_all(reply.reshape(world * cap, combine_bytes), [cap] * world, [cap] * world,
                                    traffic, "combine", f"layer {layer} combine (alltoall_padded)")
        mine = _gather_segments(back.reshape(world, cap, combine_bytes), plan.send_counts)
        return self._sum_in_rank_order(len(x), plan, self.fmt.decode_partial(mine)), expert_rows

    def _allgather(self, layer, x, ids, weights, plan, layout, compute, traffic):
        world, width, me = self.comm.world_size, layout.max_tokens, self.comm.rank
        mine = np.zeros((width, self.fmt.dispatch_row_bytes), np.uint8)
        mine[:len(x)] = self.fmt.encode(x, ids, weights)
        gathered = self.comm.all_gather(mine, traffic, "dispatch", f"layer {layer} dispatch (allgather)")
        valid = np.arange(width)[None, :] < layout.tokens[:, None]               # [R, width] real tokens
        hits = valid & (self._rank_of[self.fmt.expert_ids(gathered)] == me).any(axis=-1)  # with a local expert
        xs, all_ids, all_w = self.fmt.decode(gathered[hits])                     # decode only those rows
        here = self._rank_of[all_ids] == me
        local = np.where(here, self._local_index[all_ids], -1).astype(np.int32)
        partial = compute(xs, local, np.where(here, all_w, 0).astype(np.float32))
        reply = np.zeros((world, width, self.fmt.combine_row_bytes), np.uint8)
        reply[hits] = self.fmt.encode_partial(partial)                           # zeros elsewhere
        back = self.comm.all_to_all(reply.reshape(world * width, self.fmt.combine_row_bytes), [width] * world,
                                    [width] * world, traffic, "combine", f"layer {layer} combine (allgather)")
        back = back.reshape(world, width, self.fmt.combine_row_bytes)
        out = np.zeros((len(x), self.fmt.hidden_size), np.float32)
        for r in range(world):                      # fixed rank order: deterministic sums
            out += self.fmt.decode_partial(back[r, :len(x)])
        return out, self._expert_rows(local)

    # ---- helpers -----------------------------------------------------------------------------
    def _compute(self, received: np.ndarray, compute):
        """Decode received rows, run the local experts, encode one partial per row."""
        xr, local_ids, w = self.fmt.decode(received)
        return self.fmt.encode_partial(compute(xr, local_ids, w)), self._expert_rows(local_ids)

    def _expert_rows(self, local_ids: np.ndarray) -> np.ndarray:
        return np.bincount(local_ids[local_ids >= 0], minlength=len(self.local_experts))

    def _sum_in_rank_order(self, num_tokens: int, plan: DispatchPlan, partials: np.ndarray) -> np.ndarray:
        """out[t] = sum over ranks r = 0..R-1 (in that order) of the partial r returned for t."""
        out = np.zeros((num_tokens, self.fmt.hidden_size), np.float32)
        offsets = plan.offsets
        for r in range(plan.world_size):
            rows = plan.token_of_row[offsets[r]:offsets[r + 1]]   # distinct tokens within a segment
            out[rows] += partials[offsets[r]:offsets[r + 1]]
        return out


def _scatter_segments(padded: np.ndarray, rows: np.ndarray, counts) -> None:
    """Rows grouped by rank (counts [R]) -> the first counts[r] slots of padded[r]."""
    offset = 0
    for r, c in enumerate(counts):
        padded[r, :c] = rows[offset:offset + c]
        offset += c


def _gather_segments(padded: np.ndarray, counts) -> np.ndarray:
    """The first counts[r] rows of padded[r] for each r, concatenated."""
    return np.concatenate([padded[r, :c] for r, c in enumerate(counts)])
