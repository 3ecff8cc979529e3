#!/usr/bin/env python
"""A detector at W4: box agreement of the quantized NudeNet detector with the float one, on disjoint evaluation sets
(issue 16, "a detector export at W4: box agreement with float >= 0.95", with the evaluation discipline of
tools/bench/heldout.py).

The model: NudeNet 3.4.2's 320n.onnx (an Ultralytics 8.2.46 YOLOv8n export: 64 Conv, 3.0 M weights, input "images"
[N,3,H,W] float, output "output0" [N,22,2100] at 320x320: 4 box coordinates (centre x, centre y, w, h in input pixels)
and 18 class scores (faces, body parts), no objectness). It comes from the wheel, without nudenet's dependencies:

    pip download nudenet==3.4.2 --no-deps -d /tmp/nn        # 10.6 MB
    python tools/bench/detector.py --wheel /tmp/nn/nudenet-3.4.2-py3-none-any.whl    # -> out/detector/, then runs

Pre- and post-processing as nudenet.py does them, in numpy (cv2 for the resize; checked to give nudenet.py's input
and boxes exactly, with --channels bgr): pad the photo at the bottom and right
with black to a square, resize to 320x320 (cv2 INTER_LINEAR), /255, NCHW; decode: a candidate where the highest class
score >= 0.2, box to corners, clipped to the photo, then one class-agnostic NMS (cv2.dnn.NMSBoxes(boxes, scores,
0.25, 0.45): score >= 0.25, IoU > 0.45 suppressed). Boxes are compared in the 320x320 input's pixels (NudeNet scales
them to the photo, a uniform scale: the same IoU). Channel order: RGB (--channels rgb, the order Ultralytics trains
in). nudenet.py 3.4.2 reads a file with cv2 (BGR), converts with COLOR_RGBA2BGR (which swaps to RGB) and then swaps
again in blobFromImage(swapRB=True), so it feeds the model BGR; --channels bgr reproduces that. On the whole photos
RGB gives the higher face scores (astronaut 0.81 vs 0.72, grace_hopper 0.76 vs 0.61).

Data: the photo sources of tools/bench/heldout.py (tools/export/efficientnet.py finds them; its docstring says how to
get each), split by SOURCE, photos loaded as that exporter does (short side shrunk to <= 1024, antialiased):

    calibration   opencv                                      25 photos, 20 scenes   --calib-crops (64)
    development   plasma-wallpapers                           10 photos              --eval-crops (240)
    E1 libraries  scikit-image + matplotlib + scikit-learn     9 photos, 8 scenes    --eval-crops
    E2 darknet    darknet                                      6 photos              --eval-crops
    E3 mate       mate-backgrounds                            12 photos              --eval-crops
    E4 lomiri     lomiri-wallpapers                           15 photos              --eval-crops

Each set is --eval-crops views of its photos, round robin: each photo's first view the whole photo, the others
random crops (area fraction U(--min-scale, 1), aspect ratio log-uniform in [3/4, 4/3]) flipped left-right with
probability 1/2, seeded. Few of these photos show people (astronaut and grace_hopper in E1, person in E2, messi5 in
the calibration set); the other boxes are what the float detector finds on animals, flowers and landscapes at its own
thresholds. The metric is still well defined on them (agreement with float, not accuracy), but most sets hold few
boxes: the tables say how many.

Metric, per set, over the float model's boxes (NudeNet's output above, score >= 0.25 after NMS; --score changes both
models' threshold): "box agreement" = the mean over the float boxes of the best IoU with a quantized box of the same
class in the same view (0 where there is none), the issue's definition. Also: "symmetric" = the same over the float
and the quantized boxes pooled (each quantized box's best IoU with a float box of its class: boxes the float model
does not find count too), "any class" = the first with the class ignored, "match@0.5" = the share of float boxes with
a same-class quantized box at IoU >= 0.5, "tolerant" = the first against the quantized boxes decoded at half the
score threshold (a float box at 0.26 whose quantized score is 0.24 is lost by the first, not by this one: the gap
between the two is the threshold's flicker, the rest is boxes that moved or changed class), "confident" = the first
over the float boxes with score >= 0.5 only (most boxes of these photos score 0.25-0.5). Summary over the
evaluation sets: mean ± std (ddof 1), the standard error of that mean (std / sqrt(K)), min-max; the development set
is shown, not in the mean. "vs default": per evaluation
set, the paired difference of the per-float-box best IoU (the float boxes are the same for every recipe), with its
standard error clustered by photo scene.

Each recipe is quantized once on the calibration views (written to out/detector/calib.npz, key "images"); the float
model's one-pass statistics are captured once and shared (``onnxcomq.run(..., stats_cache=...)``), so only the first
one-pass recipe's time includes the capture. Recipes as in heldout.py: ``--variant LABEL:NAME=VALUE,...`` (flat
names of tools/bench/_recipes.py or SECTION.FIELD, plus preset= and bits=). The head: /model.22/* (Ultralytics'
Detect: per scale two 3x3 convs and a 1x1 conv for the box distribution (cv2.*) and for the classes (cv3.*), and the
DFL's fixed 1x16 conv), 19 of the 64 convs, 0.75 M of the 3.0 M weights.

    python tools/bench/detector.py --eval-crops 480                  # out/detector/detector.{md,json}
    python tools/bench/detector.py --sets dev --dev-crops 2000 --out out/detector/dev \
        --variant default: --variant 'W7:bits=7' --variant "stem 8-bit:layers.layer_bits=('/model.[0-4]/*=8',)"
    python tools/bench/detector.py --render out/detector/detector.json

--sets dev evaluates the development set only (for choosing a recipe or a constant without seeing the evaluation
sets; the plasma photos give few boxes: 31 in 480 views, 113 in 2000). The rows "stem 8-bit" (/model.[0-4]/* at 8
bits: the layers that mixed precision raises first) and W6 of DEFAULT_VARIANTS were added after that search.
Needs numpy, onnx, onnxruntime, opencv (cv2), PIL and the photos.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import zipfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "tools", "export"))

from eval_imagenet_agreement import session  # noqa: E402 (sets path)
from heldout import IMAGE_SETS, cluster_se, git_state, make_recipe, parse_variant, save_results, spread  # noqa: E402

MODEL = os.path.join("out", "detector", "nudenet_320n.onnx")
SIZE = 320
CAND_SCORE, NMS_SCORE, NMS_IOU = 0.2, 0.25, 0.45  # nudenet.py's _postprocess
CONFIDENT = 0.5  # the "confident" metric's float boxes
LABELS = ["FEMALE_GENITALIA_COVERED", "FACE_FEMALE", "BUTTOCKS_EXPOSED", "FEMALE_BREAST_EXPOSED",
          "FEMALE_GENITALIA_EXPOSED", "MALE_BREAST_EXPOSED", "ANUS_EXPOSED", "FEET_EXPOSED", "BELLY_COVERED",
          "FEET_COVERED", "ARMPITS_COVERED", "ARMPITS_EXPOSED", "FACE_MALE", "BELLY_EXPOSED", "MALE_GENITALIA_EXPOSED",
          "ANUS_COVERED", "FEMALE_BREAST_COVERED", "BUTTOCKS_COVERED"]
HEAD = "/model.22/*"
STEM = "/model.[0-4]/*"  # the first 5 blocks (stride 2..8): 13 convs, 80 k of the 3.0 M weights
DEFAULT_VARIANTS = ["RTN:weights.method=rtn", "default:", "one pass:sequential=False",
                    "avg 4.25 bits:mixed_precision.avg_bits=4.25", f"head float:layers.exclude=('{HEAD}',)",
                    f"stem 8-bit:layers.layer_bits=('{STEM}=8',)", "W6:bits=6", "W8 RTN:bits=8,weights.method=rtn",
                    "W8:bits=8"]
METRICS = [("f2q", "box agreement (mean best IoU, float boxes, same class)"),
           ("sym", "symmetric (float and quantized boxes pooled)"),
           ("any", "any class (float boxes, class ignored)"),
           ("m50", "match@0.5 (share of float boxes)"),
           ("tol", "tolerant (float boxes against the quantized ones at half the score threshold)"),
           ("conf", "confident (float boxes with score >= 0.5 only)")]


# ------------------------------------------------------------------------------------------------- model
def extract(wheel: str, dest: str, member: str = "nudenet/320n.onnx") -> None:
    """Copy ``member`` of a wheel (a zip) to ``dest``."""
    with zipfile.ZipFile(wheel) as z:
        data = z.read(member)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with open(dest + ".tmp", "wb") as f:
        f.write(data)
    os.replace(dest + ".tmp", dest)
    print(f"{wheel}: {member} -> {dest} ({len(data) / 1e6:.1f} MB)")


def check_model(path: str, what: str = "NudeNet's 320n.onnx") -> str:
    """The one graph input's name of a one-input, one-output model (else exit, naming ``what`` was expected)."""
    import onnx

    m = onnx.load(path, load_external_data=False)
    inits = {t.name for t in m.graph.initializer}
    ins = [i for i in m.graph.input if i.name not in inits]
    if len(ins) != 1 or len(m.graph.output) != 1:
        raise SystemExit(f"{path}: {len(ins)} inputs, {len(m.graph.output)} outputs: not {what}")
    return ins[0].name


def infer(sess, x: np.ndarray, batch: int = 16) -> np.ndarray:
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: to_input(x[i:i + batch])})[0] for i in range(0, len(x), batch)])


# ------------------------------------------------------------------------------------------------- data
def letterbox(rgb: np.ndarray, channels: str) -> tuple[np.ndarray, tuple]:
    """nudenet.py's _read_image on an RGB array, up to the scaling: black padding at the bottom and right to a square,
    resize to 320 (cv2 INTER_LINEAR, as cv2.dnn.blobFromImage does), CHW uint8 (``to_input`` divides by 255).
    Returns (x [3,320,320] uint8, the photo's extent (w, h) in x's pixels)."""
    import cv2

    h, w = rgb.shape[:2]
    m = max(h, w)
    pad = cv2.copyMakeBorder(np.ascontiguousarray(rgb if channels == "rgb" else rgb[:, :, ::-1]), 0, m - h, 0, m - w,
                             cv2.BORDER_CONSTANT)
    x = cv2.resize(pad, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR)
    return x.transpose(2, 0, 1), (w * SIZE / m, h * SIZE / m)


def to_input(x: np.ndarray) -> np.ndarray:
    """uint8 views -> the model's float input (blobFromImage's scalefactor 1/255)."""
    return x.astype(np.float32) * np.float32(1 / 255.0)


def photo_crops(photos: list[dict], n: int, seed: int, min_scale: float, full_first: bool):
    """n crops spread evenly over the photos (round robin, photo order shuffled by seed), as make_crops in
    tools/export/efficientnet.py: yields (k, rng, photo, box, crop as a PIL image, whether it is the whole photo),
    the rng for the caller's own draws on each view (after the crop's)."""
    import efficientnet as E

    rng = np.random.default_rng(seed)
    order = [photos[i] for i in rng.permutation(len(photos))]
    seen, cache = set(), {}
    for k in range(n):
        p = order[k % len(order)]
        if p["path"] not in cache:
            cache[p["path"]] = E.load_photo(p["path"])
        im = cache[p["path"]]
        whole = full_first and p["path"] not in seen
        box = (0, 0, im.width, im.height) if whole else E.random_crop_box(rng, im.width, im.height, min_scale)
        seen.add(p["path"])
        yield k, rng, p, box, im.crop((box[0], box[1], box[0] + box[2], box[1] + box[3])), whole


def make_views(photos: list[dict], n: int, seed: int, min_scale: float, full_first: bool, channels: str):
    """n views (photo_crops; a crop not the whole photo mirrored with probability 1/2), letterboxed as NudeNet
    does instead of centre-cropped."""
    x = np.empty((n, 3, SIZE, SIZE), np.uint8)
    meta = []
    for k, rng, p, box, crop, whole in photo_crops(photos, n, seed, min_scale, full_first):
        flip = False if whole else bool(rng.random() < 0.5)
        crop = np.asarray(crop)
        if flip:
            crop = crop[:, ::-1]
        x[k], extent = letterbox(crop, channels)
        meta.append({"photo": p["name"], "box": list(box), "flip": flip, "extent": extent})
    return x, meta


def image_sets(a, views=None) -> list[dict]:
    """The calibration set and the development and evaluation sets (heldout.py's IMAGE_SETS, split by photo source;
    ``a.sets == "dev"``: the development set only), each's views made by ``views(photos, n, seed, calibration)``
    (default: NudeNet's letterboxed views, ``make_views``) -> (x, meta with each view's "photo")."""
    import efficientnet as E

    if views is None:
        def views(ph, n, seed, calib):
            return make_views(ph, n, seed, a.min_scale, not calib, a.channels)

    photos = E.find_photos([], wide=True)
    out, used = [], set()
    for i, (name, role, sources) in enumerate(IMAGE_SETS):
        ph = [p for p in photos if p["source"] in sources]
        if not ph:
            raise SystemExit(f"{name}: no photos of {', '.join(sources)} found; see tools/export/efficientnet.py "
                             "--help for where they come from")
        paths = {os.path.realpath(p["path"]) for p in ph}
        if used & paths:
            raise SystemExit(f"{name}: photos already in another set: {sorted(used & paths)}")
        used |= paths
        calib = role == "calibration"
        if not calib and getattr(a, "sets", "all") == "dev" and role != "development":
            continue
        dev = getattr(a, "dev_crops", 0) or a.eval_crops
        x, meta = views(ph, a.calib_crops if calib else dev if role == "development" else a.eval_crops, a.seed + 1 + i,
                        calib)
        group = {p["name"]: p["group"] for p in ph}
        scenes = sorted(set(group.values()))
        cluster = np.array([scenes.index(group[m["photo"]]) for m in meta])
        out.append({"name": name, "role": role, "sources": list(sources), "x": x, "meta": meta, "cluster": cluster,
                    "photos": [p["name"] for p in ph], "scenes": len(scenes)})
    return out


# ------------------------------------------------------------------------------------------------- boxes
def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of corner boxes a [n,4] against b [m,4]."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda z: np.clip(z[:, 2:] - z[:, :2], 0, None).prod(-1)  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def greedy_nms(boxes: np.ndarray, best: np.ndarray, idx: np.ndarray, iou_max: float) -> list:
    """Class-agnostic NMS over the candidates ``idx``: highest score first (ties in index order), each box kept
    unless it overlaps a kept one at IoU > ``iou_max``. Returns the kept indices in that order."""
    idx = idx[np.argsort(-best[idx], kind="stable")]
    kept = []
    if len(idx):
        iou = iou_matrix(boxes[idx], boxes[idx])
        alive = np.ones(len(idx), bool)
        for i in range(len(idx)):
            if alive[i]:
                kept.append(idx[i])
                alive &= ~(iou[i] > iou_max)
    return kept


def decode(out: np.ndarray, extent: tuple, score: float) -> dict:
    """nudenet.py's _postprocess on one output [22, A], in input pixels: candidates at class score >= 0.2, corners
    clipped to the photo's extent, class-agnostic NMS (cv2.dnn.NMSBoxes: score >= ``score``, IoU > 0.45 dropped,
    highest score first), boxes clipped to nothing dropped. Returns boxes [k,4] (x1, y1, x2, y2), cls [k], score [k]."""
    o = out.T.astype(np.float64)
    cls_scores = o[:, 4:]
    best = cls_scores.max(1)
    keep = best >= min(CAND_SCORE, score)
    o, best, cls = o[keep], best[keep], cls_scores[keep].argmax(1)
    w, h = extent
    x1 = np.clip(o[:, 0] - o[:, 2] / 2, 0, w)
    y1 = np.clip(o[:, 1] - o[:, 3] / 2, 0, h)
    x2 = x1 + np.minimum(o[:, 2], w - x1)  # nudenet: w = min(w, W - x) after clipping x
    y2 = y1 + np.minimum(o[:, 3], h - y1)
    boxes = np.stack([x1, y1, x2, y2], 1)
    kept = greedy_nms(boxes, best, np.flatnonzero(best >= score), NMS_IOU)
    kept = np.array([k for k in kept if x2[k] > x1[k] and y2[k] > y1[k]], int)  # clipped to nothing: dropped
    return {"boxes": boxes[kept], "cls": cls[kept], "score": best[kept]}


def decode_all(out: np.ndarray, meta: list, score: float) -> list:
    return [decode(o, m["extent"], score) for o, m in zip(out, meta)]


def best_iou(a: dict, b: dict, same_class: bool) -> np.ndarray:
    """For each box of a, the best IoU with a box of b (of the same class if same_class), 0 where none."""
    if len(a["boxes"]) == 0:
        return np.zeros(0)
    if len(b["boxes"]) == 0:
        return np.zeros(len(a["boxes"]))
    iou = iou_matrix(a["boxes"], b["boxes"])
    if same_class:
        iou = np.where(a["cls"][:, None] == b["cls"][None, :], iou, 0.0)
    return iou.max(1)


def agreement(ref: list, got: list, got_low: list, cluster: np.ndarray) -> dict:
    """Per set: per-float-box arrays f2q (same class) and any (class ignored) with their view's cluster, the
    quantized boxes' q2f, tol (f2q against the quantized boxes at half the score threshold), and the set's metrics."""
    f2q, anyc, q2f, tol, cf, fs = [], [], [], [], [], []
    for r, g, gl, c in zip(ref, got, got_low, cluster):
        fs.append(r["score"])
        f2q.append(best_iou(r, g, True))
        anyc.append(best_iou(r, g, False))
        q2f.append(best_iou(g, r, True))
        tol.append(best_iou(r, gl, True))
        cf.append(np.full(len(r["boxes"]), c))
    f2q, anyc, q2f, tol, cf, fs = (np.concatenate(v) if v else np.zeros(0) for v in (f2q, anyc, q2f, tol, cf, fs))
    conf = f2q[fs >= CONFIDENT]
    n = len(f2q)
    pooled = np.concatenate([f2q, q2f])
    return {"items": {"f2q": f2q, "any": anyc, "cluster": cf.astype(int)},
            "f2q": float(f2q.mean()) if n else float("nan"), "sym": float(pooled.mean()) if len(pooled) else 1.0,
            "any": float(anyc.mean()) if n else float("nan"), "m50": float((f2q >= 0.5).mean()) if n else float("nan"),
            "tol": float(tol.mean()) if n else float("nan"),
            "conf": float(conf.mean()) if len(conf) else float("nan"), "n_conf": len(conf),
            "n_float": n, "n_quant": len(q2f)}


# ------------------------------------------------------------------------------------------------- report
def tables(res: dict) -> str:
    sets = res["sets"]
    ev_idx = [i for i, s in enumerate(sets) if s["role"] == "evaluation"]
    dev_idx = [i for i, s in enumerate(sets) if s["role"] == "development"]
    order = ev_idx + dev_idx
    names = " | ".join(sets[i]["name"] for i in order)
    lines = [f"Float boxes per set (score >= {res['score']}): " + ", ".join(
        f"{sets[i]['name']} {sets[i]['n_float']} ({sets[i].get('n_confident', '?')} at >= {CONFIDENT}) in "
        f"{sets[i]['views_with_boxes']} of {sets[i]['n']} views" for i in order) + ".", ""]
    for key, title in METRICS:
        lines += [f"**{title}** (mean ± std over the {len(ev_idx)} evaluation sets, standard error of the mean, "
                  "min-max; each set; the development set, not in the mean; quantize s: onnxcomq.run's wall time, "
                  "the float capture shared)", "",
                  f"| recipe | mean ± std | s.e. | min-max | {names} | quantize s |",
                  "|---|---|---|---|" + "---|" * len(order) + "---|"]
        for r in res["recipes"]:
            s = r["summary"].get(key)
            head = (f"{s['mean']:.4f} ± {s['std']:.4f} | {s['se']:.4f} | {s['min']:.4f}-{s['max']:.4f}" if s
                    else "- | - | -")
            lines.append(f"| {r['label']} | {head} | " + " | ".join(f"{r['per_set'][i][key]:.4f}" for i in order)
                         + f" | {r['seconds']:.1f} |")
        lines.append("")
    ref = res.get("reference")
    rows = [r for r in res["recipes"] if "vs_reference" in r]
    if rows and ev_idx:
        lines += [f"**vs {ref}, box agreement**: recipe minus {ref}, per evaluation set (± the paired difference's "
                  "standard error over the set's float boxes, clustered by photo scene)", "",
                  "| recipe | mean Δ | " + " | ".join(sets[i]["name"] for i in ev_idx) + " |",
                  "|---|---|" + "---|" * len(ev_idx)]
        for r in rows:
            c = r["vs_reference"]
            lines.append(f"| {r['label']} | {c['mean_delta']:+.4f} | "
                         + " | ".join(f"{d:+.4f} ± {se:.4f}" for d, se in zip(c["delta"], c["se"])) + " |")
        lines.append("")
    return "\n".join(lines)


def header(res: dict) -> str:
    return (f"<!-- {res['command']} ; {res['onnxcomq']} ; {res['machine']} ; whole run {res['wall_seconds']:.0f} s"
            " -->\n\n")


# ------------------------------------------------------------------------------------------------- run
def render(paths: list) -> int:
    """Print the tables of earlier runs' JSON files."""
    for path in paths:
        with open(path) as f:
            res = json.load(f)
        print(header(res) + tables(res))
    return 0


def add_args(ap, name: str, eval_crops: int, score: float, whose: str) -> None:
    """The options this script and tools/bench/yolox.py share (``name``: the output stem; ``whose``: the model's
    own score threshold, named in the help)."""
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL:NAME=VALUE,...",
                    help="a recipe (repeatable); default: the list in DEFAULT_VARIANTS")
    ap.add_argument("--reference", default="default")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--calib-crops", type=int, default=64)
    ap.add_argument("--eval-crops", type=int, default=eval_crops,
                    help=f"views per evaluation / development set ({eval_crops})")
    ap.add_argument("--min-scale", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--score", type=float, default=score,
                    help=f"both models' box score threshold (default {score}, {whose})")
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: its default)")
    ap.add_argument("--out", default=os.path.join("out", name), help=f"folder for {name}.md and .json")
    ap.add_argument("--render", nargs="+", metavar="JSON", help="only print the tables of earlier runs' JSON files")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=MODEL, help=f"NudeNet's 320n.onnx (default {MODEL})")
    ap.add_argument("--wheel", default=None, help="a nudenet wheel: extract its 320n.onnx to --model first")
    add_args(ap, "detector", 240, NMS_SCORE, "NudeNet's")
    ap.add_argument("--dev-crops", type=int, default=0, help="views of the development set (default: --eval-crops)")
    ap.add_argument("--channels", choices=["rgb", "bgr"], default="rgb")
    ap.add_argument("--sets", choices=["all", "dev"], default="all", help="dev: the development set only")
    a = ap.parse_args(argv)
    if a.render:
        return render(a.render)
    os.chdir(ROOT)
    if a.wheel:
        extract(a.wheel, a.model)
    if not os.path.isfile(a.model):
        raise SystemExit(f"{a.model}: not found; pip download nudenet==3.4.2 --no-deps -d /tmp/nn, then --wheel "
                         "/tmp/nn/nudenet-3.4.2-py3-none-any.whl")
    input_name = check_model(a.model)
    variants = [parse_variant(v) for v in (a.variant or DEFAULT_VARIANTS)]
    for _, kw in variants:  # a wrong name fails now, not after the first runs
        make_recipe(kw, a.bits).validate()
    os.makedirs(a.out, exist_ok=True)

    t_all = time.perf_counter()
    sets = image_sets(a)
    calib = {input_name: to_input(sets[0]["x"])}
    np.savez(os.path.join(a.out, "calib.npz"), **calib)
    ev_sets = sets[1:]
    infer_fn = lambda sess, s: infer(sess, s["x"])  # noqa: E731
    decode_fn = lambda out, s, score: decode_all(out, s["meta"], score)  # noqa: E731
    float_boxes(a, ev_sets, infer_fn, decode_fn)
    for s in ev_sets:
        s["classes"] = {LABELS[c]: int(n) for c, n in zip(*np.unique(np.concatenate(
            [r["cls"] for r in s["ref"]] + [np.zeros(0, int)]), return_counts=True))}
    print(f"detector: float {a.model}; {git_state()}; channels {a.channels}; data and float boxes in "
          f"{time.perf_counter() - t_all:.1f} s", flush=True)
    print(calibration_line(a, sets[0]))
    for s in ev_sets:
        sc = np.concatenate([r["score"] for r in s["ref"]] + [np.zeros(0)])
        print(f"  {s['name']}: {len(s['x'])} views of {len(s['photos'])} photos ({s['scenes']} scenes): "
              f"{s['n_float']} float boxes in {s['views_with_boxes']} views, score median "
              f"{np.median(sc) if len(sc) else float('nan'):.2f}; {s['classes']}")

    results, ref = measure(a, variants, calib, ev_sets, infer_fn, decode_fn)
    keep = ("name", "role", "sources", "photos", "scenes", "n_float", "n_confident", "views_with_boxes", "classes")
    report(a, "detector", sets, keep, results, ref, t_all, channels=a.channels)
    return 0


def float_boxes(a, ev_sets: list, infer_fn, decode_fn) -> None:
    """The float model's boxes of each set (``s["ref"]``, with ``infer_fn``/``decode_fn`` as ``measure`` takes them)
    and their counts: all, views with any, scored >= CONFIDENT."""
    fsess = session(a.model, a.threads)
    for s in ev_sets:
        s["ref"] = decode_fn(infer_fn(fsess, s), s, a.score)
        s["n_float"] = int(sum(len(r["boxes"]) for r in s["ref"]))
        s["views_with_boxes"] = int(sum(len(r["boxes"]) > 0 for r in s["ref"]))
        s["n_confident"] = int(sum((r["score"] >= CONFIDENT).sum() for r in s["ref"]))


def calibration_line(a, s0: dict) -> str:
    return (f"  calibration: {len(s0['x'])} views of {len(s0['photos'])} photos ({s0['scenes']} scenes) of "
            f"{', '.join(s0['sources'])} -> {os.path.join(a.out, 'calib.npz')}")


def measure(a, variants, calib: dict, ev_sets: list, infer_fn, decode_fn) -> tuple:
    """Quantize with each recipe (``onnxcomq.run`` on ``a.model`` and ``calib``, the float one-pass statistics
    shared) and measure its boxes against the float ones (``s["ref"]``) on each set: ``infer_fn(session, set)`` the
    outputs of a set's views, ``decode_fn(outputs, set, score)`` their boxes. Returns (results, the reference
    recipe's result or None), each result with its per-set metrics, summary and paired difference to the reference."""
    from _recipes import keep_unverified

    from onnxcomq import run
    run = keep_unverified(run)
    cache: dict = {}
    results = []
    ev = [i for i, s in enumerate(ev_sets) if s["role"] == "evaluation"]
    for label, kw in variants:
        cfg = make_recipe(kw, a.bits)
        t = time.perf_counter()
        try:
            q, rep = run(a.model, calib, cfg, stats_cache=cache)
        except Exception as e:  # noqa: BLE001 - reported, the other recipes still run
            print(f"  {label:16s} FAILED: {type(e).__name__}: {e}", flush=True)
            results.append({"label": label, "items": kw, "error": f"{type(e).__name__}: {e}"})
            continue
        secs = time.perf_counter() - t
        bits = rep.recipe["weights"]["bits"]
        worst = sorted(rep.layers, key=lambda L: -L.comq_error)
        qsess = session(q, a.threads)
        per = []
        for s in ev_sets:
            out = infer_fn(qsess, s)
            per.append(agreement(s["ref"], decode_fn(out, s, a.score), decode_fn(out, s, a.score / 2), s["cluster"]))
        del q, qsess
        per_set = [{k: p[k] for k in ("f2q", "sym", "any", "m50", "tol", "conf", "n_float", "n_quant",
                                                   "n_conf")} for p in per]
        summary = {}
        if ev:
            for k, _ in METRICS:
                summary[k] = spread([per_set[i][k] for i in ev])
                summary[k]["se"] = summary[k]["std"] / np.sqrt(len(ev))
        for p, ps, s in zip(per, per_set, ev_sets):  # within-set standard error, clustered by scene
            it = p["items"]
            ps["f2q_se"] = cluster_se(it["f2q"], it["cluster"]) if len(it["f2q"]) else float("nan")
        results.append({"label": label, "items": kw, "recipe": rep.recipe, "seconds": secs,
                        "capture_seconds": rep.capture_seconds, "solve_seconds": rep.solve_seconds,
                        "per_set": per_set, "summary": summary, "_items": [p["items"] for p in per],
                        "bits": rep.recipe["weights"]["bits"], "avg_bits": rep.avg_bits,
                        "raised_layers": {L.node: L.bits for L in rep.layers if L.bits != bits},
                        "worst_layers": {L.node: L.comq_error for L in worst[:5]},
                        "skipped": [f"{k['node']}: {k['reason']}" if isinstance(k, dict) else f"{k.node}: {k.reason}"
                                    for k in rep.skipped]})
        m = summary.get("f2q")
        print(f"  {label:16s} box agreement " + (f"{m['mean']:.4f} ± {m['std']:.4f} " if m else "")
              + "(" + ", ".join(s['name'] + f" {p['f2q']:.4f}" for s, p in zip(ev_sets, per_set)) + "); symmetric "
              + ", ".join(f"{p['sym']:.4f}" for p in per_set) + f"; quantize {secs:.1f} s (capture "
              f"{rep.capture_seconds:.1f}, solve {rep.solve_seconds:.1f})", flush=True)

    ref = next((r for r in results if r["label"] == a.reference and "error" not in r), None)
    if ref is not None:
        for r in results:
            if r is ref or "error" in r:
                continue
            deltas, ses = [], []
            for i in ev:
                d = r["_items"][i]["f2q"] - ref["_items"][i]["f2q"]
                deltas.append(float(d.mean()) if len(d) else float("nan"))
                ses.append(cluster_se(d, ref["_items"][i]["cluster"]) if len(d) else float("nan"))
            if ev:
                r["vs_reference"] = {"delta": deltas, "se": ses, "mean_delta": float(np.mean(deltas))}
    for r in results:
        r.pop("_items", None)
    return results, ref


def report(a, stem: str, sets: list, keep: tuple, results: list, ref, t_all: float, **extra) -> None:
    """Print the tables and save ``a.out``/STEM.{md,json}: the sets (``sets[0]`` the calibration set; the others'
    fields ``keep``), the recipes' results, ``extra`` settings."""
    s0, ev_sets = sets[0], sets[1:]
    res = {"model": a.model, "onnxcomq": git_state(), "reference": a.reference if ref is not None else "",
           "score": a.score, **extra, "min_scale": a.min_scale, "seed": a.seed,
           "sets": [{k: s[k] for k in keep} | {"n": len(s["x"])} for s in ev_sets],
           "calibration": {k: s0[k] for k in ("name", "sources", "photos", "scenes")} | {"n": len(s0["x"])},
           "recipes": [r for r in results if "error" not in r], "errors": [r for r in results if "error" in r],
           "wall_seconds": time.perf_counter() - t_all, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
           "command": " ".join(sys.argv)}
    md = tables(res)
    print("\n" + md)
    print(f"{stem}: whole run {res['wall_seconds']:.0f} s")
    save_results(a.out, stem, header(res) + md, res)


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
