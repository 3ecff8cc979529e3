#!/usr/bin/env python
"""Evaluate weight-quantized all-MiniLM-L6-v2 ONNX models against the float model on real text pairs.

Data and model come from tools/export/minilm.py (out/minilm.onnx, out/minilm_calib.npz, out/minilm_eval.npz: short
descriptions in the ``a_*`` keys, long descriptions in the ``b_*`` keys, row i of each from the same Debian package).

Sentence embedding: mean of ``last_hidden_state`` over the tokens where attention_mask is 1, then L2 normalization
(the sentence-transformers convention), in numpy. Reported per model:

* mean cosine to float: cosine between the model's embedding and the float model's, averaged over all eval sentences
  (short and long descriptions, 2N sentences); the minimum is shown too;
* recall@1: for each short description, is its own long description the nearest (cosine) among all N long
  descriptions; "recall@1 float" is the float model's, on the same data;
* top-1 same as float: fraction of short descriptions whose nearest long description is the same as with the float
  model (more sensitive than recall@1, which quantization noise moves both ways).

    python tools/bench/eval_minilm.py --quantized out/a.onnx out/b.onnx      # evaluate existing quantized models
    python tools/bench/eval_minilm.py --quantize                             # COMQ and RTN at 8, 4, 3 bits, then evaluate
    python tools/bench/eval_minilm.py --quantize --bits 4 --save-dir out/minilm_q # also write the quantized models

Quantization uses onnxcomq's default recipe at b bits (``Recipe(weights=Weights(bits=b))``, COMQ) and weights
``method="rtn"`` on the same grid, with the calibration npz; "quantize s" is the wall time of ``onnxcomq.run``
(load, capture, solve, emit).
Every quantized model goes through onnx.checker and onnxruntime; a failure is printed with its traceback and the
run goes on with the other models (exit status 1).

onnxruntime sessions are created with ``session.qdq_matmulnbits_accuracy_level=0``: onnxruntime may rewrite
DequantizeLinear+MatMul into MatMulNBits, which otherwise may quantize the activations too.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
INPUTS = ["input_ids", "attention_mask", "token_type_ids"]


def session(model, threads: int = 0):
    """An onnxruntime CPU session for a path or a ModelProto."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    if threads:
        so.intra_op_num_threads = threads
    src = model if isinstance(model, (str, os.PathLike)) else model.SerializeToString()
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def load_eval(path: str) -> tuple[dict, dict]:
    with np.load(path, allow_pickle=False) as z:
        a = {k: z[f"a_{k}"] for k in INPUTS}
        b = {k: z[f"b_{k}"] for k in INPUTS}
    if a["input_ids"].shape[0] != b["input_ids"].shape[0]:
        raise SystemExit(f"{path}: {a['input_ids'].shape[0]} short vs {b['input_ids'].shape[0]} long descriptions")
    return a, b


def embed(sess, feeds: dict, batch_size: int = 32) -> np.ndarray:
    """Mean-pooled, L2-normalized embeddings [N, D]. Texts are batched by length and each batch is trimmed to its
    longest text (padding does not change a text's embedding beyond float rounding)."""
    mask = feeds["attention_mask"]
    lens = mask.sum(1)
    order = np.argsort(-lens, kind="stable")
    out = None
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        L = int(lens[idx].max())
        f = {k: np.ascontiguousarray(feeds[k][idx, :L]) for k in INPUTS}
        h = sess.run(["last_hidden_state"], f)[0]
        m = f["attention_mask"].astype(np.float32)[..., None]
        e = (h * m).sum(1) / np.maximum(m.sum(1), 1e-9)
        if out is None:
            out = np.empty((len(order), e.shape[1]), np.float32)
        out[idx] = e
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def recall_at_1(ea: np.ndarray, eb: np.ndarray) -> float:
    sims = ea @ eb.T
    return float((sims.argmax(1) == np.arange(len(ea))).mean())


def evaluate(sess, a: dict, b: dict, ref: dict | None, batch_size: int) -> dict:
    ea, eb = embed(sess, a, batch_size), embed(sess, b, batch_size)
    r = {"recall1": recall_at_1(ea, eb), "emb": (ea, eb), "top1": (ea @ eb.T).argmax(1)}
    if ref is not None:
        r["agree"] = float((r["top1"] == ref["top1"]).mean())
        cos = np.concatenate([(ea * ref["emb"][0]).sum(1), (eb * ref["emb"][1]).sum(1)])
        r["cos_mean"], r["cos_min"] = float(cos.mean()), float(cos.min())
    return r


def check_model(model) -> None:
    import onnx

    onnx.checker.check_model(model, full_check=True)


def quantize(float_path: str, calib: str, bits: int, method: str, device: str):
    from _recipes import keep_unverified

    from onnxcomq import Recipe, run
    run = keep_unverified(run)

    cfg = Recipe().updated({"weights": {"bits": bits, "method": method}, "solver": {"device": device}})
    t0 = time.perf_counter()
    model, report = run(float_path, calib, cfg)
    return model, report, time.perf_counter() - t0


def fmt(x, spec):
    return "—" if x is None else format(x, spec)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--float", dest="float_model", default=os.path.join("out", "minilm.onnx"))
    ap.add_argument("--quantized", nargs="*", default=[], help="quantized ONNX models to evaluate")
    ap.add_argument("--eval", dest="eval_npz", default=os.path.join("out", "minilm_eval.npz"))
    ap.add_argument("--calib", default=os.path.join("out", "minilm_calib.npz"))
    ap.add_argument("--quantize", action="store_true", help="quantize the float model with COMQ and RTN first")
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 4, 3])
    ap.add_argument("--methods", nargs="+", default=["comq", "rtn"], choices=["comq", "rtn"])
    ap.add_argument("--device", default="cpu", choices=["auto", "cpu", "gpu"])
    ap.add_argument("--save-dir", default=None, help="write the quantized models (and nothing else) here")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    a = ap.parse_args(argv)
    if not a.quantize and not a.quantized:
        ap.error("nothing to evaluate: give --quantized MODEL... and/or --quantize")

    sys.path.insert(0, os.path.abspath(ROOT))
    ea, eb = load_eval(a.eval_npz)
    n = ea["input_ids"].shape[0]
    t0 = time.perf_counter()
    ref = evaluate(session(a.float_model, a.threads), ea, eb, None, a.batch_size)
    print(f"eval: {n} pairs ({2 * n} sentences) from {a.eval_npz}; float {a.float_model}: recall@1 "
          f"{ref['recall1']:.4f} ({time.perf_counter() - t0:.1f} s)", flush=True)

    rows, failures = [], []
    jobs = [(p, None, None) for p in a.quantized]
    if a.quantize:
        jobs += [(None, b, m) for b in a.bits for m in a.methods]
    for path, bits, method in jobs:
        label = path or f"{method} w{bits}"
        qsec = None
        stage = "onnxcomq.run" if path is None else "load"
        try:
            if path is None:
                model, report, qsec = quantize(a.float_model, a.calib, bits, method, a.device)
                print(f"{label}: quantized {len(report.layers)} layers, skipped {len(report.skipped)}, "
                      f"{report.samples} calibration samples; capture {report.capture_seconds:.1f} s, solve "
                      f"{report.solve_seconds:.1f} s, total {report.total_seconds:.1f} s (wall {qsec:.1f} s); "
                      f"mean layer error comq {np.mean([l.comq_error for l in report.layers]):.3e} rtn "
                      f"{np.mean([l.rtn_error for l in report.layers]):.3e}; size {report.float_bytes / 1e6:.1f} "
                      f"-> {report.quant_bytes / 1e6:.1f} MB", flush=True)
                if a.save_dir:
                    import onnx

                    os.makedirs(a.save_dir, exist_ok=True)
                    out = os.path.join(a.save_dir, f"minilm.w{bits}.{method}.onnx")
                    onnx.save(model, out)
                    print(f"  wrote {out}")
            else:
                model = path
            stage = "onnx.checker"
            check_model(model)
            stage = "onnxruntime"
            r = evaluate(session(model, a.threads), ea, eb, ref, a.batch_size)
        except Exception as e:  # noqa: BLE001 - report and go on with the other models
            where = stage
            failures.append((label, where, e))
            print(f"{label}: FAILED in {where}: {type(e).__name__}: {e}", file=sys.stderr)
            traceback.print_exc()
            rows.append((bits, method or path, None, None, ref["recall1"], qsec, None, None, f"failed ({where})"))
            continue
        rows.append((bits, method or path, r["cos_mean"], r["recall1"], ref["recall1"], qsec, r["cos_min"], r["agree"],
                     ""))

    print()
    print("| bits | method | mean cosine to float | recall@1 | recall@1 float | quantize s | min cosine "
          "| top-1 same as float | note |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---|")
    for bits, method, cm, r1, r1f, qs, cmin, agree, note in rows:
        print(f"| {bits if bits is not None else '?'} | {method} | {fmt(cm, '.4f')} | {fmt(r1, '.4f')} | "
              f"{r1f:.4f} | {fmt(qs, '.1f')} | {fmt(cmin, '.4f')} | {fmt(agree, '.3f')} | {note} |")
    print(f"\n{n} pairs; recall@1 = short description -> own long description among all {n} (cosine); "
          "top-1 same as float = fraction of short descriptions whose nearest long description is the float model's.")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
