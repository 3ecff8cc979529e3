#!/usr/bin/env python
"""silero-vad quantized as shipped: decisions and probabilities of each quantized export against its float model,
streamed chunk by chunk as deployed, on speech by voices the calibration never heard.

The models come from the silero-vad 6.2.3 wheel (not built here), without its dependencies:

    pip download silero-vad==6.2.3 --no-deps -d /tmp/sv
    python tools/bench/silero.py --wheel /tmp/sv/silero_vad-6.2.3-py3-none-any.whl   # -> out/silero/, then runs

``silero_vad.onnx`` (the package's default: one If on the sample rate whose branches are the 16 kHz and the 8 kHz
network, each LSTM inside a nested If), ``silero_vad_op18_ifless.onnx`` (the same If, the weights top-level
initializers the branches read) and ``silero_vad_16k_op15.onnx`` (16 kHz only, its LSTM inside an If). Inputs
``input`` [batch, context + chunk] (64 + 512 samples at 16 kHz, 32 + 256 at 8 kHz), ``state`` [2, batch, 128],
``sr``; outputs the speech probability and the next state.

Data: speech synthesized by espeak-ng (``apt-get install espeak-ng``), resampled from 22050 Hz with scipy's
``resample_poly`` to 16 kHz (and to 8 kHz), scaled to a peak of 0.5, sentences separated by 0.6-1.2 s of silence, a
little noise (std 0.003) over the whole stream. Calibration: one stream, 2 s of noise then 12 English sentences by
the voices en, en-us and en+f3 in turn; its first 992 chunks, each with the state and context the float model
carried to it (one entry per chunk: ``state`` [n, 2, 1, 128], onnxcomq's form for an input whose batch axis is not
axis 0). Evaluation: 4 streams by 4 other voices and other sentences (en+m3, de, fr, es), 1 s of noise first. Each
model runs on its own state and context through each stream, batch 1, as silero's OnnxWrapper does. Measures per
stream: the share of chunks whose decision (probability > 0.5) is float's, and the correlation of the
probabilities with float's; mean and minimum over the 4 streams.

    python tools/bench/silero.py                     # out/silero/silero.md

Recipes: each export at W8 and W4 calibrated at 16 kHz, the default and the op15 export at W8A8 (``--act-bits 8``),
and the default export at W4 calibrated at 16 and 8 kHz (the same chunks at both rates, the Python API's list of
feeds), which quantizes both networks. Needs numpy, onnx,
onnxruntime, scipy and espeak-ng.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import time
import zipfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, ROOT)

OUT = os.path.join(ROOT, "out", "silero")
EXPORTS = ("silero_vad.onnx", "silero_vad_op18_ifless.onnx", "silero_vad_16k_op15.onnx")
RATES = {16000: (512, 64), 8000: (256, 32)}  # sample rate: (chunk, context), as silero's OnnxWrapper
N_CALIB = 992

CALIB = [
    ("en", ["The quick brown fox jumps over the lazy dog near the river bank.",
            "Please remember to bring your umbrella, it might rain this afternoon.",
            "We measured the temperature every hour during the entire experiment.",
            "She opened the window and listened to the birds singing outside."]),
    ("en-us", ["I think the meeting has been moved to next Thursday at three o'clock.",
               "Can you tell me how to get to the nearest train station from here?",
               "The new library downtown has a wonderful collection of old maps.",
               "After dinner we walked along the beach until the sun went down."]),
    ("en+f3", ["My grandmother used to bake bread every Sunday morning.",
               "The committee will publish its final report at the end of the month.",
               "Turn left at the second traffic light and park behind the bakery.",
               "Nobody expected the small team to win the championship this year."]),
]
EVAL = [
    ("en+m3", ["Engineers replaced the old bridge with a lighter steel structure.",
               "Could you send me the spreadsheet before lunch tomorrow?",
               "The orchestra rehearsed the symphony for nearly six hours.",
               "Fresh snow covered the mountain villages overnight."]),
    ("de", ["Der Zug nach Berlin hat heute leider zwanzig Minuten Verspätung.",
            "Am Wochenende wollen wir mit den Kindern in den Zoo gehen.",
            "Bitte schließen Sie die Tür, wenn Sie das Zimmer verlassen.",
            "Die Bibliothek ist montags bis freitags von neun bis achtzehn Uhr geöffnet."]),
    ("fr", ["Le petit déjeuner est servi tous les matins de sept heures à dix heures.",
            "Nous avons visité un très joli village au bord de la mer.",
            "Il faut absolument que tu lises ce livre avant la fin de l'été.",
            "La réunion de demain est annulée à cause de la grève des transports."]),
    ("es", ["El mercado central abre todos los días a las ocho de la mañana.",
            "Mi hermano trabaja en un hospital pequeño cerca de la costa.",
            "No olvides apagar las luces antes de salir de casa.",
            "Este verano vamos a viajar por el norte del país en tren."]),
]


def extract(wheel: str, dest: str) -> None:
    """The three exports of the wheel into ``dest``."""
    os.makedirs(dest, exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        for name in EXPORTS:
            data = z.read(f"silero_vad/data/{name}")
            with open(os.path.join(dest, name + ".tmp"), "wb") as f:
                f.write(data)
            os.replace(os.path.join(dest, name + ".tmp"), os.path.join(dest, name))
    print(f"{wheel}: {', '.join(EXPORTS)} -> {dest}")


def speech(voice: str, text: str, rate: int, cache: str) -> np.ndarray:
    """One sentence by espeak-ng ``voice`` at ``rate`` Hz, peak 0.5 (the wav kept in ``cache``)."""
    from scipy.io import wavfile
    from scipy.signal import resample_poly

    path = os.path.join(cache, f"{voice.replace('+', '_')}_{hashlib.sha1(text.encode()).hexdigest()[:10]}.wav")
    if not os.path.exists(path):
        subprocess.run(["espeak-ng", "-v", voice, "-w", path, text], check=True)
    sr, x = wavfile.read(path)
    x = x.astype(np.float64) / 32768.0
    if x.ndim > 1:
        x = x.mean(1)
    g = np.gcd(rate, sr)
    y = resample_poly(x, rate // g, sr // g)
    return y / (np.abs(y).max() + 1e-9) * 0.5


def stream(utts: list, rate: int, lead_s: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    parts = [np.zeros(int(lead_s * rate))]
    for u in utts:
        parts += [u, np.zeros(int(rng.uniform(0.6, 1.2) * rate))]
    x = np.concatenate(parts)
    return (x + rng.normal(0, 0.003, x.shape)).astype(np.float32)


def streams(rate: int, cache: str) -> tuple:
    """(calibration stream, {voice: evaluation stream}) at ``rate`` (the same randomness at every rate)."""
    utts = [speech(v, sents[i], rate, cache) for i in range(4) for v, sents in CALIB]  # (voices in turn)
    calib = stream(utts, rate, 2.0, 0)
    ev = {v: stream([speech(v, t, rate, cache) for t in sents], rate, 1.0, 1 + k) for k, (v, sents) in
          enumerate(EVAL)}
    return calib, ev


class Streamer:
    """One model run through a stream chunk by chunk, batch 1, carrying its own state and context."""

    def __init__(self, model):
        import onnxruntime as ort

        src = model if isinstance(model, str) else model.SerializeToString()
        self.sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.sess.get_inputs()}

    def run(self, x: np.ndarray, rate: int, record: bool = False):
        chunk, ctx = RATES[rate]
        state, context = np.zeros((2, 1, 128), np.float32), np.zeros((1, ctx), np.float32)
        probs, seen = [], []
        for c in x[: len(x) // chunk * chunk].reshape(-1, chunk):
            inp = np.concatenate([context, c[None]], axis=1)
            feed = {k: v for k, v in {"input": inp, "state": state, "sr": np.array(rate, np.int64)}.items()
                    if k in self.inputs}
            if record:
                seen.append((inp[0], state.copy()))
            p, state = self.sess.run(None, feed)[:2]
            probs.append(float(np.asarray(p).reshape(-1)[0]))
            context = inp[:, -ctx:]
        return (np.array(probs), seen) if record else np.array(probs)


def calibration(float_path: str, calib: np.ndarray, rate: int) -> dict:
    """The first N_CALIB chunks of the calibration stream with the state and context float carried to each."""
    _, seen = Streamer(float_path).run(calib, rate, record=True)
    seen = seen[:N_CALIB]
    return {"input": np.stack([i for i, _ in seen]), "state": np.stack([s for _, s in seen]),
            "sr": np.array(rate, np.int64)}


def measure(float_path: str, q, ev: dict, rate: int) -> tuple:
    """(decision agreement per stream, correlation per stream, float's speech share per stream)."""
    f, m = Streamer(float_path), Streamer(q)
    agree, corr, share = [], [], []
    for x in ev.values():
        pf, pq = f.run(x, rate), m.run(x, rate)
        agree.append(float(((pf > 0.5) == (pq > 0.5)).mean()))
        corr.append(float(np.corrcoef(pf, pq)[0, 1]))
        share.append(float((pf > 0.5).mean()))
    return agree, corr, share


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wheel", help="the silero-vad 6.2.3 wheel: its exports are extracted to out/silero/ first")
    ap.add_argument("--out", default=OUT)
    a = ap.parse_args(argv)
    if a.wheel:
        extract(a.wheel, a.out)
    missing = [e for e in EXPORTS if not os.path.exists(os.path.join(a.out, e))]
    if missing:
        raise SystemExit(f"{a.out}: {', '.join(missing)} missing (give --wheel)")
    if shutil.which("espeak-ng") is None:
        raise SystemExit("espeak-ng not found (apt-get install espeak-ng)")
    from onnxcomq import Recipe, run

    cache = os.path.join(a.out, "wav")
    os.makedirs(cache, exist_ok=True)
    data = {rate: streams(rate, cache) for rate in RATES}
    default = os.path.join(a.out, EXPORTS[0])
    calib = {rate: calibration(default, data[rate][0], rate) for rate in RATES}
    rows = []
    w8a8 = {"weights": {"bits": 8}, "activations": {}}
    plan = [(e, f"W{b}", {"weights": {"bits": b}}, (16000,)) for e in EXPORTS for b in (8, 4)] + \
        [(e, "W8A8", w8a8, (16000,)) for e in (EXPORTS[0], EXPORTS[2])] + \
        [(EXPORTS[0], "W4", {"weights": {"bits": 4}}, (16000, 8000))]
    for export, label, update, rates in plan:
        path = os.path.join(a.out, export)
        feeds = calib[16000] if len(rates) == 1 else [calib[r] for r in rates]  # (a list: one feed per rate)
        t0 = time.perf_counter()
        q, rep = run(path, feeds, Recipe().updated(update))
        seconds = time.perf_counter() - t0
        row = {"export": export, "bits": label, "calib": " + ".join(f"{r // 1000} kHz" for r in rates),
               "seconds": seconds, "size": rep.float_bytes / rep.quant_bytes, "layers": len(rep.layers)}
        for rate in RATES if export == EXPORTS[0] or "ifless" in export else (16000,):
            row[rate] = measure(path, q, data[rate][1], rate)
        rows.append(row)
        print(row["export"], label, row["calib"], {r: (np.mean(row[r][0]), np.mean(row[r][1])) for r in RATES
                                                   if r in row}, f"{seconds:.1f} s", flush=True)
    lines = ["| export | bits | calibrated at | layers | 16 kHz: decisions as float, mean (min) | correlation, mean "
             "(min) | 8 kHz: decisions as float | correlation | size | quantize s |", "|" + "---|" * 10]
    for r in rows:
        cells = []
        for rate in RATES:
            if rate in r:
                ag, co, _ = r[rate]
                cells += [f"{np.mean(ag):.4f} ({min(ag):.4f})", f"{np.mean(co):.4f} ({min(co):.4f})"]
            else:
                cells += ["-", "-"]
        lines.append(f"| {r['export']} | {r['bits']} | {r['calib']} | {r['layers']} | " + " | ".join(cells)
                     + f" | {r['size']:.2f}x | {r['seconds']:.1f} |")
    shares = {rate: next(r[rate][2] for r in rows if rate in r) for rate in RATES}
    lines.append("")
    lines.append("Float's speech share per evaluation stream (" + ", ".join(v for v, _ in EVAL) + "): " + "; ".join(
        f"{rate // 1000} kHz " + ", ".join(f"{s:.3f}" for s in shares[rate]) for rate in RATES))
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(a.out, "silero.md"), "w") as f:
        f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
