"""The expert-parallel expert executor the model calls for every MoE layer.

An expert executor is any callable `(layer, x [N, H], ids [N, k], weights [N, k]) -> [N, H]`
(see `mimo_v2_flash.layer.LocalExperts`). This one sends the tokens to the ranks owning their
experts (`Dispatcher`) and, on the receiving side, runs this rank's experts through one
interface, a *grouped expert FFN*:

    grouped(layer, x_sorted [P, H] float32, group_sizes [E_local] int64) -> y [P, H] float32

where the P rows are sorted by local expert (the first group_sizes[0] rows go to local expert 0,
and so on) and y holds each row's unweighted expert output. `ReferenceGroupedExperts` is the
NumPy reference (`mimo_v2_flash.reference.swiglu`); the NKI grouped expert FFN kernel
(kernels/expert_ffn.py) plugs in through the same call. Weighting by the router and summing a
token's local experts into one partial happen here, once, for either implementation.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from mimo_v2_flash import reference as ref
from mimo_v2_flash.config import MiMoV2FlashConfig

from .dispatcher import Dispatcher
from .stats import EPStats


class ReferenceGroupedExperts:
    """Grouped expert FFN on the NumPy reference: one SwiGLU per non-empty local expert.

    `expert_weights(layer, e)` returns global expert e's (gate [I, H], up [I, H], down [H, I]),
    e.g. `ReferenceOps.expert_weights`; `local_experts` lists this rank's global expert ids in
    local order.
    """

    def __init__(self, expert_weights: Callable, local_experts: list[int]):
        self.expert_weights = expert_weights
        self.local_experts = list(local_experts)

    def __call__(self, layer: int, x_sorted: np.ndarray, group_sizes: np.ndarray) -> np.ndarray:
        if len(group_sizes) != len(self.local_experts) or int(np.sum(group_sizes)) != len(x_sorted):
            raise ValueError(f"layer {layer}: group sizes {list(group_sizes)} do not cover {len(x_sorted)} "
                             f"rows over {len(self.local_experts)} local experts")
        y = np.empty_like(x_sorted, dtype=np.float32)
        start = 0
        for expert, size in zip(self.local_experts, group_sizes):
            if size:
                y[start:start + size] = ref.swiglu(x_sorted[start:start + size], *self.expert_weights(layer, expert))
            start += size
        return y


def run_local_experts(grouped, layer: int, x: np.ndarray, local_ids: np.ndarray,
                      weights: np.ndarray, num_local: int) -> np.ndarray:
    """One partial per received row: sum over its slots s with local_ids[m, s] >= 0 of
    weights[m, s] * expert(x[m]). x [M, H], local_ids [M, k] (-1 = not here), weights [M, k]."""
    row, slot = np.nonzero(local_ids >= 0)
    expert = local_ids[row, slot]
    order = np.argsort(expert, kind="stable")          # group rows by local expert
    row, slot, expert = row[order], slot[order], expert[order]
    y = grouped(layer, x[row], np.bincount(expert, minlength=num_local))
    partial = np.zeros((len(x), x.shape[1]), np.float32)
    np.add.at(partial, row, y * weights[row, slot][:, None])
    return partial


class ExpertParallelExecutor:
    """`(layer, x [N, H], ids [N, k], weights [N, k]) -> [N, H]` across all ranks; every rank must
    call it for the same layers in the same order (`idle` when a rank has no tokens)."""

    def __init__(self, dispatcher: Dispatcher, grouped, stats: EPStats | None = None):
        self.dispatcher = dispatcher
        self.grouped = grouped
        self.stats = stats or EPStats(dispatcher.comm.rank)

    def __call__(self, layer: int, x: np.ndarray, ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
        num_local = len(self.dispatcher.local_experts)

        def compute(xr, local_ids, w):
            return run_local_experts(self.grouped, layer, xr, local_ids, w, num_local)

        out, record = self.dispatcher(layer, np.asarray(x, np.float32), np.asarray(ids),
                                      np.asarray(weights, np.float32), compute, step=self.stats.step)
        self.stats.add(record)
        return out

    def idle(self, config: MiMoV2FlashConfig) -> None:
        """Take part in every MoE layer of one forward pass with no tokens of this rank's own."""
        h, k = config.hidden_size, config.num_experts_per_tok
        for layer in range(config.num_hidden_layers):
            if config.is_moe(layer):
                self(layer, np.zeros((0, h), np.float32), np.zeros((0, k), np.int64), np.zeros((0, k), np.float32))
