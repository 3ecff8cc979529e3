#!/usr/bin/env python
"""Does augmenting the calibration crops (horizontal flips, a second scale) help EfficientNet-Lite0 W4? (issue 16:
"data augmentation of calibration crops (flips, scales) for layers with few rows, as a statistics-level option")

The default recipe (W4 per channel, weight-only: heldout.py's "default") is quantized once on each calibration set
below and judged as tools/bench/heldout.py judges recipes (its functions are imported): the same development set and
evaluation sets E1..E4, top-1 agreement with the float model and mean KL(float || quantized), mean and spread over
E1..E4, and paired differences per evaluation set with their standard errors (clustered by photo scene) under the
rule "a better mean over the evaluation sets and worse on no set by more than 2 standard errors".

Every calibration set comes from heldout.py's calibration photos (opencv) and its crop stream (the exporter's
random-resized crops, area >= --min-scale, random flip, tf normalization, heldout.py's seed), so that the first 64
crops of the stream are heldout.py's 64 calibration crops:

    A   the first 64 crops (heldout.py's calibration set)                                      64 samples
    B   A + each crop flipped horizontally                                                    128 samples
    C   B + each of those re-cropped at a second scale (the box's centre, --zoom (0.7) of its
        sides, resized back by the same transform)                                            256 samples
    D   the first 128 crops (no augmentation: B's sample count)                               128 samples
    E   the first 256 crops (no augmentation: C's sample count)                               256 samples

Comparisons: each variant against A, and the augmented sets against the distinct crops of the same count (B vs D,
C vs E), which separate "augmentation" from "more samples" (also C vs B and E vs D). Quantize s is onnxcomq.run's
wall time (each variant captures its own statistics). --calib-seed draws other calibration crops from the same
photos (the evaluation sets unchanged): the standard errors are over the evaluation crops only, so a repeat with
another draw shows how much of a difference is the draw.

    python tools/studies/augment.py                        # out/augment/augment.{md,json}
    python tools/studies/augment.py --calib-seed 101 --out out/augment/calib_seed101       # another draw
    python tools/studies/augment.py --eval-crops 16 --variants A B --out /tmp/augment_smoke    # a smoke run
    python tools/studies/augment.py --summary out/augment/augment.json out/augment/calib_seed*/augment.json
                                                           # the draws side by side: out/augment/draws.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "tools", "bench"))

import heldout as H  # noqa: E402  (sets up sys.path for onnxcomq and tools/export)

VARIANTS = {  # label: (description, first crops of the stream, flips, second scale)
    "A": ("64 crops", 64, False, False),
    "B": ("64 + flips = 128", 64, True, False),
    "C": ("64 + flips + zoom = 256", 64, True, True),
    "D": ("128 crops", 128, False, False),
    "E": ("256 crops", 256, False, False),
}
COMPARISONS = [("B", "D"), ("C", "E"), ("C", "B"), ("E", "D")]  # (each against A: heldout.tables' "vs" tables)


def render(photo, meta: dict, mirror: bool, zoom: float | None) -> np.ndarray:
    """One crop as make_crops made it (its box and flip, eval_transform), mirrored (the other flip) if mirror, and
    if zoom only its box's centre, zoom times its sides."""
    import efficientnet as E

    x, y, w, h = meta["box"]
    if zoom:
        zw, zh = max(1, round(w * zoom)), max(1, round(h * zoom))
        x, y, w, h = x + (w - zw) // 2, y + (h - zh) // 2, zw, zh
    crop = photo.crop((x, y, x + w, y + h))
    if meta["flip"] != mirror:
        crop = crop.transpose(0)  # Image.FLIP_LEFT_RIGHT
    return E.eval_transform(crop, "tf")


def calibration_sets(labels: list[str], seed: int, min_scale: float, zoom: float) -> dict:
    """{label: [N,3,224,224]} from heldout.py's calibration photos and the crop stream of seed."""
    import efficientnet as E

    name, _, sources = H.IMAGE_SETS[0]
    assert name == "calibration"
    photos = [p for p in E.find_photos([], wide=True) if p["source"] in sources]
    if not photos:
        raise SystemExit(f"no photos of {', '.join(sources)}: see tools/export/efficientnet.py --help")
    cache: dict = {}
    n = max(VARIANTS[k][1] for k in labels)
    x, meta = E.make_crops(photos, n, seed, "tf", min_scale, False, cache)
    path = {p["name"]: p["path"] for p in photos}
    out = {}
    for k in labels:
        _, m, flips, scale = VARIANTS[k]
        parts = [x[:m]]
        if flips:
            parts.append(np.stack([render(cache[path[c["photo"]]], c, True, None) for c in meta[:m]]))
        if scale:
            parts += [np.stack([render(cache[path[c["photo"]]], c, f, zoom) for c in meta[:m]])
                      for f in (False, True)]
        out[k] = np.concatenate(parts)
    # the re-rendering reproduces make_crops' crops (the flips and zooms are made the same way)
    probe = np.stack([render(cache[path[c["photo"]]], c, False, None) for c in meta[:4]])
    assert np.array_equal(probe, x[:4]), "re-rendered crops differ from make_crops'"
    return out


def compare(items: dict, sets: list[dict], label: str, ref: str) -> dict:
    """heldout.py's paired comparison: per evaluation set mean difference, clustered SE, 'worse on', the rule."""
    ev = [i for i, s in enumerate(sets) if s["role"] == "evaluation"]
    out = {}
    for key, _, sign, _ in H.METRICS["effnet"]:
        deltas, ses, worse = [], [], []
        for i in ev:
            d = items[label][i][key] - items[ref][i][key]
            deltas.append(float(d.mean()))
            ses.append(H.cluster_se(d, sets[i]["cluster"]))
            if sign * deltas[-1] < -2 * ses[-1]:
                worse.append(sets[i]["name"])
        md = float(np.mean(deltas))
        dev = [i for i, s in enumerate(sets) if s["role"] == "development"]
        dd = [float((items[label][i][key] - items[ref][i][key]).mean()) for i in dev]
        out[key] = {"delta": deltas, "se": ses, "mean_delta": md, "worse_on": worse, "dev_delta": dd,
                    "passes": bool(sign * md > 0 and not worse)}
    return out


def report(res: dict) -> str:
    sets = res["sets"]
    ev = [s["name"] for s in sets if s["role"] == "evaluation"]
    lines = [H.tables("effnet", res), ("**timing** (onnxcomq.run's wall time; here each variant captures its own "
             "statistics of the float model: capture, solve)"), "",
             "| variant | samples | quantize s | capture s | solve s |", "|---|---|---|---|---|"]
    for r in res["recipes"]:
        lines.append(f"| {r['label']} | {r['samples']} | {r['seconds']:.1f} | {r['capture_seconds']:.1f} | "
                     f"{r['solve_seconds']:.1f} |")
    lines.append("")
    for key, title, _, f in H.METRICS["effnet"]:
        lines += [(f"**augmented vs distinct crops, {title}**: X minus Y per evaluation set (± SE of the paired "
                   "difference, clustered by scene); the development set's difference apart; rule as above"), "",
                  "| X vs Y | mean Δ | " + " | ".join(ev) + " | dev Δ | worse on | rule |",
                  "|---|---|" + "---|" * len(ev) + "---|---|---|"]
        for c in res["comparisons"]:
            v = c[key]
            lines.append(f"| {c['x']} vs {c['y']} | {v['mean_delta']:+{f}} | "
                         + " | ".join(f"{d:+{f}} ± {se:{f}}" for d, se in zip(v["delta"], v["se"]))
                         + f" | {', '.join(f'{d:+{f}}' for d in v['dev_delta'])} | {', '.join(v['worse_on']) or '-'}"
                         f" | {'passes' if v['passes'] else 'fails'} |")
        lines.append("")
    return "\n".join(lines)


def draws(paths: list[str]) -> str:
    """Several runs (calibration draws) side by side: each variant's means over E1..E4, then each comparison's mean
    difference and rule per draw, and the differences' mean over the draws."""
    runs = []
    for p in paths:
        with open(p) as f:
            runs.append(json.load(f))
    seeds = [str(r["calibration"].get("seed", "?")) for r in runs]
    lines = [f"<!-- augment.py --summary {' '.join(paths)} -->", ""]
    for key, title, _, f in H.METRICS["effnet"]:
        lines += [f"**{title}**, mean over the evaluation sets, per calibration draw (crop seed); dev in brackets", "",
                  "| variant | " + " | ".join(f"seed {s}" for s in seeds) + " | mean over draws |",
                  "|---|" + "---|" * (len(seeds) + 1)]
        for v in VARIANTS:
            rows = [next((x for x in r["recipes"] if x["variant"] == v), None) for r in runs]
            if None in rows:
                continue
            vals = [x["summary"][key]["mean"] for x in rows]
            lines.append(f"| {rows[0]['label']} | " + " | ".join(
                f"{m:{f}} ({x['per_set'][0][key]:{f}})" for m, x in zip(vals, rows)) + f" | {np.mean(vals):{f}} |")
        lines.append("")
    for key, title, _, f in H.METRICS["effnet"]:
        lines += [f"**{title}, X minus Y**: mean Δ over the evaluation sets per draw (rule: passes / fails, and the "
                  "sets worse by > 2 SE)", "",
                  "| X vs Y | " + " | ".join(f"seed {s}" for s in seeds) + " | mean over draws | passes |",
                  "|---|" + "---|" * (len(seeds) + 2)]
        for x, y in [(v, "A") for v in "BCDE"] + COMPARISONS:
            cells = []
            for r in runs:
                if y == "A":
                    c = next((z.get("vs_reference") for z in r["recipes"] if z["variant"] == x), None)
                else:
                    c = next((z for z in r["comparisons"] if (z["x"], z["y"]) == (x, y)), None)
                cells.append(c[key] if c else None)
            if None in cells:
                continue
            lines.append(f"| {x} vs {y} | " + " | ".join(
                f"{c['mean_delta']:+{f}} {'passes' if c['passes'] else 'fails'}"
                + (f" (worse on {', '.join(c['worse_on'])})" if c["worse_on"] else "") for c in cells)
                + f" | {np.mean([c['mean_delta'] for c in cells]):+{f}} | {sum(c['passes'] for c in cells)}/"
                f"{len(cells)} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--zoom", type=float, default=0.7, help="C's second scale: the fraction of the box's sides (0.7)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--effnet", default=None, help="float EfficientNet-Lite0 (default: heldout.py's)")
    ap.add_argument("--eval-crops", type=int, default=240, help="crops per evaluation / development set (240)")
    ap.add_argument("--min-scale", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=0, help="heldout.py's seed (the crops of every set)")
    ap.add_argument("--calib-seed", type=int, default=None,
                    help="seed of the calibration crop stream (default: heldout.py's, --seed + 1); another value "
                         "draws other calibration crops from the same photos, the evaluation sets unchanged")
    ap.add_argument("--out", default=os.path.join("out", "augment"), help="folder for augment.md and augment.json")
    ap.add_argument("--summary", nargs="+", metavar="JSON", help="only put earlier runs side by side (draws.md in "
                                                                 "--out)")
    a = ap.parse_args(argv)
    if a.summary:
        md = draws(a.summary)
        print(md)
        with open(os.path.join(a.out, "draws.md"), "w") as f:
            f.write(md + "\n")
        return 0
    os.chdir(ROOT)
    os.makedirs(a.out, exist_ok=True)
    from onnxcomq import run
    run = H.keep_unverified(run)

    t_all = time.perf_counter()
    state = H.git_state()  # (at the start: the code this process imported)
    path = H.find_float("effnet", a.effnet)
    H.check_float("effnet", path)
    t0 = time.perf_counter()
    sets = H.image_sets(64, a.eval_crops, a.seed, a.min_scale)
    calib_seed = a.seed + 1 if a.calib_seed is None else a.calib_seed
    calibs = calibration_sets(a.variants, calib_seed, a.min_scale, a.zoom)
    if "A" in calibs and calib_seed == a.seed + 1:
        assert np.array_equal(calibs["A"], sets[0]["x"]), "A is not heldout.py's calibration set"
    evaluator = H.EffnetEval(path, sets)
    eval_sets = evaluator.sets
    print(f"effnet: float {path}; {state}; data and float outputs in {time.perf_counter() - t0:.1f} s",
          flush=True)
    for line in evaluator.float_summary():
        print("  " + line)

    cfg = H.make_recipe({}, a.bits)
    keys = [k for k, *_ in H.METRICS["effnet"]]
    ev = [i for i, s in enumerate(eval_sets) if s["role"] == "evaluation"]
    results, items = [], {}
    for k in a.variants:
        x = calibs[k]
        t = time.perf_counter()
        q, rep = run(path, {"input": x}, cfg)
        secs = time.perf_counter() - t
        items[k] = evaluator.per_item(q)
        del q
        per_set = [{m: float(p[m].mean()) for m in keys} for p in items[k]]
        summary = {m: H.spread([per_set[i][m] for i in ev]) for m in keys}
        results.append({"label": f"{k}: {VARIANTS[k][0]}", "variant": k, "samples": len(x),
                        "recipe": rep.recipe, "seconds": secs, "capture_seconds": rep.capture_seconds,
                        "solve_seconds": rep.solve_seconds, "per_set": per_set, "summary": summary,
                        "damped_layers": sum(1 for L in rep.layers if L.damped)})
        agree = ", ".join(f"{per_set[i]['agree']:.3f}" for i in ev)
        dev = ", ".join(f"{per_set[i]['agree']:.3f}" for i in range(len(per_set)) if i not in ev)
        print(f"  {k} ({len(x)} samples): agree {summary['agree']['mean']:.3f} ± {summary['agree']['std']:.3f} "
              f"({agree}; dev {dev}), kl "
              f"{summary['kl']['mean']:.4f} ± {summary['kl']['std']:.4f}; quantize {secs:.1f} s (capture "
              f"{rep.capture_seconds:.1f}, solve {rep.solve_seconds:.1f})", flush=True)

    ref = results[0]["label"] if a.variants[0] == "A" else ""
    for r in results:  # heldout.tables' "vs" tables: each variant against A
        if ref and r["variant"] != "A":
            r["reference"], r["vs_reference"] = ref, compare(items, eval_sets, r["variant"], "A")
    comparisons = [{"x": x, "y": y} | compare(items, eval_sets, x, y) for x, y in COMPARISONS
                   if x in items and y in items]
    res = {"model": "effnet", "float": path, "onnxcomq": state, "reference": ref,
           "sets": [{k: v for k, v in s.items() if k in ("name", "role", "sources", "photos", "scenes")}
                    | {"n": len(s["cluster"])} for s in eval_sets],
           "calibration": {"sources": list(H.IMAGE_SETS[0][2]), "photos": sets[0]["photos"],
                           "scenes": sets[0]["scenes"], "zoom": a.zoom, "seed": calib_seed},
           "recipes": results, "comparisons": comparisons, "wall_seconds": time.perf_counter() - t_all,
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "command": " ".join(sys.argv)}
    md = (f"<!-- {res['command']} ; {res['onnxcomq']} ; {res['machine']} ; whole run {res['wall_seconds']:.0f} s;"
          f" eval crops {a.eval_crops} per set, calibration crop seed {calib_seed} -->\n\n{report(res)}")
    print("\n" + md)
    H.save_results(a.out, "augment", md, res)
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
