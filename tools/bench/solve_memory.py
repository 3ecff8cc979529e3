#!/usr/bin/env python
"""Memory and time of one large layer's solve (``solve.layer.quantize_layer``): the peak RSS beyond the weight and
statistics, as a multiple of the float32 weight, and the seconds, for a random (m, n) weight and a Gram from 4 n
random rows, with the recipe's defaults at 4 bits (free bias on, damping "scaled"; per channel: 7 lambda solves;
block: 128 columns).

Each measurement runs in a fresh child process (``--child``): it builds the problem, then a thread samples the
process's RSS every 10 ms during the solve; the figure is the sampled peak minus the RSS before the solve. Time:
wall and CPU seconds of the solve (CPU time, all threads, is the steadier of the two on a shared machine).
``--pythonpath`` measures another copy of onnxcomq (e.g. an earlier commit: ``git archive <commit> onnxcomq | tar -x
-C /tmp/before``), alternating with this one, so that both see the same load:

    python tools/bench/solve_memory.py                                  # 4000x1024 and 16000x2048, block and channel
    python tools/bench/solve_memory.py --shapes 32000x4096 --gran block
    python tools/bench/solve_memory.py --pythonpath /tmp/before --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def child(m: int, n: int, gran: str, chunk_mb: float) -> dict:
    import numpy as np

    import onnxcomq
    from onnxcomq.capture.gram import LayerStats
    from onnxcomq.graph.layers import XSpec
    from onnxcomq.solve import layer

    if chunk_mb and hasattr(layer, "CHUNK_BYTES"):
        layer.CHUNK_BYTES = int(chunk_mb * (1 << 20))
    rng = np.random.default_rng(0)
    W = (rng.standard_normal((m, n)) * 0.02).astype(np.float32)
    X = rng.standard_normal((4 * n, n)).astype(np.float32)
    st = LayerStats(XSpec("x", "rows", n), 1, False, 0.0, 0)
    st.add(X)
    del X
    recipe = onnxcomq.Recipe().updated({"weights": {"bits": 4, "granularity": gran, "block_size": 128}})
    policy = recipe.layer_policy(4, gran, 1, True, recipe.regularization.damping, False)
    import gc
    gc.collect()

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    base = rss()
    peak, stop = [base], threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.01)
    th = threading.Thread(target=watch)
    th.start()
    t0, c0 = time.perf_counter(), time.process_time()
    res = layer.quantize_layer([W], [st], policy, n)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    stop.set()
    th.join()
    peak[0] = max(peak[0], rss())
    chunks = len(layer.row_chunks(m, n)) if hasattr(layer, "row_chunks") else 1
    return {"extra_mib": (peak[0] - base) / 2 ** 20, "w_mib": W.nbytes / 2 ** 20, "x_w": (peak[0] - base) / W.nbytes,
            "seconds": seconds, "cpu_s": cpu, "chunks": chunks, "comq_error": res.comq_error,
            "module": os.path.dirname(onnxcomq.__file__)}


def run_child(m: int, n: int, gran: str, chunk_mb: float, pythonpath: str) -> dict:
    env = dict(os.environ, PYTHONPATH=pythonpath + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, os.path.abspath(__file__), "--child", f"{m}x{n}", gran, str(chunk_mb)]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["4000x1024", "16000x2048"], help="m x n of the weights")
    ap.add_argument("--gran", nargs="+", default=["block", "channel"], choices=["block", "channel"])
    ap.add_argument("--repeats", type=int, default=1, help="measurements per case (the median is shown)")
    ap.add_argument("--pythonpath", default="", help="also measure the onnxcomq found here (the 'before' column)")
    ap.add_argument("--chunk-mb", type=float, default=0, help="solve.layer.CHUNK_BYTES in MiB (0: the default)")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        m, n = map(int, a.child[0].split("x"))
        print(json.dumps(child(m, n, a.child[1], float(a.child[2]))), flush=True)
        return
    sources = ([("before", a.pythonpath)] if a.pythonpath else []) + [("this", ROOT)]
    rows = []
    for shape in a.shapes:
        m, n = map(int, shape.split("x"))
        for gran in a.gran:
            got = {name: [] for name, _ in sources}
            for _ in range(a.repeats):
                for name, path in sources:  # (alternating: both see the same load)
                    r = run_child(m, n, gran, a.chunk_mb, path)
                    got[name].append(r)
                    print(f"  {shape} {gran} {name}: {r['extra_mib']:.0f} MiB = {r['x_w']:.1f}x W, "
                          f"{r['seconds']:.1f} s wall, {r['cpu_s']:.1f} s CPU ({r['chunks']} chunks; load "
                          f"{os.getloadavg()[0]:.1f})", flush=True)
            rows.append((shape, gran, {k: {f: statistics.median(r[f] for r in v) for f in ("extra_mib", "x_w",
                                                                                           "seconds", "cpu_s")}
                                       for k, v in got.items()}, got[sources[0][0]][0]["w_mib"]))
    print("\n| layer | grid | W MiB | " + " | ".join(f"{s}: extra MiB (x W) | wall s | CPU s" for s, _ in sources)
          + " |")
    print("|---|---|---:|" + "---:|---:|---:|" * len(sources))
    for shape, gran, med, w in rows:
        cells = " | ".join(f"{med[s]['extra_mib']:.0f} ({med[s]['x_w']:.1f}x) | {med[s]['seconds']:.1f} | "
                           f"{med[s]['cpu_s']:.1f}" for s, _ in sources)
        print(f"| {shape} | {gran} | {w:.0f} | {cells} |")


if __name__ == "__main__":
    main()
