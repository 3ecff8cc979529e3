"""Group passes that start where the earlier passes stopped (docs/design.md, "Groups").

Without sequential capture every group of layers reads the float model, so a group's pass need not run the model
from its inputs again: the earlier passes leave, for each calibration batch, the tensors that later groups read from
the part of the graph already run (a decoder's hidden state between blocks), in a temporary folder, and a group's
pass runs only the nodes between those tensors and its layers' inputs. A decoder in N groups then costs one pass
over the model instead of about N/2, and each group's session holds only its own weights.

Nodes that no weighted op (Conv, MatMul, Gemm, ...) feeds, directly or through other nodes, are cheap: masks,
position tables, shapes. They are run again by every pass that needs them instead of being stored (a decoder's
causal mask alone is batch x seq x seq floats).
"""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import onnx

from ..errors import UserError
from .gram import to_host
from .rows import spec_tensors

# ops whose outputs are worth storing rather than recomputing: the layers, and anything built from their outputs
HEAVY_OPS = {"Conv", "ConvTranspose", "ConvInteger", "MatMul", "MatMulInteger", "Gemm", "Einsum", "LSTM", "GRU",
             "RNN", "Attention", "MultiHeadAttention", "GroupQueryAttention", "MatMulNBits", "QLinearConv",
             "QLinearMatMul"}


def _walk(nodes, producer: dict, fetch, stop) -> tuple[set, set]:
    """The nodes ``fetch`` depends on, not going past a node for which ``stop(i)`` holds: (nodes, the tensors met
    at such nodes)."""
    need, cut, seen, stack = set(), set(), set(), list(fetch)
    while stack:
        t = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        i = producer.get(t)
        if i is None:  # a graph input or an initializer
            continue
        if stop(i):
            cut.add(t)
            continue
        if i not in need:
            need.add(i)
            stack.extend(x for x in nodes[i].input if x)
    return need, cut


def plan(model: onnx.ModelProto, fetches: list, twin: bool = False) -> tuple[list, list]:
    """For each group's list of fetched tensors (in pass order): the tensors its pass reads from earlier passes,
    and those it must store for later groups. Returns (inputs per group, outputs per group).

    ``twin``: the plan for the partly quantized twin of sequential capture, whose group g has the layers of the
    groups before g quantized. A tensor that the float plan's pass h computes depends on no layer after group h, so
    its twin value is final from twin pass h + 1 on: twin pass g runs the float plan's nodes of groups g - 1 and g,
    from what twin passes before g stored."""
    nodes = model.graph.node
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    heavy = set()  # nodes with a weighted op at or above them
    for i, n in enumerate(nodes):  # (graph order is topological)
        if n.op_type in HEAVY_OPS or any(producer.get(x) in heavy for x in n.input if x):
            heavy.add(i)
    group = {}  # heavy node -> the group whose float pass runs it
    ran = []
    for g, fetch in enumerate(fetches):
        need, _ = _walk(nodes, producer, fetch, lambda i: i in group)
        ran.append(need)
        group.update((i, g) for i in need & heavy)
    n = len(fetches)
    if not twin:
        inputs = [sorted(_walk(nodes, producer, fetches[g], lambda i: group.get(i, g) < g)[1]) for g in range(n)]
        outputs = [sorted({t for later in inputs[g + 1:] for t in later if producer[t] in ran[g]})
                   for g in range(n)]
        return inputs, outputs
    inputs, outputs = [[] for _ in range(n)], [[] for _ in range(n)]
    for g in range(n - 1, 0, -1):  # (a pass's outputs are what later passes read: last group first)
        outputs[g] = sorted({t for later in inputs[g + 1:] for t in later if group[producer[t]] == g - 1})
        inputs[g] = sorted(_walk(nodes, producer, list(fetches[g]) + outputs[g],
                                 lambda i: group.get(i, g) < g - 1)[1])
    return inputs, outputs


def has_subgraphs(model: onnx.ModelProto) -> bool:
    """Whether a node carries a subgraph (If, Loop, Scan): those read outer names implicitly, so a cut-down
    graph keeps every node and a pass cannot start from stored tensors."""
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for n in model.graph.node for a in n.attribute)


class Carry:
    """The stored tensors of the group passes of one run, for the float model or (``twin``) the partly quantized
    twin of sequential capture. ``fetches``: each group's fetched tensors, in order. Group g's pass reads
    ``inputs[g]`` (``load``) and stores ``outputs[g]`` (``store``), batch by batch; ``done(g)`` after it, and
    ``close()`` at the end of the run removes the folder."""

    def __init__(self, model: onnx.ModelProto, fetches: list, twin: bool = False):
        self.inputs, self.outputs = plan(model, fetches, twin)
        self.twin = twin
        self.last_use = {}
        for g, names in enumerate(self.inputs):
            for t in names:
                self.last_use[t] = g
        self.types = {}  # name -> (dtype, ndim), from the stored arrays
        self.folder = None
        self.files = {}  # (group, batch) -> path of the .npz its pass stored

    @classmethod
    def for_groups(cls, model: onnx.ModelProto, group_specs: list, twin: bool = False):
        """A Carry for the groups whose XSpecs are ``group_specs`` (one iterable per group, in order), or None
        where passes cannot start from stored tensors (one group; a node with a subgraph)."""
        if len(group_specs) < 2 or has_subgraphs(model):
            return None
        return cls(model, [sorted({t for spec in specs for t in spec_tensors(spec)}) for specs in group_specs], twin)

    def value_infos(self, g: int) -> list:
        """Graph inputs for group g's stored tensors (element type and rank of the stored arrays)."""
        return [onnx.helper.make_tensor_value_info(
            t, onnx.helper.np_dtype_to_tensor_dtype(self.types[t][0]), [None] * self.types[t][1])
            for t in self.inputs[g]]

    def load(self, g: int, batch: int) -> dict:
        """The stored tensors group g reads, for one batch."""
        out = {}
        for h in range(g):
            want = [(k, t) for k, t in enumerate(self.outputs[h]) if t in self.inputs[g]]
            if want:
                with np.load(self.files[(h, batch)], allow_pickle=False) as z:
                    out.update({t: z[f"t{k}"] for k, t in want})
        return out

    def store(self, g: int, batch: int, values: dict) -> None:
        """Keep group g's tensors for later groups, for one batch."""
        if not self.outputs[g]:
            return
        # (np.asarray, not ascontiguousarray: that makes a 0-d array, e.g. a dimension from Shape -> Gather, 1-d)
        arrays = [np.asarray(to_host(values[t]), order="C") for t in self.outputs[g]]
        for t, a in zip(self.outputs[g], arrays):
            self.types[t] = (a.dtype, a.ndim)
        try:
            if self.folder is None:
                self.folder = tempfile.mkdtemp(prefix="onnxcomq-carry-twin-" if self.twin else "onnxcomq-carry-")
            path = os.path.join(self.folder, f"{g}-{batch}.npz")
            self.files[(g, batch)] = path  # (before the write: close() removes a partial file with the folder)
            np.savez(path, **{f"t{k}": a for k, a in enumerate(arrays)})
        except OSError as e:
            size = sum(a.nbytes for a in arrays)
            raise UserError(f"cannot store the tensors that later groups of layers read ({size} bytes a batch) in "
                            f"{self.folder or tempfile.gettempdir()}: {e.strerror or e}; free space there or point "
                            "TMPDIR elsewhere") from None

    def done(self, g: int) -> None:
        """Group g's pass is over: remove what no later group reads."""
        for (h, b), path in list(self.files.items()):
            if all(self.last_use.get(t, -1) <= g for t in self.outputs[h]):
                os.remove(path)
                del self.files[(h, b)]

    def close(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None
        self.files = {}
