#!/usr/bin/env python
"""Deployment benchmark: latency in onnxruntime CPU and accuracy of the float model, onnxruntime's own static
quantization (QDQ, per-channel, same calibration data, after onnxruntime's preprocess step) and onnxcomq W8A8 / W4A8
(``--act-bits 8 --target ort``), in one run; prints a markdown table.

    python tools/bench/deploy.py                          # Fashion-MNIST CNN and ViT (top-1 on models/fmnist_test.npz)
    python tools/bench/deploy.py --models cnn --threads 1 --rounds 15
    python tools/bench/deploy.py --real                   # also EfficientNet-Lite0 (top-1 agreement with float) and
                                                          # MiniLM (mean cosine to float embeddings), from out/
    python tools/bench/deploy.py --int8-weights           # also the W8A8 model with int8 weights (U8S8 kernels)
                                                          # and W7A8 (int8 weights that cannot saturate)

onnxcomq's W8A8 models for onnxruntime store 8-bit weights as uint8 (zero point 128): onnxruntime's U8S8 kernels
saturate on x86 CPUs without VNNI. ``--int8-weights`` adds the same model with its weights as int8 (zero point 0,
the same dequantized values), as onnxcomq wrote them before, to measure that on the machine at hand, and W7A8
(``--bits 7``: int8 weights of at most 64 in magnitude, which the U8S8 kernels cannot saturate).

Latency: sessions with ORT_ENABLE_ALL, ``--threads`` intra-op threads and 1 inter-op thread; batch 1 and 8; for
each round every model runs ``--calls`` times in turn (interleaved, so load changes hit all alike), timed by the
process CPU time (``--clock wall``: elapsed time, which on a shared machine mostly measures waiting); the table shows
the median over rounds of the mean call time, and the ratio to quantize_static's in the same run (the order of
the models rotates from round to round).
Tools only: needs onnxruntime's quantization package (part of the onnxruntime wheel).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnxruntime as ort

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the evaluators beside this file

from _recipes import keep_unverified, recipe  # noqa: E402

from onnxcomq import run  # noqa: E402

run = keep_unverified(run)
from onnxcomq.graph.modelio import save_model  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
FMNIST = {"cnn": "models/fmnist_cnn.onnx", "vit": "models/fmnist_vit.onnx"}
REAL = {"effnet": ("out/effnet_lite0.onnx", "out/effnet_calib.npz", "out/effnet_eval.npz"),
        "minilm": ("out/minilm.onnx", "out/minilm_calib.npz", "out/minilm_eval.npz")}
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
VARIANTS = {"W8A8 onnxcomq": dict(bits=8), "W4A8 onnxcomq": dict(bits=4)}  # flat recipe options (_recipes.py)


def quantize_static_qdq(src: str, dst: str, calib: dict, batch: int = 32, **kw) -> None:
    """onnxruntime's preprocess, then quantize_static (QDQ, per-channel) with the calibration arrays."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    pre = dst + ".pre.onnx"
    cmd = [sys.executable, "-m", "onnxruntime.quantization.preprocess", "--input", os.path.abspath(src),
           "--output", os.path.abspath(pre)]
    where = os.path.dirname(os.path.abspath(dst))  # it leaves temporary files in its working directory
    if subprocess.run(cmd, capture_output=True, cwd=where).returncode:  # (MiniLM: incomplete symbolic shapes)
        print(f"<!-- {src}: preprocess failed; retried with --skip_symbolic_shape True -->", flush=True)
        subprocess.run(cmd + ["--skip_symbolic_shape", "True"], check=True, capture_output=True, cwd=where)
    n = next(iter(calib.values())).shape[0]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{k: v[i:i + batch] for k, v in calib.items()} for i in range(0, n, batch)])

        def get_next(self):
            return next(self.it, None)

    quantize_static(pre, dst, Reader(), quant_format=QuantFormat.QDQ, per_channel=True, **kw)


def session(path: str, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def latencies(paths: dict, feeds: dict, threads: int, rounds: int, calls: int, clock=time.process_time) -> dict:
    """{(label, batch): median over rounds of the mean call time in ms}, models interleaved within each round."""
    sess = {k: session(p, threads) for k, p in paths.items()}
    times = {(k, b): [] for k in sess for b in feeds}
    for b, feed in feeds.items():
        for s in sess.values():  # warm-up
            for _ in range(3):
                s.run(None, feed)
        keys = list(sess)
        for r in range(rounds):
            for k in keys[r % len(keys):] + keys[:r % len(keys)]:  # a different model first each round
                s = sess[k]
                t = clock()
                for _ in range(calls):
                    s.run(None, feed)
                times[(k, b)].append((clock() - t) / calls * 1e3)
    return {k: float(np.median(v)) for k, v in times.items()}


def top1(path: str, data: dict) -> float:
    s = session(path, 2)
    name = s.get_inputs()[0].name
    preds = np.concatenate([s.run(None, {name: data[name][i:i + 256]})[0].argmax(-1)
                            for i in range(0, len(data["labels"]), 256)])
    return float(np.mean(preds == data["labels"]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=list(FMNIST), choices=list(FMNIST))
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads of every session (default: 1)")
    ap.add_argument("--rounds", type=int, default=11, help="interleaved timing rounds (default: 11)")
    ap.add_argument("--calls", type=int, default=20, help="calls per model per round (default: 20)")
    ap.add_argument("--act-method", default="minmax", help="onnxcomq --act-method (default: minmax)")
    ap.add_argument("--act-aware", action="store_true", help="onnxcomq --act-aware")
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                    help="cpu: CPU time of this process (excludes waiting for a core on a shared machine; the "
                         "sessions compute on the calling thread with --threads 1), wall: elapsed time "
                         "(default: cpu)")
    ap.add_argument("--real", action="store_true", help="also EfficientNet-Lite0 and MiniLM (out/*.onnx)")
    ap.add_argument("--real-models", nargs="+", default=list(REAL), choices=list(REAL),
                    help="which real models with --real (default: both)")
    ap.add_argument("--int8-weights", action="store_true",
                    help="also the W8A8 model with its uint8 weights stored as int8 (onnxruntime's U8S8 kernels), "
                         "and W7A8")
    ap.add_argument("--keep", metavar="DIR", help="keep the quantized models in DIR")
    args = ap.parse_args(argv)
    os.chdir(ROOT)
    print("| model | variant | accuracy | drop (points) | bs1 ms | bs8 ms | bs1 / qs | bs8 / qs | quantize s |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = args.keep or tmp
        os.makedirs(out_dir, exist_ok=True)
        for name in args.models:
            src = FMNIST[name]
            calib = dict(np.load("models/fmnist_calib.npz"))
            test = dict(np.load("models/fmnist_test.npz"))
            paths, secs = _build(name, src, calib, out_dir, args)
            accs = {k: top1(p, test) for k, p in paths.items()}
            feeds = {b: {"input": test["input"][:b]} for b in (1, 8)}
            lat = latencies(paths, feeds, args.threads, args.rounds, args.calls, CLOCKS[args.clock])
            _rows(name, paths, accs, lat, secs, scale=100, unit="%")
        if args.real:
            _real(out_dir, args)


def _build(name, src, calib, out_dir, args, config_kw=None):
    paths = {"float": src}
    secs = {"float": 0.0}
    t = time.perf_counter()
    qs = os.path.join(out_dir, f"{name}.qs.onnx")
    quantize_static_qdq(src, qs, calib)
    secs["ort quantize_static"] = time.perf_counter() - t
    paths["ort quantize_static"] = qs
    variants = dict(VARIANTS, **({"W7A8 onnxcomq": dict(bits=7)} if args.int8_weights else {}))
    for label, kw in variants.items():
        t = time.perf_counter()
        cfg = recipe(act_bits=8, target="ort", act_method=args.act_method, act_aware=args.act_aware,
                     device="cpu", **kw, **(config_kw or {}))
        model, _ = run(src, calib, cfg)
        p = os.path.join(out_dir, f"{name}.{label.split()[0]}.onnx")
        save_model(model, p)
        secs[label] = time.perf_counter() - t
        paths[label] = p
        if args.int8_weights and kw.get("bits") == 8:
            signed = os.path.join(out_dir, f"{name}.{label.split()[0]}.int8w.onnx")
            save_model(int8_weights(model), signed)
            paths[label + ", int8 weights"], secs[label + ", int8 weights"] = signed, secs[label]
    return paths, secs


def int8_weights(model):
    """The model with every uint8 weight of zero point 128 (onnxcomq's W8A8 for onnxruntime) stored as int8 with zero
    point 0: the same dequantized weights, read by onnxruntime's U8S8 kernels instead of U8U8."""
    import onnx
    from onnx import numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    for n in out.graph.node:
        if n.op_type != "DequantizeLinear" or len(n.input) < 3 or n.input[0] not in inits or n.input[2] not in inits:
            continue
        codes, zp = numpy_helper.to_array(inits[n.input[0]]), numpy_helper.to_array(inits[n.input[2]])
        if codes.dtype != np.uint8 or codes.ndim < 2 or not np.all(zp == 128):
            continue
        inits[n.input[0]].CopyFrom(numpy_helper.from_array((codes.astype(np.int16) - 128).astype(np.int8),
                                                           n.input[0]))
        inits[n.input[2]].CopyFrom(numpy_helper.from_array(np.zeros(zp.shape, np.int8), n.input[2]))
    return out


def _rows(name, paths, accs, lat, secs, scale, unit, higher="better"):
    ref = "ort quantize_static"
    for k in paths:
        drop = "-" if k == "float" else f"{scale * (accs['float'] - accs[k]):+.{2 if unit == '%' else 4}f}"
        acc = f"{scale * accs[k]:.2f} {unit}" if unit == "%" else f"{accs[k]:.4f}"
        r1 = lat.get((k, 1), float("nan")) / lat.get((ref, 1), float("nan"))
        r8 = lat.get((k, 8), float("nan")) / lat.get((ref, 8), float("nan"))
        print(f"| {name} | {k} | {acc} | {drop} | {lat.get((k, 1), float('nan')):.3f} | "
              f"{lat.get((k, 8), float('nan')):.3f} | {r1:.2f} | {r8:.2f} | "
              f"{'-' if k == 'float' else f'{secs[k]:.1f}'} |", flush=True)


def _real(out_dir, args):
    """EfficientNet-Lite0: top-1 agreement with float on the eval crops; MiniLM: mean cosine to float embeddings."""
    import eval_imagenet_agreement as ei
    import eval_minilm as em

    for name in args.real_models:
        src, calib_path, eval_path = REAL[name]
        if not os.path.exists(src):
            print(f"| {name} | (missing {src}: build it with tools/export/*.py) | | | | | | | |")
            continue
        calib = dict(np.load(calib_path))
        paths, secs = _build(name, src, calib, out_dir, args)
        if name == "effnet":
            x = ei.load_eval(eval_path, "input")
            ref = ei.logits(ei.session(src, 2), x, 32)
            accs = {k: ei.compare(ref, ei.logits(ei.session(p, 2), x, 32), 0.5)["agree"] for k, p in paths.items()}
            feeds = {b: {"input": x[:b]} for b in (1, 8)}
            unit = "%"
        else:
            a, b = em.load_eval(eval_path)
            ref = em.evaluate(em.session(src, 2), a, b, None, 32)
            accs = {k: em.evaluate(em.session(p, 2), a, b, ref, 32).get("cos_mean", 1.0) for k, p in paths.items()}
            feeds = {n: {k: v[:n] for k, v in a.items()} for n in (1, 8)}
            unit = "cos"
        lat = latencies(paths, feeds, args.threads, max(3, args.rounds // 3), max(2, args.calls // 10),
                        CLOCKS[args.clock])
        _rows(name, paths, accs, lat, secs, scale=100 if unit == "%" else 1, unit=unit)


if __name__ == "__main__":
    main()
