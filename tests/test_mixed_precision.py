"""Per-layer bits (--keep-8bit, --layer-bits) and mixed precision by measured sensitivity (--avg-bits)."""

import itertools

import builders
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import recipe
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

from onnxcomq import UserError, run
from onnxcomq.cli import main
from onnxcomq.graph.layers import find_layers
from onnxcomq.precision import allocate, average_bits, fixed_bits, output_sensitivity, parse_layer_bits
from onnxcomq.write.qdq import with_float_weights


def sess_run(model, feed):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)


def small_cnn():
    """input -> Conv 3x3 -> depthwise Conv -> Conv 1x1 -> output."""
    rng = np.random.default_rng(0)
    ws = {"W0": rng.standard_normal((6, 3, 3, 3)), "W1": rng.standard_normal((6, 1, 3, 3)),
          "W2": rng.standard_normal((4, 6, 1, 1))}
    nodes = [onnx.helper.make_node("Conv", ["input", "W0"], ["h0"], name="stem", pads=[1, 1, 1, 1]),
             onnx.helper.make_node("Conv", ["h0", "W1"], ["h1"], name="dw", group=6, pads=[1, 1, 1, 1]),
             onnx.helper.make_node("Conv", ["h1", "W2"], ["output"], name="head")]
    g = onnx.helper.make_graph(
        nodes, "g", [onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["N", 3, 8, 8])],
        [onnx.helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w.astype(np.float32), k) for k, w in ws.items()])
    return onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)


def test_fixed_bits_patterns():
    layers, _ = find_layers(small_cnn())
    assert fixed_bits(layers, 4, ("first",)) == {"W0": (8, "layers.keep_8bit first")}
    assert set(fixed_bits(layers, 4, ("last", "depthwise"))) == {"W2", "W1"}
    assert set(fixed_bits(layers, 4, ("Conv",))) == {"W0", "W1", "W2"}  # op type
    got = fixed_bits(layers, 4, ("d*",), (("*", 3), ("head", 6)))  # later rules win
    assert {w: b for w, (b, _) in got.items()} == {"W0": 3, "W1": 3, "W2": 6}
    with pytest.raises(UserError, match="matches no quantized layer"):
        fixed_bits(layers, 4, ("nothing*",))


@pytest.mark.parametrize("bad", ["head", "head=9", "=4", "head=x", "head=1"])
def test_parse_layer_bits_errors(bad):
    with pytest.raises(UserError, match="layers.layer_bits"):
        parse_layer_bits([bad])
    assert parse_layer_bits(["a=b=5"]) == (("a=b", 5),)  # the last '=' separates the bits


def test_per_layer_bits_flow_to_storage_opset_and_report():
    model = small_cnn()
    x = np.random.default_rng(1).standard_normal((4, 3, 8, 8)).astype(np.float32)
    q, rep = run(model, {"input": x}, recipe(bits=4, keep_8bit=("first",), layer_bits=(("head", 6),),
                                                     device="cpu"))
    onnx.checker.check_model(q, full_check=True)
    bits = {L.node: L.bits for L in rep.layers}
    assert bits == {"stem": 8, "dw": 4, "head": 6}
    inits = {t.name: t for t in q.graph.initializer}
    types = {w: inits[f"{w}_quantized"].data_type for w in ("W0", "W1", "W2")}
    assert types == {"W0": onnx.TensorProto.UINT8, "W1": onnx.TensorProto.UINT4, "W2": onnx.TensorProto.UINT8}
    assert rep.avg_bits == pytest.approx((8 * 162 + 4 * 54 + 6 * 24) / 240)
    assert rep.storage_bits == pytest.approx((8 * 162 + 4 * 54 + 8 * 24) / 240)
    assert next(o.version for o in q.opset_import if o.domain == "") >= 21
    # no weight at <= 4 bits: no int4, no opset 21
    q2, rep2 = run(model, {"input": x}, recipe(bits=5, layer_bits=(("dw", 8),), device="cpu"))
    assert next(o.version for o in q2.opset_import if o.domain == "") < 21
    assert {L.node: L.bits for L in rep2.layers} == {"stem": 5, "dw": 8, "head": 5}
    # what each layer's codes span matches its bits
    for w, b in (("W0", 5), ("W1", 8)):
        c = numpy_helper.to_array({t.name: t for t in q2.graph.initializer}[f"{w}_quantized"]).astype(int)
        assert c.max() <= (1 << b) - 1 and c.max() > (1 << (b - 1))


def brute_force(params, dist, base, budget):
    best = None
    ws = list(params)
    for choice in itertools.product(*[sorted(dist[w]) for w in ws]):
        bits = dict(zip(ws, choice))
        if average_bits(bits, params) > budget + 1e-12:
            continue
        d = sum(dist[w][bits[w]] for w in ws)
        if best is None or d < best[0] - 1e-12:
            best = (d, bits)
    return best


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 6), seed=st.integers(0, 10 ** 6), budget=st.floats(4.0, 8.0))
def test_allocate_equal_sizes_is_optimal(n, seed, budget):
    """Equal layer sizes and one upgrade (4 -> 8): the greedy choice is the exact optimum."""
    rng = np.random.default_rng(seed)
    params = {f"w{i}": 100 for i in range(n)}
    dist = {w: {4: float(rng.uniform(0.1, 1)), 8: 0.0} for w in params}
    dist = {w: {4: d[4], 8: d[4] * float(rng.uniform(0, 0.2))} for w, d in dist.items()}
    got = allocate(params, dist, 4, budget, {})
    assert average_bits(got, params) <= budget + 1e-9
    opt, _ = brute_force(params, dist, 4, budget)
    assert sum(dist[w][got[w]] for w in params) == pytest.approx(opt)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 5), seed=st.integers(0, 10 ** 6), budget=st.floats(4.0, 8.0))
def test_allocate_respects_budget_and_fixed_layers(n, seed, budget):
    rng = np.random.default_rng(seed)
    params = {f"w{i}": int(rng.integers(1, 1000)) for i in range(n)}
    dist = {}
    for w in params:
        e4 = float(rng.uniform(0.1, 1))
        dist[w] = {4: e4, 5: e4 / 2, 6: e4 / 4, 8: e4 / 16}
    fixed = {"w0": 8}
    got = allocate(params, {w: d for w, d in dist.items() if w != "w0"}, 4, budget, fixed)
    assert got["w0"] == 8
    base = average_bits({w: fixed.get(w, 4) for w in params}, params)
    assert average_bits(got, params) <= max(budget, base) + 1e-9
    # nothing that still fits the budget would lower the predicted distortion
    room = budget * sum(params.values()) - sum(got[w] * params[w] for w in params)
    for w in params:
        if w == "w0":
            continue
        for b in dist[w]:
            if b > got[w]:
                assert (b - got[w]) * params[w] > room + 1e-9


def test_output_sensitivity_equals_direct_runs():
    model = small_cnn()
    rng = np.random.default_rng(2)
    feeds = [{"input": rng.standard_normal((3, 3, 8, 8)).astype(np.float32)} for _ in range(2)]
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    pert = {w: (a + 0.05 * rng.standard_normal(a.shape)).astype(np.float32) for w, a in inits.items()}
    got = output_sensitivity(model, feeds, pert)
    ref = [sess_run(model, f)[0].astype(np.float64) for f in feeds]
    den = sum(np.sum(r ** 2) for r in ref)
    for w in pert:
        m2 = with_float_weights(model, {w: pert[w]})
        num = sum(np.sum((sess_run(m2, f)[0] - r) ** 2) for f, r in zip(feeds, ref))
        assert got[w] == pytest.approx(num / den, rel=1e-4)


@pytest.mark.parametrize("sens", ["output", "layer"])
def test_pipeline_mixed_precision_budget_and_report(sens):
    model = builders.mlp_model([24, 32, 16, 8], seq=4, seed=5)
    x = np.random.default_rng(0).standard_normal((32, 4, 24)).astype(np.float32)
    budget = 5.0
    q, rep = run(model, {"input": x}, recipe(bits=4, avg_bits=budget, mp_bits=(6, 8), mp_sensitivity=sens,
                                                     mp_estimate="solve", device="cpu"))
    onnx.checker.check_model(q, full_check=True)
    params = {L.weight: int(np.prod(L.shape)) for L in rep.layers}
    assert rep.avg_bits == pytest.approx(average_bits({L.weight: L.bits for L in rep.layers}, params))
    assert 4 < rep.avg_bits <= budget
    mp = rep.mixed_precision
    assert mp["achieved"] == pytest.approx(rep.avg_bits) and mp["sensitivity"] == sens
    assert {L.node: L.bits for L in rep.layers} == {k: v["bits"] for k, v in mp["layers"].items()}
    for k, v in mp["layers"].items():  # higher bits never predicted worse for a layer (measured by the solver)
        e = v["relerr"]
        assert e["8"] <= e["6"] <= e["4"]
    # the emitted storage follows the allocation
    inits = {t.name: t for t in q.graph.initializer}
    for L in rep.layers:
        dt = inits[f"{L.weight}_quantized"].data_type
        assert dt == (onnx.TensorProto.UINT4 if L.bits <= 4 else onnx.TensorProto.UINT8)


def test_output_sensitivity_picks_the_layer_that_matters():
    """Two equal layers, one of them followed by a x30 gain before the output and the other by x1: with the
    measured output sensitivity the budget goes to the amplified one; the plain layer error cannot tell them apart
    as well."""
    rng = np.random.default_rng(0)
    d = 32
    w1, w2 = (rng.standard_normal((d, d)) / np.sqrt(d)).astype(np.float32), \
        (rng.standard_normal((d, d)) / np.sqrt(d)).astype(np.float32)
    nodes = [onnx.helper.make_node("MatMul", ["input", "A"], ["a"], name="quiet"),
             onnx.helper.make_node("MatMul", ["input", "B"], ["b"], name="loud"),
             onnx.helper.make_node("Mul", ["b", "gain"], ["bg"]),
             onnx.helper.make_node("Add", ["a", "bg"], ["output"])]
    g = onnx.helper.make_graph(
        nodes, "g", [onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["N", d])],
        [onnx.helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w1, "A"), numpy_helper.from_array(w2, "B"),
         numpy_helper.from_array(np.array(30.0, np.float32), "gain")])
    model = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)
    x = rng.standard_normal((256, d)).astype(np.float32)
    _, rep = run(model, {"input": x}, recipe(bits=3, avg_bits=5.5, mp_bits=(8,), device="cpu"))
    assert {L.node: L.bits for L in rep.layers} == {"quiet": 3, "loud": 8}
    sens = {k: v["sensitivity"] for k, v in rep.mixed_precision["layers"].items()}
    assert sens["loud"] > 100 * sens["quiet"]


def test_scaling_estimate_solves_only_the_base_bits():
    model = builders.mlp_model([24, 32, 16, 8], seq=4, seed=5)
    x = np.random.default_rng(0).standard_normal((32, 4, 24)).astype(np.float32)
    kw = dict(bits=4, avg_bits=5.0, mp_bits=(6, 8), device="cpu")
    _, solved = run(model, {"input": x}, recipe(mp_estimate="solve", **kw))
    _, scaled = run(model, {"input": x}, recipe(mp_estimate="scaling", **kw))
    for k, v in scaled.mixed_precision["layers"].items():
        e = v["relerr"]
        assert e["4"] == solved.mixed_precision["layers"][k]["relerr"]["4"]
        assert e["6"] == pytest.approx(e["4"] / 16) and e["8"] == pytest.approx(e["4"] / 256)
    assert scaled.avg_bits <= 5.0


def test_keep_8bit_composes_with_mixed_precision():
    model = builders.mlp_model([24, 32, 16, 8], seq=4, seed=5)
    x = np.random.default_rng(0).standard_normal((32, 4, 24)).astype(np.float32)
    _, rep = run(model, {"input": x}, recipe(bits=4, avg_bits=4.2, keep_8bit=("last",), device="cpu"))
    bits = [L.bits for L in rep.layers]
    assert bits[-1] == 8 and "layers.keep_8bit last" in rep.layers[-1].note
    assert set(rep.mixed_precision["layers"]) == {L.node for L in rep.layers[:-1]}  # pinned layers not allocated


# the settings without a command-line option of their own go to a recipe file (a dict: its flat settings)
@pytest.mark.parametrize("args,needle", [
    ([dict(avg_bits=3)], "mixed_precision.avg_bits"),
    ([dict(avg_bits=9)], "mixed_precision.avg_bits"),
    ([dict(avg_bits=5, mp_bits=[4])], "mixed_precision.candidates"),
    ([dict(avg_bits=5, mp_bits=["x"])], "mixed_precision.candidates"),
    ([dict(avg_bits=5, mp_bits=[6]), "--format", "matmulnbits", "--granularity", "block", "--block-size", "16"],
     "mixed_precision.candidates"),
    ([dict(layer_bits=["gemm0"])], "PATTERN=BITS"),
    ([dict(keep_8bit=["nothing*"])], "matches no quantized layer"),
    ([dict(mp_samples=0, avg_bits=5)], "mixed_precision.samples"),
])
def test_cli_errors_one_line(tmp_path, capsys, args, needle):
    args = [b for a in args for b in (builders.recipe_args(tmp_path, **a) if isinstance(a, dict) else [a])]
    builders.assert_cli_one_line_error(tmp_path, capsys, args, needle)


def test_cli_mixed_precision_writes_allocation(tmp_path, capsys):
    import json
    src = tmp_path / "m.onnx"
    onnx.save(builders.mlp_model([24, 32, 16, 8], seq=4, seed=5), str(src))
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    assert main(["quantize", str(src), "-o", str(out), "--calib", "random", "--report", str(report)]
                + builders.recipe_args(tmp_path, avg_bits=5, keep_8bit=["last"])) == 0
    text = capsys.readouterr().out
    r = json.loads(report.read_text())
    assert r["layers"][-1]["bits"] == 8 and r["avg_bits"] <= 5.0 and r["mixed_precision"]["budget"] == 5.0
    assert "average bits" in text and "layers.keep_8bit last" in text


def test_pinned_layers_over_budget_warn(caplog):
    model = builders.mlp_model([24, 32, 16, 8], seq=4, seed=5)
    x = np.random.default_rng(0).standard_normal((8, 4, 24)).astype(np.float32)
    _, rep = run(model, {"input": x}, recipe(bits=4, avg_bits=5, keep_8bit=("first",), device="cpu"))
    assert rep.avg_bits > 5 and [L.bits for L in rep.layers] == [8, 4, 4]
    assert "pinned" in caplog.text
