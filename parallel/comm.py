"""Process group setup and the collectives the dispatchers use: every byte counted, every failure
turned into one clear error naming the rank that caused it, within a bounded time.

Transports (`Transport`): how a collective reaches the wire.

* "gloo" (CPU, tested under torchrun): `all_to_all_single` with uneven split lists, eager.
* "xla" (the torch-xla process group, what torch-neuronx uses on Trainium2): equal splits only,
  and only the way `ProcessGroupXla.alltoall_base` accepts them, i.e. split lists `None`
  (torch-xla 2.9 asserts that both lists are empty, even when they are equal); results are lazy
  tensors on the XLA device: nothing runs until the step's graph is synced (`sync`), and a host
  read before that would compile and run a graph of its own. `ProcessGroupXla` also ignores its
  timeout (torch-xla 2.9 leaves it a TODO), so the deadline below is this module's own.
* "xla_threads": `xm.all_gather` with explicit channel ids called directly (the all-to-all built
  on it), for torch-xla's thread-per-device mode (one process, `CPU_NUM_DEVICES=R`), where
  torch.distributed's single default group cannot hold R ranks.
* Further xla-like transports can be registered (`register_transport`); the tests register a fake
  `xla` group that enforces the rules above on CPU.

Failures. A rank whose code raises leaves a notice in the rendezvous store (`failure_guard`). A
background thread on every rank publishes a heartbeat (collectives entered, whether it is inside
one) and watches the others'. When a collective fails (a peer closed its connection, the
process-group timeout expired) or blocks longer than allowed, the rank names the cause: the
rank that reported an error, the rank that exited, the rank whose heartbeat stopped (killed or
crashed: after `liveness_s` without a heartbeat) or the rank that is alive but never entered the
collective (it hangs: after `timeout_s`). Where the blocked call cannot be interrupted (an XLA
sync, a collective with no timeout) the watchdog prints the message, leaves its own notice and
ends the process (`os._exit`), so a broken run always stops within timeout_s + a few seconds.
"""

from __future__ import annotations

import datetime
import os
import pickle
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from .stats import Traffic

BACKENDS = ("gloo", "xla")
NOTICE_KEY = "mimo_ep/failed/"     # + rank: that rank's error message
EXITED_KEY = "mimo_ep/exited/"     # + rank: the rank closed its communicator (finished or left)
ALIVE_KEY = "mimo_ep/alive/"       # + rank: "<beat> <collectives entered> <inside 0|1> <name>"
ABORTED_KEY = "mimo_ep/aborted/"   # + rank: the rank stopped because of another rank (not a cause)
ABORT_EXIT_CODE = 1


class PeerFailure(RuntimeError):
    """A collective failed on this rank because another rank failed or stopped answering."""


# ---- transports ---------------------------------------------------------------------------------
@dataclass
class Transport:
    """How collectives reach the wire. `lazy`: results are graph values that need `sync()`
    before a host read; `uneven_splits`: all_to_all accepts per-rank split sizes."""
    name: str
    device: torch.device
    lazy: bool
    uneven_splits: bool
    sync: Callable[[], None] = lambda: None
    all_to_all: Callable | None = None       # (out, src, recv_counts | None, send_counts | None)
    all_gather: Callable | None = None       # (out [R * n, ...], src [n, ...])
    to_host: Callable = field(default=lambda t: t.detach().cpu().numpy())
    to_device: Callable = field(default=lambda array, device: torch.as_tensor(array).to(device))


def _dist_all_to_all(out, src, recv_counts, send_counts):
    dist.all_to_all_single(out, src, recv_counts, send_counts)   # None: equal splits


def _dist_all_gather(out, src):
    # all_gather_single in newer torch; all_gather_into_tensor (-> _allgather_base) in torch 2.9
    getattr(dist, "all_gather_single", dist.all_gather_into_tensor)(out, src)


def gloo_transport() -> Transport:
    return Transport("gloo", torch.device("cpu"), lazy=False, uneven_splits=True,
                     all_to_all=_dist_all_to_all, all_gather=_dist_all_gather)


def xla_transport() -> Transport:
    """The torch-xla process group (Trainium2 under torch-neuronx; torch-xla's CPU device here)."""
    import torch_xla
    return Transport("xla", torch_xla.device(), lazy=True, uneven_splits=False, sync=torch_xla.sync,
                     all_to_all=_dist_all_to_all, all_gather=_dist_all_gather)


def xla_threads_transport(world_size: int, rank: int, barrier: threading.Barrier) -> Transport:
    """torch-xla's collectives called directly (thread-per-device mode: no torch.distributed group;
    `xr.world_size()` is 1 there, so the replica group is explicit).

    XLA:CPU pairs the threads of a collective by its channel id, or without one by the unique id of
    the compiled module; each thread compiles its own step graph (the ranks' shapes differ), so the
    module ids differ and the rendezvous never completes. Every collective here therefore carries a
    channel id: its position in the step graph (from 1, reset at each sync), the same on every
    rank because all ranks issue the same collectives in the same order. torch-xla 2.9's
    `all_to_all` takes no channel id, so the all-to-all is an all-gather keeping this rank's block
    from every source (R times the bytes on the wire; the result is the same).

    XLA:CPU also ends the process when a thread waits more than 10 s for the others at a
    collective, so every sync first waits at `barrier` (shared by the R threads): a rank's host
    work before its step (the threads share one interpreter lock) does not count against it."""
    import torch_xla
    import torch_xla.core.xla_model as xm
    groups = [list(range(world_size))]
    position = [0]                        # collectives issued into the pending step graph

    def gather(src):
        position[0] += 1
        return xm.all_gather(src, dim=0, groups=groups, pin_layout=False, channel_id=position[0])

    def all_to_all(out, src, recv_counts, send_counts):
        block = src.shape[0] // world_size
        blocks = gather(src).reshape((world_size, world_size, block) + tuple(src.shape[1:]))
        out.copy_(blocks[:, rank].reshape(src.shape))

    def all_gather(out, src):
        out.copy_(gather(src))

    def sync():
        barrier.wait()
        torch_xla.sync()
        position[0] = 0

    return Transport("xla_threads", torch_xla.device(), lazy=True, uneven_splits=False, sync=sync,
                     all_to_all=all_to_all, all_gather=all_gather)


_REGISTERED: dict[str, Callable[[], Transport]] = {}


def register_transport(backend: str, make: Callable[[], Transport]) -> None:
    """Make `Communicator.from_env(backend)` use `make()` after `init_process_group(backend)` (the
    process-group backend itself must be registered with torch.distributed)."""
    _REGISTERED[backend] = make


def transport_for(backend: str) -> Transport:
    if backend in _REGISTERED:
        return _REGISTERED[backend]()
    if backend == "gloo":
        return gloo_transport()
    if backend == "xla":
        return xla_transport()
    raise ValueError(f"unknown process-group backend {backend!r}: expected one of {BACKENDS + tuple(_REGISTERED)}")


# ---- the communicator ---------------------------------------------------------------------------
class Communicator:
    """Collectives over one transport for one rank, with a heartbeat and a failure watchdog."""

    def __init__(self, rank: int, world_size: int, store, transport: Transport, timeout_s: float,
                 liveness_s: float | None = None, on_abort: Callable[[str], None] | None = None):
        if timeout_s <= 0:
            raise ValueError(f"timeout must be positive, got {timeout_s} s")
        self.rank = rank
        self.world_size = world_size
        self.store = store
        self.transport = transport
        self.backend = transport.name
        self.timeout_s = float(timeout_s)
        self.liveness_s = float(min(timeout_s, 10.0) if liveness_s is None else liveness_s)
        if self.liveness_s <= 0:
            raise ValueError(f"liveness must be positive, got {self.liveness_s} s")
        self.on_abort = on_abort or (lambda message: print(f"[rank {rank}] expert-parallel run failed: {message}",
                                                           file=sys.stderr, flush=True))
        self.uneven_splits = transport.uneven_splits
        self.device = transport.device
        self.syncs = 0                       # graph syncs issued (lazy transports)
        self._entered = 0                    # collectives (and syncs) entered
        self._inside: str | None = None      # the blocking call in progress
        self._inside_since = 0.0
        self._seen: dict[int, tuple[str, float]] = {}   # peer -> (heartbeat value, local time it changed)
        self._lock = threading.Lock()
        self._aborting = False
        self._object_rounds = 0
        self._closed = threading.Event()
        try:
            self._watch_store = store.clone()     # the watchdog's own connection
        except Exception:
            self._watch_store = store             # an in-process store (thread-per-device runs)
        self._watchdog = threading.Thread(target=self._watch, name=f"ep-watchdog-{rank}", daemon=True)
        self._publish()
        self._watchdog.start()

    @classmethod
    def from_env(cls, backend: str = "gloo", timeout_s: float = 300.0, liveness_s: float | None = None,
                 on_abort=None) -> "Communicator":
        """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR/PORT)."""
        if backend not in BACKENDS and backend not in _REGISTERED:
            raise ValueError(f"unknown process-group backend {backend!r}: expected one of {BACKENDS}")
        if timeout_s <= 0:
            raise ValueError(f"timeout must be positive, got {timeout_s} s")
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise RuntimeError(f"environment variable {missing[0]} is not set: launch with "
                               "`torchrun --nproc-per-node R ...`")
        if backend == "xla":
            import torch_xla.distributed.xla_backend  # noqa: F401  registers "xla"
        timeout = datetime.timedelta(seconds=timeout_s)
        store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
        dist.init_process_group(backend, store=dist.PrefixStore("mimo_ep/pg/", store),
                                rank=rank, world_size=world, timeout=timeout)
        return cls(rank, world, store, transport_for(backend), timeout_s, liveness_s, on_abort)

    def close(self) -> None:
        """Leave: the others' diagnosis then says this rank exited rather than hangs."""
        if self._closed.is_set():
            return
        self._closed.set()
        try:
            if not self._aborting:
                self.store.set(f"{EXITED_KEY}{self.rank}", f"after {self._entered} collectives")
        except Exception:
            pass
        if dist.is_initialized():
            dist.destroy_process_group()

    # ---- tensors --------------------------------------------------------------------------------
    def to_device(self, array) -> torch.Tensor:
        return self.transport.to_device(np.ascontiguousarray(array), self.device)

    def sync(self, what: str) -> None:
        """Run the pending graph (its collectives included) under the deadline; no-op when eager."""
        if self.transport.lazy:
            self.syncs += 1
            self._run(what, self.transport.sync)

    def to_host(self, tensor: torch.Tensor) -> np.ndarray:
        """Read a tensor back; on a lazy transport only after `sync` (the caller's step boundary)."""
        return self.transport.to_host(tensor)

    # ---- collectives on device tensors (no host read) -------------------------------------------
    def all_to_all_equal(self, src: torch.Tensor, what: str) -> torch.Tensor:
        """src [R * c, ...] -> [R * c, ...]: block r goes to rank r, block s comes from rank s.
        Split lists are passed as None, the only form the xla process group accepts."""
        if src.shape[0] % self.world_size:
            raise ValueError(f"{what}: {src.shape[0]} rows do not split into {self.world_size} equal blocks")
        out = torch.empty_like(src)
        self._run(what, lambda: self.transport.all_to_all(out, src, None, None))
        return out

    def all_gather_tensor(self, src: torch.Tensor, what: str) -> torch.Tensor:
        """src [n, ...] -> [R * n, ...] (rank r's rows at r * n)."""
        out = torch.empty((self.world_size * src.shape[0],) + tuple(src.shape[1:]), dtype=src.dtype,
                          device=src.device)
        self._run(what, lambda: self.transport.all_gather(out, src))
        return out

    # ---- collectives on host arrays (each one a host read: the eager CPU path) ------------------
    def all_to_all(self, rows: np.ndarray, send_counts, recv_counts, traffic: Traffic, phase: str,
                   what: str) -> np.ndarray:
        """Rows [S, B] split by `send_counts` [R] to the ranks in order -> rows [M, B] received,
        grouped by source rank (`recv_counts` [R]). Uneven counts need a backend that allows them;
        equal ones travel with split lists None."""
        send_counts = [int(c) for c in send_counts]
        recv_counts = [int(c) for c in recv_counts]
        if sum(send_counts) != len(rows):
            raise ValueError(f"{what}: send counts sum to {sum(send_counts)} but {len(rows)} rows are given")
        equal = len(set(send_counts)) == 1 and len(set(recv_counts)) == 1 and send_counts[0] == recv_counts[0]
        if not equal and not self.uneven_splits:
            raise ValueError(f"{what}: backend {self.backend!r} supports only equal splits")
        row_bytes = rows.shape[1] if rows.ndim == 2 else 0
        src = self.to_device(rows)
        if equal and not self.uneven_splits:
            out = self.all_to_all_equal(src, what)
        else:
            out = torch.empty((sum(recv_counts),) + rows.shape[1:], dtype=src.dtype, device=self.device)
            self._run(what, lambda: self.transport.all_to_all(out, src, recv_counts, send_counts))
        traffic.add(phase, (sum(send_counts) - send_counts[self.rank]) * row_bytes,
                    (sum(recv_counts) - recv_counts[self.rank]) * row_bytes)
        self.sync(what)
        return self.to_host(out)

    def all_gather(self, array: np.ndarray, traffic: Traffic | None, phase: str, what: str) -> np.ndarray:
        """Every rank's `array` (same shape and dtype everywhere) -> [R, *array.shape]."""
        array = np.ascontiguousarray(array)
        out = self.all_gather_tensor(self.to_device(array.reshape(1, -1)), what)
        if traffic is not None:
            traffic.add(phase, (self.world_size - 1) * array.nbytes, (self.world_size - 1) * array.nbytes)
        self.sync(what)
        return self.to_host(out).reshape((self.world_size,) + array.shape)

    def all_gather_objects(self, obj, what: str) -> list:
        """Every rank's picklable `obj`, in rank order (statistics, results, identities; not on the
        hot path). Through the rendezvous store, so it works on every transport."""
        self._object_rounds += 1
        key = f"mimo_ep/objects/{self._object_rounds}/"
        self._run(what, lambda: self.store.set(f"{key}{self.rank}", pickle.dumps(obj)))
        keys = [f"{key}{r}" for r in range(self.world_size)]
        self._run(what, lambda: self._wait_keys(keys))
        return [pickle.loads(self.store.get(k)) for k in keys]

    def _wait_keys(self, keys) -> None:
        deadline = time.monotonic() + self.timeout_s
        while not self.store.check(keys):
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {self.timeout_s:g} s for every rank")
            time.sleep(0.01)

    # ---- failures -------------------------------------------------------------------------------
    def _run(self, what: str, call) -> None:
        with self._lock:
            self._entered += 1
            self._inside, self._inside_since = what, time.monotonic()
        self._publish()
        try:
            call()
        except Exception as err:   # gloo: a peer closed its connection or the timeout expired; xla: any
            message = self._diagnose(what, err, wait=True)
            self._mark_aborted()
            raise PeerFailure(message) from None
        finally:
            with self._lock:
                self._inside = None
            self._publish()

    def report_failure(self, message: str) -> None:
        """Leave this rank's error where the other ranks look when their collectives break."""
        try:
            self.store.set(f"{NOTICE_KEY}{self.rank}", message)
        except Exception:
            pass  # the store itself is gone; the others fall back to the heartbeat diagnosis

    def failure_notices(self, store=None) -> dict[int, str]:
        return self._read_keys(NOTICE_KEY, store)

    def _read_keys(self, prefix: str, store=None) -> dict[int, str]:
        store = store or self.store
        found = {}
        for r in range(self.world_size):
            key = f"{prefix}{r}"
            try:
                if store.check([key]):
                    found[r] = store.get(key).decode(errors="replace")
            except Exception:
                break
        return found

    def _publish(self) -> None:
        with self._lock:
            inside = self._inside
            value = f"{time.monotonic():.3f} {self._entered} {int(inside is not None)} {inside or '-'}"
        store = self._watch_store if threading.current_thread() is self._watchdog else self.store
        try:
            store.set(f"{ALIVE_KEY}{self.rank}", value)
        except Exception:
            pass      # the store is gone: the others will see this rank's heartbeat stop

    def _observe(self, store) -> None:
        """Refresh when each peer's heartbeat last changed (local clock: no clock sync needed)."""
        now = time.monotonic()
        for r in range(self.world_size):
            if r == self.rank:
                continue
            try:
                value = store.get(f"{ALIVE_KEY}{r}").decode() if store.check([f"{ALIVE_KEY}{r}"]) else ""
            except Exception:
                return
            with self._lock:
                if r not in self._seen or self._seen[r][0] != value:
                    self._seen[r] = (value, now)

    def _culprits(self, store, overdue: bool) -> list[str]:
        """Why the other ranks are not completing this rank's collective, worst first; [] if no
        rank can be blamed yet."""
        notices = self.failure_notices(store)
        if notices:
            return [f"rank {r} failed: {msg}" for r, msg in sorted(notices.items())]
        exited = self._read_keys(EXITED_KEY, store)
        aborted = self._read_keys(ABORTED_KEY, store)   # stopped because of someone else
        blamed = [f"rank {r} exited ({msg}) while rank {self.rank} still needed it"
                  for r, msg in sorted(exited.items()) if r != self.rank]
        now = time.monotonic()
        with self._lock:
            seen = dict(self._seen)
            mine = self._entered
        for r, (value, changed) in sorted(seen.items()):
            if r in exited or r in aborted:
                continue
            if now - changed > self.liveness_s:
                blamed.append(f"rank {r} stopped answering: no heartbeat for {now - changed:.1f} s "
                              "(killed or crashed)" if value else
                              f"rank {r} never sent a heartbeat in {now - changed:.1f} s (killed or never started)")
                continue
            parts = value.split(" ", 3)
            if len(parts) == 4 and overdue:
                entered, inside, name = int(parts[1]), parts[2] == "1", parts[3]
                if entered < mine or (entered == mine and not inside):
                    where = f"inside {name!r}" if inside else f"after {name!r}" if name != "-" else "idle"
                    blamed.append(f"rank {r} hangs: alive but has not entered this collective "
                                  f"(it is {where}, collective #{entered}; this rank waits in #{mine})")
        return blamed

    def _diagnose(self, what: str, err: Exception | None, wait: bool) -> str:
        """The message for a failed or overdue collective; waits (up to liveness_s) for a culprit."""
        with self._lock:
            since = self._inside_since
        store = self._watch_store if threading.current_thread() is self._watchdog else self.store
        deadline = time.monotonic() + (self.liveness_s + 2.5 if wait else 0.0)
        while True:
            self._observe(store)
            culprits = self._culprits(store, time.monotonic() - since >= 0.9 * self.timeout_s)
            if culprits or time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        if culprits:
            return f"rank {self.rank}: {what} aborted because " + "; ".join(culprits)
        detail = ""
        if err is not None:
            text = str(err).strip()
            detail = ": " + (text.splitlines()[0] if text else type(err).__name__)
        return (f"rank {self.rank}: {what} failed after {time.monotonic() - since:.1f} s (timeout "
                f"{self.timeout_s:g} s){detail}. No rank reported an error and every heartbeat is "
                "fresh")

    def _watch(self) -> None:
        """Heartbeat and watchdog: publish this rank's progress, end a call that overruns."""
        interval = max(0.05, min(1.0, self.liveness_s / 4))
        while not self._closed.wait(interval):
            self._publish()
            self._observe(self._watch_store)
            with self._lock:
                what, since = self._inside, self._inside_since
            if what is None:
                continue
            inside_for = time.monotonic() - since
            grace = 2.0    # let an eager backend's own timeout raise first (a clean exception)
            if inside_for > self.liveness_s + interval:
                culprits = self._culprits(self._watch_store, inside_for - grace > self.timeout_s)
                if culprits or inside_for > self.timeout_s + grace:
                    self._abort(self._diagnose(what, None, wait=False))
                    return

    def _mark_aborted(self) -> bool:
        with self._lock:
            first = not self._aborting
            self._aborting = True
        if first:
            store = self._watch_store if threading.current_thread() is self._watchdog else self.store
            try:
                store.set(f"{ABORTED_KEY}{self.rank}", "1")
            except Exception:
                pass
        return first

    def _abort(self, message: str) -> None:
        if not self._mark_aborted():
            return
        try:
            self.on_abort(message)
        finally:
            os._exit(ABORT_EXIT_CODE)


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
