"""Expert-parallel dispatch benchmark: bytes per token and wall time per MoE layer, per mode.

    python benchmarks/bench_ep.py                       # world sizes 2 4 8 32, tokens/rank 1 32 512
    python benchmarks/bench_ep.py --worlds 2 4 --tokens 1 32

For each world size it launches `torchrun --nproc-per-node R` (gloo on 127.0.0.1) and runs one
MoE layer of MiMo-V2-Flash's shape (256 experts, top-8, hidden 4096, bf16 rows on the wire) with
uniform random routing, in each mode, several times. It reports, per (R, tokens per rank, mode):
bytes sent per token (all phases, averaged over ranks), the ratio to the all-gather baseline, and
the wall time of the layer (median over repeats of the slowest rank).

What the numbers are: bytes are exact (counted from the tensors handed to the collectives; the
tests prove they equal the plan's prediction). Wall times are from CPU processes sharing this
machine's cores (32 ranks on 2 cores is 16 processes per core), so they show the CPU cost of the
exchange, not Trainium2 NeuronLink times. The experts are a stand-in (a per-expert scale,
O(rows x hidden)) through the same local-experts interface, so the time is dispatch + combine.
Cells whose buffers would exceed --memory-budget-gb over all ranks are not run: their bytes come
from the plan's prediction and their time is left empty (marked "predicted").

Prints a table and writes benchmarks/results/bench_ep.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MODES = ("alltoallv", "alltoall_padded", "allgather")


class ScaledExperts:
    """Local-experts stand-in: expert i is the map x -> (1 + i / 8) x (weighted, summed per row)."""

    def __init__(self, num_local: int):
        self.scales = 1.0 + np.arange(num_local, dtype=np.float32) / 8

    def __call__(self, layer, x, local_ids, weights):
        factor = np.where(local_ids >= 0, weights * self.scales[np.maximum(local_ids, 0)], 0).sum(axis=1)
        return x * factor[:, None]


def wire_rows(mode: str, world: int, tokens: int, copies: float) -> float:
    """Rough rows each rank holds on the wire for one layer (memory guard only)."""
    return {"alltoallv": tokens * copies, "alltoall_padded": world * tokens * min(1.0, 2 * copies / world),
            "allgather": world * tokens}[mode]


def worker(args) -> int:
    from mimo_v2_flash.placement import ExpertPlacement
    from mimo_parallel.comm import Communicator
    from mimo_parallel.dispatcher import Dispatcher
    from mimo_parallel.executor import ExpertParallelExecutor
    from mimo_parallel.plan import Layout, RowFormat, build_plan, expected_remote_copies, predict_traffic

    comm = Communicator.from_env("gloo", timeout_s=600)
    world, rank = comm.world_size, comm.rank
    placement = ExpertPlacement.contiguous(args.experts, world)
    fmt = RowFormat(args.hidden, args.top_k, "bfloat16")
    copies = expected_remote_copies(args.experts, world, args.top_k) + 1
    cells = []
    for tokens in args.tokens:
        rng = np.random.default_rng([tokens, rank])
        ids = np.argsort(rng.random((tokens, args.experts)), axis=1)[:, :args.top_k]
        w = rng.random((tokens, args.top_k)).astype(np.float32)
        w /= w.sum(axis=1, keepdims=True)
        x = rng.standard_normal((tokens, args.hidden)).astype(np.float32)
        for mode in MODES:
            rows = wire_rows(mode, world, tokens, copies)
            runnable = 4 * rows * fmt.dispatch_row_bytes * world <= args.memory_budget_gb * 1e9
            if runnable:
                executor = ExpertParallelExecutor(Dispatcher(comm, placement, fmt, mode),
                                                  ScaledExperts(len(placement.experts_of(rank))))
                times = []
                for _ in range(args.repeats + 1):                  # the first call warms up
                    comm.all_gather(np.zeros(1), None, "", "sync")
                    start = time.perf_counter()
                    executor(1, x, ids, w)
                    times.append(time.perf_counter() - start)
                record = executor.stats.records[-1]
                sent, received, seconds = record.traffic.total_sent, record.traffic.total_received, times[1:]
                assert record.traffic == record.predicted, (record.traffic, record.predicted)
            else:                                                  # bytes from the plan, no payload moved
                plan = build_plan(ids, w, placement, rank)
                counts = comm.all_gather(plan.send_counts, None, "", "counts")
                traffic = predict_traffic(mode, Layout(counts, np.full(world, tokens)), rank, fmt)
                sent, received, seconds = traffic.total_sent, traffic.total_received, []
            everyone = comm.all_gather_objects((sent, received, seconds), "results")
            if rank == 0:
                slowest = [max(s[i] for _, _, s in everyone) for i in range(len(seconds))]
                cells.append({
                    "world_size": world, "tokens_per_rank": tokens, "mode": mode, "measured": runnable,
                    "bytes_sent_per_token": sum(s for s, _, _ in everyone) / (world * tokens),
                    "bytes_received_per_token": sum(r for _, r, _ in everyone) / (world * tokens),
                    "ms_per_layer": 1e3 * statistics.median(slowest) if slowest else None,
                    "expected_remote_copies": copies - 1,
                })
    if rank == 0:
        Path(args.out).write_text(json.dumps(cells))
    comm.close()
    return 0


def launch(world: int, args) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "cells.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
               "--master-addr", "127.0.0.1", "--master-port", str(port), __file__, "--worker",
               "--out", str(out), "--tokens", *map(str, args.tokens), "--hidden", str(args.hidden),
               "--experts", str(args.experts), "--top-k", str(args.top_k), "--repeats", str(args.repeats),
               "--memory-budget-gb", str(args.memory_budget_gb)]
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"world size {world} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
        return json.loads(out.read_text())


def add_ratios(cells: list[dict]) -> None:
    base = {(c["world_size"], c["tokens_per_rank"]): c for c in cells if c["mode"] == "allgather"}
    for c in cells:
        b = base[c["world_size"], c["tokens_per_rank"]]
        c["bytes_vs_allgather"] = c["bytes_sent_per_token"] / b["bytes_sent_per_token"]
        c["time_vs_allgather"] = (c["ms_per_layer"] / b["ms_per_layer"]
                                  if c["ms_per_layer"] is not None and b["ms_per_layer"] is not None else None)


def format_table(cells: list[dict]) -> str:
    head = (f"{'R':>3} {'tok/rank':>8} {'mode':<16} {'KB sent/token':>13} {'x allgather':>11} "
            f"{'ms/layer':>9} {'x allgather':>11}")
    lines = [head, "-" * len(head)]
    for c in cells:
        ms = f"{c['ms_per_layer']:9.1f}" if c["ms_per_layer"] is not None else f"{'predicted':>9}"
        tr = f"{c['time_vs_allgather']:11.2f}" if c["time_vs_allgather"] is not None else f"{'-':>11}"
        lines.append(f"{c['world_size']:>3} {c['tokens_per_rank']:>8} {c['mode']:<16} "
                     f"{c['bytes_sent_per_token'] / 1024:13.1f} {c['bytes_vs_allgather']:11.3f} {ms} {tr}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8, 32])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 32, 512], help="tokens per rank")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--memory-budget-gb", type=float, default=6.0,
                   help="skip (predict) cells whose wire buffers over all ranks exceed this")
    p.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "bench_ep.json"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    cells = []
    for world in args.worlds:
        start = time.perf_counter()
        cells += launch(world, args)
        print(f"world size {world}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    add_ratios(cells)
    print(format_table(cells))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    setup = {"experts": args.experts, "top_k": args.top_k, "hidden": args.hidden, "wire_dtype": "bfloat16",
             "routing": "uniform random", "backend": "gloo on CPU", "cpu_cores": os.cpu_count(),
             "repeats": args.repeats, "experts_compute": "stand-in scale (dispatch + combine timed)"}
    Path(args.json).write_text(json.dumps({"setup": setup, "cells": cells}, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
