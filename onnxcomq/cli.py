"""Command line: ``onnxcomq quantize`` and ``onnxcomq eval``.

User mistakes end with one line on stderr (``onnxcomq: error: ...``) and exit status 2; no traceback, no output file
left behind, the input never touched.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys

from . import __version__
from .errors import UserError

EPILOG_QUANTIZE = """\
examples:
  onnxcomq quantize model.onnx -o model.w4.onnx --calib calib.npz
  onnxcomq quantize model.onnx -o model.w8.onnx --calib calib.npz --bits 8 --report report.json
  onnxcomq quantize model.onnx -o model.w4.onnx --calib calib_dir/ --scheme sym --exclude '*classifier*'

calibration data: an .npz whose keys are the model's input names, arrays stacked along the batch axis (NVIDIA
ModelOpt's convention), or a folder of .npz/.npy files, or 'random' for a smoke test (accuracy meaningless).
"""


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one line (``onnxcomq: error: ...``), exit status 2, like every other error."""

    def error(self, message):
        self.exit(2, f"onnxcomq: error: {message} (see '{self.prog} --help')\n")


def _parser() -> argparse.ArgumentParser:
    from .graph.layers import (
        SUPPORTED_OPS,  # (numpy, onnx: imported inside main, where Ctrl-C is one line)
    )

    debug = dict(action="store_true", help="show the Python traceback of an unexpected error instead of one line")
    p = _Parser(
        prog="onnxcomq",
        description="COMQ post-training quantization of ONNX models: closed-form coordinate descent on integer "
                    "codes and scales, layer by layer, without backpropagation. Writes a QDQ model "
                    "(DequantizeLinear weights) that onnxruntime, TensorRT and OpenVINO run.")
    p.add_argument("--version", action="version", version=f"onnxcomq {__version__}")
    p.add_argument("--debug", **debug)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    q = sub.add_parser("quantize", help="quantize a float ONNX model's weights with COMQ",
                       description="Quantize the weights of every Conv, Gemm and MatMul with a constant weight.",
                       epilog=EPILOG_QUANTIZE, formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("model", help="float ONNX model (.onnx)")
    q.add_argument("-o", "--output", required=True, help="where to write the quantized model")
    q.add_argument("--calib", required=True, metavar="DATA",
                   help="calibration data: .npz (keys = input names), a folder of .npz/.npy, or 'random'")
    g = q.add_argument_group("quantization")
    g.add_argument("--bits", type=int, default=4, help="weight bits, 2..8 (default: 4; <= 4 bits are stored as "
                                                       "int4/uint4, opset 21)")
    g.add_argument("--granularity", choices=["channel", "tensor", "block"], default="channel",
                   help="one scale per output channel, per layer, or per output channel and block of "
                        "--block-size input channels (MatMul, Gemm, and Conv with group 1 whose input channels "
                        "are a multiple of the block size or a 1x1 kernel; other layers fall back to channel, "
                        "with the reason in the table) (default: channel)")
    g.add_argument("--block-size", type=int, default=32,
                   help="input channels per scale with --granularity block; need not divide the fan-in (the last "
                        "block is shorter); MatMulNBits needs a power of two >= 16 (default: 32)")
    g.add_argument("--format", dest="weight_format", choices=["qdq", "matmulnbits"], default="qdq",
                   help="qdq: DequantizeLinear weights; matmulnbits: MatMul weights as onnxruntime's "
                        "com.microsoft MatMulNBits (int4/int8 kernels; needs --granularity block and 2/4/8 bits), "
                        "other layers DequantizeLinear (default: qdq)")
    g.add_argument("--nbits-accuracy-level", type=int, default=0, choices=[0, 1, 2, 3, 4],
                   help="accuracy_level of the MatMulNBits nodes: 0 computes in float (exact), 4 quantizes the "
                        "activations to int8 (faster, less exact) (default: 0)")
    g.add_argument("--scheme", choices=["asym", "sym"], default=None,
                   help="asym: min-max grid with zero point; sym: zero point 0, as TensorRT needs (default: asym; "
                        "sym with --act-bits)")
    g.add_argument("--method", choices=["comq", "rtn"], default="comq",
                   help="comq, or rtn (round-to-nearest on the same grid, the baseline) (default: comq)")
    g.add_argument("--official", action="store_true",
                   help="the official COMQ code's exact configuration (greedy, 1 sweep, asym per-channel min-max "
                        "grid, no scale update), whatever the other options say")
    s = q.add_argument_group("solver")
    s.add_argument("--order", choices=["cyclic", "importance", "greedy"], default="cyclic",
                   help="coordinate order: cyclic (columns in order), importance (columns by sqrt(diag G) * "
                        "||W column|| descending), or greedy (per row by |W| * sqrt(diag G), the official code's; "
                        "slower on CPU). All three reach about the same error with sweeps and scale updates "
                        "(default: cyclic)")
    s.add_argument("--sweeps", type=int, default=3, help="coordinate-descent sweeps per layer (default: 3)")
    s.add_argument("--scale-update", action=argparse.BooleanOptionalAction, default=True,
                   help="closed-form scale update after each sweep (default: on)")
    s.add_argument("--bias-correction", action=argparse.BooleanOptionalAction, default=True,
                   help="free bias: solve on the centered statistics and re-fit each layer's float bias so the "
                        "mean output error is zero (adds a bias where a layer has none) (default: on)")
    s.add_argument("--lambda", dest="lam", type=float, default=None,
                   help="a fixed grid shrink factor for the initial scales; turns the search off (default: at <= 4 "
                        "bits searched per channel among 1.0 .. 0.7 by the layer's own objective, else 1.0)")
    s.add_argument("--lambda-solves", type=int, default=7, metavar="K",
                   help="with the lambda search: solve each channel with COMQ from its K best shrink factors (as "
                        "ranked by round-to-nearest) and keep the one with the lowest COMQ objective; K times the "
                        "solve time (1..7, default: 7, all candidates)")
    s.add_argument("--damping", type=_damping, default="scaled", metavar="scaled|auto|FLOAT",
                   help="solve with G + alpha * mean(diag G) * I so the codes do not fit what is particular to the "
                        "calibration data; 'scaled': every layer, alpha = min(10, S * sqrt(fan-in / rows)) with S "
                        "from --damping-scale (more for layers with few rows per input: late convs, classifiers); a "
                        "number: that alpha for layers with fewer than 4 x fan-in rows only; 'auto': per such layer "
                        "among 0, 0.01, 0.03, 0.1, 0.3, 1 by the error on half of the samples when solved on the "
                        "other half; 0 turns it off (default: scaled)")
    s.add_argument("--damping-scale", type=float, default=3.0, metavar="S",
                   help="S of --damping scaled (default: 3)")
    s.add_argument("--sequential", action=argparse.BooleanOptionalAction, default=False,
                   help="sequential (error-feeding) capture: quantize the layers in --stages topological stages and "
                        "let each stage fit the output of the float layer from the input of the model whose earlier "
                        "stages are already quantized; costs 2 calibration passes per stage after the first; "
                        "on EfficientNet-Lite0 W4 it lowers the mean KL from 0.153 to 0.121 (4 calibration sets "
                        "of 64) at 2.7x the time (default: off)")
    s.add_argument("--stages", type=int, default=16,
                   help="stages of --sequential capture: contiguous groups of about equally many layers; more "
                        "stages follow the quantization error more closely and cost more passes (default: 16)")
    s.add_argument("--correction", choices=["entry", "all", "none"], default="entry",
                   help="with --sequential, which layers fit the float layer's output from the quantized model's "
                        "input (correcting the error of the earlier stages); the others fit their own output on "
                        "that input: entry = the layers whose input comes from earlier stages only, all, none "
                        "(default: entry)")
    s.add_argument("--correction-strength", type=float, default=1.0, metavar="B",
                   help="with --sequential, the share of its input error a correcting layer's weights fit: their "
                        "target is B x (float input) + (1 - B) x (quantized model's input); the free bias always "
                        "fits the float output's mean (0..1, default: 1)")
    s.add_argument("--correct-min-rows", type=float, default=4.0, metavar="R",
                   help="with --sequential, a layer corrects only where it has at least R x its fan-in calibration "
                        "rows (with fewer it fits the calibration set itself); raise it when the calibration samples "
                        "are many crops of few images: 256 crops of 14 photos give EfficientNet-Lite0 W4 KL 0.161 "
                        "at 4 and 0.129 at 16 (default: 4)")
    s.add_argument("--correct-few-rows", action=argparse.BooleanOptionalAction, default=False,
                   help="with --sequential, let every entry layer correct, whatever its rows (default: off)")
    s.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto",
                   help="where the solver runs: gpu uses CuPy (default: auto)")
    m = q.add_argument_group("per-layer precision")
    m.add_argument("--keep-8bit", default="", metavar="first,last,PATTERN,...",
                   help="keep these layers at 8 bits: 'first'/'last' = the first/last quantized layer in "
                        "topological order, 'depthwise' = depthwise convs, other items fnmatch patterns on node "
                        "names or op types")
    m.add_argument("--layer-bits", action="append", default=[], metavar="PATTERN=BITS",
                   help="bits for the layers matching PATTERN (node name or op type, fnmatch); repeatable, a "
                        "later match wins; applied after --keep-8bit")
    m.add_argument("--avg-bits", type=float, default=None,
                   help="mixed precision: parameter-weighted mean bits of the quantized weights; layers not "
                        "pinned by --keep-8bit/--layer-bits start at --bits and the ones with the best measured "
                        "gain per extra bit are raised to --mp-bits (default: off)")
    m.add_argument("--mp-bits", default="5,6,8", metavar="B,...",
                   help="bit widths a layer may be raised to under --avg-bits; 5..8-bit codes are all stored as "
                        "int8, so '8' makes --avg-bits a file-size budget (default: 5,6,8)")
    m.add_argument("--mp-sensitivity", choices=["output", "layer"], default="output",
                   help="output: a layer's predicted damage = its relative output error times its measured "
                        "effect on the model output (one forward pass per layer on --mp-samples samples); "
                        "layer: its relative output error alone (default: output)")
    m.add_argument("--mp-estimate", choices=["solve", "scaling"], default="scaling",
                   help="a layer's error at the candidate bits: scale its base-bits error by 1/4 per extra bit "
                        "(the quantization-noise model; one solve per layer), or solve it at every candidate "
                        "(default: scaling)")
    m.add_argument("--mp-samples", type=int, default=8,
                   help="calibration samples for --mp-sensitivity output (default: 8)")
    c = q.add_argument_group("calibration and layers")
    c.add_argument("--batch-size", type=int, default=32,
                   help="largest calibration batch; lowered to fit --max-memory, and a model with a fixed batch "
                        "dimension uses its own (default: 32)")
    c.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="memory budget, e.g. 4G, 512M or a number of bytes: the calibration batch is chosen from "
                        "the model's activation sizes so that capture fits it (default: a quarter of the RAM)")
    c.add_argument("--max-samples", type=int, default=None, help="use at most this many calibration samples")
    c.add_argument("--mask-input", default="auto", metavar="NAME",
                   help="attention-mask input (0 = padding): padded token positions stay out of the statistics; "
                        "'auto' picks attention_mask/input_mask/mask if present, 'none' turns it off "
                        "(default: auto)")
    c.add_argument("--op-types", default=",".join(SUPPORTED_OPS),
                   help=f"comma-separated op types to quantize (default: {','.join(SUPPORTED_OPS)})")
    c.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="leave out nodes whose name or op type matches this fnmatch pattern (repeatable)")
    c.add_argument("--rewrite-matmul", action=argparse.BooleanOptionalAction, default=True,
                   help="rewrite each Einsum with a constant weight (tf2onnx writes Keras EinsumDense layers, e.g. "
                        "MultiHeadAttention projections, so) and each MatMul with its constant weight on the left "
                        "(W @ x) as Reshape/Transpose + MatMul(x, W') so that it is quantized (default: on)")
    act = q.add_argument_group("activations (deployment: W8A8, W4A8)")
    act.add_argument("--act-bits", type=int, choices=[8], default=None,
                     help="quantize activations too (Q/DQ pairs placed for --target); default: weight-only")
    act.add_argument("--target", choices=["ort", "tensorrt"], default="ort",
                     help="ort: uint8 asymmetric activations, Q/DQ on inputs and outputs of the quantized ops, the "
                          "residual Adds and the ops onnxruntime runs on uint8 (fuses into QLinearConv / "
                          "QLinearMatMul / QLinearAdd / QGemm); tensorrt: int8 symmetric activations and weights "
                          "(zero point 0), Q/DQ on the inputs of weighted ops and residual Adds; without --act-bits: "
                          "symmetric weight-only, 2..4 bits only with --granularity block (default: ort)")
    act.add_argument("--act-method", choices=["minmax", "percentile", "mse"], default="minmax",
                     help="activation ranges: min/max, a percentile of the values, or the clip range with the "
                          "lowest quantization MSE (default: minmax)")
    act.add_argument("--act-percentile", type=float, default=99.99,
                     help="percentile for --act-method percentile (default: 99.99)")
    act.add_argument("--act-scheme", choices=["asym", "sym"], default=None,
                     help="activation zero point free (asym) or centred (sym) (default: the target's)")
    act.add_argument("--act-dtype", choices=["uint8", "int8"], default=None,
                     help="activation integer type (default: the target's: ort uint8, tensorrt int8)")
    act.add_argument("--act-exclude", action="append", default=[], metavar="PATTERN",
                     help="keep activations float at nodes (name or op type) or tensors matching this fnmatch "
                          "pattern (repeatable)")
    act.add_argument("--act-aware", action=argparse.BooleanOptionalAction, default=False,
                     help="solve each layer on its input as the deployed model sees it (a second capture pass with "
                          "the activations fake-quantized) (default: off)")
    act.add_argument("--act-max-noise", type=float, default=0.003, metavar="RATIO",
                     help="keep float the activations whose quantization noise / signal power on the calibration "
                          "data exceeds RATIO (outlier-heavy tensors such as transformer residual streams); "
                          "'inf' quantizes every planned tensor (default: 0.003)")
    o = q.add_argument_group("output")
    o.add_argument("--report", metavar="REPORT.json", help="also write the per-layer report as JSON")
    o.add_argument("--max-opset", type=int, default=None, metavar="N",
                   help="the highest opset of the output, for older runtimes (>= 13): below 21, 2..4-bit codes are "
                        "stored in int8/uint8 containers at opset 13 (twice the bytes of int4, the same weights); "
                        "--granularity block needs 21, float16 models 19 (default: what the weights need, 21 for "
                        "2..4 bits, 13 for 5..8; the summary says when the model's opset was raised)")
    o.add_argument("--write-unverified", action="store_true",
                   help="before writing, the quantized model runs beside the float one on calibration samples and "
                        "every output must be finite and close to float; with this flag a model that fails the "
                        "check is written anyway, with a warning (for debugging)")
    o.add_argument("--quiet", action="store_true", help="no progress bars and no table")
    o.add_argument("--debug", **debug, default=argparse.SUPPRESS)

    e = sub.add_parser("eval", help="top-1 accuracy of a classifier on a labelled .npz",
                       description="Run MODEL on the inputs of DATA (.npz with the model's input names and a "
                                   "'labels' array) and print the top-1 accuracy.")
    e.add_argument("model", help="ONNX model (float or quantized)")
    e.add_argument("--data", required=True, help=".npz with input arrays and 'labels'")
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--debug", **debug, default=argparse.SUPPRESS)
    return p


def _damping(text: str):
    """--damping: 'scaled', 'auto' or a number (checked by QuantizeConfig.validate)."""
    if text in ("auto", "scaled"):
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'scaled', 'auto' or a number, got {text!r}") from None


def _same_file(a: str, b: str) -> bool:
    """Whether paths ``a`` and ``b`` name one file: the same path once symlinks are resolved, or (where both exist)
    the same inode, which catches hard links."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def _external_data_files(model_path: str) -> list:
    """The external-data files that the ONNX file ``model_path`` refers to, read without loading any tensor
    ([] if the file cannot be read: loading it reports that later)."""
    try:
        import onnx
        from onnx.external_data_helper import _get_all_tensors

        m = onnx.load(model_path, load_external_data=False)
        base = os.path.dirname(os.path.abspath(model_path))
        return sorted({os.path.join(base, e.value) for t in _get_all_tensors(m)
                       if t.data_location == onnx.TensorProto.EXTERNAL for e in t.external_data
                       if e.key == "location"})
    except Exception:
        return []


def _check_outputs(model_path: str, out: str, report: str | None, calib) -> None:
    """Before the long run, refuse outputs that cannot be written (modelio.check_output_path) and outputs that
    would replace an input: the model, its external data, a calibration file or an .npz/.npy of the calibration
    folder (an existing one, or a new one that the next run would read as calibration data; other files there are
    not inputs), or each other. Paths are compared after resolving symlinks and, where both exist, by inode (hard
    links). The model's own external data file ``<out>.data`` (written for large models) counts as an output."""
    from .graph.modelio import check_output_path

    check_output_path(out, "output")
    if report is not None:
        check_output_path(report, "report")
    outputs = [(out, "output path"), (out + ".data", f"the output's external data file {out}.data")]
    if report is not None:
        outputs.append((report, "--report path"))
    inputs = [(model_path, "the input model")]
    if any(os.path.lexists(p) for p, _ in outputs):  # only an existing file can be an external data file
        inputs += [(f, f"the input model's external data file {os.path.basename(f)}")
                   for f in _external_data_files(model_path)]
    calib_dir = None
    if isinstance(calib, str) and calib != "random":
        if os.path.isdir(calib):
            calib_dir = os.path.realpath(calib)
            inputs += [(os.path.join(calib, f), f"the calibration file {f} (of the calibration folder)")
                       for f in sorted(os.listdir(calib)) if f.endswith((".npz", ".npy"))]
        else:
            inputs.append((calib, "the calibration file"))
    for p, label in outputs:
        for q, what in inputs:
            if _same_file(p, q):
                raise UserError(f"{p}: {label} is {what}; choose another file")
        if calib_dir is not None and p.endswith((".npz", ".npy")) and \
                os.path.realpath(os.path.dirname(os.path.abspath(p))) == calib_dir:
            raise UserError(f"{p}: {label} is in the calibration folder {calib} as an .npz/.npy file, which the "
                            "next run would read as calibration data; choose another file")
    if report is not None and (_same_file(report, out) or _same_file(report, out + ".data")):
        raise UserError(f"{report}: --report path is the same file as the output model {out}; choose another file")


def _report_json(report) -> str:
    """The report as JSON text (numpy scalars and arrays as numbers and lists), made before anything is written."""
    def default(o):
        if hasattr(o, "tolist"):
            return o.tolist()
        return str(o)

    return json.dumps(report.to_dict(), indent=2, default=default) + "\n"


def format_table(report) -> str:
    rows = [("layer", "op", "shape", "bits", "rows", "COMQ err", "RTN err", "COMQ/RTN", "time s")]
    for L in report.layers:
        ratio = L.comq_error / L.rtn_error if L.rtn_error > 0 else 1.0
        name = L.node if len(L.node) <= 48 else "..." + L.node[-45:]
        kept = (f" (rtn {L.rtn_groups}/{L.groups})" if L.rtn_groups else "") + (" (damped)" if L.damped else "") \
            + (f" ({L.note})" if L.note else "")
        rows.append((name, L.op_type, "x".join(map(str, L.shape)), str(L.bits), str(L.rows),
                     f"{L.comq_error:.3e}", f"{L.rtn_error:.3e}", f"{ratio:.3f}{kept}", f"{L.seconds:.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
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


def _int_list(text: str) -> tuple:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise UserError(f"--mp-bits {text!r}: expected comma-separated integers, e.g. 5,6,8") from None


def cmd_quantize(a) -> int:
    from .graph.modelio import save_model
    from .pipeline import QuantizeConfig, run
    from .verify import OutputCheck, VerificationError

    _check_outputs(a.model, a.output, a.report, a.calib)
    if a.device == "gpu":  # fail now, not after loading the model and the calibration data
        from .solve.backend import get_xp
        get_xp(a.device)
    cfg = QuantizeConfig(bits=a.bits, granularity=a.granularity, scheme=a.scheme, order=a.order, sweeps=a.sweeps,
                         scale_update=a.scale_update, lam=1.0 if a.lam is None else a.lam,
                         lambda_search=None if a.lam is None else False, lambda_solves=a.lambda_solves,
                         method=a.method, official=a.official,
                         bias_correction=a.bias_correction, mask_input=a.mask_input, damping=a.damping,
                         damping_scale=a.damping_scale,
                         sequential=a.sequential, stages=a.stages, correction=a.correction,
                         correction_strength=a.correction_strength, correct_few_rows=a.correct_few_rows,
                         correct_rows=a.correct_min_rows,
                         batch_size=a.batch_size, max_memory=a.max_memory, max_samples=a.max_samples,
                         device=a.device,
                         block_size=a.block_size, weight_format=a.weight_format,
                         nbits_accuracy_level=a.nbits_accuracy_level,
                         keep_8bit=tuple(t.strip() for t in a.keep_8bit.split(",") if t.strip()),
                         layer_bits=tuple(a.layer_bits), avg_bits=a.avg_bits, mp_bits=_int_list(a.mp_bits),
                         mp_sensitivity=a.mp_sensitivity, mp_samples=a.mp_samples,
                         mp_estimate=a.mp_estimate,
                         op_types=tuple(t.strip() for t in a.op_types.split(",") if t.strip()),
                         exclude=tuple(a.exclude), rewrite_matmul=a.rewrite_matmul, act_bits=a.act_bits,
                         target=a.target, act_method=a.act_method,
                         act_percentile=a.act_percentile, act_scheme=a.act_scheme, act_dtype=a.act_dtype,
                         act_exclude=tuple(a.act_exclude), act_aware=a.act_aware,
                         act_max_noise=a.act_max_noise, max_opset=a.max_opset)
    try:
        model, report = run(a.model, a.calib, cfg, progress=not a.quiet and sys.stderr.isatty())
    except VerificationError as e:
        if not a.write_unverified or e.model is None:
            raise
        print(f"onnxcomq: warning: {e} (written anyway: --write-unverified)", file=sys.stderr)
        model, report = e.model, e.report
    # the model and the report are written together, all or nothing (modelio.AtomicFiles)
    save_model(model, a.output, also={a.report: _report_json(report)} if a.report else None)
    if not a.quiet:
        print(format_table(report))
        for line in format_skipped(report.skipped):
            print(line)
        if cfg.act_bits:
            kept = report.config["act_float_tensors"]
            print(f"activations: {report.config['act_tensors']} tensors quantized for {cfg.target} "
                  f"({report.config['act_method']})" + (f"; {len(kept)} kept float (quantization noise > "
                                                         f"{cfg.act_max_noise:g}): {', '.join(kept[:5])}"
                                                         + (" ..." if len(kept) > 5 else "") if kept else ""))
        n_fb = sum(L.rtn_groups > 0 for L in report.layers)
        size_in = os.path.getsize(a.model)
        size_out = os.path.getsize(a.output)
        mixed = len({L.bits for L in report.layers}) > 1
        print(f"quantized {len(report.layers)} layers ({report.config['method']}, "
              + (f"{report.avg_bits:.2f} average bits, {report.storage_bits:.2f} as stored" if mixed
                 else f"{report.config['bits']} bits")
              + f", {cfg.granularity}, {cfg.weight_scheme()}"
              + (f"; {report.config['act_dtype']} activations for {cfg.target}" if cfg.act_bits else "")
              + f") with {report.samples} calibration samples"
              + (f" in batches of {report.config['batch_choice']}" if report.config.get("batch_choice") else "")
              + (f"; {n_fb} layer(s) kept round-to-nearest for some groups, where COMQ was not better"
                 if n_fb else ""))
        op = report.config.get("opset")
        if op and op["output"] != op["input"]:
            print(f"opset raised {op['input']} -> {op['output']} for {op['reason'] or 'the quantized model'}"
                  + (" (--max-opset 13 stores them in int8/uint8 at opset 13, for runtimes without int4)"
                     if "int4" in op["reason"] else ""))
        ver = report.verification
        if ver:
            print(f"check against float on {ver['samples']} calibration sample(s): "
                  + "; ".join(OutputCheck(**o).summary() for o in ver["outputs"]))
        print(f"time: capture {report.capture_seconds:.1f} s, solve {report.solve_seconds:.1f} s, total "
              f"{report.total_seconds:.1f} s; size {size_in / 1e6:.2f} MB -> {size_out / 1e6:.2f} MB "
              f"({size_in / max(size_out, 1):.1f}x smaller); wrote {a.output}")
    return 0


def cmd_eval(a) -> int:
    from .evaluate import top1_accuracy

    acc, n = top1_accuracy(a.model, a.data, batch_size=a.batch_size)
    print(f"top-1 accuracy {100 * acc:.2f} % on {n} samples ({a.model})")
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the signal arrives: the same clean-up as Ctrl-C runs (temporary folders
    removed, no half-written output), then the exit status is 128 + the signal number."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum, frame):
    raise Terminated(signum)


def _install_signal_handlers() -> dict:
    """SIGTERM/SIGHUP -> Terminated; returns the previous handlers (to restore: main is also called in-process)."""
    previous = {}
    for name in ("SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is None:
            continue
        try:
            previous[sig] = signal.signal(sig, _raise_terminated)
        except (ValueError, OSError):  # not the main thread
            pass
    return previous


def _one_line(text: str, limit: int = 500) -> str:
    lines = [t.strip() for t in str(text).splitlines() if t.strip()]
    line = "; ".join(lines)
    return line if len(line) <= limit else line[:limit - 3] + "..."


def main(argv=None) -> int:
    """Run the command line; every failure is one line on stderr: exit 2 for the user's mistakes (UserError, bad
    options), 1 for anything unexpected (rerun with --debug for the traceback), 130 for Ctrl-C, 128 + N for
    signal N (SIGTERM, SIGHUP)."""
    argv = sys.argv[1:] if argv is None else [os.fspath(x) if isinstance(x, os.PathLike) else x for x in argv]
    debug = "--debug" in argv
    previous = _install_signal_handlers()
    try:
        logging.basicConfig(level=logging.WARNING, format="onnxcomq: warning: %(message)s")
        p = _parser()
        a = p.parse_args(argv)
        debug = bool(getattr(a, "debug", False))
        if a.command is None:
            p.print_help()
            return 2
        return {"quantize": cmd_quantize, "eval": cmd_eval}[a.command](a)
    except UserError as e:
        print(f"onnxcomq: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Terminated as e:
        print(f"onnxcomq: error: terminated by {signal.Signals(e.signum).name}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("onnxcomq: error: interrupted", file=sys.stderr)
        return 130
    except MemoryError as e:
        if debug:
            raise
        print(f"onnxcomq: error: out of memory ({_one_line(e) or 'MemoryError'}); try a smaller --batch-size or "
              "--max-samples (rerun with --debug for the traceback)", file=sys.stderr)
        return 1
    except Exception as e:
        if debug:
            raise
        print(f"onnxcomq: error: internal error: {type(e).__name__}: {_one_line(e)} (rerun with --debug for the "
              "traceback)", file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            try:
                signal.signal(sig, handler)
            except (ValueError, OSError, TypeError):
                pass


if __name__ == "__main__":
    sys.exit(main())
