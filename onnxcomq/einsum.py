"""Einsum with a constant weight (tf2onnx writes Keras ``EinsumDense``, e.g. the output projection of
``MultiHeadAttention``, as ``Einsum("abcd,cde->abe", x, W[4, 16, 64])``) rewritten as a MatMul that COMQ quantizes:

    Transpose(x) to (free indices of x..., contracted indices...) -> Reshape [-1, K] -> MatMul(W2[K, N])
    -> Reshape (free dims of x..., free dims of W...) -> Transpose to the output's index order

W2 is W transposed to (contracted..., free...) and reshaped to [K, N], stored as a new initializer; the MatMul keeps
the Einsum's node name, so reports name the layer the user knows. Only plain contractions are rewritten: two
operands, one of them an initializer, no ellipsis, no repeated index within an operand, and every index of the
weight either contracted or in the output but not also in the activation (no batch index on the weight). Anything
else is left as it is (and graph.find_layers reports it).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .graph import node_names, unique_name


def parse(equation: str, n_inputs: int = 2):
    """(input index strings, output index string) of a plain explicit equation, or None."""
    eq = equation.replace(" ", "")
    if "..." in eq or "->" not in eq:
        return None
    lhs, out = eq.split("->")
    ins = lhs.split(",")
    if len(ins) != n_inputs or not all(s.isalpha() for s in ins + [out] if s) or len(set(out)) != len(out):
        return None
    if any(len(set(s)) != len(s) for s in ins):
        return None
    return ins, out


def plan(equation: str, weight_index: int):
    """How to rewrite ``Einsum(equation)`` whose operand ``weight_index`` is the weight, or why not (a str):
    (x_perm, n_free_x, w_perm, n_contracted, out_perm or None)."""
    parsed = parse(equation)
    if parsed is None:
        return f"equation {equation!r} is not a plain two-operand contraction"
    (a, b), out = parsed
    ix, iw = (b, a) if weight_index == 0 else (a, b)
    contracted = [c for c in ix if c in iw and c not in out]
    if any(c in ix and c in out for c in iw):
        return f"equation {equation!r}: the weight has a batch index"
    free_x = [c for c in ix if c not in iw]
    free_w = [c for c in iw if c not in ix]
    if not contracted or sorted(free_x + free_w) != sorted(out):
        return f"equation {equation!r}: not a contraction of the activation with the weight"
    x_perm = [ix.index(c) for c in free_x + contracted]
    w_perm = [iw.index(c) for c in contracted + free_w]
    now = free_x + free_w
    out_perm = [now.index(c) for c in out]
    return x_perm, len(free_x), w_perm, len(contracted), (None if out_perm == sorted(out_perm) else out_perm)


def rewrite_einsums(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every rewritable Einsum-with-a-constant-weight replaced by a MatMul (the model
    itself when there is none)."""
    inits = {t.name: t for t in model.graph.initializer}
    todo = {}
    for i, (name, node) in enumerate(zip(node_names(model), model.graph.node)):
        if node.op_type != "Einsum" or len(node.input) != 2:
            continue
        const = [k for k, t in enumerate(node.input) if t in inits]
        if len(const) != 1:
            continue
        eq = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "equation"), b"")
        p = plan(eq.decode() if isinstance(eq, bytes) else eq, const[0])
        if not isinstance(p, str) and inits[node.input[const[0]]].data_type in (onnx.TensorProto.FLOAT,
                                                                                onnx.TensorProto.FLOAT16):
            todo[i] = (name, const[0], p)
    if not todo:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    inits = {t.name: t for t in g.initializer}
    taken = set(inits) | {o for n in g.node for o in n.output} | {i.name for i in g.input} | set(node_names(out))
    i64 = lambda values, base: _init(g, np.array(values, np.int64), unique_name(base, taken))  # noqa: E731
    new_nodes, replaced = [], set()
    for i, node in enumerate(list(g.node)):
        if i not in todo:
            new_nodes.append(node)
            continue
        name, widx, (x_perm, n_free, w_perm, n_con, out_perm) = todo[i]
        x, wname = node.input[1 - widx], node.input[widx]
        replaced.add(wname)
        w = numpy_helper.to_array(inits[wname])
        wt = np.transpose(w, w_perm)
        k = int(np.prod(wt.shape[:n_con]))
        free_w = list(wt.shape[n_con:])
        w2 = _init(g, np.ascontiguousarray(wt.reshape(k, -1)), unique_name(f"{wname}_matmul", taken))
        nm = lambda s: unique_name(f"{name}_{s}", taken)  # noqa: E731
        xt = x
        if x_perm != sorted(x_perm):
            xt = nm("x_transposed")
            new_nodes.append(helper.make_node("Transpose", [x], [xt], name=nm("transpose_x"), perm=x_perm))
        x2, y2 = nm("x_rows"), nm("rows")
        new_nodes.append(helper.make_node("Reshape", [xt, i64([-1, k], f"{name}_rows_shape")], [x2],
                                          name=nm("reshape_x")))
        new_nodes.append(helper.make_node("MatMul", [x2, w2], [y2], name=name))
        # output shape: the activation's free dims (dynamic, from Shape) then the weight's free dims
        shp, lead, yshape = nm("x_shape"), nm("x_free_dims"), nm("y_shape")
        new_nodes += [helper.make_node("Shape", [xt], [shp], name=nm("shape")),
                      helper.make_node("Slice", [shp, i64([0], f"{name}_zero"), i64([n_free], f"{name}_n_free")],
                                       [lead], name=nm("slice")),
                      helper.make_node("Concat", [lead, i64(free_w, f"{name}_w_free_dims")], [yshape],
                                       name=nm("concat"), axis=0)]
        y = node.output[0]
        y3 = y if out_perm is None else nm("unpermuted")
        new_nodes.append(helper.make_node("Reshape", [y2, yshape], [y3], name=nm("reshape_y")))
        if out_perm is not None:
            new_nodes.append(helper.make_node("Transpose", [y3], [y], name=nm("transpose_y"), perm=out_perm))
    del g.node[:]
    g.node.extend(new_nodes)
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    keep = [t for t in g.initializer if t.name not in replaced or t.name in used]  # drop the replaced weights
    del g.initializer[:]
    g.initializer.extend(keep)
    return out


def _init(g, array, name):
    g.initializer.append(numpy_helper.from_array(array, name))
    return name
