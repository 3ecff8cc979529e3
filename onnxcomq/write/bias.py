"""Free bias (docs/design.md, "Free bias"): with the bias kept float, the best bias for quantized
weights Q is b'_i = b_i + mu . (w_i - q_i), mu the mean row of X; COMQ then solves on the centered Gram
G_c = X^T X - N mu^T mu. This module writes b' into the graph: it edits the layer's bias input (Conv, ConvTranspose,
Gemm's C, onnxruntime's FusedConv and Attention), or after a MatMul the constant of the Add (or of onnxruntime's
BiasGelu, FastGelu or SkipLayerNormalization) that follows, or adds an Add.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..graph.layers import base_op, node_attr, node_names, readers_of, unique_name


def _own_bias(node: onnx.NodeProto) -> bool:
    """Whether ``node``'s bias is its input 2, added to the weight product (Conv, ConvTranspose, onnxruntime's
    FusedConv and Attention; Gemm's C is scaled)."""
    return base_op(node) in ("Conv", "ConvTranspose") or node.op_type == "Attention"


def bias_target(node: onnx.NodeProto, inits: dict) -> str | None:
    """Why the bias of ``node`` cannot be corrected, or None when it can (``inits``: initializers by name)."""
    op = base_op(node)
    if _own_bias(node):
        if len(node.input) > 2 and node.input[2] and node.input[2] not in inits:
            return "bias is not a constant"
        return None
    if op == "Gemm":
        if len(node.input) > 2 and node.input[2]:
            c = inits.get(node.input[2])
            if c is None:
                return "Gemm C is not a constant"
            if len(c.dims) not in (1, 2) or (len(c.dims) == 2 and c.dims[0] != 1):
                return f"Gemm C has shape {list(c.dims)}, not a per-channel bias"
            if node_attr(node, "beta", 1.0) == 0:
                return "Gemm beta is 0"
        return None  # no C: beta is unused (tf2onnx writes beta=0), apply() adds C with beta 1
    if op == "MatMul":
        return None
    return f"{node.op_type} has no bias"


def has_bias(node: onnx.NodeProto, inits: dict, readers: dict, channels: int) -> bool:
    """Whether the layer ``node`` already adds a constant per-channel bias: its own (Conv/ConvTranspose's B, Gemm's C
    with beta not 0), or an Add of a constant of ``channels`` values (the layer's outputs) that its output reaches
    alone, directly or through shape-only ops (MatMul + Add; Paddle2ONNX's Conv + Add [1, C, 1, 1]; tf2onnx's Gemm +
    Reshape + Squeeze + Add [heads, head size]). (``readers``: tensor -> the nodes that read it.) A free bias is only written where this holds: a layer without a
    bias maps a zero input to zero, and a bias fitted to the calibration data's mean would break that on inputs the
    data lacks (silence in an audio front end: -100 dB came out as -6 dB)."""
    if _own_bias(node) and len(node.input) > 2 and node.input[2]:
        return True
    if base_op(node) == "Gemm" and len(node.input) > 2 and node.input[2] and node_attr(node, "beta", 1.0) != 0:
        return True
    if node.op_type != base_op(node) and node.op_type != "FusedMatMul":  # (its output is after an activation)
        return False
    y = node.output[0]
    for _ in range(4):
        consumers = readers.get(y, [])
        if len(consumers) != 1:
            return False
        nxt = consumers[0]
        other = bias_after(nxt, y)
        if other is not None or nxt.op_type == "Add":
            c = inits.get(other or "")
            return c is not None and len(c.dims) >= 1 and int(np.prod(c.dims)) == channels
        if nxt.op_type not in _SHAPE_OPS:
            return False
        y = nxt.output[0]
    return False


_SHAPE_OPS = ("Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity")
# onnxruntime's fused ops that add a bias to their input (its transformer optimizer moves a MatMul's bias there):
# op -> (the inputs that receive it, the bias input)
_FUSED_BIAS = {"BiasGelu": ((0,), 1), "FastGelu": ((0,), 1), "SkipLayerNormalization": ((0, 1), 4)}


def bias_after(reader: onnx.NodeProto, y: str) -> str | None:
    """The name of the other operand of ``reader`` that it adds to ``y``: an Add's, or the bias input of one of
    onnxruntime's fused ops (BiasGelu, FastGelu, SkipLayerNormalization: bias + input + skip); None otherwise."""
    if reader.op_type == "Add" and len(reader.input) == 2:
        return reader.input[1] if reader.input[0] == y else reader.input[0]
    fused = _FUSED_BIAS.get(reader.op_type) if reader.domain == "com.microsoft" else None
    if fused is None:
        return None
    receivers, b = fused
    if any(k < len(reader.input) and reader.input[k] == y for k in receivers) and b < len(reader.input):
        return reader.input[b] or None
    return None


def apply(model: onnx.ModelProto, deltas: dict) -> onnx.ModelProto:
    """Add ``deltas[node_name]`` (one value per output channel) to each node's bias, in a copy of ``model``."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    names = node_names(out)
    inits = {t.name: t for t in g.initializer}
    taken = set(inits) | {o for n in g.node for o in n.output} | {i.name for i in g.input} | set(names)
    readers = readers_of(g)
    uses = {t: len(r) for t, r in readers.items()}
    new_nodes = []
    for name, node in zip(names, list(g.node)):
        new_nodes.append(node)
        if name not in deltas:
            continue
        delta = np.asarray(deltas[name], np.float64)
        wt = inits[node.input[1]].data_type
        np_type = np.float16 if wt == onnx.TensorProto.FLOAT16 else np.float32

        def new_bias(base_name, values, shape):
            bname = unique_name(f"{base_name}_bias_corrected", taken)
            g.initializer.append(numpy_helper.from_array(np.asarray(values, np_type).reshape(shape), bname))
            return bname

        if _own_bias(node) or base_op(node) == "Gemm":
            scale = 1.0
            has_c = len(node.input) > 2 and node.input[2]
            if base_op(node) == "Gemm":
                if not has_c:  # the new C is added with beta 1 (beta was unused without C)
                    for a in node.attribute:
                        if a.name == "beta":
                            a.f = 1.0
                scale = node_attr(node, "alpha", 1.0) / node_attr(node, "beta", 1.0)
            if has_c:
                old = inits[node.input[2]]
                base = numpy_helper.to_array(old)
                values = base.astype(np.float64) + (scale * delta).reshape(base.shape)
                if uses.get(node.input[2], 0) == 1:  # ours alone: rewrite it in place
                    old.CopyFrom(numpy_helper.from_array(values.astype(base.dtype), old.name))
                else:
                    node.input[2] = new_bias(name, values, base.shape)
            else:
                while len(node.input) < 3:
                    node.input.append("")
                node.input[2] = new_bias(name, scale * delta, (delta.size,))
            continue
        # MatMul: fold into the constant of the Add that follows, or add an Add
        delta = delta * node_attr(node, "alpha", 1.0)  # (FusedMatMul: alpha X W)
        consumers = readers.get(node.output[0], [])
        other = bias_after(consumers[0], node.output[0]) if len(consumers) == 1 else None
        const = None
        if other is not None:
            c = inits.get(other)
            if c is not None and tuple(c.dims) in ((delta.size,), (1, delta.size)) and uses.get(other, 0) == 1:
                const = (other, c)
        if const is not None:
            other, c = const
            old = numpy_helper.to_array(c)
            values = old.astype(np.float64) + delta.reshape(old.shape)
            c.CopyFrom(numpy_helper.from_array(values.astype(old.dtype), other))
        else:
            y = node.output[0]
            inner = unique_name(f"{y}_before_bias", taken)
            node.output[0] = inner
            bname = new_bias(name, delta, (delta.size,))
            new_nodes.append(helper.make_node("Add", [inner, bname], [y], name=unique_name(f"{name}_bias_add", taken)))
    del g.node[:]
    g.node.extend(new_nodes)
    return out
