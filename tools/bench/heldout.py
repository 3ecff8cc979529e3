#!/usr/bin/env python
"""Recipes judged on several disjoint evaluation sets from disjoint sources, with the calibration set disjoint from
all of them: mean and spread across the sets, never one set (issue 16, "evaluation discipline").

For each model the data are split by SOURCE into a calibration set, a development set (where a constant fitted to
data would be fitted; reported, but not in the mean) and K >= 3 evaluation sets:

effnet (EfficientNet-Lite0; tools/export/efficientnet.py finds the photos, see its docstring for how to get them;
        crops as that exporter makes them: random-resized crops, area >= 0.25, tf normalization, each photo's first
        evaluation crop the whole photo)

    calibration   opencv                                      25 photos, 20 scenes   --calib-crops (64)
    development   plasma-wallpapers                           10 photos              --eval-crops (240)
    E1 libraries  scikit-image + matplotlib + scikit-learn     9 photos, 8 scenes    --eval-crops
    E2 darknet    darknet                                      6 photos              --eval-crops
    E3 mate       mate-backgrounds                            12 photos              --eval-crops
    E4 lomiri     lomiri-wallpapers                           15 photos              --eval-crops

    metrics: top-1 agreement with the float model, mean KL(float || quantized) (tools/bench/eval_imagenet_agreement)

minilm (all-MiniLM-L6-v2; Debian package descriptions of /var/lib/dpkg/status, parsed and de-duplicated as
        tools/export/minilm.py does, without its 800-record cap): h = crc32(package name)

    calibration   h % 10 == 0 (tools/export/minilm.py's calibration packages): the long descriptions of the first
                  --calib-texts (64) by package name
    development   h % 10 != 0 and (h // 10) % 4 == 0
    E1, E2, E3    h % 10 != 0 and (h // 10) % 4 == 1, 2, 3

    each package gives two sentences (short and long description); metrics: mean cosine of the sentence embeddings
    to the float model's (tools/bench/eval_minilm), and how often a short description's nearest long description
    within the set is the float model's ("same top-1")

Each recipe is quantized once, on the calibration set; the float model's one-pass statistics are captured once per
model (``onnxcomq.run(..., stats_cache=...)``), so only the first one-pass recipe's time includes the capture
(sequential recipes capture their own). Recipes are ``--variant LABEL:NAME=VALUE,...`` as in
tools/bench/sequential.py (flat names of tools/bench/_recipes.py or SECTION.FIELD), plus ``preset=fast|official``
and ``bits=N``; without --variant, the default list below (W4 per channel, weight-only).

    python tools/bench/heldout.py --model effnet minilm          # out/heldout/{effnet,minilm}.{md,json}

The "vs default" tables give, per evaluation set, the paired difference to the reference recipe (--reference,
default "default"; for a recipe at other bits, the recipe "bits=N" alone, if measured) with its standard error over
the set's crops (clustered by photo scene) or sentences (clustered by package). "rule" applies the issue's rule for
changing a default: the mean over the evaluation sets is better, and no set is worse by more than 2 standard errors
of its paired difference.

Float models: out/effnet_lite0.onnx (else out/mem/effnet.onnx) and out/minilm.onnx (else out/mem/minilm.onnx), or
--effnet / --minilm; their graph inputs and outputs are checked against the exporters'. ONNXCOMQ_SOURCE=DIR imports
onnxcomq from DIR instead of this checkout (e.g. a commit's copy: git archive HEAD onnxcomq | tar -x -C DIR).
--render JSON... prints the tables of earlier runs again. Needs what the two exporters need (PIL, transformers, the
photos), numpy, onnx, onnxruntime.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import zlib

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "tools", "export"))
if not os.environ.get("ONNXCOMQ_SOURCE"):  # ONNXCOMQ_SOURCE: another copy of the package (e.g. a commit's)
    sys.path.insert(0, ROOT)
else:
    sys.path.insert(0, os.environ["ONNXCOMQ_SOURCE"])

from _recipes import keep_unverified, parse_items
from _recipes import recipe as flat_recipe

IMAGE_SETS = [  # (set, role, sources)
    ("calibration", "calibration", ("opencv",)),
    ("dev plasma", "development", ("plasma-wallpapers",)),
    ("E1 libraries", "evaluation", ("scikit-image", "matplotlib", "scikit-learn")),
    ("E2 darknet", "evaluation", ("darknet",)),
    ("E3 mate", "evaluation", ("mate-backgrounds",)),
    ("E4 lomiri", "evaluation", ("lomiri-wallpapers",)),
]
TEXT_SETS = ["calibration", "dev", "E1", "E2", "E3"]

DEFAULT_VARIANTS = {
    "effnet": ["RTN:weights.method=rtn", "default:", "one pass:sequential=False", "fast:preset=fast",
               "official:preset=official", "damping=0.1:regularization.damping=0.1",
               "damping=0:regularization.damping=0"],
}
DEFAULT_VARIANTS["minilm"] = DEFAULT_VARIANTS["effnet"] + ["default W3:bits=3", "one pass W3:bits=3,sequential=False",
                                                           "RTN W3:bits=3,weights.method=rtn"]
METRICS = {"effnet": [("agree", "top-1 agreement", +1, ".3f"), ("kl", "mean KL(float‖quant)", -1, ".4f")],
           "minilm": [("cos", "mean cosine to float", +1, ".4f"), ("same", "same top-1 as float", +1, ".3f")]}


# ------------------------------------------------------------------------------------------------- recipes
def make_recipe(items: dict, bits: int):
    from onnxcomq import Recipe

    items = dict(items)
    preset = items.pop("preset", "default")
    b = int(items.pop("bits", bits))
    base = Recipe.preset(preset, bits=b)
    return flat_recipe(base, **items) if items else base


def parse_variant(text: str):
    label, _, rest = text.partition(":")
    return label, parse_items(rest)


# ------------------------------------------------------------------------------------------------- data
def image_sets(calib_crops: int, eval_crops: int, seed: int, min_scale: float) -> list[dict]:
    """The sets of IMAGE_SETS as dicts: name, role, sources, photos, x [N,3,224,224], cluster [N] (scene index)."""
    import efficientnet as E

    photos = E.find_photos([], wide=True)
    out, cache, used = [], {}, set()
    for i, (name, role, sources) in enumerate(IMAGE_SETS):
        ph = [p for p in photos if p["source"] in sources]
        if not ph:
            raise SystemExit(f"{name}: no photos of {', '.join(sources)} found; see tools/export/efficientnet.py "
                             "--help for where they come from")
        overlap = used & {os.path.realpath(p["path"]) for p in ph}
        if overlap:
            raise SystemExit(f"{name}: photos already in another set: {sorted(overlap)}")
        used |= {os.path.realpath(p["path"]) for p in ph}
        calib = role == "calibration"
        x, meta = E.make_crops(ph, calib_crops if calib else eval_crops, seed + 1 + i, "tf", min_scale,
                               not calib, cache)
        group = {p["name"]: p["group"] for p in ph}
        scenes = sorted(set(group.values()))
        cluster = np.array([scenes.index(group[m["photo"]]) for m in meta])
        out.append({"name": name, "role": role, "sources": list(sources), "x": x, "cluster": cluster,
                    "photos": [p["name"] for p in ph], "scenes": len(scenes), "units": "crops"})
    return out


def text_sets(calib_texts: int, max_length: int) -> list[dict]:
    """Calibration texts and the dev / evaluation (short, long) description pairs, split by crc32(package)."""
    import minilm as M
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(M.model_dir(), local_files_only=True)
    records = M.usable_records(M.parse_dpkg_status(), max_records=10 ** 9)

    def which(pkg: str) -> str:
        h = zlib.crc32(pkg.encode())
        return "calibration" if h % 10 == 0 else TEXT_SETS[1 + (h // 10) % 4]

    out = []
    for name in TEXT_SETS:
        recs = [r for r in records if which(r[0]) == name]
        if name == "calibration":
            recs = recs[:calib_texts]
            feeds = M.tokenize(tok, [r[2] for r in recs], max_length)
            out.append({"name": name, "role": "calibration", "feeds": feeds, "packages": [r[0] for r in recs],
                        "units": "texts"})
            continue
        a = M.tokenize(tok, [r[1] for r in recs], max_length)
        b = M.tokenize(tok, [r[2] for r in recs], max_length)
        cluster = np.concatenate([np.arange(len(recs)), np.arange(len(recs))])  # a sentence pair per package
        out.append({"name": name if name == "dev" else f"{name} Debian", "role": "development" if name == "dev"
                    else "evaluation", "a": a, "b": b, "cluster": cluster, "packages": [r[0] for r in recs],
                    "units": "sentences"})
    return out


# ------------------------------------------------------------------------------------------------- metrics
class EffnetEval:
    def __init__(self, float_path: str, sets: list[dict]):
        import eval_imagenet_agreement as ev

        self.ev, self.sets = ev, [s for s in sets if s["role"] != "calibration"]
        sess = ev.session(float_path)
        self.ref = [ev.logits(sess, s["x"], 32) for s in self.sets]

    def per_item(self, model) -> list[dict]:
        """Per set: per-crop agreement (0/1) and KL(float || quant)."""
        sess = self.ev.session(model)
        out = []
        for s, ref in zip(self.sets, self.ref):
            q = self.ev.logits(sess, s["x"], 32)
            lp, lq = self.ev.log_softmax(ref), self.ev.log_softmax(q)
            out.append({"agree": (ref.argmax(1) == q.argmax(1)).astype(np.float64),
                        "kl": (np.exp(lp) * (lp - lq)).sum(1)})
        return out

    def float_summary(self) -> list[str]:
        lines = []
        for s, ref in zip(self.sets, self.ref):
            p = np.exp(self.ev.log_softmax(ref)).max(1)
            lines.append(f"{s['name']}: {len(ref)} crops of {len(s['photos'])} photos ({s['scenes']} scenes), float "
                         f"top-1 probability mean {p.mean():.3f}, {len(np.unique(ref.argmax(1)))} distinct classes")
        return lines


class MinilmEval:
    def __init__(self, float_path: str, sets: list[dict]):
        import eval_minilm as ev

        self.ev, self.sets = ev, [s for s in sets if s["role"] != "calibration"]
        sess = ev.session(float_path)
        self.ref = [ev.evaluate(sess, s["a"], s["b"], None, 32) for s in self.sets]

    def per_item(self, model) -> list[dict]:
        """Per set: per-sentence cosine to float (short descriptions, then long) and 'same top-1' per short one."""
        sess = self.ev.session(model)
        out = []
        for s, ref in zip(self.sets, self.ref):
            ea, eb = self.ev.embed(sess, s["a"], 32), self.ev.embed(sess, s["b"], 32)
            cos = np.concatenate([(ea * ref["emb"][0]).sum(1), (eb * ref["emb"][1]).sum(1)]).astype(np.float64)
            out.append({"cos": cos, "same": ((ea @ eb.T).argmax(1) == ref["top1"]).astype(np.float64)})
        return out

    def float_summary(self) -> list[str]:
        return [f"{s['name']}: {len(s['packages'])} packages ({2 * len(s['packages'])} sentences), float recall@1 "
                f"(short -> own long description) {r['recall1']:.3f}" for s, r in zip(self.sets, self.ref)]


def cluster_se(d: np.ndarray, cluster: np.ndarray) -> float:
    """Standard error of mean(d), clustered (crops of one scene, the two sentences of one package, are not
    independent): sqrt(G / (G - 1) * sum over clusters of (sum of d - mean)^2) / n."""
    if len(d) != len(cluster):  # per-package metrics ("same top-1"): one value per package already
        cluster = np.arange(len(d))
    r = d - d.mean()
    sums = np.bincount(cluster, weights=r)
    g = int((np.bincount(cluster) > 0).sum())
    return float(np.sqrt(g / max(g - 1, 1) * (sums ** 2).sum()) / len(d))


# ------------------------------------------------------------------------------------------------- report
def spread(v: list) -> dict:
    a = np.asarray(v, float)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "min": float(a.min()),
            "max": float(a.max())}


def tables(model: str, res: dict) -> str:
    sets = res["sets"]
    ev_idx = [i for i, s in enumerate(sets) if s["role"] == "evaluation"]
    dev_idx = [i for i, s in enumerate(sets) if s["role"] == "development"]
    lines = []
    for key, title, _, f in METRICS[model]:
        lines += [(f"**{title}** (mean ± std over the {len(ev_idx)} evaluation sets; min-max; each set; the "
                   "development set, not in the mean; quantize s: onnxcomq.run's wall time, the capture shared)"), "",
                  "| recipe | mean ± std | min-max | " + " | ".join(sets[i]["name"] for i in ev_idx) + " | "
                  + " | ".join(sets[i]["name"] for i in dev_idx) + " | quantize s |",
                  "|---|---|---|" + "---|" * (len(ev_idx) + len(dev_idx)) + "---|"]
        for r in res["recipes"]:
            s = r["summary"][key]
            lines.append(f"| {r['label']} | {s['mean']:{f}} ± {s['std']:{f}} | {s['min']:{f}}-{s['max']:{f}} | "
                         + " | ".join(f"{r['per_set'][i][key]:{f}}" for i in ev_idx + dev_idx)
                         + f" | {r['seconds']:.1f} |")
        lines.append("")
    ref = res["reference"]
    ref_bits = next((r["recipe"]["weights"]["bits"] for r in res["recipes"] if r["label"] == ref), None)
    for key, title, _, f in METRICS[model]:
        lines += [(f"**vs {ref}, {title}**: recipe minus {ref} (at the recipe's bits), per evaluation set (± the "
                   f"paired difference's standard error on that set); 'worse on': worse than {ref} by more than 2 "
                   "standard errors; rule: a better mean and worse on no set"), "",
                  "| recipe | mean Δ | " + " | ".join(sets[i]["name"] for i in ev_idx) + " | worse on | rule |",
                  "|---|---|" + "---|" * len(ev_idx) + "---|---|"]
        for r in res["recipes"]:
            if key not in r.get("vs_reference", {}) or ("reference" not in r and r["recipe"]["weights"]["bits"]
                                                        != ref_bits):  # (an older JSON: compared across bits)
                continue
            c = r["vs_reference"][key]
            cells = [f"{d:+{f}} ± {se:{f}}" for d, se in zip(c["delta"], c["se"])]
            name = r["label"] if r.get("reference", ref) == ref else f"{r['label']} (vs {r['reference']})"
            lines.append(f"| {name} | {c['mean_delta']:+{f}} | " + " | ".join(cells) + f" | "
                         f"{', '.join(c['worse_on']) or '-'} | {'passes' if c['passes'] else 'fails'} |")
        lines.append("")
    return "\n".join(lines)


def save_results(folder: str, stem: str, md: str, res: dict) -> None:
    """Write a run's tables to FOLDER/STEM.md and its results to FOLDER/STEM.json (heldout, detector, augment)."""
    with open(os.path.join(folder, f"{stem}.md"), "w") as f:
        f.write(md)
    with open(os.path.join(folder, f"{stem}.json"), "w") as f:
        json.dump(res, f, indent=1)


def git_state() -> str:
    src = os.environ.get("ONNXCOMQ_SOURCE")
    if src:
        return f"onnxcomq from {src}"
    try:
        head = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "onnxcomq"], capture_output=True,
                               text=True, check=True).stdout.strip()
        return f"onnxcomq at {head}" + (" with uncommitted changes in onnxcomq/" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "onnxcomq (git state unknown)"


def find_float(model: str, given: str | None) -> str:
    cands = [given] if given else {"effnet": ["out/effnet_lite0.onnx", "out/mem/effnet.onnx"],
                                   "minilm": ["out/minilm.onnx", "out/mem/minilm.onnx"]}[model]
    for c in cands:
        if os.path.isfile(c):
            return c
    raise SystemExit(f"no float model among {cands}: run tools/export/{'efficientnet' if model == 'effnet' else model}"
                     ".py first")


def check_float(model: str, path: str) -> None:
    import onnx

    m = onnx.load(path, load_external_data=False)
    names = [i.name for i in m.graph.input if i.name not in {t.name for t in m.graph.initializer}]
    want = ["input"] if model == "effnet" else ["input_ids", "attention_mask", "token_type_ids"]
    if names != want or [o.name for o in m.graph.output] != (["logits"] if model == "effnet"
                                                             else ["last_hidden_state"]):
        raise SystemExit(f"{path}: inputs {names}, outputs {[o.name for o in m.graph.output]}: not the exporter's")


def run_model(model: str, a, variants) -> dict:
    from onnxcomq import run
    run = keep_unverified(run)

    t_all = time.perf_counter()
    path = find_float(model, a.effnet if model == "effnet" else a.minilm)
    check_float(model, path)
    t0 = time.perf_counter()
    if model == "effnet":
        sets = image_sets(a.calib_crops, a.eval_crops, a.seed, a.min_scale)
        calib = {"input": sets[0]["x"]}
        evaluator = EffnetEval(path, sets)
    else:
        sets = text_sets(a.calib_texts, a.max_length)
        calib = sets[0]["feeds"]
        evaluator = MinilmEval(path, sets)
    eval_sets = evaluator.sets
    print(f"\n{model}: float {path}; {git_state()}; data and float outputs in {time.perf_counter() - t0:.1f} s",
          flush=True)
    s0 = sets[0]
    print(f"  calibration: {len(next(iter(calib.values())))} {s0['units']}"
          + (f" of {len(s0['photos'])} photos ({s0['scenes']} scenes) of {', '.join(s0['sources'])}"
             if model == "effnet" else f" (long descriptions of packages {s0['packages'][0]} .. "
             f"{s0['packages'][-1]})"))
    for line in evaluator.float_summary():
        print("  " + line)

    cache: dict = {}
    results, items = [], {}
    for label, kw in variants:
        cfg = make_recipe(kw, a.bits)
        t = time.perf_counter()
        q, rep = run(path, calib, cfg, stats_cache=cache)
        secs = time.perf_counter() - t
        per = evaluator.per_item(q)
        del q
        items[label] = per
        keys = [k for k, *_ in METRICS[model]]
        per_set = [{k: float(p[k].mean()) for k in keys} for p in per]
        ev = [i for i, s in enumerate(eval_sets) if s["role"] == "evaluation"]
        summary = {k: spread([per_set[i][k] for i in ev]) for k in keys}
        damped = [L.damping for L in rep.layers if L.damped]
        results.append({"label": label, "items": kw, "recipe": rep.recipe, "seconds": secs,
                        "capture_seconds": rep.capture_seconds, "solve_seconds": rep.solve_seconds,
                        "per_set": per_set, "summary": summary, "damped_layers": len(damped)})
        main_key, _, _, f = METRICS[model][0]
        sec_key, _, _, f2 = METRICS[model][1]
        print(f"  {label:14s} {main_key} {summary[main_key]['mean']:{f}} ± {summary[main_key]['std']:{f}} "
              f"({', '.join(f'{per_set[i][main_key]:{f}}' for i in ev)}; dev "
              f"{', '.join(f'{per_set[i][main_key]:{f}}' for i in range(len(per_set)) if i not in ev)}), "
              f"{sec_key} {summary[sec_key]['mean']:{f2}} ± {summary[sec_key]['std']:{f2}}; quantize {secs:.1f} s "
              f"(capture {rep.capture_seconds:.1f}, solve {rep.solve_seconds:.1f})", flush=True)

    # the reference of each recipe: --reference at its bits, else the default recipe at its bits ("bits=3" alone)
    refs = {}
    for r in results:
        if r["label"] == a.reference or set(r["items"]) <= {"bits"}:
            b = r["recipe"]["weights"]["bits"]
            if r["label"] == a.reference or b not in refs:
                refs[b] = r["label"]
    ev = [i for i, s in enumerate(eval_sets) if s["role"] == "evaluation"]
    for r in results:
        ref = refs.get(r["recipe"]["weights"]["bits"])
        if ref is None or r["label"] == ref:
            continue
        r["reference"], r["vs_reference"] = ref, {}
        for key, _, sign, _ in METRICS[model]:
            deltas, ses, worse = [], [], []
            for i in ev:
                d = items[r["label"]][i][key] - items[ref][i][key]
                deltas.append(float(d.mean()))
                ses.append(cluster_se(d, eval_sets[i]["cluster"]))
                if sign * deltas[-1] < -2 * ses[-1]:
                    worse.append(eval_sets[i]["name"])
            md = float(np.mean(deltas))
            r["vs_reference"][key] = {"delta": deltas, "se": ses, "mean_delta": md, "worse_on": worse,
                                      "passes": bool(sign * md > 0 and not worse)}
    ref = a.reference if a.reference in items else None
    res = {"model": model, "float": path, "onnxcomq": git_state(), "reference": ref or "",
           "sets": [{k: v for k, v in s.items() if k in ("name", "role", "sources", "photos", "scenes", "packages",
                                                        "units")} | {"n": len(s["cluster"])}
                    for s in eval_sets],
           "calibration": {k: v for k, v in s0.items() if k in ("name", "sources", "photos", "scenes", "packages")}
           | {"n": len(next(iter(calib.values())))},
           "recipes": results, "wall_seconds": time.perf_counter() - t_all,
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "command": " ".join(sys.argv)}
    return res


def add_data_args(ap) -> None:
    """The options that build the data sets (shared with tools/bench/size_curve.py)."""
    ap.add_argument("--calib-crops", type=int, default=64)
    ap.add_argument("--eval-crops", type=int, default=240, help="crops per evaluation / development set (240)")
    ap.add_argument("--min-scale", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calib-texts", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=128)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", default=["effnet", "minilm"], choices=["effnet", "minilm"])
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL:NAME=VALUE,...",
                    help="a recipe (repeatable); default: the list in DEFAULT_VARIANTS")
    ap.add_argument("--reference", default="default", help="the recipe the others are compared with (default)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--effnet", default=None, help="float EfficientNet-Lite0 (default: out/effnet_lite0.onnx, else "
                                                   "out/mem/effnet.onnx)")
    ap.add_argument("--minilm", default=None, help="float MiniLM (default: out/minilm.onnx, else out/mem/minilm.onnx)")
    add_data_args(ap)
    ap.add_argument("--out", default=os.path.join("out", "heldout"), help="folder for MODEL.md and MODEL.json")
    ap.add_argument("--render", nargs="+", metavar="JSON", help="only print the tables of earlier runs' JSON files")
    a = ap.parse_args(argv)
    if a.render:
        for path in a.render:
            with open(path) as f:
                res = json.load(f)
            print(f"<!-- {res['command']} ; {res['onnxcomq']} ; {res['machine']} ; whole run "
                  f"{res['wall_seconds']:.0f} s -->\n\n{tables(res['model'], res)}")
        return 0
    os.chdir(ROOT)
    os.makedirs(a.out, exist_ok=True)
    for model in a.model:
        variants = [parse_variant(v) for v in (a.variant or DEFAULT_VARIANTS[model])]
        for label, kw in variants:  # a wrong name fails now, not after the first runs
            make_recipe(kw, a.bits).validate()
        res = run_model(model, a, variants)
        md = tables(model, res)
        print("\n" + md)
        print(f"{model}: whole run {res['wall_seconds']:.0f} s")
        save_results(a.out, model, f"<!-- {res['command']} ; {res['onnxcomq']} ; {res['machine']} ; whole run "
                                   f"{res['wall_seconds']:.0f} s -->\n\n{md}", res)
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
