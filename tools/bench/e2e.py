#!/usr/bin/env python
"""Quantize the shipped reference models with COMQ (default and official configurations) and round-to-nearest at
8/4/3/2 bits in one run; print top-1 accuracy on the held-out test set, file size and wall time as a markdown table.

    python tools/bench/e2e.py                       # both Fashion-MNIST models, all bit widths
    python tools/bench/e2e.py --models cnn --bits 4 3
    python tools/bench/e2e.py --models keras_cnn keras_vit paddle_cnn --bits 8 4 3 --methods COMQ RTN
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _recipes beside this file

from _recipes import keep_unverified, recipe  # noqa: E402

from onnxcomq import run  # noqa: E402

run = keep_unverified(run)
from onnxcomq.evaluate import top1_accuracy  # noqa: E402
from onnxcomq.graph.modelio import save_model  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
MODELS = {"cnn": "models/fmnist_cnn.onnx", "vit": "models/fmnist_vit.onnx",
          # exported by tools/export/foreign.py (tf2onnx opset 13, NHWC input; Paddle2ONNX opset 11)
          "keras_cnn": "models/fmnist_keras_cnn.onnx", "keras_vit": "models/fmnist_keras_vit.onnx",
          "paddle_cnn": "models/fmnist_paddle_cnn.onnx"}
NHWC = ("keras_cnn", "keras_vit")  # their input is the shipped NCHW arrays transposed
METHODS = {  # flat recipe options (tools/bench/_recipes.py)
    "COMQ": dict(),
    "COMQ official": dict(official=True),
    "RTN": dict(method="rtn"),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["cnn", "vit"], choices=list(MODELS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--bits", nargs="+", type=int, default=[8, 4, 3, 2])
    ap.add_argument("--calib", default="models/fmnist_calib.npz")
    ap.add_argument("--test", default="models/fmnist_test.npz")
    ap.add_argument("--max-samples", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    os.chdir(ROOT)
    print("| model | bits | method | top-1 % | drop (points) | size KB | x smaller | time s | mean layer err ratio "
          "vs RTN |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            path = MODELS[name]
            calib, test = (nhwc_copy(args.calib, tmp), nhwc_copy(args.test, tmp)) if name in NHWC \
                else (args.calib, args.test)
            acc_f, _ = top1_accuracy(path, test)
            size_f = os.path.getsize(path)
            print(f"| {name} | float | - | {100 * acc_f:.2f} | - | {size_f / 1e3:.0f} | 1.0 | - | - |")
            for bits in args.bits:
                for label in args.methods:
                    kw = METHODS[label]
                    cfg = recipe(bits=bits, device=args.device, max_samples=args.max_samples, **kw)
                    t = time.perf_counter()
                    model, rep = run(path, calib, cfg)
                    out = os.path.join(tmp, f"{name}.{bits}.onnx")
                    save_model(model, out)
                    dt = time.perf_counter() - t
                    acc, _ = top1_accuracy(out, test)
                    size = os.path.getsize(out)
                    ratios = [L.comq_error / L.rtn_error for L in rep.layers if L.rtn_error > 0]
                    print(f"| {name} | W{bits} | {label} | {100 * acc:.2f} | {100 * (acc_f - acc):+.2f} | "
                          f"{size / 1e3:.0f} | {size_f / size:.1f} | {dt:.1f} | "
                          f"{sum(ratios) / len(ratios):.3f} |", flush=True)


def nhwc_copy(path, folder):
    """The .npz at ``path`` with its 4-D arrays transposed NCHW -> NHWC, written into ``folder``."""
    out = os.path.join(folder, "nhwc_" + os.path.basename(path))
    if not os.path.exists(out):
        with np.load(path) as d:
            np.savez(out, **{k: np.ascontiguousarray(v.transpose(0, 2, 3, 1)) if v.ndim == 4 else v
                             for k, v in d.items()})
    return out


if __name__ == "__main__":
    main()
