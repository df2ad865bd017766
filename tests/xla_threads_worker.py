"""The expert-parallel modes on torch-xla's CPU device, one thread per rank in one process
(`PJRT_DEVICE=CPU CPU_NUM_DEVICES=R python tests/xla_threads_worker.py MODE`); prints one JSON
line {rank: {mode: {max_err, scale}}} with the logits of prefill and two decode passes against
the single-process model. Run by `test_parallel_xla.py::test_torch_xla_cpu_tier`."""

from __future__ import annotations

import json
import os
import sys
import threading

import numpy as np
import torch.distributed as dist


def main(modes: list[str]) -> None:
    # torch-xla runs each sync's execution on a pool of (by default) one thread per core, and a
    # thread waiting at a collective holds its pool thread: with fewer pool threads than ranks the
    # ranks that are not yet running never arrive. Read once, at the first execution.
    world = int(os.environ["CPU_NUM_DEVICES"])
    os.environ.setdefault("XLA_THREAD_POOL_SIZE", str(2 * world))
    import torch_xla.runtime as xr
    from torch_xla._internal import pjrt

    from mimo_v2_flash import MiMoV2FlashModel
    from mimo_v2_flash.placement import ExpertPlacement
    from mimo_parallel.comm import Communicator, xla_threads_transport
    from mimo_parallel.run import build_rank_model, random_rank_weights
    from test_parallel_torchrun import SEQUENCES_PER_RANK, _config, model_steps_error

    store = dist.HashStore()
    barrier = threading.Barrier(world)
    config = _config()
    reference = MiMoV2FlashModel.random(config, seed=0)
    results = {}

    def rank_fn(*_):
        rank = xr.global_ordinal()
        comm = Communicator(rank, world, store, xla_threads_transport(world, rank, barrier), timeout_s=600)
        placement = ExpertPlacement.contiguous(config.n_routed_experts, world)
        held = random_rank_weights(config, placement, rank, seed=0)
        n_seq = SEQUENCES_PER_RANK[rank]
        srng = np.random.default_rng([5, rank])
        prompts = [srng.integers(0, config.vocab_size, srng.integers(3, 10)) for _ in range(n_seq)]
        mine = {}
        for mode in modes:
            model, executor = build_rank_model(held, comm, mode=mode)
            err, scale = model_steps_error(model, executor, reference, prompts, decode_steps=1)
            mine[mode] = {"max_err": err, "scale": scale, "modes": sorted(set(executor.modes)),
                          "syncs": comm.syncs}
        results[rank] = mine
        comm.close()

    pjrt.spawn_threads(rank_fn, args=())
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    main(sys.argv[1].split(","))
