#!/usr/bin/env python
"""Which damping strength does each layer need? Solve every layer with COMQ on the calibration statistics damped by
alpha (G + alpha * mean(diag G) * I) for a grid of alphas, and measure its error on statistics captured from
held-out data (other photos): the held-out relative error ||X_h (W - Q)^T||^2 / ||X_h W^T||^2 per layer and alpha,
and what damping "scaled" gives that layer. This is the measurement behind the default ``--damping scaled``.

    python tools/studies/damping.py out/effnet_lite0.onnx --calib out/effnet_calib.npz --held-out out/effnet_eval.npz

One pass on float inputs (no sequential capture), centered statistics (the free bias), the default solver at
``--bits``. Prints a markdown table: per layer its rows per input, the alpha "scaled" picks and its held-out error,
the best alpha of the grid, and each alpha's held-out error; errors are relative to the grid's best (1.000).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from onnxcomq import Recipe, Weights  # noqa: E402
from onnxcomq.capture.calib import Calibration, model_inputs  # noqa: E402
from onnxcomq.capture.passes import collect_stats  # noqa: E402
from onnxcomq.graph.layers import find_layers, load_weight  # noqa: E402
from onnxcomq.graph.modelio import prepare_model  # noqa: E402
from onnxcomq.precision import conv_taps  # noqa: E402
from onnxcomq.solve.comq import objective  # noqa: E402
from onnxcomq.solve.layer import damp, scaled_damping, solve_groups  # noqa: E402


def capture(model, layers, path, batch, samples):
    specs = {spec: L.groups for L in layers for _, spec in L.consumers}
    return collect_stats(model, specs, Calibration(path, model_inputs(model), batch_size=batch, max_samples=samples))


def solve(mats, grams, cfg):
    """COMQ weights per group, dispatched as the pipeline does (batched groups or one by one), float32."""
    _, comqs = solve_groups(np, mats, grams, grams, cfg, np.float32, comq=True, rtn=False)
    return [r.qweight for r in comqs]


def rel_error(mats, qs, grams) -> float:
    num = sum(objective(W, Q, G) for W, Q, G in zip(mats, qs, grams))
    return num / sum(objective(W, np.zeros_like(W), G) for W, G in zip(mats, grams))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--calib", required=True, help="calibration .npz (what the solve sees)")
    ap.add_argument("--held-out", required=True, help=".npz of held-out inputs (what the error is measured on)")
    ap.add_argument("--held-out-samples", type=int, default=128, help="held-out samples to capture (default: 128)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--alphas", default="0,0.03,0.1,0.3,1,3,10")
    ap.add_argument("--batch-size", type=int, default=32)
    a = ap.parse_args(argv)
    alphas = [float(v) for v in a.alphas.split(",")]
    model = prepare_model(a.model)
    layers, _ = find_layers(model)
    cal, n_cal = capture(model, layers, a.calib, a.batch_size, None)
    held, n_held = capture(model, layers, a.held_out, a.batch_size, a.held_out_samples)
    recipe = Recipe(weights=Weights(bits=a.bits))
    print(f"{a.model}: W{a.bits}, {n_cal} calibration samples, {n_held} held-out samples\n")
    print("| layer | shape | rows / input | scaled alpha | its error | best alpha | "
          + " | ".join(f"a={v:g}" for v in alphas) + " |")
    print("|---" * (6 + len(alphas)) + "|")
    for L in layers:
        if len(L.consumers) != 1:
            continue
        spec = L.consumers[0][1]
        mats = [m.astype(np.float32) for m in L.to_matrices(load_weight(model, L.weight))]
        gc = [cal[spec].centered(k) for k in range(L.groups)]
        gh = [held[spec].centered(k) for k in range(L.groups)]
        cfg = recipe.solver_config(taps=conv_taps(L))
        rows = cal[spec].rows
        reg = recipe.regularization
        scaled = scaled_damping(rows, spec.fan_in, reg.scale, reg.max)
        errs = []
        for alpha in alphas + [scaled]:
            damped = [st[0] for st in damp([(G, None, None) for G in gc], alpha)]
            errs.append(rel_error(mats, solve(mats, damped, cfg), gh))
        best = min(errs[:-1])
        print(f"| {L.node} | {'x'.join(map(str, L.weight_shape))} | {rows / spec.fan_in:.3g} | {scaled:.3g} | "
              f"{errs[-1] / best:.3f} | {alphas[int(np.argmin(errs[:-1]))]:g} | "
              + " | ".join(f"{e / best:.3f}" for e in errs[:-1]) + " |", flush=True)


if __name__ == "__main__":
    main()
