"""Process group setup and the collectives the dispatcher uses: NumPy in, NumPy out, every byte
counted, and failures turned into one clear error on every rank.

Backends: "gloo" on CPU (tested here, under torchrun). "xla" is the Neuron/XLA process group on
Trainium2 (torch-neuronx / torch-xla); it is untested here and supports only equal splits, so the
dispatcher uses the capacity-padded mode there.

Failures: a rank whose code raises writes a notice into the rendezvous store (`failure_guard`)
before exiting. A rank whose collective then fails (the peer's connection closed, or the
process-group timeout expired) reads the notices and raises `PeerFailure` naming the failed rank,
so every rank exits non-zero with that message instead of hanging.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist

from .stats import Traffic

BACKENDS = ("gloo", "xla")
NOTICE_KEY = "mimo_ep/failed/"     # + rank: that rank's error message
NOTICE_WAIT_S = 2.0                # how long a rank whose collective broke waits for a notice


class PeerFailure(RuntimeError):
    """A collective failed on this rank because another rank failed or stopped answering."""


class Communicator:
    """Collectives over the default process group for one rank."""

    def __init__(self, rank: int, world_size: int, store, backend: str, timeout_s: float):
        self.rank = rank
        self.world_size = world_size
        self.store = store
        self.backend = backend
        self.timeout_s = timeout_s
        self.uneven_splits = backend != "xla"    # the XLA process group: equal splits only
        self.device = _device(backend)

    @classmethod
    def from_env(cls, backend: str = "gloo", timeout_s: float = 300.0) -> "Communicator":
        """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR/PORT)."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown process-group backend {backend!r}: expected one of {BACKENDS}")
        if timeout_s <= 0:
            raise ValueError(f"timeout must be positive, got {timeout_s} s")
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise RuntimeError(f"environment variable {missing[0]} is not set: launch with "
                               "`torchrun --nproc-per-node R ...`")
        if backend == "xla":
            import torch_xla.distributed.xla_backend  # noqa: F401  registers "xla" (Trainium; untested here)
        timeout = datetime.timedelta(seconds=timeout_s)
        store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
        dist.init_process_group(backend, store=dist.PrefixStore("mimo_ep/pg/", store),
                                rank=rank, world_size=world, timeout=timeout)
        return cls(rank, world, store, backend, timeout_s)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    # ---- collectives -------------------------------------------------------------------------
    def all_to_all(self, rows: np.ndarray, send_counts, recv_counts, traffic: Traffic, phase: str,
                   what: str) -> np.ndarray:
        """Rows [S, B] split by `send_counts` [R] to the ranks in order -> rows [M, B] received,
        grouped by source rank (`recv_counts` [R]). Uneven counts need a backend that allows them."""
        send_counts = [int(c) for c in send_counts]
        recv_counts = [int(c) for c in recv_counts]
        if sum(send_counts) != len(rows):
            raise ValueError(f"{what}: send counts sum to {sum(send_counts)} but {len(rows)} rows are given")
        if not self.uneven_splits and (len(set(send_counts)) > 1 or len(set(recv_counts)) > 1):
            raise ValueError(f"{what}: backend {self.backend!r} supports only equal splits")
        row_bytes = rows.shape[1] if rows.ndim == 2 else 0
        out = torch.empty((sum(recv_counts),) + rows.shape[1:], dtype=torch.uint8, device=self.device)
        src = torch.from_numpy(np.ascontiguousarray(rows)).to(self.device)
        self._run(what, lambda: dist.all_to_all_single(out, src, recv_counts, send_counts))
        traffic.add(phase, (sum(send_counts) - send_counts[self.rank]) * row_bytes,
                    (sum(recv_counts) - recv_counts[self.rank]) * row_bytes)
        return out.cpu().numpy()

    def all_gather(self, array: np.ndarray, traffic: Traffic | None, phase: str, what: str) -> np.ndarray:
        """Every rank's `array` (same shape and dtype everywhere) -> [R, *array.shape]."""
        src = torch.from_numpy(np.ascontiguousarray(array)).to(self.device)
        out = torch.empty((self.world_size,) + tuple(src.shape), dtype=src.dtype, device=self.device)
        self._run(what, lambda: dist.all_gather(list(out.unbind(0)), src))   # straight into one buffer
        if traffic is not None:
            traffic.add(phase, (self.world_size - 1) * array.nbytes, (self.world_size - 1) * array.nbytes)
        return out.cpu().numpy()

    def all_gather_objects(self, obj, what: str) -> list:
        """Every rank's picklable `obj`, in rank order (statistics, results; not on the hot path)."""
        out = [None] * self.world_size
        self._run(what, lambda: dist.all_gather_object(out, obj))
        return out

    # ---- failures ----------------------------------------------------------------------------
    def _run(self, what: str, collective) -> None:
        try:
            collective()
        except RuntimeError as err:   # gloo: peer closed its connection, or the timeout expired
            raise PeerFailure(self._peer_failure_message(what, err)) from None

    def report_failure(self, message: str) -> None:
        """Leave this rank's error where the other ranks look when their collectives break."""
        try:
            self.store.set(f"{NOTICE_KEY}{self.rank}", message)
        except RuntimeError:
            pass  # the store itself is gone; the others fall back to the timeout message

    def failure_notices(self) -> dict[int, str]:
        notices = {}
        for r in range(self.world_size):
            key = f"{NOTICE_KEY}{r}"
            try:
                if self.store.check([key]):
                    notices[r] = self.store.get(key).decode(errors="replace")
            except RuntimeError:
                break
        return notices

    def _peer_failure_message(self, what: str, err: Exception) -> str:
        deadline = time.monotonic() + NOTICE_WAIT_S
        notices = self.failure_notices()
        while not notices and time.monotonic() < deadline:
            time.sleep(0.1)
            notices = self.failure_notices()
        if notices:
            failed = "; ".join(f"rank {r} failed: {msg}" for r, msg in sorted(notices.items()))
            return f"rank {self.rank}: {what} aborted because {failed}"
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return (f"rank {self.rank}: {what} failed (process-group timeout {self.timeout_s:g} s): "
                f"{first_line}. No rank reported an error: a rank crashed, was killed or hangs")


def _device(backend: str):
    if backend == "xla":
        import torch_xla.core.xla_model as xm   # Trainium: tensors live on the XLA device (untested here)
        return xm.xla_device()
    return torch.device("cpu")


@contextmanager
def failure_guard(comm: Communicator):
    """Run a rank's work; if it raises (other than a `PeerFailure`, which is a consequence, not a
    cause), publish the error so the other ranks can name this rank, then re-raise."""
    try:
        yield
    except PeerFailure:
        raise
    except Exception as err:
        comm.report_failure(f"{type(err).__name__}: {err}")
        raise


def report_and_exit_code(rank: int, err: BaseException) -> int:
    """Print one clear line for a failed rank on stderr; the exit code for it."""
    print(f"[rank {rank}] expert-parallel run failed: {err}", file=sys.stderr, flush=True)
    return 1
