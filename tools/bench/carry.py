#!/usr/bin/env python
"""Group passes without and with carried tensors (capture/carry.py), measured in the same run: each group of layers
is captured twice, once by running the model from its inputs up to the group (what every group's pass did before)
and once from the tensors the earlier groups' passes stored; the capture seconds of each, and the largest relative
difference of the two passes' Grams (onnxruntime may fuse a cut-down graph differently: float32 rounding).

    python tools/bench/carry.py --model out/llm/tinyllama/optimum/model.onnx --text out/llm/tinyllama/calib.txt \\
        --tokenizer out/llm/tinyllama/optimum --groups 4 --samples 16
    python tools/bench/carry.py --model models/fmnist_vit.onnx --calib models/fmnist_calib.npz --groups 6

The groups are the layers cut in graph order into ``--groups`` parts of equal count (as ``--max-memory`` cuts a
decoder into about one block per group).

``--runs``: whole ``onnxcomq.run`` calls instead, W4 per channel: the default one pass, and sequential capture in
``--groups`` stages with full passes and with carried ones (``--repeats`` times each, interleaved; medians), the
time of sequential capture as a multiple of the one-pass run's:

    python tools/bench/carry.py --runs --model out/mem/effnet.onnx --calib out/mem/effnet_calib256.npz \
        --groups 16 --samples 64 --batch-size 32
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from onnxcomq.capture.calib import Calibration, model_inputs, resolve_mask_input  # noqa: E402
from onnxcomq.capture.carry import Carry  # noqa: E402
from onnxcomq.capture.memory import layer_specs, peak_rss_mb  # noqa: E402
from onnxcomq.capture.passes import capture, split_stages  # noqa: E402
from onnxcomq.capture.text import TextCalibration  # noqa: E402
from onnxcomq.graph.layers import find_layers  # noqa: E402
from onnxcomq.graph.modelio import prepare_model  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", help="an .npz of calibration inputs")
    ap.add_argument("--text", help="a .txt of calibration texts (with --tokenizer)")
    ap.add_argument("--tokenizer")
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--runs", action="store_true", help="whole runs: one pass, sequential full, sequential carried")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(ROOT, "out", "bench"))
    a = ap.parse_args(argv)
    if a.runs:
        return runs(a)
    model = prepare_model(a.model)
    layers = find_layers(model)[0]
    src = TextCalibration(a.text, a.tokenizer, model=model) if a.text else a.calib
    calib = Calibration(src, model_inputs(model), batch_size=a.batch_size, max_samples=a.samples, model=model)
    feeds = list(calib)
    mask = resolve_mask_input(model, None)
    groups = split_stages(layers, a.groups)
    carry = Carry.for_groups(model, [layer_specs(g) for g in groups])
    rows = []
    try:
        for g, group in enumerate(groups):
            specs = layer_specs(group)
            t0 = time.perf_counter()
            full, _ = capture(model, None, specs, feeds, mask_input=mask)
            t1 = time.perf_counter()
            carried, _ = capture(model, None, specs, feeds, mask_input=mask, carry=carry, group=g)
            t2 = time.perf_counter()
            diff = max(_rel(carried[s].part().x.G, full[s].part().x.G) for s in specs)
            rows.append({"group": g, "layers": len(group), "stored_inputs": len(carry.inputs[g]),
                         "prefix_s": round(t1 - t0, 2), "carried_s": round(t2 - t1, 2), "max_rel_gram_diff": diff})
            print(f"group {g}: {len(group)} layers, prefix {t1 - t0:.2f} s, carried {t2 - t1:.2f} s, "
                  f"Gram difference {diff:.1e}", flush=True)
            del full, carried
    finally:
        carry.close()
    tp, tc = sum(r["prefix_s"] for r in rows), sum(r["carried_s"] for r in rows)
    name = os.path.splitext(os.path.basename(a.model))[0]
    lines = [f"# Group passes: {a.model}, {len(groups)} groups, {len(feeds)} batches", "",
             "| group | layers | stored inputs | prefix s | carried s | max rel Gram diff |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['group']} | {r['layers']} | {r['stored_inputs']} | {r['prefix_s']:.2f} | {r['carried_s']:.2f} | "
              f"{r['max_rel_gram_diff']:.1e} |" for r in rows]
    lines += [f"| all | {len(layers)} | | {tp:.2f} | {tc:.2f} ({tp / tc:.2f}x faster) | |", "",
              f"peak RSS of the whole run: {peak_rss_mb() / 1024:.2f} GiB"]
    os.makedirs(a.out, exist_ok=True)
    stem = os.path.join(a.out, f"carry_{name}_{len(groups)}")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(stem + ".json", "w") as f:
        json.dump({"model": a.model, "groups": rows, "prefix_s": tp, "carried_s": tc}, f, indent=1)
    print("\n".join(lines))
    return 0


def _rel(a, b) -> float:
    """The largest difference of a and b relative to b's largest magnitude."""
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def runs(a) -> int:
    """Whole runs, interleaved: the one-pass default, sequential with full passes, sequential carried."""
    from onnxcomq import Recipe
    from onnxcomq import pipeline as pl

    base = Recipe().updated({"weights": {"bits": 4}, "data": {"batch_size": a.batch_size, "max_samples": a.samples}})
    seq = base.updated({"sequential": {"stages": a.groups}})
    plain = Carry.for_groups
    variants = [("one pass", base, True), ("sequential, full passes", seq, False), ("sequential, carried", seq, True)]
    times = {v[0]: [] for v in variants}
    models = {}
    for _ in range(a.repeats):
        for label, recipe, carried in variants:
            pl.Carry.for_groups = plain if carried else classmethod(lambda cls, *x, **k: None)
            try:
                t0 = time.perf_counter()
                q, rep = pl.run(a.model, a.calib, recipe)
                times[label].append((time.perf_counter() - t0, rep.capture_seconds))
            finally:
                pl.Carry.for_groups = plain
            models[label] = q.SerializeToString()
            print(f"{label}: {times[label][-1][0]:.1f} s (capture {times[label][-1][1]:.1f} s)", flush=True)
    same = models["sequential, full passes"] == models["sequential, carried"]
    one = float(np.median([t for t, _ in times["one pass"]]))
    lines = [f"# Sequential capture with carried passes: {a.model}, {a.groups} stages, {a.samples} samples, "
             f"W4 per channel, median of {a.repeats}", "", "| run | total s | capture s | x one pass |",
             "|---|---|---|---|"]
    for label, _, _ in variants:
        t = float(np.median([x for x, _ in times[label]]))
        c = float(np.median([x for _, x in times[label]]))
        lines.append(f"| {label} | {t:.1f} | {c:.1f} | {t / one:.2f} |")
    lines += ["", f"sequential models with full and with carried passes byte-identical: {same}"]
    os.makedirs(a.out, exist_ok=True)
    stem = os.path.join(a.out, f"carry_runs_{os.path.splitext(os.path.basename(a.model))[0]}_{a.groups}")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(stem + ".json", "w") as f:
        json.dump({"model": a.model, "stages": a.groups, "times": times, "byte_identical": same}, f, indent=1)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
