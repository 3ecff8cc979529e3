#!/usr/bin/env python
"""COMQ sweep time against one GEMM of the same size, NumPy on the CPU and CuPy on the GPU, on the same problems.

For W (m, n) and G (n, n) in float32: the GEMM is ``W @ G`` (2 m n^2 flops, the work of one exact sweep), the sweep
is one ``comq_quantize`` call with one sweep, no scale update and no lambda search (as tools/bench/solver.py: the
grid set-up, the order, the input checks and the copy of the result to the host are inside). Shapes: 4096 x 4096
and 11008 x 4096 (a 7B model's attention and MLP widths); --quick: 16x smaller. The last column compares the
devices' results: the share of equal codes and the relative difference of the objectives.

A second table measures capture's Gram formation (capture/gram.GramStats: G += X^T X, float32 products added in
float64) on the same two widths: batches of 8 sequences x 128 tokens of a row-kind layer input (a decoder's MatMul
input), already in the device's memory (the GPU capture's case with onnxruntime's CUDA provider), in tokens per
second, and the relative difference of the devices' G.

    python tools/bench/gpu.py                       # CPU and GPU (tools/gpu_check.sh runs this)
    python tools/bench/gpu.py --device cpu --quick  # no GPU: a check that the script works
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from onnxcomq.capture.gram import GramStats  # noqa: E402
from onnxcomq.errors import UserError  # noqa: E402
from onnxcomq.graph.layers import XSpec  # noqa: E402
from onnxcomq.solve.backend import get_xp  # noqa: E402
from onnxcomq.solve.comq import SolverConfig, comq_quantize  # noqa: E402

SHAPES = [(4096, 4096, "7B attention"), (11008, 4096, "7B MLP up")]
QUICK = 16  # --quick divides the shapes by this


def sync(xp):
    if xp is not np:
        xp.cuda.Device().synchronize()


def best_of(fn, xp, repeats):
    """The fastest of ``repeats`` timed calls (seconds) and the last call's result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        sync(xp)
        t = time.perf_counter()
        out = fn()
        sync(xp)
        best = min(best, time.perf_counter() - t)
    return best, out


def problem(m, n, seed=0):
    """Host W (m, n) and G = X^T X (n, n) from 2n rows, float32."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((2 * n, n), dtype=np.float32)
    return (rng.standard_normal((m, n), dtype=np.float32) * 0.05), X.T @ X


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="both", choices=["cpu", "gpu", "both"])
    ap.add_argument("--quick", action="store_true", help="shapes 16x smaller, one timed sweep")
    ap.add_argument("--order", default="cyclic", choices=["cyclic", "greedy", "importance"])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2, help="timed sweeps per shape and device (best of)")
    args = ap.parse_args(argv)
    devices = ["cpu", "gpu"] if args.device == "both" else [args.device]
    try:
        mods = {d: get_xp(d) for d in devices}
    except UserError as e:  # no CuPy or no CUDA device
        sys.exit(f"gpu.py: {e}")
    shapes = [(m // QUICK, n // QUICK, what) for m, n, what in SHAPES] if args.quick else SHAPES
    repeats = 1 if args.quick else args.repeats
    cfg = SolverConfig(bits=args.bits, order=args.order, sweeps=1, scale_update=False, lambda_search=False,
                       dtype="float32").validate()
    t0 = time.perf_counter()
    print(f"COMQ {args.order} sweep vs GEMM, float32, {args.bits} bits, sweeps best of {repeats}, GEMMs of "
          f"{repeats + 2}; "
          f"CPU: NumPy {np.__version__}, {os.cpu_count()} cores" +
          (f"; GPU: CuPy {mods['gpu'].__version__}, {_gpu_name(mods['gpu'])}" if "gpu" in mods else ""))
    if "gpu" in mods:  # compile the kernels outside the timings
        Wh, Gh = problem(64, 64)
        comq_quantize(mods["gpu"].asarray(Wh), mods["gpu"].asarray(Gh), cfg)
    print("| W (m x n) | device | GEMM ms | sweep ms | sweep / GEMM | sweep CPU / GPU | codes equal, objective diff |")
    print("|---|---|---|---|---|---|---|")
    for m, n, what in shapes:
        Wh, Gh = problem(m, n)
        runs = {}
        for d, xp in mods.items():
            W, G = xp.asarray(Wh), xp.asarray(Gh)
            t_gemm, _ = best_of(lambda: W @ G, xp, repeats + 2)
            t_sweep, res = best_of(lambda: comq_quantize(W, G, cfg, xp), xp, repeats)
            runs[d] = (t_gemm, t_sweep, res)
        for d, (t_gemm, t_sweep, res) in runs.items():
            vs = cmp = ""
            if d == "gpu" and "cpu" in runs:
                ref = runs["cpu"][2]
                vs = f"{runs['cpu'][1] / t_sweep:.1f}x"
                cmp = (f"{(res.codes == ref.codes).mean():.4f}, "
                       f"{abs(res.objective - ref.objective) / max(abs(ref.objective), 1e-30):.1e}")
            print(f"| {what} ({m} x {n}) | {d} | {t_gemm * 1e3:.1f} | {t_sweep * 1e3:.1f} | "
                  f"{t_sweep / t_gemm:.1f}x | {vs} | {cmp} |")
    gram_table(mods, shapes, 2 if args.quick else 8)
    print(f"total {time.perf_counter() - t0:.1f} s")


def gram_table(mods: dict, shapes: list, batches: int, tokens: int = 8 * 128):
    """Gram formation rate of capture (GramStats.add) per device: ``batches`` batches of ``tokens`` rows."""
    print()
    print("| capture Gram (n) | device | tokens / s | G CPU / GPU rel. diff |")
    print("|---|---|---|---|")
    for n in sorted({n for _, n, _ in shapes} | {m for m, _, _ in shapes}):
        rng = np.random.default_rng(n)
        Xh = rng.standard_normal((batches, tokens, n), dtype=np.float32)
        Gs = {}
        for d, xp in mods.items():
            X = xp.asarray(Xh)
            st = GramStats(XSpec("x", "rows", n), 1, xp=xp)
            st.add(X[0])  # (warm-up: kernels, BLAS threads)
            st = GramStats(XSpec("x", "rows", n), 1, xp=xp)
            sync(xp)
            t = time.perf_counter()
            for b in range(batches):
                st.add(X[b])
            sync(xp)
            rate = batches * tokens / (time.perf_counter() - t)
            Gs[d] = np.asarray(st.G[0]) if xp is np else xp.asnumpy(st.G[0])
            diff = ""
            if d == "gpu" and "cpu" in Gs:
                diff = f"{np.abs(Gs['gpu'] - Gs['cpu']).max() / np.abs(Gs['cpu']).max():.1e}"
            print(f"| {n} | {d} | {rate:,.0f} | {diff} |")


def _gpu_name(cp) -> str:
    name = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


if __name__ == "__main__":
    main()
