#!/usr/bin/env python
"""Quantize rapidocr-onnxruntime's Paddle2ONNX OCR models with the onnxcomq CLI and measure them against float.

Models: ch_PP-OCRv4_rec_infer.onnx (text-line recognizer, SVTR-LCNet, CTC over 6625 classes) and
ch_PP-OCRv4_det_infer.onnx (DB text detector), found in an installed ``rapidocr_onnxruntime`` package (the package is
not imported, only located: ``pip install --no-deps rapidocr-onnxruntime==1.4.4`` is enough) or in ``--model-dir``.
The tool needs Pillow and OpenCV (``pip install pillow opencv-python-headless``); onnxcomq does not.

Data, built here without the internet (Latin text and digits; the models also read Chinese, which is not measured):
* text: the descriptions (short and long) of the installed Debian packages (``--text-source``, default
  /var/lib/dpkg/status), cut into lines of 8..40 characters at word boundaries. Each package goes to exactly one
  split (by a hash of its name): calibration, or evaluation set 1..K. No line occurs in two splits.
* fonts: every .ttf/.otf/.ttc under ``--font-dir`` (default /usr/share/fonts/truetype). Families are split too:
  calibration renders with DejaVu (the family every Debian has), evaluation with the others (Liberation, FreeFont
  from the Debian packages fonts-liberation2, fonts-freefont-ttf); with DejaVu alone, calibration gets DejaVu Sans
  and evaluation DejaVu Serif / Mono. The run records which fonts each split used.
* rendering: font size, ink and background grey levels, background gradient, blur, down-and-up sampling and
  Gaussian noise drawn at random per sample.
* recognizer: one text line per sample, cropped to its ink with a margin. The model input is rapidocr's: height 48,
  width ceil(48 * w / h), normalized to [-1, 1], zero (grey) padding on the right up to the widest line of its batch
  (at least 320); evaluation batches as rapidocr does (lines sorted by aspect ratio, 6 per batch). Calibration lines
  are padded to one width (``--rec-calib-width``, 480) so that they stack into one .npz. Metric: character error
  rate (CER: Levenshtein distance / ground-truth length, summed over lines) of the CTC greedy decode (rapidocr's
  CTCLabelDecode, the dictionary from the model's metadata), spaces removed from both texts: this Chinese model
  drops many spaces between Latin words, which would otherwise be most of the float model's errors (the CER with
  spaces is in the JSON too); line accuracy likewise.
* detector: pages with 6..14 lines at random positions and sizes; the ground truth is each line's ink box. Pages are
  multiples of 32 (rapidocr's resize; no resize needed). Post-processing follows rapidocr's DBPostProcess (threshold
  0.3, dilation, box score >= 0.5 by the mean probability in the box, unclip ratio 1.6 as the exact offset of the
  rectangle, without pyclipper/shapely), boxes compared axis-aligned. Metric: box F1 at IoU >= 0.5 (greedy one-to-one
  matching by IoU; the JSON also has the mean IoU of the matches: the unclipped DB boxes are a few pixels larger
  than the ink boxes, so it is about 0.7 for float and IoU 0.75 would not measure the model).

Agreement with float, per set: rec: the share of lines whose decoded text equals the float model's, the CER of the
quantized text against the float text, the per-frame argmax agreement and the cosine of the output probabilities;
det: box F1 of the quantized boxes against the float boxes and the mean absolute difference of the probability maps.

Every quantized model comes from the CLI (``onnxcomq quantize MODEL -o OUT --calib NPZ --bits B [--method rtn]``,
a subprocess, its wall time measured); a failure (exit status, NaN outputs) is recorded and the run goes on. The
flags of the old command line that ``onnxcomq quantize`` no longer has (--method, --order, --sweeps, --damping, ...)
are written into a recipe file beside the model (out/ocr/{task}_{variant}.recipe.json) and given as --recipe
(tools/bench/_recipes.py).

    python tools/bench/eval_ocr.py                          # rec and det: float, W8, W4, W4 RTN; 3 evaluation sets
    python tools/bench/eval_ocr.py --task rec --bits 4 --sets 5
    python tools/bench/eval_ocr.py --variant 'w4:--bits 4' --variant 'w4b:--bits 4 --granularity block'

Writes out/ocr/{rec,det}_calib.npz, the quantized models out/ocr/{task}_{variant}.onnx, the CLI's reports and logs,
and out/ocr/results.json (every number, per set; a run of one task keeps the other task's results there); prints a
markdown table (mean ± standard deviation over the sets).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _recipes beside this file (no onnxcomq import)

from _recipes import cli_args  # noqa: E402

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
MODELS = {"rec": "ch_PP-OCRv4_rec_infer.onnx", "det": "ch_PP-OCRv4_det_infer.onnx",
          "cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx"}
DEFAULT_VARIANTS = ["w8:--bits 8", "w4:--bits 4", "w4-rtn:--bits 4 --method rtn"]
REC_H = 48
REC_MIN_W = 320
REC_BATCH = 6


# ---------------------------------------------------------------------------------------------------------- models
def find_model_dir(model_dir: str | None) -> str:
    """``model_dir`` itself, or the models/ folder of the installed rapidocr_onnxruntime package (not imported)."""
    if model_dir:
        return model_dir
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("rapidocr_onnxruntime is not installed: pip install --no-deps rapidocr-onnxruntime==1.4.4 "
                         "(or give --model-dir)")
    return os.path.join(list(spec.submodule_search_locations)[0], "models")


def session(path: str, threads: int = 0):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def rec_dictionary(path: str) -> list[str]:
    """rapidocr's CTCLabelDecode classes: blank, the model's 'character' metadata, space."""
    import onnx

    m = onnx.load(path, load_external_data=False)
    meta = {p.key: p.value for p in m.metadata_props}
    if "character" not in meta:
        raise SystemExit(f"{path}: no 'character' metadata (not rapidocr's PP-OCRv4 recognizer?)")
    return ["blank"] + meta["character"].splitlines() + [" "]


# ------------------------------------------------------------------------------------------------------------ text
def package_texts(path: str) -> dict[str, list[str]]:
    """Package name -> its description paragraphs (short description, then the long one's lines joined)."""
    out: dict[str, list[str]] = {}
    name, desc, cur = None, None, []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f.read().splitlines() + [""]:
            if line.startswith("Package: "):
                name = line[9:].strip()
            elif line.startswith("Description: "):
                desc = [line[13:].strip()]
                cur = []
            elif desc is not None and line.startswith(" "):
                s = line.strip()
                if s == ".":
                    if cur:
                        desc.append(" ".join(cur))
                    cur = []
                else:
                    cur.append(s)
            elif desc is not None:
                if cur:
                    desc.append(" ".join(cur))
                if name:
                    out[name] = desc
                desc, cur = None, []
            if line == "":
                name = None
    return out


def chop(paragraph: str, rng: np.random.Generator, lo: int = 8, hi: int = 40) -> list[str]:
    """Cut a paragraph into lines of lo..hi printable-ASCII characters at word boundaries."""
    text = re.sub(r"[^\x21-\x7e]+", " ", paragraph).strip()
    words, lines, cur = text.split(), [], ""
    target = int(rng.integers(lo, hi + 1))
    for w in words:
        if len(w) > hi:
            continue
        nxt = f"{cur} {w}" if cur else w
        if len(nxt) > target and len(cur) >= lo:
            lines.append(cur)
            cur, target = w, int(rng.integers(lo, hi + 1))
        else:
            cur = nxt
    if len(cur) >= lo:
        lines.append(cur)
    return lines


def split_of(name: str, nsplits: int) -> int:
    return int(hashlib.sha1(name.encode()).hexdigest(), 16) % nsplits


def text_splits(path: str, nsets: int, seed: int) -> list[list[str]]:
    """[calibration lines, eval set 1 lines, ...]: packages split by name hash, lines deduplicated across splits."""
    rng = np.random.default_rng(seed)
    splits: list[list[str]] = [[] for _ in range(nsets + 1)]
    seen: set[str] = set()
    for name, paras in sorted(package_texts(path).items()):
        k = split_of(name, nsets + 1)
        for p in paras:
            for ln in chop(p, rng):
                if ln not in seen:
                    seen.add(ln)
                    splits[k].append(ln)
    for s in splits:
        rng.shuffle(s)
    return splits


# ----------------------------------------------------------------------------------------------------------- fonts
def font_splits(font_dir: str) -> tuple[list[str], list[str], str]:
    """(calibration fonts, evaluation fonts, how): DejaVu for calibration, the other families for evaluation."""
    fonts = []
    for d, _, files in os.walk(font_dir):
        for f in files:
            if f.lower().endswith((".ttf", ".otf")) and "math" not in f.lower():
                fonts.append(os.path.join(d, f))
    fonts.sort()
    if not fonts:
        raise SystemExit(f"no .ttf/.otf fonts under {font_dir}")
    base = [f for f in fonts if os.path.basename(f).startswith("DejaVu")]
    other = [f for f in fonts if f not in base and _latin_font(f)]
    if base and other:
        return base, other, "calibration: DejaVu; evaluation: other families"
    serif = [f for f in fonts if re.search(r"Serif|Mono", os.path.basename(f))]
    sans = [f for f in fonts if f not in serif]
    if sans and serif:
        return sans, serif, "one family only: calibration sans, evaluation serif/mono"
    return fonts, fonts, "fonts shared between calibration and evaluation (one kind only)"


def _latin_font(path: str) -> bool:
    from PIL import ImageFont

    try:
        return ImageFont.truetype(path, 20).getbbox("Ag0")[2] > 0
    except Exception:
        return False


# ------------------------------------------------------------------------------------------------------- rendering
def _degrade(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Blur, down-and-up sampling, Gaussian noise on a uint8 grey image."""
    import cv2

    h, w = img.shape
    x = img.astype(np.float32)
    if rng.random() < 0.6:
        x = cv2.GaussianBlur(x, (0, 0), float(rng.uniform(0.3, 1.1)))
    if rng.random() < 0.4:
        f = float(rng.uniform(0.55, 0.9))
        small = cv2.resize(x, (max(1, int(w * f)), max(1, int(h * f))), interpolation=cv2.INTER_AREA)
        x = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    x = x + rng.normal(0, float(rng.uniform(0, 10)), x.shape)
    return np.clip(x, 0, 255).astype(np.uint8)


def _background(h: int, w: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    bg = float(rng.uniform(170, 255))
    ink = int(rng.uniform(0, 90))
    gx = np.linspace(0, float(rng.uniform(-40, 40)), w, dtype=np.float32)
    gy = np.linspace(0, float(rng.uniform(-30, 30)), h, dtype=np.float32)
    return np.clip(bg + gx[None, :] + gy[:, None], ink + 60, 255), ink


def render_line(text: str, font_path: str, rng: np.random.Generator) -> np.ndarray:
    """One text line, cropped to its ink plus a margin, as an H x W x 3 uint8 BGR image."""
    from PIL import Image, ImageDraw, ImageFont

    size = int(rng.integers(20, 44))
    font = ImageFont.truetype(font_path, size)
    l, t, r, b = font.getbbox(text)
    pad = size
    w, h = r - l + 2 * pad, b - t + 2 * pad
    bgarr, ink = _background(h, w, rng)
    im = Image.fromarray(bgarr.astype(np.uint8), "L")
    ImageDraw.Draw(im).text((pad - l, pad - t), text, font=font, fill=ink)
    arr = _degrade(np.asarray(im), rng)
    # crop to the ink box with a margin of 5..25 % of the line height on each side (a detector's crop)
    m = lambda: int(round((b - t) * float(rng.uniform(0.05, 0.25))))  # noqa: E731
    y0, y1 = max(0, pad - m()), min(h, pad + (b - t) + m())
    x0, x1 = max(0, pad - m()), min(w, pad + (r - l) + m())
    crop = arr[y0:y1, x0:x1]
    return np.repeat(crop[:, :, None], 3, axis=2)


def rec_input(img: np.ndarray, width: int | None = None) -> np.ndarray:
    """rapidocr's TextRecognizer.resize_norm_img: (3, 48, W) float32, W = max(320, ceil(48 w / h)) unless given."""
    import cv2

    h, w = img.shape[:2]
    ratio = w / float(h)
    img_w = width if width else max(REC_MIN_W, int(math.ceil(REC_H * ratio)))
    rw = min(img_w, int(math.ceil(REC_H * ratio)))
    x = cv2.resize(img, (rw, REC_H)).astype(np.float32).transpose(2, 0, 1) / 255
    out = np.zeros((3, REC_H, img_w), np.float32)
    out[:, :, :rw] = (x - 0.5) / 0.5
    return out


def render_page(lines: list[str], fonts: list[str], rng: np.random.Generator, hw: tuple[int, int]):
    """A page with the given lines placed without overlap; (H x W x 3 uint8, ground-truth boxes [x0, y0, x1, y1])."""
    from PIL import Image, ImageDraw, ImageFont

    H, W = hw
    bgarr, ink = _background(H, W, rng)
    im = Image.fromarray(bgarr.astype(np.uint8), "L")
    draw = ImageDraw.Draw(im)
    taken = np.zeros((H, W), bool)
    boxes = []
    for text in lines:
        font = ImageFont.truetype(fonts[int(rng.integers(len(fonts)))], int(rng.integers(16, 40)))
        l, t, r, b = font.getbbox(text)
        if r - l >= W - 16:
            continue
        for _ in range(30):
            x = int(rng.integers(8, W - 8 - (r - l)))
            y = int(rng.integers(8, max(9, H - 8 - (b - t))))
            box = [x, y, x + r - l, y + b - t]
            gap = max(6, (b - t) // 2)
            if box[3] > H - 8 or taken[max(0, box[1] - gap):box[3] + gap, max(0, box[0] - gap):box[2] + gap].any():
                continue
            taken[box[1]:box[3], box[0]:box[2]] = True
            draw.text((x - l, y - t), text, font=font, fill=ink)
            boxes.append(box)
            break
    arr = _degrade(np.asarray(im), rng)
    return np.repeat(arr[:, :, None], 3, axis=2), np.array(boxes, np.float32).reshape(-1, 4)


def det_input(img: np.ndarray) -> np.ndarray:
    """rapidocr's DetPreProcess for a page whose sides are multiples of 32: (3, H, W) in [-1, 1]."""
    assert img.shape[0] % 32 == 0 and img.shape[1] % 32 == 0
    return ((img.astype(np.float32) / 255 - 0.5) / 0.5).transpose(2, 0, 1)


# ------------------------------------------------------------------------------------------------------- datasets
def build_rec(texts, cal_fonts, ev_fonts, n_cal, n_eval, cal_width, seed):
    rng = np.random.default_rng(seed + 1)
    cal, cal_text = [], []
    for t in texts[0]:
        if len(cal) == n_cal:
            break
        img = render_line(t, cal_fonts[int(rng.integers(len(cal_fonts)))], rng)
        if REC_H * img.shape[1] / img.shape[0] > cal_width:  # would be squeezed: not what rapidocr feeds
            continue
        cal.append(rec_input(img, cal_width))
        cal_text.append(t)
    sets = []
    for k, lines in enumerate(texts[1:]):
        rng_k = np.random.default_rng(seed + 100 + k)
        items = []
        for t in lines[:n_eval]:
            img = render_line(t, ev_fonts[int(rng_k.integers(len(ev_fonts)))], rng_k)
            items.append((t, img))
        sets.append(items)
    return np.stack(cal), cal_text, sets


def build_det(texts, cal_fonts, ev_fonts, n_cal, n_eval, cal_hw, seed):
    rng = np.random.default_rng(seed + 2)
    pool = iter(texts[0][::-1])  # the other end of the calibration lines than the recognizer's
    cal = []
    for _ in range(n_cal):
        lines = [next(pool) for _ in range(int(rng.integers(6, 15)))]
        cal.append(det_input(render_page(lines, cal_fonts, rng, cal_hw)[0]))
    sets = []
    for k, lines_k in enumerate(texts[1:]):
        rng_k = np.random.default_rng(seed + 200 + k)
        pool_k = iter(lines_k[::-1])
        items = []
        for _ in range(n_eval):
            hw = (736, 32 * int(rng_k.integers(23, 33)))  # 736 x 736..1024: rapidocr's min side, no resize
            lines = [next(pool_k) for _ in range(int(rng_k.integers(6, 15)))]
            img, boxes = render_page(lines, ev_fonts, rng_k, hw)
            items.append((boxes, det_input(img)))
        sets.append(items)
    return np.stack(cal), sets


# -------------------------------------------------------------------------------------------------------- metrics
def levenshtein(a: str, b: str) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def ctc_decode(probs: np.ndarray, chars: list[str]) -> str:
    """rapidocr's CTCLabelDecode: argmax per frame, merge repeats, drop blanks (class 0)."""
    idx = probs.argmax(-1)
    keep = np.ones(len(idx), bool)
    keep[1:] = idx[1:] != idx[:-1]
    keep &= idx != 0
    return "".join(chars[i] for i in idx[keep])


def cer(preds: list[str], refs: list[str], spaces: bool = False) -> float:
    """Character error rate; without ``spaces`` the spaces are removed from both texts first."""
    if not spaces:
        preds, refs = [p.replace(" ", "") for p in preds], [r.replace(" ", "") for r in refs]
    return sum(levenshtein(p, r) for p, r in zip(preds, refs)) / max(1, sum(len(r) for r in refs))


def db_boxes(prob: np.ndarray, thresh=0.3, box_thresh=0.5, unclip=1.6, min_size=3) -> np.ndarray:
    """rapidocr's DBPostProcess (fast score, dilation) on one (H, W) map, as axis-aligned boxes [x0, y0, x1, y1]."""
    import cv2

    H, W = prob.shape
    mask = cv2.dilate((prob > thresh).astype(np.uint8), np.ones((2, 2), np.uint8))
    contours = cv2.findContours(mask * 255, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)[-2]
    out = []
    for c in contours[:1000]:
        (cx, cy), (w, h), ang = cv2.minAreaRect(c)
        if min(w, h) < min_size:
            continue
        pts = cv2.boxPoints(((cx, cy), (w, h), ang))
        x0, y0 = np.clip(np.floor(pts.min(0)).astype(int), 0, [W - 1, H - 1])
        x1, y1 = np.clip(np.ceil(pts.max(0)).astype(int), 0, [W - 1, H - 1])
        m = np.zeros((y1 - y0 + 1, x1 - x0 + 1), np.uint8)
        cv2.fillPoly(m, [(pts - [x0, y0]).astype(np.int32)], 1)
        if cv2.mean(prob[y0:y1 + 1, x0:x1 + 1], m)[0] < box_thresh:
            continue
        d = w * h * unclip / (2 * (w + h))  # pyclipper's offset distance for the box
        pts = cv2.boxPoints(((cx, cy), (w + 2 * d, h + 2 * d), ang))
        if min(w, h) + 2 * d < min_size + 2:
            continue
        lo = np.clip(pts.min(0), 0, [W - 1, H - 1])
        hi = np.clip(pts.max(0), 0, [W - 1, H - 1])
        if hi[0] - lo[0] <= 3 or hi[1] - lo[1] <= 3:
            continue
        out.append([lo[0], lo[1], hi[0], hi[1]])
    return np.array(out, np.float32).reshape(-1, 4)


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)))
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = lambda z: (z[:, 2] - z[:, 0]) * (z[:, 3] - z[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def match_counts(pred: np.ndarray, gt: np.ndarray, thr: float = 0.5) -> tuple[int, int, int, list]:
    """(true positives, predicted, ground truth, IoUs of the matches) with greedy one-to-one matching by IoU."""
    iou = iou_matrix(pred, gt)
    ious = []
    while iou.size and iou.max() >= thr:
        i, j = np.unravel_index(iou.argmax(), iou.shape)
        ious.append(float(iou[i, j]))
        iou[i, :] = -1
        iou[:, j] = -1
    return len(ious), len(pred), len(gt), ious


def f1(counts) -> float:
    tp, np_, ng = (sum(c[i] for c in counts) for i in range(3))
    return 2 * tp / max(1, np_ + ng)


# ------------------------------------------------------------------------------------------------------ inference
def run_rec(path: str, sets, threads: int, batch: int = REC_BATCH):
    """rapidocr's TextRecognizer: lines sorted by aspect ratio, batches of 6 padded to the widest; outputs per line."""
    s = session(path, threads)
    name = s.get_inputs()[0].name
    outs = []
    for items in sets:
        ratios = [img.shape[1] / img.shape[0] for _, img in items]
        order = np.argsort(ratios, kind="stable")
        res = [None] * len(items)
        for b in range(0, len(order), batch):
            idx = order[b:b + batch]
            width = int(REC_H * max(REC_MIN_W / REC_H, max(ratios[i] for i in idx)))
            x = np.stack([rec_input(items[i][1], width) for i in idx])
            y = s.run(None, {name: x})[0]
            for i, yi in zip(idx, y):
                res[i] = yi
        outs.append(res)
    return outs


def run_det(path: str, sets, threads: int):
    s = session(path, threads)
    name = s.get_inputs()[0].name
    return [[s.run(None, {name: x[None]})[0][0, 0] for _, x in items] for items in sets]


def eval_rec(outs, float_outs, sets, chars):
    res = []
    for k, items in enumerate(sets):
        refs = [t for t, _ in items]
        pred = [ctc_decode(o, chars) for o in outs[k]]
        r = {"cer": cer(pred, refs), "cer_with_spaces": cer(pred, refs, spaces=True),
             "line_acc": float(np.mean([p.replace(" ", "") == t.replace(" ", "") for p, t in zip(pred, refs)])),
             "finite": bool(all(np.isfinite(o).all() for o in outs[k]))}
        if float_outs is not None:
            fpred = [ctc_decode(o, chars) for o in float_outs[k]]
            r["same_text_as_float"] = float(np.mean([p == q for p, q in zip(pred, fpred)]))
            r["cer_vs_float"] = cer(pred, fpred, spaces=True)
            r["frame_argmax_agreement"] = float(np.mean(np.concatenate(
                [o.argmax(-1) == f.argmax(-1) for o, f in zip(outs[k], float_outs[k])])))
            r["cosine"] = float(np.mean([np.sum(o * f) / (np.linalg.norm(o) * np.linalg.norm(f) + 1e-30)
                                         for o, f in zip(outs[k], float_outs[k])]))
        res.append(r)
    return res


def eval_det(outs, float_outs, sets):
    res = []
    for k, items in enumerate(sets):
        boxes = [db_boxes(o) if np.isfinite(o).all() else np.zeros((0, 4), np.float32) for o in outs[k]]
        r = {"box_f1": f1([match_counts(b, gt) for b, (gt, _) in zip(boxes, items)]),
             "matched_iou": float(np.mean(sum((match_counts(b, gt)[3] for b, (gt, _) in zip(boxes, items)), [])
                                          or [0.0])),
             "boxes": int(sum(len(b) for b in boxes)), "gt_boxes": int(sum(len(gt) for gt, _ in items)),
             "finite": bool(all(np.isfinite(o).all() for o in outs[k]))}
        if float_outs is not None:
            fboxes = [db_boxes(o) for o in float_outs[k]]
            r["box_f1_vs_float"] = f1([match_counts(b, fb) for b, fb in zip(boxes, fboxes)])
            r["prob_mad_vs_float"] = float(np.mean([np.abs(o - f).mean() for o, f in zip(outs[k], float_outs[k])]))
        res.append(r)
    return res


# ----------------------------------------------------------------------------------------------------------- main
def onnxcomq_cli() -> list[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "onnxcomq")
    if os.path.exists(exe):
        return [exe]
    return [shutil.which("onnxcomq") or "onnxcomq"]


def quantize(model: str, out: str, calib: str, flags: str, report: str, log: str) -> dict:
    cmd = onnxcomq_cli() + ["quantize", model, "-o", out, "--calib", calib, "--report", report, "--quiet"]
    cmd += cli_args(shlex.split(flags), os.path.splitext(out)[0] + ".recipe.json")
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    with open(log, "w") as f:
        f.write(f"$ {shlex.join(cmd)}\n{p.stdout}\n{p.stderr}\nexit {p.returncode}\n")
    shown = [os.path.relpath(c, ROOT) if os.path.isabs(c) and c.startswith(ROOT) else c for c in cmd]
    return {"command": shlex.join(["onnxcomq"] + shown[1:]), "rc": p.returncode, "wall_s": round(wall, 1),
            "stderr_tail": p.stderr.strip().splitlines()[-3:], "log": os.path.relpath(log, ROOT)}


def ms(vals) -> str:
    v = np.array([x for x in vals if x is not None and np.isfinite(x)], float)
    if not len(v):
        return "-"
    return f"{v.mean():.4f} ± {v.std(ddof=1) if len(v) > 1 else 0:.4f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=["rec", "det", "both"], default="both")
    ap.add_argument("--model-dir", help="folder with the rapidocr .onnx models (default: the installed package's)")
    ap.add_argument("--out", default=os.path.join(ROOT, "out", "ocr"))
    ap.add_argument("--variant", action="append", metavar="NAME:FLAGS",
                    help="a quantized model: NAME, then the onnxcomq quantize flags (repeatable; default: "
                         + ", ".join(repr(v) for v in DEFAULT_VARIANTS) + ")")
    ap.add_argument("--sets", type=int, default=3, help="disjoint evaluation sets (default 3)")
    ap.add_argument("--rec-calib", type=int, default=64, help="calibration text lines (default 64)")
    ap.add_argument("--rec-eval", type=int, default=200, help="text lines per evaluation set (default 200)")
    ap.add_argument("--rec-calib-width", type=int, default=480, help="width of the calibration lines (default 480)")
    ap.add_argument("--det-calib", type=int, default=16, help="calibration pages (default 16)")
    ap.add_argument("--det-calib-size", type=int, nargs=2, default=[640, 640], metavar=("H", "W"))
    ap.add_argument("--det-eval", type=int, default=20, help="pages per evaluation set (default 20)")
    ap.add_argument("--text-source", default="/var/lib/dpkg/status")
    ap.add_argument("--font-dir", default="/usr/share/fonts/truetype")
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime threads for the evaluation (0: default)")
    ap.add_argument("--reuse", action="store_true", help="keep quantized models already in --out")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)

    model_dir = find_model_dir(a.model_dir)
    tasks = ["rec", "det"] if a.task == "both" else [a.task]
    variants = [v.split(":", 1) if ":" in v else (v, "") for v in (a.variant or DEFAULT_VARIANTS)]
    os.makedirs(a.out, exist_ok=True)
    t0 = time.perf_counter()
    texts = text_splits(a.text_source, a.sets, a.seed)
    cal_fonts, ev_fonts, how = font_splits(a.font_dir)
    print(f"text lines per split (calibration, eval 1..{a.sets}): {[len(t) for t in texts]}; fonts: {how} "
          f"({len(cal_fonts)} calibration, {len(ev_fonts)} evaluation)")
    results = {"model_dir": model_dir, "sets": a.sets, "seed": a.seed, "fonts": {
        "how": how, "calibration": [os.path.basename(f) for f in cal_fonts],
        "evaluation": [os.path.basename(f) for f in ev_fonts]}, "tasks": {}}
    rc = 0
    for task in tasks:
        model = os.path.join(model_dir, MODELS[task])
        t = time.perf_counter()
        if task == "rec":
            cal, _, sets = build_rec(texts, cal_fonts, ev_fonts, a.rec_calib, a.rec_eval, a.rec_calib_width, a.seed)
            data = {"calibration": f"{len(cal)} lines, input {tuple(cal.shape[1:])}",
                    "evaluation": f"{a.sets} sets x {len(sets[0])} lines, batches of {REC_BATCH} as rapidocr"}
        else:
            cal, sets = build_det(texts, cal_fonts, ev_fonts, a.det_calib, a.det_eval, tuple(a.det_calib_size),
                                  a.seed)
            data = {"calibration": f"{len(cal)} pages, input {tuple(cal.shape[1:])}",
                    "evaluation": f"{a.sets} sets x {len(sets[0])} pages of 736 x 736..1024, "
                                  f"{sum(len(b) for s in sets for b, _ in s)} lines"}
        calib = os.path.join(a.out, f"{task}_calib.npz")
        np.savez(calib, x=cal.astype(np.float32))
        data["build_s"] = round(time.perf_counter() - t, 1)
        print(f"[{task}] data: {data}")
        runner = run_rec if task == "rec" else run_det
        chars = rec_dictionary(model) if task == "rec" else None
        t = time.perf_counter()
        fouts = runner(model, sets, a.threads)
        rows = {"float": {"per_set": eval_rec(fouts, None, sets, chars) if task == "rec"
                          else eval_det(fouts, None, sets), "eval_s": round(time.perf_counter() - t, 1)}}
        for name, flags in variants:
            qpath = os.path.join(a.out, f"{task}_{name}.onnx")
            row: dict = {"flags": flags}
            if not (a.reuse and os.path.exists(qpath)):
                row.update(quantize(model, qpath, calib, flags, os.path.join(a.out, f"{task}_{name}.report.json"),
                                    os.path.join(a.out, f"{task}_{name}.log")))
                print(f"[{task}] {name}: {row['command']} -> exit {row['rc']} in {row['wall_s']} s")
                if row["rc"] != 0:
                    print("   " + "\n   ".join(row["stderr_tail"]))
                    rows[name] = row
                    rc = 1
                    continue
            t = time.perf_counter()
            try:
                outs = runner(qpath, sets, a.threads)
            except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                row["error"] = f"{type(e).__name__}: {e}"
                print(f"[{task}] {name}: onnxruntime failed: {row['error']}")
                rows[name] = row
                rc = 1
                continue
            row["per_set"] = eval_rec(outs, fouts, sets, chars) if task == "rec" else eval_det(outs, fouts, sets)
            row["eval_s"] = round(time.perf_counter() - t, 1)
            row["size_bytes"] = os.path.getsize(qpath)
            if not all(r["finite"] for r in row["per_set"]):
                print(f"[{task}] {name}: NaN/Inf in the outputs")
                rc = 1
            rows[name] = row
        results["tasks"][task] = {"model": MODELS[task], "size_bytes": os.path.getsize(model), "data": data,
                                  "rows": rows}
        print(table(task, rows))
    results["total_s"] = round(time.perf_counter() - t0, 1)
    path = os.path.join(a.out, "results.json")
    if os.path.exists(path):  # keep the other task's results from an earlier run
        try:
            with open(path) as f:
                old = json.load(f)
            results["tasks"] = {**old.get("tasks", {}), **results["tasks"]}
        except (OSError, ValueError):
            pass
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {os.path.relpath(os.path.join(a.out, 'results.json'), ROOT)} ({results['total_s']} s)")
    return rc


def table(task: str, rows: dict) -> str:
    if task == "rec":
        cols = [("CER", "cer"), ("line accuracy", "line_acc"), ("same text as float", "same_text_as_float"),
                ("CER vs float text", "cer_vs_float"), ("frame argmax agreement", "frame_argmax_agreement")]
    else:
        cols = [("box F1 (IoU 0.5)", "box_f1"), ("box F1 vs float boxes", "box_f1_vs_float"),
                ("prob. map MAD vs float", "prob_mad_vs_float")]
    lines = [f"\n{task}: mean ± standard deviation over the evaluation sets",
             "| model | " + " | ".join(c for c, _ in cols) + " | quantize s |",
             "|---" * (len(cols) + 2) + "|"]
    for name, r in rows.items():
        if "per_set" not in r:
            lines.append(f"| {name} | failed: {r.get('error') or ' '.join(r.get('stderr_tail', []))} |")
            continue
        vals = [ms([s.get(k) for s in r["per_set"]]) for _, k in cols]
        lines.append(f"| {name} | " + " | ".join(vals) + f" | {r.get('wall_s', '-')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
