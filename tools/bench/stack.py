#!/usr/bin/env python
"""Time one layer's COMQ solve of its 7 lambda candidates with k of them stacked (``solve.comq._stacked``: W's rows
copied once per candidate and solved in one coordinate loop), for k = 1 (one solve after another), 2, 3 and 7, at
dense layer shapes and at depthwise group shapes; the best of --repeats, the k alternating. Random W and the Gram of
2000 random rows (400 per group); the default recipe's solver settings. ``STACK_ELEMENTS`` was set from this
(docs/benchmarks.md, "Whole runs"). --device gpu runs the same code on CuPy.

    python tools/bench/stack.py
    python tools/bench/stack.py --shapes 384x384 1000x1280 --groups 1152x25 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from onnxcomq.solve import comq  # noqa: E402
from onnxcomq.solve.backend import get_xp  # noqa: E402

DENSE = ["384x384", "384x1536", "1536x384", "192x1152", "1152x192", "672x112", "1280x320", "1000x1280"]
GROUPS = ["1152x25", "672x25", "96x9"]  # depthwise convs: groups x taps, one output channel each
KS = (1, 2, 3, 7)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="*", default=DENSE, help="dense layers, MxN (out x in)")
    ap.add_argument("--groups", nargs="*", default=GROUPS, help="depthwise layers, GROUPSxTAPS")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    args = ap.parse_args(argv)
    xp = get_xp(args.device)
    sync = (lambda: xp.cuda.Device().synchronize()) if xp is not np else (lambda: None)
    rng = np.random.default_rng(0)
    cfg = comq.SolverConfig(lambda_solves=7)
    cases = []
    for s in args.shapes:
        m, n = map(int, s.split("x"))
        X = rng.standard_normal((2000, n)).astype(np.float32)
        W = rng.standard_normal((m, n)).astype(np.float32)
        cases.append((f"dense {s}", m * n, lambda W=xp.asarray(W), G=xp.asarray(X.T @ X): comq.comq_quantize(
            W, G, cfg, xp)))
    for s in args.groups:
        b, n = map(int, s.split("x"))
        X = rng.standard_normal((b, 400, n)).astype(np.float32)
        W = rng.standard_normal((b, 1, n)).astype(np.float32)
        G = np.matmul(X.transpose(0, 2, 1), X)
        cases.append((f"groups {s}", b * n, lambda W=xp.asarray(W), G=xp.asarray(G): comq.comq_quantize_groups(
            W, G, cfg, xp)))
    print("| layer | " + " | ".join(f"k = {k} s" for k in KS) + " |")
    print("|---|" + "---:|" * len(KS))
    saved = comq.STACK_ELEMENTS
    try:
        for name, size, run in cases:
            best = {k: float("inf") for k in KS}
            run()  # (warm-up)
            for _ in range(args.repeats):
                for k in KS:
                    comq.STACK_ELEMENTS = k * size
                    sync()
                    t0 = time.perf_counter()
                    run()
                    sync()
                    best[k] = min(best[k], time.perf_counter() - t0)
            print(f"| {name} | " + " | ".join(f"{best[k]:.3f}" for k in KS) + " |", flush=True)
    finally:
        comq.STACK_ELEMENTS = saved


if __name__ == "__main__":
    main()
