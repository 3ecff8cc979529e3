#!/usr/bin/env python
"""Wall time of one ``onnxcomq quantize`` run with the layer solves in process, in ``--workers local:N`` processes
and on a local Ray cluster of N CPUs (``--workers ray``), and whether the outputs are the same bytes.

Each figure is a fresh CLI process (``--device cpu --quiet --report``), median of --repeats, the modes alternating;
capture and solve seconds come from the report. The Ray cluster is started once beforehand (``ray start --head
--num-cpus N``) and stopped at the end: its start-up is not in the ``ray`` row; the ``ray (own cluster)`` row is a
run that starts and stops a local cluster itself (``--workers ray`` with no cluster running). The ``1 BLAS thread``
row is the in-process run with OMP/OpenBLAS/MKL_NUM_THREADS=1, as each of 2 workers on 2 cores gets: it separates
the gain of solving in parallel from that of BLAS threads that contend less.

    python tools/bench/workers.py                           # out/mem/effnet.onnx (else the Fashion-MNIST ViT), W4
    python tools/bench/workers.py --model models/fmnist_vit.onnx --calib models/fmnist_calib.npz --repeats 3

Everything generated goes to --work-dir (default out/bench, git-ignored).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.join(HERE, "..", ".."))

from speed_memory import ROOT, fmt, load1, measure_comq, med, source_fingerprint  # noqa: E402 (sets path)

from onnxcomq.workers import THREAD_VARS  # noqa: E402

PY = sys.executable
RAY = os.path.join(os.path.dirname(PY), "ray")


def digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    effnet = os.path.isfile(os.path.join(ROOT, "out/mem/effnet.onnx"))
    ap.add_argument("--model", default="out/mem/effnet.onnx" if effnet else "models/fmnist_vit.onnx")
    ap.add_argument("--calib", default="out/mem/effnet_calib256.npz" if effnet else "models/fmnist_calib.npz")
    ap.add_argument("--max-samples", type=int, default=64)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2, help="N of local:N and of the Ray cluster's CPUs (default: 2)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--work-dir", default="out/bench")
    a = ap.parse_args(argv)
    work = os.path.join(ROOT, a.work_dir)
    os.makedirs(work, exist_ok=True)
    n = a.workers
    modes = [("in process", None), ("in process, 1 BLAS thread", "1-thread"), (f"local:{n}", f"local:{n}")]
    if not a.skip_ray:
        modes += [(f"ray ({n} CPUs)", "ray"), ("ray (own cluster)", "ray-own")]
    source = source_fingerprint()
    print(f"{a.model}, {a.max_samples} samples, W{a.bits}; {os.cpu_count()} cores, load {load1():.2f}; onnxcomq "
          f"source {source} ({ROOT})", flush=True)
    ray_up = False
    runs: dict = {label: [] for label, _ in modes}
    digests: dict = {}
    try:
        for r in range(a.repeats):
            for label, w in modes:
                if w == "ray" and not ray_up:  # (its workers import onnxcomq from ROOT, as the runs do)
                    subprocess.run([RAY, "start", "--head", f"--num-cpus={n}", "--include-dashboard=false",
                                    "--disable-usage-stats"], check=True, capture_output=True, env=dict(
                                    os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")))
                    ray_up = True
                if w == "ray-own" and ray_up:  # (a run that starts its own cluster: none may be running)
                    subprocess.run([RAY, "stop"], check=True, capture_output=True)
                    ray_up = False
                out = os.path.join(work, f"workers_{len(digests)}.onnx")
                rep = out + ".json"
                cmd = [PY, "-m", "onnxcomq.cli", "quantize", a.model, "-o", out, "--calib", a.calib, "--max-samples",
                       str(a.max_samples), "--bits", str(a.bits), "--device", "cpu", "--quiet", "--report", rep]
                if w not in (None, "1-thread"):
                    cmd += ["--workers", "ray" if w == "ray-own" else w]
                threads = {k: os.environ.get(k) for k in THREAD_VARS}
                if w == "1-thread":
                    os.environ.update({k: "1" for k in THREAD_VARS})
                try:
                    res = measure_comq(cmd, f"{label} #{r + 1}", rep)
                finally:
                    for k, v in threads.items():
                        if v is None:
                            os.environ.pop(k, None)
                        else:
                            os.environ[k] = v
                runs[label].append(res)
                digests.setdefault(label, set()).add(digest(out))
    finally:
        if ray_up:
            subprocess.run([RAY, "stop"], capture_output=True)
    base = med([x["wall"] for x in runs["in process"]])
    ref = digests["in process"]
    print("\n| mode | wall s | capture s | solve s | wall vs in process | same bytes |\n|---|---:|---:|---:|---:|---|")
    for label, _ in modes:
        xs = runs[label]
        wall = med([x["wall"] for x in xs])
        cap = med([x["report"]["capture_seconds"] for x in xs])
        solve = med([x["report"]["solve_seconds"] for x in xs])
        print(f"| {label} | {fmt(wall)} | {fmt(cap)} | {fmt(solve)} | {base / wall:.2f}x | "
              f"{'yes' if digests[label] == ref and len(ref) == 1 else 'NO'} |")
    print(f"\nload average at the end: {os.getloadavg()}")
    if source_fingerprint() != source:
        print(f"WARNING: the onnxcomq source changed during the benchmark ({source} -> {source_fingerprint()}): "
              "the figures mix two versions (run it on a copy of the repository)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
