"""Activation Q/DQ placement per runtime target, and its insertion into a model.

``place`` decides, before calibration, which activation tensors get a QuantizeLinear -> DequantizeLinear pair and which
tensors share quantization parameters; ``insert`` writes the pairs once the ranges are known.

target "ort" (onnxruntime CPU; uint8 asymmetric activations): Q/DQ on the inputs and outputs of the quantized
layers (Conv/ConvTranspose/Gemm/MatMul with quantized weights) and of MatMuls between two activations, on both inputs
and the output of residual Adds (two activations of one shape), and through the ops onnxruntime runs on uint8
(data movement sharing the input's scale: Reshape, Transpose, Flatten, Squeeze, Unsqueeze, MaxPool, Gather, Slice,
Split, Resize, Pad; with their own output scale: GlobalAveragePool, AveragePool, Concat). A Relu (or a Clip at 0,
Relu6) right after a quantized op is folded into the uint8 saturation of that op's output (zero point 0), as
onnxruntime's QDQ optimizer expects. onnxruntime then fuses the node units into QLinearConv / QLinearMatMul /
QLinearAdd / QGemm. Graph outputs stay float (QGemm and MatMulIntegerToFloat give float outputs).

target "tensorrt" (NVIDIA's explicit-quantization rules: symmetric int8 per-tensor activations, zero point 0):
Q/DQ on the activation inputs of the weighted ops and of MatMuls between two activations, and on both inputs of
residual Adds (so that TensorRT fuses the Add into the preceding conv); no Q/DQ on outputs (TensorRT propagates
the scales through pooling and data movement itself), no node removed.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..capture.observers import ActFormat, half_up, make_observer, qparams
from ..errors import UserError
from ..graph.layers import node_names, subgraph_names, unique_name
from ..graph.modelio import drop_weight
from .qdq import opset_of, upgrade_opset

log = logging.getLogger(__name__)
COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
SAME_SCALE_OPS = ("Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "MaxPool", "Gather", "Slice", "Split",
                  "Resize", "Pad", "Identity")
OWN_SCALE_OPS = ("GlobalAveragePool", "AveragePool", "Concat")


def act_format(target: str, bits: int = 8, symmetric: bool | None = None, signed: bool | None = None) -> ActFormat:
    """The activation format of a target: ort uint8 asymmetric, tensorrt int8 symmetric (zero point 0)."""
    if target == "tensorrt":
        return ActFormat(bits, True if signed is None else signed, True if symmetric is None else symmetric)
    return ActFormat(bits, False if signed is None else signed, False if symmetric is None else symmetric)


@dataclass
class Placement:
    target: str
    # quantized tensor -> the tensor whose observed range gives its parameters (data movement shares its input's)
    tensors: dict = field(default_factory=dict)
    # quantized tensor -> names of the nodes that read its DequantizeLinear output (None: every consumer)
    readers: dict = field(default_factory=dict)
    folded: dict = field(default_factory=dict)  # Relu/Clip node name -> (its input, its output): removed by insert
    nodes: list = field(default_factory=list)  # names of the nodes whose activations are quantized
    float_nodes: set = field(default_factory=set)  # excluded nodes: they read the float tensors
    # float16 tensors (a float16 model): their Q/DQ pairs take float16 scales (QuantizeLinear-19), so that the
    # DequantizeLinear output keeps the tensor's type
    float16: set = field(default_factory=set)

    @property
    def observed(self) -> list:
        return sorted(set(self.tensors.values()))


def _matches(patterns, *names) -> bool:
    return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in names if n)


def _tensor_info(model: onnx.ModelProto) -> tuple[set, dict, set]:
    """(float32 and float16 tensors, {tensor: shape}, the float16 ones) from shape inference (best effort: a model
    it fails on, e.g. one over 2 GB, gets no activation quantization)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:
        inferred = model
    typed = {vi.name for vi in inferred.graph.value_info if vi.type.tensor_type.elem_type}
    if any(n.domain == "com.microsoft" and any(o and o not in typed for o in n.output) for n in model.graph.node):
        # onnx knows no type of onnxruntime's contrib ops' outputs (Attention, SkipLayerNormalization...),
        # nor of anything computed from them: onnxruntime's own shape inference does
        try:
            from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
            inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True, guess_output_rank=True)
        except Exception:
            pass
    floats, shapes, halves = set(), {}, set()
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        t = vi.type.tensor_type
        if t.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            floats.add(vi.name)
        if t.elem_type == onnx.TensorProto.FLOAT16:
            halves.add(vi.name)
        if t.HasField("shape"):
            shapes[vi.name] = tuple(d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value") else None)
                                    for d in t.shape.dim)
    return floats, shapes, halves


def place(model: onnx.ModelProto, quantized_nodes: set, target: str = "ort", exclude=(), fold_relu: bool = True) \
        -> Placement:
    """Where the Q/DQ pairs go. ``quantized_nodes``: names (as ``graph.node_names`` gives them) of the layers whose
    weights are quantized; MatMuls between two activations are added. ``exclude``: fnmatch patterns over node
    names, op types and tensor names that stay float. ``fold_relu`` (ort, asymmetric activations only: the range
    [0, max] then has its zero point at the lowest level, so saturation is the Relu)."""
    g = model.graph
    names = node_names(model)
    inits = {t.name: t for t in g.initializer}
    consts = set(inits) | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    floats, shapes, halves = _tensor_info(model)
    floats -= consts
    graph_outputs = {o.name for o in g.output}
    # a Relu whose input or output a subgraph reads (implicitly, by name) is not folded: with it gone, the name
    # holds the pre-activation (silero-vad's LSTM, inside an If, read a conv output's negatives: cosine 0.47)
    nested = subgraph_names(g)
    consumers: dict = {}
    producer: dict = {}
    for name, n in zip(names, g.node):
        for i in n.input:
            consumers.setdefault(i, []).append((name, n))
        for o in n.output:
            producer[o] = (name, n)

    p = Placement(target)

    def ok(t):
        return t and t in floats and t not in consts and not _matches(exclude, t)

    def add(t, key=None, reader=None):
        if not ok(t):
            return False
        if key is not None:
            p.tensors[t] = key
        p.tensors.setdefault(t, t)
        if reader is not None and target == "tensorrt":
            p.readers.setdefault(t, set()).add(reader)
        return True

    def is_residual(n):
        a, b = n.input[0], n.input[1]
        if not (ok(a) and ok(b)):
            return False
        sa, sb = shapes.get(a), shapes.get(b)
        return sa is not None and sa == sb and None not in sa

    def quantize_output(out, op_type):
        """ort: the output of a quantized node, through a Relu that only it feeds (folded into the saturation).
        Graph outputs stay float except a Conv's (no float-output QLinearConv: the graph output is the DQ's)."""
        if out in graph_outputs:
            if op_type in ("Conv", "ConvTranspose"):
                add(out)
            return
        fold = _foldable(out, consumers, graph_outputs | nested, exclude, inits) if fold_relu else None
        if fold is not None:
            rname, relu = fold
            p.folded[rname] = (out, relu.output[0])
            out = relu.output[0]
        if out not in graph_outputs:
            add(out)

    p.float_nodes = {name for name, n in zip(names, g.node) if _matches(exclude, name, n.op_type)}
    for name, n in zip(names, g.node):
        if name in p.float_nodes:
            continue
        if n.op_type in COMPUTE_OPS:
            act_act = n.op_type == "MatMul" and len(n.input) == 2 and ok(n.input[0]) and ok(n.input[1])
            if name not in quantized_nodes and not act_act:
                continue
            ins = [n.input[0], n.input[1]] if act_act else [n.input[0]]
            if all(add(t, reader=name) for t in ins):
                p.nodes.append(name)
            if target == "ort":
                quantize_output(n.output[0], n.op_type)
        elif n.op_type == "Add" and len(n.input) == 2 and is_residual(n):
            if add(n.input[0], reader=name) and add(n.input[1], reader=name):
                p.nodes.append(name)
            if target == "ort":
                quantize_output(n.output[0], n.op_type)
    for name, n in zip(names, g.node):  # then forward through what onnxruntime runs on uint8
        if _matches(exclude, name, n.op_type):
            continue
        if target == "ort" and n.op_type in SAME_SCALE_OPS + OWN_SCALE_OPS:
            data = [t for t in n.input[:1 if n.op_type != "Concat" else len(n.input)]]
            if not data or not all(t in p.tensors for t in data):
                continue
            for o in n.output:
                if o in graph_outputs:
                    continue
                if n.op_type in SAME_SCALE_OPS:
                    add(o, key=p.tensors[data[0]])
                else:
                    add(o)
            p.nodes.append(name)
    # a folded Relu's input is written under the Relu's output name: it is never a tensor of its own
    for a, _ in p.folded.values():
        p.tensors.pop(a, None)
    p.float16 = {t for t in p.tensors if t in halves}
    return p


def _foldable(t, consumers, graph_outputs, exclude, inits):
    """(name, node) of the Relu, or Clip with min 0 (Relu6: the observed max of its output is <= its max, so the
    saturation at the top of the range clips too), that is the only reader of ``t``, else None."""
    cs = consumers.get(t, [])
    if len(cs) != 1 or t in graph_outputs:
        return None
    name, n = cs[0]
    if _matches(exclude, name, n.op_type) or n.output[0] in graph_outputs:
        return None
    # a reader kept float (--act-exclude) reads the tensor itself, not its DequantizeLinear: without the Relu it
    # would get the pre-activation values (measured: relative output error 1.1 on a 3-layer MLP)
    if any(_matches(exclude, cname, c.op_type) for cname, c in consumers.get(n.output[0], [])):
        return None
    if n.op_type == "Relu":
        return name, n
    if n.op_type == "Clip":
        at = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        lo = at.get("min") if len(n.input) < 2 or not n.input[1] else (
            float(numpy_helper.to_array(inits[n.input[1]])) if n.input[1] in inits else None)
        if lo == 0.0:
            return name, n
    return None


def insert(model: onnx.ModelProto, p: Placement, params: dict, max_opset: int | None = None) \
        -> tuple[onnx.ModelProto, dict]:
    """A copy of ``model`` with a QuantizeLinear -> DequantizeLinear pair on every planned tensor.

    ``params``: observed tensor -> (scale, zero point, numpy dtype). Returns (model, {tensor: DequantizeLinear output}).
    Float16 tensors get float16 scales: QuantizeLinear takes float16 from opset 19, to which the model is raised
    (a UserError if ``max_opset`` is lower)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if p.float16 and opset_of(out) < 19:
        out = upgrade_opset(out, 19, "QuantizeLinear of float16 activations", max_opset)
    g = out.graph
    taken = {t.name for t in g.initializer} | {o for n in g.node for o in n.output} | {i.name for i in g.input} \
        | {n.name for n in g.node}
    names = node_names(out)
    # fold Relus: the producer writes the Relu's output
    folded = {name: (a, r) for name, (a, r) in p.folded.items() if r in p.tensors}  # (kept float: Relu stays)
    rename = {a: r for a, r in folded.values()}
    outputs = {o.name for o in g.output}
    pre = {t: unique_name(f"{t}_float", taken) for t in p.tensors if t in outputs}  # the producer writes these
    keep = []
    for name, n in zip(names, g.node):
        if name in folded:
            continue
        for k, o in enumerate(n.output):
            if o in rename:
                n.output[k] = rename[o]
            if n.output[k] in pre:
                n.output[k] = pre[n.output[k]]
        keep.append((name, n))
    inits = {}
    qdq_out = {}
    new_nodes: dict = {}  # tensor -> [Q, DQ]
    for t, key in sorted(p.tensors.items()):
        scale, zp, dt = params[key]
        half = t in p.float16
        if (key, half) not in inits:
            sname = unique_name(f"{key}_act_scale" + ("_fp16" if half and (key, False) in inits else ""), taken)
            zname = unique_name(f"{key}_act_zero_point", taken)
            g.initializer.append(numpy_helper.from_array(np.asarray(scale, np.float16 if half else np.float32),
                                                         sname))
            g.initializer.append(numpy_helper.from_array(np.asarray(zp, dt), zname))
            inits[key, half] = (sname, zname)
        sname, zname = inits[key, half]
        q = unique_name(f"{t}_QuantizeLinear_Output", taken)
        dq = t if t in pre else unique_name(f"{t}_DequantizeLinear_Output", taken)
        new_nodes[pre.get(t, t)] = [helper.make_node("QuantizeLinear", [pre.get(t, t), sname, zname], [q],
                                         name=unique_name(f"{t}_QuantizeLinear", taken)),
                        helper.make_node("DequantizeLinear", [q, sname, zname], [dq],
                                         name=unique_name(f"{t}_DequantizeLinear", taken))]
        qdq_out[t] = dq
    for name, n in keep:
        for k, i in enumerate(n.input):
            if i in qdq_out and name not in p.float_nodes and (p.readers.get(i) is None or name in p.readers[i]):
                n.input[k] = qdq_out[i]
    # topological order: each pair right after its tensor's producer (graph inputs: at the start)
    produced_by = {o: idx for idx, (_, n) in enumerate(keep) for o in n.output}
    head, after = [], {}
    for t, pair in new_nodes.items():
        if t in produced_by:
            after.setdefault(produced_by[t], []).extend(pair)
        else:
            head.extend(pair)
    ordered = list(head)
    for idx, (_, n) in enumerate(keep):
        ordered.append(n)
        ordered.extend(after.get(idx, []))
    del g.node[:]
    g.node.extend(ordered)
    used = {i for n in g.node for i in n.input}
    for t in [t for t in g.initializer if t.name not in used and any(
            t.name in n.input for name, n in zip(names, model.graph.node) if name in folded)]:
        g.initializer.remove(t)  # a folded Clip's bounds
    if p.target == "ort":
        _int32_biases(g, p, params, taken)
    if p.float16:  # (the ort target's int32 biases are DequantizeLinear outputs already)
        _bias_adds(g, taken)
    return out, qdq_out


def _bias_adds(g, taken: set, only: set | None = None) -> None:
    """Float16 Conv/Gemm biases next to DequantizeLinear input and weight become an Add after the node (exact;
    TensorRT fuses it back into the kernel). onnxruntime's BiasQuantization would otherwise quantize such a bias
    itself, dividing it by scale_a * scale_w in float16, which overflows (measured: a relative output error of 0.32
    on a small float16 CNN under ORT_ENABLE_ALL, 0 without optimizations). ``only``: the nodes (by first output)
    whose bias moves instead, of any float type (float32 biases too large for int32 codes: ``_int32_biases``)."""
    inits = {t.name: t for t in g.initializer}
    dq_out = {n.output[0] for n in g.node if n.op_type == "DequantizeLinear"}
    rank = {n.output[0]: len(inits[n.input[0]].dims) for n in g.node
            if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    ordered, changed = [], []
    for n in g.node:
        ordered.append(n)
        if n.op_type not in ("Conv", "Gemm") or len(n.input) < 3 or n.input[2] not in inits:
            continue
        b = inits[n.input[2]]
        wanted = b.data_type == onnx.TensorProto.FLOAT16 if only is None else n.output[0] in only
        if not wanted or len(b.dims) != 1 or not (
                n.input[0] in dq_out and n.input[1] in dq_out):
            continue
        if n.op_type == "Conv" and n.input[1] not in rank:
            continue
        beta = {x.name: helper.get_attribute_value(x) for x in n.attribute}.get("beta", 1.0) \
            if n.op_type == "Gemm" else 1.0
        shape = (int(b.dims[0]),) + (1,) * (rank[n.input[1]] - 2 if n.op_type == "Conv" else 0)
        bname = unique_name(f"{n.input[2]}_add", taken)
        value = numpy_helper.to_array(b).reshape(shape)
        if beta != 1.0:  # Gemm's C is scaled by beta: the Add takes beta * C
            value = (value.astype(np.float32) * np.float32(beta)).astype(value.dtype)
        g.initializer.append(numpy_helper.from_array(value, bname))
        pre = unique_name(f"{n.output[0]}_before_bias", taken)
        ordered.append(helper.make_node("Add", [pre, bname], [n.output[0]],
                                        name=unique_name(f"{n.name or n.output[0]}_bias_add", taken)))
        changed.append(n.input[2])
        n.output[0] = pre
        del n.input[2]
    if changed:
        del g.node[:]
        g.node.extend(ordered)
        used = {i for n in g.node for i in n.input}
        for name in set(changed) - used:
            g.initializer.remove(inits[name])


def _int32_biases(g, p: Placement, params: dict, taken: set) -> None:
    """onnxruntime fuses DQ -> Gemm into QGemm only when the bias is DequantizeLinear(int32, scale_a * scale_w)
    (QLinearConv takes an int32 bias too): rewrite float Gemm and Conv biases that way (the int32 rounding error
    is at most half a step of scale_a * scale_w, far below the output's quantization step). A float32 bias whose
    codes would not fit (|bias| / (scale_a * scale_w) >= 2^30: a layer whose input range is tiny against its bias;
    the int32 accumulator adds the products to it) becomes an Add after the node instead, exact, without the
    fused kernel (clipped codes, or onnxruntime's own bias quantization, would change the output)."""
    inits = {t.name: t for t in g.initializer}
    dq_of = {n.output[0]: n for n in g.node if n.op_type == "DequantizeLinear"}
    new, replaced, too_large = [], [], set()
    for n in g.node:
        if n.op_type not in ("Gemm", "Conv") or len(n.input) < 3 or n.input[2] not in inits:
            continue
        a, w = dq_of.get(n.input[0]), dq_of.get(n.input[1])
        if a is None or w is None or w.input[1] not in inits or a.input[1] not in inits:
            continue
        at = {x.name: helper.get_attribute_value(x) for x in n.attribute}
        if at.get("transA", 0) or at.get("alpha", 1.0) != 1.0 or at.get("beta", 1.0) != 1.0:
            continue
        half = inits[n.input[2]].data_type == onnx.TensorProto.FLOAT16
        if inits[n.input[2]].data_type != onnx.TensorProto.FLOAT and not half:
            continue
        sw = numpy_helper.to_array(inits[w.input[1]]).astype(np.float64)
        sa = float(numpy_helper.to_array(inits[a.input[1]]))
        bias = numpy_helper.to_array(inits[n.input[2]]).astype(np.float64)
        if bias.ndim != 1 or (sw.ndim and sw.shape[0] != bias.shape[0]):
            continue
        if half:
            # float16: onnxruntime's CPU has no QLinearConv/QGemm for float16 (the node stays a float Conv/Gemm
            # between Casts), but its own bias quantization (a float bias next to DQ input and weight) divides the
            # bias by scale_a * scale_w in float16 and overflows (measured: outputs off by 2 on the reference CNN).
            # So the bias is written here as int32 codes with a float16 scale: scale_a * scale_w rounded up to
            # float16, widened where the codes would not fit in 2^30 (no fused kernel needs it to be exact)
            scale = half_up(np.maximum(sa * sw * np.ones_like(bias), np.abs(bias) / 2.0 ** 30)).astype(np.float16)
        else:
            scale = (sa * sw * np.ones_like(bias)).astype(np.float32)
            if not np.all(np.abs(bias) < 2.0 ** 30 * scale.astype(np.float64)):
                too_large.add(n.output[0])
                continue
        codes = np.clip(np.rint(bias / scale.astype(np.float64)), -2 ** 31, 2 ** 31 - 1).astype(np.int32)
        qn, sn = unique_name(f"{n.input[2]}_int32", taken), unique_name(f"{n.input[2]}_int32_scale", taken)
        zn = unique_name(f"{n.input[2]}_int32_zero_point", taken)
        out = unique_name(f"{n.input[2]}_DequantizeLinear_Output", taken)
        g.initializer.extend([numpy_helper.from_array(codes, qn), numpy_helper.from_array(scale, sn),
                              numpy_helper.from_array(np.zeros_like(codes), zn)])
        replaced.append(n.input[2])
        new.append(helper.make_node("DequantizeLinear", [qn, sn, zn], [out], axis=0,
                                    name=unique_name(f"{n.input[2]}_DequantizeLinear", taken)))
        n.input[2] = out
    if new:
        used = {i for n in g.node for i in n.input}
        for b in sorted(set(replaced) - used):  # (a bias shared by several nodes is replaced once for each)
            drop_weight(g, inits[b])  # (and its graph input listing, as IR < 4 writes one)
        nodes = new + list(g.node)
        del g.node[:]
        g.node.extend(nodes)
    if too_large:
        _bias_adds(g, taken, too_large)


def act_params(p: Placement, ranges: dict, fmt: ActFormat) -> dict:
    """observed tensor -> (scale, zero point, dtype) from its (lo, hi) range; the scale of a tensor that a float16
    tensor shares is a float16 number (exact in both types)."""
    out = {}
    halves = {p.tensors[t] for t in p.float16 if t in p.tensors}
    for key in p.observed:
        scale, zp = qparams(*ranges[key], fmt, float16=key in halves)
        out[key] = (scale, zp, fmt.dtype)
    return out


# ops whose output magnifies the error of some inputs (small values into Log, a divisor, an exponent...): an activation
# quantized upstream of them is judged by the error at their output, not by its own noise; input positions judged
SENSITIVE_OPS = {"Log": (0,), "Div": (1,), "Pow": (0,), "Sqrt": (0,), "Reciprocal": (0,), "Exp": (0,)}
_LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def sensitive_cones(model: onnx.ModelProto, tensors, depth: int = 8) -> dict:
    """{output of a sensitive op: [(distance, tensor)] of the tensors among ``tensors`` upstream of its judged input,
    nearest first}, walking up at most ``depth`` nodes (through weighted layers along their data input only)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    consts = {t.name for t in model.graph.initializer}
    cones = {}
    for node in model.graph.node:
        if node.op_type not in SENSITIVE_OPS:
            continue
        frontier = [(node.input[i], 0) for i in SENSITIVE_OPS[node.op_type] if i < len(node.input) and node.input[i]]
        dist = {}
        while frontier:  # breadth first: the first visit of a tensor is its distance
            t, d = frontier.pop(0)
            if t in dist or t in consts or d > depth:
                continue
            dist[t] = d
            p = producers.get(t)
            if p is not None:
                ins = p.input[:1] if p.op_type in _LAYER_OPS else p.input
                frontier += [(i, d + 1) for i in ins if i]
        cone = sorted((d, t) for t, d in dist.items() if t in tensors)
        if cone:
            cones[node.output[0]] = cone
    return cones


def _rel_sq(ref: list, got: list) -> float:
    """The relative squared error of ``got`` against ``ref`` (where ``ref`` is finite; inf where ``got`` is not)."""
    f = np.concatenate([np.asarray(a, np.float64).ravel() for a in ref])
    q = np.concatenate([np.asarray(a, np.float64).ravel() for a in got])
    finite = np.isfinite(f)
    if not np.isfinite(q[finite]).all():
        return float("inf")
    with np.errstate(all="ignore"):
        return float(np.sum((q[finite] - f[finite]) ** 2) / max(float(np.sum(f[finite] ** 2)), 1e-30))


def _close(limit: float, ref: list, got: list) -> bool:
    """Whether ``got`` is within relative squared error ``limit`` of ``ref`` (where ``ref`` is finite)."""
    return _rel_sq(ref, got) <= limit


CULPRIT_SECONDS = 120.0  # how long a failed check may probe its activations one by one (ActivationQuantizer.culprits)


class NoActivations(UserError):
    """No activation tensor of the model can be quantized."""


class ActivationQuantizer:
    """Activation quantization of one run: the placement, the observers fed by the capture pass, the Q/DQ insertion."""

    def __init__(self, model: onnx.ModelProto, layers, acts, target: str = "ort", max_opset: int | None = None):
        """``acts``: the recipe's activations section (config.Activations)."""
        self.acts, self.target, self.max_opset = acts, target, max_opset
        if any(not n.name for n in model.graph.node):  # name every node as the reports do: the placement refers to them
            named = onnx.ModelProto()
            named.CopyFrom(model)
            for n, name in zip(named.graph.node, node_names(named)):
                n.name = name
            model = named
        self.model = model
        self.fmt = act_format(self.target, acts.bits,
                              None if acts.scheme is None else acts.scheme == "sym",
                              None if acts.dtype is None else acts.dtype == "int8")
        quantized = {c for layer in layers for c, _ in layer.consumers}
        self.placement = place(model, quantized, self.target, tuple(acts.exclude), fold_relu=not self.fmt.symmetric)
        if not self.placement.tensors:
            raise NoActivations("activation quantization: no activation tensor to quantize (every candidate is "
                                "excluded, constant or not float)")
        self.observers = {t: make_observer(acts.method, acts.percentile) for t in self.placement.observed}
        self._params = None
        self.float_tensors = []
        self.sensitive_float = []  # kept float for their error through a sensitive op (judge_sensitive)

    @property
    def params(self) -> dict:
        """Quantization parameters from the observed ranges; on first use, tensors whose quantization noise
        (E[(x - fq(x))^2] / E[x^2] on the calibration histogram) exceeds max_noise are dropped from the placement:
        they stay float (e.g. outlier-heavy transformer residual streams, where 8 bits cannot hold both the
        outliers and the bulk)."""
        if self._params is None:
            noise = {t: o.noise(self.fmt) for t, o in self.observers.items()}
            self.float_tensors = sorted(t for t, key in self.placement.tensors.items()
                                        if noise[key] > self.acts.max_noise)
            if self.float_tensors:
                log.info("activations kept float (quantization noise > %g): %s", self.acts.max_noise,
                         ", ".join(self.float_tensors))
            self.placement = dataclasses.replace(self.placement, tensors={
                t: key for t, key in self.placement.tensors.items() if noise[key] <= self.acts.max_noise})
            ranges = {t: o.range(self.fmt) for t, o in self.observers.items()}
            self._params = act_params(self.placement, ranges, self.fmt)
        return self._params

    def judge_sensitive(self, feeds: list, run) -> None:
        """Keep float the activations upstream of a Log, Div (divisor), Pow, Sqrt, Reciprocal or Exp while their
        quantization makes that op's output err by more than max_noise (relative squared error on ``feeds``), the
        nearest first: e.g. the power spectrum and mel energies before an audio front end's Log, where 8 bits erase
        the quiet bins. ``run(model, names, feeds) -> [arrays per feed]`` runs a model (onnxruntime)."""
        cones = sensitive_cones(self.model, set(self.placement.tensors))
        if not cones or not feeds:
            return
        names = sorted(cones)
        ref = run(self.model, names, feeds)
        drop = set()
        while True:
            keep = {t: key for t, key in self.placement.tensors.items() if t not in drop}
            if not keep:
                break
            p = dataclasses.replace(self.placement, tensors=keep)
            fq, _ = insert(self.model, p, act_params(p, {t: o.range(self.fmt) for t, o in self.observers.items()},
                                                     self.fmt), self.max_opset)
            got = run(fq, names, feeds)
            more = set()
            for k, name in enumerate(names):
                left = [t for _, t in cones[name] if t not in drop]
                if left and not _close(self.acts.max_noise, [r[k] for r in ref], [g[k] for g in got]):
                    more.add(left[0])  # the nearest of its tensors still quantized
            if not more:
                break
            drop |= more
        if drop:
            self.sensitive_float = sorted(drop)
            log.info("activations kept float (error through Log/Div/Pow/Sqrt/Reciprocal/Exp > %g): %s",
                     self.acts.max_noise, ", ".join(self.sensitive_float))
            self.placement = dataclasses.replace(self.placement, tensors={
                t: key for t, key in self.placement.tensors.items() if t not in drop})
            ranges = {t: o.range(self.fmt) for t, o in self.observers.items()}
            self._params = act_params(self.placement, ranges, self.fmt)

    def culprits(self, feeds: list, run, top: int = 3) -> tuple[list, int, int]:
        """([(tensor, error)] of the ``top`` quantized activations whose quantization alone moves the graph outputs
        most (relative squared error on ``feeds``, the worst output's), activations probed, activations quantized),
        for a model that failed its check: each tensor's Q/DQ pair is inserted on its own into the float model and
        run (``run`` as judge_sensitive's), in graph order, for at most CULPRIT_SECONDS."""
        names = [o.name for o in self.model.graph.output]
        ref = run(self.model, names, feeds)
        params = self.params
        found, start = [], time.perf_counter()
        for t, key in self.placement.tensors.items():
            if found and time.perf_counter() - start > CULPRIT_SECONDS:
                break
            p = dataclasses.replace(self.placement, tensors={t: key})
            got = run(insert(self.model, p, {key: params[key]}, self.max_opset)[0], names, feeds)
            found.append((t, max(_rel_sq([r[k] for r in ref], [g[k] for g in got])
                                 for k in range(len(names)))))
        return sorted(found, key=lambda c: -c[1])[:top], len(found), len(self.placement.tensors)

    def aware_stats(self, specs: dict, calib, capture) -> dict:
        """Layer statistics from a second pass over the float model carrying the activation Q/DQ: each layer's X is
        the fake-quantized input it reads in the deployed model. ``capture(model, specs)`` runs the pass."""
        params = self.params
        fq, dq = insert(self.model, self.placement, params, self.max_opset)
        moved = {spec: dataclasses.replace(spec, tensor=dq.get(spec.tensor, spec.tensor)) for spec in specs}
        stats, _ = capture(fq, {moved[s]: g for s, g in specs.items()})
        return {s: stats[moved[s]] for s in specs}

    def weight_storage(self, qweights: list) -> list:
        """The quantized weights as the target's int8 kernels should read them. onnxruntime's x86 kernels for uint8
        activations and int8 weights (U8S8: QLinearConv, QLinearMatMul, QGemm) multiply with AVX2's VPMADDUBSW,
        which saturates a pair of products at 32767 on CPUs without VNNI (AMD before Zen 4, Intel before Cascade
        Lake): 255 * 127 * 2 does not fit, and outputs were off by 19 % of their range on an AMD EPYC. So with uint8
        activations, 8-bit symmetric weights are stored as uint8 with zero point 128 (U8U8 kernels widen to 16 bits
        first and do not saturate): the same dequantized weights, the same grid. 7 bits and fewer fit
        (255 * 64 * 2 < 32768) and 4-bit weights are not fused; they stay as they are."""
        if self.target != "ort" or self.fmt.signed:
            return qweights
        return [dataclasses.replace(w, codes=(w.codes.astype(np.int16) + 128).astype(np.uint8),
                                    zero_point=(np.asarray(w.zero_point).astype(np.int16) + 128).astype(np.uint8),
                                    signed=False)
                if w.bits == 8 and w.signed and not w.block_size else w for w in qweights]

    def insert(self, model: onnx.ModelProto) -> onnx.ModelProto:
        params = self.params
        return insert(model, self.placement, params, self.max_opset)[0]

    def metadata(self) -> dict:
        self.params  # decides which tensors stay float
        return {"act_bits": self.acts.bits, "target": self.target, "act_method": self.acts.method,
                "act_dtype": "int8" if self.fmt.signed else "uint8",
                "act_scheme": "sym" if self.fmt.symmetric else "asym", "act_tensors": len(self.placement.tensors),
                "act_float_tensors": self.float_tensors, "act_max_noise": self.acts.max_noise,
                "act_aware": bool(self.acts.aware),
                **({"act_float_sensitive": self.sensitive_float} if self.sensitive_float else {})}
