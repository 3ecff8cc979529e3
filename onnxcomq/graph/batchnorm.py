"""Inference ``BatchNormalization`` after a ``Conv``, ``ConvTranspose``, ``Gemm`` or ``MatMul`` (on a 2-D input)
folded into its weight and bias (a MatMul gets an Add for its bias), before anything is captured.

Exporters that keep batch norms as nodes (Paddle2ONNX, some tf2onnx and older torch exports) leave the conv's output
before a per-channel scale ``gamma / sqrt(var + eps)``, which reaches 50-300 on the channels a depthwise conv barely
uses (PaddleDetection's PicoDet layout model). Quantized per tensor there, as 8-bit activations are, one channel's
rounding noise comes out of the batch norm that many times larger: one such tensor alone gave the model's output a
relative squared error of 0.99. Runtimes fold the pair anyway (onnxruntime's ConvBNFusion, TensorRT); folded
first, the weights are those the runtime would run and the activation quantized is the batch norm's output. For
per-channel weight grids the fold changes nothing but the bias, which the conv then has (so it may be re-fitted).

    W'[c] = W[c] * s[c],  b'[c] = (b[c] - mean[c]) * s[c] + beta[c],  s = gamma / sqrt(var + eps)

A frozen batch norm, ``x * scale + shift`` with one value per channel (torchvision's FrozenBatchNorm2d, the
backbone of its detection models, as both torch exporters write it: Mul then Add), folds the same way with
s = scale and b' = b s + shift.

Paddle 3's exporter writes the conv's bias as an Add of a [1, C, 1, 1] constant, then an Identity, before the batch
norm: that constant joins the bias, ``b`` above. A chain is folded only where that is exact: an inference-mode batch
norm (one output, no ``training_mode``, ``spatial`` 1) whose four parameters are initializers (or Identity nodes of
them, as torch's TorchScript exporter writes equal parameters), after one of those layers (standard domain; torch's
TorchScript exporter folds Conv + BatchNorm itself, not ConvTranspose or Linear + BatchNorm) whose weight and bias
are initializers read by that layer alone, with between them at most one Add of a constant with one value per channel
and any Identity nodes, each tensor of the chain read by the next node alone; nothing of the chain may be read
inside a subgraph.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .layers import node_attr, subgraph_names, unique_name
from .modelio import copy_to_edit, drop_weight
from .rewrite import tensor_ranks

_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)

# the ops a batch norm after them folds into (each with its output channels on axis 1 of its output)
FOLD_INTO = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _per_channel(t: onnx.TensorProto, rank: int, channels: int) -> bool:
    """Whether constant ``t``, added to a [N, C, ...] tensor of ``rank``, adds one value per channel (axis 1)."""
    dims = list(t.dims)
    if len(dims) > rank:
        return False
    dims = [1] * (rank - len(dims)) + dims
    return all(d == 1 for a, d in enumerate(dims) if a != 1) and dims[1] in (1, channels)


def _chains(model: onnx.ModelProto) -> list:
    """(layer index, [indices of the nodes between: Identity, a bias Add, a frozen batch norm's Mul], the bias Add's
    constant or None, the index of the last node (the BatchNormalization, or a frozen batch norm's Add), the names
    of the batch norm's constants (gamma, beta, mean, var; or scale, shift), "bn" or "affine") of every chain that
    folds exactly: a layer of ``FOLD_INTO``, then optionally a per-channel constant Add (Paddle 3's export of a conv
    bias) and Identity nodes, each the only reader of the tensor before it, then the batch norm."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    graph_io = {i.name for i in g.input} | {o.name for o in g.output}
    if model.ir_version < 4:  # (there every initializer is also listed as an input, and is a constant)
        graph_io -= set(inits)
    readers: dict = {}
    for k, n in enumerate(g.node):
        for t in n.input:
            readers.setdefault(t, []).append(k)
    producer = {o: k for k, n in enumerate(g.node) for o in n.output}
    nested = subgraph_names(g)

    def const(t):
        return t in inits and t not in graph_io and inits[t].data_type in _FLOATS

    def source(t):  # the constant behind Identity nodes (torch's TorchScript exporter dedups equal parameters so)
        for _ in range(8):
            if t in inits or t not in producer or g.node[producer[t]].op_type != "Identity":
                break
            t = g.node[producer[t]].input[0]
        return t if const(t) else None

    cache = []

    def ranks():  # (shape inference, only where a MatMul needs it)
        if not cache:
            cache.append(tensor_ranks(model))
        return cache[0]

    chains, used = [], set()
    for k, end in enumerate(g.node):
        if end.domain not in ("", "ai.onnx"):
            continue
        if end.op_type == "BatchNormalization" and len(end.input) == 5:
            if node_attr(end, "training_mode", 0) or node_attr(end, "spatial", 1) != 1 or \
                    any(o for o in end.output[1:]):
                continue
            params = [source(p) for p in end.input[1:]]
            if None in params:
                continue
            x, reader, mids, kind = end.input[0], k, [], "bn"
        elif end.op_type == "Add" and len(end.input) == 2:
            # a frozen batch norm, x * scale + shift (torchvision's FrozenBatchNorm2d in its detection models)
            shift = [source(t) for t in end.input]
            if shift.count(None) != 1:
                continue
            y = end.input[shift.index(None)]
            m = producer.get(y)
            if m is None or y in graph_io or y in nested or readers.get(y) != [k]:
                continue
            mul = g.node[m]
            if mul.op_type != "Mul" or mul.domain not in ("", "ai.onnx") or len(mul.output) != 1 or len(mul.input) != 2:
                continue
            scale = [source(t) for t in mul.input]
            if scale.count(None) != 1:
                continue
            params = [next(t for t in scale if t), next(t for t in shift if t)]
            x, reader, mids, kind = mul.input[scale.index(None)], m, [m], "affine"
        else:
            continue
        add = None
        while True:  # back from the batch norm, through Identity and one constant Add, to the Conv
            c = producer.get(x)
            if c is None or x in graph_io or x in nested or readers.get(x) != [reader]:
                c = None
                break
            node = g.node[c]
            if node.domain not in ("", "ai.onnx") or len(node.output) != 1:
                c = None
                break
            if node.op_type == "Identity":
                mids.append(c)
            elif node.op_type == "Add" and add is None and len(node.input) == 2 and \
                    sum(const(t) for t in node.input) == 1:
                mids.append(c)
                add = next(t for t in node.input if const(t))
            else:
                break
            x, reader = next(t for t in node.input if t != add), c
        if c is None or g.node[c].op_type not in FOLD_INTO or c in used:
            continue
        layer = g.node[c]
        consts = [t for t in layer.input[1:] if t]
        if len(layer.input) < 2 or not layer.input[1] or const(layer.input[0]) or any(
                not const(t) or t in nested or readers.get(t) != [c] for t in consts):
            continue
        dims, op = list(inits[layer.input[1]].dims), layer.op_type
        if op in ("Gemm", "MatMul") and (len(dims) != 2 or node_attr(layer, "transA", 0)):
            continue
        if op == "MatMul" and ranks().get(layer.input[0]) != 2:  # (a batch norm reads axis 1: [N, C] only)
            continue
        channels = _channels(layer, dims)
        rank = len(dims) if op.startswith("Conv") else 2
        if (any(list(inits[p].dims) != [channels] for p in params) if kind == "bn" else
                not all(_per_channel(inits[p], rank, channels) for p in params)) or (
                add is not None and not _per_channel(inits[add], rank, channels)):
            continue
        used.add(c)
        chains.append((c, mids, add, k, params, kind))
    return chains


def _channels(layer, dims) -> int:
    """The output channels of a layer of ``FOLD_INTO`` whose weight has ``dims``."""
    if layer.op_type == "Conv" or (layer.op_type == "Gemm" and node_attr(layer, "transB", 0)):
        return dims[0]
    return dims[1] * node_attr(layer, "group", 1)


def _scaled(layer, w: np.ndarray, s: np.ndarray) -> np.ndarray:
    """The weight ``w`` of ``layer`` with output channel c multiplied by s[c]."""
    op = layer.op_type
    if op == "Conv" or (op == "Gemm" and node_attr(layer, "transB", 0)):  # W[C_out, ...]
        return w * s.reshape((-1,) + (1,) * (w.ndim - 1))
    if op in ("Gemm", "MatMul"):  # W[K, C_out]
        return w * s
    # ConvTranspose: W[C_in, C_out / group, k...], output channel j of group i at W[group i's rows, j]
    grp = node_attr(layer, "group", 1)
    split = (grp, w.shape[0] // grp, w.shape[1]) + w.shape[2:]
    return (w.reshape(split) * s.reshape((grp, 1, -1) + (1,) * (w.ndim - 2))).reshape(w.shape)


def fold_batch_norms(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """(a copy of ``model`` with every exactly foldable chain folded into its layer, or the model itself where there
    is none; the number of batch norms folded, frozen ones included)."""
    chains = _chains(model)
    if not chains:
        return model, 0
    out, inits, taken = copy_to_edit(model)
    g = out.graph
    drop_nodes, drop_params, adds = set(), set(), []
    for c, mids, add, k, params, kind in chains:
        layer, bn = g.node[c], g.node[k]
        values = [numpy_helper.to_array(inits[p]).astype(np.float64).reshape(-1) for p in params]
        if kind == "bn":
            gamma, beta, mean, var = values
            s = gamma / np.sqrt(var + node_attr(bn, "epsilon", 1e-5))
        else:  # x * scale + shift, each one value per channel (or one for all)
            n = _channels(layer, inits[layer.input[1]].dims)
            s, shift = (np.broadcast_to(v, (n,)) for v in values)
        wt = inits[layer.input[1]]
        w = numpy_helper.to_array(wt)
        wt.CopyFrom(numpy_helper.from_array(_scaled(layer, w.astype(np.float64), s).astype(w.dtype), wt.name))
        has_bias = layer.op_type != "MatMul" and len(layer.input) > 2 and layer.input[2]
        b = numpy_helper.to_array(inits[layer.input[2]]).astype(np.float64) if has_bias else np.zeros_like(s)
        if layer.op_type == "Gemm":  # Y = alpha A B + beta C: the new C is taken with beta 1
            b = b * node_attr(layer, "beta", 1.0)
            for a in [a for a in layer.attribute if a.name == "beta"]:
                layer.attribute.remove(a)
        if add is not None:
            b = b + numpy_helper.to_array(inits[add]).astype(np.float64).reshape(-1)
        b2 = ((b - mean) * s + beta if kind == "bn" else b * s + shift).astype(w.dtype)
        if has_bias:
            inits[layer.input[2]].CopyFrom(numpy_helper.from_array(b2, layer.input[2]))
        else:
            name = unique_name(f"{wt.name}_bias", taken)
            g.initializer.append(numpy_helper.from_array(b2, name))
            if out.ir_version < 4:  # (an initializer is listed as an input there)
                g.input.append(helper.make_tensor_value_info(name, g.initializer[-1].data_type, list(b2.shape)))
            if layer.op_type == "MatMul":  # (no bias input: an Add after it, as torch writes a Linear's bias)
                mm = unique_name(f"{layer.output[0]}_matmul", taken)
                adds.append((c, helper.make_node("Add", [mm, name], [bn.output[0]],
                                                 name=unique_name(f"{layer.name or wt.name}_bias", taken))))
                layer.output[0] = mm
            elif len(layer.input) < 3:
                layer.input.append(name)
            else:
                layer.input[2] = name
        if layer.op_type != "MatMul":
            layer.output[0] = bn.output[0]  # (the batch norm's readers and graph outputs keep their tensor)
        drop_nodes.update([k, *mids])
        drop_params.update([*params, *([add] if add else [])])
    fed = {t for *_, k, _, _ in chains for t in g.node[k].input}  # (the parameters as the batch norms read them)
    after = dict(adds)
    nodes = [m for i, n in enumerate(g.node) if i not in drop_nodes for m in ([n, after[i]] if i in after else [n])]
    read = {t for n in nodes for t in n.input} | {o.name for o in g.output}
    nodes = [n for n in nodes if not (n.op_type == "Identity" and n.output[0] in fed and n.output[0] not in read)]
    del g.node[:]
    g.node.extend(nodes)
    still = {t for n in g.node for t in n.input}
    for t in [t for t in g.initializer if t.name in drop_params and t.name not in still]:
        drop_weight(g, t)  # (and its graph input listing, as IR < 4 writes one)
    unwritten = {model.graph.node[i].output[0] for c, mids, *_ in chains for i in (c, *mids)}  # (now unwritten)
    keep_vi = [v for v in g.value_info if v.name not in unwritten]
    del g.value_info[:]
    g.value_info.extend(keep_vi)
    return out, len(chains)
