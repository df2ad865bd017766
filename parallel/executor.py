"""The expert-parallel expert executor the model calls for every MoE layer.

An expert executor is any callable `(layer, x [N, H], ids [N, k], weights [N, k]) -> [N, H]`
(see `mimo_v2_flash.layer.LocalExperts`). This one sends the tokens to the ranks owning their
experts (`Dispatcher`) and, on the receiving side, runs this rank's experts through one
interface, the contract of the NKI grouped expert FFN launcher `mimo_kernels.expert_ffn.expert_ffn`:

    local_experts(layer, x [M, H], local_ids [M, k] int, weights [M, k] float32) -> [M, H] float32
    out[m] = sum over slots j with local_ids[m, j] >= 0 of weights[m, j] * expert_{local_ids[m, j]}(x[m])

local ids index this rank's experts (in `placement.experts_of(rank)` order); -1 marks a slot
whose expert lives on another rank. `OpsLocalExperts` runs them through the model's ops backend:
the NumPy reference, or the NKI grouped expert FFN kernel (the CPU simulator here).
"""

from __future__ import annotations

import numpy as np
import torch

from mimo_v2_flash.config import MiMoV2FlashConfig
from mimo_v2_flash.layer import host_values

from .dispatcher import Dispatcher
from .stats import EPStats


def exchange_on_host(executor, layer: int, x, ids, weights):
    """`executor(layer, x, ids, weights)` on the host for the kernel backend's device tensors: the
    exchange runs on host arrays here (gloo), so the layer's rows and routing are read back in one
    counted read (`mimo_kernels.launch.to_host`) and the summed output is uploaded again."""
    from mimo_kernels.launch import to_device, to_host
    return to_device(np.ascontiguousarray(executor(layer, *to_host((x, ids, weights))), np.float32))


class OpsLocalExperts:
    """This rank's experts through the model's ops backend: `ReferenceOps.experts` (NumPy) or
    `NkiOps.experts` (the grouped expert FFN kernel, bf16 or FP8 weights). Local ids are mapped
    back to global expert ids; -1 slots stay -1 and are skipped by both backends. `static`: the
    rows arrive at a fixed count per bucket (the static dispatcher's slots), and the kernel runs
    at the fixed block shape of that count (`NkiOps.experts(static_rows=...)`)."""

    def __init__(self, ops, local_experts: list[int], static: bool = False):
        self.ops = ops
        self.global_of = np.asarray(local_experts, np.int64)
        self.static = static

    def __call__(self, layer: int, x: np.ndarray, local_ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Host arrays in, float32 host rows out; device tensors in (the static dispatcher's slots on
        the kernel backend), a float32 device tensor out, nothing read back."""
        extra = {"static_rows": len(x)} if self.static else {}
        if hasattr(local_ids, "detach"):
            from mimo_kernels.launch import RESIDENT
            global_of = RESIDENT.lookup(RESIDENT.resident(self.global_of, kind="plans"))
            ids = torch.where(local_ids >= 0, global_of[local_ids.clamp(min=0).long()], -1)
            return self.ops.experts(x, layer, ids, weights, **extra).float()
        ids = np.where(local_ids >= 0, self.global_of[np.maximum(local_ids, 0)], -1)
        return np.asarray(host_values(self.ops.experts(x, layer, ids, weights, **extra)), np.float32)


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

        if hasattr(x, "detach"):        # the kernel backend's device tensors
            return exchange_on_host(self, layer, x, ids, weights)
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
