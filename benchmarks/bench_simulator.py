"""Benchmark of the NKI CPU simulator: a 4096x4096 by 4096x512 bf16 tiled matmul.

Prints the simulator's speed on this CPU (instructions per second, wall time) and the cost
model's estimated Trainium2 time against the roofline, and writes the numbers as JSON to
``benchmarks/results/bench_simulator.json``.  The Trainium2 times are model estimates, not
measurements (docs/simulator.md).

    python benchmarks/bench_simulator.py [--m 4096 --k 4096 --n 512]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import ml_dtypes
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from mimo_kernels.backend import nki, nl, nisa, simulate  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


@nki.jit
def matmul_bf16(lhsT, rhs):
    """out[M, N] = lhsT.T @ rhs for lhsT [K, M] and rhs [K, N] (bf16, K on partitions).

    rhs is loaded once (K/128 tiles of [128, N]); for each block of 512 output rows the four
    [128, 128] stationary tiles of one K step come in one DMA of [128, 512].
    """
    K, M = lhsT.shape
    _, N = rhs.shape
    TK, TM, TN = nl.tile_size.pmax, nl.tile_size.gemm_stationary_fmax, nl.tile_size.gemm_moving_fmax
    BM = 4 * TM                                        # rows of output per stationary DMA
    assert K % TK == 0 and M % BM == 0 and N % TN == 0, f"shapes {K}, {M}, {N} must be tile multiples"
    out = nl.ndarray((M, N), dtype=lhsT.dtype, buffer=nl.shared_hbm)
    rhs_tiles = []
    for k in range(K // TK):                           # HBM -> SBUF, once
        t = nl.ndarray((TK, N), dtype=rhs.dtype, buffer=nl.sbuf)
        nisa.dma_copy(t, rhs[k * TK:(k + 1) * TK, :])
        rhs_tiles.append(t)
    for mb in range(M // BM):
        lhs_tiles = []
        for k in range(K // TK):                       # HBM -> SBUF: [128, 512] per K step
            t = nl.ndarray((TK, BM), dtype=lhsT.dtype, buffer=nl.sbuf)
            nisa.dma_copy(t, lhsT[k * TK:(k + 1) * TK, mb * BM:(mb + 1) * BM])
            lhs_tiles.append(t)
        for m in range(BM // TM):
            for n in range(N // TN):
                acc = nl.ndarray((TM, TN), dtype=nl.float32, buffer=nl.psum)
                for k in range(K // TK):
                    nisa.nc_matmul(acc, lhs_tiles[k][:, m * TM:(m + 1) * TM],
                                   rhs_tiles[k][:, n * TN:(n + 1) * TN])
                res = nl.ndarray((TM, TN), dtype=out.dtype, buffer=nl.sbuf)
                nisa.tensor_copy(res, acc)             # PSUM -> SBUF, fp32 -> bf16
                r0 = mb * BM + m * TM
                nisa.dma_copy(out[r0:r0 + TM, n * TN:(n + 1) * TN], res)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=4096)
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--check", action="store_true", help="compare with NumPy (slower)")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    lhsT = rng.standard_normal((args.k, args.m), dtype=np.float32).astype(ml_dtypes.bfloat16)
    rhs = rng.standard_normal((args.k, args.n), dtype=np.float32).astype(ml_dtypes.bfloat16)

    start = time.perf_counter()
    out, rep = simulate(matmul_bf16, report=True)(lhsT, rhs)
    wall = time.perf_counter() - start

    result = {
        "benchmark": "tiled bf16 matmul", "m": args.m, "k": args.k, "n": args.n,
        "wall_time_s": wall,
        "simulated_instructions": rep.instructions,
        "instructions_per_s": rep.instructions / wall,
        "estimated_trn2_time_us": rep.estimated_time_s * 1e6,
        "roofline_time_us": rep.roofline_time_s * 1e6,
        "roofline_bound": rep.roofline_bound,
        "efficiency_vs_roofline": rep.efficiency,
        "note": "Trainium2 times are cost-model estimates, not measurements",
        "report": rep.to_dict(),
    }
    if args.check:
        ref = lhsT.astype(np.float32).T @ rhs.astype(np.float32)
        err = float(np.max(np.abs(out.astype(np.float32) - ref)) / np.max(np.abs(ref)))
        result["max_rel_error_vs_numpy"] = err

    print(rep)
    print()
    print(f"matmul {args.m}x{args.k} @ {args.k}x{args.n} bf16 on the simulator:")
    print(f"  wall time           {wall:.2f} s for {rep.instructions:,} instructions "
          f"({rep.instructions / wall:,.0f} instructions/s)")
    print(f"  estimated Trainium2 {rep.estimated_time_s * 1e6:,.1f} us (model)")
    print(f"  roofline            {rep.roofline_time_s * 1e6:,.1f} us ({rep.roofline_bound}-bound); "
          f"estimate is {rep.efficiency:.1%} of roofline speed")
    if "max_rel_error_vs_numpy" in result:
        print(f"  max error vs NumPy  {result['max_rel_error_vs_numpy']:.2e} (relative to max |ref|)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "bench_simulator.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"  JSON                {path}")
    return result


if __name__ == "__main__":
    main()
