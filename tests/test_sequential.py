"""Sequential capture (cross statistics H = X~^T X, G~ = X~^T X~) and held-out damping.

The cross solver is checked against a float64 step loop that works on X and X~ themselves (residuals recomputed from
scratch at every step), the streamed statistics against X and X~ built from onnxruntime outputs of both models.
"""

from types import SimpleNamespace

import builders
import numpy as np
import onnxruntime as ort
import pytest
import reference as ref
from builders import recipe, recipe_args
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxcomq import run
from onnxcomq.capture.gram import LayerStats
from onnxcomq.capture.passes import capture, split_stages, stage_entries, stage_model
from onnxcomq.capture.rows import im2col
from onnxcomq.capture.session import capture_model
from onnxcomq.cli import main as cli_main
from onnxcomq.errors import UserError
from onnxcomq.graph.layers import find_layers
from onnxcomq.solve.comq import SolverConfig, comq_quantize, comq_quantize_groups, cross_objective, rtn_quantize
from onnxcomq.solve.grid import make_grid
from onnxcomq.write.qdq import quantized_twin


def cross_problem(m, n, seed, N=None, drift=0.3):
    """W, X and X~ = X + drift (the input of a partly quantized model), mean offsets like post-ReLU inputs."""
    rng = np.random.default_rng(seed)
    N = N or 3 * n
    Z = rng.standard_normal((N, max(2, n // 3)))
    X = Z @ rng.standard_normal((Z.shape[1], n)) + 0.3 * rng.standard_normal((N, n)) + rng.uniform(-1, 1, n)
    Xt = X + drift * rng.standard_normal((N, n)) * X.std(axis=0)
    W = rng.standard_normal((m, n)) * rng.uniform(0.5, 2.0, (m, 1))
    return W, X, Xt


def brute_cross(W, X, Xt, scale, lo, hi, order, sweeps, scale_update):
    """The step loop on X and X~ directly: for row i, coordinate j: target = q_ij + x~_j . r / ||x~_j||^2 with the
    residual r = X w_i - X~ q_i recomputed from scratch; scale_i = (X~ c_i) . (X w_i) / ||X~ c_i||^2."""
    m, n = W.shape
    scale = scale.astype(np.float64).copy()
    Q = W.copy()
    level = np.zeros_like(W)
    if order.ndim == 1:
        order = np.broadcast_to(order, (m, n))
    for _ in range(sweeps):
        table, levels = ref.grid_table(scale, lo, hi)
        for t in range(n):
            for i in range(m):
                j = order[i, t]
                r = X @ W[i] - Xt @ Q[i]
                g = Xt[:, j] @ Xt[:, j]
                target = Q[i, j] + Xt[:, j] @ r / g if g > 0 else W[i, j]
                q, lv = ref.nearest_bruteforce(table[i:i + 1], levels[i:i + 1], np.array([target]))
                Q[i, j], level[i, j] = q[0], lv[0]
        if scale_update:
            for i in range(m):
                xc, xw = Xt @ level[i], X @ W[i]
                num, den = xc @ xw, xc @ xc
                if den > 0 and num > 0:
                    scale[i] = num / den
            Q = level * scale[:, None]
    return Q, level, scale


def direct_objective(W, Q, X, Xt):
    return float(((X @ W.T - Xt @ Q.T) ** 2).sum())


@pytest.mark.parametrize("m,n,order,sweeps,scale_update,block", [
    (4, 9, "cyclic", 1, False, 0),
    (5, 23, "cyclic", 3, True, 8),
    (3, 17, "importance", 2, True, 4),
    (4, 21, "greedy", 2, True, 16),
    (6, 12, "greedy", 1, False, 4),
])
def test_cross_solver_equals_step_loop_on_x(m, n, order, sweeps, scale_update, block):
    W, X, Xt = cross_problem(m, n, seed=m * 100 + n)
    G, H, Gt = X.T @ X, Xt.T @ X, Xt.T @ Xt
    cfg = SolverConfig(bits=3, order=order, sweeps=sweeps, scale_update=scale_update, lambda_search=False,
                       lam=0.9, dtype="float64", step_block=block)
    res = comq_quantize(W, Gt, cfg, H=H, G0=G)
    grid = make_grid(W, 3, "asym", "channel", 0.9, True)
    Q, level, scale = brute_cross(W, X, Xt, grid.scale, grid.lo, grid.hi, ref.order(W, Gt, order), sweeps,
                                  scale_update)
    np.testing.assert_array_equal(res.codes, (level - grid.lo[:, None]).astype(np.int32))
    np.testing.assert_allclose(res.scale, scale, rtol=1e-10)
    np.testing.assert_allclose(res.qweight, Q, rtol=1e-10, atol=1e-12)
    want = direct_objective(W, Q, X, Xt)
    assert res.objective == pytest.approx(want, rel=1e-7)
    assert cross_objective(W, res.qweight, G, H, Gt) == pytest.approx(want, rel=1e-9)
    # a real improvement over rounding on the drifted inputs
    assert res.objective < direct_objective(W, rtn_quantize(W, Gt, cfg).qweight, X, Xt)


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 6), n=st.integers(2, 40), seed=st.integers(0, 10_000),
       order=st.sampled_from(["cyclic", "importance", "greedy"]), sweeps=st.integers(1, 3),
       scale_update=st.booleans(), search=st.booleans(), bits=st.integers(2, 5))
def test_cross_reduces_exactly_when_inputs_agree(m, n, seed, order, sweeps, scale_update, search, bits):
    W, X, _ = cross_problem(m, n, seed)
    G = X.T @ X
    cfg = SolverConfig(bits=bits, order=order, sweeps=sweeps, scale_update=scale_update, lambda_search=search,
                       dtype="float64")
    plain = comq_quantize(W, G, cfg)
    cross = comq_quantize(W, G, cfg, H=G, G0=G)
    np.testing.assert_array_equal(cross.codes, plain.codes)
    np.testing.assert_array_equal(cross.scale, plain.scale)
    np.testing.assert_allclose(cross.history, plain.history, rtol=1e-9, atol=1e-9 * abs(plain.history[0]))


@settings(max_examples=20, deadline=None)
@given(m=st.integers(1, 6), n=st.integers(2, 30), seed=st.integers(0, 10_000), drift=st.floats(0.0, 1.0),
       order=st.sampled_from(["cyclic", "importance", "greedy"]), dtype=st.sampled_from(["float32", "float64"]))
def test_cross_objective_is_monotone_and_exact(m, n, seed, drift, order, dtype):
    W, X, Xt = cross_problem(m, n, seed, drift=drift)
    G, H, Gt = X.T @ X, Xt.T @ X, Xt.T @ Xt
    res = comq_quantize(W, Gt, SolverConfig(bits=3, order=order, sweeps=3, dtype=dtype), H=H, G0=G)
    h = np.array(res.history)
    tol = (1e-9 if dtype == "float64" else 1e-4) * h[0]
    assert np.all(np.diff(h) <= tol)
    signal = float(((X @ W.T) ** 2).sum())  # float32 rounding is relative to the signal, not to the error
    assert res.objective == pytest.approx(direct_objective(W, res.qweight.astype(np.float64), X, Xt),
                                          rel=1e-8 if dtype == "float64" else 1e-3,
                                          abs=1e-12 * signal if dtype == "float64" else 1e-5 * signal)


def test_cross_groups_equal_one_by_one():
    rng = np.random.default_rng(3)
    probs = [cross_problem(3, 9, seed) for seed in range(5)]
    W3 = np.stack([p[0] for p in probs])
    G3 = np.stack([p[1].T @ p[1] for p in probs])
    H3 = np.stack([p[2].T @ p[1] for p in probs])
    Gt3 = np.stack([p[2].T @ p[2] for p in probs])
    cfg = SolverConfig(bits=3, sweeps=2, dtype="float64", lambda_search=bool(rng.integers(2)))
    batched = comq_quantize_groups(W3, Gt3, cfg, H3=H3, G03=G3)
    for b, (W, X, Xt) in enumerate(probs):
        one = comq_quantize(W, Gt3[b], cfg, H=H3[b], G0=G3[b])
        np.testing.assert_array_equal(batched[b].codes, one.codes)
        np.testing.assert_allclose(batched[b].scale, one.scale, rtol=1e-12)
        assert batched[b].objective == pytest.approx(direct_objective(W, one.qweight, X, Xt), rel=1e-8)


def test_free_bias_with_cross_statistics():
    """b' = b + mu W^T - mu~ Q^T is the best bias, and the error with it is the cross objective on the centered
    statistics that LayerStats streams."""
    from onnxcomq.graph.layers import XSpec
    W, X, Xt = cross_problem(4, 7, seed=5, N=40)
    Q = np.round(W * 3) / 3
    b = np.random.default_rng(0).standard_normal(4)
    stats = LayerStats(XSpec("x", "rows", fan_in=7), 1, cross=True)
    stats.add(X[:25].astype(np.float32), None, Xt[:25].astype(np.float32))
    stats.add(X[25:].astype(np.float32), None, Xt[25:].astype(np.float32))
    X32, Xt32 = X.astype(np.float32).astype(np.float64), Xt.astype(np.float32).astype(np.float64)
    mu, mut = stats.means(0)
    b2 = b + W @ mu - Q @ mut

    def err(bias):
        return float(((X32 @ W.T + b - Xt32 @ Q.T - bias) ** 2).sum())

    G, H, Gt = stats.stats(0, centered=True)
    assert cross_objective(W, Q, G, H, Gt) == pytest.approx(err(b2), rel=1e-6)
    rng = np.random.default_rng(1)
    for _ in range(5):
        assert err(b2 + 0.01 * rng.standard_normal(4)) > err(b2)
    G, H, Gt = stats.stats(0)  # uncentered: the error with the bias unchanged
    assert cross_objective(W, Q, G, H, Gt) == pytest.approx(err(b), rel=1e-6)


def two_conv_model(seed=0):
    """input -> Conv 3x3 (pads 1) -> Relu -> depthwise Conv 3x3 stride 2 -> Relu -> MatMul over channels."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((6, 3, 3, 3)) / 4).astype(np.float32)
    w2 = (rng.standard_normal((6, 1, 3, 3)) / 3).astype(np.float32)
    w3 = (rng.standard_normal((6, 5)) / 2).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "W1"), (w2, "W2"), (w3, "W3"))]
    inits.append(numpy_helper.from_array(rng.standard_normal(6).astype(np.float32) * 0.1, "B1"))
    nodes = [helper.make_node("Conv", ["input", "W1", "B1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "W2"], ["c2"], name="dw", group=6, strides=[2, 2]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("Transpose", ["r2"], ["t2"], perm=[0, 2, 3, 1]),
             helper.make_node("MatMul", ["t2", "W3"], ["output"], name="head")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                         ["N", 3, 9, 9])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _outputs(model, tensors, x):
    sess = ort.InferenceSession(capture_model(model, tensors).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    return dict(zip(tensors, sess.run(tensors, {"input": x})))


@pytest.mark.parametrize("folds", [False, True])
def test_streamed_cross_statistics_equal_direct(folds):
    model = two_conv_model()
    layers, _ = find_layers(model)
    # a "quantized" twin: the first conv's weight rounded coarsely, its bias moved
    from onnxcomq.write.qdq import QuantizedWeight
    w1 = numpy_helper.to_array(model.graph.initializer[0])
    codes = np.clip(np.round(w1 / 0.1) + 8, 0, 15).astype(np.int32)
    qw = QuantizedWeight("W1", codes, np.full(6, 0.1, np.float32), np.full(6, 8, np.int32), 0, 4, False)
    from onnxcomq.write.bias import apply as apply_bias
    twin = quantized_twin(model, [qw], apply_bias, {"conv1": np.linspace(-0.2, 0.2, 6)})
    x = np.random.default_rng(0).standard_normal((5, 3, 9, 9)).astype(np.float32)
    batches = [{"input": x[:3]}, {"input": x[3:]}]
    specs = {L.x: L.groups for L in layers[1:]}
    fold_below = {s: 1e9 for s in specs} if folds else None
    stats, samples = capture(model, twin, specs, batches, fold_below=fold_below, total_samples=5)
    assert samples == 5
    fa, qa = _outputs(model, ["r1", "t2"], x), _outputs(twin, ["r1", "t2"], x)
    for L in layers[1:]:
        st_ = stats[L.x]
        assert st_.folded == folds
        t = L.x.tensor
        if L.x.kind == "conv":
            X, Xt = im2col(fa[t], L.x).astype(np.float64), im2col(qa[t], L.x).astype(np.float64)
            rows_per = X.shape[0] // 5
        else:
            X, Xt = (a[t].reshape(-1, 1, L.x.fan_in).astype(np.float64) for a in (fa, qa))
            rows_per = X.shape[0] // 5
        sample = np.repeat(np.arange(5), rows_per)
        fold_of = np.concatenate([np.arange(3) % 2, np.arange(2) % 2])[sample]  # alternate samples per batch
        for k in range(L.groups):
            for fold in ([None, 0, 1] if folds else [None]):
                sel = np.ones(len(X), bool) if fold is None else fold_of == fold
                A, B = X[sel, k], Xt[sel, k]
                G, H, Gt = st_.stats(k, fold=fold)
                np.testing.assert_allclose(G, A.T @ A, rtol=1e-5, atol=1e-4)
                np.testing.assert_allclose(H, B.T @ A, rtol=1e-5, atol=1e-4)
                np.testing.assert_allclose(Gt, B.T @ B, rtol=1e-5, atol=1e-4)
                mu, mut = st_.means(k, fold)
                np.testing.assert_allclose(mu, A.mean(0), rtol=1e-5, atol=1e-6)
                np.testing.assert_allclose(mut, B.mean(0), rtol=1e-5, atol=1e-6)
        assert not np.allclose(st_.stats(0)[1], st_.stats(0)[0])  # the twin really differs


def test_stage_model_keeps_only_what_the_stage_needs():
    model = two_conv_model()
    m = stage_model(model, ["r1"])
    assert [n.op_type for n in m.graph.node] == ["Conv", "Relu"]
    assert [o.name for o in m.graph.output] == ["r1"]
    assert {t.name for t in m.graph.initializer} == {"W1", "B1"}
    x = np.random.default_rng(0).standard_normal((2, 3, 9, 9)).astype(np.float32)
    got = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_array_equal(got, _outputs(model, ["r1"], x)["r1"])


def test_plan_stages_contiguous_and_balanced():
    layers = [SimpleNamespace(depthwise=False, i=i) for i in range(11)]
    for n in (1, 2, 4, 11, 20):
        stages = split_stages(layers, n)
        assert [x for s in stages for x in s] == layers
        assert len(stages) == min(n, 11)
        assert max(map(len, stages)) - min(map(len, stages)) <= 1


def inverted_residual_model(blocks=4, c=4, hw=6, seed=0):
    """A stem conv, then ``blocks`` MobileNet blocks x -> 1x1 expand (c -> 4c) -> Relu -> 3x3 depthwise -> Relu ->
    1x1 project (4c -> c) -> Add(x)."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def conv(x, out, shape, **attrs):
        w = f"w_{out}"
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:])))
                                             .astype(np.float32), w))
        nodes.append(helper.make_node("Conv", [x, w], [out], name=f"conv_{out}", **attrs))
        return out

    x = conv("input", "stem", (c, 3, 3, 3), pads=[1, 1, 1, 1])
    for b in range(blocks):
        e = conv(x, f"e{b}", (4 * c, c, 1, 1))
        nodes.append(helper.make_node("Relu", [e], [f"re{b}"]))
        d = conv(f"re{b}", f"d{b}", (4 * c, 1, 3, 3), pads=[1, 1, 1, 1], group=4 * c)
        nodes.append(helper.make_node("Relu", [d], [f"rd{b}"]))
        p = conv(f"rd{b}", f"p{b}", (c, 4 * c, 1, 1))
        nodes.append(helper.make_node("Add", [p, x], [f"x{b}"]))
        x = f"x{b}"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                         ["N", 3, hw, hw])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_no_stage_starts_at_a_depthwise_conv():
    """Stem + 4 MobileNet blocks (13 layers) in 5 stages: by count two stages would start at a depthwise conv; they
    start at the expand conv before it instead (the nearest other layer, the earlier one on a tie)."""
    model = inverted_residual_model(blocks=4)
    layers, _ = find_layers(model)
    assert [L.node for L in layers][:4] == ["conv_stem", "conv_e0", "conv_d0", "conv_p0"]
    even = np.linspace(0, len(layers), 6).round().astype(int)[:-1]
    assert [layers[i].node for i in even] == ["conv_stem", "conv_p0", "conv_d1", "conv_d2", "conv_e3"]
    assert [s[0].node for s in split_stages(layers, 5)] == ["conv_stem", "conv_p0", "conv_e1", "conv_e2", "conv_e3"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=40), st.integers(1, 45))
def test_stage_boundaries_property(grouped, n):
    """Any sequence of depthwise and other convs, any stage count: the stages are contiguous and cover every layer
    once, as many as asked (at most one per layer); a boundary stays where the count puts it unless that layer is
    depthwise, moves by at most half a stage, and lands on a depthwise conv only if no other layer was in reach."""
    layers = [SimpleNamespace(depthwise=g, i=i) for i, g in enumerate(grouped)]
    stages = split_stages(layers, n)
    assert [x for s in stages for x in s] == layers
    k = min(n, len(layers))
    assert len(stages) == k
    even = np.linspace(0, len(layers), k + 1).round().astype(int)
    starts = [s[0].i for s in stages]
    half = max(1, len(layers) // (2 * k))
    for j in range(1, k):
        b, e = starts[j], even[j]
        if not grouped[e]:
            assert b == e
            continue
        assert abs(b - e) <= half
        reach = [i for i in range(e - half, e + half + 1) if starts[j - 1] < i < even[j + 1] and not grouped[i]]
        assert (not grouped[b]) if reach else b == e
        if reach:  # the nearest, the earlier on a tie
            assert b == min(reach, key=lambda i: (abs(i - e), i))


def deep_mlp(seed):
    return builders.mlp_model([12, 24, 24, 24, 24, 6], seed=seed)


def _output_error(model, q, x):
    run_ = [ort.InferenceSession(mm.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
            for mm in (model, q)]
    return float(((run_[0] - run_[1]) ** 2).mean())


def test_sequential_lowers_the_output_error():
    """At 3 bits on deep MLPs (5 layers), feeding the quantized inputs forward lowers the final output error on
    held-out inputs, on average over seeds and on most seeds; one stage is exactly the one-pass result."""
    ratios = []
    for seed in range(4):
        model = deep_mlp(seed)
        rng = np.random.default_rng(seed)
        calib = {"input": rng.standard_normal((256, 12)).astype(np.float32)}
        test = rng.standard_normal((512, 12)).astype(np.float32)
        base = recipe(bits=3, sequential=False, damping=0.0)
        one, _ = run(model, calib, base)
        seq, rep = run(model, calib, recipe(bits=3, sequential=True, stages=5, damping=0.0))
        assert [L.stage for L in rep.layers] == [0, 1, 2, 3, 4]
        assert rep.config["sequential_stages"] == 5
        single, _ = run(model, calib, recipe(bits=3, sequential=True, stages=1, damping=0.0))
        assert single.SerializeToString() == one.SerializeToString()
        ratios.append(_output_error(model, seq, test) / _output_error(model, one, test))
    assert np.mean(ratios) < 0.8, ratios
    assert sum(r < 1 for r in ratios) >= 3, ratios


def test_only_stage_entries_correct_their_input_error():
    """Within a stage, a layer fed by another layer of the same stage must not correct the input error too (that
    layer corrects it already): only the entries of a stage fit X W from X~."""
    model = deep_mlp(0)
    x = np.random.default_rng(0).standard_normal((64, 12)).astype(np.float32)
    _, rep = run(model, {"input": x}, recipe(bits=4, sequential=True, stages=2, correct_few_rows=True))
    assert [L.stage for L in rep.layers] == [0, 0, 1, 1, 1]
    assert [L.corrected for L in rep.layers] == [False, False, True, False, False]
    # by default a layer with fewer rows than 4 x its fan-in does not correct (it would fit the calibration set)
    entry = rep.layers[2]
    assert entry.rows < 4 * np.prod(entry.shape[1:])
    _, rep = run(model, {"input": x}, recipe(bits=4, sequential=True, stages=2))
    assert not any(L.corrected for L in rep.layers)
    _, rep = run(model, {"input": np.tile(x, (4, 1))}, recipe(bits=4, sequential=True, stages=2))
    assert [L.corrected for L in rep.layers] == [False, False, True, False, False]
    # correct_rows moves that threshold, and only it (damping_rows is the fixed damping's threshold)
    fan_in = int(np.prod(entry.shape[1:]))
    ratio = 4 * entry.rows / fan_in  # the entry's rows per input with the tiled calibration set
    for r, want in ((ratio * 0.99, True), (ratio * 1.01, False)):
        for dr in (1.0, 1e9):
            _, rep = run(model, {"input": np.tile(x, (4, 1))},
                         recipe(bits=4, sequential=True, stages=2, correct_rows=r, damping_rows=dr))
            assert [L.corrected for L in rep.layers] == [False, False, want, False, False], (r, dr)
    _, rep = run(model, {"input": x}, recipe(bits=4, sequential=True, stages=2, correct_rows=0.0))
    assert [L.corrected for L in rep.layers] == [False, False, True, False, False]
    with pytest.raises(UserError, match="sequential.min_rows"):
        recipe(sequential=True, correct_rows=float("nan")).validate()
    with pytest.raises(UserError, match="sequential.min_rows"):
        recipe(sequential=True, correct_rows=-1).validate()
    two = two_conv_model()
    layers, _ = find_layers(two)
    assert stage_entries(two, layers) == {"conv1"}
    assert stage_entries(two, layers[1:]) == {"dw"}
    assert stage_entries(two, layers[2:]) == {"head"}


@pytest.mark.parametrize("stages,avg_bits", [(3, None), (3, 5.0), (1, 5.0), (0, 5.0)])
def test_one_shot_calibration_source_is_kept_for_later_stages(stages, avg_bits):
    # (a budget's allocation pass comes before the stages: a second pass even with one stage; and its sensitivity
    # runs the first samples again, in one pass too (0: sequential off))
    model = deep_mlp(0)
    x = np.random.default_rng(0).standard_normal((64, 12)).astype(np.float32)
    cfg = recipe(bits=4, sequential=True, stages=stages) if stages else recipe(bits=4, sequential=False)
    if avg_bits is not None:
        cfg = cfg.updated({"mixed_precision": {"avg_bits": avg_bits, "samples": 8}})
    a, ra = run(model, [{"input": x[:32]}, {"input": x[32:]}], cfg)
    b, rb = run(model, iter([{"input": x[:32]}, {"input": x[32:]}]), cfg)
    assert a.SerializeToString() == b.SerializeToString()
    assert [L.bits for L in ra.layers] == [L.bits for L in rb.layers]
    assert rb.samples == 64


def test_auto_damping_chooses_by_held_out_error():
    """A wide layer fed by few samples: 'auto' damps it with an alpha from the grid, and the held-out output error
    is not worse than without damping; a layer with plenty of rows is left alone."""
    rng = np.random.default_rng(0)
    model = builders.mlp_model([64, 48, 4], seed=1)  # Gemm 64 -> 48 (fan-in 64), MatMul 48 -> 4 (fan-in 48)
    Z = rng.standard_normal((400, 6))
    A = rng.standard_normal((6, 64))
    data = (Z @ A + 0.2 * rng.standard_normal((400, 64))).astype(np.float32)
    calib, test = {"input": data[:96]}, data[96:]
    # one solve per channel: with the grid chosen among 7 solves, held-out error picks alpha 0 for the first layer
    cfg = dict(bits=3, sequential=False, bias_correction=False, damping_rows=4.0, lambda_solves=1)
    auto, rep = run(model, calib, recipe(damping="auto", **cfg))
    off, rep0 = run(model, calib, recipe(damping=0.0, **cfg))
    assert all(L.damped and L.damping in recipe().regularization.grid for L in rep.layers if L.rows < 4 * 64)
    assert not any(L.damped for L in rep0.layers)
    assert _output_error(model, auto, test) <= _output_error(model, off, test) * 1.02
    # many rows: no damping at all
    _, rep2 = run(model, {"input": data}, recipe(damping="auto", **{**cfg, "damping_rows": 1.0}))
    assert not any(L.damped for L in rep2.layers)


def test_scaled_damping_alpha_per_layer():
    """damping 'scaled': every layer gets alpha = min(10, 3 sqrt(fan_in / rows)), with rows counting every output
    position of a conv and fan_in the inputs of one group; damping_scale 0 is exactly no damping."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 2, 3, 3)).astype(np.float32)  # 4 channels in 2 groups: fan-in 2 * 9 per group
    conv = builders.conv_model((3, 4, 7, 7), w, pads=[1, 1, 1, 1], group=2)
    calib = {"input": rng.standard_normal((3, 4, 7, 7)).astype(np.float32)}
    _, rep = run(conv, calib, recipe(bits=3, device="cpu"))
    (L,) = rep.layers
    assert L.rows == 3 * 7 * 7 and L.damped
    assert L.damping == pytest.approx(min(10.0, 3.0 * np.sqrt(18 / (3 * 49))))
    mlp = builders.mlp_model([64, 48, 4], seed=1)
    x = {"input": rng.standard_normal((20, 64)).astype(np.float32)}
    _, rep = run(mlp, x, recipe(bits=3, device="cpu", damping_scale=0.5, damping_max=0.8))
    assert [L.damping for L in rep.layers] == pytest.approx([0.8, 0.5 * np.sqrt(48 / 20)])  # capped, then not
    a, rep0 = run(mlp, x, recipe(bits=3, device="cpu", damping_scale=0.0))
    b, _ = run(mlp, x, recipe(bits=3, device="cpu", damping=0.0))
    assert not any(L.damped for L in rep0.layers)
    assert a.graph.SerializeToString() == b.graph.SerializeToString()  # (the metadata names the damping)


def test_scaled_damping_solves_the_damped_problem():
    """The scaled alpha enters the solve exactly like a fixed damping of the same strength on a layer with few
    rows; the RTN baseline and the reported errors stay undamped."""
    rng = np.random.default_rng(1)
    m = builders.mlp_model([32, 12], seed=2)
    x = {"input": (rng.standard_normal((40, 32)) @ rng.standard_normal((32, 32)) / 6).astype(np.float32)}
    scaled, rep = run(m, x, recipe(bits=3, device="cpu"))
    alpha = rep.layers[0].damping
    assert alpha == pytest.approx(3.0 * np.sqrt(32 / 40))
    fixed, rep2 = run(m, x, recipe(bits=3, device="cpu", damping=alpha, damping_rows=1e9))
    assert rep2.layers[0].damped and rep2.layers[0].damping == alpha
    assert scaled.graph.SerializeToString() == fixed.graph.SerializeToString()
    assert rep.layers[0].comq_error == rep2.layers[0].comq_error


@settings(max_examples=50, deadline=None)
@given(rows=st.integers(1, 10 ** 7), fan_in=st.integers(1, 5000), scale=st.floats(0, 20), cap=st.floats(0, 50))
def test_scaled_damping_rule_properties(rows, fan_in, scale, cap):
    from onnxcomq.solve.layer import scaled_damping
    a = scaled_damping(rows, fan_in, scale, cap)
    assert 0 <= a <= cap and a <= scale * np.sqrt(fan_in / rows) * (1 + 1e-12)
    assert scaled_damping(rows * 4, fan_in, scale, cap) <= a  # more rows per input: less damping
    assert scaled_damping(rows, fan_in * 4, scale, cap) >= a
    if scale * np.sqrt(fan_in / rows) < cap:
        assert a == pytest.approx(scale * np.sqrt(fan_in / rows))


def test_damping_and_stages_flags(tmp_path, capsys):
    model = builders.save(deep_mlp(0), tmp_path / "m.onnx")
    x = np.random.default_rng(0).standard_normal((40, 12)).astype(np.float32)
    np.savez(tmp_path / "c.npz", input=x)
    out = str(tmp_path / "q.onnx")
    base = ["quantize", model, "-o", out, "--calib", str(tmp_path / "c.npz"), "--quiet"]
    assert cli_main(base + recipe_args(tmp_path, damping=0.3)) == 0
    assert cli_main(base + recipe_args(tmp_path, sequential=True, stages=2, correction="all", correct_few_rows=True,
                                       correction_strength=0.5) + ["--report", str(tmp_path / "r.json")]) == 0
    import json
    layers = json.load(open(tmp_path / "r.json"))["layers"]
    assert [L["stage"] for L in layers] == [0, 0, 1, 1, 1] and [L["corrected"] for L in layers] == [0, 0, 1, 1, 1]
    # --correct-min-rows 0: every entry corrects, without --correct-few-rows; 1e6: none does
    for r, want in (("0", [0, 0, 1, 0, 0]), ("1e6", [0, 0, 0, 0, 0])):
        assert cli_main(base + recipe_args(tmp_path, sequential=True, stages=2, correct_rows=float(r))
                        + ["--report", str(tmp_path / "r.json")]) == 0
        assert [L["corrected"] for L in json.load(open(tmp_path / "r.json"))["layers"]] == want, r
    assert cli_main(base + recipe_args(tmp_path, sequential=True, correct_rows=-2)) == 2
    assert "sequential.min_rows must be a finite number >= 0, got -2" in capsys.readouterr().err
    assert cli_main(base + recipe_args(tmp_path, sequential=True, stages=0)) == 2
    assert "stages must be an integer >= 1" in capsys.readouterr().err
    assert cli_main(base + recipe_args(tmp_path, damping="lots")) == 2
    assert "damping must be 'scaled', 'auto' or a finite number >= 0, got 'lots'" in capsys.readouterr().err
    assert cli_main(base + recipe_args(tmp_path, damping=-1)) == 2
    assert "damping must be 'scaled', 'auto' or a finite number >= 0" in capsys.readouterr().err
    assert cli_main(base + recipe_args(tmp_path, damping_scale=-1)) == 2
    assert "damping scale must be a finite number >= 0" in capsys.readouterr().err
    with pytest.raises(UserError, match="damping grid"):
        recipe(damping_grid=(0.1, -1.0)).validate()


@pytest.mark.parametrize("with_g0", [True, False])
def test_lambda_solves_with_cross_statistics(with_g0):
    """Per row, the best of the full cross solves from each fixed lambda, by the exact ||X W^T - X~ Q^T||^2; the
    batched group solver makes the same choices as the one-by-one solver."""
    probs = [cross_problem(4, 9, seed) for seed in range(4)]
    grid = SolverConfig().lambda_grid
    cfg = SolverConfig(bits=3, sweeps=2, dtype="float64", lambda_solves=len(grid))
    W3 = np.stack([p[0] for p in probs])
    G3 = np.stack([X.T @ X for _, X, _ in probs])
    H3 = np.stack([Xt.T @ X for _, X, Xt in probs])
    Gt3 = np.stack([Xt.T @ Xt for _, _, Xt in probs])
    batched = comq_quantize_groups(W3, Gt3, cfg, H3=H3, G03=G3 if with_g0 else None)
    for b, (W, X, Xt) in enumerate(probs):
        one = comq_quantize(W, Gt3[b], cfg, H=H3[b], G0=G3[b] if with_g0 else None)
        np.testing.assert_array_equal(batched[b].codes, one.codes)
        np.testing.assert_allclose(batched[b].scale, one.scale, rtol=1e-12)
        per_lam = [comq_quantize(W, Gt3[b], SolverConfig(bits=3, sweeps=2, dtype="float64", lambda_search=False,
                                                        lam=lam), H=H3[b], G0=G3[b]) for lam in grid]
        rows = np.array([[direct_objective(W[i:i + 1], r.qweight[i:i + 1], X, Xt) for i in range(len(W))]
                         for r in per_lam])
        got = [direct_objective(W[i:i + 1], one.qweight[i:i + 1], X, Xt) for i in range(len(W))]
        np.testing.assert_allclose(got, rows.min(axis=0), rtol=1e-9)
        if with_g0:
            assert one.objective == pytest.approx(direct_objective(W, one.qweight, X, Xt), rel=1e-8)
        else:  # without G0 the objective leaves out the input-drift constant w^T (X - X~)^T (X - X~) w
            drift = float((((X - Xt) @ W.T) ** 2).sum())
            assert one.objective == pytest.approx(direct_objective(W, one.qweight, X, Xt) - drift, rel=1e-8,
                                                  abs=1e-8 * drift)


def test_correction_strength_scales_the_weight_correction_only():
    """Strength 0 gives the weights of --correction none (they fit X~ W), 0.5 and the default 1 others; at any
    strength a correcting layer's bias fits the float output's mean (so strength 0 differs from none there only);
    out-of-range strengths are a UserError."""
    model = deep_mlp(0)
    x = np.tile(np.random.default_rng(0).standard_normal((64, 12)).astype(np.float32), (4, 1))

    def inits(m):
        return {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    base = dict(bits=4, sequential=True, stages=2)
    none = inits(run(model, {"input": x}, recipe(correction="none", **base))[0])
    zero_m, rep = run(model, {"input": x}, recipe(correction_strength=0.0, **base))
    zero = inits(zero_m)
    half = inits(run(model, {"input": x}, recipe(correction_strength=0.5, **base))[0])
    full = inits(run(model, {"input": x}, recipe(**base))[0])
    corrected = [L for L in rep.layers if L.corrected]
    assert len(corrected) == 1
    node = next(n for n in zero_m.graph.node if n.name == corrected[0].node)
    bias = node.input[2]
    weights = [k for k in zero if k in none and "bias" not in k and k != bias]
    assert weights and all(np.array_equal(zero[k], none[k]) for k in weights)
    assert not np.array_equal(zero[bias], none[bias])
    assert any(not np.array_equal(half[k], zero[k]) for k in weights)
    assert any(not np.array_equal(half[k], full[k]) for k in weights)
    for bad in (-0.1, 1.5, "x"):
        with pytest.raises(UserError, match="correction strength"):
            run(model, {"input": x}, recipe(bits=4, sequential=True, correction_strength=bad))


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_mixed_target_statistics_equal_those_of_the_mixed_input(beta):
    """_mix: the statistics of the target X_b = b X + (1 - b) X~, formed directly in float64."""
    from onnxcomq.solve.layer import _mix

    _, X, Xt = cross_problem(2, 7, seed=5)
    Xb = beta * X + (1 - beta) * Xt
    G, H, Gt = _mix((X.T @ X, Xt.T @ X, Xt.T @ Xt), beta)
    np.testing.assert_allclose(G, Xb.T @ Xb, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(H, Xt.T @ Xb, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(Gt, Xt.T @ Xt, rtol=1e-12)


def test_the_default_is_sequential_and_steps_aside_where_it_cannot_apply():
    # sequential capture is the default; quantized activations, RTN, --preset fast and official take one float pass
    # (the first needs every layer's float statistics at once)
    from onnxcomq import Recipe

    model = "models/fmnist_cnn.onnx"
    x = {"input": np.load("models/fmnist_calib.npz")["input"][:32]}
    default, rep = run(model, x, Recipe())
    assert rep.config["sequential_stages"] == 6  # (16 stages asked, one a layer for the CNN's 6)
    explicit, _ = run(model, x, recipe(sequential=True))
    one_pass, _ = run(model, x, recipe(sequential=False))
    assert default.SerializeToString() == explicit.SerializeToString() != one_pass.SerializeToString()
    for r in (Recipe().updated({"weights": {"bits": 8}, "activations": {"bits": 8}}),
              Recipe().updated({"weights": {"method": "rtn"}}), Recipe.fast(), Recipe.official()):
        _, rep = run(model, x, r)
        assert rep.config["sequential_stages"] == 0, r


def _bits_and_codes(model):
    """{weight initializer of a DequantizeLinear: (its dtype, its values)} of a quantized model."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    return {n.input[0]: (inits[n.input[0]].data_type, numpy_helper.to_array(inits[n.input[0]]).tobytes())
            for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits}


def test_a_size_budget_takes_its_bits_from_a_float_pass_then_solves_sequentially():
    """A budget allocates from every layer's float statistics (the same bits as in one pass: the allocation never
    sees the quantized model), then the stages solve with those bits, fitting the partly quantized model's input:
    the same as pinning the allocated bits by hand in a sequential run, and not the one-pass solution."""
    from onnxcomq import Recipe

    model = "models/fmnist_cnn.onnx"
    x = {"input": np.load("models/fmnist_calib.npz")["input"][:32]}
    budget = Recipe().updated({"mixed_precision": {"avg_bits": 5.0, "samples": 4}})
    q_seq, rep_seq = run(model, x, budget)
    q_one, rep_one = run(model, x, budget.updated({"sequential": None}))
    assert rep_seq.config["sequential_stages"] == 6 and rep_one.config["sequential_stages"] == 0
    bits = {L.node: L.bits for L in rep_seq.layers}
    assert bits == {L.node: L.bits for L in rep_one.layers}
    assert len(set(bits.values())) > 1 and rep_seq.avg_bits <= 5.0  # (the budget raised some layers, not all)
    pinned, rep_pin = run(model, x, Recipe().updated({"layers": {"layer_bits": [f"{n}={b}" for n, b in bits.items()]}}))
    assert {L.node: L.bits for L in rep_pin.layers} == bits
    assert _bits_and_codes(q_seq) == _bits_and_codes(pinned) != _bits_and_codes(q_one)
