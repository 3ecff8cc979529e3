#!/usr/bin/env python
"""A recurrent model whose layers sit inside a Loop body: a character-level GRU language model, trained here on
Debian package descriptions, exported by torch.onnx's TorchScript exporter from a scripted for loop (the exporter
writes the loop as an ONNX Loop whose body reads the weights from the outer scope and appends each step's state to
a sequence), then quantized and judged against the float model on text it was not calibrated on.

Data: the long descriptions of /var/lib/dpkg/status, parsed and de-duplicated as tools/export/minilm.py does,
split by h = crc32(package name) as tools/bench/heldout.py splits them: calibration h % 10 == 0 (the first
--calib texts), development (h // 10) % 4 == 0 (the training text; not evaluated), E1-E3 (h // 10) % 4 == 1, 2, 3
(evaluation). Bytes (ASCII, others mapped to '?'), windows of --seq characters.

Model: bytes -> embedding 32 (a Gather, left float) -> GRU cell of width --hidden written as two Linear layers
(input and state to the three gates) inside the loop -> Linear head to the 128 byte logits outside it, on the
stacked states. Input ``x`` [seq, batch] (time-major: onnxcomq batches along the axis named ``batch``).

Measures, per evaluation set: how often the quantized model's next-character top-1 is the float model's, and the
mean KL(float || quantized) over positions; mean and spread over E1-E3.

    python tools/bench/loops.py            # out/loops/loops.md (and the model, out/loops/char_gru.onnx)

Needs torch (CPU), numpy, onnx, onnxruntime.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools", "export"))

import minilm  # noqa: E402  (tools/export: the Debian descriptions, parsed and de-duplicated)

SETS = ["calibration", "dev", "E1", "E2", "E3"]
RECIPES = [("RTN W4", {"weights": {"method": "rtn"}}), ("COMQ W4", {}), ("COMQ W3", {"weights": {"bits": 3}}),
           ("COMQ W8", {"weights": {"bits": 8}})]


def text_sets(calib: int) -> dict:
    """{set name: [long description, ...]} split by crc32(package) as heldout.py's text sets."""
    records = minilm.usable_records(minilm.parse_dpkg_status(), max_records=10 ** 9)

    def which(pkg: str) -> str:
        h = zlib.crc32(pkg.encode())
        return "calibration" if h % 10 == 0 else SETS[1 + (h // 10) % 4]

    out = {s: [] for s in SETS}
    for pkg, _, long in records:
        out[which(pkg)].append(long)
    out["calibration"] = out["calibration"][:calib]
    return out


def windows(texts: list, seq: int, count: int, seed: int) -> np.ndarray:
    """``count`` windows of ``seq + 1`` bytes (inputs and next-byte targets), [seq + 1, count] int64, drawn from
    the texts in turn."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        t = texts[i % len(texts)].encode("ascii", "replace")
        t = (t * (seq // max(len(t), 1) + 2))[:max(len(t), seq + 1)]
        s = int(rng.integers(0, len(t) - seq)) if len(t) > seq + 1 else 0
        rows.append(np.frombuffer(t[s:s + seq + 1], np.uint8) & 127)
    return np.stack(rows, 1).astype(np.int64)


def build(hidden: int):
    import torch
    nn = torch.nn

    class CharGRU(nn.Module):
        def __init__(self):
            super().__init__()
            self.hidden = hidden
            self.emb = nn.Embedding(128, 32)
            self.wx = nn.Linear(32, 3 * hidden)
            self.wh = nn.Linear(hidden, 3 * hidden)
            self.head = nn.Linear(hidden, 128)

        def forward(self, x):  # x: [seq, batch] int64
            hidden = self.hidden
            e = self.emb(x)
            h = torch.zeros(x.shape[1], hidden)
            outs: list[torch.Tensor] = []
            for t in range(x.shape[0]):
                gx, gh = self.wx(e[t]), self.wh(h)
                r = torch.sigmoid(gx[:, :hidden] + gh[:, :hidden])
                z = torch.sigmoid(gx[:, hidden:2 * hidden] + gh[:, hidden:2 * hidden])
                n = torch.tanh(gx[:, 2 * hidden:] + r * gh[:, 2 * hidden:])
                h = (1 - z) * n + z * h
                outs.append(h)
            return self.head(torch.stack(outs))

    return CharGRU()


def train(model, data: np.ndarray, steps: int, batch: int, seed: int) -> list:
    import torch

    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(seed)
    losses = []
    for step in range(steps):
        cols = rng.integers(0, data.shape[1], batch)
        xb = torch.from_numpy(data[:, cols])
        logits = model(xb[:-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 128), xb[1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return losses


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "out", "loops"))
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--seq", type=int, default=48)
    ap.add_argument("--calib", type=int, default=64, help="calibration texts (and windows)")
    ap.add_argument("--eval", type=int, default=256, help="evaluation windows per set")
    ap.add_argument("--steps", type=int, default=600, help="training steps")
    a = ap.parse_args(argv)
    import onnx
    import onnxruntime as ort
    import torch

    from onnxcomq import Recipe, run

    os.makedirs(a.out, exist_ok=True)
    texts = text_sets(a.calib)
    t0 = time.perf_counter()
    model = build(a.hidden)
    losses = train(model, windows(texts["dev"], a.seq, 4096, 0), a.steps, 64, 0)
    t_train = time.perf_counter() - t0
    path = os.path.join(a.out, "char_gru.onnx")
    torch.onnx.export(torch.jit.script(model.eval()), (torch.zeros(a.seq, 2, dtype=torch.int64),), path,
                      dynamo=False, input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "seq", 1: "batch"}, "logits": {0: "seq", 1: "batch"}})
    calib = {"x": windows(texts["calibration"], a.seq, a.calib, 1)[:-1]}
    evals = {s: windows(texts[s], a.seq, a.eval, 2 + k)[:-1] for k, s in enumerate(["E1", "E2", "E3"])}
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    ref = {s: log_softmax(sess.run(None, {"x": x})[0]) for s, x in evals.items()}
    rows = []
    for label, d in RECIPES:
        t1 = time.perf_counter()
        q, rep = run(path, calib, Recipe().updated(d))
        seconds = time.perf_counter() - t1
        qs = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"])
        per = {}
        for s, x in evals.items():
            lq = log_softmax(qs.run(None, {"x": x})[0])
            agree = float((lq.argmax(-1) == ref[s].argmax(-1)).mean())
            kl = float((np.exp(ref[s]) * (ref[s] - lq)).sum(-1).mean())
            per[s] = (agree, kl)
        inside = sum("/body/" in L.node for L in rep.layers)
        rows.append({"recipe": label, "layers": len(rep.layers), "in_loop": inside, "seconds": seconds,
                     "agree": [per[s][0] for s in evals], "kl": [per[s][1] for s in evals]})
        print(f"{label}: agreement {np.mean(rows[-1]['agree']):.4f}, KL {np.mean(rows[-1]['kl']):.4f}, "
              f"{seconds:.1f} s", flush=True)
    onnx_model = onnx.load(path)
    loops = [n.op_type for n in onnx_model.graph.node if n.op_type in ("Loop", "Scan")]
    lines = [f"Character-level GRU (hidden {a.hidden}) in a {loops[0]} body, trained {a.steps} steps "
             f"({t_train:.0f} s; loss {np.mean(losses[:20]):.2f} -> {np.mean(losses[-20:]):.2f}), calibrated on "
             f"{a.calib} windows of {a.seq} characters, evaluated on {a.eval} windows per set:", "",
             "| recipe | layers (in the loop) | next-char agreement, mean ± std | per set (E1-E3) | mean KL | "
             "quantize s |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['recipe']} | {r['layers']} ({r['in_loop']}) | {np.mean(r['agree']):.4f} ± "
                     f"{np.std(r['agree']):.4f} | {', '.join(f'{v:.4f}' for v in r['agree'])} | "
                     f"{np.mean(r['kl']):.4f} | {r['seconds']:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    with open(os.path.join(a.out, "loops.md"), "w") as f:
        f.write(text)
    with open(os.path.join(a.out, "loops.json"), "w") as f:
        json.dump({"args": vars(a), "rows": rows, "train_seconds": t_train}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
