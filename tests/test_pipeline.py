"""Graph walk, streaming capture, QDQ emission and the Python API, on small hand-built models."""

import os

import builders
import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import recipe
from onnx import numpy_helper

from onnxcomq import UserError, quantize, run
from onnxcomq.capture.calib import Calibration, model_inputs
from onnxcomq.capture.passes import collect_stats
from onnxcomq.capture.rows import im2col
from onnxcomq.graph.layers import find_layers, load_weight
from onnxcomq.graph.modelio import prepare_model
from onnxcomq.write.qdq import QuantizedWeight, with_float_weights


def ort_run(model, feed):
    so = ort.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feed)


CONV_CASES = [
    # x_shape, w_shape, attrs
    ((2, 3, 9, 9), (4, 3, 3, 3), dict(pads=[1, 1, 1, 1])),
    ((2, 3, 10, 11), (5, 3, 3, 2), dict(strides=[2, 3], pads=[1, 0, 2, 1])),
    ((1, 4, 12, 12), (6, 4, 3, 3), dict(dilations=[2, 2], pads=[2, 2, 2, 2])),
    ((2, 6, 8, 8), (6, 1, 3, 3), dict(group=6, pads=[1, 1, 1, 1])),  # depthwise
    ((2, 6, 8, 8), (9, 2, 3, 3), dict(group=3, strides=[2, 2])),  # grouped
    ((2, 5, 7, 7), (8, 5, 1, 1), {}),  # pointwise
    ((2, 5, 7, 7), (8, 5, 1, 1), dict(strides=[2, 2])),
    ((2, 3, 9, 8), (4, 3, 3, 3), dict(auto_pad="SAME_UPPER", strides=[2, 2])),
    ((2, 3, 9, 8), (4, 3, 4, 4), dict(auto_pad="SAME_LOWER")),
    ((2, 3, 9, 8), (4, 3, 3, 3), dict(auto_pad="VALID")),
    ((3, 4, 20), (5, 4, 3), dict(pads=[1, 1], strides=[2])),  # Conv1d
]


@pytest.mark.parametrize("x_shape,w_shape,attrs", CONV_CASES)
def test_im2col_reproduces_onnxruntime_conv(x_shape, w_shape, attrs):
    rng = np.random.default_rng(len(attrs))
    w = rng.standard_normal(w_shape).astype(np.float32)
    model = builders.conv_model(x_shape, w, bias=False, kernel_shape=list(w_shape[2:]), **attrs)
    x = rng.standard_normal(x_shape).astype(np.float32)
    (y,) = ort_run(model, {"input": x})
    layers, _ = find_layers(model)
    spec = layers[0].x
    X = im2col(x, spec)  # (rows, groups, n)
    mats = layers[0].to_matrices(w)
    outs = [X[:, k] @ mats[k].T for k in range(len(mats))]  # (rows, O_k) each
    got = np.concatenate(outs, axis=1)  # (rows, O)
    want = np.moveaxis(y, 1, -1).reshape(-1, w_shape[0])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


CONVT_CASES = [
    ((2, 3, 5, 5), (3, 4, 3, 3), dict(strides=[2, 2])),
    ((2, 3, 5, 6), (3, 2, 3, 3), dict(strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1])),
    ((1, 4, 4, 4), (4, 3, 2, 2), dict(strides=[2, 2])),
    ((2, 2, 6, 5), (2, 5, 3, 2), dict(dilations=[2, 1], pads=[0, 1, 2, 0])),
    ((2, 3, 9), (3, 2, 4), dict(strides=[3], pads=[4, 5])),  # pads larger than d*(k-1): crop
]


@pytest.mark.parametrize("x_shape,w_shape,attrs", CONVT_CASES)
def test_convtranspose_equivalent_conv_reproduces_onnxruntime(x_shape, w_shape, attrs):
    from onnxcomq.capture.rows import convtranspose_as_conv

    rng = np.random.default_rng(3)
    w = rng.standard_normal(w_shape).astype(np.float32)
    model = builders.conv_model(x_shape, w, bias=False, op="ConvTranspose", kernel_shape=list(w_shape[2:]), **attrs)
    x = rng.standard_normal(x_shape).astype(np.float32)
    (y,) = ort_run(model, {"input": x})
    (layer,), _ = find_layers(model)
    assert layer.axis == 1 and layer.out_channels == w_shape[1]
    up, spec = convtranspose_as_conv(x, layer.x)
    X = im2col(up, spec)
    (mat,) = layer.to_matrices(w)
    np.testing.assert_array_equal(layer.from_matrices([mat]), w)
    got = X[:, 0] @ mat.T
    np.testing.assert_allclose(got, np.moveaxis(y, 1, -1).reshape(-1, w_shape[1]), rtol=1e-4, atol=1e-4)


def test_convtranspose_quantized_end_to_end():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((3, 4, 3, 3)).astype(np.float32)
    model = builders.conv_model((2, 3, 5, 5), w, op="ConvTranspose", kernel_shape=[3, 3], strides=[2, 2],
                                pads=[1, 1, 1, 1])
    x = rng.standard_normal((6, 3, 5, 5)).astype(np.float32)
    q, rep = run(model, {"input": x}, recipe(bits=4, device="cpu"))
    onnx.checker.check_model(q, full_check=True)
    dq = next(n for n in q.graph.node if n.op_type == "DequantizeLinear")
    assert next(a.i for a in dq.attribute if a.name == "axis") == 1
    (yq,) = ort_run(q, {"input": x})
    (yr,) = ort_run(float_twin(q), {"input": x})
    np.testing.assert_allclose(yq, yr, rtol=1e-5, atol=1e-5)
    assert rep.layers[0].comq_error < rep.layers[0].rtn_error


def test_streaming_gram_equals_direct_and_is_batch_invariant():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 2, 3, 3)).astype(np.float32)
    model = builders.conv_model((10, 4, 6, 6), w, group=2, pads=[1, 1, 1, 1], strides=[2, 1],
                                kernel_shape=[3, 3])
    x = rng.standard_normal((10, 4, 6, 6)).astype(np.float32)
    layer = find_layers(model)[0][0]
    X = im2col(x, layer.x).astype(np.float64)
    inputs = model_inputs(model)
    results = []
    for bs in (1, 3, 10):
        stats, n = collect_stats(model, {layer.x: 2}, Calibration({"input": x}, inputs, batch_size=bs))
        assert n == 10
        results.append(stats[layer.x])
    for st in results:
        assert st.rows == X.shape[0]
        for k in range(2):
            np.testing.assert_allclose(st.G[k], X[:, k].T @ X[:, k], rtol=1e-5, atol=1e-4)
            np.testing.assert_allclose(st.sums[k], X[:, k].sum(0), rtol=1e-5, atol=1e-4)
            Xc = X[:, k] - X[:, k].mean(0)
            np.testing.assert_allclose(st.centered(k), Xc.T @ Xc, rtol=1e-5, atol=1e-3)


def test_matmul_rows_flatten_leading_dims():
    model = builders.mlp_model([8, 5, 3], seq=4)
    x = np.random.default_rng(1).standard_normal((3, 4, 8)).astype(np.float32)
    layer = find_layers(model)[0][0]
    stats, _ = collect_stats(model, {layer.x: 1}, Calibration({"input": x}, model_inputs(model), batch_size=2))
    X = x.reshape(-1, 8).astype(np.float64)
    np.testing.assert_allclose(stats[layer.x].G[0], X.T @ X, rtol=1e-5)
    assert stats[layer.x].rows == 12


def test_graph_walk_layouts_and_skips():
    m = builders.mlp_model([6, 5, 4, 3, 2], gemm_transb=(1, 0))
    layers, skipped = find_layers(m)
    got = {(L.node, L.op_type, L.axis) for L in layers}
    assert got == {("gemm0", "Gemm", 0), ("matmul1", "MatMul", 1), ("gemm2", "Gemm", 1), ("matmul3", "MatMul", 1)}
    for L in layers:
        w = load_weight(m, L.weight)
        (mat,) = L.to_matrices(w)
        assert mat.shape == (L.out_channels, L.x.fan_in)
        np.testing.assert_array_equal(L.from_matrices([mat]), w)
    attn = builders.attention_like()
    layers, skipped = find_layers(attn)
    assert sorted(L.node for L in layers) == ["k_proj", "q_proj", "v_proj"]
    assert {s.node: s.reason for s in skipped}["qk"].startswith("weight is not a constant")
    layers, skipped = find_layers(attn, exclude=("k_*",))
    assert "k_proj" in {s.node for s in skipped if "exclude" in s.reason}
    layers, _ = find_layers(m, op_types=("MatMul",))
    assert {L.op_type for L in layers} == {"MatMul"}
    with pytest.raises(UserError, match="unsupported op type"):
        find_layers(m, op_types=("Conv2d",))


@pytest.mark.parametrize("variant", ["constant_nodes", "identity"])
def test_constant_and_identity_weights_are_found(variant):
    m = builders.mlp_model([6, 5, 4], **{variant: True})
    base = builders.mlp_model([6, 5, 4])
    prepared = prepare_model(m)
    layers, _ = find_layers(prepared)
    assert len(layers) == 2
    x = np.random.default_rng(0).standard_normal((5, 6)).astype(np.float32)
    np.testing.assert_allclose(ort_run(prepared, {"input": x})[0], ort_run(base, {"input": x})[0], rtol=1e-6)
    q = quantize(m, {"input": x}, recipe(bits=8, device="cpu"))
    assert sum(n.op_type == "DequantizeLinear" for n in q.graph.node) == 2


def test_shared_weight_quantized_once_with_summed_statistics():
    m = builders.mlp_model([6, 6, 6, 6], seq=3, shared=True)
    layers, _ = find_layers(m)
    shared = [L for L in layers if len(L.consumers) == 2]
    assert len(shared) == 1 and shared[0].weight == "W0"
    x = np.random.default_rng(0).standard_normal((8, 3, 6)).astype(np.float32)
    q, rep = run(m, {"input": x}, recipe(bits=4, device="cpu"))
    dq = [n for n in q.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 2 and sorted(n.output[0] for n in dq) == ["W0", "W1"]
    lr = {L.weight: L for L in rep.layers}["W0"]
    assert sorted(lr.consumers) == ["matmul0", "matmul2"]
    # the rows of both consumers were used
    assert lr.rows == 2 * 8 * 3


def _dequantized_reference(qmodel):
    """Float model carrying the dequantized weights, computed here from the stored codes."""
    inits = {t.name: t for t in qmodel.graph.initializer}
    weights = {}
    for n in qmodel.graph.node:
        if n.op_type != "DequantizeLinear":
            continue
        codes = numpy_helper.to_array(inits[n.input[0]]).astype(np.float32)
        scale = numpy_helper.to_array(inits[n.input[1]]).astype(np.float32)
        zp = numpy_helper.to_array(inits[n.input[2]]).astype(np.float32)
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        shape = [1] * codes.ndim
        if scale.ndim:
            shape[axis] = -1
        weights[n.output[0]] = (codes - zp.reshape(shape)) * scale.reshape(shape)
    return weights


def float_twin(qmodel):
    """The quantized model with every DequantizeLinear replaced by its float result (computed here): the float
    model carrying the dequantized weights (and whatever else the quantizer changed, e.g. biases)."""
    weights = _dequantized_reference(qmodel)
    out = onnx.ModelProto()
    out.CopyFrom(qmodel)
    dq = [n for n in out.graph.node if n.op_type == "DequantizeLinear"]
    drop = {i for n in dq for i in n.input}
    for n in dq:
        out.graph.node.remove(n)
    keep = [t for t in out.graph.initializer if t.name not in drop]
    del out.graph.initializer[:]
    out.graph.initializer.extend(keep)
    for name, w in weights.items():
        out.graph.initializer.append(numpy_helper.from_array(w.astype(np.float32), name))
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("scheme,granularity", [("asym", "channel"), ("sym", "channel"), ("asym", "tensor")])
def test_emitted_model_runs_and_equals_dequantized_float(tmp_path, bits, scheme, granularity):
    rng = np.random.default_rng(bits)
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    conv = builders.conv_model((4, 3, 8, 8), w, kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    x = rng.standard_normal((6, 3, 8, 8)).astype(np.float32)
    cfg = recipe(bits=bits, scheme=scheme, granularity=granularity, device="cpu")
    q, rep = run(conv, {"input": x}, cfg)
    onnx.checker.check_model(q, full_check=True)
    opset = next(o.version for o in q.opset_import if o.domain in ("", "ai.onnx"))
    assert opset >= (21 if bits <= 4 else 13)
    assert "W" not in {t.name for t in q.graph.initializer}  # the float weight is gone
    codes = next(t for t in q.graph.initializer if t.name == "W_quantized")
    want = {(True, True): onnx.TensorProto.INT4, (True, False): onnx.TensorProto.UINT4,
            (False, True): onnx.TensorProto.INT8, (False, False): onnx.TensorProto.UINT8}[(bits <= 4, scheme == "sym")]
    assert codes.data_type == want
    if bits <= 4:
        assert len(codes.raw_data) == (w.size + 1) // 2  # two codes per byte
    assert [i.name for i in q.graph.input] == ["input"] and [o.name for o in q.graph.output] == ["output"]
    meta = {p.key: p.value for p in q.metadata_props}
    assert "onnxcomq.version" in meta and f'"bits": {bits}' in meta["onnxcomq.config"]
    (yq,) = ort_run(q, {"input": x})
    ref = float_twin(q)
    (yr,) = ort_run(ref, {"input": x})
    np.testing.assert_allclose(yq, yr, rtol=1e-5, atol=1e-5)
    # and the dequantized weights are what the solver returned (layer error matches the report)
    deq = _dequantized_reference(q)["W"]
    assert np.abs(deq - w).max() <= np.abs(w).max()  # sanity: the same tensor, quantized
    assert rep.layers[0].comq_error <= rep.layers[0].rtn_error


def test_int4_packing_roundtrip():
    rng = np.random.default_rng(0)
    codes = rng.integers(-8, 8, size=(5, 3, 3, 3))
    qw = QuantizedWeight("W", codes, np.ones(5, np.float32), np.zeros(5, np.int64), 0, 4, signed=True)
    t = numpy_helper.from_array(codes.astype(qw.code_dtype()), "c")
    packed = np.frombuffer(t.raw_data, np.uint8)
    flat = codes.reshape(-1)
    low = (packed & 0x0F).astype(np.int16)
    low = np.where(low >= 8, low - 16, low)
    np.testing.assert_array_equal(low[: (flat.size + 1) // 2], flat[0::2])  # element 0 in the low nibble
    np.testing.assert_array_equal(numpy_helper.to_array(t).astype(np.int64), codes)
    assert qw.code_dtype() is ml_dtypes.int4


def test_opset_11_model_is_converted_not_renumbered():
    m = builders.mlp_model([6, 5, 4], opset=11)
    x = np.random.default_rng(0).standard_normal((5, 6)).astype(np.float32)
    q = quantize(m, {"input": x}, recipe(bits=4, device="cpu"))
    onnx.checker.check_model(q, full_check=True)
    assert max(o.version for o in q.opset_import if o.domain in ("", "ai.onnx")) == 21
    assert np.isfinite(ort_run(q, {"input": x})[0]).all()


def test_input_model_never_modified_and_quantize_is_deterministic():
    m = builders.mlp_model([6, 5, 4], constant_nodes=True)
    before = m.SerializeToString()
    x = np.random.default_rng(0).standard_normal((7, 6)).astype(np.float32)
    q1 = quantize(m, {"input": x}, recipe(bits=3, device="cpu"))
    q2 = quantize(m, {"input": x}, recipe(bits=3, device="cpu"))
    assert m.SerializeToString() == before
    assert q1.SerializeToString() == q2.SerializeToString()


def test_official_preset_is_a_starting_point_not_an_override():
    """The preset sets the official code's solver; a field set after it changes that field only (it used to be
    silently ignored)."""
    from onnxcomq import Recipe

    s = Recipe.official(bits=3).solver_config()
    assert (s.bits, s.order, s.sweeps, s.scheme, s.scale_update, s.granularity, s.zero_in_range, s.lambda_search) == \
        (3, "greedy", 1, "asym", False, "channel", False, False)
    s = recipe(bits=3, official=True, sweeps=5).solver_config()
    assert (s.order, s.sweeps, s.scheme, s.scale_update) == ("greedy", 5, "asym", False)


def test_no_quantizable_layer_is_a_clear_error():
    m = builders.attention_like()
    with pytest.raises(UserError, match="no quantizable layer"):
        run(m, "random", recipe(exclude=("*_proj",), device="cpu"))


def test_rtn_method_matches_nearest_grid_point():
    m = builders.mlp_model([6, 5, 4])
    x = np.random.default_rng(0).standard_normal((9, 6)).astype(np.float32)
    q, rep = run(m, {"input": x}, recipe(bits=4, method="rtn", device="cpu"))
    deq = _dequantized_reference(q)
    w = load_weight(m, "W0")  # Gemm transB=1: rows are output channels
    step = (np.maximum(w.max(1), 0) - np.minimum(w.min(1), 0)) / 15
    assert np.all(np.abs(deq["W0"] - w) <= step[:, None] / 2 + 1e-6)
    for L in rep.layers:
        assert L.comq_error == pytest.approx(L.rtn_error)


@pytest.mark.parametrize("writer", ["savez", "savez_compressed", "fortran"])
def test_npz_is_streamed_in_batches_and_equals_in_memory(tmp_path, writer):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((23, 6)).astype(np.float32)
    path = tmp_path / "c.npz"
    if writer == "fortran":
        np.savez(path, input=np.asfortranarray(x))
    else:
        getattr(np, writer)(path, input=x)
    m = builders.mlp_model([6, 5, 4])
    inputs = model_inputs(m)
    cal = Calibration(str(path), inputs, batch_size=5, max_samples=17)
    assert cal.num_samples == 17
    batches = list(cal)
    assert [b["input"].shape[0] for b in batches] == [5, 5, 5, 2]
    np.testing.assert_array_equal(np.concatenate([b["input"] for b in batches]), x[:17])
    assert list(cal)[0]["input"].shape == (5, 6)  # re-iterable
    a = quantize(m, str(path), recipe(bits=4, device="cpu", batch_size=4))
    b = quantize(m, {"input": x}, recipe(bits=4, device="cpu", batch_size=4))
    assert a.SerializeToString() == b.SerializeToString()


@pytest.mark.parametrize("bits", [4, 8])
def test_official_grid_without_zero_is_stored_as_signed_levels(bits):
    """The official min-max grid of an all-positive row does not contain 0: its zero point does not fit the b-bit
    type, so that weight is stored as signed levels (int8 or int16) with zero point 0, exactly."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    w[1] = np.abs(w[1]) + 0.5
    conv = builders.conv_model((2, 3, 6, 6), w, kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    x = rng.standard_normal((5, 3, 6, 6)).astype(np.float32)
    q, _ = run(conv, {"input": x}, recipe(bits=bits, official=True, device="cpu"))
    onnx.checker.check_model(q, full_check=True)
    codes = next(t for t in q.graph.initializer if t.name == "W_quantized")
    levels = numpy_helper.to_array(codes)
    # the smallest signed type that holds the levels (an 8-bit grid shifted above 0 needs int16)
    want = onnx.TensorProto.INT8 if levels.min() >= -128 and levels.max() <= 127 else onnx.TensorProto.INT16
    assert codes.data_type == want and (bits == 8 or want == onnx.TensorProto.INT8)
    zp = numpy_helper.to_array(next(t for t in q.graph.initializer if t.name == "W_zero_point"))
    assert (zp == 0).all()
    (yq,) = ort_run(q, {"input": x})
    (yr,) = ort_run(float_twin(q), {"input": x})
    np.testing.assert_allclose(yq, yr, rtol=1e-5, atol=1e-5)
    deq = _dequantized_reference(q)["W"]
    assert deq[1].min() > 0  # the positive row's grid starts above 0


def test_if_branch_weights_quantized_where_calibration_takes_the_branch_the_other_left_float_and_reported():
    """Branch weights held as the branch subgraph's own initializers (tests/test_branches.py: outer initializers and
    Constant nodes)."""
    m = builders.with_if_subgraph()
    x = np.random.default_rng(0).standard_normal((7, 6)).astype(np.float32)
    taken = "then" if (x @ numpy_helper.to_array(m.graph.initializer[0])).sum() > 0 else "else"
    other = {"then": "else", "else": "then"}[taken]
    q, rep = run(m, {"input": x}, recipe(bits=4, device="cpu"))
    onnx.checker.check_model(q, full_check=True)
    assert [L.node for L in rep.layers] == ["top_mm", f"branch/{taken}_branch/{taken}_mm"]
    assert [(s["node"], s["op_type"]) for s in rep.skipped] == [(f"branch/{other}_branch/{other}_mm", "MatMul")]
    assert "no calibration batch took" in rep.skipped[0]["reason"]
    branches = {a.name: a.g for n in q.graph.node if n.op_type == "If" for a in n.attribute}
    assert [n.op_type for n in branches[f"{taken}_branch"].node] == ["DequantizeLinear", "MatMul"]
    assert [n.op_type for n in branches[f"{other}_branch"].node] == ["MatMul"]
    (yq,) = ort_run(q, {"input": x})
    # (the float model with the top-level weight dequantized, and the branch's taken from the quantized branch)
    twin = float_twin(q)
    for n in twin.graph.node:
        if n.op_type == "If":
            for a in n.attribute:
                if a.name == f"{taken}_branch":
                    a.g.CopyFrom(float_twin(onnx.helper.make_model(a.g)).graph)
    (yr,) = ort_run(twin, {"input": x})
    np.testing.assert_allclose(yq, yr, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [4, 8])
def test_float16_model_keeps_its_precision(bits):
    m16 = builders.to_float16(builders.mlp_model([8, 6, 5], seq=3))
    x = np.random.default_rng(0).standard_normal((9, 3, 8)).astype(np.float16)
    q, rep = run(m16, {"input": x}, recipe(bits=bits, device="cpu", bias_correction=False))
    onnx.checker.check_model(q, full_check=True)
    assert len(rep.layers) == 2
    qb, repb = run(m16, {"input": x}, recipe(bits=bits, device="cpu"))  # the re-fitted biases stay float16
    onnx.checker.check_model(qb, full_check=True)
    assert all(L.bias_corrected for L in repb.layers)
    assert {t.name: t.data_type for t in qb.graph.initializer}["b0"] == onnx.TensorProto.FLOAT16
    assert ort_run(qb, {"input": x})[0].dtype == np.float16
    inits = {t.name: t for t in q.graph.initializer}
    for n in q.graph.node:
        if n.op_type == "DequantizeLinear":
            assert inits[n.input[1]].data_type == onnx.TensorProto.FLOAT16  # scale, so the output, is float16
    assert inits["b0"].data_type == onnx.TensorProto.FLOAT16  # the rest of the graph stays float16
    (yq,) = ort_run(q, {"input": x})
    assert yq.dtype == np.float16
    (yr,) = ort_run(with_float_weights(builders.mlp_model([8, 6, 5], seq=3),
                                       {k: v.astype(np.float32) for k, v in _dequantized_reference(q).items()}),
                    {"input": x.astype(np.float32)})
    np.testing.assert_allclose(yq.astype(np.float32), yr, rtol=2e-2, atol=2e-2)
    for L in rep.layers:
        assert L.comq_error <= L.rtn_error


def test_external_data_model_in_and_out(tmp_path, monkeypatch):
    """A model whose weights live in an external data file; the large-model paths (sessions, shape inference and
    saving through files with external data) are exercised by lowering the size threshold."""
    from onnxcomq.graph import modelio
    from onnxcomq.graph.modelio import load_model, save_model

    m = builders.mlp_model([64, 48, 32], seq=4)
    src = tmp_path / "src"
    src.mkdir()
    onnx.save(m, src / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True, location="m.data",
              size_threshold=0)
    assert (src / "m.data").stat().st_size > 64 * 48 * 4
    before = {f: (src / f).read_bytes() for f in ("m.onnx", "m.data")}
    x = np.random.default_rng(0).standard_normal((6, 4, 64)).astype(np.float32)
    small = quantize(str(src / "m.onnx"), {"input": x}, recipe(bits=4, device="cpu"))
    monkeypatch.setattr(modelio, "LARGE_MODEL_BYTES", 1000)
    big = quantize(str(src / "m.onnx"), {"input": x}, recipe(bits=4, device="cpu"))
    assert big.SerializeToString() == small.SerializeToString()
    out = tmp_path / "out" / "q.onnx"
    out.parent.mkdir()
    save_model(big, out)  # large: tensors go to q.onnx.data
    assert sorted(os.listdir(out.parent)) == ["q.onnx", "q.onnx.data"]
    onnx.checker.check_model(str(out), full_check=True)
    loaded = load_model(str(out))
    (yq,) = ort_run(loaded, {"input": x})
    (ys,) = ort_run(small, {"input": x})
    np.testing.assert_array_equal(yq, ys)
    assert {f: (src / f).read_bytes() for f in ("m.onnx", "m.data")} == before


def _single_layer_models():
    rng = np.random.default_rng(7)
    w = rng.standard_normal((6, 3, 3, 3)).astype(np.float32)
    wt = rng.standard_normal((3, 4, 3, 3)).astype(np.float32)
    return {
        "conv": (builders.conv_model((2, 3, 7, 7), w, kernel_shape=[3, 3], pads=[1, 1, 1, 1]), (5, 3, 7, 7)),
        "conv_nobias": (builders.conv_model((2, 3, 7, 7), w, bias=False, kernel_shape=[3, 3], strides=[2, 2]),
                        (5, 3, 7, 7)),
        "depthwise": (builders.conv_model((2, 3, 7, 7), w[:3, :1], kernel_shape=[3, 3], group=3), (5, 3, 7, 7)),
        "convT": (builders.conv_model((2, 3, 5, 5), wt, op="ConvTranspose", kernel_shape=[3, 3], strides=[2, 2]),
                  (5, 3, 5, 5)),
        "gemm": (builders.mlp_model([7, 5]), (40, 7)),
        "matmul_add": (builders.mlp_model([7, 5], seq=3), (20, 3, 7)),
        "matmul_alone": (builders.attention_like(d=8, seq=3), (20, 3, 8)),
    }


NO_BIAS = ("conv_nobias", "matmul_alone")


@pytest.mark.parametrize("kind", [k for k in _single_layer_models() if k not in NO_BIAS])
def test_free_bias_removes_the_mean_output_error(kind):
    model, shape = _single_layer_models()[kind]
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(shape) + 0.7).astype(np.float32)  # a mean offset, as after ReLU
    if kind == "matmul_alone":  # check the q projection's own output
        model.graph.output.append(onnx.helper.make_tensor_value_info("q", onnx.TensorProto.FLOAT, [None] * 3))
    (yf, *rest_f) = ort_run(model, {"input": x})
    q_on, rep_on = run(model, {"input": x}, recipe(bits=3, device="cpu"))
    q_off, rep_off = run(model, {"input": x}, recipe(bits=3, device="cpu", bias_correction=False))
    onnx.checker.check_model(q_on, full_check=True)
    outs_on, outs_off = ort_run(q_on, {"input": x}), ort_run(q_off, {"input": x})
    yf_, yon, yoff = (yf, outs_on[0], outs_off[0]) if kind != "matmul_alone" else (rest_f[0], outs_on[1], outs_off[1])
    axis = 1 if kind.startswith("conv") or kind == "depthwise" else -1
    red = tuple(a for a in range(yf_.ndim) if a != axis % yf_.ndim)
    bias_on = np.abs((yon - yf_).mean(axis=red))
    bias_off = np.abs((yoff - yf_).mean(axis=red))
    assert bias_on.max() <= 1e-4 * max(1.0, np.abs(yf_).max()), (bias_on, bias_off)
    # COMQ is a heuristic on either Gram: the centered problem's optimum is never worse, the solver's result is
    # close to that (over all kinds it is clearly better: test_free_bias_helps_on_the_reference_cnn)
    mse_on, mse_off = np.mean((yon - yf_) ** 2), np.mean((yoff - yf_) ** 2)
    assert mse_on <= 1.05 * mse_off, (mse_on, mse_off)
    layer = rep_on.layers[0]
    assert layer.bias_corrected and not rep_off.layers[0].bias_corrected
    assert layer.comq_error <= layer.rtn_error
    # the bias initializers that were replaced are gone: nothing unused is left behind
    used = {i for n in q_on.graph.node for i in n.input}
    assert all(t.name in used for t in q_on.graph.initializer)


@pytest.mark.parametrize("kind", NO_BIAS)
def test_no_bias_is_added_to_a_layer_without_one(kind):
    """A bias-less layer maps zero to zero; a bias fitted to the calibration mean would not (issue 16): it is solved
    without the free bias, exactly as with bias_correction off, and zero input still gives the float output."""
    model, shape = _single_layer_models()[kind]
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(shape) + 0.7).astype(np.float32)
    q_on, rep_on = run(model, {"input": x}, recipe(bits=3, device="cpu"))
    q_off, _ = run(model, {"input": x}, recipe(bits=3, device="cpu", bias_correction=False))
    assert not rep_on.layers[0].bias_corrected
    assert q_on.SerializeToString() == q_off.SerializeToString()
    zero = np.zeros(shape, np.float32)
    for a, b in zip(ort_run(q_on, {"input": zero}), ort_run(model, {"input": zero})):
        np.testing.assert_array_equal(a, b)


def test_free_bias_off_for_official_and_shared_weights():
    m = builders.mlp_model([6, 6, 6, 6], seq=3, shared=True)
    x = np.random.default_rng(0).standard_normal((8, 3, 6)).astype(np.float32) + 1
    _, rep = run(m, {"input": x}, recipe(bits=4, device="cpu"))
    assert {L.weight: L.bias_corrected for L in rep.layers} == {"W0": False, "W1": True}
    _, rep = run(m, {"input": x}, recipe(bits=4, device="cpu", official=True))
    assert not any(L.bias_corrected for L in rep.layers)


def test_free_bias_helps_on_the_reference_cnn():
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "fmnist_cnn.onnx")
    calib = path.replace("fmnist_cnn.onnx", "fmnist_calib.npz")
    errs = {}
    for bc in (True, False):
        _, rep = run(path, calib, recipe(bits=3, device="cpu", max_samples=128, bias_correction=bc))
        errs[bc] = np.array([L.comq_error for L in rep.layers])
    assert (errs[True] <= errs[False]).all() and errs[True].sum() < 0.9 * errs[False].sum(), errs


@pytest.mark.parametrize("mask_input", ["auto", "attention_mask", "none"])
def test_padded_tokens_stay_out_of_the_statistics(mask_input):
    m = builders.masked_encoder()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 5, 8)).astype(np.float32)
    mask = np.ones((6, 5), np.int64)
    mask[:, 3:] = 0
    mask[0, 1:] = 0
    x[mask == 0] = 50.0  # padding with garbage activations: must not enter G
    (layer,), _ = find_layers(m)
    from onnxcomq.pipeline import resolve_mask_input

    name = resolve_mask_input(m, mask_input)
    stats, _ = collect_stats(m, {layer.x: 1}, Calibration({"input": x, "attention_mask": mask}, model_inputs(m),
                                                           batch_size=4), mask_input=name)
    X = x.reshape(-1, 8).astype(np.float64)
    if mask_input != "none":
        X = X[mask.reshape(-1) != 0]
    np.testing.assert_allclose(stats[layer.x].G[0], X.T @ X, rtol=1e-5)
    assert stats[layer.x].rows == X.shape[0]


def test_unknown_mask_input_is_a_clear_error():
    with pytest.raises(UserError, match="no such input"):
        run(builders.masked_encoder(), "random", recipe(mask_input="token_mask", device="cpu"))


def test_damping_helps_held_out_error_when_calibration_is_short():
    """Fan-in 64 and 24 calibration rows: G is rank-deficient and undamped COMQ fits the calibration noise."""
    m = builders.mlp_model([64, 16])
    rng = np.random.default_rng(3)
    mix = rng.standard_normal((64, 64)) / 8

    def data(n):
        return (rng.standard_normal((n, 64)) @ mix + 0.3).astype(np.float32)

    calib, held = data(24), data(4000)
    (yf,) = ort_run(m, {"input": held})
    errs, reps = {}, {}
    for d in (0.0, 0.1, "scaled"):
        q, reps[d] = run(m, {"input": calib}, recipe(bits=3, device="cpu", damping=d))
        (yq,) = ort_run(q, {"input": held})
        errs[d] = float(np.mean((yq - yf) ** 2))
    assert reps[0.1].layers[0].damped and not reps[0.0].layers[0].damped
    assert errs[0.1] < errs[0.0], errs
    assert reps["scaled"].layers[0].damping == pytest.approx(min(10, 3 * np.sqrt(64 / 24)))
    assert errs["scaled"] < errs[0.0], errs
    # and on the calibration rows themselves undamped COMQ looks better: the overfitting damping prevents
    assert reps[0.0].layers[0].comq_error <= reps[0.1].layers[0].comq_error
