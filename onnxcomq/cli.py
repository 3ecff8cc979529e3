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
  onnxcomq quantize model.onnx -o model.w4.onnx --calib calib.npz --granularity block --format matmulnbits
  onnxcomq quantize model.onnx -o model.w8a8.onnx --calib calib.npz --bits 8 --act-bits 8 --target tensorrt
  onnxcomq quantize model.onnx -o model.w4.onnx --calib calib.npz --recipe recipe.yaml

calibration data: an .npz whose keys are the model's input names, arrays stacked along the batch axis (NVIDIA
ModelOpt's convention), or a folder of .npz/.npy files, or a .txt of text (one sample a line) with --tokenizer for
a decoder language model, or 'random' for a smoke test (accuracy meaningless).

settings: a preset, then a recipe file (every setting: 'onnxcomq recipe --dump' prints them all), then the options
given here, each overriding the one before.
"""


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one line (``onnxcomq: error: ...``), exit status 2, like every other error."""

    def error(self, message):
        if message.startswith("unrecognized arguments:"):
            from .config import moved_option

            moved = [f"{opt} is now {where}" for opt in message.split(":", 1)[1].split()
                     if opt.startswith("--") and (where := moved_option(opt))]
            if moved:
                message += (" (" + "; ".join(moved) + ": write it in a recipe file for --recipe; 'onnxcomq recipe "
                            "--dump' shows every field)")
        self.exit(2, f"onnxcomq: error: {message} (see '{self.prog} --help')\n")


def _settings(q) -> None:
    """The options that set the recipe (quantize and recipe --dump); None: as the preset / recipe file say."""
    q.add_argument("--preset", choices=["default", "fast", "best", "official"], default=None,
                   metavar="{default,fast,official}",
                   help="starting settings: default (sequential capture in 16 stages: each stage fits the input of "
                        "the model whose earlier stages are quantized); fast (one float capture pass and one COMQ "
                        "solve per layer, ~0.4x the time); official (the COMQ paper's code: greedy order, one "
                        "sweep, asymmetric per-channel min-max grid) (default: default)")
    q.add_argument("--recipe", metavar="FILE", help="a recipe file (.yaml or .json) with any of the settings")
    g = q.add_argument_group("weights")
    g.add_argument("--bits", type=int, default=None, help="weight bits, 2..8 (default: 4; <= 4 bits are stored as "
                                                          "int4/uint4, opset 21)")
    g.add_argument("--granularity", choices=["channel", "tensor", "block"], default=None,
                   help="one scale per output channel, per layer, or per output channel and block of "
                        "--block-size input channels (layers that cannot take blocks fall back to channel, with "
                        "the reason in the table) (default: channel)")
    g.add_argument("--block-size", type=int, default=None,
                   help="input channels per scale with --granularity block; MatMulNBits needs a power of two "
                        ">= 16 (default: 32)")
    g.add_argument("--scheme", choices=["asym", "sym"], default=None,
                   help="asym: min-max grid with zero point; sym: zero point 0 (default: asym; sym with "
                        "--act-bits or --target tensorrt)")
    g.add_argument("--format", dest="weight_format", choices=["qdq", "matmulnbits"], default=None,
                   help="qdq: DequantizeLinear weights; matmulnbits: MatMul and Gemm weights as onnxruntime's "
                        "com.microsoft MatMulNBits (needs --granularity block and 2/4/8 bits), other layers "
                        "DequantizeLinear (default: qdq)")
    g.add_argument("--exclude", action="append", default=None, metavar="PATTERN",
                   help="leave float the nodes whose name or op type matches this fnmatch pattern (repeatable)")
    g.add_argument("--lm-head", choices=["float", "int8", "quantize"], default=None,
                   help="a language model's output projection (as wide as its token embedding): left float, at 8 "
                        "bits, or quantized like the other layers (default: float; embeddings are not quantized, "
                        "but one tied to the lm_head reads its quantized weight)")
    act = q.add_argument_group("activations and deployment")
    act.add_argument("--act-bits", type=int, choices=[8], default=None,
                     help="quantize activations too (Q/DQ pairs placed for --target) (default: weight-only)")
    act.add_argument("--target", choices=["ort", "tensorrt"], default=None,
                     help="ort: uint8 asymmetric activations, Q/DQ where onnxruntime fuses them (QLinearConv, "
                          "QLinearMatMul, QGemm); tensorrt: int8 symmetric activations and weights, Q/DQ on the "
                          "inputs of weighted ops; weight-only tensorrt takes 2..4 bits only with --granularity "
                          "block (default: ort)")
    act.add_argument("--device", choices=["auto", "cpu", "gpu"], default=None,
                     help="where the solver runs: gpu uses CuPy (default: auto)")
    act.add_argument("--workers", default=None, metavar="local:N|ray://HOST:PORT",
                     help="fan the layer solves out: local:N processes, or ray://HOST:PORT (pip install "
                          "onnxcomq[ray])")
    c = q.add_argument_group("calibration")
    c.add_argument("--max-samples", type=int, default=None, help="use at most this many calibration samples")
    c.add_argument("--batch-size", type=int, default=None,
                   help="largest calibration batch; lowered to fit --max-memory, and a model with a fixed batch "
                        "dimension uses its own (default: 32)")
    c.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="memory budget, e.g. 4G or 512M: the calibration batch is chosen so that capture fits it "
                        "(default: a quarter of the RAM)")


def _parser() -> argparse.ArgumentParser:
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
                   help="calibration data: .npz (keys = input names), a folder of .npz/.npy, a .txt with "
                        "--tokenizer, or 'random'")
    q.add_argument("--tokenizer", metavar="DIR",
                   help="tokenizer.json (or its folder) for --calib TEXT.txt: each line a calibration sample, "
                        "tokenized; decoder caches start empty")
    _settings(q)
    o = q.add_argument_group("output")
    o.add_argument("--report", metavar="REPORT.json",
                   help="also write the report as JSON (per-layer errors, the check against float, the effective "
                        "recipe) and, with matplotlib installed, a plot of it as REPORT.png")
    o.add_argument("--write-unverified", action="store_true",
                   help="before writing, the quantized model runs beside the float one on calibration samples and "
                        "every output must be finite and close to float; with this flag a model that fails the "
                        "check is written anyway, with a warning (for debugging)")
    o.add_argument("-q", "--quiet", action="store_true", help="no progress and no table")
    o.add_argument("--debug", **debug, default=argparse.SUPPRESS)

    r = sub.add_parser("recipe", help="print the effective recipe or the recipe file's schema",
                       description="Print the settings that 'onnxcomq quantize' would use with these options "
                                   "(a recipe file to start from), or the JSON schema of a recipe file.")
    r.add_argument("--dump", action="store_true", help="print the effective recipe (the default action)")
    r.add_argument("--schema", action="store_true", help="print the JSON schema of a recipe file")
    r.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    _settings(r)
    r.add_argument("--debug", **debug, default=argparse.SUPPRESS)

    e = sub.add_parser("eval", help="top-1 accuracy of a classifier on a labelled .npz",
                       description="Run MODEL on the inputs of DATA (.npz with the model's input names and a "
                                   "'labels' array) and print the top-1 accuracy.")
    e.add_argument("model", help="ONNX model (float or quantized)")
    e.add_argument("--data", required=True, help=".npz with input arrays and 'labels'")
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--debug", **debug, default=argparse.SUPPRESS)
    return p


def recipe_from_args(a):
    """The recipe of the command line: the preset, then the recipe file, then the options given."""
    from .config import Recipe

    recipe = Recipe.preset(a.preset or "default")
    if a.recipe:
        recipe = recipe.updated(Recipe.read(a.recipe), source=a.recipe)
    d: dict = {}

    def put(section, name, value):
        if value is not None:
            d.setdefault(section, {})[name] = value

    put("weights", "bits", a.bits)
    put("weights", "granularity", a.granularity)
    put("weights", "block_size", a.block_size)
    put("weights", "scheme", a.scheme)
    put("weights", "format", a.weight_format)
    if a.exclude:
        put("layers", "exclude", tuple(recipe.layers.exclude) + tuple(a.exclude))
    put("layers", "lm_head", a.lm_head)
    put("activations", "bits", a.act_bits)
    put("solver", "device", a.device)
    put("solver", "workers", a.workers)
    put("data", "max_samples", a.max_samples)
    put("data", "batch_size", a.batch_size)
    put("data", "max_memory", a.max_memory)
    if a.target is not None:
        d["target"] = a.target
    return recipe.updated(d, source="the options").validate()


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
        from .report import png_path
        outputs += [(report, "--report path"), (png_path(report), "the report's plot")]
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








def cmd_quantize(a) -> int:
    from . import progress
    from .graph.modelio import save_model
    from .pipeline import run
    from .report import png_path, summary, write_png
    from .verify import VerificationError

    _check_outputs(a.model, a.output, a.report, a.calib)
    recipe = recipe_from_args(a)
    if recipe.solver.device == "gpu":  # fail now, not after loading the model and the calibration data
        from .solve.backend import get_xp
        get_xp("gpu")
    calib = a.calib
    if a.calib.endswith(".txt") or a.tokenizer is not None:
        if a.tokenizer is None or not a.calib.endswith(".txt"):
            raise UserError("--calib TEXT.txt needs --tokenizer DIR (tokenizer.json or its folder), and --tokenizer "
                            f"needs a .txt for --calib (got --calib {a.calib})")
        from .capture.text import TextCalibration
        calib = TextCalibration(a.calib, a.tokenizer, model=a.model)
    # no warnings between the run's lines from onnxruntime sessions onnxcomq does not open (graphsurgeon's folding)
    if not getattr(a, "debug", False):
        import onnxruntime

        onnxruntime.set_default_logger_severity(3)
    try:
        model, report = run(a.model, calib, recipe, progress=progress.enabled_for(a.quiet))
    except VerificationError as e:
        if e.model is None:
            raise
        if not a.write_unverified:
            raise UserError(f"{e.problem}; nothing written (--write-unverified writes it anyway){e.hint}") from None
        print(f"onnxcomq: warning: {e} (written anyway: --write-unverified)", file=sys.stderr)
        model, report = e.model, e.report
    # the model and the report are written together, all or nothing (modelio.AtomicFiles)
    save_model(model, a.output, also={a.report: _report_json(report)} if a.report else None)
    if a.report:
        try:
            write_png(report, png_path(a.report))
        except ImportError as e:
            print(f"onnxcomq: warning: no plot written: {e}", file=sys.stderr)
    if not a.quiet:
        print("\n".join(summary(report, a.model, a.output)))
    return 0


def cmd_recipe(a) -> int:
    from .config import Recipe

    if a.schema:
        print(json.dumps(Recipe.schema(), indent=2))
        return 0
    print(recipe_from_args(a).dumps("json" if a.json else "yaml"), end="")
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
        return {"quantize": cmd_quantize, "recipe": cmd_recipe, "eval": cmd_eval}[a.command](a)
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
