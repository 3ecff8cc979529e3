"""onnxruntime's fused layers (com.microsoft FusedConv, FusedGemm, FusedMatMul, Attention): the graphs its
optimizer saves (ORT_ENABLE_EXTENDED) and its transformer optimizer writes. Each is quantized exactly as the
standard graph it fuses: the same dequantized weights and the same corrected biases, where the bias sits in the
fused node (Attention's input 2) or scaled by it (FusedMatMul's alpha)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from builders import recipe
from onnx import TensorProto, helper, numpy_helper
from test_pipeline import _dequantized_reference

from onnxcomq import run
from onnxcomq.capture.session import make_session
from onnxcomq.graph.layers import find_layers

MS = "com.microsoft"


def _model(nodes, inits, x_shape, y_shape, contrib=True):
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
                          [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    ops = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(MS, 1)] if contrib else [])
    return helper.make_model(g, opset_imports=ops, ir_version=8)


def _weights(seed=0):
    rng = np.random.default_rng(seed)
    return dict(w1=rng.standard_normal((6, 3, 3, 3)), b1=rng.standard_normal(6), w2=rng.standard_normal((16, 216)) / 8,
                c2=rng.standard_normal(16), w3=rng.standard_normal((5, 16)) / 2, b3=rng.standard_normal(5))


def cnn_pair(seed=0):
    """(standard, fused): Conv + Relu -> Flatten -> Gemm(transB) + Relu -> 0.5 x MatMul -> Add, and the same as
    FusedConv -> Flatten -> FusedGemm -> FusedMatMul(transB, alpha 0.5) -> Add."""
    w = _weights(seed)
    std = _model([helper.make_node("Conv", ["x", "w1", "b1"], ["c"]), helper.make_node("Relu", ["c"], ["r"]),
                  helper.make_node("Flatten", ["r"], ["f"]),
                  helper.make_node("Gemm", ["f", "w2", "c2"], ["g"], transB=1), helper.make_node("Relu", ["g"], ["h"]),
                  helper.make_node("MatMul", ["h", "w3t"], ["m"]), helper.make_node("Add", ["m", "b3"], ["y"])],
                 dict(w1=w["w1"], b1=w["b1"], w2=w["w2"], c2=w["c2"], w3t=0.5 * w["w3"].T, b3=w["b3"]),
                 ["N", 3, 8, 8], ["N", 5], contrib=False)
    fused = _model([helper.make_node("FusedConv", ["x", "w1", "b1"], ["r"], domain=MS, activation="Relu"),
                    helper.make_node("Flatten", ["r"], ["f"]),
                    helper.make_node("FusedGemm", ["f", "w2", "c2"], ["h"], domain=MS, transB=1, activation="Relu"),
                    helper.make_node("FusedMatMul", ["h", "w3"], ["m"], domain=MS, transB=1, alpha=0.5),
                    helper.make_node("Add", ["m", "b3"], ["y"])], w, ["N", 3, 8, 8], ["N", 5])
    return std, fused


def _run(model, x):
    """The model's output on ``x`` (onnxruntime, exact int4 MatMul: accuracy level 0, as the check runs it)."""
    return make_session(model).run(None, {"x": x})[0]


def _bias(q, name):
    return numpy_helper.to_array(next(t for t in q.graph.initializer if t.name == name))


def _dq_weight(q, node_type):
    """The dequantized weight read by the node of ``node_type`` (computed from the stored codes)."""
    weights = _dequantized_reference(q)
    node = next(n for n in q.graph.node if n.op_type == node_type)
    return weights[node.input[1]]


def test_fused_layers_are_quantized_as_the_standard_graph_they_fuse():
    std, fused = cnn_pair()
    x = np.random.default_rng(1).standard_normal((48, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(_run(fused, x), _run(std, x), rtol=1e-5, atol=1e-5)
    layers, skipped = find_layers(fused)
    assert [(L.op_type, L.base) for L in layers] == [("FusedConv", "Conv"), ("FusedGemm", "Gemm"),
                                                     ("FusedMatMul", "MatMul")] and not skipped
    qs, rs = run(std, {"x": x}, recipe(bits=4))
    qf, rf = run(fused, {"x": x}, recipe(bits=4))
    for a, b in (("Conv", "FusedConv"), ("Gemm", "FusedGemm")):
        np.testing.assert_allclose(_dq_weight(qf, b), _dq_weight(qs, a), rtol=1e-6, atol=1e-7)
    # FusedMatMul(alpha 0.5, W3 stored N x K) against MatMul(0.5 W3^T): the same grid, halved
    np.testing.assert_allclose(0.5 * _dq_weight(qf, "FusedMatMul").T, _dq_weight(qs, "MatMul"), rtol=1e-6, atol=1e-7)
    # the corrected biases: in the fused nodes' own inputs, and the Add's scaled by alpha
    assert all(L.bias_corrected for L in rf.layers) and all(L.bias_corrected for L in rs.layers)
    for name in ("b1", "c2", "b3"):
        assert not np.allclose(_bias(qf, name), _weights()[name])
        np.testing.assert_allclose(_bias(qf, name), _bias(qs, name), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_run(qf, x), _run(qs, x), rtol=1e-4, atol=1e-4)


def attention_pair(d=8, heads=2, seq=5, seed=0):
    """(standard, fused): onnxruntime's Attention (packed Q, K, V weight d x 3d, bias 3d, no mask) and the same
    attention written in standard ops: MatMul + Add, then per head softmax(Q K^T / sqrt(d / heads)) V."""
    rng = np.random.default_rng(seed)
    w, b = rng.standard_normal((d, 3 * d)) / np.sqrt(d), rng.standard_normal(3 * d)
    fused = _model([helper.make_node("Attention", ["x", "w", "b"], ["y"], domain=MS, num_heads=heads)],
                   dict(w=w, b=b), ["N", seq, d], ["N", seq, d])
    hd = d // heads
    nodes = [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["qkv"]),
             helper.make_node("Split", ["qkv", "three"], ["q", "k", "v"], axis=2)]
    for t in "qkv":
        nodes += [helper.make_node("Reshape", [t, "heads"], [t + "r"]),
                  helper.make_node("Transpose", [t + "r"], [t + "h"], perm=[0, 2, 1, 3])]
    nodes += [helper.make_node("Transpose", ["kh"], ["kt"], perm=[0, 1, 3, 2]),
              helper.make_node("MatMul", ["qh", "kt"], ["s"]), helper.make_node("Mul", ["s", "scale"], ["ss"]),
              helper.make_node("Softmax", ["ss"], ["p"], axis=-1), helper.make_node("MatMul", ["p", "vh"], ["o"]),
              helper.make_node("Transpose", ["o"], ["ot"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["ot", "back"], ["y"])]
    std = _model(nodes, dict(w=w, b=b, scale=np.float32(1 / np.sqrt(hd))), ["N", seq, d], ["N", seq, d],
                 contrib=False)
    std.graph.initializer.extend([numpy_helper.from_array(np.array([d, d, d]), "three"),
                                  numpy_helper.from_array(np.array([0, seq, heads, hd]), "heads"),
                                  numpy_helper.from_array(np.array([0, seq, d]), "back")])
    return std, fused


def test_attention_packed_weight_is_quantized_as_a_matmul_with_its_bias_inside():
    """The transformer optimizer's Attention holds the Q, K, V projections (11.8 % of MiniLM's weights) that were
    left float; its weight is quantized like the MatMul it packs, the corrected bias goes into its input 2, and
    onnxruntime's Attention kernel runs on the DequantizeLinear output."""
    std, fused = attention_pair()
    x = np.random.default_rng(2).standard_normal((40, 5, 8)).astype(np.float32)
    np.testing.assert_allclose(_run(fused, x), _run(std, x), rtol=1e-4, atol=1e-5)
    qs, rs = run(std, {"x": x}, recipe(bits=4))
    qf, rf = run(fused, {"x": x}, recipe(bits=4))
    assert [(L.op_type, L.bias_corrected) for L in rf.layers] == [("Attention", True)]
    np.testing.assert_allclose(_dq_weight(qf, "Attention"), _dq_weight(qs, "MatMul"), rtol=1e-6, atol=1e-7)
    attention = next(n for n in qf.graph.node if n.op_type == "Attention")
    np.testing.assert_allclose(_bias(qf, attention.input[2]), _bias(qs, "b"), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_run(qf, x), _run(qs, x), rtol=1e-4, atol=1e-4)
    assert rf.verification["outputs"][0]["cosine"] > 0.99


def test_fused_matmul_with_a_transposed_input_is_left_float_and_said_why():
    std, fused = cnn_pair()
    mm = next(n for n in fused.graph.node if n.op_type == "FusedMatMul")
    mm.attribute.append(helper.make_attribute("transBatchA", 1))
    layers, skipped = find_layers(fused)
    assert "FusedMatMul" not in [L.op_type for L in layers]
    assert [s.reason for s in skipped if s.op_type == "FusedMatMul"] == \
        ["FusedMatMul with a transposed input A (transA, transBatchA or transBatchB set)"]


def test_activations_after_fused_layers_are_typed_by_onnxruntimes_shape_inference():
    """onnx's shape inference knows no type of a contrib op's output, nor of anything computed from it: the
    MatMul after a FusedConv found no activation to quantize ("no activation tensor to quantize")."""
    w = _weights()
    m = _model([helper.make_node("FusedConv", ["x", "w1", "b1"], ["r"], domain=MS, activation="Relu"),
                helper.make_node("Flatten", ["r"], ["f"]), helper.make_node("MatMul", ["f", "w2t"], ["m"]),
                helper.make_node("Add", ["m", "c2"], ["y"])], dict(w1=w["w1"], b1=w["b1"], w2t=w["w2"].T,
                                                                 c2=w["c2"]), ["N", 3, 8, 8], ["N", 16])
    assert not {vi.name for vi in onnx.shape_inference.infer_shapes(m).graph.value_info} & {"r", "f"}
    x = np.random.default_rng(1).standard_normal((32, 3, 8, 8)).astype(np.float32)
    q, rep = run(m, {"x": x}, recipe(bits=8, act_bits=8))
    quantized = {n.input[0] for n in q.graph.node if n.op_type == "QuantizeLinear"}
    assert "f" in quantized and rep.verification["outputs"][0]["cosine"] > 0.99


def _saved_by_onnxruntime(path: str, tmp_path, level: str) -> onnx.ModelProto:
    """The model as onnxruntime's CPU session saves it optimized at ``level`` (a GraphOptimizationLevel name)."""
    import onnxruntime as ort

    out = str(tmp_path / f"{level}.onnx")
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    so.optimized_model_filepath = out
    ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return onnx.load(out)


def test_a_graph_saved_by_onnxruntimes_optimizer_quantizes_as_the_original(tmp_path):
    """The shipped CNN saved by onnxruntime at ORT_ENABLE_EXTENDED (5 Conv + Relu become FusedConv): every layer is
    quantized, to the same weights as the original graph's, and the outputs agree."""
    optimized = _saved_by_onnxruntime("models/fmnist_cnn.onnx", tmp_path, "ORT_ENABLE_EXTENDED")
    assert sum(n.op_type == "FusedConv" for n in optimized.graph.node) == 5
    r = recipe(bits=4, max_samples=32)
    qo, ro = run(optimized, "models/fmnist_calib.npz", r)
    qs, rs = run("models/fmnist_cnn.onnx", "models/fmnist_calib.npz", r)
    assert [L.op_type for L in ro.layers] == ["FusedConv"] * 5 + ["Gemm"] and not ro.skipped
    wo, ws = _dequantized_reference(qo), _dequantized_reference(qs)
    nodes_o, nodes_s = ({n.name: n for n in q.graph.node} for q in (qo, qs))
    for a, b in zip(ro.layers, rs.layers):
        np.testing.assert_allclose(wo[nodes_o[a.node].input[1]], ws[nodes_s[b.node].input[1]], rtol=1e-5, atol=1e-6)
    x = np.load("models/fmnist_test.npz")["input"][:64]
    np.testing.assert_allclose(make_session(qo).run(None, {"input": x})[0],
                               make_session(qs).run(None, {"input": x})[0], rtol=1e-3, atol=1e-3)


def ffn_pair(d=8, hidden=16, seed=0):
    """(standard, fused): a transformer FFN with its residual LayerNorm, x -> MatMul(W1) + b1 -> Gelu -> MatMul(W2)
    + b2 -> + x -> LayerNorm, and as onnxruntime's transformer optimizer writes it, the biases moved into
    BiasGelu(h, b1) and SkipLayerNormalization(h2, x, gamma, beta, b2)."""
    rng = np.random.default_rng(seed)
    w = dict(w1=rng.standard_normal((d, hidden)) / np.sqrt(d), b1=rng.standard_normal(hidden),
             w2=rng.standard_normal((hidden, d)) / np.sqrt(hidden), b2=rng.standard_normal(d),
             gamma=1 + 0.1 * rng.standard_normal(d), beta=0.1 * rng.standard_normal(d))
    std = _model([helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["hb"]),
                  helper.make_node("Div", ["hb", "sqrt2"], ["hs"]), helper.make_node("Erf", ["hs"], ["he"]),
                  helper.make_node("Add", ["he", "one"], ["h1"]), helper.make_node("Mul", ["hb", "h1"], ["hm"]),
                  helper.make_node("Mul", ["hm", "half"], ["g"]), helper.make_node("MatMul", ["g", "w2"], ["h2"]),
                  helper.make_node("Add", ["h2", "b2"], ["h2b"]), helper.make_node("Add", ["h2b", "x"], ["s"]),
                  helper.make_node("LayerNormalization", ["s", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-5)],
                 dict(w, sqrt2=np.float32(np.sqrt(2)), one=np.float32(1), half=np.float32(0.5)),
                 ["N", 5, d], ["N", 5, d], contrib=False)
    fused = _model([helper.make_node("MatMul", ["x", "w1"], ["h"]),
                    helper.make_node("BiasGelu", ["h", "b1"], ["g"], domain=MS),
                    helper.make_node("MatMul", ["g", "w2"], ["h2"]),
                    helper.make_node("SkipLayerNormalization", ["h2", "x", "gamma", "beta", "b2"], ["y"], domain=MS,
                                     epsilon=1e-5)], w, ["N", 5, d], ["N", 5, d])
    return std, fused


def test_biases_fused_into_bias_gelu_and_skip_layer_norm_are_corrected():
    """The transformer optimizer moves each MatMul's bias into the BiasGelu or SkipLayerNormalization that follows:
    the free bias was off for 18 of MiniLM's 24 fused layers (W4 cosine 0.9815 against 0.9851 with it). It is
    corrected there now, to the values the standard graph's Add constants get."""
    std, fused = ffn_pair()
    x = np.random.default_rng(3).standard_normal((40, 5, 8)).astype(np.float32)
    np.testing.assert_allclose(_run(fused, x), _run(std, x), rtol=1e-4, atol=1e-4)
    qs, rs = run(std, {"x": x}, recipe(bits=4))
    qf, rf = run(fused, {"x": x}, recipe(bits=4))
    assert all(L.bias_corrected for L in rf.layers) and all(L.bias_corrected for L in rs.layers)
    for name in ("b1", "b2"):
        assert not np.allclose(_bias(qf, name), _bias(fused, name))
        np.testing.assert_allclose(_bias(qf, name), _bias(qs, name), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_run(qf, x), _run(qs, x), rtol=1e-3, atol=1e-3)


def test_an_op_of_another_domain_is_not_taken_for_the_standard_op(tmp_path):
    """onnxruntime's graph saved at ORT_ENABLE_ALL holds com.microsoft.nchwc Conv nodes, whose weights and
    activations are in a blocked layout; they were taken for Conv layers (captured and quantized in the wrong
    layout: W4 cosine to float 0.21 on EfficientNet-Lite0, refused by the check). Now they are left float, said
    why, and the rest is quantized."""
    w = _weights()
    custom = _model([helper.make_node("Conv", ["x", "w1", "b1"], ["c"], domain="my.domain"),
                     helper.make_node("Flatten", ["c"], ["f"]), helper.make_node("Gemm", ["f", "w2", "c2"], ["y"],
                                                                                 transB=1)],
                    dict(w1=w["w1"], b1=w["b1"], w2=w["w2"], c2=w["c2"]), ["N", 3, 8, 8], ["N", 16], contrib=False)
    custom.opset_import.append(helper.make_opsetid("my.domain", 1))
    layers, skipped = find_layers(custom)
    assert [L.op_type for L in layers] == ["Gemm"] and [s.op_type for s in skipped] == ["Conv"]
    saved = _saved_by_onnxruntime("models/fmnist_cnn.onnx", tmp_path, "ORT_ENABLE_ALL")
    nchwc = [n for n in saved.graph.node if n.domain == "com.microsoft.nchwc" and n.op_type == "Conv"]
    if not nchwc:
        pytest.skip("onnxruntime wrote no NCHWc nodes on this CPU")
    q, rep = run(saved, "models/fmnist_calib.npz", recipe(bits=4, max_samples=32))
    assert [L.op_type for L in rep.layers] == ["Gemm"]
    assert {s["node"] for s in rep.skipped} == {n.name for n in nchwc}
    assert all("NCHWc" in s["reason"] for s in rep.skipped) and rep.verification["outputs"][0]["cosine"] > 0.99
