"""Stage 5: verify a quantized model before it is written.

The quantized model is loaded in onnxruntime and run on calibration samples beside the float model; every graph
output must be finite wherever the float model's is and no further from it than the float output is from zero, nor
pointing elsewhere (cosine >= 0.5); else the model is not written. The distance of every output is reported. This
catches what no per-layer error shows: a model onnxruntime cannot load (a weight also listed as a graph input, an IR
version it does not know), a NaN or an overflow anywhere in the graph, a weight whose layout does not match its
input, an int32 bias that does not fit.

A model with quantized activations for onnxruntime is also run node by node (no graph optimization: its Q/DQ
arithmetic as written) and compared with onnxruntime's fused int8 kernels on this machine: where the kernels are much
further from the float model than the graph itself (e.g. int8-weight kernels that saturate on x86 CPUs without
VNNI), a warning says so. A model for TensorRT is judged by its Q/DQ arithmetic alone. An output whose shape depends
on the data (after NMS) may change shape; its distance is reported, not judged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import onnx

from .capture.calib import batch_samples
from .capture.session import run_model
from .errors import UserError
from .graph.layers import subgraph_nodes

# an output further from the float model's than the float output is from zero (||q - f|| > ||f||) fails the check,
# and so does one that points elsewhere (cosine below MIN_COSINE: an output near zero has a relative error just
# under 1)
MAX_REL_ERROR, MIN_COSINE = 1.0, 0.5
# written, with a warning: an output whose cosine to float is below WARN_COSINE (PicoDet's W8A8 boxes at 0.68,
# mediapipe's pose mask at W4 0.81 passed without a word)
WARN_COSINE = 0.9
# quantized activations: a warning where the fused kernels' relative error exceeds FACTOR x the graph's + SLACK
KERNEL_FACTOR, KERNEL_SLACK = 2.0, 0.02


def _under(x: float, limit: float) -> str:
    """``x`` (below ``limit``) with as few significant digits as show it below: 0.89996 is "0.89996", not "0.9"
    (silero-vad's W8A8 warning read "at cosine 0.9 ... (below 0.9)")."""
    for digits in range(3, 10):
        text = f"{x:.{digits}g}"
        if float(text) < limit:
            return text
    return repr(x)


@dataclass
class OutputCheck:
    """How close one graph output of the quantized model is to the float model's, on the verification samples."""

    name: str
    finite: bool  # finite wherever the float output is
    cosine: float | None = None  # float outputs: cosine similarity of the flattened outputs
    rel_error: float | None = None  # float outputs: ||q - f|| / ||f||
    agreement: float | None = None  # integer / boolean outputs: the fraction of equal elements
    float_finite: bool = True  # the float model's own output is finite
    mismatch: str = ""  # the outputs cannot be compared (shapes differ)
    # quantized activations: ||q - f|| / ||f|| with the model run node by node (no fused int8 kernels)
    graph_rel_error: float | None = None
    # an output whose shape depends on the data (boxes after NonMaxSuppression): the check batches where its shape
    # differs from the float model's, left out of the comparison
    varied: int = 0
    # its elements need not correspond position by position (boxes that swap places in the score order): its
    # distance is reported, not judged
    dynamic: bool = False

    def problem(self) -> str | None:
        """Why this output fails the check, or None."""
        if self.mismatch:
            return f"output {self.name}: {self.mismatch}"
        if not self.finite:
            return f"output {self.name} has NaN or Inf values where the float model's is finite"
        if self.rel_error is not None and not self.dynamic and (self.rel_error > MAX_REL_ERROR or
                                                                self.cosine < MIN_COSINE):
            return (f"output {self.name} is far from the float model's (relative error {self.rel_error:.3g}, "
                    f"cosine {_under(self.cosine, MIN_COSINE)}): check the calibration data, or use more bits")
        return None

    def warning(self) -> str | None:
        """Why this output deserves a look (the model is still written), or None."""
        out = []
        if self.cosine is not None and not self.dynamic and self.cosine < WARN_COSINE and not self.problem():
            out.append(f"output {self.name} is at cosine {_under(self.cosine, WARN_COSINE)} to the float model's "
                       f"(below {WARN_COSINE}): check the quantized model on your own data; more bits, more calibration "
                       f"data or weights only may help")
        if self.graph_rel_error is not None and self.rel_error > KERNEL_FACTOR * self.graph_rel_error + KERNEL_SLACK:
            out.append(f"output {self.name}: onnxruntime's fused int8 kernels on this CPU are further from the float "
                       f"model (relative error {self.rel_error:.3g}) than the model's own Q/DQ arithmetic "
                       f"({self.graph_rel_error:.3g}): the model will run less accurately on this CPU than it was "
                       f"quantized (int8-weight kernels saturate on x86 CPUs without VNNI)")
        return "; ".join(out) or None

    def summary(self) -> str:
        varied = f" (shape differs from float on {self.varied} check batch(es): data-dependent)" if self.varied \
            else ""
        if self.agreement is not None:
            return f"{self.name}: {100 * self.agreement:.1f} % equal{varied}"
        if self.cosine is None:
            return f"{self.name}: {'finite' if self.finite else 'NOT FINITE'}{varied}"
        return f"{self.name}: cosine {self.cosine:.4f}, rel. error {self.rel_error:.3g}" + \
            ("" if self.graph_rel_error is None else f" ({self.graph_rel_error:.3g} node by node)") + \
            ("" if self.finite else " (NOT FINITE)") + varied


class VerificationError(UserError):
    """The quantized model failed verification; ``model`` and ``report`` hold what would have been written."""

    def __init__(self, message: str, model=None, report=None, hint: str = ""):
        """``hint``: what may help, appended to ``message`` (``problem``) in the error's text."""
        super().__init__(message + hint)
        self.model, self.report = model, report
        self.problem, self.hint = message, hint


CHUNK = 1 << 20  # elements of an output compared at a time (float64 copies of a whole output of a language model's
# logits, 8 samples x 512 tokens x 32000, were 1 GB each: the peak of a TinyLlama-width run)


def _compare(name: str, fs: list, qs: list) -> OutputCheck:
    """One output, float (``fs``) against quantized (``qs``), batch by batch and chunk by chunk."""
    if not np.issubdtype(fs[0].dtype, np.floating):
        total = sum(a.size for a in fs)
        equal = sum(int(np.count_nonzero(a == b)) for a, b in zip(fs, qs))
        return OutputCheck(name, True, agreement=equal / total if total else 1.0)
    float_finite = finite = True
    nf2 = nq2 = dot = diff2 = 0.0
    for a, b in zip(fs, qs):
        a, b = a.ravel(), b.ravel()
        for s in range(0, a.size, CHUNK):
            f, q = a[s:s + CHUNK], b[s:s + CHUNK]
            ok = np.isfinite(f)
            if not ok.all():
                float_finite = False
                f, q = f[ok], q[ok]
            if not finite:
                continue
            f64, q64 = f.astype(np.float64), q.astype(np.float64)
            if not np.isfinite(q64).all():
                finite = False
                continue
            d = q64 - f64
            nf2, nq2, dot, diff2 = nf2 + f64 @ f64, nq2 + q64 @ q64, dot + f64 @ q64, diff2 + d @ d
    if not finite:
        return OutputCheck(name, False, float_finite=float_finite)
    nf, nq, diff = float(np.sqrt(nf2)), float(np.sqrt(nq2)), float(np.sqrt(diff2))
    rel = diff / nf if nf > 0 else (0.0 if diff == 0 else float("inf"))
    cos = float(dot / (nf * nq)) if nf > 0 and nq > 0 else (1.0 if nf == nq else 0.0)
    return OutputCheck(name, True, cosine=cos, rel_error=rel, float_finite=float_finite)


def as_array(value) -> np.ndarray:
    """One output of an onnxruntime run as an array: a tensor as it is; a sequence of maps (scikit-learn's
    ZipMap: one {class: probability} per sample) as (samples, keys) of its values in key order; a sequence of
    tensors as their flattened values, one after the other."""
    if not isinstance(value, list):
        return np.asarray(value)
    if value and all(isinstance(v, dict) for v in value):
        keys = list(value[0])
        if all(list(v) == keys for v in value):
            return np.array([[v[key] for key in keys] for v in value])
    elif value and all(isinstance(v, np.ndarray) for v in value) and len({v.dtype for v in value}) == 1:
        return np.concatenate([v.ravel() for v in value])
    return np.array(value, dtype=object)


def float_outputs(float_model: onnx.ModelProto, feeds: list) -> list:
    """The float model's graph outputs on ``feeds``, [[array per output] per feed]: what ``verify`` compares
    against. The pipeline takes them before the quantized model exists, so that the float model's session and the
    quantized model are never in memory together."""
    return run_model(float_model, [o.name for o in float_model.graph.output], feeds, "the float model")


def verify(float_model: onnx.ModelProto, qmodel: onnx.ModelProto, feeds: list, ref: list | None = None,
           kernels: bool = True) -> tuple[list, int]:
    """Run both models on ``feeds`` (calibration batches) and compare every graph output; returns
    ([OutputCheck], samples). ``ref``: the float model's outputs on ``feeds`` (``float_outputs``), if taken
    already. A quantized model that onnxruntime cannot load or run is a UserError. ``kernels`` (a model deployed
    on onnxruntime): a model with quantized activations is judged as onnxruntime's fused int8 kernels run it, and
    its Q/DQ arithmetic run node by node is reported beside; without (a TensorRT target), as the Q/DQ arithmetic
    alone: onnxruntime's CPU kernels are not what runs it, and on x86 CPUs without VNNI they saturate."""
    names = [o.name for o in float_model.graph.output]
    ref = ref if ref is not None else float_outputs(float_model, feeds)
    # (weight-only models have DequantizeLinear nodes only: nothing for a fused int8 kernel to read)
    qdq = any(n.op_type == "QuantizeLinear" for n in qmodel.graph.node)
    got = run_model(qmodel, names, feeds, "the quantized model", optimize=kernels or not qdq)
    graph = run_model(qmodel, names, feeds, "the quantized model", optimize=False) if qdq and kernels else None
    checks = []
    dynamic = data_dependent(float_model)  # (the shape may vary)
    unjudged = data_dependent(float_model, REORDER_OPS)  # (the positions may too)
    for k, name in enumerate(names):
        f, q = [as_array(r[k]) for r in ref], [as_array(g[k]) for g in got]
        gr = [as_array(g[k]) for g in graph] if graph is not None else None
        same = [a.shape == b.shape and a.dtype == b.dtype and (gr is None or c.shape == a.shape)
                for a, b, c in zip(f, q, gr or q)]
        if not all(same) and not (name in dynamic and all(a.dtype == b.dtype for a, b in zip(f, q))):
            i = same.index(False)
            checks.append(OutputCheck(name, True, mismatch=f"shape/type {q[i].shape} differs from the float "
                                                             f"model's {f[i].shape}"))
            continue
        keep = [i for i, ok in enumerate(same) if ok]  # (all of them, but where a data-dependent shape differs)
        if not keep:
            checks.append(OutputCheck(name, True, varied=len(same), dynamic=True))
            continue
        f, q = [f[i] for i in keep], [q[i] for i in keep]
        check = _compare(name, f, q)
        check.varied, check.dynamic = len(same) - len(keep), name in unjudged
        if gr is not None and check.rel_error is not None:
            check.graph_rel_error = _compare(name, f, [gr[i] for i in keep]).rel_error
        checks.append(check)
    return checks, sum(batch_samples(feed) for feed in feeds)


# ops whose output shape depends on the values of their inputs (or on a subgraph): an output downstream of one may
# legitimately come out of another shape when the values move a little (a box more or less after NMS)
DATA_SHAPE_OPS = {"NonZero", "NonMaxSuppression", "Unique", "Compress", "TopK", "If", "Loop", "Scan"}
# ... and those that also pick or order elements by their values: downstream of one (or of a control-flow node
# whose subgraphs hold one), elements need not correspond position by position, and the output is not judged.
# Downstream of a plain If (silero-vad's branches on the input's rank) it is: a W8A8 model at cosine 0.47 was
# written without a word.
REORDER_OPS = DATA_SHAPE_OPS - {"If", "Loop", "Scan"}


def data_dependent(model: onnx.ModelProto, ops: set = DATA_SHAPE_OPS) -> set:
    """The graph outputs of ``model`` downstream of a node of ``ops`` (or of a control-flow node holding one, or
    whose subgraphs read such a node's outputs)."""
    reached = set()
    for n in model.graph.node:  # (graph order is topological)
        inner = list(subgraph_nodes(n))
        if n.op_type in ops or any(i in reached for m in [n] + inner for i in m.input if i) or \
                any(m.op_type in ops for m in inner):
            reached.update(o for o in n.output if o)
    return {o.name for o in model.graph.output} & reached


def problems(checks: list) -> list:
    """Why the quantized model must not be written (NaN/Inf outputs, outputs of another shape, outputs far from
    float)."""
    return [p for p in (c.problem() for c in checks) if p]


def warnings(checks: list) -> list:
    return [w for w in (c.warning() for c in checks) if w]


def to_dicts(checks: list) -> list:
    return [asdict(c) for c in checks]


__all__ = ["OutputCheck", "VerificationError", "float_outputs", "verify", "problems", "warnings", "MAX_REL_ERROR",
           "MIN_COSINE", "WARN_COSINE"]
