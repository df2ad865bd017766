"""Expert parallelism under torchrun + gloo at world sizes 1, 2, 4, 8 (and a failing rank).

Each launch runs this file as the worker script (`python -m torch.distributed.run ... this.py
SCENARIO OUT_DIR`); every rank writes its numbers to OUT_DIR/rank<r>.json and the pytest side
asserts on them. Several scenarios share one launch because process start-up dominates on two
cores. Configs are tiny (hidden 64) but keep 32 experts, top-8.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
MODES = ("alltoallv", "alltoall_padded", "allgather", "auto")
TOKENS_PER_RANK = [5, 0, 17, 1, 9, 3, 12, 2]     # rank 1 routes no tokens of its own
SEQUENCES_PER_RANK = [2, 0, 1, 3, 1, 2, 0, 1]    # ranks 1 and 6 hold no sequences
FLOAT_TOL = dict(rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# worker side (runs inside torchrun)
# ------------------------------------------------------------------------------------------------
def _config():
    from mimo_v2_flash import load_config
    return load_config("tiny").replace(hidden_size=64, moe_intermediate_size=32, intermediate_size=96,
                                       vocab_size=128, n_routed_experts=32)


def _uniform(rng, n, allowed, top_k):
    """n tokens choosing top_k distinct experts uniformly from `allowed`, weights summing to 1."""
    allowed = np.asarray(allowed)
    ids = allowed[np.argsort(rng.random((n, len(allowed))), axis=1)[:, :top_k]]
    w = rng.random((n, top_k)).astype(np.float32) + 0.1
    return ids, w / w.sum(axis=1, keepdims=True)


def _moe_cases(comm, config, full_ops):
    """(name, placement, x, ids, weights) of this rank for each MoE-level scenario."""
    from mimo_v2_flash import reference as ref
    from mimo_v2_flash.placement import ExpertPlacement
    from mimo_parallel.placement import expert_load, load_aware_placement
    world, rank, E, k = comm.world_size, comm.rank, config.n_routed_experts, config.num_experts_per_tok
    contiguous = ExpertPlacement.contiguous(E, world)
    n = TOKENS_PER_RANK[rank % len(TOKENS_PER_RANK)]

    def rng(case):
        return np.random.default_rng([7, rank, case])

    x = rng(0).standard_normal((n, config.hidden_size)).astype(np.float32)
    cases = [("uniform", contiguous, x, *_uniform(rng(1), n, range(E), k))]
    gate = full_ops.w("model.layers.1.mlp.gate.weight")
    bias = full_ops.w("model.layers.1.mlp.gate.e_score_correction_bias")
    cases.append(("router", contiguous, x, *ref.router(x, gate, bias, k)))
    cases.append(("idle_experts", contiguous, x, *_uniform(rng(2), n, sorted(set(range(E)) - {1, 2, 3, 9, 17}), k)))
    if world > 1:   # the last rank receives nothing
        cases.append(("idle_rank", contiguous, x, *_uniform(rng(3), n, range(E - E // world), k)))
    # Rank 0 owns experts 0..7 (an explicit table) and every token picks exactly those.
    table = [[*range(8)]] + [list(range(8 + r - 1, E, world - 1)) for r in range(1, world)] if world > 1 else [list(range(E))]
    cases.append(("one_rank", ExpertPlacement.from_table(table, world, E), x, *_uniform(rng(4), n, range(8), k)))
    # Skewed routing over a load-aware placement computed from (everyone's) skewed statistics.
    p = 1.0 / np.arange(1, E + 1)
    stats = np.stack([rng(5).choice(E, k, replace=False, p=p / p.sum()) for _ in range(200)])
    skewed = np.array([np.random.default_rng([8, rank, t]).choice(E, k, replace=False, p=p / p.sum())
                       for t in range(n)], np.int64).reshape(n, k)
    load = comm.all_gather(expert_load(stats, E), None, "", "load statistics").sum(axis=0)
    w = rng(6).random((n, k)).astype(np.float32) + 0.1
    cases.append(("load_aware", load_aware_placement(load, world), x, skewed, w / w.sum(axis=1, keepdims=True)))
    return cases


def _executor(comm, config, placement, mode, wire="float32"):
    from mimo_v2_flash.layer import ReferenceOps
    from mimo_v2_flash.weights import random_weights
    from mimo_parallel.dispatcher import Dispatcher
    from mimo_parallel.executor import ExpertParallelExecutor, OpsLocalExperts
    from mimo_parallel.plan import RowFormat
    mine = placement.experts_of(comm.rank)
    ops = ReferenceOps(config, random_weights(config, seed=0, experts=mine))   # only this rank's experts
    fmt = RowFormat(config.hidden_size, config.num_experts_per_tok, wire)
    return ExpertParallelExecutor(Dispatcher(comm, placement, fmt, mode),
                                  OpsLocalExperts(ops, mine)), fmt


def _record_numbers(record, plan_bytes):
    return {"mode": record.mode, "sent": record.traffic.sent, "received": record.traffic.received,
            "predicted_sent": record.predicted.sent, "predicted_received": record.predicted.received,
            "plan_dispatch_bytes": plan_bytes, "expert_rows": sum(record.expert_rows),
            "assignments": record.assignments}


def scenario_check(comm):
    """MoE-level cases in every mode against the reference MoE, bytes against the plan, then the
    model's logits against the single-process model, then data-parallel generation."""
    from mimo_v2_flash import MiMoV2FlashModel
    from mimo_v2_flash import reference as ref
    from mimo_v2_flash.layer import ReferenceOps
    from mimo_v2_flash.placement import ExpertPlacement
    from mimo_v2_flash.weights import random_weights
    from mimo_parallel.plan import build_plan
    from mimo_parallel.run import build_rank_model, generate_data_parallel, random_rank_weights
    from mimo_parallel.stats import summarize
    config = _config()
    full_ops = ReferenceOps(config, random_weights(config, seed=0))
    layer = 1
    moe = {}
    for name, placement, x, ids, w in _moe_cases(comm, config, full_ops):
        expected = ref.moe(x, ids, w, lambda e: full_ops.expert_weights(layer, e))
        outputs = {}
        for mode in MODES:
            executor, fmt = _executor(comm, config, placement, mode)
            outputs[mode] = executor(layer, x, ids, w)
            again = executor(layer, x, ids, w)
            plan_bytes = build_plan(ids, w, placement, comm.rank).predicted_dispatch_bytes(fmt)
            moe[f"{name}/{mode}"] = {
                "max_err": float(np.abs(outputs[mode] - expected).max(initial=0.0)),
                "scale": float(np.abs(expected).max(initial=0.0)),
                "deterministic": bool(np.array_equal(outputs[mode], again)),
                **_record_numbers(executor.stats.records[0], plan_bytes)}
        moe[f"{name}/padded_equals_alltoallv"] = bool(np.array_equal(outputs["alltoallv"],
                                                                     outputs["alltoall_padded"]))
    # No rank has a token: every mode still completes the layer, and returns nothing.
    idle_shapes = {}
    for mode in MODES:
        executor, _ = _executor(comm, config, ExpertPlacement.contiguous(config.n_routed_experts, comm.world_size), mode)
        idle_shapes[mode] = list(executor(layer, np.zeros((0, config.hidden_size), np.float32),
                                          np.zeros((0, 8), np.int64), np.zeros((0, 8), np.float32)).shape)
    # bf16 on the wire: one rounding of the hidden rows and of the partials.
    name, placement, x, ids, w = _moe_cases(comm, config, full_ops)[0]
    executor, _ = _executor(comm, config, placement, "alltoallv", "bfloat16")
    bf16 = executor(layer, x, ids, w)
    expected = ref.moe(x, ids, w, lambda e: full_ops.expert_weights(layer, e))
    moe["uniform/alltoallv_bf16"] = {"max_err": float(np.abs(bf16 - expected).max(initial=0.0)),
                                     "scale": float(np.abs(expected).max(initial=0.0))}

    # Bytes against all-gather for random routing, equal tokens per rank.
    contiguous = ExpertPlacement.contiguous(config.n_routed_experts, comm.world_size)
    rng = np.random.default_rng([11, comm.rank])
    ids, w = _uniform(rng, 48, range(config.n_routed_experts), config.num_experts_per_tok)
    x = rng.standard_normal((48, config.hidden_size)).astype(np.float32)
    factor = {}
    for mode in ("alltoallv", "allgather"):
        executor, _ = _executor(comm, config, contiguous, mode)
        executor(layer, x, ids, w)
        factor[mode] = executor.stats.records[0].traffic.sent["dispatch"]

    # The model: this rank's sequences (maybe none) through prefill and two decode steps.
    reference_model = MiMoV2FlashModel.random(config, seed=0)
    n_seq = SEQUENCES_PER_RANK[comm.rank % len(SEQUENCES_PER_RANK)]
    srng = np.random.default_rng([5, comm.rank])
    prompts = [srng.integers(0, config.vocab_size, srng.integers(3, 10)) for _ in range(n_seq)]
    model_errors, dropped, calls = {}, {}, {}
    held = random_rank_weights(config, contiguous, comm.rank, seed=0)     # only this rank's experts
    for mode in MODES:
        model, executor = build_rank_model(held, comm, mode=mode)
        cache, ref_cache = model.new_cache(max(n_seq, 1)), reference_model.new_cache(max(n_seq, 1))
        steps = [(prompts, list(range(n_seq))),
                 ([[int(p[-1])] for p in prompts], list(range(n_seq))),
                 ([[int(prompts[0][0])]] if n_seq else [], [0] if n_seq else [])]   # one sequence left
        err, scale = 0.0, 0.0
        for seqs, slots in steps:
            if seqs:
                got = model.forward_ragged(seqs, cache, slots)
                want = reference_model.forward_ragged(seqs, ref_cache, slots)
                err = max(err, max(float(np.abs(g - r).max()) for g, r in zip(got, want)))
                scale = max(scale, max(float(np.abs(r).max()) for r in want))
            else:
                executor.idle(config)
            executor.stats.next_step()
        records = [rec for part in comm.all_gather_objects(executor.stats.records, "stats") for rec in part]
        summary = summarize(records, comm.world_size)
        model_errors[mode] = {"max_err": err, "scale": scale}
        dropped[mode] = summary["dropped_tokens"]
        calls[mode] = sorted({layer_summary["ranks_reporting"] for layer_summary in summary["layers"]})

    model, executor = build_rank_model(held, comm, mode="auto")
    prompt_block = np.random.default_rng(9).integers(0, config.vocab_size, (n_seq, 6))
    tokens, _ = generate_data_parallel(model, executor, comm, prompt_block, max_new_tokens=3)
    same_tokens = n_seq == 0 or bool(np.array_equal(tokens, reference_model.generate(prompt_block, 3)))
    return {"moe": moe, "idle_shapes": idle_shapes, "factor_bytes": factor, "model": model_errors, "dropped": dropped,
            "ranks_per_layer_call": calls, "generate_matches": same_tokens,
            "auto_modes": sorted({rec.mode for rec in executor.stats.records})}


def scenario_fail(comm):
    """Rank 2 raises in the middle of layer 3's dispatch (counts exchanged, payload not sent)."""
    return _faulty_run(comm, lambda: (_ for _ in ()).throw(RuntimeError("injected failure in dispatch")))


def scenario_hang(comm):
    """Rank 2 stops answering in the middle of layer 3's dispatch."""
    return _faulty_run(comm, lambda: time.sleep(3600))


def _faulty_run(comm, fault):
    from mimo_v2_flash.placement import ExpertPlacement
    config = _config()
    model_placement = ExpertPlacement.contiguous(config.n_routed_experts, comm.world_size)
    from mimo_parallel.run import build_rank_model, random_rank_weights
    model, executor = build_rank_model(random_rank_weights(config, model_placement, comm.rank, seed=0), comm,
                                       mode="alltoallv")
    real = comm.all_to_all

    def all_to_all(rows, send_counts, recv_counts, traffic, phase, what):
        if comm.rank == 2 and what.startswith("layer 3 dispatch"):
            fault()
        return real(rows, send_counts, recv_counts, traffic, phase, what)

    comm.all_to_all = all_to_all
    model.forward(np.arange(6)[None])
    return {"finished": True}


def worker(scenario: str, out_dir: str) -> int:
    from mimo_parallel.comm import Communicator, failure_guard
    timeout = float(os.environ.get("EP_TEST_TIMEOUT", "60"))
    comm = Communicator.from_env("gloo", timeout)
    path = Path(out_dir) / f"rank{comm.rank}.json"
    try:
        with failure_guard(comm):
            result = globals()[f"scenario_{scenario}"](comm)
    except Exception as err:
        path.write_text(json.dumps({"error": str(err), "type": type(err).__name__}))
        return 1
    finally:
        comm.close()
    path.write_text(json.dumps(result))
    return 0


# ------------------------------------------------------------------------------------------------
# pytest side
# ------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, args: list[str], timeout_s: float, env_extra=None, monitor_interval=0.5):
    """torchrun on 127.0.0.1 with a free port; returns (exit code, seconds, output)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           "--monitor-interval", str(monitor_interval), *args]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
    return proc.returncode, time.monotonic() - start, proc.stdout + proc.stderr


def run_workers(world, scenario, tmp_path, timeout_s=240, **kwargs):
    code, seconds, output = launch(world, [__file__, scenario, str(tmp_path)], timeout_s, **kwargs)
    results = {}
    for r in range(world):
        path = tmp_path / f"rank{r}.json"
        results[r] = json.loads(path.read_text()) if path.exists() else None
    return code, seconds, output, results


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_expert_parallel_equals_single_process(world, tmp_path):
    code, _, output, results = run_workers(world, "check", tmp_path)
    assert code == 0, (results, output[-3000:])
    for rank, res in results.items():
        assert "error" not in res, res
        moe = res["moe"]
        for key, m in moe.items():
            if isinstance(m, bool):            # alltoallv and padded compute the same rows
                assert m, f"rank {rank} {key}"
                continue
            if key.endswith("_bf16"):
                assert m["max_err"] <= 2e-2 * m["scale"], (rank, key, m)
                continue
            assert m["max_err"] <= FLOAT_TOL["atol"] + FLOAT_TOL["rtol"] * m["scale"], (rank, key, m)
            assert m["deterministic"], (rank, key)
            # Bytes measured by the communicator == bytes predicted by the plan and layout.
            assert m["sent"] == m["predicted_sent"] and m["received"] == m["predicted_received"], (rank, key, m)
            if m["mode"] == "alltoallv":
                assert m["sent"]["dispatch"] == m["plan_dispatch_bytes"], (rank, key, m)
        for mode, m in res["model"].items():
            assert m["max_err"] <= 1e-4 * max(1.0, m["scale"]), (rank, mode, m)
        assert res["dropped"] == dict.fromkeys(MODES, 0)
        assert res["ranks_per_layer_call"] == dict.fromkeys(MODES, [world])   # idle ranks took part
        assert res["generate_matches"], rank
        assert res["idle_shapes"] == dict.fromkeys(MODES, [0, 64])
        # auto: all-gather for the one-token decode steps at most, alltoallv for prefill.
        assert "alltoallv" in res["auto_modes"]
    # Every byte sent is received by someone, per case and phase.
    for key in results[0]["moe"]:
        if isinstance(results[0]["moe"][key], dict) and "sent" in results[0]["moe"][key]:
            for phase in ("layout", "dispatch", "combine"):
                assert sum(res["moe"][key]["sent"][phase] for res in results.values()) == \
                       sum(res["moe"][key]["received"][phase] for res in results.values()), (key, phase)
    # Random routing: alltoallv sends R / (distinct ranks per token) times fewer bytes than all-gather.
    if world > 1:
        from mimo_parallel.plan import expected_remote_copies
        measured = sum(r["factor_bytes"]["allgather"] for r in results.values()) / \
            sum(r["factor_bytes"]["alltoallv"] for r in results.values())
        expected = (world - 1) / expected_remote_copies(32, world, 8)
        assert measured == pytest.approx(expected, rel=0.06)
        assert measured >= {2: 1.0, 4: 1.03, 8: 1.3}[world]


@pytest.mark.parametrize("scenario, message", [
    ("fail", "rank 2 failed: RuntimeError: injected failure in dispatch"),
    ("hang", "rank 2 hangs: alive but has not entered this collective"),
])
def test_failed_rank_stops_every_rank_with_a_clear_error(scenario, message, tmp_path):
    timeout = 4.0
    # A slow torchrun monitor, so the surviving ranks must stop by themselves (not be killed).
    code, seconds, output, results = run_workers(4, scenario, tmp_path, timeout_s=120, monitor_interval=3,
                                                 env_extra={"EP_TEST_TIMEOUT": str(timeout)})
    assert code != 0
    assert seconds < 60, f"took {seconds:.0f} s"
    if scenario == "fail":
        assert "injected failure in dispatch" in results[2]["error"]
    else:
        assert results[2] is None           # still asleep when torchrun ended it
    for rank in (0, 1, 3):
        res = results[rank]
        assert res is not None, f"rank {rank} wrote nothing:\n{output[-3000:]}"
        assert res["type"] == "PeerFailure" and message in res["error"], res
        assert f"rank {rank}: layer 3 dispatch (alltoallv)" in res["error"], res


def test_run_example_under_torchrun_matches_single_process(tmp_path):
    """run_example.py --mode random on 4 ranks with 3 sequences (rank 3 idle): the same tokens as
    one process; rank 0 prints the statistics table; the load-aware placement it saves reruns
    (padded mode) to the same tokens; a bad placement file stops every rank with its name."""
    common = ["run_example.py", "--mode", "random", "--batch", "3", "--seq-len", "6",
              "--max-new-tokens", "3", "--seed", "4"]
    single = subprocess.run([sys.executable, *common, "--json", str(tmp_path / "single.json")], cwd=REPO,
                            capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert single.returncode == 0, single.stderr
    expected = json.loads((tmp_path / "single.json").read_text())["tokens"]
    placement = tmp_path / "placement.json"
    code, _, output = launch(4, [*common, "--json", str(tmp_path / "ep.json"), "--ep-save-placement", str(placement)], 180)
    assert code == 0, output[-3000:]
    assert "rows sent" in output and "dropped tokens 0" in output
    ep = json.loads((tmp_path / "ep.json").read_text())
    assert ep["tokens"] == expected
    assert ep["ep"]["dropped_tokens"] == 0 and [r["rank"] for r in ep["ep"]["ranks"]] == [0, 1, 2, 3]
    assert ep["ep"]["ranks"][3]["tokens"] == 0 and ep["ep"]["ranks"][3]["layer_calls"] == ep["ep"]["ranks"][0]["layer_calls"]
    saved = json.loads(placement.read_text())
    assert saved["world_size"] == 4 and sorted(saved["rank_of"]) == sorted([0, 1, 2, 3] * 4)
    code, _, output = launch(4, [*common, "--json", str(tmp_path / "ep2.json"), "--ep-placement", str(placement),
                                 "--ep-mode", "alltoall_padded"], 180)
    assert code == 0, output[-3000:]
    assert json.loads((tmp_path / "ep2.json").read_text())["tokens"] == expected
    bad = tmp_path / "bad.json"
    bad.write_text('{"world_size": 2, "rank_of": [0, 1]}')
    code, _, output = launch(2, [*common, "--ep-placement", str(bad)], 180)
    assert code != 0 and f"{bad}: placement has 2 experts, the model has 16" in output


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1], sys.argv[2]))
