#!/usr/bin/env python
"""How closely quantized ImageNet classifiers follow their float model, without labels.

On the crops of an evaluation .npz (tools/export/efficientnet.py writes out/effnet_eval.npz) it compares each
quantized model's softmax with the float model's:

    agreement all        share of crops where the quantized top-1 class equals the float top-1 class
    agreement confident  the same on the crops where the float model's top-1 probability is >= --confident (0.5)
    mean KL              mean over crops of KL(p_float || p_quant) in nats (softmax in float64)

Compare models that exist:

    python tools/bench/eval_imagenet_agreement.py --float out/effnet_lite0.onnx --eval out/effnet_eval.npz \\
        out/effnet_lite0.w4.onnx out/other.onnx

Quantize and compare in one run (COMQ with onnxcomq's default recipe and round-to-nearest on the same
per-channel grid, at 8, 4 and 3 bits, each timed; --save-dir keeps the quantized models):

    python tools/bench/eval_imagenet_agreement.py --quantize --float out/effnet_lite0.onnx \\
        --calib out/effnet_calib.npz --eval out/effnet_eval.npz --save-dir out/effnet_q

Every quantized model is checked with onnx.checker (full_check) and must load in onnxruntime; a configuration whose
quantization or check fails is reported with its traceback and the others go on (exit status 1 at the end).
Prints a markdown table. Needs numpy, onnx, onnxruntime and, for --quantize, the onnxcomq package.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import numpy as np

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def load_eval(path: str, key: str | None) -> np.ndarray:
    with np.load(path, allow_pickle=False) as z:
        k = key or ("input" if "input" in z.files else z.files[0])
        return np.ascontiguousarray(z[k], dtype=np.float32)


def session(model, threads: int = 0):
    """onnxruntime CPU session from a path or a ModelProto (serialized in memory)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    src = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def logits(sess, x: np.ndarray, batch: int) -> np.ndarray:
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def compare(ref_logits: np.ndarray, q_logits: np.ndarray, confident: float) -> dict:
    lp, lq = log_softmax(ref_logits), log_softmax(q_logits)
    p = np.exp(lp)
    agree = ref_logits.argmax(1) == q_logits.argmax(1)
    conf = p.max(1) >= confident
    kl = (p * (lp - lq)).sum(1)
    return {"n": len(agree), "agree": float(agree.mean()), "n_conf": int(conf.sum()),
            "agree_conf": float(agree[conf].mean()) if conf.any() else float("nan"), "kl": float(kl.mean()),
            "kl_median": float(np.median(kl))}


def check_model(model) -> None:
    """onnx.checker with full_check (shape inference too) on a ModelProto or path."""
    import onnx

    onnx.checker.check_model(model if isinstance(model, str) else model, full_check=True)


def fmt_pct(v: float, n: int) -> str:
    return f"{100 * v:.1f}% ({round(v * n)}/{n})" if n else "n/a"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("quantized", nargs="*", help="quantized ONNX models to compare (without --quantize)")
    ap.add_argument("--float", dest="float_model", default=os.path.join("out", "effnet_lite0.onnx"),
                    help="float ONNX model (default: out/effnet_lite0.onnx)")
    ap.add_argument("--eval", default=os.path.join("out", "effnet_eval.npz"),
                    help="evaluation .npz (default: out/effnet_eval.npz)")
    ap.add_argument("--key", default=None, help="array in the evaluation .npz (default: input, else the first)")
    ap.add_argument("--confident", type=float, default=0.5, help="float top-1 probability threshold (0.5)")
    ap.add_argument("--batch", type=int, default=32, help="inference batch size (default: 32)")
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    q = ap.add_argument_group("--quantize mode")
    q.add_argument("--quantize", action="store_true", help="quantize --float with COMQ and RTN at --bits first")
    q.add_argument("--calib", default=os.path.join("out", "effnet_calib.npz"),
                   help="calibration .npz (default: out/effnet_calib.npz)")
    q.add_argument("--bits", type=int, nargs="+", default=[8, 4, 3], help="bit widths (default: 8 4 3)")
    q.add_argument("--methods", nargs="+", default=["comq", "rtn"], choices=["comq", "rtn"])
    q.add_argument("--device", default="cpu", choices=["auto", "cpu", "gpu"], help="onnxcomq device (cpu)")
    q.add_argument("--save-dir", default=None, help="write each quantized model there as <stem>.<method>.w<bits>.onnx")
    a = ap.parse_args(argv)
    if not a.quantize and not a.quantized:
        ap.error("give quantized models to compare, or --quantize")

    x = load_eval(a.eval, a.key)
    t0 = time.perf_counter()
    ref = logits(session(a.float_model, a.threads), x, a.batch)
    p_ref = np.exp(log_softmax(ref))
    print(f"float {a.float_model}: {len(x)} crops from {a.eval}; {time.perf_counter() - t0:.1f} s; float top-1 "
          f"probability mean {p_ref.max(1).mean():.3f}, {int((p_ref.max(1) >= a.confident).sum())} crops >= "
          f"{a.confident}; {len(np.unique(ref.argmax(1)))} distinct float top-1 classes", flush=True)

    rows, failures = [], []
    if not a.quantize:
        for path in a.quantized:
            try:
                check_model(path)
                r = compare(ref, logits(session(path, a.threads), x, a.batch), a.confident)
            except Exception as e:  # noqa: BLE001 - report and go on
                failures.append((path, e, traceback.format_exc()))
                continue
            rows.append((os.path.basename(path), r))
        print()
        print(f"| model | agreement all | agreement confident (float p >= {a.confident}) | mean KL(float‖quant) |")
        print("|---|---|---|---|")
        for name, r in rows:
            print(f"| {name} | {fmt_pct(r['agree'], r['n'])} | {fmt_pct(r['agree_conf'], r['n_conf'])} | "
                  f"{r['kl']:.4f} |")
    else:
        import onnx

        try:
            import onnxcomq
        except ImportError:  # not installed: this checkout's package
            sys.path.insert(0, ROOT)
            import onnxcomq
        from _recipes import keep_unverified

        from onnxcomq import Recipe, run
        run = keep_unverified(run)

        print(f"onnxcomq {getattr(onnxcomq, '__version__', '?')} from {os.path.dirname(onnxcomq.__file__)}; "
              f"recipe {json.dumps(Recipe().to_dict())}", flush=True)

        stem = os.path.splitext(os.path.basename(a.float_model))[0]
        if a.save_dir:
            os.makedirs(a.save_dir, exist_ok=True)
        for bits in a.bits:
            for method in a.methods:
                tag = f"{method} w{bits}"
                # the default recipe (per-channel asym) at these bits, COMQ or round-to-nearest on its grid
                cfg = Recipe().updated({"weights": {"bits": bits, "method": method}, "solver": {"device": a.device}})
                stage = "onnxcomq.run"
                try:
                    t0 = time.perf_counter()
                    model, report = run(a.float_model, a.calib, cfg)
                    secs = time.perf_counter() - t0
                    stage = "onnx.checker"
                    check_model(model)
                    if a.save_dir:
                        path = os.path.join(a.save_dir, f"{stem}.{method}.w{bits}.onnx")
                        onnx.save(model, path)
                    stage = "onnxruntime"
                    ql = logits(session(model, a.threads), x, a.batch)
                except Exception as e:  # noqa: BLE001 - report and go on
                    failures.append((f"{tag} at {stage}", e, traceback.format_exc()))
                    print(f"{tag}: FAILED at {stage} ({type(e).__name__}: {e})", flush=True)
                    continue
                r = compare(ref, ql, a.confident)
                errs_c = np.array([ly.comq_error for ly in report.layers])
                errs_r = np.array([ly.rtn_error for ly in report.layers])
                fb = sum(1 for ly in report.layers if ly.rtn_groups)
                print(f"{tag}: {len(report.layers)} layers ({len(report.skipped)} nodes left out), "
                      f"{report.samples} calibration samples; capture {report.capture_seconds:.1f} s, solve "
                      f"{report.solve_seconds:.1f} s, total {report.total_seconds:.1f} s; layer rel. error mean "
                      f"{errs_c.mean():.3g} (RTN {errs_r.mean():.3g}), median {np.median(errs_c):.3g} "
                      f"(RTN {np.median(errs_r):.3g}); {fb} layers keep RTN codes in some group; "
                      f"{report.float_bytes / 1e6:.1f} -> {report.quant_bytes / 1e6:.1f} MB", flush=True)
                rows.append((bits, method, r, secs))
        print()
        print(f"| bits | method | agreement all | agreement confident (float p >= {a.confident}) | "
              "mean KL(float‖quant) | quantize s |")
        print("|---|---|---|---|---|---|")
        for bits, method, r, secs in rows:
            print(f"| {bits} | {method.upper()} | {fmt_pct(r['agree'], r['n'])} | "
                  f"{fmt_pct(r['agree_conf'], r['n_conf'])} | {r['kl']:.4f} | {secs:.1f} |")

    for tag, e, tb in failures:
        print(f"\nFAILED {tag}: {type(e).__name__}: {e}\n{tb}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
