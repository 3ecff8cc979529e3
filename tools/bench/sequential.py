#!/usr/bin/env python
"""Accuracy and time of onnxcomq configurations on the real models, in one run, as a markdown table.

Each --variant is ``label:field=value,field=value`` over the flat option names (those of the configuration before
recipes had sections, mapped to the recipe's sections by tools/bench/_recipes.py; ``section.field`` names any recipe
field; values are Python literals), so the same script measures sequential capture (stages: a field of the
sequential section turns it on), the damping choice, and sweeps / scale updates:

    python tools/bench/sequential.py --model effnet --bits 4 \\
        --variant 'one-pass:sequential=False' --variant 'seq4:stages=4' --variant 'seq8:stages=8'
    python tools/bench/sequential.py --model minilm --bits 4 3 --variant 'fixed0.1:damping=0.1' --variant auto:
    python tools/bench/sequential.py --model cnn vit --bits 3 --variant 's1:sweeps=1,scale_update=False'

Models: effnet (out/effnet_lite0.onnx; top-1 agreement and mean KL vs float on out/effnet_eval.npz), minilm
(out/minilm.onnx; mean cosine of sentence embeddings to float on out/minilm_eval.npz), cnn / vit (the shipped
Fashion-MNIST models; top-1 % on models/fmnist_test.npz). Times are the wall time of onnxcomq.run (load, capture,
solve, emit) and its capture / solve parts; the CPU may be shared, so compare rows of one run.

Differences of a few hundredths of KL on EfficientNet-Lite0 are within the spread between calibration sets. To see
that spread, quantize with several sets of 64 crops (the first 64 of these 256 are out/effnet_calib.npz) and report
each metric's mean and standard deviation over them:

    python tools/export/efficientnet.py --skip-model --calib-crops 256 --calib-out out/effnet_calib256.npz \
        --eval-out /tmp/eval.npz --manifest-out /tmp/photos.json
    python tools/bench/sequential.py --model effnet --calib out/effnet_calib256.npz --calib-split 4 \
        --variant default: --variant 'k1:lambda_solves=1'
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))
sys.path.insert(0, HERE)

from _recipes import keep_unverified, parse_items, recipe  # noqa: E402

from onnxcomq import run  # noqa: E402

run = keep_unverified(run)

ROOT = os.path.join(HERE, "..", "..")
MODELS = {
    "effnet": ("out/effnet_lite0.onnx", "out/effnet_calib.npz"),
    "minilm": ("out/minilm.onnx", "out/minilm_calib.npz"),
    "cnn": ("models/fmnist_cnn.onnx", "models/fmnist_calib.npz"),
    "vit": ("models/fmnist_vit.onnx", "models/fmnist_calib.npz"),
}


def parse_variant(text: str):
    label, _, rest = text.partition(":")
    return label, parse_items(rest)


class Evaluator:
    """The float model's reference outputs once, then a metric string for each quantized model."""

    def __init__(self, name: str, path: str, limit: int | None = None):
        self.name = name
        if name == "effnet":
            import eval_imagenet_agreement as ev
            self.ev = ev
            self.x = ev.load_eval("out/effnet_eval.npz", None)[:limit]
            self.ref = ev.logits(ev.session(path), self.x, 32)
        elif name == "minilm":
            import eval_minilm as ev
            self.ev = ev
            self.a, self.b = ev.load_eval("out/minilm_eval.npz")
            self.ref = ev.evaluate(ev.session(path), self.a, self.b, None, 32)
        else:
            from onnxcomq.evaluate import top1_accuracy
            self.top1 = top1_accuracy
            self.ref = top1_accuracy(path, "models/fmnist_test.npz")[0]

    def header(self) -> str:
        return {"effnet": "agreement | mean KL", "minilm": "cosine mean | cosine min"}.get(self.name,
                                                                                          "top-1 % | drop points")

    def __call__(self, model) -> tuple:
        """The two metrics of the header."""
        if self.name == "effnet":
            r = self.ev.compare(self.ref, self.ev.logits(self.ev.session(model), self.x, 32), 0.5)
            return r["agree"], r["kl"]
        if self.name == "minilm":
            r = self.ev.evaluate(self.ev.session(model), self.a, self.b, self.ref, 32)
            return r["cos_mean"], r["cos_min"]
        import tempfile

        from onnxcomq.graph.modelio import save_model
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "q.onnx")
            save_model(model, out)
            acc = self.top1(out, "models/fmnist_test.npz")[0]
        return 100 * acc, 100 * (self.ref - acc)


def fmt_metrics(values: list) -> str:
    """One set: the two metrics; several: mean +- standard deviation of each, then the values per set."""
    v = np.array(values)
    if len(v) == 1:
        return f"{v[0, 0]:.4f} | {v[0, 1]:.4f}"
    cols = [f"{v[:, j].mean():.4f} ± {v[:, j].std(ddof=1):.4f} ({', '.join(f'{x:.4f}' for x in v[:, j])})"
            for j in range(2)]
    return " | ".join(cols)


def calib_sets(path: str, split: int) -> list:
    """The calibration source, or its arrays cut into ``split`` consecutive equal sets (dicts of arrays)."""
    if split <= 1:
        return [path]
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    n = min(len(a) for a in arrays.values()) // split
    if n < 1:
        raise SystemExit(f"{path}: fewer samples than --calib-split {split}")
    return [{k: a[i * n:(i + 1) * n] for k, a in arrays.items()} for i in range(split)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", default=["effnet"], choices=list(MODELS))
    ap.add_argument("--bits", nargs="+", type=int, default=[4])
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL:FIELD=VALUE,...",
                    help="a configuration to measure (repeatable); 'default:' is Recipe() at --bits")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--limit", type=int, default=None, help="effnet: evaluate on the first LIMIT crops only")
    ap.add_argument("--calib", default=None, help="calibration .npz instead of the model's default")
    ap.add_argument("--calib-split", type=int, default=1, metavar="K",
                    help="cut the calibration set into K consecutive equal sets, quantize with each, and report "
                         "mean +- standard deviation (and each set's value); times are the mean")
    ap.add_argument("--reuse-capture", action="store_true",
                    help="capture the one-pass statistics once per model and reuse them for every variant (for "
                         "solver-only variants such as sweeps; sequential stages are captured as usual); the "
                         "capture time is then only counted in the first row")
    args = ap.parse_args(argv)
    if args.reuse_capture and args.calib_split > 1:
        ap.error("--reuse-capture reuses one calibration set's statistics: it cannot go with --calib-split")
    os.chdir(ROOT)
    variants = [parse_variant(v) for v in (args.variant or ["default:"])]
    for label, kw in variants:  # a wrong name fails now, not after the first variants' runs
        try:
            recipe(**{"bits": args.bits[0], "device": args.device, **kw}).validate()
        except Exception as e:  # noqa: BLE001 - ValueError (names) or onnxcomq.UserError (values)
            ap.error(f"--variant {label}: {e}")
    for name in args.model:
        path, calib = MODELS[name]
        sets = calib_sets(args.calib or calib, args.calib_split)
        ev = Evaluator(name, path, args.limit)
        # --reuse-capture: the float model's one-pass statistics, captured by the first run, reused by the others
        cache = {} if args.reuse_capture else None
        print(f"\n{name}\n\n| bits | variant | {ev.header()} | total s | capture s | solve s | damped layers "
              f"(alphas) |\n|---|---|---|---|---|---|---|---|")
        for bits in args.bits:
            for label, kw in variants:
                cfg = recipe(**{"bits": bits, "device": args.device, **kw})
                metrics, times = [], []
                for source in sets:
                    t = time.perf_counter()
                    model, rep = run(path, source, cfg, stats_cache=cache)
                    times.append((time.perf_counter() - t, rep.capture_seconds, rep.solve_seconds))
                    metrics.append(ev(model))
                    del model
                dt, cap, sol = np.mean(times, axis=0)
                damped = [L.damping for L in rep.layers if L.damped]  # (the last set's)
                alphas = ", ".join(f"{a:g}x{damped.count(a)}" for a in sorted(set(damped)))
                print(f"| W{bits} | {label} | {fmt_metrics(metrics)} | {dt:.1f} | {cap:.1f} | {sol:.1f} | "
                      f"{len(damped)} ({alphas}) |", flush=True)
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
