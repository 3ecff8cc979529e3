#!/usr/bin/env python
"""Speed and memory of ``onnxcomq quantize --bits 8``, side by side with onnxruntime's ``quantize_static``, in one run.

Speed (ResNet-18, 64 calibration images): wall time of the onnxcomq CLI (a fresh ``python -m onnxcomq.cli quantize
... --device cpu --quiet`` per repeat, median of --repeats), against onnxruntime's preprocess step and
``quantize_static`` (QDQ, per-channel, MinMax, int8 activations and weights; timed alone, in its own fresh process,
on the preprocessed model) on the same model and data, and a plain fp32 onnxruntime forward pass over the same
images for reference. onnxcomq's capture/solve split comes from the ``--report`` JSON of the same timed runs.

Memory: peak RSS (``ru_maxrss`` of each child, from ``os.wait4``: one fresh process per measurement) of the
onnxcomq CLI with 64 vs 512 calibration samples, on ResNet-18 (a 64-image and a 512-image .npz) and on the
Fashion-MNIST CNN (``--max-samples 64`` vs all 512 of models/fmnist_calib.npz).

    python tools/bench/speed_memory.py                    # everything; creates out/resnet18*.onnx/npz if missing
    python tools/bench/speed_memory.py --skip-memory --repeats 1
    python tools/bench/speed_memory.py --skip-speed --skip-resnet-memory
    # issue 14: EfficientNet-Lite0 and MiniLM, 32 vs 256 samples at 8 and 4 bits, and the ratio to quantize_static
    python tools/bench/speed_memory.py --models effnet=out/effnet_lite0.onnx,out/effnet_calib256.npz \
        minilm=out/minilm.onnx,out/minilm_calib.npz [--parts memory|speed] [--bits 8 4] [--repeats 1]

Note onnxcomq quantizes weights only (with a COMQ solve per layer), quantize_static quantizes weights by rounding
and also calibrates activation ranges: the comparison is of what each tool costs to run, not of like-for-like
algorithms. Everything generated goes to --work-dir (default out/bench, git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
PY = sys.executable
EXTRA: list = []  # --comq-args


# ----------------------------------------------------------------------------------------------------------- workers
# Each worker runs in a fresh child process (so its peak RSS is its own) and prints one JSON line on stdout.

def _npz_reader(calib: str, batch: int):
    import numpy as np
    from onnxruntime.quantization import CalibrationDataReader

    data = dict(np.load(calib))

    class Reader(CalibrationDataReader):
        def __init__(self):
            n = len(next(iter(data.values())))
            self._it = iter([{k: v[i:i + batch] for k, v in data.items()} for i in range(0, n, batch)])

        def get_next(self):
            return next(self._it, None)

    return Reader(), data


def worker_ort_static(model: str, calib: str, out: str, batch: int) -> dict:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    t0 = time.perf_counter()
    reader, _ = _npz_reader(calib, batch)
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    quantize_static(model, out, reader, quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    return {"load_s": t_load, "quantize_static_s": time.perf_counter() - t0}


def worker_ort_forward(model: str, calib: str, batch: int) -> dict:
    import onnxruntime as ort

    _, data = _npz_reader(calib, batch)
    t0 = time.perf_counter()
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    t_sess = time.perf_counter() - t0
    name = sess.get_inputs()[0].name
    x = data[name]
    t0 = time.perf_counter()
    for i in range(0, len(x), batch):
        sess.run(None, {name: x[i:i + batch]})
    return {"session_s": t_sess, "run_s": time.perf_counter() - t0, "samples": int(len(x))}


# ---------------------------------------------------------------------------------------------------- measurement

def load1() -> float:
    return os.getloadavg()[0]


def measure(cmd: list, label: str, cwd: str = ROOT) -> dict:
    """Run cmd in a fresh child (in ``cwd``); wall time, peak RSS (MB) of that child, its JSON line (if any), the load
    average."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with tempfile.TemporaryFile() as fo, tempfile.TemporaryFile() as fe:
        l0 = load1()
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=fo, stderr=fe)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        fo.seek(0)
        fe.seek(0)
        out, err = fo.read().decode(errors="replace"), fe.read().decode(errors="replace")
    if p.returncode != 0:
        raise RuntimeError(f"{label} failed (exit {p.returncode}): {' '.join(cmd)}\n{out[-2000:]}\n{err[-4000:]}")
    info = {}
    for line in reversed(out.strip().splitlines()):
        if line.startswith("{"):
            info = json.loads(line)
            break
    res = dict(label=label, wall=wall, rss_mb=ru.ru_maxrss / 1024.0, user=ru.ru_utime, sys=ru.ru_stime,
               load_before=l0, load_after=load1(), info=info)
    print(f"  {label}: {wall:.1f} s wall, {res['user']:.1f} s user, peak RSS {res['rss_mb']:.0f} MB "
          f"(load {l0:.2f} -> {res['load_after']:.2f})", flush=True)
    return res


def measure_comq(cmd: list, label: str, report: str) -> dict:
    """measure() an onnxcomq CLI run that writes --report; attach the report (capture/solve split)."""
    res = measure(cmd, label)
    with open(report) as f:
        res["report"] = json.load(f)
    rep = res["report"]
    print(f"    capture {fmt(rep.get('capture_seconds'))} s, solve {fmt(rep.get('solve_seconds'))} s, total "
          f"{fmt(rep.get('total_seconds'))} s in-process, {rep.get('samples')} samples", flush=True)
    return res


def onnxcomq_cmd(model: str, calib: str, out: str, report: str | None = None, max_samples: int | None = None,
                 extra=()) -> list:
    cmd = [PY, "-m", "onnxcomq.cli", "quantize", model, "-o", out, "--calib", calib, "--bits", "8",
           "--device", "cpu", "--quiet"]
    if report:
        cmd += ["--report", report]
    if max_samples:
        cmd += ["--max-samples", str(max_samples)]
    return cmd + list(extra) + EXTRA


def source_fingerprint() -> str:
    """Short hash of onnxcomq/**/*.py (the subpackages too), to notice the package changing under a long
    benchmark."""
    import hashlib

    h = hashlib.sha1()
    pkg = os.path.join(ROOT, "onnxcomq")
    for folder, dirs, files in sorted(os.walk(pkg)):
        dirs.sort()
        for name in sorted(files):
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, name), pkg)
                with open(os.path.join(folder, name), "rb") as f:
                    h.update(rel.encode() + b"\0" + f.read())
    return h.hexdigest()[:12]


def wait_for_quiet(threshold: float, max_wait: float):
    t0 = time.time()
    while load1() > threshold and time.time() - t0 < max_wait:
        print(f"  load average {load1():.2f} > {threshold}: waiting (up to {max_wait - (time.time() - t0):.0f} s "
              "more)", flush=True)
        time.sleep(30)
    print(f"  load average at start: {os.getloadavg()}", flush=True)


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def fmt(x, nd=1):
    return "n/a" if x is None or x != x else f"{x:.{nd}f}"


def ensure_resnet(model: str, calib64: str, calib512: str | None):
    exporter = os.path.join(ROOT, "tools", "export", "resnet18.py")
    if not os.path.exists(model) or not os.path.exists(calib64):
        print(f"creating {model} and {calib64} with tools/export/resnet18.py", flush=True)
        subprocess.run([PY, exporter, "--model-out", model, "--calib-out", calib64, "--samples", "64"]
                       + (["--skip-model"] if os.path.exists(model) else []), check=True, cwd=ROOT)
    if calib512 and not os.path.exists(calib512):
        print(f"creating {calib512} with tools/export/resnet18.py", flush=True)
        subprocess.run([PY, exporter, "--skip-model", "--calib-out", calib512, "--samples", "512"],
                       check=True, cwd=ROOT)


# ------------------------------------------------------------------------------- issue 14: two models, 4 and 8 bits

def subset_npz(src: str, n: int, dst: str) -> str:
    """The first n samples of every key of src (written once)."""
    if not os.path.exists(dst):
        import numpy as np
        d = np.load(src)
        np.savez(dst, **{k: v[:n] for k, v in d.items()})
    return dst


def suite_models(a, W) -> list:
    """Peak RSS with --mem-small vs --mem-large samples at 4 and 8 bits, per phase (from the report), and the wall
    time of onnxcomq against quantize_static on --speed-samples samples at 8 and 4 bits, for each NAME=MODEL,NPZ of
    --models. Every figure of one table comes from this one run, in fresh processes."""
    me = os.path.abspath(__file__)
    md = []
    for spec in a.models:
        name, rest = spec.split("=", 1)
        model, npz = rest.split(",", 1)
        if "memory" in a.parts:
            md.append(f"### Memory: {name}, peak RSS of a fresh onnxcomq process (MB), {a.mem_small} vs "
                      f"{a.mem_large} samples\n")
            md.append("| bits | samples | peak RSS | capture | solve | emit | batch | wall s |")
            md.append("|---|---:|---:|---:|---:|---:|---:|---:|")
            ratios = []
            for bits in a.bits:
                res = {}
                for n in (a.mem_small, a.mem_large):
                    rep = W(f"{name}_w{bits}_{n}.json")
                    r = measure_comq(onnxcomq_cmd(model, npz, W(f"{name}_w{bits}_{n}.onnx"), rep, max_samples=n,
                                                  extra=["--bits", str(bits)]), f"{name} W{bits}, {n} samples", rep)
                    res[n] = r
                    ph = r["report"].get("peak_rss_mb", {})
                    md.append(f"| {bits} | {r['report'].get('samples')} | {r['rss_mb']:.0f} | "
                              f"{fmt(ph.get('capture'), 0)} | {fmt(ph.get('solve'), 0)} | {fmt(ph.get('emit'), 0)} | "
                              f"{r['report'].get('config', {}).get('batch_size', '')} | {r['wall']:.1f} |")
                ratios.append(f"W{bits}: {res[a.mem_large]['rss_mb'] / res[a.mem_small]['rss_mb']:.2f}x")
            md.append("")
            md.append(f"{name}: peak RSS {a.mem_large} / {a.mem_small} samples: **" + "**, **".join(ratios) + "** "
                      "(phase columns: the process's peak up to the end of that phase; the write is in the total)")
            md.append("")
        if "speed" in a.parts:
            calib = subset_npz(npz, a.speed_samples, W(f"{name}_calib{a.speed_samples}.npz"))
            pre = W(f"{name}.pre.onnx")
            if not os.path.exists(pre):
                try:
                    measure([PY, "-m", "onnxruntime.quantization.preprocess", "--input", os.path.abspath(model),
                             "--output", os.path.abspath(pre)], f"{name} ORT preprocess",
                            cwd=os.path.dirname(os.path.abspath(pre)))  # (it leaves temporary files in its cwd)
                except RuntimeError as e:  # (symbolic shape inference fails on some exports: quantize the model)
                    print(f"  {name}: ORT preprocess failed ({str(e).strip().splitlines()[-1]}); quantize_static "
                          "runs on the model itself", flush=True)
                    pre = model
            md.append(f"### Speed: {name}, {a.speed_samples} samples, median of {a.repeats} alternating runs\n")
            md.append("| bits | onnxcomq wall s | capture s | solve s | quantize_static wall s | ratio |")
            md.append("|---|---:|---:|---:|---:|---:|")
            for bits in a.bits:
                comq, stat = [], []
                for r in range(a.repeats):
                    stat.append(measure([PY, me, "--worker", "ort-static", pre, calib, W(f"{name}_static.onnx"),
                                         str(a.ort_batch)], f"{name} quantize_static #{r + 1}"))
                    rep = W(f"{name}_speed_w{bits}_{r}.json")
                    comq.append(measure_comq(onnxcomq_cmd(model, calib, W(f"{name}_speed_w{bits}.onnx"), rep,
                                                          extra=["--bits", str(bits)]),
                                             f"{name} onnxcomq W{bits} #{r + 1}", rep))
                tc, ts = med([x["wall"] for x in comq]), med([x["wall"] for x in stat])
                md.append(f"| {bits} | {tc:.1f} | {fmt(med([x['report'].get('capture_seconds') for x in comq]))} | "
                          f"{fmt(med([x['report'].get('solve_seconds') for x in comq]))} | {ts:.1f} | "
                          f"**{tc / ts:.2f}x** |")
            md.append("")
    return md


# ----------------------------------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--worker":
        kind, args = sys.argv[2], sys.argv[3:]
        if kind == "ort-static":
            res = worker_ort_static(args[0], args[1], args[2], int(args[3]))
        elif kind == "ort-forward":
            res = worker_ort_forward(args[0], args[1], int(args[2]))
        else:
            raise SystemExit(f"unknown worker {kind}")
        print(json.dumps(res))
        return 0

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="out/resnet18.onnx", help="model for the speed test (default: ResNet-18)")
    ap.add_argument("--calib", default="out/resnet18_calib.npz", help="64-sample calibration .npz for --model")
    ap.add_argument("--calib512", default="out/resnet18_calib512.npz", help="512-sample .npz for --model")
    ap.add_argument("--small-model", default="models/fmnist_cnn.onnx")
    ap.add_argument("--small-calib", default="models/fmnist_calib.npz", help="512 samples; 64 via --max-samples")
    ap.add_argument("--repeats", type=int, default=2, help="timed repeats per speed measurement (default: 2)")
    ap.add_argument("--ort-batch", type=int, default=8, help="batch size of the ORT calibration reader (default: 8)")
    ap.add_argument("--work-dir", default="out/bench", help="where outputs go (default: out/bench)")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-resnet-memory", action="store_true", help="memory test on the small model only")
    ap.add_argument("--comq-args", default="",
                    help="extra onnxcomq CLI options for every onnxcomq run, e.g. '--order greedy' (options the CLI "
                         "no longer has go into WORK_DIR/comq_args.recipe.json, given as --recipe)")
    ap.add_argument("--max-load", type=float, default=1.5, help="wait while the 1-min load average is above this")
    ap.add_argument("--max-wait", type=float, default=600, help="wait at most this many seconds for a quiet machine")
    ap.add_argument("--models", nargs="+", metavar="NAME=MODEL,NPZ", default=None,
                    help="issue-14 suite instead of the ResNet-18 one: per model, peak RSS with --mem-small vs "
                         "--mem-large samples at --bits (per phase), and the time against quantize_static; e.g. "
                         "effnet=out/effnet_lite0.onnx,out/effnet_calib256.npz minilm=out/minilm.onnx,"
                         "out/minilm_calib.npz")
    ap.add_argument("--parts", default="memory,speed", help="with --models: memory, speed or both (default)")
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 4], help="with --models (default: 8 4)")
    ap.add_argument("--mem-small", type=int, default=32)
    ap.add_argument("--mem-large", type=int, default=256)
    ap.add_argument("--speed-samples", type=int, default=64)
    a = ap.parse_args(argv)

    os.chdir(ROOT)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _recipes beside this file
    from _recipes import cli_args

    EXTRA[:] = cli_args(a.comq_args.split(), os.path.join(a.work_dir, "comq_args.recipe.json"))
    fp0 = source_fingerprint()
    os.makedirs(a.work_dir, exist_ok=True)
    need_512 = not a.skip_memory and not a.skip_resnet_memory
    if a.model == "out/resnet18.onnx" and not a.models:
        ensure_resnet(a.model, a.calib, a.calib512 if need_512 else None)
    W = lambda name: os.path.join(a.work_dir, name)  # noqa: E731
    me = os.path.abspath(__file__)

    import numpy
    import onnx
    import onnxruntime
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; python "
          f"{platform.python_version()}, numpy {numpy.__version__}, onnx {onnx.__version__}, onnxruntime "
          f"{onnxruntime.__version__}", flush=True)
    wait_for_quiet(a.max_load, a.max_wait)
    loads = [load1()]
    out_md = []

    comq_runs = []
    if a.models:
        out_md += suite_models(a, W)
        a.skip_speed = a.skip_memory = True
    if not a.skip_speed:
        n_calib = len(numpy.load(a.calib)[onnx.load(a.model, load_external_data=False).graph.input[0].name])
        print(f"speed: {a.model}, {n_calib} calibration samples, {a.repeats} repeat(s)", flush=True)
        pre = W(os.path.basename(a.model).replace(".onnx", ".pre.onnx"))
        fwd, prep, stat = [], [], []
        for r in range(a.repeats):
            fwd.append(measure([PY, me, "--worker", "ort-forward", a.model, a.calib, str(a.ort_batch)],
                               f"ORT fp32 forward #{r + 1}"))
            prep.append(measure([PY, "-m", "onnxruntime.quantization.preprocess", "--input", os.path.abspath(a.model),
                                 "--output", os.path.abspath(pre)], f"ORT preprocess #{r + 1}",
                                cwd=os.path.dirname(os.path.abspath(pre))))
            stat.append(measure([PY, me, "--worker", "ort-static", pre, a.calib, W("ort_static.onnx"),
                                 str(a.ort_batch)], f"ORT quantize_static #{r + 1}"))
            rep = W(f"onnxcomq_w8_report{r}.json")
            comq_runs.append(measure_comq(onnxcomq_cmd(a.model, a.calib, W("onnxcomq_w8.onnx"), rep),
                                          f"onnxcomq --bits 8 #{r + 1}", rep))
            loads.append(load1())

        t_comq = med([x["wall"] for x in comq_runs])
        t_stat_wall = med([x["wall"] for x in stat])
        t_stat_in = med([x["info"]["quantize_static_s"] for x in stat])
        t_prep = med([x["wall"] for x in prep])
        t_comq_in = med([x["report"].get("total_seconds", float("nan")) for x in comq_runs])
        rows = [
            ("onnxcomq quantize --bits 8 (CLI, COMQ, weights only)", t_comq, t_comq_in,
             max(x["rss_mb"] for x in comq_runs), None),
            ("ORT preprocess (python -m onnxruntime.quantization.preprocess)", t_prep, None,
             max(x["rss_mb"] for x in prep), None),
            ("ORT quantize_static (QDQ, per-channel, MinMax, S8S8; alone)", t_stat_wall, t_stat_in,
             max(x["rss_mb"] for x in stat), t_comq / t_stat_wall),
            ("ORT preprocess + quantize_static", t_prep + t_stat_wall, None, None,
             t_comq / (t_prep + t_stat_wall)),
            (f"ORT fp32 forward, {n_calib} samples, batch {a.ort_batch} (session + run)", med([x["wall"] for x in fwd]),
             med([x["info"]["session_s"] + x["info"]["run_s"] for x in fwd]), max(x["rss_mb"] for x in fwd), None),
        ]
        out_md.append(f"### Speed: {os.path.basename(a.model)}, {n_calib} calibration samples, median of "
                      f"{a.repeats} (fresh process each)\n")
        out_md.append("| step | wall s (process) | in-process s | peak RSS MB | onnxcomq / this |")
        out_md.append("|---|---:|---:|---:|---:|")
        for name, wall, inproc, rss, ratio in rows:
            ratio_s = "" if ratio is None else f"{ratio:.1f}x"
            out_md.append(f"| {name} | {fmt(wall)} | {fmt(inproc, 2)} | {fmt(rss, 0) if rss else ''} | {ratio_s} |")
        out_md.append("")
        out_md.append(f"onnxcomq / quantize_static (process wall): **{t_comq / t_stat_wall:.1f}x**; in-process: "
                      f"{t_comq_in / t_stat_in:.1f}x; onnxcomq / (preprocess + quantize_static): "
                      f"{t_comq / (t_prep + t_stat_wall):.1f}x")
        fw = fwd[len(fwd) // 2]["info"]
        out_md.append(f"ORT fp32 forward alone: session {fmt(med([x['info']['session_s'] for x in fwd]), 2)} s, run "
                      f"{fmt(med([x['info']['run_s'] for x in fwd]), 2)} s for {fw['samples']} samples")
        out_md.append("")

        cap = med([x["report"].get("capture_seconds", float("nan")) for x in comq_runs])
        sol = med([x["report"].get("solve_seconds", float("nan")) for x in comq_runs])
        other = t_comq_in - cap - sol
        startup = t_comq - t_comq_in
        out_md.append("### onnxcomq time split (median over the same runs, from --report)\n")
        out_md.append("| stage | s | share of CLI wall |")
        out_md.append("|---|---:|---:|")
        for name, v in [("capture (ORT forward + Gram accumulation)", cap), ("solve (COMQ, all layers)", sol),
                        ("other in run() (load, find layers, emit QDQ)", other),
                        ("process startup, imports, save model", startup), ("CLI wall total", t_comq)]:
            out_md.append(f"| {name} | {fmt(v)} | {100 * v / t_comq:.0f} % |")
        layers = sorted(comq_runs[0]["report"].get("layers", []), key=lambda L: -L["seconds"])
        if layers:
            tot = sum(L["seconds"] for L in layers)
            top = layers[:4]
            out_md.append("")
            out_md.append(f"slowest layers (run 1; {len(layers)} layers, {tot:.1f} s solve): " + "; ".join(
                f"{'x'.join(map(str, L['shape']))} {L['seconds']:.1f} s" for L in top)
                + f" ({100 * sum(L['seconds'] for L in top) / tot:.0f} % of solve)")
        out_md.append("")

    if not a.skip_memory:
        print("memory: peak RSS, 64 vs 512 calibration samples", flush=True)
        mem_rows = []
        if not a.skip_resnet_memory:
            if comq_runs:
                r64 = dict(comq_runs[0], rss_mb=max(x["rss_mb"] for x in comq_runs))
                print(f"  ResNet-18 64 samples: reusing the speed runs (peak RSS {r64['rss_mb']:.0f} MB)")
            else:
                r64 = measure_comq(onnxcomq_cmd(a.model, a.calib, W("onnxcomq_w8_m64.onnx"), W("m64.json")),
                                   "ResNet-18, 64 samples", W("m64.json"))
            r512 = measure_comq(onnxcomq_cmd(a.model, a.calib512, W("onnxcomq_w8_m512.onnx"), W("m512.json")),
                                "ResNet-18, 512 samples", W("m512.json"))
            mem_rows.append((os.path.basename(a.model), "64 (64-image .npz)", "512 (512-image .npz)", r64, r512))
            loads.append(load1())
        s64 = measure_comq(onnxcomq_cmd(a.small_model, a.small_calib, W("small_w8_64.onnx"), W("small_64.json"),
                                        max_samples=64), f"{os.path.basename(a.small_model)}, 64 samples",
                           W("small_64.json"))
        s512 = measure_comq(onnxcomq_cmd(a.small_model, a.small_calib, W("small_w8_512.onnx"), W("small_512.json")),
                            f"{os.path.basename(a.small_model)}, 512 samples", W("small_512.json"))
        loads.append(load1())
        mem_rows.append((os.path.basename(a.small_model), "64 (--max-samples 64)", "512 (all)", s64, s512))

        out_md.append("### Memory: onnxcomq quantize --bits 8, peak RSS of a fresh process\n")
        out_md.append("| model | samples | peak RSS MB | wall s | capture s | solve s |")
        out_md.append("|---|---|---:|---:|---:|---:|")
        for model, l64, l512, x64, x512 in mem_rows:
            for lab, x in ((l64, x64), (l512, x512)):
                rep = x.get("report", {})
                out_md.append(f"| {model} | {lab} | {x['rss_mb']:.0f} | {x['wall']:.1f} | "
                              f"{fmt(rep.get('capture_seconds'))} | {fmt(rep.get('solve_seconds'))} |")
        out_md.append("")
        for model, _, _, x64, x512 in mem_rows:
            out_md.append(f"{model}: peak RSS 512/64 = **{x512['rss_mb'] / x64['rss_mb']:.2f}x** "
                          f"(+{x512['rss_mb'] - x64['rss_mb']:.0f} MB)")
        out_md.append("")

    fp1 = source_fingerprint()
    out_md.append(f"onnxcomq sources {fp0}" + (f" -> {fp1}: CHANGED DURING THE RUN, numbers mix two versions"
                                               if fp1 != fp0 else " (unchanged during the run)")
                  + (f"; extra onnxcomq options: {a.comq_args}" if a.comq_args else ""))
    out_md.append(f"1-min load average during the run: min {min(loads):.2f}, max {max(loads):.2f} "
                  f"(sampled between measurements; {os.cpu_count()} CPUs)")
    text = "\n".join(out_md)
    print("\n" + text)
    with open(W("bench_speed_memory.md"), "w") as f:
        f.write(text + "\n")
    print(f"\n(wrote {W('bench_speed_memory.md')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
