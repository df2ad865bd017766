"""Expert parallelism for a lazy device (XLA): static shapes, equal splits, no host reads.

`Dispatcher` (dispatcher.py) exchanges counts and reads them back before every payload, which on
an XLA device is a graph sync (a compile and a device round trip) per collective. Here every
shape is fixed by a `StaticShape` (per bucket: the token rows a rank passes, the rows per
(source, destination) slot, the all-gather width), all routing bookkeeping is tensor ops on the
device, and a layer issues only equal-split collectives whose results feed the next op. The
caller syncs once per step (`Communicator.sync`) and then reads what it needs
(`finish_step`: the outputs' rows routed, and overflow, in one read).

Modes:

* "alltoall_padded": slot (s -> d) holds `capacity` rows; token t goes to rank d at position
  (number of earlier tokens of s going to d). A slot row carries the hidden vector (wire dtype) and
  a meta row [k local expert ids as float32 (exact below 2^24; -1 = not on d), k weights]; a
  padding row has every id -1 and contributes nothing. Partials come back by the reverse
  exchange, summed in rank order 0..R-1 (the same order as `Dispatcher`).
* "allgather" (decode): every rank all-gathers every rank's `tokens` rows (hidden, and a meta row
  [k global ids as float32, k weights]), computes the share of its experts for all of them, and the
  partials go back by an equal-split all_to_all.

With `capacity = tokens` (the default) no row can ever be dropped: a rank sends a destination at
most one row per token. A smaller capacity saves bytes; rows beyond it are counted on the device
and `finish_step` raises, naming the layer, ranks and capacity.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mimo_v2_flash.placement import ExpertPlacement

from .comm import Communicator
from .plan import local_expert_index
from .stats import EPStats

STATIC_MODES = ("alltoall_padded", "allgather")
TORCH_WIRE = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class StaticShape:
    """The collective shapes of one bucket. `tokens`: token rows every rank passes (a bucket's
    `batch * tokens`, padded); `capacity`: rows per (source, destination) slot of the padded mode
    (default `tokens`: nothing drops); the all-gather width is `tokens`."""
    tokens: int
    capacity: int | None = None

    def __post_init__(self):
        if self.tokens < 1:
            raise ValueError(f"static shape: tokens must be >= 1, got {self.tokens}")
        if self.capacity is not None and not 1 <= self.capacity <= self.tokens:
            raise ValueError(f"static shape: capacity {self.capacity} must be in 1..tokens={self.tokens}")

    @property
    def slot_rows(self) -> int:
        return self.tokens if self.capacity is None else self.capacity

    @classmethod
    def covering(cls, rows: int, sizes=None) -> "StaticShape":
        """The smallest shape holding `rows`: from `sizes` (a bucket table's row counts) or the
        next power of two."""
        if sizes:
            fitting = [s for s in sorted(sizes) if s >= rows]
            if not fitting:
                raise ValueError(f"no static shape holds {rows} token rows: the largest is {max(sizes)}")
            return cls(int(fitting[0]))
        return cls(1 << max(0, int(rows) - 1).bit_length())


class StaticDispatcher:
    """One MoE layer on device tensors: `(layer, x [T, H], ids [T, k], weights [T, k], compute)`
    -> [T, H], T = shape.tokens; rows whose ids are all -1 (padding tokens) route nowhere."""

    def __init__(self, comm: Communicator, placement: ExpertPlacement, hidden_size: int, top_k: int,
                 mode: str = "alltoall_padded", wire_dtype: str = "float32"):
        if mode not in STATIC_MODES:
            raise ValueError(f"static expert-parallel mode {mode!r}: expected one of {STATIC_MODES}")
        if wire_dtype not in TORCH_WIRE:
            raise ValueError(f"wire dtype {wire_dtype!r} is not one of {sorted(TORCH_WIRE)}")
        if placement.world_size != comm.world_size:
            raise ValueError(f"placement is for {placement.world_size} ranks but the world size is {comm.world_size}")
        self.comm, self.placement, self.mode = comm, placement, mode
        self.hidden_size, self.top_k = hidden_size, top_k
        self.wire = TORCH_WIRE[wire_dtype]
        self._rank_of = comm.to_device(placement.as_array().astype(np.int32))
        self._local_index = comm.to_device(local_expert_index(placement).astype(np.int32))
        self._pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []   # (layer, routed [R], overflow [R])
        self.shape: StaticShape | None = None

    def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, compute,
                 shape: StaticShape) -> torch.Tensor:
        if tuple(x.shape) != (shape.tokens, self.hidden_size) or tuple(ids.shape) != (shape.tokens, self.top_k) \
                or tuple(weights.shape) != tuple(ids.shape):
            raise ValueError(f"layer {layer}: static shapes x {tuple(x.shape)}, ids {tuple(ids.shape)}, weights "
                             f"{tuple(weights.shape)} must be [{shape.tokens}, {self.hidden_size}] and "
                             f"[{shape.tokens}, {self.top_k}]")
        ids = ids.to(torch.int32)
        weights = weights.to(torch.float32)
        valid = ids >= 0
        dest = torch.where(valid, self._rank_of[ids.clamp(min=0)], -1)            # [T, k] owner or -1
        ranks = torch.arange(self.comm.world_size, dtype=torch.int32, device=x.device)
        here = dest[:, None, :] == ranks[None, :, None]                            # [T, R, k]
        local = torch.where(here, self._local_index[ids.clamp(min=0)][:, None, :], -1)   # [T, R, k]
        w = torch.where(here, weights[:, None, :], 0.0)
        hit = here.any(dim=-1)                                                     # [T, R]
        if self.mode == "allgather":
            return self._allgather(layer, x, ids, weights, hit, compute, shape)
        return self._padded(layer, x, hit, local, w, compute, shape)

    # ---- modes ----------------------------------------------------------------------------------
    def _padded(self, layer, x, hit, local, w, compute, shape):
        world, cap, tokens = self.comm.world_size, shape.slot_rows, shape.tokens
        pos = torch.cumsum(hit.to(torch.int32), dim=0) - 1                         # [T, R] slot position
        keep = hit & (pos < cap)
        self._pending.append((layer, hit.sum(dim=0, dtype=torch.int32), (hit & ~keep).sum(dim=0, dtype=torch.int32)))
        ranks = torch.arange(world, dtype=torch.int32, device=x.device)
        slot = torch.where(keep, ranks[None, :] * cap + pos, world * cap)          # dump slot for the rest
        token_ids = torch.arange(tokens, dtype=torch.int32, device=x.device)[:, None].expand(tokens, world)
        slot_token = torch.full((world * cap + 1,), tokens, dtype=torch.int64, device=x.device)
        slot_token = slot_token.scatter(0, slot.reshape(-1).long(), token_ids.reshape(-1).long())[:-1]
        slot_rank = torch.arange(world, device=x.device).repeat_interleave(cap)    # [R * cap]
        pad = lambda t, fill: torch.cat([t, torch.full((1,) + tuple(t.shape[1:]), fill, dtype=t.dtype,
                                                      device=t.device)])
        hidden = pad(x, 0.0)[slot_token].to(self.wire)                            # [R*cap, H]
        meta = torch.cat([pad(local, -1)[slot_token, slot_rank].to(torch.float32),
                          pad(w, 0.0)[slot_token, slot_rank]], dim=-1)             # [R*cap, 2k]
        what = f"layer {layer} dispatch (alltoall_padded, static)"
        got_hidden = self.comm.all_to_all_equal(hidden, what)
        got_meta = self.comm.all_to_all_equal(meta, what)
        k = self.top_k
        partial = compute(got_hidden.to(torch.float32), got_meta[:, :k].to(torch.int32), got_meta[:, k:])
        back = self.comm.all_to_all_equal(partial.to(self.wire), f"layer {layer} combine (alltoall_padded, static)")
        back = back.to(torch.float32).reshape(world, cap, self.hidden_size)
        out = torch.zeros((tokens, self.hidden_size), dtype=torch.float32, device=x.device)
        rows = pos.clamp(0, cap - 1).long()
        for r in range(world):                      # fixed rank order: deterministic sums
            out = out + torch.where(keep[:, r, None], back[r][rows[:, r]], 0.0)
        return out

    def _allgather(self, layer, x, ids, weights, hit, compute, shape):
        world, tokens, me, k = self.comm.world_size, shape.tokens, self.comm.rank, self.top_k
        self._pending.append((layer, hit.sum(dim=0, dtype=torch.int32), torch.zeros(world, dtype=torch.int32,
                                                                                    device=x.device)))
        what = f"layer {layer} dispatch (allgather, static)"
        hidden = self.comm.all_gather_tensor(x.to(self.wire), what)                # [R*T, H]
        meta = self.comm.all_gather_tensor(torch.cat([ids.to(torch.float32), weights], dim=-1), what)  # [R*T, 2k]
        all_ids = meta[:, :k].to(torch.int32)
        mine = (all_ids >= 0) & (self._rank_of[all_ids.clamp(min=0)] == me)
        local = torch.where(mine, self._local_index[all_ids.clamp(min=0)], -1)
        partial = compute(hidden.to(torch.float32), local, torch.where(mine, meta[:, k:], 0.0))
        back = self.comm.all_to_all_equal(partial.to(self.wire), f"layer {layer} combine (allgather, static)")
        back = back.to(torch.float32).reshape(world, tokens, self.hidden_size)
        out = torch.zeros((tokens, self.hidden_size), dtype=torch.float32, device=x.device)
        for r in range(world):
            out = out + back[r]
        return out

    # ---- after the step's sync ------------------------------------------------------------------
    def finish_step(self, read=None) -> list[dict]:
        """Read the step's routing counters in one transfer (call after `comm.sync`; `read`: the
        reading function, default `comm.to_host`); raise if any row exceeded the capacity. Returns
        per layer: rows routed to each rank."""
        if not self._pending:
            return []
        layers = [layer for layer, _, _ in self._pending]
        counters = (read or self.comm.to_host)(torch.stack([torch.stack([r, o]) for _, r, o in self._pending]))
        self._pending = []
        for layer, (_, overflow) in zip(layers, counters):
            if overflow.any():
                d = int(np.nonzero(overflow)[0][0])
                raise RuntimeError(f"rank {self.comm.rank}: layer {layer}: {int(overflow[d])} rows to rank {d} "
                                   f"exceeded the static capacity; use a StaticShape with a larger capacity "
                                   f"(at most tokens, which never drops)")
        return [{"layer": layer, "rows_to_rank": c[0].tolist()} for layer, c in zip(layers, counters)]


class TorchLocalExperts:
    """This rank's experts as torch ops on the communicator's device (the CPU stand-in of the
    device expert kernel; the contract of `OpsLocalExperts`): `(layer, x [M, H], local_ids [M, k],
    weights [M, k]) -> [M, H]`, every local expert over every row with its routing weight (0 where
    the row does not choose it), so shapes stay static. Weights come from `ops.expert_weights` and
    are uploaded once per layer."""

    def __init__(self, ops, local_experts: list[int], to_device):
        self.ops, self.local_experts, self.to_device = ops, list(local_experts), to_device
        self._layers: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _weights(self, layer: int):
        if layer not in self._layers:
            held = [self.ops.expert_weights(layer, e) for e in self.local_experts]
            self._layers[layer] = tuple(self.to_device(np.stack([np.asarray(w[i], np.float32) for w in held]))
                                        for i in range(3))      # gate, up [L, I, H]; down [L, H, I]
        return self._layers[layer]

    def __call__(self, layer: int, x: torch.Tensor, local_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        gate, up, down = self._weights(layer)
        out = torch.zeros_like(x)
        for e in range(len(self.local_experts)):
            coef = torch.where(local_ids == e, weights, 0.0).sum(dim=-1, keepdim=True)   # [M, 1]
            h = torch.nn.functional.silu(x @ gate[e].T) * (x @ up[e].T)
            out = out + coef * (h @ down[e].T)
        return out


class HostLocalExperts:
    """A host-array expert backend (`OpsLocalExperts`, e.g. the NKI expert kernel at its static
    block shape) behind the dispatcher's torch contract: the received slots are read back, run,
    and the result goes back to the communicator's device. The read is a host round trip per
    layer, so this is for eager transports (gloo); a lazy one keeps the experts on the device."""

    def __init__(self, local_experts, comm: Communicator):
        self.local_experts, self.comm = local_experts, comm

    def __call__(self, layer: int, x: torch.Tensor, local_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        host = self.comm.to_host
        return self.comm.to_device(self.local_experts(layer, host(x), host(local_ids), host(weights)))


class StaticExpertParallelExecutor:
    """The model's expert executor `(layer, x [N, H], ids [N, k], weights [N, k]) -> [N, H]` (host
    arrays, or the kernel backend's device tensors kept on the device: `_on_device`) over a
    `StaticDispatcher`: at the first MoE layer of a pass the ranks agree on the pass's
    `StaticShape` (the largest row count, rounded up to `sizes` or a power of two); rows are
    padded to it (padding routes nowhere). The NumPy model reads every layer's output, so
    this adapter syncs once per MoE layer; a device-resident model calls the dispatcher directly
    and syncs once per step."""

    def __init__(self, dispatcher: StaticDispatcher, local_experts, config, mode: str = "auto", sizes=None,
                 allgather_max_tokens: int = 1):
        if mode != "auto" and mode not in STATIC_MODES:
            raise ValueError(f"expert-parallel mode {mode!r} needs uneven splits or host reads; on backend "
                             f"{dispatcher.comm.backend!r} use 'auto' or one of {STATIC_MODES}")
        self.dispatcher, self.local_experts, self.config, self.mode = dispatcher, local_experts, config, mode
        self.sizes = sizes
        self.allgather_max_tokens = allgather_max_tokens
        self.first_moe_layer = min(layer for layer in range(config.num_hidden_layers) if config.is_moe(layer))
        self.shape: StaticShape | None = None
        self.modes: list[str] = []
        self.routed: list[dict] = []          # per layer call: rows routed to each rank
        self.stats = EPStats(dispatcher.comm.rank)   # step counter; no per-layer byte records here

    def __call__(self, layer: int, x: np.ndarray, ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
        comm, n = self.dispatcher.comm, len(x)
        if layer == self.first_moe_layer or self.shape is None:
            rows = comm.all_gather(np.array([n], np.int32), None, "", f"layer {layer} static shape agreement")
            self.shape = StaticShape.covering(max(int(rows.max()), 1), self.sizes)
        tokens = self.shape.tokens
        auto = "allgather" if tokens <= self.allgather_max_tokens else "alltoall_padded"
        self.dispatcher.mode = auto if self.mode == "auto" else self.mode
        self.modes.append(self.dispatcher.mode)
        compute = lambda xr, local_ids, w: self.local_experts(layer, xr, local_ids, w)   # noqa: E731
        if hasattr(x, "detach"):
            return self._on_device(layer, x, ids, weights, compute)
        pad_x = np.zeros((tokens, x.shape[1]), np.float32)
        pad_x[:n] = x
        pad_ids = np.full((tokens, ids.shape[1]), -1, np.int32)
        pad_ids[:n] = ids
        pad_w = np.zeros((tokens, ids.shape[1]), np.float32)
        pad_w[:n] = weights
        out = self.dispatcher(layer, comm.to_device(pad_x), comm.to_device(pad_ids), comm.to_device(pad_w),
                              compute, self.shape)
        comm.sync(f"layer {layer} step sync")
        self.routed.extend(self.dispatcher.finish_step())
        return comm.to_host(out)[:n]

    def _on_device(self, layer: int, x, ids, weights, compute):
        """The kernel backend's device tensors: padded, exchanged and computed on the device (the
        local experts take and give device tensors), the output left there; what is read back is
        the layer's routing counters (`finish_step`, counted by `mimo_kernels.launch.to_host`)."""
        from mimo_kernels.launch import pad_rows, to_host
        tokens = self.shape.tokens
        out = self.dispatcher(layer, pad_rows(x.float(), tokens), pad_rows(ids.int(), tokens, -1),
                              pad_rows(weights.float(), tokens), compute, self.shape)
        self.dispatcher.comm.sync(f"layer {layer} step sync")
        self.routed.extend(self.dispatcher.finish_step(read=to_host))
        return out[:len(x)]

    def idle(self, config) -> None:
        """Take part in every MoE layer of one pass with no tokens of this rank's own."""
        h, k = config.hidden_size, config.num_experts_per_tok
        for layer in range(config.num_hidden_layers):
            if config.is_moe(layer):
                self(layer, np.zeros((0, h), np.float32), np.zeros((0, k), np.int64), np.zeros((0, k), np.float32))
