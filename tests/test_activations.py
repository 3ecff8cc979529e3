"""Activation quantization: observers against brute-force float64 references, the Q/DQ models against a numpy
interpreter of their QDQ semantics, onnxruntime's fusions for the ort target, TensorRT's structural rules, options."""

import collections
import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import attention_like, mlp_model, recipe, recipe_args
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

from onnxcomq import run
from onnxcomq.capture.observers import (
    ActFormat,
    HistogramObserver,
    MinMaxObserver,
    candidate_ranges,
    fake_quant,
    make_observer,
    qparams,
)
from onnxcomq.cli import main
from onnxcomq.errors import UserError
from onnxcomq.write import activations

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CALIB = os.path.join(ROOT, "models", "fmnist_calib.npz")
UINT8 = ActFormat(8, signed=False, symmetric=False)
INT8S = ActFormat(8, signed=True, symmetric=True)


def batches(seed, scales):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(300) * s + rng.uniform(-1, 1) * s).astype(np.float32) for s in scales]


# ---------------------------------------------------------------- observers vs brute force

@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.lists(st.floats(1e-3, 1e3), min_size=1, max_size=4))
def test_histogram_is_exact_and_minmax_exact(seed, scales):
    xs = batches(seed, scales)
    o, m = HistogramObserver("minmax"), MinMaxObserver()
    for x in xs:
        o.update(x)
        m.update(x)
    a = np.concatenate(xs).astype(np.float64)
    assert o.range(UINT8) == m.range(UINT8) == (a.min(), a.max())
    # the merged histogram equals numpy's histogram of all values on the final grid (no re-binning error)
    e = o.edges()
    assert e[0] <= a.min() and a.max() < e[-1] and o.counts.size <= 2048
    np.testing.assert_array_equal(o.counts, np.histogram(a, bins=e)[0])


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.lists(st.floats(1e-2, 1e2), min_size=1, max_size=3),
       st.floats(90.0, 99.99))
def test_percentile_within_one_bin_of_numpy(seed, scales, p):
    xs = batches(seed, scales)
    o = make_observer("percentile", p)
    for x in xs:
        o.update(x)
    a = np.concatenate(xs).astype(np.float64)
    for q in (p / 100, 1 - p / 100):
        ref = np.quantile(a, q, method="inverted_cdf")
        assert abs(o.quantile(q) - ref) <= o.width * 1.0001, (q, o.quantile(q), ref, o.width)


@settings(max_examples=8, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([UINT8, INT8S, ActFormat(8, True, False)]),
       st.sampled_from(["normal", "laplace", "relu"]))
def test_mse_range_close_to_brute_force_over_the_candidates(seed, fmt, dist):
    rng = np.random.default_rng(seed)
    x = {"normal": rng.standard_normal(4000), "laplace": rng.laplace(size=4000),
         "relu": np.maximum(rng.laplace(size=4000), 0)}[dist].astype(np.float32)
    o = make_observer("mse")
    o.update(x[:2000])
    o.update(x[2000:])
    xd = x.astype(np.float64)

    def raw_mse(r):
        s, z = qparams(*r, fmt)
        return float(np.mean((xd - fake_quant(x, s, z, fmt).astype(np.float64)) ** 2))

    best = min(raw_mse(r) for r in candidate_ranges(float(x.min()), float(x.max()), fmt))
    chosen = raw_mse(o.range(fmt))
    # the observer scores candidates on its histogram (bin centres), not on the raw values: hypothesis found a
    # relu case 22 % above the raw-data optimum (seed 171), so the bound is 1.3
    assert chosen <= best * 1.30 + 1e-12, (chosen, best)
    assert chosen <= raw_mse((float(x.min()), float(x.max()))) * 1.30 + 1e-12  # (min/max is a candidate)


@pytest.mark.parametrize("fmt", [UINT8, INT8S, ActFormat(8, True, False), ActFormat(8, False, True)])
def test_qparams_fake_quant_matches_onnxruntime(fmt):
    from onnx import TensorProto, helper
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(1000) * 3 + 1).astype(np.float32)
    lo, hi = float(np.percentile(x, 1)), float(np.percentile(x, 99))  # some values saturate
    s, z = qparams(lo, hi, fmt)
    assert fake_quant(np.zeros(1, np.float32), s, z, fmt)[0] == 0.0  # 0 is exact
    if fmt.symmetric:
        assert z == (0 if fmt.signed else 128)
    g = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])],
        [numpy_helper.from_array(np.array(s, np.float32), "s"), numpy_helper.from_array(np.array(z, fmt.dtype), "z")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    y = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(y, fake_quant(x, s, z, fmt))
    assert qparams(0.5, 2.0, UINT8)[1] == 0  # a positive tensor: zero point 0, uint8 saturation is a Relu


# ---------------------------------------------------------------- the QDQ model's meaning

def interpret(model, feeds):
    """A numpy float64 interpreter of the ops the small test graphs use: what the QDQ graph means."""
    env = {k: np.asarray(v, np.float64) for k, v in feeds.items()}
    raw = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    env.update({k: v.astype(np.float64) if v.dtype.kind == "f" else v for k, v in raw.items()})

    def bshape(scale, axis, ndim):
        shape = [1] * ndim
        if np.ndim(scale):
            shape[axis] = -1
        return shape

    for n in model.graph.node:
        i = [env[x] if x else None for x in n.input]
        at = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        op = n.op_type
        if op == "QuantizeLinear":
            info = np.iinfo(raw[n.input[2]].dtype)
            out = np.clip(np.rint(i[0].astype(np.float32) / i[1].astype(np.float32)) + i[2], info.min, info.max)
        elif op == "DequantizeLinear":
            sh = bshape(i[1], at.get("axis", 1), np.ndim(i[0]))
            out = (i[0].astype(np.float64) - np.reshape(i[2], sh)) * np.reshape(i[1].astype(np.float32), sh)
        elif op == "Gemm":
            b = i[1].T if at.get("transB", 0) else i[1]
            out = i[0] @ b + (i[2] if len(i) > 2 else 0)
        elif op == "MatMul":
            out = i[0] @ i[1]
        elif op == "Add":
            out = i[0] + i[1]
        elif op == "Relu":
            out = np.maximum(i[0], 0)
        elif op == "Identity":
            out = i[0]
        elif op == "Transpose":
            out = np.transpose(i[0], at["perm"])
        elif op == "Softmax":
            e = np.exp(i[0] - i[0].max(-1, keepdims=True))
            out = e / e.sum(-1, keepdims=True)
        else:
            raise NotImplementedError(op)
        env[n.output[0]] = out
    return [env[o.name] for o in model.graph.output]


def ort_run(model, feeds, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def act_pairs(model):
    """{tensor: (scale, zero point)} of every activation QuantizeLinear (input not an initializer)."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {n.input[0]: (inits[n.input[1]], inits[n.input[2]]) for n in model.graph.node
            if n.op_type == "QuantizeLinear" and n.input[0] not in inits}


@pytest.mark.parametrize("target", ["ort", "tensorrt"])
def test_mlp_qdq_model_equals_its_numpy_twin(target):
    m = mlp_model([12, 16, 16, 8], seed=2, gemm_transb=(1, 0))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 12)).astype(np.float32)
    q, rep = run(m, {"input": x}, recipe(bits=8, act_bits=8, target=target, device="cpu"))
    onnx.checker.check_model(q, full_check=True)
    fmt = UINT8 if target == "ort" else INT8S
    pairs = act_pairs(q)
    # the input's parameters are those of its calibration min/max (brute force)
    s, z = qparams(float(x.min()), float(x.max()), fmt)
    assert pairs["input"][0] == s and int(pairs["input"][1]) == z and pairs["input"][1].dtype == fmt.dtype
    # ort: inputs and outputs of the weighted ops (gemm0's Relu folded into its output h0_r); tensorrt: inputs only
    want = {"input", "h0_r", "h1_mm", "h1_r", "h2"} if target == "ort" else {"input", "h0_r", "h1_r"}
    assert set(pairs) == want
    # onnxruntime (fused kernels) vs the graph's QDQ meaning in float64: within one step of the last
    # quantized activation (rounding of requantization may differ by one level)
    xt = rng.standard_normal((20, 12)).astype(np.float32)
    (yq,) = ort_run(q, {"input": xt})
    (yr,) = interpret(q, {"input": xt})
    (yn,) = ort_run(q, {"input": xt}, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    np.testing.assert_allclose(yn, yr, rtol=1e-5, atol=1e-5)
    # the bound: every requantization may round one level the other way, and that propagates through the next
    # layer's weights (|W| summed over its inputs; the float weights, 1 % margin for the 8-bit ones)
    w = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in m.graph.initializer}
    gain1, gain2 = np.abs(w["W1"]).sum(0).max() * 1.01, np.abs(w["W2"]).sum(0).max() * 1.01
    level = {k: float(v[0]) for k, v in pairs.items()}
    d_h1 = gain1 * level["h0_r"] + level.get("h1_mm", 0.0) + level["h1_r"]
    bound = gain2 * d_h1 + level.get("h2", 0.0)
    err = np.abs(yq - yr).max()
    assert err <= bound, (err, bound)
    # and far below the output's range: a wrong scale or zero point would not pass
    assert err <= 0.1 * np.abs(yr).max(), (err, np.abs(yr).max())


def _weight_dqs(q):
    """{weight name: (codes, scale, zero point)} of the DequantizeLinear nodes that read an initializer of codes."""
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    return {n.output[0]: tuple(inits[i] for i in n.input) for n in q.graph.node
            if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].ndim >= 2}


def test_ort_target_stores_8bit_weights_as_uint8_so_avx2_kernels_do_not_saturate():
    # onnxruntime's U8S8 kernels (uint8 activations x int8 weights) saturate pairs of products at 32767 on x86
    # without VNNI: MatMulInteger of 255s and 127s over K = 2 gives 32767, not 64770, on such a CPU
    m = mlp_model([12, 16, 16, 8], seed=2, gemm_transb=(1, 0))
    x = np.random.default_rng(0).standard_normal((64, 12)).astype(np.float32) * 3
    q_ort, _ = run(m, {"input": x}, recipe(bits=8, act_bits=8, device="cpu"))
    q_trt, _ = run(m, {"input": x}, recipe(bits=8, act_bits=8, target="tensorrt", device="cpu"))
    q_w, _ = run(m, {"input": x}, recipe(bits=8, scheme="sym", device="cpu"))  # weight-only: int8, as before
    ort_w, trt_w, wo = _weight_dqs(q_ort), _weight_dqs(q_trt), _weight_dqs(q_w)
    assert set(ort_w) == set(trt_w) == set(wo) == {"W0", "W1", "W2"}
    for name, (codes, _, zp) in ort_w.items():
        assert codes.dtype == np.uint8 and zp.dtype == np.uint8 and np.all(zp == 128), name
        assert codes.min() < 64 or codes.max() > 192  # codes that would saturate as int8 are used
        tc, _, tz = trt_w[name]
        assert tc.dtype == np.int8 and np.all(tz == 0), name  # TensorRT: symmetric int8
        assert wo[name][0].dtype == np.int8, name
        # the symmetric 8-bit grid, shifted by 128: its levels are int8 levels
        levels = codes.astype(np.int32) - 128
        assert levels.min() >= -128 and levels.max() <= 127
    # fused kernels (onnxruntime's optimizer) agree with the QDQ graph run node by node, on inputs that fill the
    # uint8 range: on a CPU without VNNI, int8 weights were off here by many output steps
    xt = np.random.default_rng(1).standard_normal((32, 12)).astype(np.float32) * 3
    (yf,) = ort_run(q_ort, {"input": xt})
    (yn,) = ort_run(q_ort, {"input": xt}, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    step = float(act_pairs(q_ort)["h2"][0])
    assert np.abs(yf - yn).max() <= 4 * step, (np.abs(yf - yn).max(), step)


def test_act_aware_gram_is_the_fake_quantized_inputs():
    from onnxcomq.capture.calib import Calibration, model_inputs
    from onnxcomq.capture.passes import collect_stats
    from onnxcomq.graph.layers import find_layers
    from onnxcomq.write.activations import ActivationQuantizer
    m = mlp_model([6, 5, 4], seed=1)
    x = np.random.default_rng(1).standard_normal((40, 6)).astype(np.float32)
    cfg = recipe(bits=8, act_bits=8, act_aware=True).validate()
    layers, _ = find_layers(m)
    aq = ActivationQuantizer(m, layers, cfg.activations, cfg.target)
    calib = Calibration({"input": x}, model_inputs(m), batch_size=16)
    specs = {spec: 1 for L in layers for _, spec in L.consumers}
    collect_stats(aq.model, specs, calib, observers=aq.observers)
    stats = aq.aware_stats(specs, calib, lambda mm, sp: collect_stats(mm, sp, calib))
    s, z = qparams(float(x.min()), float(x.max()), UINT8)
    xq = fake_quant(x, s, z, UINT8).astype(np.float64)
    first = next(sp for sp in specs if sp.tensor == "input")
    np.testing.assert_allclose(stats[first].G[0], xq.T @ xq, rtol=1e-5)
    # the second layer's input: relu(fq(x) W0^T + b0), fake-quantized with the observed range of h0_r
    w0 = numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "W0"))
    b0 = numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "b0"))
    h = np.maximum(x @ w0.T + b0, 0)
    s1, z1 = qparams(float(h.min()), float(h.max()), UINT8)
    hq = fake_quant(np.maximum(xq.astype(np.float32) @ w0.T + b0, 0), s1, z1, UINT8).astype(np.float64)
    second = next(sp for sp in specs if sp.tensor != "input")
    # float32 summation order and onnxruntime's rounding may move a value by a step or two: |a - b| <= 2 s1 per
    # element bounds |A^T A - B^T B|_jk by 2 s1 (sum_i |a_ij| + |b_ik|)
    g = stats[second].G[0]
    col = np.abs(hq).sum(0) + 2 * s1 * len(hq)
    bound = 2 * s1 * (col[:, None] + col[None, :]) + 1e-6
    assert np.all(np.abs(g - hq.T @ hq) <= bound)
    assert not np.allclose(g, h.T @ h, rtol=1e-6)  # not the float inputs


def test_attention_matmuls_between_activations_are_quantized():
    m = attention_like(d=8, seq=5)
    x = np.random.default_rng(0).standard_normal((16, 5, 8)).astype(np.float32)
    q, _ = run(m, {"input": x}, recipe(bits=8, act_bits=8, device="cpu"))
    onnx.checker.check_model(q, full_check=True)
    dq_out = {n.output[0] for n in q.graph.node if n.op_type == "DequantizeLinear"}
    for n in q.graph.node:
        if n.op_type == "MatMul":
            assert all(i in dq_out for i in n.input), n.name
    np.testing.assert_allclose(ort_run(q, {"input": x})[0], interpret(q, {"input": x})[0], atol=0.05)


# ---------------------------------------------------------------- ort target on the shipped models

def optimized_ops(model, tmp_path):
    path = str(tmp_path / "m.onnx")
    onnx.save(model, path)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node)


@pytest.fixture(scope="module")
def shipped():
    out = {}
    for name in ("cnn", "vit"):
        path = os.path.join(ROOT, "models", f"fmnist_{name}.onnx")
        for target in ("ort", "tensorrt"):
            q, _ = run(path, CALIB, recipe(bits=8, act_bits=8, target=target, max_samples=32,
                                                   device="cpu", method="rtn"))  # placement, not the solver
            onnx.checker.check_model(q, full_check=True)
            out[name, target] = q
        out[name, "float"] = onnx.load(path)
    return out


def test_ort_target_fuses_into_qlinear_ops(shipped, tmp_path):
    cnn = optimized_ops(shipped["cnn", "ort"], tmp_path)
    float_cnn = collections.Counter(n.op_type for n in shipped["cnn", "float"].graph.node)
    assert cnn["QLinearConv"] == float_cnn["Conv"] and cnn["Conv"] == 0
    assert cnn["QGemm"] == float_cnn["Gemm"] and cnn["Gemm"] == 0
    assert cnn["QLinearGlobalAveragePool"] == 1 and cnn["Relu"] == 0 and cnn["DequantizeLinear"] == 0
    vit = optimized_ops(shipped["vit", "ort"], tmp_path)
    float_vit = shipped["vit", "float"].graph
    inits = {t.name for t in float_vit.initializer}
    weight_mm = sum(n.op_type == "MatMul" and n.input[1] in inits for n in float_vit.node)
    act_mm = sum(n.op_type == "MatMul" and n.input[1] not in inits for n in float_vit.node)
    assert vit["QLinearMatMul"] == weight_mm + act_mm and vit["MatMul"] == 0  # attention MatMuls too
    assert vit["QLinearAdd"] == 8  # the residual Adds (2 per block, 4 blocks)
    assert vit["QLinearConv"] == 1 and vit["QGemm"] == 1


def test_ort_outputs_run_and_match_float(shipped):
    x = np.load(CALIB)["input"][:16]
    for name in ("cnn", "vit"):
        (yf,) = ort_run(shipped[name, "float"], {"input": x})
        for target in ("ort", "tensorrt"):
            (yq,) = ort_run(shipped[name, target], {"input": x})
            assert np.mean(yq.argmax(1) == yf.argmax(1)) >= 0.9


# ---------------------------------------------------------------- tensorrt structural rules

def test_tensorrt_explicit_quantization_rules(shipped):
    for name in ("cnn", "vit"):
        q, f = shipped[name, "tensorrt"], shipped[name, "float"]
        kept_float = set(json.loads({p.key: p.value for p in q.metadata_props}["onnxcomq.config"])[
            "act_float_tensors"])  # too noisy in int8 (reported): the only activations left float
        inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
        producer = {o: n for n in q.graph.node for o in n.output}
        # every Q/DQ: zero point 0 of type int8 (weights: int8 codes, activations: int8 per tensor)
        for n in q.graph.node:
            if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
                zp = inits[n.input[2]]
                assert zp.dtype == np.int8 and not zp.any(), n.name
                if n.op_type == "QuantizeLinear":
                    assert inits[n.input[1]].ndim == 0  # per-tensor activations
                    (dq,) = [c for c in q.graph.node if n.output[0] in c.input]  # Q -> DQ, same parameters
                    assert dq.op_type == "DequantizeLinear" and dq.input[1:] == n.input[1:]
        # weighted ops: activation input from a DQ of a Q; weight from a DQ of int8 codes, per channel on the
        # output-channel axis (Conv 0, MatMul B 1, Gemm 0 with transB)
        for n in q.graph.node:
            if n.op_type not in ("Conv", "Gemm", "MatMul"):
                continue
            srcs = [producer.get(i) for i in n.input[:2]]
            for i, src in zip(n.input[:2], srcs):
                if i in kept_float:
                    continue
                assert src is not None and src.op_type == "DequantizeLinear", n.name
                assert src.input[0] in inits or producer[src.input[0]].op_type == "QuantizeLinear"
            w = srcs[1]
            if w is not None and w.input[0] in inits:
                at = {a.name: onnx.helper.get_attribute_value(a) for a in w.attribute}
                trans_b = any(a.name == "transB" and a.i for a in n.attribute)
                axis = {"Conv": 0, "MatMul": 1, "Gemm": 0 if trans_b else 1}[n.op_type]
                assert at.get("axis") == axis and inits[w.input[1]].shape == (inits[w.input[0]].shape[axis],)
        # residual Adds: both inputs quantized; no Q on any weighted op's output; no node removed
        for n in q.graph.node:
            if n.op_type == "Add" and all(i not in inits for i in n.input) and n.input[0] in producer \
                    and producer[n.input[0]].op_type == "DequantizeLinear":
                assert producer[n.input[1]].op_type == "DequantizeLinear"
            if n.op_type in ("Conv", "Gemm", "MatMul"):
                assert all(c.op_type != "QuantizeLinear" for c in q.graph.node if n.output[0] in c.input)
        qdq = ("QuantizeLinear", "DequantizeLinear")
        assert collections.Counter(n.op_type for n in q.graph.node if n.op_type not in qdq) == \
            collections.Counter(n.op_type for n in f.graph.node)
        assert len(kept_float) <= 2  # (the ViT's first two softmax outputs: 127 levels on [0, 1])
    vit_adds = [n for n in shipped["vit", "tensorrt"].graph.node if n.op_type == "Add"
                and all(i.endswith("DequantizeLinear_Output") for i in n.input)]
    assert len(vit_adds) == 8


# ---------------------------------------------------------------- options

@pytest.mark.parametrize("kw,msg", [
    (dict(act_bits=4), "activations.bits must be 8"),
    (dict(act_bits=8, target="tflite"), "target must be one of"),
    (dict(act_bits=8, target="tensorrt", bits=4), "INT4 only as weight-only"),
    (dict(act_bits=8, target="tensorrt", scheme="asym", bits=8), "symmetric int8"),
    (dict(act_bits=8, target="tensorrt", act_dtype="uint8", bits=8), "activation dtype uint8"),
    # (the old case act_aware=True without act_bits -> "act_aware: only with activation quantization" has no
    # equivalent: activation fields exist only in the activations section, and giving that section turns it on)
    (dict(target="tensorrt", bits=4), "only block-wise"),
    (dict(target="tensorrt", bits=4, granularity="block", scheme="asym"), "symmetric weights"),
    (dict(target="tensorrt", bits=8, granularity="block"), "int8 weights per channel"),
    (dict(act_bits=8, act_method="kl"), "activations.method must be one of"),
    (dict(act_bits=8, act_method="percentile", act_percentile=20.0), "activations.percentile must be in"),
    (dict(act_bits=8, act_max_noise=0.0), "activations.max_noise must be > 0"),
])
def test_bad_option_combinations(kw, msg):
    with pytest.raises(UserError, match=msg):
        recipe(**kw).validate()


def test_tensorrt_weight_only_int4_is_blockwise_symmetric():
    """TensorRT takes INT4 only as weight-only DequantizeLinear with block_size (opset 21), zero point 0."""
    m = mlp_model([64, 48, 32], seq=4)
    x = np.random.default_rng(0).standard_normal((16, 4, 64)).astype(np.float32)
    q, _ = run(m, {"input": x}, recipe(bits=4, target="tensorrt", granularity="block", block_size=16,
                                               device="cpu"))
    onnx.checker.check_model(q, full_check=True)
    assert max(o.version for o in q.opset_import if o.domain in ("", "ai.onnx")) >= 21
    inits = {t.name: t for t in q.graph.initializer}
    dqs = [n for n in q.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dqs) == 2 and not any(n.op_type == "QuantizeLinear" for n in q.graph.node)  # weight-only
    for n in dqs:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs["block_size"] == 16 and attrs["axis"] == 0  # MatMul B[K, N]: blocks along K
        assert inits[n.input[0]].data_type == onnx.TensorProto.INT4
        assert len(n.input) < 3 or not numpy_helper.to_array(inits[n.input[2]]).any()  # zero point 0
        K, N = inits[n.input[0]].dims
        assert list(inits[n.input[1]].dims) == [-(-K // 16), N]
    y, yf = ort_run(q, {"input": x})[0], ort_run(m, {"input": x})[0]
    assert 0 < np.linalg.norm(y - yf) / np.linalg.norm(yf) < 0.1


def test_everything_excluded_is_a_user_error():
    m = mlp_model([6, 5, 4])
    x = np.random.default_rng(0).standard_normal((8, 6)).astype(np.float32)
    with pytest.raises(UserError, match="no activation tensor to quantize"):
        run(m, {"input": x}, recipe(bits=8, act_bits=8, act_exclude=("*",)))


def test_act_exclude_keeps_named_node_float():
    m = mlp_model([6, 5, 5, 4], seed=3)
    x = np.random.default_rng(0).standard_normal((32, 6)).astype(np.float32)
    q, _ = run(m, {"input": x}, recipe(bits=8, act_bits=8, act_exclude=("matmul1",), device="cpu"))
    pairs = act_pairs(q)
    node = next(n for n in q.graph.node if n.name == "matmul1")
    assert not node.input[0].endswith("DequantizeLinear_Output")
    assert "input" in pairs



def _relu_read_in_a_branch(seed=0):
    """x -> MatMul(w) -> Relu -> r; an If (on input c) whose branches read r by name (implicitly, as silero-vad's
    LSTM, inside an If, reads the encoder's last Relu) and multiply it by a constant matrix: the graph output."""
    from onnx import TensorProto, helper
    rng = np.random.default_rng(seed)
    w, v = rng.standard_normal((8, 16)).astype(np.float32), rng.standard_normal((16, 4)).astype(np.float32)

    def branch(name):
        return helper.make_graph([helper.make_node("MatMul", ["r", "v"], [f"{name}_y"])], name, [],
                                 [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, None)])
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("If", ["c"], ["y"], then_branch=branch("then"), else_branch=branch("else"))], "m",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8]),
         helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(v, "v")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_a_relu_read_inside_a_subgraph_is_not_folded():
    """For onnxruntime a Relu after a quantized layer is folded into the uint8 saturation: the layer writes the
    Relu's output name. A subgraph that read that name implicitly then got the pre-activation, negatives included:
    silero-vad's W8A8 model (its LSTM inside an If) at output cosine 0.47, decisions as float's on 24 % of held-out
    speech chunks, and, with every output behind an If, written without a word."""
    m = _relu_read_in_a_branch()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 8)).astype(np.float32)
    q, rep = run(m, {"x": x, "c": np.array(True)}, recipe(bits=8, act_bits=8, device="cpu"))
    assert any(n.op_type == "Relu" for n in q.graph.node)  # (kept: the branches read its output)
    feed = {"x": x[:16], "c": np.array(False)}
    a, b = (ort_run(model, feed)[0].astype(np.float64).ravel() for model in (m, q))
    assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) > 0.99


# (the old case "--act-aware" without --act-bits -> "... only with activation quantization" has no equivalent:
# the aware flag lives in the recipe's activations section, and giving that section turns activations on)
@pytest.mark.parametrize("args,msg", [
    (["--act-bits", "8", "--target", "tensorrt", "--bits", "4"], "INT4 only as weight-only"),
    (["--act-bits", "8", dict(act_method="percentile", act_percentile=120.0)], "activations.percentile"),
])
def test_cli_exit_2(tmp_path, capsys, args, msg):
    out = tmp_path / "q.onnx"
    args = [b for a in args for b in (recipe_args(tmp_path, **a) if isinstance(a, dict) else [a])]
    rc = main(["quantize", os.path.join(ROOT, "models", "fmnist_cnn.onnx"), "-o", str(out), "--calib", CALIB,
               "--quiet"] + args)
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_cli_writes_w8a8(tmp_path, capsys):
    out = tmp_path / "q.onnx"
    rc = main(["quantize", os.path.join(ROOT, "models", "fmnist_cnn.onnx"), "-o", str(out), "--calib", CALIB,
               "--bits", "8", "--act-bits", "8", "--max-samples", "32", "--quiet"]
              + recipe_args(tmp_path, act_method="percentile", sweeps=1))
    assert rc == 0
    q = onnx.load(str(out))
    onnx.checker.check_model(q, full_check=True)
    meta = {p.key: p.value for p in q.metadata_props}
    assert '"act_method": "percentile"' in meta["onnxcomq.config"] and '"target": "ort"' in meta["onnxcomq.config"]
    assert len(act_pairs(q)) >= 6


def test_tensors_over_the_noise_limit_stay_float_and_keep_their_relu():
    m = mlp_model([12, 16, 16, 8], seed=2, gemm_transb=(1, 0))
    x = np.random.default_rng(0).standard_normal((64, 12)).astype(np.float32)
    # noise of this model's tensors: h1_r 1.8e-5, h0_r 2.0e-5 (gemm0's folded Relu output), others >= 4.8e-5
    q, _ = run(m, {"input": x}, recipe(bits=8, act_bits=8, act_max_noise=1.9e-5, device="cpu"))
    meta = json.loads({p.key: p.value for p in q.metadata_props}["onnxcomq.config"])
    pairs = act_pairs(q)
    assert meta["act_float_tensors"] and not set(meta["act_float_tensors"]) & set(pairs)
    assert meta["act_tensors"] == len(pairs)
    relus = [n for n in q.graph.node if n.op_type == "Relu"]
    assert set(pairs) == {"h1_r"} and len(relus) == 2  # h0_r stays float: its Relu is not folded away
    (yq,) = ort_run(q, {"input": x[:10]}, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    np.testing.assert_allclose(yq, interpret(q, {"input": x[:10]})[0], rtol=1e-5, atol=1e-5)


def test_relu6_clip_folds_into_the_conv_output(tmp_path):
    from onnx import TensorProto, helper
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.5).astype(np.float32), "W1"),
             numpy_helper.from_array((rng.standard_normal((4, 8, 3, 3)) * 0.2).astype(np.float32), "W2"),
             numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
             numpy_helper.from_array(np.array(6.0, np.float32), "hi")]
    nodes = [helper.make_node("Conv", ["input", "W1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Clip", ["c1", "lo", "hi"], ["r1"], name="relu6"),
             helper.make_node("Conv", ["r1", "W2"], ["output"], name="conv2")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 4, 6, 6])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    x = (rng.standard_normal((32, 3, 8, 8)) * 3).astype(np.float32)  # some conv1 outputs above 6
    q, _ = run(m, {"input": x}, recipe(bits=8, act_bits=8, device="cpu"))
    onnx.checker.check_model(q, full_check=True)
    assert not any(n.op_type == "Clip" for n in q.graph.node)
    assert {t.name for t in q.graph.initializer}.isdisjoint({"lo", "hi"})
    s, z = act_pairs(q)["r1"]
    assert int(z) == 0 and float(s) * 255 <= 6.0 + 1e-6  # [0, max observed <= 6]: saturation is the Clip
    assert optimized_ops(q, tmp_path)["QLinearConv"] == 2
    (yf,) = ort_run(m, {"input": x[:8]})
    (yq,) = ort_run(q, {"input": x[:8]})
    assert np.abs(yq - yf).max() <= 0.05 * np.abs(yf).max()


def test_a_bias_too_large_for_int32_codes_stays_exact(tmp_path):
    """A layer whose input range is tiny against its bias (torchvision's randomly initialised GoogLeNet: the
    classifier's input ~1e-9, its bias ~0.02): bias / (scale_a * scale_w) does not fit int32. The codes used to be
    clipped, and the W8A8 model's output was ~1e-7 where the float one is the bias (cosine 0.02). Such a bias becomes
    an Add after the node; the other layers keep their int32 bias and fused kernel."""
    from onnx import TensorProto, helper
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32), "W1"),
             numpy_helper.from_array((0.1 * rng.standard_normal(8)).astype(np.float32), "B1"),
             numpy_helper.from_array((rng.standard_normal((6, 8)) * 0.5).astype(np.float32), "W2"),
             numpy_helper.from_array(np.linspace(-2, 2, 6).astype(np.float32), "B2"),
             numpy_helper.from_array(np.array([1e-6], np.float32), "tiny")]
    nodes = [helper.make_node("Conv", ["input", "W1", "B1"], ["c1"], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("GlobalAveragePool", ["r1"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("Mul", ["f", "tiny"], ["small"], name="shrink"),
             helper.make_node("Gemm", ["small", "W2", "B2"], ["output"], name="fc", transB=1)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 6, 6])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 6])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    x = rng.standard_normal((16, 3, 6, 6)).astype(np.float32)
    q, _ = run(m, {"input": x}, recipe(bits=8, act_bits=8, device="cpu", target="ort"))
    onnx.checker.check_model(q, full_check=True)
    fc = next(n for n in q.graph.node if n.name == "fc")
    assert len(fc.input) == 2  # the Gemm's bias moved out, into an Add of B2 exactly
    add = next(n for n in q.graph.node if n.op_type == "Add" and fc.output[0] in n.input)
    inits_q = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    np.testing.assert_array_equal(inits_q[add.input[1]], numpy_helper.to_array(inits[3]))
    conv = next(n for n in q.graph.node if n.name == "conv1")
    assert inits_q[next(n for n in q.graph.node if n.output[0] == conv.input[2]).input[0]].dtype == np.int32
    assert optimized_ops(q, tmp_path)["QLinearConv"] == 1
    (yf,) = ort_run(m, {"input": x})
    (yq,) = ort_run(q, {"input": x})
    assert np.abs(yq - yf).max() <= 1e-3 * np.abs(yf).max()


def test_a_conv_shared_by_two_nodes_gets_an_int32_bias_for_each(tmp_path):
    """One Conv weight and bias applied by two nodes to two inputs (Faster R-CNN's RPN head, once per FPN level):
    each node gets its own int32 bias at its own input scale; the shared float bias is removed once (the second
    removal was an internal error)."""
    from onnx import TensorProto, helper
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32), "W"),
             numpy_helper.from_array((0.1 * rng.standard_normal(4)).astype(np.float32), "B"),
             numpy_helper.from_array(np.array(3.0, np.float32), "k")]
    nodes = [helper.make_node("Mul", ["input", "k"], ["big"], name="scale"),
             helper.make_node("Conv", ["input", "W", "B"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["big", "W", "B"], ["b"], name="conv_b", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["a", "b"], ["output"], name="sum")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 6, 6])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 4, 6, 6])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    x = rng.standard_normal((16, 3, 6, 6)).astype(np.float32)
    q, _ = run(m, {"input": x}, recipe(bits=8, act_bits=8, device="cpu", target="ort"))
    onnx.checker.check_model(q, full_check=True)
    assert "B" not in {t.name for t in q.graph.initializer}
    producer = {o: n for n in q.graph.node for o in n.output}
    biases = [producer[n.input[2]] for n in q.graph.node if n.name in ("conv_a", "conv_b")]
    assert len({b.input[0] for b in biases}) == 2 and all(b.op_type == "DequantizeLinear" for b in biases)
    assert optimized_ops(q, tmp_path)["QLinearConv"] == 2
    (yf,) = ort_run(m, {"input": x})
    (yq,) = ort_run(q, {"input": x})
    assert np.abs(yq - yf).max() <= 0.05 * np.abs(yf).max()


def _outlier_channel_model(seed=0):
    """x -> MatMul(W1) -> h -> MatMul(W2) -> y, where h's channel 0 is ~1000x the others and W2 ignores it: h's
    own quantization noise is tiny (its energy is channel 0's), but one uint8 grid for h erases the channels y
    reads."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((4, 8)).astype(np.float32)
    w1[:, 0] *= 1000
    w2 = rng.standard_normal((8, 3)).astype(np.float32)
    w2[0] = 0
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["y"])]
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                          [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_a_failed_check_names_the_activations_that_alone_move_the_outputs_most(tmp_path, capsys, monkeypatch):
    """A W8A8 model refused by the check says which activation to keep float (BlazePose's landmark model from
    mediapipe: one tensor of 136 alone moved an output by 1.28, the next by 0.48), and keeping it float passes."""
    from onnxcomq import VerificationError

    m = _outlier_channel_model()
    x = np.random.default_rng(1).standard_normal((64, 4)).astype(np.float32)
    with pytest.raises(VerificationError) as e:
        run(m, {"x": x}, recipe(bits=8, act_bits=8))
    (worst, *rest) = e.value.report.verification["culprits"]
    assert worst["tensor"] == "h" and worst["rel_sq_error"] > 0.1
    assert all(c["rel_sq_error"] < 0.01 * worst["rel_sq_error"] for c in rest)  # (x: its own noise only)
    assert "moves the outputs most: h (" in str(e.value) and e.value.hint in str(e.value)
    _, rep = run(m, {"x": x}, recipe(bits=8, act_bits=8, act_exclude=["h"]))
    assert rep.verification["outputs"][0]["cosine"] > 0.999
    # the CLI: the problem, what was (not) written, then the hint
    onnx.save(m, str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "c.npz", x=x)
    rc = main(["quantize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "q.onnx"), "--calib", str(tmp_path / "c.npz"),
               "--bits", "8", "--act-bits", "8"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and not (tmp_path / "q.onnx").exists()
    assert "output y is far" in err and err.index("nothing written") < err.index("moves the outputs most: h (")
    # a model too large to probe every activation in the time allowed says how many it probed
    monkeypatch.setattr(activations, "CULPRIT_SECONDS", 0.0)
    with pytest.raises(VerificationError) as e:
        run(m, {"x": x}, recipe(bits=8, act_bits=8))
    assert e.value.report.verification["culprits_probed"] == [1, 2]
    assert "moves the outputs most (of the first 1 of 2, all the time allowed): x (" in str(e.value)
