"""Layers inside Loop and Scan bodies (onnxcomq/graph/branches.py): each body that holds layers is quantized as a
model of its own, calibrated on its own inputs at every iteration (captured as extra scan outputs of the float
model) and the outer tensors it reads, and spliced back."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import recipe
from onnx import TensorProto, helper, numpy_helper

from onnxcomq import pipeline, run
from onnxcomq.errors import UserError
from onnxcomq.graph.branches import find_branches, hoist_carried_constants, with_iteration_outputs

H = 6  # state width
T = 5  # iterations
MODELS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models")


def _mats(seed: int):
    rng = np.random.default_rng(seed)
    return ((rng.standard_normal((H, H)) * 0.5).astype(np.float32), (rng.standard_normal(H) * 0.1).astype(np.float32),
            (rng.standard_normal((H, H)) * 0.5).astype(np.float32))


def _info(name, t=TensorProto.FLOAT, shape=("N", H)):
    return helper.make_tensor_value_info(name, t, shape)


def _cell() -> list:
    """The recurrence's nodes, h_out = tanh(h_in W + b + xt U), shared by the Loop and the Scan body."""
    return [helper.make_node("MatMul", ["h_in", "W"], ["hw"], name="mm_h"),
            helper.make_node("MatMul", ["xt", "U"], ["xu"], name="mm_x"),
            helper.make_node("Add", ["hw", "b"], ["hb"]),
            helper.make_node("Add", ["hb", "xu"], ["pre"]),
            helper.make_node("Tanh", ["pre"], ["h_out"])]


def loop_model(W, b, U) -> onnx.ModelProto:
    """h_{t+1} = tanh(h_t W + b + x[t] U) over the T steps of x (T, N, H), a Loop with the trip count T; W and
    b are initializers of the body, U an initializer of the outer graph."""
    body = helper.make_graph([
        helper.make_node("Gather", ["x", "i"], ["xt"], axis=0, name="take"), *_cell(),
        helper.make_node("Identity", ["c_in"], ["c_out"]),
    ], "body", [_info("i", TensorProto.INT64, []), _info("c_in", TensorProto.BOOL, []), _info("h_in")],
        [_info("c_out", TensorProto.BOOL, []), _info("h_out")],
        [numpy_helper.from_array(W, "W"), numpy_helper.from_array(b, "b")])
    g = helper.make_graph([
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["trips"], axis=0),
        helper.make_node("Gather", ["x", "zero"], ["h0"], axis=0),
        helper.make_node("Loop", ["trips", "yes", "h0"], ["h"], body=body, name="steps"),
    ], "g", [_info("x", shape=["T", "N", H])], [_info("h", shape=["N", H])],
        [numpy_helper.from_array(U, "U"), numpy_helper.from_array(np.array(0, np.int64), "zero"),
         numpy_helper.from_array(np.array(True), "yes")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def scan_model(W, b, U) -> onnx.ModelProto:
    """The same recurrence as a Scan over x (axis 0), outputting every step's h; the body's weights outer."""
    body = helper.make_graph([*_cell(), helper.make_node("Identity", ["h_out"], ["y"])], "body",
                             [_info("h_in"), _info("xt")], [_info("h_out"), _info("y")])
    g = helper.make_graph([
        helper.make_node("Gather", ["x", "zero"], ["h0"], axis=0),
        helper.make_node("Scan", ["h0", "x"], ["h", "ys"], body=body, num_scan_inputs=1, name="steps",
                         scan_input_directions=[0], scan_output_directions=[0]),
    ], "g", [_info("x", shape=["T", "N", H])], [_info("ys", shape=["T", "N", H])],
        [numpy_helper.from_array(W, "W"), numpy_helper.from_array(b, "b"), numpy_helper.from_array(U, "U"),
         numpy_helper.from_array(np.array(0, np.int64), "zero")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _unroll(x, W, b, U):
    """float64 reference: the h each iteration starts from (the loop model's: h0 = x[0])."""
    h, hs = x[0].astype(np.float64), []
    for t in range(x.shape[0]):
        hs.append(h)
        h = np.tanh(h @ W + b + x[t] @ U)
    return hs, h


def _x(seed: int, n: int = 4) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((T, n, H)).astype(np.float32)


def _sess(m):
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("build", [loop_model, scan_model])
def test_body_inputs_are_stacked_over_the_iterations(build):
    """The capture model outputs each body input at every iteration: checked against a float64 unroll."""
    W, b, U = _mats(0)
    m = build(W, b, U)
    bodies = find_branches(m)
    assert [(x.op, x.attr) for x in bodies] == [("Loop" if build is loop_model else "Scan", "body")]
    cap = with_iteration_outputs(m, bodies)
    x = _x(1)
    outs = dict(zip([o.name for o in cap.graph.output], _sess(cap).run(None, {"x": x})))
    got = dict(zip(bodies[0].formals, (outs[n] for n in bodies[0].stacked)))
    hs, _ = _unroll(x, W, b, U)
    np.testing.assert_allclose(got["h_in"], np.stack(hs), atol=1e-5)
    if build is loop_model:
        assert got["i"].tolist() == list(range(T)) and got["c_in"].all()
    else:
        np.testing.assert_array_equal(got["xt"], x)
        node = next(n for n in cap.graph.node if n.op_type == "Scan")
        dirs = next(a for a in node.attribute if a.name == "scan_output_directions")
        assert list(dirs.ints) == [0, 0, 0]  # (one per scan output: the body's own, then the two stacked)
    # the original model's outputs are unchanged
    np.testing.assert_array_equal(outs[m.graph.output[0].name], _sess(m).run(None, {"x": x})[0])


def _body(model):
    node = next(n for n in model.graph.node if n.op_type in ("Loop", "Scan"))
    return next(a for a in node.attribute if a.name == "body").g


@pytest.mark.parametrize("build", [loop_model, scan_model])
def test_a_body_is_quantized_on_its_iterations_and_spliced_back(build):
    """Both MatMuls inside the body are quantized (DequantizeLinear inside the body, the outer float weights gone),
    each calibrated on every iteration's rows; the model keeps the body's inputs and runs close to float, closer
    than round-to-nearest on the same grid."""
    W, b, U = _mats(2)
    m = build(W, b, U)
    calib = {"x": np.concatenate([_x(s) for s in range(3, 7)], axis=1)}  # (T, 16, H)
    q, rep = run(m, calib, recipe(bits=4, batch_size=8))
    onnx.checker.check_model(q)
    names = sorted(L.node for L in rep.layers)
    assert names == ["steps/body/mm_h", "steps/body/mm_x"]
    assert all(L.rows == T * 16 for L in rep.layers)  # (every iteration of every sample)
    assert rep.samples == 16 and not [s for s in rep.skipped if s["op_type"] in ("Loop", "Scan")]
    body = _body(q)
    assert [i.name for i in body.input] == [i.name for i in _body(m).input]
    assert sum(n.op_type == "DequantizeLinear" for n in body.node) == 2
    assert not {"W", "U"} & {t.name for t in q.graph.initializer}
    rtn, _ = run(m, calib, recipe(bits=4, batch_size=8, method="rtn"))
    xe = _x(99, 32)
    f = _sess(m).run(None, {"x": xe})[0]
    err = np.linalg.norm(_sess(q).run(None, {"x": xe})[0] - f)
    assert err < 0.1 * np.linalg.norm(f)
    assert err < np.linalg.norm(_sess(rtn).run(None, {"x": xe})[0] - f)


def test_a_loop_inside_an_if_branch_is_quantized_by_the_branch_run():
    """The If branch's own run finds the Loop in it (recursion): the layers are named by both levels, and the model
    is the loop model's, quantized alike."""
    W, b, U = _mats(2)
    lm = loop_model(W, b, U)
    then = helper.make_graph(list(lm.graph.node), "then", [], [_info("h")])
    other = helper.make_graph([helper.make_node("Gather", ["x", "zero"], ["e"], axis=0)], "else", [], [_info("e")])
    g = helper.make_graph([
        helper.make_node("ReduceMean", ["x"], ["m"], keepdims=0),
        helper.make_node("Greater", ["m", "low"], ["c"]),
        helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other, name="pick")],
        "g", list(lm.graph.input), [_info("y")],
        list(lm.graph.initializer) + [numpy_helper.from_array(np.array(-100.0, np.float32), "low")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    calib = {"x": np.concatenate([_x(s) for s in range(3, 7)], axis=1)}
    q, rep = run(m, calib, recipe(bits=4, batch_size=8))
    assert sorted(L.node for L in rep.layers) == ["pick/then_branch/steps/body/mm_h",
                                                  "pick/then_branch/steps/body/mm_x"]
    assert all(L.rows == T * 16 for L in rep.layers)
    q_loop, _ = run(lm, calib, recipe(bits=4, batch_size=8))
    xe = _x(99, 32)
    np.testing.assert_array_equal(_sess(q).run(None, {"x": xe})[0], _sess(q_loop).run(None, {"x": xe})[0])


def test_at_most_the_set_iterations_per_batch_calibrate_a_body(monkeypatch):
    """A long loop is calibrated on ITERATIONS_PER_BATCH evenly spaced iterations per batch (the first and last
    included)."""
    monkeypatch.setattr(pipeline, "ITERATIONS_PER_BATCH", 2)
    W, b, U = _mats(3)
    _, rep = run(scan_model(W, b, U), {"x": _x(4, 8)}, recipe(bits=8, batch_size=8))
    assert all(L.rows == 2 * 8 for L in rep.layers)


def test_layer_patterns_name_body_layers_as_the_report_does():
    W, b, U = _mats(4)
    _, rep = run(loop_model(W, b, U), {"x": _x(5, 8)}, recipe(bits=4, keep_8bit=("steps/body/mm_x",)))
    assert {L.node: L.bits for L in rep.layers} == {"steps/body/mm_h": 4, "steps/body/mm_x": 8}
    with pytest.raises(UserError, match="matches no quantized layer"):
        run(loop_model(W, b, U), {"x": _x(5, 8)}, recipe(bits=4, keep_8bit=("mm_y",)))


def _growing_model(with_outer_layer: bool) -> onnx.ModelProto:
    """A Loop whose carried value grows every iteration (Concat), so its inputs cannot be stacked; optionally a
    MatMul outside it."""
    W = numpy_helper.from_array(_mats(5)[0], "W")
    body = helper.make_graph([
        helper.make_node("MatMul", ["h_in", "W"], ["mm"], name="mm"),
        helper.make_node("Tanh", ["mm"], ["h_out"]),
        helper.make_node("Concat", ["acc_in", "h_out"], ["acc_out"], axis=0),
        helper.make_node("Identity", ["c_in"], ["c_out"]),
    ], "body", [_info("i", TensorProto.INT64, []), _info("c_in", TensorProto.BOOL, []), _info("h_in"),
                _info("acc_in", shape=["M", H])], [_info("c_out", TensorProto.BOOL, []), _info("h_out"),
                                                   _info("acc_out", shape=["M", H])])
    nodes = [helper.make_node("Loop", ["n", "yes", "x", "x"], ["h", "acc"], body=body, name="grow")]
    outs = [_info("acc", shape=["M", H])]
    if with_outer_layer:
        nodes.append(helper.make_node("MatMul", ["h", "W"], ["y"], name="outer"))
        outs.append(_info("y"))
    g = helper.make_graph(nodes, "g", [_info("x", shape=["N", H])], outs, [
        W, numpy_helper.from_array(np.array(3, np.int64), "n"), numpy_helper.from_array(np.array(True), "yes")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_a_body_whose_inputs_change_shape_stays_float_and_the_report_says_why(caplog):
    x = {"x": np.random.default_rng(6).standard_normal((8, H)).astype(np.float32)}
    with caplog.at_level(logging.WARNING, logger="onnxcomq"):
        q, rep = run(_growing_model(True), x, recipe(bits=8))
    assert "Loop grow, body: its inputs could not be captured at each iteration" in caplog.text
    assert [L.node for L in rep.layers] == ["outer"]
    left = {s["node"]: s["reason"] for s in rep.skipped}
    assert left["grow/body/mm"].startswith("inside the body of Loop grow, whose inputs could not be captured")
    # (the body reads the outer W, now the quantized one: said so as for any tied weight)
    assert "weight W of outer is also read by Loop grow: it reads the quantized weight" in caplog.text
    assert [n.op_type for n in q.graph.node if "W" in n.output] == ["DequantizeLinear"]
    with pytest.raises(UserError, match=r"calibrated on no batch \(Loop grow body\)"):
        run(_growing_model(False), x, recipe(bits=8))


def test_a_body_that_fails_on_its_own_stays_float_and_the_rest_is_quantized(caplog):
    """A body that reads an element of a carried sequence: the body's run starts the sequence empty and fails, so
    the body stays float (a warning and the report say so); the top-level layer is quantized."""
    W = numpy_helper.from_array(_mats(7)[0], "W")
    seq_t = helper.make_tensor_sequence_value_info("s_in", TensorProto.FLOAT, ["N", H])
    body = helper.make_graph([
        helper.make_node("SequenceAt", ["s_in", "zero"], ["first"]),
        helper.make_node("MatMul", ["first", "W"], ["mm"], name="mm"),
        helper.make_node("Add", ["h_in", "mm"], ["h_out"]),
        helper.make_node("Identity", ["s_in"], ["s_out"]),
        helper.make_node("Identity", ["c_in"], ["c_out"]),
    ], "body", [_info("i", TensorProto.INT64, []), _info("c_in", TensorProto.BOOL, []), _info("h_in"), seq_t],
        [_info("c_out", TensorProto.BOOL, []), _info("h_out"),
         helper.make_tensor_sequence_value_info("s_out", TensorProto.FLOAT, ["N", H])])
    g = helper.make_graph([
        helper.make_node("SequenceConstruct", ["x"], ["s0"]),
        helper.make_node("Loop", ["n", "yes", "x", "s0"], ["h", "s"], body=body, name="steps"),
        helper.make_node("MatMul", ["h", "W"], ["y"], name="outer"),
    ], "g", [_info("x")], [_info("y")], [W, numpy_helper.from_array(np.array(3, np.int64), "n"),
                                          numpy_helper.from_array(np.array(True), "yes"),
                                          numpy_helper.from_array(np.array(0, np.int64), "zero")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    x = {"x": np.random.default_rng(8).standard_normal((8, H)).astype(np.float32)}
    with caplog.at_level(logging.WARNING, logger="onnxcomq"):
        q, rep = run(m, x, recipe(bits=8))
    assert "Loop steps, body: quantized on its own, it fails" in caplog.text
    assert [L.node for L in rep.layers] == ["outer"]
    assert {s["node"]: s["reason"] for s in rep.skipped}["steps/body/mm"] == \
        "inside the body of Loop steps, which failed to run on its own: left float"
    f = _sess(m).run(None, x)[0]
    assert np.linalg.norm(_sess(q).run(None, x)[0] - f) < 0.02 * np.linalg.norm(f)


CELL = """
import sys
import torch


class Cell(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = torch.nn.Linear(8, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 4)
"""

LOOP_EXPORT = CELL + """

class M(Cell):
    def forward(self, x):  # x: (T, N, 8)
        h = torch.zeros(x.shape[1], 16)
        outs: list[torch.Tensor] = []
        for t in range(x.shape[0]):
            h = torch.tanh(self.a(x[t]) + self.b(h))
            outs.append(h)
        return self.head(torch.stack(outs))


torch.manual_seed(0)
torch.onnx.export(torch.jit.script(M().eval()), (torch.randn(int(sys.argv[2]), 2, 8),), sys.argv[1], dynamo=False,
                  input_names=["x"], dynamic_axes={"x": {0: "T", 1: "N"}})
"""

SCAN_EXPORT = CELL + """
from torch._higher_order_ops.scan import scan


class M(Cell):
    def forward(self, x):  # x: (T, 2, 8)
        def step(h, xt):
            h2 = torch.tanh(self.a(xt) + self.b(h))
            return h2, h2.clone()
        h, _ = scan(step, torch.zeros(2, 16), x)
        return self.head(h)


torch.manual_seed(0)
torch.onnx.export(M().eval(), (torch.randn(int(sys.argv[2]), 2, 8),), sys.argv[1], dynamo=True, verbose=False)
"""


def _export(script: str, path: str) -> None:
    """Run a torch export in a process of its own: the exporters leave objects for the cycle collector (the dynamo
    exporter's ctypes types) and memory behind, which later tests of the solver's cycles and of memory budgets
    would count."""
    pytest.importorskip("torch", reason="torch (tools/test.sh installs it)")
    file = os.path.join(os.path.dirname(path), "export.py")  # (TorchScript reads the source of what it scripts)
    with open(file, "w") as f:
        f.write(script)
    done = subprocess.run([sys.executable, file, path, str(T)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_torchscript_loop_exported_by_torch_onnx(tmp_path):
    """A real exporter's Loop: a scripted for loop over time, exported by torch.onnx's TorchScript exporter; the
    body reads the graph input and the weights from the outer scope, and appends each step's state to a list (a
    sequence carried by the Loop, which cannot be stacked: the body's run starts it empty)."""
    path = str(tmp_path / "loop.onnx")
    _export(LOOP_EXPORT, path)
    body = _body(onnx.load(path))
    assert [i.type.WhichOneof("value") for i in body.input][-1] == "sequence_type"
    q = _check_torch_export(path, "Loop")
    assert "sequence_type" in [i.type.WhichOneof("value") for i in _body(q).input]


def test_torch_scan_exported_by_torch_onnx_dynamo(tmp_path):
    """A real exporter's Scan: torch's scan (torch._higher_order_ops) exported by torch.onnx's dynamo exporter."""
    pytest.importorskip("onnxscript", reason="torch.onnx's dynamo exporter needs onnxscript")
    path = str(tmp_path / "scan.onnx")
    _export(SCAN_EXPORT, path)
    _check_torch_export(path, "Scan")


def _check_torch_export(path: str, op: str):
    m = onnx.load(path)
    loops = [n for n in m.graph.node if n.op_type == op]
    assert len(loops) == 1
    n = 2 if op == "Scan" else 6  # (the dynamo export has the batch of its example input)
    rng = np.random.default_rng(7)
    calib = [{"x": rng.standard_normal((T, n, 8)).astype(np.float32)} for _ in range(16)]
    q, rep = run(path, calib, recipe(bits=4))
    inside = sorted(L.node for L in rep.layers if L.node.startswith(f"{loops[0].name}/body/"))
    assert len(inside) == 2 and len(rep.layers) == 3  # (the head too)
    xe = rng.standard_normal((T, n, 8)).astype(np.float32)
    f = _sess(m).run(None, {"x": xe})[0]
    y = _sess(q).run(None, {"x": xe})[0]
    assert np.linalg.norm(y - f) < 0.1 * np.linalg.norm(f)
    return q


def carried_weights_model(nested: bool = False) -> onnx.ModelProto:
    """tf2onnx's way: the Loop carries its weights W (through an Identity) and b (returned as it came) through the
    body unchanged; g, also passed through, starts from the graph input (not a constant); k, passed through, is a
    graph output; h is the state. ``nested``: the Tanh inside an If in the body (always taken)."""
    W, b, _ = _mats(9)
    tanh = helper.make_node("Tanh", ["hg"], ["h_out"])
    if nested:
        tanh = helper.make_node("If", ["c_in"], ["h_out"], then_branch=helper.make_graph(
            [helper.make_node("Tanh", ["hg"], ["t"])], "then", [], [_info("t")]), else_branch=helper.make_graph(
            [helper.make_node("Identity", ["hg"], ["e"])], "else", [], [_info("e")]))
    body = helper.make_graph([
        helper.make_node("MatMul", ["h_in", "W_in"], ["hw"], name="mm"),
        helper.make_node("Add", ["hw", "b_in"], ["hb"]),
        helper.make_node("Mul", ["hb", "g_in"], ["hg"]),
        tanh,
        helper.make_node("Identity", ["W_in"], ["W_out"]),
        helper.make_node("Identity", ["g_in"], ["g_out"]),
        helper.make_node("Identity", ["k_in"], ["k_out"]),
        helper.make_node("Identity", ["c_in"], ["c_out"]),
    ], "body", [_info("i", TensorProto.INT64, []), _info("c_in", TensorProto.BOOL, []), _info("h_in"),
                _info("W_in", shape=[H, H]), _info("b_in", shape=[H]), _info("g_in"), _info("k_in", shape=[H])],
        [_info("c_out", TensorProto.BOOL, []), _info("h_out"), _info("W_out", shape=[H, H]), _info("b_in", shape=[H]),
         _info("g_out"), _info("k_out", shape=[H])])
    g = helper.make_graph([
        helper.make_node("Loop", ["n", "yes", "x", "W", "b", "x", "k"], ["h", "W_final", "b_final", "g_final", "kf"],
                         body=body, name="rnn"),
        helper.make_node("Add", ["h", "b_final"], ["y"]),
    ], "g", [_info("x")], [_info("y"), _info("kf", shape=[H])],
        [numpy_helper.from_array(W, "W"), numpy_helper.from_array(b, "b"),
         numpy_helper.from_array(np.ones(H, np.float32), "k"),
         numpy_helper.from_array(np.array(4, np.int64), "n"), numpy_helper.from_array(np.array(True), "yes")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("nested", [False, True])
def test_constants_carried_through_a_body_unchanged_are_read_from_the_outer_scope(nested):
    """W and b become outer reads (the Loop loses those two carried values, the top-level read of b's final value
    reads b); g (not a constant) and k (a graph output) stay carried; the outputs are unchanged."""
    m = carried_weights_model(nested)
    onnx.checker.check_model(m, full_check=True)
    h, count = hoist_carried_constants(m)
    assert count == 2
    onnx.checker.check_model(h, full_check=True)
    loop = next(n for n in h.graph.node if n.op_type == "Loop")
    assert list(loop.input) == ["n", "yes", "x", "x", "k"] and list(loop.output) == ["h", "g_final", "kf"]
    body = _body(h)
    assert [i.name for i in body.input] == ["i", "c_in", "h_in", "g_in", "k_in"]
    mm = next(n for n in body.node if n.name == "mm")
    assert list(mm.input) == ["h_in", "W"] and "W_out" not in {o for n in body.node for o in n.output}
    assert next(n for n in h.graph.node if n.op_type == "Add").input[1] == "b"
    x = {"x": np.random.default_rng(10).standard_normal((4, H)).astype(np.float32)}
    for a, b in zip(_sess(m).run(None, x), _sess(h).run(None, x)):
        np.testing.assert_array_equal(a, b)
    q, rep = run(m, x, recipe(bits=8))
    assert [L.node for L in rep.layers] == ["rnn/body/mm"]


@pytest.mark.parametrize("name, feed, inside", [("tf_simplernn_loop", "x", 2), ("tf1_rnn_scan", "x:0", 2)])
def test_tf2onnx_recurrent_exports_quantize_their_loop_layers(name, feed, inside):
    """Real tf2onnx exports (tools/export/keras_loops.py): a Keras SimpleRNN, whose Loop carries its kernels as loop
    values, and a TF1 dynamic_rnn, a Scan reading the outer weights: every MatMul in the body is quantized on every
    step's rows, and the model is closer to float than round-to-nearest on other inputs."""
    path = os.path.join(MODELS, f"{name}.onnx")
    rng = np.random.default_rng(11)
    calib = {feed: rng.standard_normal((32, 16, 8)).astype(np.float32)}
    q, rep = run(path, calib, recipe(bits=4))
    loops = [L for L in rep.layers if "/body/" in L.node]
    assert len(loops) == inside and all(L.rows == 32 * 16 for L in loops)
    rtn, _ = run(path, calib, recipe(bits=4, method="rtn"))
    xe = {feed: rng.standard_normal((64, 16, 8)).astype(np.float32)}
    f = _sess(onnx.load(path)).run(None, xe)[0]
    err = np.linalg.norm(_sess(q).run(None, xe)[0] - f) / np.linalg.norm(f)
    assert err < 0.2 and err < np.linalg.norm(_sess(rtn).run(None, xe)[0] - f) / np.linalg.norm(f)


def test_the_cli_quantizes_a_scan_model_and_counts_its_sample_iterations(tmp_path, capsys):
    """CLI end to end on the shipped TF1 Scan export: the report lists the body's layers, the progress lines of the
    body's run count sample-iterations (16 steps of 8 samples), the summary the calibration samples."""
    import json

    from onnxcomq.cli import main

    np.savez(tmp_path / "c.npz", **{"x:0": np.random.default_rng(12).standard_normal((8, 16, 8)).astype(np.float32)})
    out, js = tmp_path / "q.onnx", tmp_path / "r.json"
    assert main(["quantize", os.path.join(MODELS, "tf1_rnn_scan.onnx"), "-o", str(out), "--calib",
                 str(tmp_path / "c.npz"), "--bits", "4", "--report", str(js)]) == 0
    said = capsys.readouterr()
    assert "128/128 sample-iterations" in said.err and "with 8 calibration samples" in said.err + said.out
    rows = json.loads(js.read_text())["layers"]
    assert len(rows) == 2 and all("/body/" in r["node"] and r["rows"] == 128 for r in rows)
    onnx.checker.check_model(onnx.load(str(out)))
