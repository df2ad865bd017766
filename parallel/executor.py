"""The expert-parallel expert executor the model calls for every MoE layer.

An expert executor is any callable `(layer, x [N, H], ids [N, k], weights [N, k]) -> [N, H]`
(see `mimo_v2_flash.layer.LocalExperts`). This one sends the tokens to the ranks owning their
experts (`Dispatcher`) and, on the receiving side, runs this rank's experts through one
interface, the contract of the NKI grouped expert FFN launcher `kernels.expert_ffn.expert_ffn`:

    local_experts(layer, x [M, H], local_ids [M, k] int, weights [M, k] float32) -> [M, H] float32
    out[m] = sum over slots j with local_ids[m, j] >= 0 of weights[m, j] * expert_{local_ids[m, j]}(x[m])

local ids index this rank's experts (in `placement.experts_of(rank)` order); -1 marks a slot
whose expert lives on another rank. `ReferenceLocalExperts` is the NumPy reference
(`mimo_v2_flash.reference.swiglu`); `KernelLocalExperts` runs the NKI kernel (the CPU simulator
here).
"""

from __future__ import annotations

from typing import Callable

import ml_dtypes
import numpy as np

from mimo_v2_flash import reference as ref
from mimo_v2_flash.config import MiMoV2FlashConfig

from .dispatcher import Dispatcher
from .stats import EPStats


class ReferenceLocalExperts:
    """This rank's experts on the NumPy reference: the (row, slot) pairs grouped by local expert,
    one SwiGLU per non-empty expert, weighted and summed per row.

    `expert_weights(layer, e)` returns global expert e's (gate [I, H], up [I, H], down [H, I]),
    e.g. `ReferenceOps.expert_weights`; `local_experts` lists this rank's global expert ids.
    """

    def __init__(self, expert_weights: Callable, local_experts: list[int]):
        self.expert_weights = expert_weights
        self.local_experts = list(local_experts)

    def __call__(self, layer: int, x: np.ndarray, local_ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
        row, slot = np.nonzero(local_ids >= 0)
        expert = local_ids[row, slot]
        order = np.argsort(expert, kind="stable")          # group the pairs by local expert
        row, slot, expert = row[order], slot[order], expert[order]
        partial = np.zeros((len(x), x.shape[1]), np.float32)
        bounds = np.searchsorted(expert, np.arange(len(self.local_experts) + 1))
        for e, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
            if stop > start:
                rows = row[start:stop]
                y = ref.swiglu(x[rows], *self.expert_weights(layer, self.local_experts[e]))
                np.add.at(partial, rows, y * weights[rows, slot[start:stop], None])
        return partial


class KernelLocalExperts:
    """This rank's experts through the NKI grouped expert FFN kernel (`kernels.expert_ffn`),
    bfloat16 weights in the kernel layout [in, out], one `ExpertWeights` per MoE layer."""

    def __init__(self, expert_weights: Callable, local_experts: list[int], layers):
        from kernels.expert_ffn import ExpertWeights   # kernels only when asked for
        bf16 = ml_dtypes.bfloat16
        self._weights = {}
        for layer in layers:
            stacks = [[w.T for w in expert_weights(layer, e)] for e in local_experts]   # Hub [out, in] -> [in, out]
            gate, up, down = (np.stack([s[i] for s in stacks]).astype(bf16) for i in range(3))
            self._weights[layer] = ExpertWeights(gate=gate, up=up, down=down)

    def __call__(self, layer: int, x: np.ndarray, local_ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
        from kernels.expert_ffn import expert_ffn
        return expert_ffn(x, local_ids, weights, self._weights[layer])


class ExpertParallelExecutor:
    """`(layer, x [N, H], ids [N, k], weights [N, k]) -> [N, H]` across all ranks; every rank must
    call it for the same layers in the same order (`idle` when a rank has no tokens)."""

    def __init__(self, dispatcher: Dispatcher, local_experts, stats: EPStats | None = None):
        self.dispatcher = dispatcher
        self.local_experts = local_experts
        self.stats = stats or EPStats(dispatcher.comm.rank)

    def __call__(self, layer: int, x: np.ndarray, ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
        def compute(xr, local_ids, w):
            return self.local_experts(layer, xr, local_ids, w)

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
