"""Conv -> BatchNormalization folded before capture (graph/batchnorm.py): exact where it folds, left alone where a
fold would change what the model computes, and the W8A8 failure it removes (PaddleDetection's PicoDet, exported by
Paddle2ONNX with its batch norms as nodes)."""

import builders
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import recipe
from onnx import TensorProto, helper, numpy_helper

from onnxcomq import run
from onnxcomq.cli import main
from onnxcomq.graph.batchnorm import fold_batch_norms

RNG = np.random.default_rng(0)


def _vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _arr(a, name):
    return numpy_helper.from_array(np.asarray(a, np.float32), name)


def conv_bn(groups=1, bias=True, dims=2, loud=1.0, ir=8, opset=17, bn_attrs=None):
    """x[N, 4, 6(, 6)] -> Conv(6 out, kernel 3, groups) -> BatchNormalization -> Relu -> y. ``loud``: one channel's
    conv output is that much smaller than the others and its batch-norm scale (gamma / sqrt(var + eps)) that much
    larger."""
    c_in, c_out = 4, 8 if groups == 4 else 6
    k = (3,) * dims
    w = RNG.standard_normal((c_out, c_in // groups) + k) / 3
    var = RNG.uniform(0.5, 2.0, c_out)
    var[1] = 1.0 / loud ** 2  # (a channel the conv barely uses: its weights and statistics that much smaller)
    w[1] /= loud
    mean = RNG.standard_normal(c_out) / 4
    mean[1] /= loud
    beta = RNG.standard_normal(c_out)
    beta[1] = 0.5  # (alive after the Relu)
    inits = [_arr(w, "W"), _arr(RNG.uniform(0.5, 1.5, c_out), "gamma"), _arr(beta, "beta"), _arr(mean, "mean"),
             _arr(var, "var")]
    ins = ["x", "W"] + (["B"] if bias else [])
    if bias:
        inits.append(_arr(RNG.standard_normal(c_out) * np.where(np.arange(c_out) == 1, 1 / loud, 1), "B"))
    nodes = [helper.make_node("Conv", ins, ["c"], name="conv", group=groups, pads=[1] * (2 * dims)),
             helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["b"], name="bn",
                              epsilon=1e-6, **(bn_attrs or {})),
             helper.make_node("Relu", ["b"], ["y"], name="relu")]
    inputs = [_vi("x", ["N", c_in] + [6] * dims)]
    if ir < 4:  # (IR 3 lists every initializer as a graph input)
        inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]
    g = helper.make_graph(nodes, "g", inputs, [_vi("y", ["N", c_out] + [6] * dims)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir)


def _run(model, x):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("groups,bias,dims,ir,opset", [(1, True, 2, 8, 17), (1, False, 2, 8, 17), (4, False, 2, 8, 17),
                                                       (1, True, 1, 8, 17), (2, False, 2, 3, 8)],
                         ids=["conv+bias", "conv", "depthwise", "conv1d", "ir3-opset8"])
def test_folded_model_computes_the_same(groups, bias, dims, ir, opset):
    m = conv_bn(groups, bias, dims, ir=ir, opset=opset)
    before = m.SerializeToString()
    f, n = fold_batch_norms(m)
    assert n == 1
    assert m.SerializeToString() == before  # (the caller's model untouched)
    assert [n.op_type for n in f.graph.node] == ["Conv", "Relu"] and f.graph.node[0].name == "conv"
    assert len(f.graph.node[0].input) == 3 and f.graph.node[0].output[0] == "b"
    assert not {"gamma", "beta", "mean", "var"} & {t.name for t in f.graph.initializer}
    onnx.checker.check_model(f, full_check=True)
    x = RNG.standard_normal((3, 4) + (6,) * dims).astype(np.float32)
    np.testing.assert_allclose(_run(f, x), _run(m, x), rtol=1e-5, atol=1e-5)


def paddle3_chain(add_shape=(1, 6, 1, 1)):
    """Paddle 3's export: Conv (no bias) -> Add(the bias, [1, C, 1, 1]) -> Identity -> BatchNormalization."""
    m = conv_bn(bias=False)
    g = m.graph
    g.node[0].output[0] = "c0"
    g.initializer.append(_arr(RNG.standard_normal(add_shape), "bias"))
    g.node.insert(1, helper.make_node("Add", ["c0", "bias"], ["c1"], name="add"))
    g.node.insert(2, helper.make_node("Identity", ["c1"], ["c"], name="id"))
    return m


@pytest.mark.parametrize("shape", [(1, 6, 1, 1), (6, 1, 1), (1,)])
def test_a_bias_added_after_the_conv_joins_the_fold(shape):
    m = paddle3_chain(shape)
    f, n = fold_batch_norms(m)
    assert n == 1
    assert [n.op_type for n in f.graph.node] == ["Conv", "Relu"]
    assert "bias" not in {t.name for t in f.graph.initializer}
    x = RNG.standard_normal((3, 4, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(_run(f, x), _run(m, x), rtol=1e-5, atol=1e-5)


def test_an_add_that_is_not_per_channel_is_not_folded():
    m = paddle3_chain((6,))  # (one value per column: the last axis, not the channels)
    f, n = fold_batch_norms(m)
    assert f is m and n == 0


@pytest.mark.parametrize("groups", [1, 2])
def test_conv_transpose_and_parameters_behind_identity_fold(groups):
    """torch's TorchScript exporter folds Conv + BatchNorm2d but not ConvTranspose2d + BatchNorm2d (a DCGAN or UNet
    decoder), and writes a parameter equal to another (running_var and weight, both ones) as an Identity of it."""
    w = RNG.standard_normal((4, 6 // groups, 3, 3)).astype(np.float32) / 3
    ones = np.ones(6, np.float32)
    nodes = [helper.make_node("Identity", ["gamma"], ["var"]),
             helper.make_node("ConvTranspose", ["x", "W", "B"], ["c"], name="up", group=groups, strides=[2, 2]),
             helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"], epsilon=1e-5)]
    g = helper.make_graph(nodes, "g", [_vi("x", ["N", 4, 5, 5])], [_vi("y", ["N", 6, 11, 11])],
                          [_arr(w, "W"), _arr(RNG.standard_normal(6), "B"), _arr(ones * 2, "gamma"),
                           _arr(RNG.standard_normal(6), "beta"), _arr(RNG.standard_normal(6), "mean")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    f, n = fold_batch_norms(m)
    assert n == 1
    assert [n.op_type for n in f.graph.node] == ["ConvTranspose"]
    assert {t.name for t in f.graph.initializer} == {"W", "B"}
    x = RNG.standard_normal((2, 4, 5, 5)).astype(np.float32)
    np.testing.assert_allclose(_run(f, x), _run(m, x), rtol=1e-5, atol=1e-5)


def linear_bn(op, rank=2, **attrs):
    """x[N, 6] (or [N, 3, 6]) -> Gemm / MatMul to 5 features -> BatchNormalization (torch's BatchNorm1d after a
    Linear, which its TorchScript exporter leaves unfolded)."""
    trans = attrs.get("transB", 0)
    w = RNG.standard_normal((5, 6) if trans else (6, 5)).astype(np.float32)
    ins = ["x", "W"] + (["C"] if "C" in attrs.pop("inputs", "") else [])
    n = 5 if rank == 2 else 3  # (a rank-3 input puts its sequence on axis 1, the batch norm's)
    nodes = [helper.make_node(op, ins, ["h"], name="fc", **attrs),
             helper.make_node("BatchNormalization", ["h", "gamma", "beta", "mean", "var"], ["y"])]
    inits = [_arr(w, "W"), _arr(RNG.uniform(0.5, 2, n), "gamma"), _arr(RNG.standard_normal(n), "beta"),
             _arr(RNG.standard_normal(n), "mean"), _arr(RNG.uniform(0.2, 2, n), "var"),
             _arr(RNG.standard_normal(5), "C")]
    shape = ["N", 6] if rank == 2 else ["N", 3, 6]
    g = helper.make_graph(nodes, "g", [_vi("x", shape)], [_vi("y", shape[:-1] + [5])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("op,attrs", [("Gemm", dict(transB=1, inputs="C")),
                                      ("Gemm", dict(alpha=2.0, beta=0.5, inputs="C")), ("Gemm", {}),
                                      ("MatMul", {})], ids=["gemm transB", "gemm alpha beta", "gemm no C", "matmul"])
def test_a_linear_layer_before_a_batch_norm_folds(op, attrs):
    m = linear_bn(op, **attrs)
    f, n = fold_batch_norms(m)
    assert n == 1
    assert [n.op_type for n in f.graph.node] == [op] + (["Add"] if op == "MatMul" else [])
    assert f.graph.node[-1].output[0] == "y"
    x = RNG.standard_normal((4, 6)).astype(np.float32)
    np.testing.assert_allclose(_run(f, x), _run(m, x), rtol=1e-5, atol=1e-5)


def test_a_matmul_on_a_sequence_is_not_folded():
    m = linear_bn("MatMul", rank=3)  # (the batch norm scales the sequence positions, not the features)
    f, n = fold_batch_norms(m)
    assert f is m and n == 0


def frozen_bn(scale_shape=(1, 6, 1, 1), shift_shape=(1, 6, 1, 1), shift_const=True):
    """torchvision's FrozenBatchNorm2d as both torch exporters write it: Conv -> Mul(scale) -> Add(shift)."""
    w = RNG.standard_normal((6, 4, 3, 3)).astype(np.float32) / 3
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["c", "scale"], ["m"]),
             helper.make_node("Add", ["m", "shift" if shift_const else "x2"], ["y"])]
    inits = [_arr(w, "W"), _arr(RNG.uniform(0.5, 2, scale_shape), "scale")]
    inputs = [_vi("x", ["N", 4, 6, 6])]
    if shift_const:
        inits.append(_arr(RNG.standard_normal(shift_shape), "shift"))
    else:  # (a residual: not a batch norm)
        inputs.append(_vi("x2", ["N", 6, 6, 6]))
    g = helper.make_graph(nodes, "g", inputs, [_vi("y", ["N", 6, 6, 6])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("scale,shift", [((1, 6, 1, 1), (1, 6, 1, 1)), ((6, 1, 1), (1,)), ((1,), (6, 1, 1))])
def test_a_frozen_batch_norm_folds(scale, shift):
    m = frozen_bn(scale, shift)
    f, n = fold_batch_norms(m)
    assert n == 1
    assert [n.op_type for n in f.graph.node] == ["Conv"] and f.graph.node[0].output[0] == "y"
    assert {t.name for t in f.graph.initializer} == {"W", "W_bias"}
    x = RNG.standard_normal((3, 4, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(_run(f, x), _run(m, x), rtol=1e-5, atol=1e-5)
    _, rep = run(m, {"x": x}, recipe(bits=8, device="cpu"))  # (the summary counts it: no BatchNormalization node)
    assert rep.config["batch_norms_folded"] == 1


@pytest.mark.parametrize("build", [lambda: frozen_bn(scale_shape=(6,)), lambda: frozen_bn(shift_const=False)],
                         ids=["scale per column", "residual add"])
def test_a_mul_and_add_that_are_not_a_batch_norm_stay(build):
    m = build()
    f, n = fold_batch_norms(m)
    assert f is m and n == 0


def _edited(edit):
    m = conv_bn()
    edit(m.graph)
    return m


@pytest.mark.parametrize("edit", [
    lambda g: g.node.append(helper.make_node("Identity", ["c"], ["c2"])),  # the conv's output read twice
    lambda g: g.output.append(_vi("c", ["N", 6, 6, 6])),  # ... or a graph output
    lambda g: g.node.append(helper.make_node("Identity", ["W"], ["w2"])),  # the weight read elsewhere
    lambda g: g.node[1].attribute.append(helper.make_attribute("training_mode", 1)),
    lambda g: g.input.append(_vi("var", [6])),  # a parameter fed by the user
], ids=["conv output read twice", "conv output is a graph output", "weight shared", "training mode",
        "parameter is an input"])
def test_not_folded_where_it_would_change_the_model(edit):
    m = _edited(edit)
    f, n = fold_batch_norms(m)
    assert f is m and n == 0


def test_w8a8_quantizes_the_batch_norm_output_not_the_conv_output():
    """One channel's batch-norm scale is 300 (a depthwise conv's barely used channel in PicoDet: 289): quantizing
    the conv's output per tensor, that channel's rounding noise came out 300 times larger, and the output with it.
    The folded model quantizes the batch norm's output, the tensor the runtime computes after its own fold."""
    m = conv_bn(loud=300.0)
    x = RNG.standard_normal((64, 4, 6, 6)).astype(np.float32)
    q, rep = run(m, {"x": x}, recipe(bits=8, act_bits=8, device="cpu"))
    assert "BatchNormalization" not in {n.op_type for n in q.graph.node}
    assert [L.node for L in rep.layers] == ["conv"] and rep.config["batch_norms_folded"] == 1
    ref, got = _run(m, x[:16]).ravel(), _run(q, x[:16]).ravel()
    assert ref @ got / (np.linalg.norm(ref) * np.linalg.norm(got)) > 0.999


def test_the_cli_says_what_it_folded(tmp_path, capsys):
    path = builders.save(conv_bn(), tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=RNG.standard_normal((16, 4, 6, 6)).astype(np.float32))
    assert main(["quantize", path, "-o", str(tmp_path / "q.onnx"), "--calib", str(tmp_path / "c.npz")]) == 0
    out = capsys.readouterr()
    assert "folded 1 BatchNormalization node(s) into the layer before each" in out.out + out.err
