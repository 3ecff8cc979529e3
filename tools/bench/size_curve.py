#!/usr/bin/env python
"""Accuracy against size (issue 16, section 3: mixed precision as a size budget the user understands): for a real
model, the accuracy of RTN, COMQ at uniform bits and COMQ under mixed-precision budgets, plotted against the size of
the quantized weights, with the float model's size as a reference.

The data, the evaluation sets and the metrics are tools/bench/heldout.py's (its functions are imported: calibration
set, development set, K >= 3 disjoint evaluation sets; EfficientNet-Lite0: top-1 agreement with the float model,
MiniLM: mean cosine of the sentence embeddings to the float model's). One-pass recipes share one capture of the float
model's statistics (``onnxcomq.run(..., stats_cache=...)``), as in heldout.py.

Size: the quantized layers' weights at their stored code widths, ``report.storage_bits x parameters / 8`` (2..4-bit
codes stored as int4, 5..8-bit as int8), in MB (10^6 bytes); the float reference is the same parameters at 32 bits.
The table also gives the whole quantized ONNX file (``report.quant_bytes``: scales, biases and the layers that are
not quantized included) against the float file (``report.float_bytes``).

    python tools/bench/size_curve.py                     # EfficientNet-Lite0: out/size_curve_effnet.{png,md,json}
    python tools/bench/size_curve.py --model minilm      # MiniLM: out/size_curve_minilm.{png,md,json}
    python tools/bench/size_curve.py --render out/size_curve_effnet.json     # plot and table again, no run

Recipes are heldout.py's ``--variant LABEL:NAME=VALUE,...`` (flat names of tools/bench/_recipes.py or
SECTION.FIELD, plus ``preset=`` and ``bits=``); ``mp_bits=8`` (one candidate width) is taken as the tuple (8,). The
family of a recipe (its marker in the plot): RTN (method=rtn), COMQ mixed budget (avg_bits given), else COMQ uniform.
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
sys.path.insert(0, HERE)

import heldout as H  # noqa: E402  (sets up sys.path for onnxcomq and tools/export)

VARIANTS = {
    "effnet": ["RTN W4:method=rtn", "RTN W8:method=rtn,bits=8", "COMQ W3:bits=3", "COMQ W4:", "COMQ W8:bits=8",
               "budget 4.25:avg_bits=4.25,mp_bits=8", "budget 4.5:avg_bits=4.5,mp_bits=8",
               "budget 5.0:avg_bits=5.0,mp_bits=8"],
    "minilm": ["RTN W4:method=rtn", "COMQ W3:bits=3", "COMQ W4:", "budget 4.5:avg_bits=4.5,mp_bits=8"],
}
FAMILIES = [("RTN", "s", "tab:red"), ("COMQ uniform bits", "o", "tab:blue"), ("COMQ mixed budget", "^", "tab:green")]


def family(items: dict) -> str:
    if items.get("method", items.get("weights.method")) == "rtn":
        return "RTN"
    if "avg_bits" in items or "mixed_precision.avg_bits" in items:
        return "COMQ mixed budget"
    return "COMQ uniform bits"


def normalize(items: dict) -> dict:
    items = dict(items)
    for k in ("mp_bits", "mixed_precision.candidates"):
        if isinstance(items.get(k), int):
            items[k] = (items[k],)
    return items


def measure(model: str, a, variants) -> dict:
    from onnxcomq import run
    run = H.keep_unverified(run)

    t_all = time.perf_counter()
    path = H.find_float(model, a.effnet if model == "effnet" else a.minilm)
    H.check_float(model, path)
    if model == "effnet":
        sets = H.image_sets(a.calib_crops, a.eval_crops, a.seed, a.min_scale)
        calib = {"input": sets[0]["x"]}
        evaluator = H.EffnetEval(path, sets)
    else:
        sets = H.text_sets(a.calib_texts, a.max_length)
        calib = sets[0]["feeds"]
        evaluator = H.MinilmEval(path, sets)
    keys = [k for k, *_ in H.METRICS[model]]
    main, _, _, f = H.METRICS[model][0]
    ev = [i for i, s in enumerate(evaluator.sets) if s["role"] == "evaluation"]
    print(f"{model}: float {path}; {H.git_state()}; data and float outputs in {time.perf_counter() - t_all:.1f} s",
          flush=True)
    cache: dict = {}
    results = []
    for label, kw in variants:
        t = time.perf_counter()
        q, rep = run(path, calib, H.make_recipe(kw, a.bits), stats_cache=cache)
        secs = time.perf_counter() - t
        params = int(sum(int(np.prod(L.shape)) for L in rep.layers))
        per = evaluator.per_item(q)
        del q
        per_set = [{k: float(p[k].mean()) for k in keys} for p in per]
        summary = {k: H.spread([per_set[i][k] for i in ev]) for k in keys}
        mp = rep.mixed_precision or {}
        results.append({"label": label, "items": kw, "family": family(kw), "recipe": rep.recipe, "seconds": secs,
                        "per_set": per_set, "summary": summary, "params": params, "avg_bits": rep.avg_bits,
                        "storage_bits": rep.storage_bits, "weight_bytes": rep.storage_bits * params / 8,
                        "quant_bytes": rep.quant_bytes, "float_bytes": rep.float_bytes,
                        "mp_achieved": mp.get("achieved"),
                        "mp_raised": sorted(n for n, v in (mp.get("layers") or {}).items()
                                            if v["bits"] != rep.recipe["weights"]["bits"])})
        r = results[-1]
        print(f"  {label:12s} {main} {summary[main]['mean']:{f}} ({summary[main]['min']:{f}}-"
              f"{summary[main]['max']:{f}}); {r['avg_bits']:.2f} bits, stored {r['storage_bits']:.2f}: weights "
              f"{r['weight_bytes'] / 1e6:.2f} MB, file {r['quant_bytes'] / 1e6:.2f} MB; quantize {secs:.1f} s",
              flush=True)
    return {"model": model, "float": path, "onnxcomq": H.git_state(),
            "sets": [{"name": s["name"], "role": s["role"], "n": len(s["cluster"])} for s in evaluator.sets],
            "recipes": results, "wall_seconds": time.perf_counter() - t_all,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "command": " ".join(sys.argv)}


def table(res: dict) -> str:
    model = res["model"]
    main, title, _, f = H.METRICS[model][0]
    sec, title2, _, f2 = H.METRICS[model][1]
    ev = [i for i, s in enumerate(res["sets"]) if s["role"] == "evaluation"]
    params = res["recipes"][0]["params"]
    lines = [f"| recipe | family | avg bits (stored) | weights MB | file MB | {title}: mean ± std | min-max | "
             f"{title2}: mean ± std | quantize s |", "|---|---|---|---|---|---|---|---|---|",
             f"| float | - | 32 | {params * 4 / 1e6:.2f} | {res['recipes'][0]['float_bytes'] / 1e6:.2f} | "
             f"1 | - | - | - |"]
    for r in sorted(res["recipes"], key=lambda r: (r["weight_bytes"], r["summary"][main]["mean"])):
        s, s2 = r["summary"][main], r["summary"][sec]
        lines.append(f"| {r['label']} | {r['family']} | {r['avg_bits']:.2f} ({r['storage_bits']:.2f}) | "
                     f"{r['weight_bytes'] / 1e6:.2f} | {r['quant_bytes'] / 1e6:.2f} | {s['mean']:{f}} ± {s['std']:{f}} "
                     f"| {s['min']:{f}}-{s['max']:{f}} | {s2['mean']:{f2}} ± {s2['std']:{f2}} | {r['seconds']:.1f} |")
    return (f"<!-- {res['command']} ; {res['onnxcomq']} ; {res['machine']} ; whole run {res['wall_seconds']:.0f} s "
            f"-->\n\n{params / 1e6:.2f} M quantized parameters; mean over the {len(ev)} evaluation sets "
            f"({', '.join(res['sets'][i]['name'] for i in ev)}; the development set not in the mean)\n\n"
            + "\n".join(lines) + "\n")


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model = res["model"]
    main, title, _, _ = H.METRICS[model][0]
    params = res["recipes"][0]["params"]
    fig, ax = plt.subplots(figsize=(9, 5))
    for fam, marker, color in FAMILIES:
        rs = sorted((r for r in res["recipes"] if r["family"] == fam), key=lambda r: r["weight_bytes"])
        if not rs:
            continue
        x = np.array([r["weight_bytes"] / 1e6 for r in rs])
        y = np.array([r["summary"][main]["mean"] for r in rs])
        lo = y - np.array([r["summary"][main]["min"] for r in rs])
        hi = np.array([r["summary"][main]["max"] for r in rs]) - y
        ax.errorbar(x, y, yerr=[lo, hi], fmt=marker, color=color, capsize=4, markersize=7,
                    label=fam + (" (labels: average bits)" if fam == "COMQ mixed budget" else ""),
                    linestyle="-" if fam == "COMQ mixed budget" else "none", linewidth=1)
        for k, (r, xi, yi) in enumerate(zip(rs, x, y)):
            mixed = fam == "COMQ mixed budget"  # (close together: the budget only, above-left / below-right)
            text = f"{r['recipe']['mixed_precision']['avg_bits']:g}" if mixed else r["label"]
            off, ha = ((-5, 5), "right") if mixed and (k % 2 or len(rs) == 1) else ((5, -12), "left") if mixed or fam == "RTN" \
                else ((6, 5), "left")
            ax.annotate(text, (xi, yi), textcoords="offset points", xytext=off, ha=ha, fontsize=8, color=color)
    ax.axvline(params * 4 / 1e6, color="gray", linestyle="--", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.text(params * 4 / 1e6, 0.5, "float32 weights ", rotation=90, va="center", ha="right", fontsize=8,
            color="gray", transform=ax.get_xaxis_transform())
    ticks = []
    for t in sorted({round(r["weight_bytes"] / 1e6, 2) for r in res["recipes"]} | {round(params * 4 / 1e6, 2)}):
        if not ticks or t / ticks[-1] > 1.1:  # (labels of sizes closer than 10% would overlap)
            ticks.append(t)
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:g}" for t in ticks], fontsize=8)
    ax.minorticks_off()
    name = {"effnet": "EfficientNet-Lite0", "minilm": "all-MiniLM-L6-v2"}[model]
    ax.set_xlabel(f"quantized weights, MB (stored widths; {params / 1e6:.2f} M parameters)")
    ax.set_ylabel(f"{title} (mean; bars min-max over evaluation sets)")
    ax.set_title(f"{name}: {title} against size", fontsize=11)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="center right", bbox_to_anchor=(0.92, 0.5), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", default=["effnet"], choices=["effnet", "minilm"])
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL:NAME=VALUE,...",
                    help="a recipe (repeatable); default: the list in VARIANTS")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--effnet", default=None, help="float EfficientNet-Lite0 (default: heldout.py's)")
    ap.add_argument("--minilm", default=None, help="float MiniLM (default: heldout.py's)")
    H.add_data_args(ap)
    ap.add_argument("--out", default="out", help="folder for size_curve_MODEL.{png,md,json}")
    ap.add_argument("--render", nargs="+", metavar="JSON", help="only plot and tabulate earlier runs' JSON files")
    a = ap.parse_args(argv)
    if a.render:
        for path in a.render:
            with open(path) as fh:
                res = json.load(fh)
            base = os.path.splitext(path)[0]
            plot(res, base + ".png")
            print(table(res))
        return 0
    os.chdir(ROOT)
    os.makedirs(a.out, exist_ok=True)
    for model in a.model:
        variants = [(label, normalize(kw)) for label, kw in
                    (H.parse_variant(v) for v in (a.variant or VARIANTS[model]))]
        for _, kw in variants:  # a wrong name fails now, not after the first runs
            H.make_recipe(kw, a.bits).validate()
        res = measure(model, a, variants)
        base = os.path.join(a.out, f"size_curve_{model}")
        with open(base + ".json", "w") as fh:
            json.dump(res, fh, indent=1)
        plot(res, base + ".png")
        md = table(res)
        with open(base + ".md", "w") as fh:
            fh.write(md)
        print("\n" + md + f"\n{model}: whole run {res['wall_seconds']:.0f} s; {base}.png")
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
