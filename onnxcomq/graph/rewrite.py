"""Constant weights that COMQ cannot take where they stand, rewritten as ``MatMul(activation, weight)``:

- ``Einsum`` with a constant weight (tf2onnx writes Keras ``EinsumDense``, e.g. the output projection of
  ``MultiHeadAttention``, as ``Einsum("abcd,cde->abe", x, W[4, 16, 64])``);
- ``MatMul(W, x)`` with the constant 2-D weight on the left (``W @ x``, Y[..., M, N] = W[M, K] x[..., K, N]).

Both become

    Transpose(x) to (free indices of x..., contracted indices...) -> Reshape [-1, K] -> MatMul(W2[K, N])
    -> Reshape (free dims of x..., free dims of W...) -> Transpose to the output's index order

W2 is W transposed to (contracted..., free...) and reshaped to [K, N], stored as a new initializer; the MatMul keeps
the original node's name, so reports name the layer the user knows. Only plain contractions are rewritten: two
operands, one of them an initializer, no ellipsis, no repeated index within an operand, and every index of the
weight either contracted or in the output but not also in the activation (no batch index on the weight); for
``W @ x`` the rank of x must be known. Anything else is left as it is (and graph.find_layers reports it).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .layers import node_names, unique_name
from .modelio import copy_to_edit, skeleton


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


def einsum_layout(equation: str, weight_index: int):
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


def _equation(node, inits, ranks) -> str | None:
    """The einsum equation of an Einsum node, or of MatMul(W, x) with a constant 2-D W and x of known rank >= 2."""
    if node.op_type == "Einsum":
        eq = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "equation"), b"")
        return eq.decode() if isinstance(eq, bytes) else eq
    w = inits[node.input[0]]
    r = ranks().get(node.input[1])
    if len(w.dims) != 2 or r is None or r < 2:
        return None
    batch = "abcdefghij"[:r - 2]
    return f"mk,{batch}kn->{batch}mn"


def tensor_ranks(model) -> dict:
    """Tensor name -> rank, where shape inference knows it (empty if it fails, e.g. on a model over 2 GB)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton(model))  # (ranks need no tensor bytes)
    except Exception:  # best effort: a MatMul whose activation rank is unknown stays as it is
        return {}
    return {vi.name: len(vi.type.tensor_type.shape.dim) for vi in list(inferred.graph.value_info)
            + list(inferred.graph.input) if vi.type.tensor_type.HasField("shape")}


def rewrite_to_matmul(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every rewritable Einsum with a constant weight and every MatMul with its constant
    weight on the left replaced by MatMul(activation, weight) (the model itself when there is none)."""
    inits = {t.name: t for t in model.graph.initializer}
    todo = {}
    ranks_cache = {}

    def ranks():
        if "r" not in ranks_cache:
            ranks_cache["r"] = tensor_ranks(model)
        return ranks_cache["r"]

    for i, (name, node) in enumerate(zip(node_names(model), model.graph.node)):
        if len(node.input) != 2 or not (node.op_type == "Einsum" or (
                node.op_type == "MatMul" and node.input[0] in inits and node.input[1] not in inits)):
            continue
        const = [k for k, t in enumerate(node.input) if t in inits]
        if len(const) != 1 or inits[node.input[const[0]]].data_type not in (onnx.TensorProto.FLOAT,
                                                                           onnx.TensorProto.FLOAT16):
            continue
        eq = _equation(node, inits, ranks)
        p = einsum_layout(eq, const[0]) if eq else "unknown rank"
        if not isinstance(p, str):
            todo[i] = (name, const[0], p)
    if not todo:
        return model
    out, inits, taken = copy_to_edit(model)
    g = out.graph
    new_nodes, replaced = [], set()
    for i, node in enumerate(list(g.node)):
        if i in todo:
            name, widx, p = todo[i]
            replaced.add(node.input[widx])
            new_nodes += _as_matmul(g, node, name, widx, p, numpy_helper.to_array(inits[node.input[widx]]), taken)
        else:
            new_nodes.append(node)
    del g.node[:]
    g.node.extend(new_nodes)
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    keep = [t for t in g.initializer if t.name not in replaced or t.name in used]  # drop the replaced weights
    del g.initializer[:]
    g.initializer.extend(keep)
    return out


def _as_matmul(g, node, name, widx, p, w, taken) -> list:
    """The nodes that replace Einsum ``node`` (named ``name``, weight ``w`` at input ``widx``, ``p`` from plan);
    their constants are added to ``g``'s initializers."""
    x_perm, n_free, w_perm, n_con, out_perm = p

    def fresh(suffix):
        return unique_name(f"{name}_{suffix}", taken)

    def const(array, suffix):
        t = numpy_helper.from_array(np.ascontiguousarray(array), unique_name(f"{name}_{suffix}", taken))
        g.initializer.append(t)
        return t.name

    wt = np.transpose(w, w_perm)
    k = int(np.prod(wt.shape[:n_con]))
    w2 = const(wt.reshape(k, -1), "weight")
    nodes = []
    xt = node.input[1 - widx]
    if x_perm != sorted(x_perm):
        nodes.append(helper.make_node("Transpose", [xt], [fresh("x_transposed")], name=fresh("transpose_x"),
                                      perm=x_perm))
        xt = nodes[-1].output[0]
    x2, y2 = fresh("x_rows"), fresh("rows")
    nodes.append(helper.make_node("Reshape", [xt, const(np.array([-1, k], np.int64), "rows_shape")], [x2],
                                  name=fresh("reshape_x")))
    nodes.append(helper.make_node("MatMul", [x2, w2], [y2], name=name))
    # output shape: the activation's free dims (dynamic, from Shape) then the weight's free dims
    shp, lead, yshape = fresh("x_shape"), fresh("x_free_dims"), fresh("y_shape")
    nodes += [helper.make_node("Shape", [xt], [shp], name=fresh("shape")),
              helper.make_node("Slice", [shp, const(np.array([0], np.int64), "zero"),
                                         const(np.array([n_free], np.int64), "n_free")], [lead], name=fresh("slice")),
              helper.make_node("Concat", [lead, const(np.array(wt.shape[n_con:], np.int64), "w_free_dims")],
                               [yshape], name=fresh("concat"), axis=0)]
    y = node.output[0]
    y3 = y if out_perm is None else fresh("unpermuted")
    nodes.append(helper.make_node("Reshape", [y2, yshape], [y3], name=fresh("reshape_y")))
    if out_perm is not None:
        nodes.append(helper.make_node("Transpose", [y3], [y], name=fresh("transpose_y"), perm=out_perm))
    return nodes
