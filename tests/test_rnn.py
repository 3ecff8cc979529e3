"""Recurrent layers (LSTM, GRU, RNN): the statistics of W (input sequence) and R (hidden states), the written
model, and the grid of its dequantized weights, on small models built with onnx.helper."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import recipe
from onnx import TensorProto, helper, numpy_helper

from onnxcomq import run
from onnxcomq.capture.passes import collect_stats
from onnxcomq.capture.session import capture_model
from onnxcomq.errors import UserError
from onnxcomq.graph.layers import find_layers, with_rnn_outputs

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
S, I, H = 6, 5, 7  # steps, input features, hidden size


def rnn_model(op="LSTM", direction="forward", initial_h=True, seed=0, y_output=True, layout=0, opset=17, **attrs):
    """input [N, S, I] -> (Transpose to [S, N, I] unless layout 1) -> op(W, R, B[, initial_h from the ``state``
    input [N, nd, H]]) -> Y -> [N, S, nd * H]. ``y_output=False``: the node outputs only Y_h (the model's
    output is then Y_h [N, nd * H])."""
    rng = np.random.default_rng(seed)
    nd = 2 if direction == "bidirectional" else 1
    g = GATES[op]
    inits = [numpy_helper.from_array((rng.standard_normal((nd, g * H, I)) * 0.4).astype(np.float32), "W"),
             numpy_helper.from_array((rng.standard_normal((nd, g * H, H)) * 0.3).astype(np.float32), "R"),
             numpy_helper.from_array((rng.standard_normal((nd, 2 * g * H)) * 0.1).astype(np.float32), "B"),
             numpy_helper.from_array(np.array([-1, S, nd * H], np.int64), "shape"),
             numpy_helper.from_array(np.array([-1, nd * H], np.int64), "shape_h")]
    nodes = []
    if layout == 0:
        nodes.append(helper.make_node("Transpose", ["input"], ["xs"], perm=[1, 0, 2]))
        xs = "xs"
    else:
        xs = "input"
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", S, I])]
    h0 = ""
    if initial_h:
        inputs.append(helper.make_tensor_value_info("state", TensorProto.FLOAT, ["N", nd, H]))
        if layout == 0:
            nodes.append(helper.make_node("Transpose", ["state"], ["h0"], perm=[1, 0, 2]))
            h0 = "h0"
        else:
            h0 = "state"
    rnn_in = [xs, "W", "R", "B", "", h0] if h0 else [xs, "W", "R", "B"]
    outs = ["Y", "Y_h"] if y_output else ["", "Y_h"]
    if layout:  # (opset >= 14)
        attrs["layout"] = layout
    nodes.append(helper.make_node(op, rnn_in, outs, name="rnn", hidden_size=H, direction=direction, **attrs))
    if y_output:  # Y [S, nd, N, H] (layout 1: [N, S, nd, H]) -> [N, S, nd * H]
        if layout == 0:
            nodes.append(helper.make_node("Transpose", ["Y"], ["Yt"], perm=[2, 0, 1, 3]))
        else:
            nodes.append(helper.make_node("Identity", ["Y"], ["Yt"]))
        nodes.append(helper.make_node("Reshape", ["Yt", "shape"], ["output"]))
    else:  # Y_h [nd, N, H] (layout 1: [N, nd, H])
        if layout == 0:
            nodes.append(helper.make_node("Transpose", ["Y_h"], ["Yht"], perm=[1, 0, 2]))
        else:
            nodes.append(helper.make_node("Identity", ["Y_h"], ["Yht"]))
        nodes.append(helper.make_node("Reshape", ["Yht", "shape_h"], ["output"]))
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def calib(model, n=48, seed=1):
    rng = np.random.default_rng(seed)
    feed = {"input": rng.standard_normal((n, S, I)).astype(np.float32)}
    if any(i.name == "state" for i in model.graph.input):
        nd = [d.dim_value for d in model.graph.input[1].type.tensor_type.shape.dim][1]
        feed["state"] = (0.5 * rng.standard_normal((n, nd, H))).astype(np.float32)
    return feed


def ort_run(model, feed, outputs=None):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(outputs, feed)


def reference_grams(model, feed, h0=None):
    """float64 G of W's X (input rows) and of R's X (per direction, the hidden state each step saw), from the
    float model's own X, Y and initial_h run in onnxruntime and the shift done here by hand."""
    node = next(n for n in model.graph.node if n.op_type in GATES)
    direction = next((a.s.decode() for a in node.attribute if a.name == "direction"), "forward")
    nd = 2 if direction == "bidirectional" else 1
    m = with_rnn_outputs(model, find_layers(model)[0])
    y_name = next(n for n in m.graph.node if n.op_type in GATES).output[0]
    x, y = ort_run(capture_model(m, [node.input[0], y_name]), feed, [node.input[0], y_name])
    x, y = x.astype(np.float64), y.astype(np.float64)
    n = x.shape[1]
    if h0 is not None:  # (a constant initial_h [nd, N, H])
        h0 = h0.astype(np.float64)
    elif len(node.input) > 5 and node.input[5]:
        h0 = feed["state"].astype(np.float64).transpose(1, 0, 2)  # [nd, N, H]
    else:
        h0 = np.zeros((nd, n, H))
    Xw = x.reshape(-1, I)
    gw = Xw.T @ Xw
    gr = []
    for d in range(nd):
        rev = direction == "reverse" or (direction == "bidirectional" and d == 1)
        hs = []
        for t in range(S):  # the state step t read: h_{t-1} forward, h_{t+1} backward (initial_h at the edge)
            if not rev:
                hs.append(h0[d] if t == 0 else y[t - 1, d])
            else:
                hs.append(h0[d] if t == S - 1 else y[t + 1, d])
        Xr = np.stack(hs).reshape(-1, H)
        gr.append(Xr.T @ Xr)
    return gw, np.stack(gr)


CASES = [("LSTM", "forward", True), ("LSTM", "forward", False), ("LSTM", "bidirectional", True),
         ("LSTM", "bidirectional", False), ("LSTM", "reverse", True), ("RNN", "forward", True),
         ("RNN", "bidirectional", False), ("GRU", "bidirectional", True)]


@pytest.mark.parametrize("op,direction,initial_h", CASES)
def test_captured_grams_match_float64_reference(op, direction, initial_h):
    model = rnn_model(op, direction, initial_h)
    layers, skipped = find_layers(model)
    assert not skipped and [(L.op_type, L.weight) for L in layers] == [(op, "W"), (op, "R")]
    feed = calib(model, n=10)
    specs = {L.x: L.groups for L in layers}
    stats, samples = collect_stats(with_rnn_outputs(model, layers), specs,
                                   [{k: v[:4] for k, v in feed.items()}, {k: v[4:] for k, v in feed.items()}])
    assert samples == 10
    gw, gr = reference_grams(model, feed)
    nd = gr.shape[0]
    Gw, Gr = stats[layers[0].x].G, stats[layers[1].x].G
    assert Gw.shape == (nd, I, I) and Gr.shape == (nd, H, H)
    for d in range(nd):
        np.testing.assert_allclose(Gw[d], gw, rtol=1e-5, atol=1e-5 * np.abs(gw).max())
        np.testing.assert_allclose(Gr[d], gr[d], rtol=1e-5, atol=1e-5 * np.abs(gr[d]).max())
    assert stats[layers[1].x].rows == 10 * S
    if nd == 2:  # the two directions saw different states
        assert not np.allclose(Gr[0], Gr[1])


def test_missing_y_output_is_added_for_capture():
    """A node without a Y output (only Y_h used): the capture model gets one, the statistics are the same."""
    model = rnn_model("LSTM", "bidirectional", True, y_output=False)
    layers, _ = find_layers(model)
    assert not next(n for n in model.graph.node if n.op_type == "LSTM").output[0]
    feed = calib(model, n=6)
    stats, _ = collect_stats(with_rnn_outputs(model, layers), {L.x: L.groups for L in layers}, [feed])
    gw, gr = reference_grams(model, feed)
    for d in range(2):
        np.testing.assert_allclose(stats[layers[0].x].G[d], gw, rtol=1e-5, atol=1e-5 * np.abs(gw).max())
        np.testing.assert_allclose(stats[layers[1].x].G[d], gr[d], rtol=1e-5, atol=1e-5 * np.abs(gr[d]).max())
    q, _ = run(model, feed, recipe(bits=8))
    assert not next(n for n in q.graph.node if n.op_type == "LSTM").output[0]  # the written model: as it was
    held = calib(model, n=8, seed=5)
    assert cosine(ort_run(model, held)[0], ort_run(q, held)[0]) > 0.99


def test_layout_1_is_skipped_with_a_reason():
    model = rnn_model("LSTM", "forward", True, layout=1)
    layers, skipped = find_layers(model)
    assert not layers and "layout 1" in skipped[0].reason


def cosine(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def dequantized_weights(qmodel, names):
    """{float weight name: (dequantized weight, scale, zero point)} of the written model: the weight as onnxruntime
    computes it (its DequantizeLinear nodes, and the Concat of the per-direction ones), the scales and zero points
    of its DequantizeLinear nodes stacked in order (one per direction)."""
    inits = {t.name: numpy_helper.to_array(t) for t in qmodel.graph.initializer}
    producer = {o: n for n in qmodel.graph.node for o in n.output}
    out = {}
    for name in names:
        keep, todo, dqs = [], [name], []
        while todo:  # the nodes that compute the weight from initializers
            n = producer[todo.pop()]
            keep.append(n)
            if n.op_type == "DequantizeLinear":
                dqs.append(n)
            else:
                assert n.op_type == "Concat"
                todo.extend(n.input)
        m = onnx.ModelProto()
        m.CopyFrom(qmodel)
        del m.graph.output[:], m.graph.input[:], m.graph.node[:]
        m.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
        m.graph.node.extend(reversed(keep))
        (w,) = ort_run(m, {})
        top = producer[name]
        dqs = [top] if top.op_type == "DequantizeLinear" else [producer[i] for i in top.input]  # direction order
        out[name] = (w, np.stack([inits[n.input[1]] for n in dqs]), np.stack([inits[n.input[2]] for n in dqs]))
    return out


@pytest.mark.parametrize("op,direction,initial_h", [("LSTM", "forward", True), ("LSTM", "bidirectional", False),
                                                    ("LSTM", "reverse", False), ("RNN", "bidirectional", True),
                                                    ("GRU", "forward", True)])
def test_written_model_runs_close_to_float_on_grid(op, direction, initial_h):
    model = rnn_model(op, direction, initial_h)
    feed = calib(model)
    q, rep = run(model, feed, recipe(bits=8))
    nd = 2 if direction == "bidirectional" else 1
    held = calib(model, n=16, seed=7)
    (yf,) = ort_run(model, held)
    (yq,) = ort_run(q, held)  # onnxruntime CPU runs the LSTM reading DequantizeLinear outputs
    assert cosine(yf, yq) > 0.99
    assert {L.weight for L in rep.layers} == {"W", "R"}
    for L in rep.layers:
        assert L.comq_error <= L.rtn_error * (1 + 1e-6) and L.comq_error > 0
        assert not L.bias_corrected
    # the B of the recurrent node is left alone
    b_float = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "B"))
    b_q = numpy_helper.to_array(next(t for t in q.graph.initializer if t.name == "B"))
    np.testing.assert_array_equal(b_float, b_q)
    deq = dequantized_weights(q, ["W", "R"])
    assert sum(n.op_type == "DequantizeLinear" for n in q.graph.node) == 2 * nd
    floats = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for name, (w, scale, zp) in deq.items():
        wf = floats[name]
        assert w.shape == wf.shape
        rows = wf.shape[1]
        s = np.asarray(scale, np.float64).reshape(nd, rows, 1)  # one scale per (direction, gate row)
        z = np.asarray(zp, np.float64).reshape(nd, rows, 1)
        assert np.unique(s).size > nd * rows // 2  # a scale of its own per direction and row
        levels = w.astype(np.float64) / s + z
        np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)
        assert levels.min() > -0.5 and levels.max() < 255.5
        assert np.all(np.abs(w - wf) <= 2.5 * s)  # close to the float weight (COMQ moves a code by a step or two)


def test_rnn_at_4_bits_beats_rtn_and_runs():
    model = rnn_model("LSTM", "bidirectional", True, seed=3)
    feed = calib(model, n=64)
    q, rep = run(model, feed, recipe(bits=4))
    _, rep_rtn = run(model, feed, recipe(bits=4, method="rtn"))
    held = calib(model, n=16, seed=9)
    (yf,) = ort_run(model, held)
    (yq,) = ort_run(q, held)
    assert cosine(yf, yq) > 0.9
    for L in rep.layers:
        assert L.comq_error <= L.rtn_error * (1 + 1e-6)
    assert sum(L.comq_error for L in rep.layers) < sum(L.rtn_error for L in rep_rtn.layers)


def test_sequence_lens_is_skipped_with_a_reason():
    model = rnn_model("LSTM", "forward", False)
    node = next(n for n in model.graph.node if n.op_type == "LSTM")
    node.input.extend(["seq_lens"])
    model.graph.input.append(helper.make_tensor_value_info("seq_lens", TensorProto.INT32, ["N"]))
    layers, skipped = find_layers(model)
    assert not layers and len(skipped) == 1 and "sequence_lens" in skipped[0].reason
    assert skipped[0].params == 4 * H * (I + H) and skipped[0].share > 0.5


@pytest.mark.parametrize("max_opset", [None, 13])
def test_bidirectional_4_bits_at_opset_13(max_opset):
    """Per-direction DequantizeLinear + Concat needs only opset 13: with --max-opset 13 the 4-bit codes go in
    int8 containers and the model stays at opset 13; without, int4 at opset 21. Both the same weights."""
    model = rnn_model("LSTM", "bidirectional", True, opset=13)
    feed = calib(model)
    q, rep = run(model, feed, recipe(bits=4, max_opset=max_opset))
    opset = next(o.version for o in q.opset_import if o.domain in ("", "ai.onnx"))
    assert opset == (13 if max_opset else 21)
    held = calib(model, n=16, seed=7)
    assert cosine(ort_run(model, held)[0], ort_run(q, held)[0]) > 0.95
    deq = dequantized_weights(q, ["W", "R"])
    for name, (w, scale, zp) in deq.items():
        levels = w.astype(np.float64) / scale[..., None] + zp[..., None]
        np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)
        assert levels.min() > -0.5 and levels.max() < 15.5
    if max_opset:
        _, rep21 = run(model, feed, recipe(bits=4))
        assert [L.comq_error for L in rep.layers] == [L.comq_error for L in rep21.layers]


def test_constant_initial_h():
    """initial_h an initializer (a model with a fixed batch): read from the model for R's statistics."""
    n = 3
    model = rnn_model("LSTM", "bidirectional", True)
    h0 = (0.5 * np.random.default_rng(4).standard_normal((2, n, H))).astype(np.float32)
    model.graph.initializer.append(numpy_helper.from_array(h0, "h0c"))
    node = next(x for x in model.graph.node if x.op_type == "LSTM")
    node.input[5] = "h0c"
    model.graph.input.remove(model.graph.input[1])  # (the state input and its Transpose go)
    model.graph.node.remove(next(x for x in model.graph.node if list(x.input) == ["state"]))
    model.graph.input[0].type.tensor_type.shape.dim[0].Clear()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = n
    layers, _ = find_layers(model)
    assert layers[1].x.initial == "h0c"
    feed = {"input": np.random.default_rng(5).standard_normal((n, S, I)).astype(np.float32)}
    stats, _ = collect_stats(model, {L.x: L.groups for L in layers}, [feed])
    gw, gr = reference_grams(model, feed, h0)
    for d in range(2):
        np.testing.assert_allclose(stats[layers[1].x].G[d], gr[d], rtol=1e-5, atol=1e-5 * np.abs(gr[d]).max())
    q, rep = run(model, {"input": np.random.default_rng(6).standard_normal((4 * n, S, I)).astype(np.float32)},
                 recipe(bits=8))
    assert cosine(ort_run(model, feed)[0], ort_run(q, feed)[0]) > 0.99


def test_tensor_granularity_on_a_bidirectional_lstm_is_refused_before_capture(monkeypatch):
    """Each direction gets its own scale: per-tensor is a one-line error, raised before any calibration pass."""
    import onnxcomq.pipeline as api

    def no_capture(*a, **k):
        raise AssertionError("capture ran before the error")

    monkeypatch.setattr(api, "capture", no_capture)
    model = rnn_model("LSTM", "bidirectional", True)
    with pytest.raises(UserError, match="per-tensor granularity is not supported for a bidirectional LSTM"):
        api.run(model, calib(model), recipe(bits=8, granularity="tensor", device="cpu"))
