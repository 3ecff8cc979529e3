"""Stage 1: read the ONNX graph and find the layers COMQ can quantize.

A layer is a Conv, Gemm or MatMul whose weight is a constant tensor (an initializer, a ``Constant`` node, or either
behind ``Identity``: constant folding with onnx-graphsurgeon turns all of these into initializers first). For each one
we record how its input X is formed (``XSpec``: im2col parameters for Conv, row flattening for MatMul/Gemm) and how its
weight maps to the solver's (m, n) matrices (one per conv group).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import UserError

RECURRENT_OPS = ("LSTM", "GRU", "RNN")
SUPPORTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul") + RECURRENT_OPS
RNN_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
# onnxruntime's fused forms of these layers (com.microsoft; in graphs saved by its optimizer and by its transformer
# optimizer): each multiplies input 0 by the weight in input 1 as its standard op does, then applies an activation
# (FusedConv, FusedGemm), scales the product (FusedMatMul's alpha) or splits it into attention heads (Attention's
# packed Q, K, V projection, with its bias in input 2)
CONTRIB_LAYERS = {"FusedConv": "Conv", "FusedGemm": "Gemm", "FusedMatMul": "MatMul", "Attention": "MatMul"}


def base_op(node) -> str:
    """The standard op whose weight product ``node`` computes: its op type, or for one of onnxruntime's fused
    layers (CONTRIB_LAYERS) the op it fuses; an op of another domain is named with its domain (onnxruntime's
    com.microsoft.nchwc Conv holds its weight in a blocked layout: not a Conv to quantize)."""
    if node.domain in ("", "ai.onnx"):
        return node.op_type
    if node.domain == "com.microsoft" and node.op_type in CONTRIB_LAYERS:
        return CONTRIB_LAYERS[node.op_type]
    return f"{node.domain}.{node.op_type}"


@dataclass(frozen=True)
class XSpec:
    """How the solver's input matrix X (rows x fan-in) is built from a captured tensor.

    kind "rows": X = tensor reshaped to (-1, K) (``transpose`` for Gemm transA: X = A^T).
    kind "conv": X = im2col of an (N, C, *spatial) tensor with the conv's kernel/stride/pads/dilations, per group.
    kind "convT": ConvTranspose as the equivalent stride-1 conv: the input is upsampled by ``strides`` (zeros
    between pixels) and padded by ``pads`` (already converted to the equivalent conv's, may be negative = crop).
    kind "rnn_input": the input sequence X of an LSTM/GRU/RNN (``tensor``), rows = its (step, batch) positions,
    the same X for each of the ``group`` = num_directions directions (one group per direction of W).
    kind "rnn_hidden": the hidden state each step of an LSTM/GRU/RNN saw, per direction (``group`` of them), formed
    from its output Y (``tensor``) and ``initial`` (initial_h, "" = zeros): forward h_{t-1} = initial_h then
    Y[:-1, d]; reverse (``reverse[d]``) Y[1:, d] then initial_h at the last step. Both are built by
    ``capture.rnn_rows`` (layout 0 only: [seq, batch, ...]).
    Layers with equal XSpec on the same tensor share one Gram matrix.
    """

    tensor: str
    kind: str
    fan_in: int = 0  # K for rows; C / group * prod(kernel) for conv
    transpose: bool = False
    kernel: tuple = ()
    strides: tuple = ()
    pads: tuple = ()  # begin..., end...
    dilations: tuple = ()
    group: int = 1
    auto_pad: str = "NOTSET"
    initial: str = ""  # rnn_hidden: the initial_h tensor ("" = zeros)
    reverse: tuple = ()  # rnn_hidden: per direction, whether it runs backwards in time


@dataclass
class Layer:
    """One quantizable node."""

    node: str  # node name (made unique if the model has none)
    op_type: str
    weight: str  # initializer name of the weight
    weight_shape: tuple
    x: XSpec
    axis: int  # DequantizeLinear axis of the per-channel scale in the stored weight layout
    groups: int = 1
    consumers: list = field(default_factory=list)  # all node names that read this weight (shared weights)
    float16: bool = False  # the weight (and so its DequantizeLinear scale) is float16
    base: str = ""  # the standard op whose weight layout it has (``base_op``; "": op_type itself)

    def __post_init__(self):
        self.base = self.base or self.op_type

    @property
    def out_channels(self) -> int:
        return self.weight_shape[self.axis]

    @property
    def depthwise(self) -> bool:
        """A conv whose outputs each read one input channel (through its taps)."""
        return self.base == "Conv" and self.groups > 1 and self.weight_shape[1] == 1

    def to_matrices(self, w: np.ndarray) -> list[np.ndarray]:
        """The stored weight -> one (m, n) matrix per group, rows = output channels, columns = X's columns."""
        if self.op_type in RECURRENT_OPS:  # W/R [num_directions, gates * hidden, n]: one group per direction
            return [w[d] for d in range(w.shape[0])]
        if self.base == "ConvTranspose":  # W[C_in, C_out/g, *k] -> per group the flipped conv kernel
            cin = w.shape[0] // self.groups
            spatial = tuple(range(2, w.ndim))
            out = []
            for k in range(self.groups):
                wk = np.flip(w[k * cin:(k + 1) * cin], axis=spatial)  # (C_in/g, C_out/g, *k)
                out.append(np.ascontiguousarray(np.swapaxes(wk, 0, 1)).reshape(w.shape[1], -1))
            return out
        if self.base == "Conv":
            o = w.shape[0]
            flat = w.reshape(o, -1)
            step = o // self.groups
            return [flat[k * step:(k + 1) * step] for k in range(self.groups)]
        return [w.T if self.axis == 1 else w]  # MatMul B[K, N] / Gemm transB=0 -> B^T; Gemm transB=1 -> B

    def from_matrices(self, mats: list[np.ndarray]) -> np.ndarray:
        """Inverse of ``to_matrices`` (codes or dequantized weights back to the stored layout)."""
        if self.op_type in RECURRENT_OPS:
            return np.stack(mats)
        if self.base == "ConvTranspose":
            cin = self.weight_shape[0] // self.groups
            kshape = tuple(self.weight_shape[2:])
            spatial = tuple(range(2, 2 + len(kshape)))
            parts = [np.flip(np.swapaxes(mk.reshape((mk.shape[0], cin) + kshape), 0, 1), axis=spatial)
                     for mk in mats]
            return np.ascontiguousarray(np.concatenate(parts, axis=0))
        if self.base == "Conv":
            return np.concatenate(mats, axis=0).reshape(self.weight_shape)
        return mats[0].T if self.axis == 1 else mats[0]


@dataclass
class Skipped:
    node: str  # inside a control-flow subgraph: "<parent node>/<attribute>/<node>"
    op_type: str
    reason: str
    params: int = 0  # float weight parameters this node holds (its constant float inputs with >= 2 non-unit axes)
    share: float = 0.0  # params / all float parameters of the model (initializers and Constants, subgraphs too)


CONTROL_FLOW_OPS = ("If", "Loop", "Scan")
FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)


def _float_constants(graph) -> dict:
    """{name: TensorProto} of the float initializers and Constant-node values of ``graph`` (not its subgraphs)."""
    out = {t.name: t for t in graph.initializer if t.data_type in FLOAT_TYPES}
    for n in graph.node:
        if n.op_type == "Constant" and n.output:
            for a in n.attribute:
                if a.name == "value" and a.t.data_type in FLOAT_TYPES:
                    out[n.output[0]] = a.t
    return out


def _subgraphs(node):
    """(attribute name, GraphProto) of a node's subgraphs (If branches, Loop/Scan bodies, ...)."""
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.name, a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            for k, g in enumerate(a.graphs):
                yield f"{a.name}[{k}]", g


def subgraph_nodes(node):
    """The nodes of ``node``'s subgraphs, at any depth."""
    for _, g in _subgraphs(node):
        for n in g.node:
            yield n
            yield from subgraph_nodes(n)


def subgraph_names(graph: onnx.GraphProto) -> set:
    """Every tensor name a node of a subgraph (If/Loop/Scan bodies, at any depth) reads or writes: the names a
    rewrite of ``graph`` must leave as they are (a subgraph reads the outer ones implicitly)."""
    return {t for n in graph.node for m in subgraph_nodes(n) for t in (*m.input, *m.output)}


def _numel(t) -> int:
    return int(np.prod(t.dims)) if len(t.dims) else 1


def _is_weight(t) -> bool:
    """A weight-like constant: float, with at least two axes longer than 1 (a matrix, kernel, embedding table or
    recurrent W/R; not a bias, a per-channel scale [1, C, 1, 1] or a scalar)."""
    return sum(d > 1 for d in t.dims) >= 2


def weight_params(model: onnx.ModelProto) -> int:
    """All float parameters of the model: elements of its float initializers and Constant values, subgraphs too."""
    def count(graph) -> int:
        total = sum(_numel(t) for t in _float_constants(graph).values())
        return total + sum(count(g) for n in graph.node for _, g in _subgraphs(n))
    return count(model.graph)


_NOT_CONSTANT = ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli")


def _const_sources(graph, outer: dict) -> dict:
    """{tensor: {id: float weight-like constant it is computed from}} for every tensor of ``graph`` computed from
    constants only (a Constant, an initializer, or a Slice/Reshape/Transpose/... of them: silero's LSTM weights
    are Slices of one initializer), ``outer`` being the enclosing graphs' map."""
    src = dict(outer)
    for t in graph.initializer:
        src[t.name] = {id(t): t} if t.data_type in FLOAT_TYPES and _is_weight(t) else {}
    for name, t in _float_constants(graph).items():
        src[name] = {id(t): t} if _is_weight(t) else {}
    for n in graph.node:
        if n.op_type == "Constant":
            for o in n.output:
                src.setdefault(o, {})
        elif n.input and n.op_type not in _NOT_CONSTANT and not any(True for _ in _subgraphs(n)) \
                and all(i == "" or i in src for i in n.input):
            merged = {}
            for i in n.input:
                if i:
                    merged.update(src[i])
            for o in n.output:
                if o:
                    src[o] = merged
    return src


class _Holdings:
    """Which float weights each left-out node holds: the weight-like constants its runtime computation reads
    (through pure constant arithmetic), each counted once in the whole model so that the shares add up."""

    def __init__(self, model: onnx.ModelProto):
        self.total = weight_params(model)
        self.taken: set = set()

    def held(self, node, src: dict, claim: bool = True) -> int:
        """Parameters that ``node`` holds and no node before it claimed (0 for a node of constants only: it is
        part of a weight's computation, the node that reads its result holds the weight)."""
        if node.input and all(i == "" or i in src for i in node.input):
            return 0
        found = {}
        for i in node.input:
            if i in src:
                found.update(src[i])
        new = {k: t for k, t in found.items() if k not in self.taken}
        if claim:
            self.taken.update(new)
        return sum(_numel(t) for t in new.values())

    def holds(self, node, src: dict) -> bool:
        return not (node.input and all(i == "" or i in src for i in node.input)) and any(
            src.get(i) for i in node.input)

    def share(self, params: int) -> float:
        return params / self.total if self.total else 0.0


def _float_reason(node, src: dict) -> str:
    """Why a node of a type COMQ does not solve, that holds a float weight, stays float."""
    op = node.op_type
    if op == "Gather" and node.input and src.get(node.input[0]):
        return "embedding table (Gather of a constant): a lookup, not a layer COMQ solves"
    if op == "Einsum":
        return ("Einsum with a constant operand: not rewritten as MatMul (equation not a plain contraction with the "
                "weight, or --no-rewrite-matmul)")
    if node.domain == "com.microsoft.nchwc":
        return ("onnxruntime's CPU-specific NCHWc layout (a graph saved at ORT_ENABLE_ALL): its weights are "
                "reordered; quantize the model saved at ORT_ENABLE_EXTENDED or below")
    return f"{op} with a constant float operand: not a layer COMQ quantizes"


def _subgraph_skips(parent: str, node, outer: dict, hold: _Holdings) -> list:
    """Every node inside ``node``'s subgraphs (recursively) that holds a float weight: left float, with why."""
    out = []
    for attr, g in _subgraphs(node):
        src = _const_sources(g, outer)
        where = f"inside the {attr} subgraph of {node.op_type} {parent}"
        for i, n in enumerate(g.node):
            name = f"{parent}/{attr}/{n.name or f'{n.op_type}_{i}'}"
            if any(True for _ in _subgraphs(n)):
                out.extend(_subgraph_skips(name, n, src, hold))
                continue
            if not hold.holds(n, src):
                continue
            params = hold.held(n, src)
            # (recurrent layers too: quantized in the main graph, left float here for where they sit)
            why = f"{where}: control-flow subgraphs are not quantized" if n.op_type in SUPPORTED_OPS \
                else f"{_float_reason(n, src)} ({where})"
            out.append(Skipped(name, n.op_type, why, params, hold.share(params)))
    return out


def _attrs(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def node_attr(node, name: str, default):
    """The value of attribute ``name`` of ``node``, or ``default``."""
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def node_names(model: onnx.ModelProto) -> list[str]:
    """Node names, with unnamed nodes named ``<op>_<index>`` (and duplicates suffixed) so reports can refer to them."""
    seen: dict[str, int] = {}
    out = []
    for i, n in enumerate(model.graph.node):
        name = n.name or f"{n.op_type}_{i}"
        if name in seen:
            seen[name] += 1
            name = f"{name}__{seen[name]}"
        else:
            seen[name] = 0
        out.append(name)
    return out


def _matches(patterns, name: str, op_type: str) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(op_type, p) for p in patterns)


def check_op_types(op_types) -> None:
    """A UserError naming the op types that onnxcomq cannot quantize (layers.op_types)."""
    bad = [t for t in op_types if t not in SUPPORTED_OPS]
    if bad:
        raise UserError(f"unsupported op type(s) in layers.op_types: {', '.join(bad)} (supported: "
                        f"{', '.join(SUPPORTED_OPS)})")


def readers_of(graph) -> dict:
    """tensor name -> the nodes of ``graph`` that read it (a node reading it twice is listed twice)."""
    readers: dict = {}
    for n in graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    return readers


_PASS_OPS = ("Cast", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Transpose", "Add")


def lm_heads(model: onnx.ModelProto, layers: list) -> set:
    """Node names of a language model's output projection (lm_head): a MatMul/Gemm layer as wide as the largest
    token embedding (a Gather of a 2-D initializer by an integer graph input, through Cast/Reshape-like ops) whose
    output is a graph output (through the same ops, or a bias Add)."""
    is_head = _lm_head_test(model)
    by_name = dict(zip(node_names(model), model.graph.node))
    return {L.node for L in layers if is_head(L, by_name[L.consumers[0][0]])}


def _lm_head_test(model: onnx.ModelProto):
    """The predicate ``(layer, node) -> bool`` of ``lm_heads``."""
    g = model.graph
    ints = {i.name for i in g.input if i.type.tensor_type.elem_type in (onnx.TensorProto.INT32, onnx.TensorProto.INT64)}
    inits = {t.name: t for t in g.initializer}
    rows = []
    for n in g.node:  # (topological order: the integer inputs' shape-only descendants first)
        if n.op_type in _PASS_OPS[:-1] and n.input and n.input[0] in ints:
            ints.update(n.output)
        elif n.op_type == "Gather" and len(n.input) == 2 and n.input[1] in ints and n.input[0] in inits \
                and len(inits[n.input[0]].dims) == 2:
            rows.append(int(inits[n.input[0]].dims[0]))
    if not rows:
        return lambda layer, node: False
    vocab = max(rows)
    outputs = {o.name for o in g.output}
    readers = readers_of(g)

    def reaches_output(t: str, depth: int = 0) -> bool:
        return t in outputs or depth < 4 and any(r.op_type in _PASS_OPS and reaches_output(r.output[0], depth + 1)
                                                 for r in readers.get(t, []) if r.output)

    return lambda layer, node: layer.op_type in ("MatMul", "Gemm") and layer.out_channels == vocab \
        and bool(node.output) and reaches_output(node.output[0])


def find_layers(model: onnx.ModelProto, op_types=SUPPORTED_OPS, exclude=(),
                lm_head_float: bool = False) -> tuple[list[Layer], list[Skipped]]:
    """Quantizable layers of ``model`` (top-level graph) and every node left out that holds a float weight (or is
    a Conv/Gemm/MatMul that was not taken), with why and its share of the model's float parameters: recurrent
    layers, embedding lookups, Einsums, control-flow nodes and the weighted nodes inside their subgraphs.

    ``exclude``: fnmatch patterns over node names and op types. ``op_types``: which of Conv/Gemm/MatMul to consider.
    ``lm_head_float``: a language model's output projection (``lm_heads``) is left float.
    """
    check_op_types(op_types)
    is_head = _lm_head_test(model) if lm_head_float else (lambda layer, node: False)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    consts = _float_constants(g)
    src = _const_sources(g, {})
    hold = _Holdings(model)
    names = node_names(model)
    layers: list[Layer] = []
    skipped: list[Skipped] = []
    by_weight: dict[str, Layer] = {}
    taken_rnn: set = set()  # recurrent W/R (not shared with other nodes)

    def skip(name, node, reason):
        params = hold.held(node, src)
        skipped.append(Skipped(name, node.op_type, reason, params, hold.share(params)))

    for name, node in zip(names, g.node):
        if node.op_type in CONTROL_FLOW_OPS or any(True for _ in _subgraphs(node)):
            inner = _subgraph_skips(name, node, src, hold)
            if inner or hold.holds(node, src):  # (a control-flow node of no weights is not listed)
                skip(name, node, "control-flow subgraph: its layers are not quantized" + (
                    f" (the {len(inner)} node(s) inside that hold weights are listed on their own)" if inner else ""))
            skipped.extend(inner)
            continue
        if node.op_type == "Einsum" and any(i in inits for i in node.input):
            skip(name, node, "Einsum with a constant operand: not rewritten as MatMul "
                 "(equation not a plain contraction with the weight, or --no-rewrite-matmul)")
            continue
        op = base_op(node)
        if op not in SUPPORTED_OPS:
            if hold.holds(node, src):
                skip(name, node, _float_reason(node, src))
            continue
        if op not in op_types:
            skip(name, node, ("recurrent layer: " if node.op_type in RECURRENT_OPS else "")
                 + "op type not selected (layers.op_types)")
            continue
        if _matches(exclude, name, node.op_type) or _matches(exclude, name, op):
            skip(name, node, "excluded by --exclude")
            continue
        if node.op_type in RECURRENT_OPS:
            made = _make_recurrent(name, node, inits, _attrs(node))
            if isinstance(made, str):
                skip(name, node, made)
                continue
            if any(L.weight in by_weight or L.weight in taken_rnn for L in made):
                skip(name, node, "recurrent weight shared with another node: not supported")
                continue
            for L in made:
                L.float16 = inits[L.weight].data_type == onnx.TensorProto.FLOAT16
                L.consumers.append((name, L.x))
                taken_rnn.add(L.weight)
                layers.append(L)
            hold.held(node, src)
            continue
        widx = 1
        wname = node.input[widx] if len(node.input) > widx else ""
        if wname not in inits:
            a_const = op == "MatMul" and node.input[0] in inits
            skip(name, node, "constant weight on input A (activation rank unknown, or --no-rewrite-matmul)"
                 if a_const else "weight is a Constant node's output, not an initializer (constant folding "
                 "failed?)" if wname in consts else "weight is not a constant (activation x activation)")
            continue
        if node.input[0] in inits:
            skip(name, node, "input is a constant too: nothing to calibrate")
            continue
        if wname in taken_rnn:
            skip(name, node, f"weight {wname} is shared with a recurrent layer")
            continue
        wt = inits[wname]
        if wt.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            skip(name, node, f"weight {wname} has type {onnx.TensorProto.DataType.Name(wt.data_type)}, "
                 "only float32 and float16 weights are quantized")
            continue
        shape = tuple(wt.dims)
        at = _attrs(node)
        layer = _make_layer(name, node, op, wname, shape, at)
        if isinstance(layer, str):
            skip(name, node, layer)
            continue
        layer.float16 = wt.data_type == onnx.TensorProto.FLOAT16
        if is_head(layer, node):
            skip(name, node, "the language model's output projection (lm_head): left float (layers.lm_head; "
                 "--lm-head int8 or quantize)")
            continue
        if wname in by_weight:
            first = by_weight[wname]
            if first.x.kind != layer.x.kind or first.op_type != layer.op_type or first.axis != layer.axis \
                    or first.x.fan_in != layer.x.fan_in:
                skip(name, node, f"weight {wname} is shared with {first.node} in an incompatible layout")
                continue
            first.consumers.append((name, layer.x))
            continue
        layer.consumers.append((name, layer.x))
        hold.held(node, src)  # its weight is quantized: no left-out node holds it
        by_weight[wname] = layer
        layers.append(layer)
    return layers, skipped


def unique_name(name: str, taken: set) -> str:
    """``name``, or ``name_1``, ``name_2``... whichever is not in ``taken`` yet (then added to it)."""
    out, i = name, 1
    while out in taken:
        out = f"{name}_{i}"
        i += 1
    taken.add(out)
    return out


def _conv_attrs(op, wname, shape, at):
    """(spatial rank, group, kernel, strides, dilations, pads, auto_pad) of a Conv/ConvTranspose, or why not."""
    if len(shape) < 3:
        return f"{op} weight {wname} has rank {len(shape)}, expected >= 3"
    nsp = len(shape) - 2
    kernel = tuple(int(k) for k in at.get("kernel_shape", shape[2:]))
    if kernel != tuple(shape[2:]):
        return f"kernel_shape {kernel} does not match weight {wname} {shape}"
    auto_pad = at.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    return (nsp, int(at.get("group", 1)), kernel, tuple(int(s) for s in at.get("strides", [1] * nsp)),
            tuple(int(d) for d in at.get("dilations", [1] * nsp)),
            tuple(int(p) for p in at.get("pads", [0] * (2 * nsp))), auto_pad)


def _make_layer(name, node, op, wname, shape, at):
    """The Layer of ``node`` (computing standard op ``op``), or why it is not one."""
    layer = _standard_layer(name, node, op, wname, shape, at)
    if not isinstance(layer, str) and op != node.op_type:
        layer.op_type, layer.base = node.op_type, op
    return layer


def _standard_layer(name, node, op, wname, shape, at):
    if op in ("Conv", "ConvTranspose"):
        parsed = _conv_attrs(op, wname, shape, at)
        if isinstance(parsed, str):
            return parsed
        nsp, group, kernel, strides, dil, pads, auto_pad = parsed
    if op == "Conv":
        if shape[0] % group:
            return f"output channels {shape[0]} not divisible by group {group}"
        fan_in = int(np.prod(shape[1:]))
        x = XSpec(node.input[0], "conv", fan_in=fan_in, kernel=kernel, strides=strides, pads=pads, dilations=dil,
                  group=group, auto_pad=auto_pad)
        return Layer(name, op, wname, shape, x, axis=0, groups=group)
    if op == "ConvTranspose":
        if group != 1:
            return ("grouped ConvTranspose: per-output-channel scales cannot be expressed on the weight's axis 1 "
                    "(it holds C_out/group channels)")
        if auto_pad not in ("NOTSET", "") or "output_shape" in at:
            return "ConvTranspose with auto_pad or output_shape is not supported (give explicit pads)"
        opad = tuple(int(p) for p in at.get("output_padding", [0] * nsp))
        eq = tuple(dil[i] * (kernel[i] - 1) - pads[i] for i in range(nsp)) + \
            tuple(dil[i] * (kernel[i] - 1) - pads[nsp + i] + opad[i] for i in range(nsp))
        fan_in = shape[0] // group * int(np.prod(kernel))
        x = XSpec(node.input[0], "convT", fan_in=fan_in, kernel=kernel, strides=strides, pads=eq, dilations=dil,
                  group=group)
        return Layer(name, op, wname, shape, x, axis=1, groups=group)
    if op == "MatMul":
        if len(shape) != 2:
            return f"{node.op_type} weight {wname} has rank {len(shape)}; only 2-D weights are quantized"
        if node.op_type == "FusedMatMul":  # Y = alpha A' B': the weight may be transposed, the input may not
            if any(int(at.get(k, 0)) for k in ("transA", "transBatchA", "transBatchB")):
                return "FusedMatMul with a transposed input A (transA, transBatchA or transBatchB set)"
            if int(at.get("transB", 0)):
                return Layer(name, op, wname, shape, XSpec(node.input[0], "rows", fan_in=shape[1]), axis=0)
        return Layer(name, op, wname, shape, XSpec(node.input[0], "rows", fan_in=shape[0]), axis=1)
    # Gemm: Y = alpha * A' B' + beta * C
    if len(shape) != 2:
        return f"Gemm weight {wname} has rank {len(shape)}"
    trans_a = bool(at.get("transA", 0))
    trans_b = bool(at.get("transB", 0))
    k = shape[1] if trans_b else shape[0]
    return Layer(name, op, wname, shape, XSpec(node.input[0], "rows", fan_in=k, transpose=trans_a),
                 axis=0 if trans_b else 1)


def _make_recurrent(name, node, inits, at):
    """The two layers of an LSTM/GRU/RNN node: W (input sequence -> gates) and R (hidden state -> gates), each
    [num_directions, gates * hidden, n], quantized per direction and gate row; or why the node stays float."""
    op = node.op_type
    ins = list(node.input) + [""] * (6 - len(node.input))
    x, w, r, seq_lens, h0 = ins[0], ins[1], ins[2], ins[4], ins[5]
    if seq_lens:
        return ("recurrent layer with sequence_lens: padded steps would enter the statistics (give equal-length "
                "sequences without sequence_lens)")
    if w not in inits or r not in inits:
        return "recurrent layer whose W or R is not an initializer: its weights stay float"
    if x in inits:
        return "input is a constant too: nothing to calibrate"
    for t in (w, r):
        if inits[t].data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            return f"weight {t} has type {onnx.TensorProto.DataType.Name(inits[t].data_type)}, only float32 " \
                   "and float16 weights are quantized"
    if h0 and h0 in inits and len(inits[h0].dims) != 3:
        return f"initial_h {h0} has rank {len(inits[h0].dims)}, expected 3"
    direction = at.get("direction", b"forward")
    direction = direction.decode() if isinstance(direction, bytes) else str(direction)
    if direction not in ("forward", "reverse", "bidirectional"):
        return f"unknown direction {direction!r}"
    nd = 2 if direction == "bidirectional" else 1
    if int(at.get("layout", 0)) != 0:  # (the statistics would need only transposes, but nothing could run it)
        return ("recurrent layer with layout 1 (batch first): onnxruntime's CPU LSTM/GRU/RNN do not run it, so "
                "it cannot be calibrated")
    hidden = int(at.get("hidden_size", 0))
    gates = RNN_GATES[op]
    ws, rs = tuple(inits[w].dims), tuple(inits[r].dims)
    if len(ws) != 3 or len(rs) != 3 or ws[0] != nd or rs[0] != nd or ws[1] != gates * hidden \
            or rs[1:] != (gates * hidden, hidden):
        return f"W {ws} / R {rs} do not match {op} hidden_size {hidden}, {nd} direction(s)"
    # Y (the hidden states) is the statistic of R: an extra output of the capture model where the node has none
    y = node.output[0] if len(node.output) and node.output[0] else f"{name}_Y_onnxcomq"
    reverse = (False, True) if nd == 2 else (direction == "reverse",)
    # GRU with linear_before_reset = 0: the candidate gate's rows of R see r * h_{t-1}, which no output carries;
    # their statistic is h_{t-1} itself, as for the update and reset gates (an approximation of those rows only)
    xw = XSpec(x, "rnn_input", fan_in=ws[2], group=nd)
    xr = XSpec(y, "rnn_hidden", fan_in=hidden, group=nd, initial=h0, reverse=reverse)
    return [Layer(name, op, w, ws, xw, axis=1, groups=nd), Layer(name, op, r, rs, xr, axis=1, groups=nd)]


def with_rnn_outputs(model: onnx.ModelProto, layers: list) -> onnx.ModelProto:
    """``model``, or a copy whose recurrent nodes without a Y output get one (named as their layer's XSpec says),
    for the capture model: R's statistic is formed from Y."""
    want = {L.node: L.x.tensor for L in layers if L.x.kind == "rnn_hidden"}
    produced = {o for n in model.graph.node for o in n.output if o}
    missing = {k: v for k, v in want.items() if v not in produced}
    if not missing:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for name, n in zip(node_names(out), out.graph.node):
        if name in missing:
            if len(n.output):
                n.output[0] = missing[name]
            else:
                n.output.append(missing[name])
    return out


def load_weight(model: onnx.ModelProto, name: str) -> np.ndarray:
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    raise KeyError(name)


def check_weights(model: onnx.ModelProto, layers: list) -> None:
    """A NaN or Inf in a weight is the user's to fix (one line naming the tensor), before any work is done."""
    inits = {t.name: t for t in model.graph.initializer}
    for L in layers:
        w = numpy_helper.to_array(inits[L.weight])
        bad = ~np.isfinite(w)
        if bad.any():
            raise UserError(f"weight {L.weight} of node {L.node} holds {int(bad.sum())} NaN or Inf value(s) "
                            f"(of {w.size}): the float model itself is broken")
