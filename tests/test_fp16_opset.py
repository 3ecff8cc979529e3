"""float16 models with quantized activations, the opset change and --max-opset, and the list of nodes left float.

References: the float model itself (float32 and its float16 twin, run by onnxruntime), the same pipeline on the
float32 model, and the opset-21 int4 emission (the opset-13 int8 containers must dequantize to the same weights).
"""

import builders
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import recipe
from onnx import TensorProto, helper, numpy_helper

from onnxcomq import run
from onnxcomq.cli import main
from onnxcomq.errors import UserError
from onnxcomq.graph.layers import find_layers
from onnxcomq.report import format_skipped


def small_cnn(seed=0, opset=17, bias_scale=2.0):
    """Conv-Relu-Conv-Relu-GlobalAveragePool-Flatten-Gemm, float32, batch dynamic. Biases of a few units: with
    8-bit scales s_a * s_w ~ 1e-5, bias / (s_a * s_w) exceeds float16's range (what onnxruntime's own bias
    quantization of a float16 model overflows on)."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((8, 3, 3, 3)) / 5).astype(np.float32)
    w2 = (rng.standard_normal((16, 8, 3, 3)) / 8).astype(np.float32)
    w3 = (rng.standard_normal((10, 16)) / 4).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in (
        (w1, "w1"), (bias_scale * rng.standard_normal(8).astype(np.float32), "b1"), (w2, "w2"),
        (bias_scale * rng.standard_normal(16).astype(np.float32), "b2"), (w3, "w3"),
        (rng.standard_normal(10).astype(np.float32), "b3"))]
    nodes = [helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "w3", "b3"], ["output"], name="fc", transB=1)]
    g = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 12, 12])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 10])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)


def ort_run(model, feeds, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.log_severity_level = 3
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return s.run(None, feeds)


def rel_err(y, ref):
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def cosine(y, ref):
    y, ref = np.asarray(y, np.float64).ravel(), np.asarray(ref, np.float64).ravel()
    return float(y @ ref / np.linalg.norm(y) / np.linalg.norm(ref))


# --------------------------------------------------------------------------------------------- float16 W8A8

@pytest.mark.parametrize("target,aware", [("ort", False), ("tensorrt", False), ("ort", True)])
def test_float16_model_with_quantized_activations(target, aware):
    m32 = small_cnn()
    m16 = builders.to_float16(m32)
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, (48, 3, 12, 12)).astype(np.float32)
    xt = rng.uniform(0, 1, (64, 3, 12, 12)).astype(np.float32)  # held out
    cfg = dict(bits=8, act_bits=8, target=target, device="cpu", act_aware=aware, act_max_noise=float("inf"))
    q16, rep16 = run(m16, {"input": x.astype(np.float16)}, recipe(**cfg))
    q32, rep32 = run(m32, {"input": x}, recipe(**cfg))
    onnx.checker.check_model(q16, full_check=True)
    assert rep16.config["act_tensors"] == rep32.config["act_tensors"] > 0  # the same placement as float32
    inits = {t.name: t for t in q16.graph.initializer}
    qs = [n for n in q16.graph.node if n.op_type == "QuantizeLinear"]
    assert qs and all(inits[n.input[1]].data_type == TensorProto.FLOAT16 for n in qs)
    assert rep16.config["opset"]["output"] >= 19  # QuantizeLinear of float16: opset 19
    (yf,) = ort_run(m32, {"input": xt})
    (y16,) = ort_run(q16, {"input": xt.astype(np.float16)})
    (y16_plain,) = ort_run(q16, {"input": xt.astype(np.float16)}, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    (y32,) = ort_run(q32, {"input": xt})
    assert y16.dtype == np.float16 and np.isfinite(y16).all()
    # onnxruntime's graph optimizations must not change the model's numbers beyond float16 rounding (its own
    # float16 bias quantization overflowed here before the biases were written as int32 DequantizeLinear)
    assert rel_err(y16, y16_plain) < 5e-3
    # as close to the float model as the float32 pipeline's W8A8, give or take float16 arithmetic: float16 keeps
    # 11 significant bits (2^-11 ~ 5e-4 relative per rounding); a few layers and the stored 8-bit steps: 1e-2
    e16, e32 = rel_err(y16, yf), rel_err(y32, yf)
    assert e16 <= 1.5 * e32 + 1e-2, (e16, e32)
    assert cosine(y16, yf) > 0.99


def test_float16_scales_cover_the_range():
    """A float16 activation scale is rounded up (not to nearest) so the observed range still fits; the zero
    point is fitted to that scale."""
    from onnxcomq.capture.observers import ActFormat, half_up, qparams

    for lo, hi in [(-0.3, 1.7), (0.0, 6.0), (-1e-6, 2e-6), (0.0, 0.0)]:
        for fmt in (ActFormat(8, False, False), ActFormat(8, True, True)):
            s, z = qparams(lo, hi, fmt, float16=True)
            s32, _ = qparams(lo, hi, fmt)
            assert float(np.float16(s)) == s and s > 0
            if hi > lo:  # rounded up, by less than one float16 step
                assert s32 <= s < s32 * (1 + 2.0 ** -10) + 2.0 ** -24
            # the range is covered up to the zero point's rounding (half a step), as in float32
            assert (fmt.qmax - z) * s >= hi - s / 2 and (fmt.qmin - z) * s <= lo + s / 2
    assert half_up(1e-30) == 2.0 ** -24 and half_up(1.0) == 1.0 and half_up(1.0001) > 1.0001


# ------------------------------------------------------------------------------------------------ opsets

def dequantized_weights(q):
    """{weight name: what onnxruntime's DequantizeLinear computes}, read as extra graph outputs."""
    m = onnx.ModelProto()
    m.CopyFrom(q)
    names = [n.output[0] for n in m.graph.node if n.op_type == "DequantizeLinear"
             and n.input[0] in {t.name for t in m.graph.initializer}]
    for name in names:
        m.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    feeds = {"input": np.zeros((1, 3, 12, 12), np.float32)}
    outs = ort_run(m, feeds, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    return dict(zip(names, outs[len(q.graph.output):]))


@pytest.mark.parametrize("bits,scheme", [(4, "asym"), (3, "sym"), (2, "asym")])
def test_max_opset_13_stores_int8_containers_with_the_same_weights(bits, scheme):
    m = small_cnn(opset=11)
    x = np.random.default_rng(2).uniform(0, 1, (32, 3, 12, 12)).astype(np.float32)
    q21, r21 = run(m, {"input": x}, recipe(bits=bits, scheme=scheme, device="cpu"))
    q13, r13 = run(m, {"input": x}, recipe(bits=bits, scheme=scheme, device="cpu", max_opset=13))
    assert r21.config["opset"]["input"] == 11 and r21.config["opset"]["output"] == 21
    assert "int4" in r21.config["opset"]["reason"]
    assert r13.config["opset"] == {"input": 11, "output": 13, "reason": "per-channel DequantizeLinear axis",
                                   "max": 13}
    assert q13.opset_import[0].version == 13
    onnx.checker.check_model(q13, full_check=True)
    types = {t.name: t.data_type for t in q13.graph.initializer}
    codes = [n.input[0] for n in q13.graph.node if n.op_type == "DequantizeLinear"]
    assert codes and all(types[c] in (TensorProto.INT8, TensorProto.UINT8) for c in codes)
    assert r13.storage_bits == 8 and r21.storage_bits == 4
    d21, d13 = dequantized_weights(q21), dequantized_weights(q13)
    assert d21.keys() == d13.keys() and len(d21) == 3
    for k in d21:
        np.testing.assert_array_equal(d13[k], d21[k])  # bit for bit
    xt = np.random.default_rng(3).uniform(0, 1, (8, 3, 12, 12)).astype(np.float32)
    np.testing.assert_allclose(ort_run(q13, {"input": xt})[0], ort_run(q21, {"input": xt})[0], rtol=1e-5, atol=1e-5)


def test_max_opset_errors():
    m = small_cnn(opset=11)
    x = np.random.default_rng(2).uniform(0, 1, (8, 3, 12, 12)).astype(np.float32)
    with pytest.raises(UserError, match="block_size, opset 21"):
        recipe(bits=4, granularity="block", max_opset=13).validate()
    with pytest.raises(UserError, match="max opset must be an integer >= 13"):
        recipe(max_opset=12).validate()
    with pytest.raises(UserError, match="float16 scales of float16 weights need opset 19"):
        run(builders.to_float16(m), {"input": x.astype(np.float16)}, recipe(bits=8, device="cpu",
                                                                                   max_opset=13, verify=False))
    with pytest.raises(UserError, match="already at opset 17"):
        run(small_cnn(opset=17), {"input": x}, recipe(bits=4, device="cpu", max_opset=13, verify=False))
    q, rep = run(builders.to_float16(m), {"input": x.astype(np.float16)},
                 recipe(bits=4, device="cpu", max_opset=19))  # float16 int8-container weights at 19
    assert q.opset_import[0].version == 19 and rep.config["opset"]["reason"].startswith("float16 scales")


def test_cli_says_when_the_opset_is_raised_and_keeps_13(tmp_path, capsys):
    src = builders.save(small_cnn(opset=11), tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", input=np.random.default_rng(0).uniform(0, 1, (16, 3, 12, 12)).astype(np.float32))
    out = tmp_path / "q.onnx"
    assert main(["quantize", src, "-o", str(out), "--calib", str(tmp_path / "c.npz"), "--bits", "4"]) == 0
    text = capsys.readouterr().out
    assert "opset raised 11 -> 21 for 2..4-bit weights stored as int4/uint4" in text and \
        "weights.max_opset 13" in text
    assert main(["quantize", src, "-o", str(out), "--calib", str(tmp_path / "c.npz"), "--bits", "4"]
                + builders.recipe_args(tmp_path, max_opset=13)) == 0
    assert "opset raised 11 -> 13 for per-channel DequantizeLinear axis" in capsys.readouterr().out
    assert onnx.load(str(out)).opset_import[0].version == 13
    assert main(["quantize", src, "-o", str(tmp_path / "b.onnx"), "--calib", "random", "--granularity", "block"]
                + builders.recipe_args(tmp_path, max_opset=13)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs DequantizeLinear's block_size, opset 21" in err[0]


# ------------------------------------------------------------------------------------- nodes left float

def model_with_float_weights():
    """A quantizable MatMul and LSTM (W, R; its B stays float), then nodes holding float weights COMQ does not
    quantize: a Gather
    embedding, a MatMul of two activations, and an If whose branches hold a MatMul and an LSTM whose W and R are
    Slices of one initializer (as silero-vad's export writes them)."""
    rng = np.random.default_rng(0)
    d, h, vocab = 6, 5, 40

    def arr(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    tensors = {"Wmm": arr(d, d), "lstm_W": arr(1, 4 * h, d), "lstm_R": arr(1, 4 * h, h), "lstm_B": arr(1, 8 * h),
               "emb": arr(vocab, h), "Wthen": arr(h, 3), "packed": arr(1, 8 * h, h), "bias1d": arr(d)}
    sl = [numpy_helper.from_array(np.array([v], np.int64), n) for n, v in
          (("s0", 0), ("s1", 4 * h), ("s2", 8 * h), ("ax", 1))]
    then_g = helper.make_graph([helper.make_node("MatMul", ["y2d", "Wthen"], ["bo"], name="then_mm")], "then", [],
                               [helper.make_tensor_value_info("bo", TensorProto.FLOAT, None)])
    else_g = helper.make_graph([
        helper.make_node("Slice", ["packed", "s0", "s1", "ax"], ["pw"], name="slice_w"),
        helper.make_node("Slice", ["packed", "s1", "s2", "ax"], ["pr"], name="slice_r"),
        helper.make_node("Slice", ["pw", "s0", "s1", "ax"], ["pw2"], name="slice_w2"),  # constant arithmetic
        helper.make_node("LSTM", ["seq5", "pw2", "pr"], ["eo"], name="inner_lstm", hidden_size=h),
    ], "else", [], [helper.make_tensor_value_info("eo", TensorProto.FLOAT, None)])
    nodes = [
        helper.make_node("MatMul", ["input", "Wmm"], ["a"], name="mm"),
        helper.make_node("Add", ["a", "bias1d"], ["a1"], name="bias_add"),  # a bias: not a weight
        helper.make_node("LSTM", ["a1", "lstm_W", "lstm_R", "lstm_B"], ["y", "yh"], name="lstm", hidden_size=h),
        helper.make_node("Gather", ["emb", "ids"], ["e"], name="embed"),
        helper.make_node("MatMul", ["a1", "aT"], ["act_act"], name="act_mm"),
        helper.make_node("Transpose", ["a1"], ["aT"], perm=[0, 2, 1]),
        helper.make_node("Squeeze", ["yh"], ["y2d"]),
        helper.make_node("Transpose", ["e"], ["seq5"], perm=[0, 1, 2]),
        helper.make_node("If", ["cond"], ["branch"], name="branch", then_branch=then_g, else_branch=else_g),
    ]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [7, 2, d]),
                                       helper.make_tensor_value_info("ids", TensorProto.INT64, [7, 2]),
                                       helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                          [helper.make_tensor_value_info("branch", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(v, k) for k, v in tensors.items()] + sl)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tensors


def test_every_node_holding_a_float_weight_is_listed_with_its_share():
    m, t = model_with_float_weights()
    layers, skipped = find_layers(m)
    assert [(L.node, L.weight) for L in layers] == [("mm", "Wmm"), ("lstm", "lstm_W"), ("lstm", "lstm_R")]
    total = sum(v.size for v in t.values())  # every float parameter (the int64 slice bounds are not)
    by = {s.node: s for s in skipped}
    expect = {"embed": t["emb"].size,  # (the LSTM's B [1, 8h]: a bias)
              "branch/then_branch/then_mm": t["Wthen"].size,
              "branch/else_branch/inner_lstm": t["packed"].size,  # the whole packed tensor, counted once
              "act_mm": 0, "branch": 0}
    assert set(by) == set(expect), sorted(by)
    for name, params in expect.items():
        assert by[name].params == params, name
        assert by[name].share == pytest.approx(params / total)
    assert "embedding" in by["embed"].reason
    # (LSTMs are quantized in the main graph: the reason is where it sits, not what it is; silero-vad's said
    # "recurrent layer: its W and R weights stay float")
    assert "control-flow subgraphs are not quantized" in by["branch/else_branch/inner_lstm"].reason and \
        "else_branch" in by["branch/else_branch/inner_lstm"].reason
    assert "subgraph" in by["branch"].reason and "then_branch" in by["branch/then_branch/then_mm"].reason
    # quantized + left float + biases = everything
    quantized = t["Wmm"].size + t["lstm_W"].size + t["lstm_R"].size
    assert quantized + sum(expect.values()) + t["bias1d"].size + t["lstm_B"].size == total
    lines = format_skipped([{"node": s.node, "op_type": s.op_type, "reason": s.reason, "share": s.share}
                            for s in skipped])
    lstm_line = next(line for line in lines if line.startswith("not quantized: 1 LSTM node holding"))
    assert f"{100 * expect['branch/else_branch/inner_lstm'] / total:.1f} %" in lstm_line
    left = sum(expect.values()) / total
    assert lines[-1].startswith(f"left float: {100 * left:.1f} %")
