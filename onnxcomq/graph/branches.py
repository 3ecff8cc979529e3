"""Layers inside If branches and Loop / Scan bodies (docs/design.md, "If branches, Loop and Scan bodies").

An exporter puts a model's layers inside an ``If`` when the model holds two variants and picks one at run time
(silero-vad's 8 kHz and 16 kHz networks, chosen by the sample rate input), and inside a ``Loop`` or ``Scan`` body
when it steps a cell over a sequence (a scripted for loop, ``torch.scan``). Each such subgraph that holds layers is
quantized as a model of its own: its inputs are the outer tensors it reads (captured from the float model on the
calibration batches for which the If takes that branch) and, for a body, its own inputs (captured at every
iteration: ``with_iteration_outputs``), the outer constants it reads are copied in, and its outputs are the
subgraph's outputs. The quantized model's graph then replaces the subgraph (``splice``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .layers import SUPPORTED_OPS, _const_sources, _subgraphs, base_op, node_names, unique_name
from .modelio import opset_of


def _defined(graph) -> set:
    """The names ``graph`` itself defines: its inputs, initializers and node outputs (not its subgraphs')."""
    return {i.name for i in graph.input} | {t.name for t in graph.initializer} | \
        {o for n in graph.node for o in n.output if o}


def free_names(graph) -> list:
    """The names that ``graph`` (its nodes and, at any depth, their subgraphs) reads from enclosing scopes, in the
    order first read."""
    out: dict = {}

    def walk(g, scope: set):
        scope = scope | _defined(g)
        for n in g.node:
            for i in n.input:
                if i and i not in scope:
                    out.setdefault(i, None)
            for _, sg in _subgraphs(n):
                walk(sg, scope)
    walk(graph, set())
    return list(out)


def _holds_layers(graph) -> bool:
    return any(base_op(n) in SUPPORTED_OPS or any(_holds_layers(g) for _, g in _subgraphs(n)) for n in graph.node)


def defined_names(graph) -> set:
    """Every name ``graph`` defines, its subgraphs' at any depth included."""
    out = _defined(graph)
    for n in graph.node:
        for _, sg in _subgraphs(n):
            out |= defined_names(sg)
    return out


@dataclass
class Branch:
    """One branch of a top-level If, or the body of a top-level Loop or Scan, that holds layers."""

    node: str  # the node's name as the report calls it (layers.node_names)
    key: str  # the node's first output: finds it again in a rewritten model (node order changes)
    attr: str  # then_branch | else_branch | body
    cond: str  # the If's condition ("" for a body)
    graph: onnx.GraphProto
    reads: list = field(default_factory=list)  # outer names the subgraph reads
    op: str = "If"  # If | Loop | Scan
    # a body's own inputs (Loop: iteration number, condition, carried values; Scan: states, then the scan
    # inputs' slices) and the capture model's outputs that stack each over the iterations (with_iteration_outputs)
    formals: list = field(default_factory=list)
    stacked: list = field(default_factory=list)
    left: str = ""  # why its layers stay float, where they do (the report's reason)

    @property
    def where(self) -> str:
        """How messages name it: "If X, then_branch" / "Loop X, body"."""
        return f"{self.op} {self.node}, {self.attr}"


LOOP_OPS = ("Loop", "Scan")


def find_branches(model: onnx.ModelProto) -> list:
    """The branches of the model's top-level If nodes, and the bodies of its top-level Loop and Scan nodes, that
    hold a Conv, Gemm, MatMul or recurrent layer (at any depth). (Scan before opset 9 had a batch axis in front of
    its scan axis: its body stays float.)"""
    out = []
    opset = opset_of(model)
    for name, n in zip(node_names(model), model.graph.node):
        if n.op_type == "Scan" and opset < 9:
            continue
        if n.domain not in ("", "ai.onnx"):
            continue
        for attr, g in _subgraphs(n):
            if n.op_type == "If" and attr in ("then_branch", "else_branch") and _holds_layers(g):
                out.append(Branch(name, n.output[0], attr, n.input[0], g, free_names(g)))
            elif n.op_type in LOOP_OPS and attr == "body" and _holds_layers(g):
                out.append(Branch(name, n.output[0], attr, "", g, free_names(g), n.op_type,
                                  [i.name for i in g.input]))
    return out


def with_iteration_outputs(model: onnx.ModelProto, bodies: list) -> onnx.ModelProto:
    """A copy of ``model`` whose Loop and Scan nodes of ``bodies`` also output, as graph outputs, each of their
    body's tensor inputs stacked over the iterations (extra scan outputs: [iterations, *the input's shape]); sets
    each body's ``stacked`` to those outputs' names (None for an input that is not a tensor)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    taken = all_names(m.graph)
    nodes = {n.output[0]: n for n in m.graph.node if n.output}
    for b in bodies:
        node = nodes[b.key]
        body = next(a for a in node.attribute if a.name == "body").g
        b.stacked = []
        for i in list(body.input):
            if not i.type.HasField("tensor_type"):  # (a sequence carried from one iteration to the next: a list
                b.stacked.append(None)              # appended to; branch_model starts it empty)
                continue
            inner, outer = unique_name(f"{i.name}_iteration", taken), unique_name(f"{b.key}_{i.name}_stacked", taken)
            body.node.append(helper.make_node("Identity", [i.name], [inner]))
            elem = i.type.tensor_type.elem_type or onnx.TensorProto.FLOAT
            body.output.append(helper.make_tensor_value_info(inner, elem, None))
            node.output.append(outer)
            m.graph.output.append(helper.make_tensor_value_info(outer, elem, None))
            b.stacked.append(outer)
            for a in node.attribute:  # (Scan: each scan output's axis and direction, where given)
                if a.name in ("scan_output_axes", "scan_output_directions"):
                    a.ints.append(0)
    return m


def _rename_reads(graph, names: dict) -> None:
    """Rename the tensors of ``names`` where ``graph``'s nodes (and its subgraphs') read them."""
    for n in graph.node:
        n.input[:] = [names.get(i, i) for i in n.input]
        for _, sg in _subgraphs(n):
            _rename_reads(sg, names)
    for o in graph.output:
        o.name = names.get(o.name, o.name)


def _reads(graph) -> set:
    """The names ``graph``'s nodes read (its subgraphs' outer reads included) and its outputs."""
    out = {i for n in graph.node for i in n.input if i} | {o.name for o in graph.output}
    for n in graph.node:
        for _, sg in _subgraphs(n):
            out.update(free_names(sg))
    return out


def hoist_carried_constants(model: onnx.ModelProto) -> tuple:
    """(model, count): the values that a top-level Loop carries (or a Scan keeps as a state) through its body
    unchanged, starting from a top-level constant, become reads of that constant from the outer scope. tf2onnx's
    exports of TF2 code carry every ``tf.Variable`` a while loop reads (a Keras RNN's kernels) into the loop this way,
    so the body's MatMul reads its weight as a body input, not as a constant. A value whose final value is a graph
    output is left as it is. The model computes the same outputs."""
    if not any(n.op_type in LOOP_OPS for n in model.graph.node):
        return model, 0
    consts = outer_constants(model)
    outputs = {o.name for o in model.graph.output}
    opset = opset_of(model)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    count = 0
    for node in out.graph.node:
        if node.op_type not in LOOP_OPS or node.domain not in ("", "ai.onnx") or (node.op_type == "Scan" and opset < 9):
            continue
        body = next((a.g for a in node.attribute if a.name == "body"), None)
        if body is None:
            continue
        if node.op_type == "Loop":
            n, offsets = len(node.input) - 2, (2, 2, 1, 0)  # (node input, body input, body output, node output)
        else:
            scans = next((a.i for a in node.attribute if a.name == "num_scan_inputs"), 0)
            n, offsets = len(node.input) - scans, (0, 0, 0, 0)
        a, b, c, d = offsets
        if len(body.input) < b + n or len(body.output) < c + n:
            continue
        inside = defined_names(body)
        drop = []
        for k in range(n):
            init, formal, ret = node.input[a + k], body.input[b + k].name, body.output[c + k].name
            final = node.output[d + k] if d + k < len(node.output) else ""
            through = ret == formal or any(m.op_type == "Identity" and list(m.input) == [formal] and
                                           list(m.output) == [ret] for m in body.node)
            if init and init in consts and through and final not in outputs and init not in inside:
                drop.append((k, init, formal, ret, final))
        for k, init, formal, ret, final in reversed(drop):
            del body.output[c + k]
            del body.input[b + k]
            del node.input[a + k]
            if d + k < len(node.output):
                del node.output[d + k]
            for v in [v for v in body.value_info if v.name == formal]:
                body.value_info.remove(v)
            _rename_reads(body, {formal: init})
            if final:
                _rename_reads(out.graph, {final: init})
            if ret != formal and ret not in _reads(body):
                body.node.remove(next(m for m in body.node if list(m.output) == [ret]))
                for v in [v for v in body.value_info if v.name == ret]:
                    body.value_info.remove(v)
        count += len(drop)
    return (out if count else model), count


def outer_constants(model: onnx.ModelProto) -> set:
    """Top-level names whose values come from constants only (initializers, Constant nodes, arithmetic on them)."""
    inputs = {i.name for i in model.graph.input}
    return {k for k in _const_sources(model.graph, {}) if k not in inputs}


def branch_model(model: onnx.ModelProto, branch: Branch, first: dict, consts: dict) -> onnx.ModelProto:
    """The branch (or body) as a model: graph inputs for the outer tensors it reads (typed from ``first``, their
    values on one calibration batch, every axis free and named apart) after a body's own inputs, initializers for
    the outer constants it reads (``consts``: name -> array), outputs the subgraph's."""
    g = onnx.GraphProto()
    g.CopyFrom(branch.graph)
    g.name = f"{branch.node}/{branch.attr}"
    for i in list(g.input):  # a body's sequence input (TorchScript's list appended to at each iteration): made
        if i.type.HasField("sequence_type"):  # empty inside instead (splice takes the stand-in out again)
            g.input.remove(i)
            elem = i.type.sequence_type.elem_type.tensor_type.elem_type or onnx.TensorProto.FLOAT
            g.node.insert(0, helper.make_node("SequenceEmpty", [], [i.name], dtype=elem))
    for name in branch.reads:
        if name in consts:
            g.initializer.append(numpy_helper.from_array(np.asarray(consts[name]), name))
        else:
            v = np.asarray(first[name])
            g.input.append(helper.make_tensor_value_info(
                name, helper.np_dtype_to_tensor_dtype(v.dtype), [f"{name}_dim{k}" for k in range(v.ndim)]))
    return helper.make_model(g, opset_imports=list(model.opset_import), ir_version=max(model.ir_version, 4))


def _rename(graph, names: dict) -> None:
    """Rename the tensors of ``names`` wherever ``graph`` (and its subgraphs) defines or reads them."""
    for t in graph.initializer:
        t.name = names.get(t.name, t.name)
    for v in (*graph.input, *graph.output, *graph.value_info):
        v.name = names.get(v.name, v.name)
    for n in graph.node:
        n.input[:] = [names.get(i, i) for i in n.input]
        n.output[:] = [names.get(o, o) for o in n.output]
        for _, sg in _subgraphs(n):
            _rename(sg, names)


def all_names(graph) -> set:
    """Every tensor name ``graph`` and its subgraphs define or read."""
    out = _defined(graph) | {i for n in graph.node for i in n.input if i}
    for n in graph.node:
        for _, sg in _subgraphs(n):
            out |= all_names(sg)
    return out


def splice(out: onnx.ModelProto, branch: Branch, quantized: onnx.ModelProto, consts: dict) -> None:
    """Replace ``branch`` of the If, Loop or Scan in ``out`` (found by its first output) by the graph of
    ``quantized``, its quantized model, in place. The inputs that stood for outer tensors are outer names again (a
    body keeps its own); the constants copied in that it left as they were are read from the outer scope again;
    every name it defines anew (at any depth) that the rest of the model also uses is renamed (a subgraph may not
    redefine an outer name)."""
    node = next(n for n in out.graph.node if n.op_type == branch.op and n.output and n.output[0] == branch.key)
    attr = next(a for a in node.attribute if a.name == branch.attr)
    g = onnx.GraphProto()
    g.CopyFrom(quantized.graph)
    del g.input[:]
    g.input.extend(attr.g.input)
    for n in [n for n in g.node if n.op_type == "SequenceEmpty" and n.output[0] in branch.formals]:
        g.node.remove(n)  # (branch_model's stand-in for a sequence input)
    g.name = attr.g.name
    keep = []
    for t in g.initializer:  # a copied constant still there, unchanged: the outer one serves
        if t.name in consts and np.array_equal(numpy_helper.to_array(t), np.asarray(consts[t.name])):
            continue
        keep.append(t)
    del g.initializer[:]
    g.initializer.extend(keep)
    del g.output[:]
    g.output.extend(attr.g.output)
    del g.value_info[:]  # (the sub-model's shapes have free axes; onnxruntime infers them again)
    own = defined_names(attr.g)
    attr.g.CopyFrom(onnx.GraphProto())  # (the branch's own names are not outer names)
    taken = all_names(out.graph)
    clash = {t for t in defined_names(g) if t in taken and t not in own}
    taken |= all_names(g)
    _rename(g, {t: unique_name(t, taken) for t in sorted(clash)})
    attr.g.CopyFrom(g)


def drop_unread(out: onnx.ModelProto, candidates) -> None:
    """Remove the top-level initializers among ``candidates`` that nothing reads any more (float weights only the
    spliced branches read)."""
    read = _reads(out.graph)
    gone = [t for t in out.graph.initializer if t.name in set(candidates) and t.name not in read]
    for t in gone:
        out.graph.initializer.remove(t)
