"""Layers inside If branches (onnxcomq/graph/branches.py): each branch that calibration batches take is quantized as
a model of its own, on the outer tensors it reads, and spliced back; a branch no batch takes stays as it was."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import recipe
from onnx import TensorProto, helper, numpy_helper

from onnxcomq import run
from onnxcomq.cli import main
from onnxcomq.errors import UserError
from onnxcomq.graph.branches import free_names

C = 4  # channels
S = ["N", C, 6, 6]  # (the shape of every activation of model_with_branches)


def _w(seed: int, shape=(C, C, 3, 3)) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * 0.3).astype(np.float32)


def _info(name, shape=None, t=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, t, shape)


def _cond_nodes() -> list:
    """cond = mean(x) > 0 (one value per batch, as an If needs); flag = mean(x) < 100 (always true)."""
    zero = numpy_helper.from_array(np.array(0.0, np.float32), "zero_v")
    big = numpy_helper.from_array(np.array(100.0, np.float32), "big_v")
    return [helper.make_node("Constant", [], ["zero"], value=zero),
            helper.make_node("Constant", [], ["big"], value=big),
            helper.make_node("ReduceMean", ["x"], ["mean"], keepdims=0, name="mean"),
            helper.make_node("Greater", ["mean", "zero"], ["cond"], name="is_positive"),
            helper.make_node("Less", ["mean", "big"], ["flag"], name="is_small")]


def model_with_branches() -> onnx.ModelProto:
    """x -> Conv(W0) -> Relu -> a; If(mean(x) > 0): then Conv(a, Wt1: an outer initializer) -> Relu -> r, and an If
    nested in it (on flag) whose then branch is Conv(r, Wt2: a Constant node inside it) -> Conv(W0); else Conv(a, W0):
    W0 is read at three depths and quantized in each (no copy may take an outer name: W0, W0_quantized, ...)."""
    inner_then = helper.make_graph([
        helper.make_node("Constant", [], ["Wt2"], value=numpy_helper.from_array(_w(3), "Wt2_v")),
        helper.make_node("Conv", ["r", "Wt2"], ["o1"], name="conv_t2", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["o1", "W0"], ["o"], name="conv_t3", pads=[1, 1, 1, 1])],
        "inner_then", [], [_info("o", S)])
    inner_else = helper.make_graph([helper.make_node("Identity", ["r"], ["o2"])], "inner_else", [], [_info("o2", S)])
    then_g = helper.make_graph([
        helper.make_node("Conv", ["a", "Wt1"], ["t1"], name="conv_t1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["t1"], ["r"]),
        helper.make_node("If", ["flag"], ["inner"], name="inner_if", then_branch=inner_then, else_branch=inner_else),
    ], "then", [], [_info("inner", S)])
    else_g = helper.make_graph([helper.make_node("Conv", ["a", "W0"], ["e"], name="conv_e", pads=[1, 1, 1, 1])],
                               "else", [], [_info("e", S)])
    nodes = _cond_nodes() + [
        helper.make_node("Conv", ["x", "W0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["a"]),
        helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_g, else_branch=else_g)]
    g = helper.make_graph(nodes, "g", [_info("x", ["N", C, 6, 6])], [_info("y", S)],
                          [numpy_helper.from_array(_w(0), "W0"), numpy_helper.from_array(_w(1), "Wt1")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def feeds(signs, n: int = 8, seed: int = 0) -> list:
    """One batch of ``n`` samples per sign: inputs whose mean has that sign (which picks the If's branch)."""
    rng = np.random.default_rng(seed)
    return [{"x": (rng.standard_normal((n, C, 6, 6)) + 0.5 * s).astype(np.float32)} for s in signs]


def infer(model, x):
    src = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(src, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _branch(model, attr: str, node: str = "branch") -> onnx.GraphProto:
    n = next(n for n in model.graph.node if n.name == node)
    return next(a.g for a in n.attribute if a.name == attr)


def _dequantized(graph: onnx.GraphProto, layer: str) -> np.ndarray:
    """The weight that node ``layer`` of ``graph`` reads, computed by its DequantizeLinear from the graph's codes."""
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    conv = next(n for n in graph.node if n.name == layer)
    dq = next(n for n in graph.node if n.op_type == "DequantizeLinear" and n.output[0] == conv.input[1])
    q, s, z = (inits[i].astype(np.float64) for i in dq.input)
    shape = [-1] + [1] * (q.ndim - 1)
    return (q - z.reshape(shape)) * s.reshape(shape)


def test_free_names_are_the_outer_tensors_a_branch_reads_at_any_depth():
    then_g = _branch(model_with_branches(), "then_branch")
    assert free_names(then_g) == ["a", "Wt1", "flag", "W0"]  # (r, Wt2, o: defined inside, the nested If's too)


def test_each_branch_is_quantized_as_a_model_of_its_own_and_spliced_back():
    m = model_with_branches()
    before = m.SerializeToString()
    r = recipe(bits=4, batch_size=8)
    batches = feeds([1, -1, 1, -1, 1, -1])
    q, rep = run(m, (b for b in batches), r)  # (a one-shot source: read once for the branches, again for conv0)
    assert m.SerializeToString() == before  # (the caller's model, branches included, untouched)
    onnx.checker.check_model(q, full_check=True)
    names = {L.node for L in rep.layers}
    assert names == {"conv0", "branch/then_branch/conv_t1", "branch/then_branch/inner_if/then_branch/conv_t2",
                     "branch/then_branch/inner_if/then_branch/conv_t3", "branch/else_branch/conv_e"}
    assert not rep.skipped  # (the Ifs hold no weight of their own once their branches are quantized)
    # the then branch is quantized as the model [a -> conv_t1 -> Relu -> inner If] is, on the float model's a of
    # the batches that take it (a model built here by hand, its input a computed by onnxruntime)
    pre = helper.make_model(helper.make_graph(m.graph.node[:-1], "pre", [_info("x", ["N", C, 6, 6])],
                                              [_info("a"), _info("flag", t=TensorProto.BOOL)], m.graph.initializer),
                            opset_imports=m.opset_import, ir_version=8)
    sess = ort.InferenceSession(pre.SerializeToString(), providers=["CPUExecutionProvider"])
    then_feeds = [dict(zip(("a", "flag"), sess.run(None, b))) for b in batches[::2]]
    then_g = _branch(m, "then_branch")
    alone = helper.make_model(helper.make_graph(
        then_g.node, "alone", [_info("a", ["N", C, 6, 6]), _info("flag", [], TensorProto.BOOL)], then_g.output,
        [numpy_helper.from_array(_w(1), "Wt1"), numpy_helper.from_array(_w(0), "W0")]), opset_imports=m.opset_import,
        ir_version=8)
    qa, rep_a = run(alone, then_feeds, r)
    got_then = _branch(q, "then_branch")
    np.testing.assert_array_equal(_dequantized(got_then, "conv_t1"), _dequantized(qa.graph, "conv_t1"))
    inner = next(a.g for n in got_then.node if n.name == "inner_if" for a in n.attribute if a.name == "then_branch")
    np.testing.assert_array_equal(_dequantized(inner, "conv_t2"), _dequantized(
        next(a.g for n in qa.graph.node if n.name == "inner_if" for a in n.attribute if a.name == "then_branch"),
        "conv_t2"))
    assert np.abs(_dequantized(inner, "conv_t2") - _w(3)).max() < 0.2 * np.abs(_w(3)).max()
    # W0: the top-level DequantizeLinear defines it; the else branch's own quantized copy is renamed
    top_dq = [n.output[0] for n in q.graph.node if n.op_type == "DequantizeLinear"]
    assert top_dq == ["W0"]
    got_else = _branch(q, "else_branch")
    conv_e = next(n for n in got_else.node if n.name == "conv_e")
    assert conv_e.input[1] != "W0" and any(n.output[0] == conv_e.input[1] for n in got_else.node
                                           if n.op_type == "DequantizeLinear")
    # Wt1 was read by the then branch only: its float copy is gone from the top level
    assert {t.name for t in q.graph.initializer} & {"W0", "Wt1"} == set()
    # on held-out inputs, each path as close to float as the same chain of convs without an If, quantized in one
    # pass (the branches are solved from the float model's tensors): measured 0.152 and 0.155 (then path)
    w = {"W0": _w(0), "Wt1": _w(1), "Wt2": _w(3)}
    for sign, chain in ((1, [("W0", True), ("Wt1", True), ("Wt2", False), ("W0", False)]),
                        (-1, [("W0", True), ("W0", False)])):
        nodes, t = [], "x"
        for k, (wname, relu) in enumerate(chain):
            nodes.append(helper.make_node("Conv", [t, wname], [f"c{k}"], name=f"conv{k}", pads=[1, 1, 1, 1]))
            t = f"c{k}"
            if relu:
                nodes.append(helper.make_node("Relu", [t], [f"r{k}"]))
                t = f"r{k}"
        flat = helper.make_model(helper.make_graph(
            nodes, "flat", [_info("x", ["N", C, 6, 6])], [_info(t)], [numpy_helper.from_array(v, k)
                                                                     for k, v in w.items()]),
            opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        qf, _ = run(flat, [b for b in batches if (b["x"].mean() > 0) == (sign > 0)], recipe(bits=4, batch_size=8))
        x = feeds([sign], 16, seed=5)[0]["x"]
        f = infer(m, x)
        np.testing.assert_allclose(infer(flat, x), f, rtol=1e-5, atol=1e-5)  # (the same function)
        err, err_flat = (np.linalg.norm(infer(model, x) - f) / np.linalg.norm(f) for model in (q, qf))
        assert 0 < err < 1.1 * err_flat + 1e-3, (sign, err, err_flat)


def test_a_branch_no_batch_takes_stays_float_and_the_report_says_why(tmp_path, caplog):
    """Every layer inside an If (silero-vad's default export): no top-level layer, only positive batches."""
    then_g = helper.make_graph([helper.make_node("Conv", ["x", "Wa"], ["ya"], name="conv_a")], "then", [],
                               [_info("ya")])
    else_g = helper.make_graph([helper.make_node("Conv", ["x", "Wb"], ["yb"], name="conv_b")], "else", [],
                               [_info("yb")])
    g = helper.make_graph(_cond_nodes() + [
        helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_g, else_branch=else_g)],
        "g", [_info("x", ["N", C, 6, 6])], [_info("y")],
        [numpy_helper.from_array(_w(7, (8, C, 3, 3)), "Wa"), numpy_helper.from_array(_w(8, (8, C, 3, 3)), "Wb")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    src, out, js = tmp_path / "m.onnx", tmp_path / "q.onnx", tmp_path / "r.json"
    onnx.save(m, src)
    before = src.read_bytes()
    np.savez(tmp_path / "c.npz", x=np.concatenate([b["x"] for b in feeds([1, 1, 1, 1])]))
    assert main(["quantize", str(src), "-o", str(out), "--calib", str(tmp_path / "c.npz"), "--bits", "4",
                 "--report", str(js)]) == 0
    assert src.read_bytes() == before
    q = onnx.load(out)
    onnx.checker.check_model(q, full_check=True)
    # (the opset conversion for int4 may add the branch output's shape; its nodes are the float model's)
    assert list(_branch(q, "else_branch").node) == list(else_g.node) and not _branch(q, "else_branch").initializer
    assert {t.name for t in q.graph.initializer} == {"Wb"}
    assert any(n.op_type == "DequantizeLinear" for n in _branch(q, "then_branch").node)
    neg = feeds([-1], 4, seed=9)[0]["x"]
    np.testing.assert_array_equal(infer(str(out), neg), infer(m, neg))  # (the else path is the float model's)
    pos = feeds([1], 4, seed=9)[0]["x"]
    assert np.linalg.norm(infer(str(out), pos) - infer(m, pos)) < 0.15 * np.linalg.norm(infer(m, pos))
    rep = json.loads(js.read_text())
    assert [L["node"] for L in rep["layers"]] == ["branch/then_branch/conv_a"]
    left = {s["node"]: s for s in rep["skipped"]}
    assert "no calibration batch took" in left["branch/else_branch/conv_b"]["reason"]
    assert left["branch/else_branch/conv_b"]["share"] == pytest.approx(0.5, abs=0.01)  # (the 2 scalars too)
    assert rep["verification"]["outputs"][0]["cosine"] > 0.99
    assert any("else_branch was taken on none" in r.getMessage() for r in caplog.records)


def test_layer_patterns_name_branch_layers_as_the_report_does():
    """--exclude and layer_bits with the report's names (If/branch/node) reach the layers inside the branches."""
    r = recipe(bits=4, batch_size=8).updated({"layers": {"exclude": ["branch/then_branch/conv_t1"],
                                                         "layer_bits": ["branch/else_branch/conv_e=8"]}})
    q, rep = run(model_with_branches(), feeds([1, -1, 1, -1]), r)
    bits = {L.node: L.bits for L in rep.layers}
    assert bits == {"conv0": 4, "branch/then_branch/inner_if/then_branch/conv_t2": 4,
                    "branch/then_branch/inner_if/then_branch/conv_t3": 4, "branch/else_branch/conv_e": 8}
    left = {s["node"]: s["reason"] for s in rep.skipped}
    assert "excluded" in left["branch/then_branch/conv_t1"]
    then_g = _branch(q, "then_branch")
    assert next(n for n in then_g.node if n.name == "conv_t1").input[1] == "Wt1"  # (the float outer weight)
    assert "Wt1" in {t.name for t in q.graph.initializer}
    with pytest.raises(UserError, match="'nowhere' matches no quantized layer"):
        run(model_with_branches(), feeds([1, -1]), recipe(bits=4, batch_size=8).updated(
            {"layers": {"layer_bits": ["nowhere=8"]}}))


def test_an_if_of_no_quantizable_layer_is_left_as_it_is_and_a_model_of_nothing_quantized_is_refused():
    # the then branch multiplies two activations (attention-like): a MatMul, but no weight to quantize
    then_g = helper.make_graph([helper.make_node("Transpose", ["a"], ["aT"], perm=[0, 1, 3, 2]),
                                helper.make_node("MatMul", ["a", "aT"], ["t"], name="act_mm")], "then", [],
                               [_info("t")])
    else_g = helper.make_graph([helper.make_node("Identity", ["a"], ["e"])], "else", [], [_info("e")])
    nodes = _cond_nodes() + [
        helper.make_node("Conv", ["x", "W0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["a"]),
        helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_g, else_branch=else_g)]
    g = helper.make_graph(nodes, "g", [_info("x", ["N", C, 6, 6])], [_info("y")],
                          [numpy_helper.from_array(_w(0), "W0")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    q, rep = run(m, feeds([1, -1]), recipe(bits=4, batch_size=8))
    assert [L.node for L in rep.layers] == ["conv0"]
    assert list(_branch(q, "then_branch").node) == list(then_g.node)
    # every layer in a branch that no batch takes: nothing would be quantized
    only = helper.make_graph(_cond_nodes() + [helper.make_node(
        "If", ["cond"], ["y"], name="branch", then_branch=helper.make_graph(
            [helper.make_node("Conv", ["x", "W0"], ["t"], name="conv_t", pads=[1, 1, 1, 1])], "then", [],
            [_info("t")]), else_branch=helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [],
                                                         [_info("e")]))],
        "g", [_info("x", ["N", C, 6, 6])], [_info("y")], [numpy_helper.from_array(_w(0), "W0")])
    with pytest.raises(UserError, match="calibrated on no batch \\(If branch then_branch\\)"):
        run(helper.make_model(only, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), feeds([-1, -1]),
            recipe(bits=4, batch_size=8))


def test_torch_cond_exported_by_torch_onnx_dynamo(tmp_path):
    """A real exporter's If: torch.cond exported by torch.onnx (dynamo), the branches' weights top-level
    initializers; the branch the calibration takes is quantized, and the model stays close to float."""
    torch = pytest.importorskip("torch", reason="torch (tools/test.sh installs it)")
    pytest.importorskip("onnxscript", reason="torch.onnx's dynamo exporter needs onnxscript")
    nn = torch.nn

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.a = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
            self.b = nn.Conv2d(8, 4, 3, padding=1)
            self.head = nn.Linear(4, 5)

        def forward(self, x):
            h = torch.relu(self.stem(x))
            y = torch.cond(h.mean() > 0.1, lambda t: self.a(t), lambda t: self.b(t), (h,))
            return self.head(y.mean((2, 3)))

    torch.manual_seed(0)
    path = str(tmp_path / "cond.onnx")
    torch.onnx.export(M().eval(), (torch.randn(2, 3, 16, 16),), path, dynamo=True,
                      dynamic_shapes={"x": {0: "batch"}}, verbose=False)
    x = np.random.default_rng(0).standard_normal((32, 3, 16, 16)).astype(np.float32) + 1
    q, rep = run(path, {"x": x}, recipe(bits=8))
    ifs = [n for n in onnx.load(path).graph.node if n.op_type == "If"]
    assert len(ifs) == 1
    inside = [L for L in rep.layers if "_branch/" in L.node]
    assert len(inside) == 2 and all(L.node.startswith(f"{ifs[0].name}/then_branch/") for L in inside)
    assert len(rep.layers) == 4  # (the stem and the head too)
    xe = np.random.default_rng(1).standard_normal((8, 3, 16, 16)).astype(np.float32) + 1
    f = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": xe})[0]
    y = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": xe})[0]
    assert np.linalg.norm(y - f) < 0.02 * np.linalg.norm(f)


def _ops_at_depth(graph, depth=0, out=None):
    """{depth: [op types]} of ``graph`` and its subgraphs."""
    out = {} if out is None else out
    for n in graph.node:
        out.setdefault(depth, []).append(n.op_type)
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                _ops_at_depth(a.g, depth + 1, out)
    return out


def test_activations_are_quantized_inside_branches_too():
    """W8A8: each branch's run places its own activation Q/DQ (silero-vad's default export: its 16 kHz network's
    7 activations, decisions as float's on 0.990 of held-out chunks, as the op15 export without the outer If); a
    branch with no activation to quantize is quantized weights only."""
    m = model_with_branches()
    batches = feeds([1, -1, 1, -1, 1, -1])
    q, rep = run(m, batches, recipe(bits=8, act_bits=8, batch_size=8))
    onnx.checker.check_model(q, full_check=True)
    ops = _ops_at_depth(q.graph)
    assert all("QuantizeLinear" in ops[d] for d in (0, 1, 2)), ops  # (top level, branches, the nested If's)
    for sign in (1, -1):
        x = feeds([sign], 16, seed=5)[0]["x"]
        f = infer(m, x)
        assert np.linalg.norm(infer(q, x) - f) < 0.06 * np.linalg.norm(f)  # (measured 0.035 on the then path)
    # the then branch without its Relu-free chain's activations to quantize: a lone LSTM-like MatMul of an
    # input that the branch reads as it is (no candidate inside): weights only, no error
    g = helper.make_graph(_cond_nodes() + [helper.make_node(
        "If", ["cond"], ["y"], name="branch",
        then_branch=helper.make_graph([helper.make_node("MatMul", ["x", "Wm"], ["t"], name="mm")], "then", [],
                                      [_info("t")]),
        else_branch=helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [], [_info("e")]))],
        "g", [_info("x", ["N", 6])], [_info("y")],
        [numpy_helper.from_array(np.random.default_rng(0).standard_normal((6, 6)).astype(np.float32), "Wm")])
    mm = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    xs = [{"x": np.random.default_rng(k).standard_normal((8, 6)).astype(np.float32) + 1} for k in range(2)]
    q2, rep2 = run(mm, xs, recipe(bits=8, act_bits=8, batch_size=8))
    assert [L.node for L in rep2.layers] == ["branch/then_branch/mm"]


@pytest.mark.parametrize("max_opset, stored", [(None, 4), (17, 8)])
def test_the_reported_bits_count_the_branch_layers(max_opset, stored):
    r = recipe(bits=4, batch_size=8).updated({"weights": {"max_opset": max_opset}})
    q, rep = run(model_with_branches(), feeds([1, -1]), r)
    assert len(rep.layers) == 5 and rep.avg_bits == 4 and rep.storage_bits == stored
    assert max(o.version for o in q.opset_import if o.domain in ("", "ai.onnx")) == (21 if max_opset is None else 17)


def test_branch_feeds_computed_again_at_each_pass_give_the_same_model(monkeypatch):
    """Past their share of the memory budget the branches' feeds are not kept but computed again by the float model
    at every pass of the branch's run (as capture streams): the same model, byte for byte."""
    import onnxcomq.pipeline as pipeline

    m, r = model_with_branches(), recipe(bits=4, batch_size=8)
    kept, _ = run(m, feeds([1, -1, 1, -1, 1]), r)
    passes = []
    real = pipeline._outer_values
    monkeypatch.setattr(pipeline, "BRANCH_FEEDS_SHARE", 0.0)
    monkeypatch.setattr(pipeline, "_outer_values", lambda *a: passes.append(1) or real(*a))
    again, _ = run(m, feeds([1, -1, 1, -1, 1]), r)
    assert again.SerializeToString() == kept.SerializeToString()
    assert len(passes) > 2 * 5  # (the first pass, then the branches' own passes, each over the 5 batches)


def test_a_branch_that_fails_its_check_is_judged_by_the_whole_models_check(tmp_path, capsys, caplog):
    """y = x @ W - 0.34 (exactly 0 in float; far from it at 2-bit round-to-nearest, tests/test_hostile_inputs.py)
    inside an If branch: the branch's own check fails, and the whole model's check refuses it as it would at the
    top level; --write-unverified writes the whole model."""
    from builders import recipe_args

    w = np.array([[0.34], [1.0], [-1.0]], np.float32)
    then_g = helper.make_graph([helper.make_node("MatMul", ["x", "W0"], ["h"], name="mm0"),
                                helper.make_node("Sub", ["h", "c"], ["t"])], "then", [], [_info("t", ["N", 1])])
    else_g = helper.make_graph([helper.make_node("Slice", ["x", "s0", "s1", "s1"], ["e"])], "else", [],
                               [_info("e", ["N", 1])])
    g = helper.make_graph(_cond_nodes() + [
        helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_g, else_branch=else_g)],
        "g", [_info("x", ["N", 3])], [_info("y", ["N", 1])],
        [numpy_helper.from_array(w, "W0"), numpy_helper.from_array(np.array([0.34], np.float32), "c"),
         numpy_helper.from_array(np.array([0], np.int64), "s0"), numpy_helper.from_array(np.array([1], np.int64), "s1")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.save(m, tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=np.tile(np.array([[1, 0, 0]], np.float32), (8, 1)))
    args = ["quantize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "q.onnx"), "--calib",
            str(tmp_path / "c.npz"), "--bits", "2", *recipe_args(tmp_path, method="rtn")]
    assert main(args) == 2 and not (tmp_path / "q.onnx").exists()
    err = capsys.readouterr().err
    assert any("the whole model's check decides" in r.getMessage() for r in caplog.records)
    assert "output y is far from the float model's" in err and "--write-unverified writes it anyway" in err
    assert main(args + ["--write-unverified"]) == 0
    q = onnx.load(tmp_path / "q.onnx")
    assert any(n.op_type == "DequantizeLinear" for n in _branch(q, "then_branch").node)
