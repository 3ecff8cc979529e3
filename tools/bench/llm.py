#!/usr/bin/env python
"""Decoder language models at real width (issue 17): onnxcomq's W4 block MatMulNBits against onnxruntime's
MatMulNBitsQuantizer (RTN, HQQ; the lm_head left float in all three) on the same export, each method in its own
process, measured in the same run: wall
time, peak RSS of that process, the logits' cosine to the float model on held-out text, and greedy generation of
``--tokens`` tokens with the key/value cache (token agreement with the float model's).

    python tools/export/llm.py --size tinyllama --exporters optimum      # out/llm/tinyllama/{hf,optimum,calib.txt}
    python tools/bench/llm.py --size tinyllama                           # out/bench/llm_tinyllama.{md,json}

The models are random-initialised (tools/export/llm.py): the cosine and the token agreement measure how much
quantization moves the network's numbers, not language quality. Calibration: ``<size>/calib.txt`` (64 Debian package
descriptions, through the model's own tokenizer, empty cache); evaluation: ``--eval-texts`` other package
descriptions of /var/lib/dpkg/status (none of the calibration ones), each its own sample, empty cache.

onnxcomq runs through its CLI (``--calib TEXT --tokenizer DIR``); its peak RSS is compared with the float model's
size and the statistics of one decoder block (the largest group: ``groups`` in the report). The last part prints the
extrapolation to Llama-2-7B and a 70B-class model from the measured per-block solve rate.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# -- each method in a child process: python tools/bench/llm.py --child METHOD MODEL OUT ... ---------------------

def child(method: str, model: str, out: str, extra: list) -> dict:
    t0 = time.perf_counter()
    if method.startswith("ort-"):
        from onnxruntime.quantization import matmul_nbits_quantizer as mq
        algo = mq.HQQWeightOnlyQuantConfig(block_size=128, bits=4) if method == "ort-hqq" \
            else mq.DefaultWeightOnlyQuantConfig(block_size=128, is_symmetric=True)
        sys.path.insert(0, ROOT)
        import onnx

        from onnxcomq.graph.layers import find_layers, lm_heads
        m = onnx.load(model, load_external_data=False)
        heads = sorted(lm_heads(m, find_layers(m)[0]))  # left float, as onnxcomq's default does
        q = mq.MatMulNBitsQuantizer(model, bits=4, block_size=128, is_symmetric=method != "ort-hqq",
                                    algo_config=algo, nodes_to_exclude=heads)
        q.process()
        q.model.save_model_to_file(out, use_external_data_format=True)
    else:
        from onnxcomq.cli import main as cli
        rc = cli(["quantize", model, "-o", out, "-q"] + extra)
        if rc:
            raise SystemExit(rc)
    return {"seconds": time.perf_counter() - t0,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


# -- evaluation -------------------------------------------------------------------------------------------------

def eval_texts(calib: str, n: int) -> list:
    """``n`` Debian package descriptions (short + first long line) not among the calibration lines."""
    seen = {line.strip() for line in open(calib, encoding="utf-8") if line.strip()}
    out, desc = [], []
    for line in open("/var/lib/dpkg/status", encoding="utf-8", errors="replace"):
        if line.startswith("Description:"):
            desc = [line[len("Description:"):].strip()]
        elif line.startswith(" ") and desc and len(desc) < 3:
            desc.append(line.strip())
        elif not line.strip() and desc:
            text = " ".join(d for d in desc if d != ".")
            desc = []
            if text not in seen and len(text) > 40 and all(text[:60] not in s for s in seen):
                out.append(text)
    out = sorted(set(out))
    rng = np.random.default_rng(0)
    return [out[i] for i in rng.choice(len(out), size=min(n, len(out)), replace=False)]


def session(path):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def cache_inputs(sess) -> list:
    return [i for i in sess.get_inputs() if i.name.startswith("past")]


def feeds_for(sess, ids: np.ndarray, past: dict | None) -> dict:
    """Feeds for one step: ``ids`` (1, t) after the cached positions in ``past`` (empty cache if None)."""
    names = {i.name for i in sess.get_inputs()}
    pl = 0 if not past else next(iter(past.values())).shape[2]
    f = {"input_ids": ids.astype(np.int64)}
    if "attention_mask" in names:
        f["attention_mask"] = np.ones((1, pl + ids.shape[1]), np.int64)
    if "position_ids" in names:
        f["position_ids"] = np.arange(pl, pl + ids.shape[1], dtype=np.int64)[None]
    for i in cache_inputs(sess):
        if past:
            f[i.name] = past[i.name]
        else:
            heads, dim = i.shape[1], i.shape[3]
            f[i.name] = np.zeros((1, heads, 0, dim), np.float32)
    return f


def logits_and_tokens(path: str, samples: list, tokens: int) -> tuple:
    """(last-position logits per sample, greedy tokens per sample, generated with the cache if the model has one)."""
    sess = session(path)
    outs = [o.name for o in sess.get_outputs()]
    presents = [o for o in outs if o.startswith("present")]
    cache = cache_inputs(sess)
    logits, gen = [], []
    for ids in samples:
        res = dict(zip(outs, sess.run(None, feeds_for(sess, ids[None], None))))
        lg = res["logits"][0]
        logits.append(lg.astype(np.float64))
        seq, toks = ids[None], []
        past = {c.name: res[p] for c, p in zip(cache, presents)} if cache else None
        nxt = int(lg[-1].argmax())
        for _ in range(tokens):
            toks.append(nxt)
            if cache:
                res = dict(zip(outs, sess.run(None, feeds_for(sess, np.array([[nxt]]), past))))
                past = {c.name: res[p] for c, p in zip(cache, presents)}
            else:
                seq = np.concatenate([seq, [[nxt]]], axis=1)
                res = dict(zip(outs, sess.run(None, feeds_for(sess, seq, None))))
            nxt = int(res["logits"][0, -1].argmax())
        gen.append(toks)
    return logits, gen


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1), b.reshape(-1)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def files_size(path: str) -> int:
    sys.path.insert(0, ROOT)
    from onnxcomq.report import model_size
    return model_size(path)


def block_stats_gb(hidden: int, mlp: int) -> float:
    """float64 Grams of one Llama block: q/k/v share one input (hidden), o (hidden), gate/up share one (hidden),
    down (mlp)."""
    return 8 * (3 * hidden * hidden + mlp * mlp) / 1e9


def one_pass_recipe(work: str) -> str:
    """A recipe file that turns sequential capture off (the statistics of one float pass)."""
    path = os.path.join(work, "one_pass.recipe.json")
    with open(path, "w") as f:
        json.dump({"sequential": None}, f)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", nargs=4, metavar=("METHOD", "MODEL", "OUT", "ARGS"), help=argparse.SUPPRESS)
    ap.add_argument("--size", default="tinyllama", help="a folder out/llm/SIZE from tools/export/llm.py")
    ap.add_argument("--exporter", default="optimum", help="the export under out/llm/SIZE (optimum, torch, genai)")
    ap.add_argument("--methods", nargs="+", default=["onnxcomq", "ort-rtn", "ort-hqq"],
                    help="onnxcomq (its default: sequential capture), onnxcomq-onepass (one float capture pass: "
                         "a recipe with 'sequential: null'), ort-rtn, ort-hqq")
    ap.add_argument("--max-samples", type=int, default=16, help="onnxcomq's calibration samples")
    ap.add_argument("--max-memory", default="1G", help="onnxcomq's --max-memory: 1G makes each group about one "
                    "TinyLlama block (statistics budget 0.5 GB)")
    ap.add_argument("--eval-texts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--out", default=os.path.join(ROOT, "out", "bench"))
    a = ap.parse_args(argv)
    if a.child:
        print("RESULT " + json.dumps(child(*a.child[:3], json.loads(a.child[3]))))
        return 0
    base = os.path.join(ROOT, "out", "llm", a.size)
    model = os.path.join(base, a.exporter, "model.onnx")
    calib, tok = os.path.join(base, "calib.txt"), os.path.join(base, "hf")
    for p in (model, calib, tok):
        if not os.path.exists(p):
            sys.exit(f"{p} not found: run python tools/export/llm.py --size {a.size} first")
    cfg = json.load(open(os.path.join(tok, "config.json")))
    hidden, mlp, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    work = os.path.join(a.out, f"llm_{a.size}")
    os.makedirs(work, exist_ok=True)
    from tokenizers import Tokenizer
    tk = Tokenizer.from_file(os.path.join(tok, "tokenizer.json"))
    texts = eval_texts(calib, a.eval_texts)
    samples = [np.array(tk.encode(t).ids[:128], np.int64) for t in texts]
    f_logits, f_gen = logits_and_tokens(model, samples, a.tokens)
    rows = []
    for method in a.methods:
        out = os.path.join(work, f"{method}.onnx")
        report = os.path.join(work, f"{method}.report.json")
        extra = ["--calib", calib, "--tokenizer", tok, "--bits", "4", "--granularity", "block", "--block-size",
                 "128", "--format", "matmulnbits", "--max-samples", str(a.max_samples), "--max-memory",
                 a.max_memory, "--report", report] + (["--recipe", one_pass_recipe(work)]
                                                      if method == "onnxcomq-onepass" else []) \
            if method.startswith("onnxcomq") else []
        cmd = [sys.executable, os.path.abspath(__file__), "--child", method, model, out, json.dumps(extra)]
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
        if p.returncode or not line:
            print(f"{method}: failed (rc {p.returncode}): {p.stderr.strip().splitlines()[-1:] }", file=sys.stderr)
            continue
        r = json.loads(line[0][7:])
        q_logits, q_gen = logits_and_tokens(out, samples, a.tokens)
        r.update(method=method, size_mb=files_size(out) / 1e6,
                 cosine=float(np.mean([cosine(x, y) for x, y in zip(f_logits, q_logits)])),
                 top1=float(np.mean([(x.argmax(-1) == y.argmax(-1)).mean() for x, y in zip(f_logits, q_logits)])),
                 tokens=float(np.mean([np.mean(np.array(x) == np.array(y)) for x, y in zip(f_gen, q_gen)])))
        if method.startswith("onnxcomq"):
            rep = json.load(open(report))
            r["groups"] = rep.get("config", {}).get("groups")
        rows.append(r)
        print(json.dumps(r), flush=True)
    float_gb = files_size(model) / 1e9
    blk = block_stats_gb(hidden, mlp)
    lines = [f"# {a.size} ({a.exporter} export): hidden {hidden}, MLP {mlp}, {layers} blocks, float "
             f"{float_gb:.2f} GB; one block's statistics {blk:.2f} GB; eval: {len(samples)} held-out texts, "
             f"{a.tokens} generated tokens", "",
             "| method | time s | peak RSS GiB | peak / (float + block stats) | size MB | logits cosine | top-1 "
             "agreement | generated tokens equal |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['seconds']:.0f} | {r['peak_rss_gb']:.2f} | "
                     f"{r['peak_rss_gb'] * 2**30 / 1e9 / (float_gb + blk):.2f} | {r['size_mb']:.0f} | "
                     f"{r['cosine']:.4f} | {r['top1']:.3f} | {r['tokens']:.3f} |")
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(a.out, f"llm_{a.size}.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(a.out, f"llm_{a.size}.json"), "w") as f:
        json.dump({"size": a.size, "hidden": hidden, "mlp": mlp, "layers": layers, "float_gb": float_gb,
                   "block_stats_gb": blk, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
