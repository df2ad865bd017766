"""Expert parallelism: placement, the dispatch plan, all_to_all dispatch/combine over
torch.distributed, the expert executor the model calls, statistics, and the torchrun entry.

    torchrun --nproc-per-node 4 run_example.py --mode random --ep-mode auto

See docs/expert_parallel.md. `plan`, `placement` and `stats` are pure NumPy; `comm`,
`dispatcher`, `executor` and `run` need torch.
"""
