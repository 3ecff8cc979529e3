#!/usr/bin/env python
"""Time one COMQ sweep at real layer shapes against the dense GEMM time of the same flops, measured in the same run.

One exact sweep does the work of one (m x n) @ (n x n) GEMM (2 m n^2 flops: R += D @ G over all blocks), so the
baseline is ``A @ G`` for A (m, n), G (n, n) in the same dtype. The sweep is timed through onnxcomq's public solver:
one ``comq_quantize`` call with one sweep, no scale update and no lambda search, so the grid set-up, the greedy
order, the input checks and the conversion of the result (each O(m n) or O(n^2), against the sweep's O(m n^2)) are
inside the timed sweep. Prints a markdown table of times and ratios for both update orders. Use --device gpu to run
the same code on CuPy.

    python tools/bench/solver.py                  # CPU, float32
    python tools/bench/solver.py --device gpu     # CuPy
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from onnxcomq.solve.backend import get_xp  # noqa: E402
from onnxcomq.solve.comq import SolverConfig, comq_quantize  # noqa: E402

SHAPES = [(768, 768, "attention proj"), (3072, 768, "MLP up"), (768, 3072, "MLP down"), (4608, 512, "conv 3x3x512")]


def sync(xp):
    if xp is not np:
        xp.cuda.Device().synchronize()


def best_of(fn, xp, repeats):
    times = []
    for _ in range(repeats):
        sync(xp)
        t = time.perf_counter()
        fn()
        sync(xp)
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "gpu", "auto"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--block-size", type=int, default=0,
                    help="coordinate steps per lazy-update block (SolverConfig.step_block); 0 = the solver's default")
    args = ap.parse_args(argv)
    xp = get_xp(args.device)
    dt = getattr(xp, args.dtype)
    rng = np.random.default_rng(0)
    print(f"device={args.device} ({xp.__name__}), dtype={args.dtype}, bits={args.bits}, best of {args.repeats}")
    print("| layer (m x n) | GEMM ms | cyclic sweep ms | cyclic / GEMM | greedy sweep ms | greedy / GEMM |")
    print("|---|---|---|---|---|---|")
    for m, n, what in SHAPES:
        X = xp.asarray(rng.standard_normal((2 * n, n)), dtype=dt)
        G = X.T @ X
        W = xp.asarray(rng.standard_normal((m, n)) * 0.05, dtype=dt)
        A = xp.asarray(rng.standard_normal((m, n)), dtype=dt)
        t_gemm = best_of(lambda: A @ G, xp, args.repeats + 2)
        row = [f"{what} ({m} x {n})", f"{t_gemm * 1e3:.1f}"]
        for order_name in ("cyclic", "greedy"):
            # step_block 0: the solver's own block for the shape and order
            cfg = SolverConfig(bits=args.bits, order=order_name, sweeps=1, scale_update=False, lambda_search=False,
                               dtype=args.dtype, step_block=args.block_size).validate()
            t = best_of(lambda cfg=cfg: comq_quantize(W, G, cfg, xp), xp, args.repeats)
            row += [f"{t * 1e3:.1f}", f"{t / t_gemm:.2f}x"]
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
