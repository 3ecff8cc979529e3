"""A real Paddle2ONNX model end to end through the CLI: rapidocr-onnxruntime's text-direction classifier
(ch_ppocr_mobile_v2.0_cls_infer.onnx, opset 11, Constant-node weights, BatchNormalization, 53 convs, 585 KB)
quantized at W4, then run on rendered text lines against the float model. The full measurement (the PP-OCRv4
recognizer's CER and the detector's box F1) is tools/bench/eval_ocr.py.

Needs the rapidocr_onnxruntime package (its models only: ``pip install --no-deps rapidocr-onnxruntime==1.4.4``,
which tools/test.sh does); skipped without it. The text is drawn with a built-in 8x12 bitmap font so that neither
Pillow nor OpenCV is needed."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

SPEC = importlib.util.find_spec("rapidocr_onnxruntime")
pytestmark = pytest.mark.skipif(
    SPEC is None or not SPEC.submodule_search_locations,
    reason="rapidocr_onnxruntime is not installed (pip install --no-deps rapidocr-onnxruntime==1.4.4; "
           "tools/test.sh installs it)")

# 8 x 12 bitmaps (rows as hex bytes, MSB left) of DejaVu Sans Mono Bold at 13 px
GLYPHS = dict(g.split(":") for g in (
    "A:00183c3c2c647e6646c30000 B:007c6666667c6666667c0000 C:001c326060606060321c0000 D:007c6e66666666666e7c0000 "
    "E:007e6060607e6060607e0000 F:007e6060607e606060600000 G:001c7260606e6666363e0000 H:00666666667e666666660000 "
    "I:007e181818181818187e0000 J:003c0c0c0c0c0c0c4c7c0000 K:00666c7c78786c6c66670000 L:0060606060606060607e0000 "
    "M:00e6e6fefedadac2c2c20000 N:00666676765e4e4e4e460000 O:003c666666666666663c0000 P:007c666666667c6060600000 "
    "Q:003c666666666666663c0e04 R:007c666666667c6c66670000 S:003c6260703c0e06463c0000 T:007e18181818181818180000 "
    "U:0066666666666666663c0000 V:00c6666666643c3c3c380000 W:00c3c3dbda5a7e6e66660000 X:00e6663c3c183c3c66c60000 "
    "Y:00c7666e3c38181818180000 Z:007e060e1c183870607e0000 0:003c66667e7e6666663c0000 1:0078181818181818187e0000 "
    "2:003c4c060e0c1830607e0000 3:003c46063c060606463c0000 4:000c1c3c6c4c7e0c0c0c0000 5:007c60607c4e06064e3c0000 "
    "6:003c60607c666666663c0000 7:007e060c0c1c181830300000 8:003c66663c666666663c0000 9:003c6e66666e3e064c380000"
    ).split())
GLYPHS[" "] = "00" * 12

CALIB_TEXT = ["QUANTIZED WEIGHTS", "ONNX RUNTIME 1", "PADDLE OCR 2024", "TEXT LINE 42", "HELLO WORLD",
              "DEBIAN PACKAGES", "INT4 CODES 7", "SCALE AND ZERO", "CONV LAYERS 53", "BATCH NORM"]
EVAL_TEXT = ["DETECTOR 736", "GRID STEP 15", "MIXED BITS", "JUST WORK 9", "NEVER LOSE", "FLAT MEMORY 8"]


def render(text: str, rng: np.random.Generator) -> np.ndarray:
    """A grey text line (H x W float in 0..255): bitmap glyphs scaled up, ink/background levels, blur, noise."""
    k = int(rng.integers(3, 5))
    cols = []
    for c in text:
        cols.append(np.unpackbits(np.frombuffer(bytes.fromhex(GLYPHS[c]), np.uint8)).reshape(12, 8))
    glyphs = np.kron(np.concatenate(cols, axis=1), np.ones((k, k))).astype(np.float32)
    pad = 2 * k
    img = np.pad(glyphs, ((pad, pad), (pad, pad)))
    bg, ink = rng.uniform(180, 250), rng.uniform(0, 70)
    img = bg + (ink - bg) * img
    img = (img + np.roll(img, 1, 0) + np.roll(img, 1, 1) + np.roll(img, (1, 1), (0, 1))) / 4  # slight blur
    return np.clip(img + rng.normal(0, 5, img.shape), 0, 255)


def resize_h(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear resize to h x w (numpy only)."""
    ys = np.clip((np.arange(h) + 0.5) * img.shape[0] / h - 0.5, 0, img.shape[0] - 1)
    xs = np.clip((np.arange(w) + 0.5) * img.shape[1] / w - 0.5, 0, img.shape[1] - 1)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, img.shape[0] - 1), np.minimum(x0 + 1, img.shape[1] - 1)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    top = img[y0][:, x0] * (1 - fx) + img[y0][:, x1] * fx
    bot = img[y1][:, x0] * (1 - fx) + img[y1][:, x1] * fx
    return top * (1 - fy) + bot * fy


def cls_input(img: np.ndarray) -> np.ndarray:
    """rapidocr's TextClassifier.resize_norm_img for cls_image_shape (3, 48, 192)."""
    rw = min(192, int(np.ceil(48 * img.shape[1] / img.shape[0])))
    x = (resize_h(img, 48, rw) / 255 - 0.5) / 0.5
    out = np.zeros((3, 48, 192), np.float32)
    out[:, :, :rw] = x[None]
    return out


def lines(texts, seed):
    """Each text upright and rotated by 180 degrees (the classifier's two classes)."""
    rng = np.random.default_rng(seed)
    xs = []
    for t in texts:
        img = render(t, rng)
        xs += [cls_input(img), cls_input(img[::-1, ::-1])]
    return np.stack(xs)


def test_paddle_cls_w4_end_to_end(tmp_path):
    import onnxruntime as ort

    model = os.path.join(list(SPEC.submodule_search_locations)[0], "models", "ch_ppocr_mobile_v2.0_cls_infer.onnx")
    if not os.path.exists(model):
        pytest.skip(f"{model} is missing from the installed rapidocr_onnxruntime")
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=lines(CALIB_TEXT, 0))
    out = tmp_path / "cls.w4.onnx"
    p = subprocess.run([sys.executable, "-m", "onnxcomq.cli", "quantize", model, "-o", str(out), "--calib",
                        str(calib), "--bits", "4", "--quiet"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert out.exists()

    x = lines(EVAL_TEXT, 1)
    f = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    q = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.isfinite(q).all()
    # the float model reads the direction of these lines: upright 0, rotated 1
    assert (f.argmax(1) == np.tile([0, 1], len(EVAL_TEXT))).mean() >= 0.75
    assert (q.argmax(1) == f.argmax(1)).mean() >= 0.9, (f, q)
    assert np.abs(q - f).max() < 0.35 and np.abs(q - f).mean() < 0.1, np.abs(q - f)
