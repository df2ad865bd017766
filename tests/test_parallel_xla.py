"""Expert parallelism the way the `xla` process group allows it, on CPU stand-ins, and failures.

* A fake `xla` process group (`fake_xla_group.py`: rejects split-size lists like torch-xla 2.9's
  `ProcessGroupXla`, lazy results that may not be read before a sync) under torchrun at world
  sizes 2, 4, 8: the static-shape dispatcher in both modes over a chain of MoE layers with one
  sync per step, against the NumPy reference MoE; the model's logits through the static executor
  (auto, padded, all-gather) and through the host-read dispatcher (padded, all-gather) against
  the single-process model; alltoallv refused; a too-small capacity named.
* Ranks given different checkpoints (another conversion, FP8 vs bf16, fewer layers) refuse
  before the first forward, every rank naming the differing rank and field.
* A rank that is killed, exits early or hangs: the others name it within a bounded time, on gloo
  and on the fake xla group (whose own timeout, like the real one's, bounds nothing).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from test_parallel_torchrun import (SEQUENCES_PER_RANK, TOKENS_PER_RANK, _config, _uniform, launch,
                                    model_steps_error)

MOE_TOL = dict(rtol=1e-5, atol=1e-5)
CHAIN_LAYERS = (1, 2, 3)


# ------------------------------------------------------------------------------------------------
# worker side
# ------------------------------------------------------------------------------------------------
def scenario_static(comm):
    """The static (lazy-device) dispatcher on the fake xla group: a chain of MoE layers per mode,
    a capacity overflow, the refused split lists, and the model against the single-process one."""
    from mimo_v2_flash.placement import ExpertPlacement
    from mimo_v2_flash.weights import random_weights
    from mimo_v2_flash.layer import ReferenceOps
    from mimo_parallel.static_dispatch import TorchLocalExperts
    config = _config()
    placement = ExpertPlacement.contiguous(config.n_routed_experts, comm.world_size)
    mine = ReferenceOps(config, random_weights(config, seed=0, experts=placement.experts_of(comm.rank)))
    local = TorchLocalExperts(mine, placement.experts_of(comm.rank), comm.to_device)
    result = {"chain": _static_chain(comm, config, placement, local),
              "overflow": _static_overflow(comm, config, placement, local)}
    result.update(_split_list_refusals(comm, config, placement))
    result["model"] = _static_model(comm, config, placement)
    return result


def _static_chain(comm, config, placement, local):
    """x <- x + moe_layer(x) over CHAIN_LAYERS on the device, one sync at the end, per mode."""
    import fake_xla_group as fx
    from mimo_v2_flash import reference as ref
    from mimo_v2_flash.layer import ReferenceOps
    from mimo_v2_flash.weights import random_weights
    from mimo_parallel.static_dispatch import StaticDispatcher, StaticShape
    rank, E, k, H = comm.rank, config.n_routed_experts, config.num_experts_per_tok, config.hidden_size
    full = ReferenceOps(config, random_weights(config, seed=0))
    n = TOKENS_PER_RANK[rank % len(TOKENS_PER_RANK)]
    shape = StaticShape(32)
    rng = np.random.default_rng([3, rank])
    x0 = rng.standard_normal((n, H)).astype(np.float32)
    routing = {layer: _uniform(rng, n, range(E), k) for layer in CHAIN_LAYERS}
    expected = x0
    for layer in CHAIN_LAYERS:
        ids, w = routing[layer]
        expected = expected + ref.moe(expected, ids, w, lambda e, l=layer: full.expert_weights(l, e))
    chain = {}
    for mode in ("alltoall_padded", "allgather"):
        dispatcher = StaticDispatcher(comm, placement, H, k, mode)
        syncs, collectives = fx.STATE.syncs, fx.STATE.collectives
        x = comm.to_device(np.pad(x0, ((0, shape.tokens - n), (0, 0))))
        for layer in CHAIN_LAYERS:
            ids, w = routing[layer]
            pad_ids = comm.to_device(np.pad(ids.astype(np.int32), ((0, shape.tokens - n), (0, 0)), constant_values=-1))
            pad_w = comm.to_device(np.pad(w, ((0, shape.tokens - n), (0, 0))))
            x = x + dispatcher(layer, x, pad_ids, pad_w, lambda a, b, c, l=layer: local(l, a, b, c), shape)
        try:
            x.cpu()
            early_read = "allowed"
        except fx.UnsyncedRead as err:
            early_read = str(err)
        comm.sync("chain step")
        routed = dispatcher.finish_step()
        got = comm.to_host(x)[:n]
        chain[mode] = {
            "max_err": float(np.abs(got - expected).max(initial=0.0)),
            "scale": float(np.abs(expected).max(initial=0.0)),
            "syncs": fx.STATE.syncs - syncs, "collectives": fx.STATE.collectives - collectives,
            "early_read": early_read, "padding_rows_stay": bool(np.all(comm.to_host(x)[n:] == 0)),
            "rows_routed": sum(sum(r["rows_to_rank"]) for r in routed),
            "expected_rows": int(sum(len(set(placement.as_array()[routing[l][0][t]])) for l in CHAIN_LAYERS
                                     for t in range(n)))}
    return chain


def _static_overflow(comm, config, placement, local):
    """A capacity below the worst case: rows past it are counted on the device and named after the sync."""
    from mimo_parallel.static_dispatch import StaticDispatcher, StaticShape
    k, H = config.num_experts_per_tok, config.hidden_size
    n = TOKENS_PER_RANK[comm.rank % len(TOKENS_PER_RANK)]
    shape = StaticShape(32, capacity=4)
    dispatcher = StaticDispatcher(comm, placement, H, k, "alltoall_padded")
    ids = np.full((shape.tokens, k), -1, np.int32)
    ids[:n] = np.arange(k)[None, :]                  # every token chooses experts 0..7 (rank 0's)
    dispatcher(1, comm.to_device(np.zeros((shape.tokens, H), np.float32)), comm.to_device(ids),
               comm.to_device(np.full((shape.tokens, k), 0.125, np.float32)),
               lambda a, b, c: local(1, a, b, c), shape)
    comm.sync("capacity step")
    try:
        dispatcher.finish_step()
        return "no error"
    except RuntimeError as err:
        return str(err)


def _split_list_refusals(comm, config, placement):
    """The host-read dispatcher refuses uneven splits on this backend; a split list is rejected by the group."""
    import torch

    from mimo_parallel.dispatcher import Dispatcher
    from mimo_parallel.plan import RowFormat
    result = {}
    try:
        Dispatcher(comm, placement, RowFormat(config.hidden_size, config.num_experts_per_tok), "alltoallv")
        result["alltoallv"] = "accepted"
    except ValueError as err:
        result["alltoallv"] = str(err)
    try:
        world = comm.world_size
        t = comm.to_device(np.zeros((world, 2), np.float32))
        torch.distributed.all_to_all_single(torch.empty_like(t), t, [1] * world, [1] * world)
        result["split_lists"] = "accepted"
    except AssertionError as err:
        result["split_lists"] = str(err)
    comm.sync("after the split-list probe")
    return result


def _static_model(comm, config, placement):
    """Prefill and two decode steps, every mode, against the single-process model."""
    from mimo_v2_flash import MiMoV2FlashModel
    from mimo_parallel.dispatcher import Dispatcher
    from mimo_parallel.executor import ExpertParallelExecutor, OpsLocalExperts
    from mimo_parallel.plan import RowFormat
    from mimo_parallel.run import build_rank_model, random_rank_weights
    rank, k, H = comm.rank, config.num_experts_per_tok, config.hidden_size
    reference_model = MiMoV2FlashModel.random(config, seed=0)
    n_seq = SEQUENCES_PER_RANK[rank % len(SEQUENCES_PER_RANK)]
    srng = np.random.default_rng([5, rank])
    prompts = [srng.integers(0, config.vocab_size, srng.integers(3, 10)) for _ in range(n_seq)]
    held = random_rank_weights(config, placement, rank, seed=0)
    result = {}
    for mode in ("auto", "alltoall_padded", "allgather", "numpy:alltoall_padded", "numpy:allgather"):
        if mode.startswith("numpy:"):     # the host-read dispatcher: a sync before every read
            model = MiMoV2FlashModel(config, held.weights)
            executor = ExpertParallelExecutor(Dispatcher(comm, placement, RowFormat(H, k), mode[6:]),
                                              OpsLocalExperts(model.ops, placement.experts_of(rank)))
            model.expert_executor = executor
        else:
            model, executor = build_rank_model(held, comm, mode=mode)
        err, scale = model_steps_error(model, executor, reference_model, prompts)
        result[mode] = {"max_err": err, "scale": scale, "modes": sorted(set(getattr(executor, "modes", [])))}
    return result


def scenario_identity(comm):
    """Rank r loads the directory EP_TEST_DIRS[r], then the ranks compare identities."""
    from mimo_parallel.run import check_same_checkpoint, prepared_rank_weights
    dirs = json.loads(os.environ["EP_TEST_DIRS"])
    held = prepared_rank_weights(dirs[comm.rank % len(dirs)], comm.world_size, comm.rank)
    check_same_checkpoint(comm, held.identity)
    return {"agreed": True}


def _faulty(comm, fault_dir):
    """Rank 2 faults (FAULT env) in layer 3's dispatch, after writing the time it did."""
    from mimo_v2_flash.placement import ExpertPlacement
    from mimo_parallel.run import build_rank_model, random_rank_weights
    config = _config()
    placement = ExpertPlacement.contiguous(config.n_routed_experts, comm.world_size)
    mode = "alltoallv" if comm.uneven_splits else "alltoall_padded"
    model, _ = build_rank_model(random_rank_weights(config, placement, comm.rank, seed=0), comm, mode=mode)
    fault = os.environ["FAULT"]
    real = comm.all_to_all_equal if comm.transport.lazy else comm.all_to_all
    name = "all_to_all_equal" if comm.transport.lazy else "all_to_all"

    def faulty(*args):
        what = args[-1]
        if comm.rank == 2 and what.startswith("layer 3 dispatch"):
            Path(fault_dir, "fault_time").write_text(repr(time.time()))
            if fault == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif fault == "exit":
                raise EarlyExit()
            elif fault == "hang":
                time.sleep(3600)
        return real(*args)

    setattr(comm, name, faulty)
    model.forward(np.arange(6)[None])
    return {"finished": True}


class EarlyExit(BaseException):
    """A rank that leaves early without an error (closes its communicator, exits 0); not an
    Exception, so `failure_guard` leaves no notice."""


def worker(scenario: str, out_dir: str, backend: str) -> int:
    import fake_xla_group
    from mimo_parallel.comm import Communicator, failure_guard
    fake_xla_group.register()
    path = Path(out_dir)

    def write(rank, data):
        (path / f"rank{rank}.json").write_text(json.dumps({**data, "time": time.time()}))

    rank = int(os.environ["RANK"])
    comm = Communicator.from_env(backend, float(os.environ.get("EP_TEST_TIMEOUT", "60")),
                                 float(os.environ["EP_TEST_LIVENESS"]) if "EP_TEST_LIVENESS" in os.environ else None,
                                 on_abort=lambda msg: write(rank, {"error": msg, "type": "PeerFailure",
                                                                   "by": "watchdog"}))
    try:
        with failure_guard(comm):
            result = _faulty(comm, out_dir) if scenario == "fault" else globals()[f"scenario_{scenario}"](comm)
    except EarlyExit:
        write(rank, {"left_early": True})
        comm.close()
        return 0
    except Exception as err:
        write(rank, {"error": str(err), "type": type(err).__name__})
        return 1
    finally:
        comm.close()
    write(rank, result)
    return 0


# ------------------------------------------------------------------------------------------------
# pytest side
# ------------------------------------------------------------------------------------------------
def run(world, scenario, backend, tmp_path, timeout_s=300, **kwargs):
    code, seconds, output = launch(world, [__file__, scenario, str(tmp_path), backend], timeout_s, **kwargs)
    results = {r: json.loads((tmp_path / f"rank{r}.json").read_text()) if (tmp_path / f"rank{r}.json").exists()
               else None for r in range(world)}
    return code, seconds, output, results


@pytest.mark.parametrize("world", [2, 4, 8])
def test_fake_xla_group_every_mode_matches_the_reference(world, tmp_path):
    code, _, output, results = run(world, "static", "fake_xla", tmp_path)
    assert code == 0, (results, output[-3000:])
    for rank, res in results.items():
        for mode, m in res["chain"].items():
            assert m["max_err"] <= MOE_TOL["atol"] + MOE_TOL["rtol"] * m["scale"], (rank, mode, m)
            assert m["syncs"] == 1, (rank, mode, m)                  # one sync for three MoE layers
            assert m["collectives"] == 3 * len(CHAIN_LAYERS), (rank, mode, m)
            assert "not yet synced" in m["early_read"], (rank, mode, m)
            assert m["padding_rows_stay"], (rank, mode)
            assert m["rows_routed"] == m["expected_rows"], (rank, mode, m)   # (token, rank) pairs
        assert "layer 1:" in res["overflow"] and "rows to rank 0 exceeded the static capacity" in res["overflow"] \
            if TOKENS_PER_RANK[rank] > 4 else res["overflow"] == "no error", (rank, res["overflow"])
        assert "mode 'alltoallv' needs uneven splits" in res["alltoallv"]
        assert res["split_lists"] == "XLA doesn't support specifying non-empty output_split_sizes and input_split_sizes"
        for mode, m in res["model"].items():
            assert m["max_err"] <= 1e-4 * max(1.0, m["scale"]), (rank, mode, m)
        # auto: all-gather for the one-token decode passes, padded for prefill
        assert res["model"]["auto"]["modes"] in (["allgather", "alltoall_padded"], ["alltoall_padded"]), res["model"]


@pytest.fixture(scope="module")
def conversions(tmp_path_factory):
    """Prepared directories for 2 ranks: bf16, the same conversion again (identical), bf16 of
    another source checkpoint, FP8 of the same source, and only the first layer."""
    from hub_fixture import write_hub_fixture
    from mimo_prepare_weights.convert import convert
    root = tmp_path_factory.mktemp("identity")
    hub = write_hub_fixture(root / "hub")
    other = write_hub_fixture(root / "hub_other", seed=1)
    out = {}
    for name, source, kwargs in [("bf16", hub, {}), ("bf16_again", hub, {}), ("other", other, {}),
                                 ("fp8", hub, {"dtype": "fp8"}), ("one_layer", hub, {"layers": [0]})]:
        out[name] = str(root / name)
        convert(source.path, out[name], world_size=2, progress=False, **kwargs)
    return out


@pytest.mark.parametrize("rank1, difference", [
    ("bf16_again", None),
    ("other", "files ("),
    ("fp8", "dtype ('fp8' on rank 1, 'bf16' on rank 0)"),
    ("one_layer", "layers ('1 (0..0)' on rank 1,"),
])
def test_ranks_refuse_a_different_checkpoint(conversions, rank1, difference, tmp_path):
    code, seconds, output, results = run(2, "identity", "gloo", tmp_path, timeout_s=180, env_extra={
        "EP_TEST_DIRS": json.dumps([conversions["bf16"], conversions[rank1]])})
    if difference is None:
        assert code == 0 and all(r == {"agreed": True, "time": r["time"]} for r in results.values()), output[-2000:]
        return
    assert code != 0
    for rank, res in results.items():        # both ranks refuse, with the same message
        assert res["type"] == "CheckpointMismatch", (rank, res)
        assert "rank 1 differs from rank 0 in" in res["error"] and difference in res["error"], res["error"]


@pytest.mark.parametrize("backend", ["gloo", "fake_xla"])
@pytest.mark.parametrize("fault, message", [
    ("kill", "rank 2 stopped answering: no heartbeat for"),
    ("exit", "rank 2 exited"),
    ("hang", "rank 2 hangs: alive but has not entered this collective"),
])
def test_a_missing_rank_is_named_within_a_bounded_time(backend, fault, message, tmp_path):
    timeout, liveness = 6.0, 2.0
    # torchrun's monitor is slowed so the surviving ranks must stop by themselves (a killed worker
    # would otherwise make torchrun end the others at its next check).
    code, _, output, results = run(4, "fault", backend, tmp_path, timeout_s=180,
                                   monitor_interval=30 if fault == "kill" else 3, env_extra={
        "EP_TEST_TIMEOUT": str(timeout), "EP_TEST_LIVENESS": str(liveness), "FAULT": fault})
    fault_time = float((tmp_path / "fault_time").read_text())
    bound = (timeout if fault == "hang" else liveness) + 4.0
    for rank in (0, 1, 3):
        res = results[rank]
        assert res is not None, f"rank {rank} wrote nothing:\n{output[-3000:]}"
        assert res["type"] == "PeerFailure" and message in res["error"], res
        assert f"rank {rank}: layer 3 dispatch" in res["error"], res
        assert res["time"] - fault_time < bound, (rank, res["time"] - fault_time, res)
    assert code != 0


if __name__ == "__main__":
    sys.exit(worker(*sys.argv[1:4]))


# ------------------------------------------------------------------------------------------------
# optional tier: torch-xla's CPU device, one thread per rank
# ------------------------------------------------------------------------------------------------
def _torch_xla_missing() -> str:
    try:
        import torch_xla  # noqa: F401
    except Exception as err:        # not installed, or built for another torch
        return f"torch-xla is not importable ({type(err).__name__}: {err}); see docs/expert_parallel.md"
    return ""


@pytest.mark.skipif(bool(_torch_xla_missing()), reason=_torch_xla_missing() or "torch-xla present")
@pytest.mark.parametrize("world", [2, 4])
def test_torch_xla_cpu_tier(world):
    import subprocess
    here = Path(__file__).resolve().parent
    modes = ("auto", "alltoall_padded", "allgather")
    env = {**os.environ, "PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": str(world), "PYTHONPATH": str(here)}
    proc = subprocess.run([sys.executable, str(here / "xla_threads_worker.py"), ",".join(modes)],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(map(int, results)) == list(range(world))
    for rank, by_mode in results.items():
        assert sorted(by_mode) == sorted(modes), (rank, by_mode)
        for mode, m in by_mode.items():
            allowed = {"alltoall_padded", "allgather"} if mode == "auto" else {mode}
            assert m["modes"] and set(m["modes"]) <= allowed, (rank, mode, m)
            # a rank with sequences compares real logits; one without still served every layer
            assert (m["scale"] > 0) == (SEQUENCES_PER_RANK[int(rank)] > 0), (rank, mode, m)
            assert m["max_err"] <= 1e-4 * max(1.0, m["scale"]), (rank, mode, m)
