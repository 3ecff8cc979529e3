"""The run's report: per-layer errors (COMQ against round-to-nearest on the same grid), what stayed float and why,
the check against the float model, sizes and times; as a table for people and as JSON (``Report.to_dict``)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import numpy as np


@dataclass
class LayerReport:
    node: str
    op_type: str
    weight: str
    shape: list
    groups: int
    bits: int
    rows: int  # calibration rows of X
    comq_error: float  # ||X (W - Q)^T||^2 / ||X W^T||^2 of the chosen weights
    rtn_error: float  # the same for round-to-nearest on the same initial grid
    seconds: float
    granularity: str = ""  # channel | tensor | block (a Conv under --granularity block falls back to channel)
    weight_format: str = "qdq"  # qdq | matmulnbits
    note: str = ""  # why this layer's bits / granularity / format differ from the run's
    rtn_groups: int = 0  # groups (conv groups; 1 for other layers) where COMQ did not beat RTN and RTN was kept
    bias_corrected: bool = False  # the layer's bias was re-fitted (free bias)
    damped: bool = False  # G was damped (every layer with damping 'scaled'; else few rows for the fan-in)
    damping: float = 0.0  # the damping strength used (chosen on held-out rows with damping "auto")
    stage: int = 0  # the sequential-capture stage that quantized the layer
    corrected: bool = False  # sequential capture: the layer fit the float output from the quantized model's input
    consumers: list = field(default_factory=list)


@dataclass
class Report:
    layers: list
    skipped: list
    config: dict
    samples: int
    capture_seconds: float
    solve_seconds: float
    total_seconds: float = 0.0
    float_bytes: int = 0
    quant_bytes: int = 0
    avg_bits: float = 0.0  # parameter-weighted mean bits of the quantized weights
    storage_bits: float = 0.0  # the same with the stored code widths (4 for 2..4 bits, 8 for 5..8)
    mixed_precision: dict = field(default_factory=dict)  # the allocation's inputs and result (--avg-bits)
    # peak RSS (MiB) of the process up to the end of each phase: capture, solve, emit (ru_maxrss: monotone)
    peak_rss_mb: dict = field(default_factory=dict)
    # the check of the quantized model against the float one: {"samples": n, "outputs": [OutputCheck as dict]}
    verification: dict = field(default_factory=dict)
    recipe: dict = field(default_factory=dict)  # the effective recipe (config.Recipe.to_dict): reproduces the run

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def format_table(report) -> str:
    """The per-layer table: layer, op, shape, bits, rows, COMQ err, RTN err, COMQ/RTN, time s, and a note column
    (only when some layer has a note: mixed-precision bits, a granularity fallback and its reason, a recurrent
    weight's role). What every layer shares (damping, round-to-nearest kept for some groups) is in ``summary``."""
    head = ("layer", "op", "shape", "bits", "rows", "COMQ err", "RTN err", "COMQ/RTN", "time s")
    notes = any(L.note for L in report.layers)
    rows = [head + (("note",) if notes else ())]
    for L in report.layers:
        ratio = L.comq_error / L.rtn_error if L.rtn_error > 0 else 1.0
        name = L.node if len(L.node) <= 48 else "..." + L.node[-45:]
        rows.append((name, L.op_type, "x".join(map(str, L.shape)), str(L.bits), str(L.rows),
                     f"{L.comq_error:.3e}", f"{L.rtn_error:.3e}", f"{ratio:.3f}", f"{L.seconds:.2f}")
                    + ((L.note,) if notes else ()))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    # names left, numbers right, the note (last, free text) left and not padded
    lines = ["  ".join(c.ljust(w) if i < 3 else c if i == len(head) else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in rows]
    lines.insert(1, "-" * max(len(line) for line in lines))
    return "\n".join(lines)


def _percent(share: float) -> str:
    return f"{100 * share:.2g} %" if share < 0.1 else f"{100 * share:.1f} %"


def format_skipped(skipped: list, show: int = 4) -> list:
    """One line per (op type, reason), naming the first few nodes, with the share of the model's float parameters
    that those nodes hold; then the share left float in all."""
    groups: dict = {}
    for s in skipped:
        groups.setdefault((s["op_type"], s["reason"]), []).append(s)
    lines = []
    for (op, reason), nodes in groups.items():
        names = ", ".join(s["node"] for s in nodes[:show]) + (
            f", ... ({len(nodes) - show} more)" if len(nodes) > show else "")
        share = sum(s.get("share", 0.0) for s in nodes)
        held = f" holding {_percent(share)} of the weights" if share > 0 else ""
        lines.append(f"not quantized: {len(nodes)} {op} node{'s' if len(nodes) > 1 else ''}{held}: {reason}: "
                     f"{names}")
    total = sum(s.get("share", 0.0) for s in skipped)
    if total > 0:
        lines.append(f"left float: {_percent(total)} of the model's float parameters sit in the nodes above")
    return lines


def _tensors(graph):
    """Every TensorProto of ``graph`` and its subgraphs: initializers, sparse initializers, tensor attributes."""
    yield from graph.initializer
    for sp in graph.sparse_initializer:
        yield sp.values
        yield sp.indices
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node):
    for a in node.attribute:
        if a.HasField("t"):
            yield a.t
        yield from a.tensors
        if a.HasField("sparse_tensor"):
            yield a.sparse_tensor.values
            yield a.sparse_tensor.indices
        for sp in a.sparse_tensors:
            yield sp.values
            yield sp.indices
        if a.HasField("g"):
            yield from _tensors(a.g)
        for g in a.graphs:
            yield from _tensors(g)


# how the key of an external-data entry is serialized (StringStringEntryProto field 1, 8 bytes): a file without
# these bytes has no external data, and need not be parsed
_LOCATION_KEY = b"\x0a\x08location"


def model_files(path) -> list:
    """The files a saved model is made of: the .onnx file, then every external-data file its tensors reference
    (deduplicated, resolved against the model's folder; files that do not exist are left out)."""
    import mmap

    path = os.fspath(path)
    with open(path, "rb") as f:
        try:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                if m.find(_LOCATION_KEY) < 0:
                    return [path]
        except ValueError:  # an empty file cannot be mapped
            return [path]
    import onnx

    try:
        model = onnx.load(path, load_external_data=False)
    except Exception:  # noqa: BLE001 (not a model: the file's own size; the size line must not stop the run)
        return [path]
    folder = os.path.dirname(os.path.abspath(path))
    files, seen = [path], {os.path.realpath(path)}
    tensors = [t for g in [model.graph] for t in _tensors(g)]
    tensors += [t for fn in model.functions for node in fn.node for t in _node_tensors(node)]
    for t in tensors:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        loc = next((e.value for e in t.external_data if e.key == "location"), None)
        if not loc:
            continue
        full = os.path.join(folder, loc)
        key = os.path.realpath(full)
        if key not in seen and os.path.isfile(full):
            seen.add(key)
            files.append(full)
    return files


def model_size(path) -> int:
    """Bytes on disk of a saved model: the .onnx file plus every external-data file it references."""
    return sum(os.path.getsize(f) for f in model_files(path))


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def size_line(model_path, output_path) -> str:
    """'size 0.50 MB -> 0.14 MB (3.6x smaller)', counting the external data of both models."""
    fin, fout = model_files(model_path), model_files(output_path)
    size_in = sum(os.path.getsize(f) for f in fin)
    size_out = sum(os.path.getsize(f) for f in fout)
    if size_out <= 0 or size_in >= size_out:
        ratio = f"{size_in / max(size_out, 1):.1f}x smaller"
    else:
        ratio = f"{size_out / max(size_in, 1):.1f}x larger"
    ext = ", with external data" if len(fin) > 1 or len(fout) > 1 else ""
    return f"size {_mb(size_in)} -> {_mb(size_out)} ({ratio}{ext})"


def summary(report, model_path: str, output_path: str) -> list:
    """The lines printed after a run: the per-layer table, what stayed float and why, the activations, the run's
    settings, the layers where round-to-nearest was kept, the opset change, the check against float, times and
    sizes (with external data)."""
    from .verify import OutputCheck

    c = report.config
    lines = [format_table(report), *format_skipped(report.skipped)]
    if c.get("act_bits"):
        kept, sens = c["act_float_tensors"], c.get("act_float_sensitive", [])
        lines.append(f"activations: {c['act_tensors']} tensors quantized for {c['target']} ({c['act_method']})"
                     + (f"; {len(kept)} kept float (quantization noise > {c['act_max_noise']:g}): "
                        f"{', '.join(kept[:5])}" + (" ..." if len(kept) > 5 else "") if kept else "")
                     + (f"; {len(sens)} kept float for their error through Log/Div/Pow/Sqrt/Reciprocal/Exp: "
                        f"{', '.join(sens[:5])}" + (" ..." if len(sens) > 5 else "") if sens else ""))
    mixed = len({L.bits for L in report.layers}) > 1
    lines.append(f"quantized {len(report.layers)} layers ({c['method']}, "
                 + (f"{report.avg_bits:.2f} average bits, {report.storage_bits:.2f} as stored" if mixed
                    else f"{c['bits']} bits")
                 + f", {c['granularity']}, {c['scheme']}"
                 + (f"; {c['act_dtype']} activations for {c['target']}" if c.get("act_bits") else "")
                 + (f"; sequential capture in {c['sequential_stages']} stages" if c.get("sequential_stages")
                    else "")
                 + f") with {report.samples} calibration samples"
                 + (f" in batches of {c['batch_choice']}" if c.get("batch_choice") else ""))
    n_fb = sum(L.rtn_groups > 0 for L in report.layers)
    if n_fb:
        lines.append(f"round-to-nearest kept for some groups in {n_fb} of {len(report.layers)} layer(s), where "
                     f"COMQ was not better")
    if c.get("batch_norms_folded"):
        lines.append(f"folded {c['batch_norms_folded']} BatchNormalization node(s) into the layer before each, as "
                     "runtimes do")
    op = c.get("opset")
    if op and op["output"] != op["input"]:
        lines.append(f"opset raised {op['input']} -> {op['output']} for {op['reason'] or 'the quantized model'}"
                     + (" (weights.max_opset 13 stores them in int8/uint8 at opset 13, for runtimes without int4)"
                        if "int4" in op["reason"] else ""))
    ver = report.verification
    if ver:
        lines.append(f"check against float on {ver['samples']} calibration sample(s): "
                     + "; ".join(OutputCheck(**o).summary() for o in ver["outputs"]))
    lines.append(f"time: capture {report.capture_seconds:.1f} s, solve {report.solve_seconds:.1f} s, total "
                 f"{report.total_seconds:.1f} s; {size_line(model_path, output_path)}; wrote {output_path}")
    return lines


def png_path(report_json_path) -> str:
    """Where the report's plot goes beside its JSON: report.json -> report.png (a path without a .json suffix
    gets .png appended: report -> report.png, r.png -> r.png.png, so the JSON is never overwritten)."""
    p = os.fspath(report_json_path)
    root, ext = os.path.splitext(p)
    return (root if ext.lower() == ".json" else p) + ".png"


class PlotUnavailable(ImportError):
    """matplotlib is not installed: the report's PNG cannot be drawn (the caller may warn and go on)."""


def _matplotlib():
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError as e:
        raise PlotUnavailable("the report's plot needs matplotlib: pip install 'onnxcomq[plot]' "
                              f"(or pip install matplotlib); {e}") from e
    return Figure, FigureCanvasAgg, MaxNLocator


# layers past which the x axis is labelled by index rather than by layer name
MAX_NAMED_TICKS = 40
PNG_DPI = 100


def png_title(report) -> str:
    c = report.config
    mixed = len({L.bits for L in report.layers}) > 1
    bits = f"{report.avg_bits:.2f} average bits" if mixed and report.avg_bits else f"{c.get('bits', '?')} bits"
    title = f"{c.get('method', '?')}, {bits}, {c.get('granularity', '?')}: {len(report.layers)} layers"
    outs = (report.verification or {}).get("outputs") or []
    checks = []
    for o in outs[:3]:
        if o.get("cosine") is not None:
            checks.append(f"{o['name']}: cosine {o['cosine']:.4f}")
        elif o.get("agreement") is not None:
            checks.append(f"{o['name']}: {100 * o['agreement']:.1f} % equal")
    if checks:
        title += "\ncheck against float: " + "; ".join(checks) + (f"; ... ({len(outs) - 3} more)"
                                                                  if len(outs) > 3 else "")
    return title


def png_size(n_layers: int) -> tuple:
    """(width, height) in pixels of the plot for ``n_layers`` layers: wider for more layers, within bounds."""
    width_in = min(16.0, max(8.0, 4.0 + 0.25 * min(n_layers, MAX_NAMED_TICKS)))
    height_in = 7.5 if n_layers <= MAX_NAMED_TICKS else 6.0  # names under the axis need room
    return round(width_in * PNG_DPI), round(height_in * PNG_DPI)


def write_png(report, path) -> str:
    """Draw the report: per-layer relative error of COMQ and of round-to-nearest (log scale, layers in order) above
    the bits of each layer; the title holds the run's method, bits, granularity and the check against float.
    matplotlib (Agg, no pyplot and no global backend change) is imported here: PlotUnavailable (an ImportError)
    when it is missing. The file is written whole or not at all. Returns ``path``."""
    import uuid

    import numpy as np

    Figure, FigureCanvasAgg, MaxNLocator = _matplotlib()
    layers = list(report.layers)
    n = len(layers)
    w_px, h_px = png_size(n)
    fig = Figure(figsize=(w_px / PNG_DPI, h_px / PNG_DPI), dpi=PNG_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax_err, ax_bits = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    fig.suptitle(png_title(report), fontsize=11)
    x = np.arange(n)

    def positive(v):
        v = np.asarray(v, dtype=np.float64)
        return np.where(np.isfinite(v) & (v > 0), v, np.nan)

    comq = positive([L.comq_error for L in layers])
    rtn = positive([L.rtn_error for L in layers])
    style = {"marker": "o", "markersize": 4} if n <= 100 else {"linewidth": 1.0}
    if n:
        ax_err.plot(x, rtn, color="tab:orange", label="round-to-nearest", **style)
        ax_err.plot(x, comq, color="tab:blue", label="COMQ", **style)
        kept = [i for i, L in enumerate(layers) if L.rtn_groups]
        if kept:
            ax_err.scatter(x[kept], comq[kept], marker="s", s=40 if n <= 100 else 16, facecolors="none",
                           edgecolors="black", zorder=3, label="RTN kept for some groups")
        if np.isfinite(comq).any() or np.isfinite(rtn).any():
            ax_err.set_yscale("log")
        ax_err.legend(loc="best", fontsize=9)
    else:
        ax_err.text(0.5, 0.5, "no layers quantized", ha="center", va="center", transform=ax_err.transAxes)
    ax_err.set_ylabel("relative error\n||X(W - Q)^T||^2 / ||XW^T||^2")
    ax_err.grid(True, which="major", alpha=0.3)

    bits = np.array([L.bits for L in layers], dtype=np.float64)
    if n:
        ax_bits.bar(x, bits, width=0.8 if n <= 100 else 1.0, color="tab:gray")
        ax_bits.set_ylim(0, max(8.0, float(bits.max())) + 0.5)
    ax_bits.set_ylabel("bits")
    used = sorted({int(b) for b in bits})
    if 0 < len(used) <= 6:
        ax_bits.set_yticks(used)  # the widths in use: 2, 4, 8 rather than 0, 3, 6
    else:
        ax_bits.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=4))
    ax_bits.grid(True, axis="y", alpha=0.3)
    if 0 < n <= MAX_NAMED_TICKS:
        names = [L.node if len(L.node) <= 28 else "..." + L.node[-25:] for L in layers]
        ax_bits.set_xticks(x)
        ax_bits.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    else:
        ax_bits.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=12))
        ax_bits.set_xlabel("layer index (in the order of the table)")
    if n:
        ax_bits.set_xlim(-0.6, n - 0.4)

    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex[:12]}.tmp")  # (the umask's mode, unlike mkstemp's)
    try:
        with open(tmp, "xb") as f:
            fig.savefig(f, format="png", dpi=PNG_DPI)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


RNN_ROLE = {"rnn_input": "W: input sequence", "rnn_hidden": "R: hidden states"}  # (the note of a recurrent layer)


def layer_row(layer, res, plan, seconds: float) -> LayerReport:
    """The report's row of a solved layer (``res``: solve.layer.LayerResult; ``plan``: precision.LayerPlan)."""
    scfg = res.solver
    return LayerReport(layer.node, layer.op_type, layer.weight, list(layer.weight_shape), layer.groups, scfg.bits,
                       res.rows, res.comq_error, res.rtn_error, seconds, rtn_groups=res.rtn_groups,
                       bias_corrected=res.bias_delta is not None, damped=res.damping > 0, damping=res.damping,
                       corrected=res.corrected, consumers=[c for c, _ in layer.consumers],
                       granularity=scfg.granularity, weight_format=plan.format,
                       note="; ".join(x for x in (RNN_ROLE.get(layer.x.kind, ""), plan.note) if x))


def merge_branch_reports(report: Report, spliced: list, untaken: list, total: int) -> None:
    """The quantized If branches' and loop bodies' layers and left-out nodes in the run's report, named
    ``If/branch/node`` (``Loop/body/node``); the nodes of the branches no calibration batch took, said so (their
    ``left`` reason). ``spliced``: [(Branch, quantized model, its Report, constants)]; ``total``: the model's float
    parameters (the left-out nodes' shares)."""
    for s in report.skipped:
        b = next((b for b in untaken if s["node"].startswith(f"{b.node}/{b.attr}/")), None)
        if b is not None:
            s["reason"] = b.left
    if not spliced:
        return
    done = {f"{b.node}/{b.attr}/" for b, *_ in spliced}
    skipped = [s for s in report.skipped if not any(s["node"].startswith(p) for p in done)]
    for b, _, rep, _ in spliced:
        prefix = f"{b.node}/{b.attr}/"
        for L in rep.layers:
            L.node, L.weight = prefix + L.node, prefix + L.weight
            report.layers.append(L)
        for s in rep.skipped:
            skipped.append(dict(s, node=prefix + s["node"], share=s["params"] / total if total else 0.0))
        report.samples = max(report.samples, rep.samples)
    # (an If whose branches were quantized, a loop whose body was, holds no weight itself: the nodes its other branch
    # left float are listed)
    report.skipped = [s for s in skipped if not (s["op_type"] in ("If", "Loop", "Scan") and
                                                 s["node"] in {b.node for b, *_ in spliced})]


def run_metadata(recipe, official: bool, bias_corrected: bool, samples: int, mask_input, stages: int,
                 activations: dict | None) -> dict:
    """What the quantized model's metadata (onnxcomq.config) says about the run that made it."""
    base = recipe.solver_config()
    meta = {"method": recipe.weights.method, "bits": base.bits, "granularity": base.granularity,
            "scheme": base.scheme, "order": base.order, "sweeps": base.sweeps, "scale_update": base.scale_update,
            "lambda": "search" if base.lambda_search else base.lam, "official": official,
            "bias_correction": bias_corrected, "calibration_samples": samples, "mask_input": mask_input,
            "damping": 0.0 if official else recipe.regularization.damping,
            "sequential_stages": stages if stages > 1 else 0}
    if base.granularity == "block":
        meta["block_size"] = base.block_size
    if recipe.weights.format != "qdq":
        meta["weight_format"] = recipe.weights.format
    meta.update(activations or {})
    return meta


def bits_summary(report: Report, max_opset) -> None:
    """Set the report's average bits over its layer rows (parameter-weighted; If branches' rows included) and the
    same as stored (2..4-bit codes take 4 bits as int4, 8 in the int8 containers below opset 21)."""
    from .precision import average_bits

    params = {L.weight: int(np.prod(L.shape)) for L in report.layers}
    bits = {L.weight: L.bits for L in report.layers}
    report.avg_bits = average_bits(bits, params)
    int4 = max_opset is None or max_opset >= 21
    report.storage_bits = average_bits({w: 4 if b <= 4 and int4 else 8 for w, b in bits.items()}, params)
