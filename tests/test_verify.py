"""The check against the float model (verify.py): the comparison of an output against a float64 reference, chunk by
chunk; the float outputs taken before the quantized model exists; the samples it runs on."""

from __future__ import annotations

import numpy as np
import pytest
from builders import recipe

from onnxcomq import verify as V
from onnxcomq.pipeline import run

MODELS = "models/"


def _reference(fs, qs):
    """cosine and ||q - f|| / ||f|| over the positions where the float output is finite, in float64, whole."""
    f = np.concatenate([a.ravel() for a in fs]).astype(np.float64)
    q = np.concatenate([b.ravel() for b in qs]).astype(np.float64)
    ok = np.isfinite(f)
    f, q = f[ok], q[ok]
    return f @ q / np.linalg.norm(f) / np.linalg.norm(q), np.linalg.norm(q - f) / np.linalg.norm(f)


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 20])
def test_compare_matches_a_float64_reference_across_chunks_and_batches(monkeypatch, chunk):
    monkeypatch.setattr(V, "CHUNK", chunk)
    rng = np.random.default_rng(0)
    fs = [rng.standard_normal((3, 5, 7)).astype(np.float32) for _ in range(3)]
    qs = [(f + 0.1 * rng.standard_normal(f.shape)).astype(np.float32) for f in fs]
    fs[1][0, 2, 3] = np.inf  # a non-finite float value: that position is left out
    qs[1][0, 2, 3] = 5.0
    c = V._compare("y", fs, qs)
    cos, rel = _reference(fs, qs)
    assert c.finite and not c.float_finite
    np.testing.assert_allclose([c.cosine, c.rel_error], [cos, rel], rtol=1e-12)
    qs[2][2, 4, 6] = np.nan  # the quantized output is not finite where the float one is
    c = V._compare("y", fs, qs)
    assert not c.finite and not c.float_finite and c.problem()


def test_compare_counts_equal_integer_outputs():
    f = [np.array([1, 2, 3, 4]), np.array([5, 6])]
    q = [np.array([1, 0, 3, 4]), np.array([5, 7])]
    assert V._compare("ids", f, q).agreement == pytest.approx(4 / 6)


def test_float_outputs_are_taken_before_the_quantized_model_is_written(monkeypatch):
    """The float model's session runs after the first group's solve, before the emitter: the float session and the
    quantized model are never in memory together; the check's figures are those of a check run at the end."""
    from onnxcomq import pipeline

    events = []
    taken, emit = pipeline.float_outputs, pipeline.emit_qdq
    monkeypatch.setattr(pipeline, "float_outputs", lambda *a: (events.append("float"), taken(*a))[1])
    monkeypatch.setattr(pipeline, "emit_qdq", lambda *a, **k: (events.append("emit"), emit(*a, **k))[1])
    _, rep = run(MODELS + "fmnist_cnn.onnx", MODELS + "fmnist_calib.npz", recipe(bits=4, max_samples=16,
                                                                                  max_memory="1M"))
    assert rep.config["groups"] > 1 and events == ["float", "emit"]
    monkeypatch.undo()
    with monkeypatch.context() as m:  # the same figures from the float outputs taken at the end
        m.setattr(pipeline, "float_outputs", lambda *a: None)
        _, late = run(MODELS + "fmnist_cnn.onnx", MODELS + "fmnist_calib.npz", recipe(bits=4, max_samples=16,
                                                                                       max_memory="1M"))
    assert late.verification == rep.verification


def test_a_calibration_smaller_than_the_check_is_checked_once_through_the_groups():
    """With fewer calibration samples than the check takes and several groups, the later passes do not add the
    same samples to the check again."""
    _, rep = run(MODELS + "fmnist_cnn.onnx", MODELS + "fmnist_calib.npz", recipe(bits=4, max_samples=4,
                                                                                  max_memory="1M"))
    assert rep.config["groups"] > 1 and rep.verification["samples"] == 4


@pytest.mark.parametrize("name,fmt", [("fmnist_vit.onnx", "qdq"), ("fmnist_vit.onnx", "matmulnbits"),
                                      ("fmnist_cnn.onnx", "qdq")])
def test_a_loaded_model_is_quantized_in_place_and_a_callers_model_is_left_as_it_was(monkeypatch, name, fmt):
    """A model the run loaded (or folded, or rewrote) itself is edited into the quantized one (no second copy of its
    other initializers); a ModelProto from the caller comes back unchanged; both give the same bytes."""
    import onnx

    from onnxcomq import pipeline
    calls = []
    for f_name in ("emit_qdq", "emit_matmulnbits"):
        f = getattr(pipeline, f_name)
        monkeypatch.setattr(pipeline, f_name, lambda *a, _f=f, _n=f_name, **k: (calls.append((_n, k.get("inplace"))),
                                                                                _f(*a, **k))[1])
    flat = dict(bits=4, max_samples=8, bias_correction=name != "fmnist_cnn.onnx") if fmt == "qdq" else \
        dict(bits=4, max_samples=8, granularity="block", block_size=16, weight_format=fmt)
    path = MODELS + name
    from_path, _ = run(path, MODELS + "fmnist_calib.npz", recipe(**flat))
    assert calls and all(inplace for _, inplace in calls)
    calls.clear()
    mine = onnx.load(path)
    before = mine.SerializeToString()
    from_proto, _ = run(mine, MODELS + "fmnist_calib.npz", recipe(**flat))
    assert mine.SerializeToString() == before
    assert from_proto.SerializeToString() == from_path.SerializeToString()
    if name == "fmnist_cnn.onnx":  # (nothing to fold, rewrite or re-bias: the caller's own object reaches the emitter)
        assert calls == [("emit_qdq", False)]


def _saturates() -> bool:
    """Whether this CPU's onnxruntime U8S8 kernel saturates (x86 without VNNI): MatMulInteger of 255s and 127s."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    g = helper.make_graph([helper.make_node("MatMulInteger", ["A", "B"], ["Y"])], "probe",
                          [helper.make_tensor_value_info("A", TensorProto.UINT8, [4, 2])],
                          [helper.make_tensor_value_info("Y", TensorProto.INT32, None)],
                          [numpy_helper.from_array(np.full((2, 16), 127, np.int8), "B")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return int(s.run(None, {"A": np.full((4, 2), 255, np.uint8)})[0][0, 0]) != 255 * 127 * 2


def test_fused_kernels_are_checked_against_the_graphs_own_arithmetic(monkeypatch):
    import onnx

    x = dict(np.load(MODELS + "fmnist_calib.npz"))
    feeds = [{"input": x["input"][:16]}, {"input": x["input"][16:32]}]
    fm = onnx.load(MODELS + "fmnist_cnn.onnx")
    q, rep = run(fm, {"input": x["input"][:32]}, recipe(bits=8, act_bits=8, device="cpu"))
    (out,) = rep.verification["outputs"]
    assert out["graph_rel_error"] is not None and out["graph_rel_error"] < 0.2  # the graph node by node
    summary = V.OutputCheck(**out).summary()
    assert summary.endswith(f"({out['graph_rel_error']:.3g} node by node)"), summary
    assert not V.warnings(V.verify(fm, q, feeds)[0])  # uint8 weights: the fused kernels as accurate as the graph
    # a weight-only model has nothing to fuse: no second run
    w, rep_w = run(fm, {"input": x["input"][:32]}, recipe(bits=8, device="cpu"))
    assert rep_w.verification["outputs"][0]["graph_rel_error"] is None
    # int8 weights, as onnxcomq stored them before (weight_storage off): where onnxruntime's U8S8 kernels saturate
    # (this CPU or not), the check says so
    from onnxcomq.write.activations import ActivationQuantizer
    with monkeypatch.context() as m:
        m.setattr(ActivationQuantizer, "weight_storage", lambda self, qweights: qweights)
        q8, _ = run(fm, {"input": x["input"][:32]}, recipe(bits=8, act_bits=8, device="cpu"))
    checks, _ = V.verify(fm, q8, feeds)
    said = [c.warning() for c in checks if c.warning()]
    if _saturates():
        assert said and "fused int8 kernels" in said[0], [c.__dict__ for c in checks]
    else:
        assert not said
    # the rule itself, on any CPU: fused outputs further from float than the graph's by the factor and slack
    real = V.run_model

    def fused_off(model, names, fds, what="", optimize=True):
        outs = real(model, names, fds, what, optimize=optimize)
        if not optimize or what != "the quantized model":  # (the float model's outputs and the graph's as they are)
            return outs
        return [[o + np.float32(0.2) * np.abs(o).max() for o in r] for r in outs]
    monkeypatch.setattr(V, "run_model", fused_off)
    checks, _ = V.verify(fm, q, feeds)
    c = checks[0]
    assert c.rel_error > V.KERNEL_FACTOR * c.graph_rel_error + V.KERNEL_SLACK and "fused int8" in c.warning()
    # a TensorRT target is judged by its Q/DQ arithmetic alone: onnxruntime's kernels are not what runs it (on
    # torchvision's MobileNetV2 they gave a relative error of 0.74 on this CPU against 0.039 node by node)
    qt, rep_t = run(fm, {"input": x["input"][:32]}, recipe(bits=8, act_bits=8, device="cpu", target="tensorrt"))
    (out_t,) = rep_t.verification["outputs"]
    assert out_t["graph_rel_error"] is None and out_t["rel_error"] < 0.2
    (c,) = V.verify(fm, qt, feeds, kernels=False)[0]
    assert c.problem() is None and c.warning() is None and c.graph_rel_error is None
    assert V.verify(fm, qt, feeds)[0][0].rel_error > V.KERNEL_FACTOR * c.rel_error  # (the kernels, made off above)


def test_an_output_near_zero_fails_the_check_though_its_relative_error_is_below_one():
    """An output that collapsed towards zero (a W8A8 classifier whose int32 bias codes were clipped: 1e-7 where float
    is 0.02) has a relative error just under 1: the cosine catches it. A close output does not fail; an output that
    is all zero in float fails unless it is all zero quantized too."""
    rng = np.random.default_rng(0)
    f = [(0.02 + 1e-3 * rng.standard_normal((4, 10))).astype(np.float32)]
    collapsed = V._compare("y", f, [(1e-7 * rng.standard_normal((4, 10))).astype(np.float32)])
    assert collapsed.rel_error < V.MAX_REL_ERROR and collapsed.cosine < V.MIN_COSINE
    assert "output y is far from the float model's" in collapsed.problem() and collapsed.warning() is None
    close = V._compare("y", f, [f[0] + np.float32(1e-3)])
    assert close.problem() is None and close.cosine > 0.99
    zero = [np.zeros((4, 10), np.float32)]
    assert V._compare("y", zero, zero).problem() is None and V._compare("y", zero, f).problem()


def test_an_output_that_passes_far_from_float_is_written_with_a_warning():
    """Between the check's floor (cosine 0.5) and WARN_COSINE an output is written, with a warning naming it and its
    cosine: PicoDet's W8A8 boxes (0.68) and mediapipe's W4 pose mask (0.81) passed without a word. A close output,
    and one that fails, get none."""
    rng = np.random.default_rng(0)
    f = [rng.standard_normal((4, 50)).astype(np.float32)]
    for noise, warned in [(0.3, False), (0.7, True), (3.0, False)]:  # cosines about 0.96, 0.82, 0.32
        c = V._compare("boxes", f, [f[0] + noise * rng.standard_normal((4, 50)).astype(np.float32)])
        assert (c.warning() is not None) == warned, (noise, c.cosine)
        if warned:
            assert c.problem() is None and c.cosine < V.WARN_COSINE
            assert f"output boxes is at cosine {c.cosine:.3g} to the float model's" in c.warning()  # (3 digits)
        assert V.warnings([c]) == ([c.warning()] if warned else [])



@pytest.mark.parametrize("cosine,limit,shown", [(0.89996, V.WARN_COSINE, "0.89996"), (0.8999, V.WARN_COSINE, "0.8999"),
                                                (0.4996, V.MIN_COSINE, "0.4996"), (0.812, V.WARN_COSINE, "0.812")])
def test_a_cosine_just_under_a_limit_is_not_shown_as_the_limit(cosine, limit, shown):
    """silero-vad's W8A8 warning read "output output is at cosine 0.9 to the float model's (below 0.9)": three
    significant digits rounded 0.8999 up to the limit. As many digits as show the value under it are written."""
    c = V.OutputCheck("out", True, cosine=cosine, rel_error=0.3 if limit == V.WARN_COSINE else 0.9)
    text = c.warning() if limit == V.WARN_COSINE else c.problem()
    assert text is not None and f"cosine {shown}" in text and float(shown) < limit


def _threshold_model(c: float, drop: bool = False):
    """x -> idx = NonZero(x > c) (its shape depends on the values), y = x * 2 (or, ``drop``, its first column
    dropped: a shape that must not change)."""
    from onnx import TensorProto, helper, numpy_helper
    inits = [numpy_helper.from_array(np.array(c, np.float32), "c"),
             numpy_helper.from_array(np.array(2, np.float32), "two"), numpy_helper.from_array(np.array([1]), "one"), numpy_helper.from_array(np.array([99]), "end"),
             numpy_helper.from_array(np.array([1]), "axis")]
    nodes = [helper.make_node("Greater", ["x", "c"], ["g"]), helper.make_node("NonZero", ["g"], ["idx"]),
             helper.make_node("Mul", ["x", "two"], ["y2"])]
    nodes.append(helper.make_node("Slice", ["y2", "one", "end", "axis"], ["y"]) if drop else
                 helper.make_node("Identity", ["y2"], ["y"]))
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("idx", TensorProto.INT64, [2, None]),
                           helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", None])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_an_output_whose_shape_depends_on_the_data_may_change_shape():
    """A detector with NMS in the graph finds a box more or less once quantized: that output's shape differs on
    some check batches, which are left out of its comparison and counted, and the model passes. Any other output
    whose shape changes fails the check."""
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((3, 4)).astype(np.float32)} for _ in range(4)]
    assert V.data_dependent(_threshold_model(0.0)) == {"idx"}
    c = float(np.sort(feeds[1]["x"].ravel())[5]) - 1e-4  # one value of batch 1 right above the float threshold
    checks, _ = V.verify(_threshold_model(c), _threshold_model(c + 2e-4), feeds)
    idx, y = checks
    assert idx.varied == 1 and idx.problem() is None and idx.agreement == 1.0 and "1 check batch" in idx.summary()
    assert y.varied == 0 and y.rel_error == 0 and not V.problems(checks)
    assert idx.dynamic and not y.dynamic
    # a data-dependent output's elements need not correspond position by position (boxes swapping places in the
    # score order): its distance is reported, not judged; any other output's is
    far = dict(finite=True, cosine=0.1, rel_error=2.0)
    assert V.OutputCheck("boxes", dynamic=True, **far).problem() is None and V.OutputCheck("y", **far).problem()
    checks, _ = V.verify(_threshold_model(c), _threshold_model(c, drop=True), feeds)
    assert V.problems(checks) == ["output y: shape/type (3, 3) differs from the float model's (3, 4)"]



def _if_model(scale: float, inner_topk: bool = False):
    """x -> If(c) -> y = x * scale on either branch (silero-vad's branches on the input's rank and sample rate);
    ``inner_topk``: the then branch orders its output by value (TopK of the whole row) instead."""
    from onnx import TensorProto, helper, numpy_helper
    k = numpy_helper.from_array(np.array([4], np.int64), "k")

    def branch(name, topk):
        nodes = [helper.make_node("Mul", ["x", "s"], [f"{name}_y"])]
        if topk:
            nodes += [helper.make_node("TopK", [f"{name}_y", "k"], [f"{name}_v", f"{name}_i"])]
        out = f"{name}_v" if topk else f"{name}_y"
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)])
    g = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=branch("then", inner_topk), else_branch=branch("else",
                                                                                                       False))],
        "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
              helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array(scale, np.float32), "s"), k])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_an_output_behind_a_plain_if_is_judged():
    """Every output downstream of an If was taken for one whose elements may swap places (as after NMS) and left
    unjudged: silero-vad's W8A8 model, whose outputs all come through Ifs, was written at cosine 0.47 and 0.25
    without a word. Its shape may still vary; its values are judged, unless a branch orders them by value."""
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((3, 4)).astype(np.float32), "c": np.array(True)} for _ in range(2)]
    assert V.data_dependent(_if_model(2.0)) == {"y"} and not V.data_dependent(_if_model(2.0), V.REORDER_OPS)
    checks, _ = V.verify(_if_model(2.0), _if_model(-2.0), feeds)
    assert not checks[0].dynamic and V.problems(checks) and "far from the float model" in V.problems(checks)[0]
    checks, _ = V.verify(_if_model(2.0), _if_model(2.0 * 0.9), feeds)  # (near: passes)
    assert not V.problems(checks) and not V.warnings(checks)
    assert V.data_dependent(_if_model(2.0, True), V.REORDER_OPS) == {"y"}
    checks, _ = V.verify(_if_model(2.0, True), _if_model(-2.0, True), feeds)
    assert checks[0].dynamic and not V.problems(checks)


def _zipmap_model(w: np.ndarray):
    """x -> Softmax(x W) -> ZipMap (scikit-learn's classifier output: one {class: probability} per sample) and the
    same probabilities as a sequence of tensors (SplitToSequence)."""
    from onnx import TensorProto, helper, numpy_helper
    nodes = [helper.make_node("MatMul", ["x", "w"], ["z"]), helper.make_node("Softmax", ["z"], ["p"]),
             helper.make_node("ZipMap", ["p"], ["probs"], domain="ai.onnx.ml", classlabels_int64s=[3, 1, 2]),
             helper.make_node("SplitToSequence", ["p"], ["rows"], keepdims=0)]
    seq = helper.make_sequence_type_proto(helper.make_tensor_type_proto(TensorProto.FLOAT, [3]))
    maps = helper.make_sequence_type_proto(helper.make_map_type_proto(
        TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, [])))
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_value_info("probs", maps), helper.make_value_info("rows", seq)],
                          [numpy_helper.from_array(w.astype(np.float32), "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 1)],
                             ir_version=8)


def test_sequence_outputs_are_compared_as_the_values_they_hold():
    """A classifier exported by skl2onnx outputs a sequence of {class: probability} maps (ZipMap): onnxruntime
    returns a list of dicts, which was compared for equality ("0.0 % equal", never judged). Its values are
    compared as a float output now (key order kept), and so are a sequence's tensors: a far output fails."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3))
    feeds = [{"x": 2 * rng.standard_normal((5, 4)).astype(np.float32)} for _ in range(2)]
    (probs, rows), _ = V.verify(_zipmap_model(w), _zipmap_model(w + 0.01), feeds)
    for c in (probs, rows):
        assert c.agreement is None and 0.99 < c.cosine < 1 and 0 < c.rel_error < 0.05 and c.problem() is None
    p = [V.as_array(r[0]) for r in V.float_outputs(_zipmap_model(w), feeds)]
    e = np.exp(feeds[0]["x"].astype(np.float64) @ w.astype(np.float32))
    # the values in the maps' key order (onnxruntime's maps are sorted: labels 1, 2, 3 are columns 1, 2, 0)
    np.testing.assert_allclose(p[0], (e / e.sum(1, keepdims=True))[:, [1, 2, 0]], rtol=1e-5)
    checks, _ = V.verify(_zipmap_model(w), _zipmap_model(-3 * w), feeds)
    assert all("is far from the float model's" in c.problem() for c in checks)
