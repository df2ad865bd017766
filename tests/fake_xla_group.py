"""A CPU process group that behaves like torch-xla 2.9's `ProcessGroupXla` where it matters.

Read from torch_xla/distributed/xla_backend.py (2.9.0):

* `alltoall_base` asserts that both split-size lists are None or empty ("XLA doesn't support
  specifying non-empty output_split_sizes and input_split_sizes"), even equal ones, and splits
  dim 0 into world-size equal blocks (`xm.all_to_all(input, 0, 0, world)`).
* `_allgather_base` accepts an output of [R * n, ...] or [R, n, ...] and raises ValueError otherwise.
* `barrier` returns at once; the group's timeout is stored and never used.
* Every collective only records a node in the lazy graph: nothing moves until `torch_xla.sync()`,
  and a host read before it compiles and runs a graph of its own.

The fake does the data movement eagerly over an inner gloo group (created with a one-day timeout:
like the xla group, it bounds nothing), but keeps the laziness contract strict: every tensor of
the fake device is a `LazyTensor`, and any host read of one (`.cpu()`, `.numpy()`, `.item()`,
`.tolist()`, `bool()`, `int()`, `float()`, `np.asarray`) while a collective has been issued since
the last `sync()` raises `UnsyncedRead`. It also counts syncs and collectives.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import ProcessGroup

BACKEND = "fake_xla"
ASSERT_MESSAGE = "XLA doesn't support specifying non-empty output_split_sizes and input_split_sizes"


class UnsyncedRead(RuntimeError):
    """A host read of a lazy value while collectives are pending (would be a graph of its own)."""


class _State:
    pending = 0          # collectives since the last sync
    syncs = 0
    collectives = 0
    reads = 0


STATE = _State()
_READS = {torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__,
          torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.__array__}


class LazyTensor(torch.Tensor):
    """A tensor of the fake XLA device: host reads need a sync first."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in _READS:
            if STATE.pending:
                raise UnsyncedRead(f"host read ({getattr(func, '__name__', func)}) of a lazy tensor with "
                                   f"{STATE.pending} collective(s) not yet synced: on the xla device this "
                                   "compiles and runs a graph of its own")
            STATE.reads += 1
            with torch._C.DisableTorchFunctionSubclass():
                result = func(*args, **(kwargs or {}))
            return result.as_subclass(torch.Tensor) if isinstance(result, torch.Tensor) else result
        return super().__torch_function__(func, types, args, kwargs)


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.as_subclass(torch.Tensor)


def _done(result):
    fut = torch.futures.Future()
    fut.set_result(result)
    return torch._C._distributed_c10d._create_work_from_future(fut)


class FakeXlaGroup(ProcessGroup):
    def __init__(self, store, rank, size, timeout):
        super().__init__(rank, size)
        self.timeout = timeout        # stored, never used (as in ProcessGroupXla)
        self.inner = dist.ProcessGroupGloo(dist.PrefixStore("inner/", store), rank, size,
                                           datetime.timedelta(days=1))

    def getBackendName(self):
        return BACKEND

    def _issue(self):
        STATE.pending += 1
        STATE.collectives += 1

    def alltoall_base(self, output, input, output_split_sizes, input_split_sizes, opts):
        assert (output_split_sizes is None or len(output_split_sizes) == 0) and \
               (input_split_sizes is None or len(input_split_sizes) == 0), ASSERT_MESSAGE
        if input.shape[0] % self.size():
            raise RuntimeError(f"all_to_all: dim 0 of {tuple(input.shape)} does not split into {self.size()} blocks")
        self._issue()
        self.inner.alltoall_base(_plain(output), _plain(input).contiguous(), [], [], opts).wait()
        return _done(output)

    def _allgather_base(self, output, input, opts):
        self._issue()
        flat = input.reshape(1) if input.dim() == 0 else input
        if output.shape[0] == self.size() * flat.shape[0] and output.shape[1:] == flat.shape[1:]:
            target = _plain(output)
        elif tuple(output.shape) == (self.size(),) + tuple(flat.shape):
            target = _plain(output).view(self.size() * flat.shape[0], *flat.shape[1:])
        else:
            raise ValueError(f"Input shape {input.shape} and output shape {output.shape} are not compatible for "
                             "all_gather_into_tensor. Input must be stacked or concatenated to create output.")
        self.inner._allgather_base(target, _plain(flat).contiguous()).wait()
        return _done([output])

    def all_gather_single(self, output, input, opts=None):
        return self._allgather_base(output, input, opts)     # newer torch's name for the same call

    def allgather(self, output_tensors_list, input_tensors, opts=None):
        self._issue()
        for out, src in zip(output_tensors_list, input_tensors):
            self.inner.allgather([[_plain(o) for o in out]], [_plain(src)]).wait()
        return _done([t for sub in output_tensors_list for t in sub])

    def allreduce(self, tensors, opts):
        self._issue()
        self.inner.allreduce([_plain(t) for t in tensors], opts).wait()
        return _done(tensors)

    def barrier(self, opts):
        return _done([])             # ProcessGroupXla.barrier: returns at once


def sync() -> None:
    """torch_xla.sync(): the pending graph (collectives included) has run; reads are allowed."""
    STATE.syncs += 1
    STATE.pending = 0


def register() -> None:
    """Register the `fake_xla` process group and its transport with `mimo_parallel.comm`."""
    from mimo_parallel.comm import Transport, _dist_all_gather as all_gather, register_transport

    if BACKEND not in dist.Backend.backend_list:
        dist.Backend.register_backend(BACKEND, lambda store, rank, size, timeout: FakeXlaGroup(store, rank, size, timeout),
                                      devices=["cpu"])

    def to_host(t):
        return t.cpu().numpy()         # LazyTensor.cpu checks the sync

    def all_to_all(out, src, recv_counts, send_counts):
        dist.all_to_all_single(out, src, recv_counts, send_counts)

    register_transport(BACKEND, lambda: Transport(BACKEND, torch.device("cpu"), lazy=True, uneven_splits=False,
                                                  sync=sync, all_to_all=all_to_all, all_gather=all_gather,
                                                  to_host=to_host,
                                                  to_device=lambda a, dev: torch.as_tensor(a).as_subclass(LazyTensor)))
