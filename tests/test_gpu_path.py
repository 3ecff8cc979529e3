"""The solver's GPU code path without a GPU: the strict CuPy double (tests/strict_cupy.py) keeps CuPy's host/device
rules, one layer's solve (solve.layer.quantize_layer) and whole runs on it give exactly the NumPy results, and
tools/bench/gpu.py runs. The layer, cross-statistics and whole-run cases also run on CuPy where a CUDA device is
present (marked gpu; tools/gpu_check.sh), there within float tolerance of NumPy."""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import numpy as np
import onnx
import pytest
import strict_cupy as sc
from onnx import numpy_helper
from test_golden import MODELS, calibration, output_sha

from onnxcomq.solve.backend import array_module, gpu_available, to_numpy
from onnxcomq.solve.comq import SolverConfig, comq_quantize
from onnxcomq.solve.layer import LayerPolicy, quantize_layer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU = pytest.param("cupy", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not gpu_available(), reason="no CUDA device: GPU tests skipped")])


@pytest.fixture(params=["strict", GPU])
def dev(request):
    """A device array module: the strict double (exact against NumPy) or cupy (within float tolerance)."""
    if request.param == "cupy":
        import cupy
        return cupy
    return sc


@pytest.fixture
def a():
    return sc.asarray(np.arange(6.0).reshape(2, 3))


# --- the double is strict ---

@pytest.mark.parametrize("convert", [np.asarray, np.array, np.ascontiguousarray, lambda x: np.stack([x])])
def test_no_implicit_conversion_to_numpy(a, convert):
    with pytest.raises(TypeError, match="Implicit conversion to a NumPy array is not allowed|got a device array"):
        convert(a)


@pytest.mark.parametrize("call", [
    lambda a: np.sum(a), lambda a: np.argsort(a), lambda a: np.where(a > 0, a, 0), lambda a: np.sqrt(a),
    lambda a: np.maximum(a, 0), lambda a: np.ndim(a)])
def test_numpy_functions_refuse_device_arrays(a, call):
    with pytest.raises(TypeError):
        call(a)


@pytest.mark.parametrize("mix", [
    lambda a, h: a + h, lambda a, h: h + a, lambda a, h: a * h, lambda a, h: h - a, lambda a, h: a @ h[:, None],
    lambda a, h: a < h, lambda a, h: a + [1.0, 2.0, 3.0], lambda a, h: sc.where(a > 1, h, 0),
    lambda a, h: sc.maximum(a, h), lambda a, h: sc.stack([a[0], h]), lambda a, h: sc.einsum("ij,j->i", a, h),
    lambda a, h: a.__iadd__(h), lambda a, h: a.__setitem__(0, h), lambda a, h: sc.ascontiguousarray(h)])
def test_host_arrays_in_device_operations_raise(a, mix):
    with pytest.raises(TypeError, match="Unsupported type"):
        mix(a, np.ones(3))


def test_explicit_transfers_scalars_and_host_indices_are_allowed(a):
    h = np.arange(6.0).reshape(2, 3)
    assert array_module(a) is sc and array_module(h) is np
    for back in (sc.asnumpy(a), a.get(), to_numpy(a)):
        assert type(back) is np.ndarray and (back == h).all()
    assert to_numpy(h) is h and sc.asnumpy(h) is h
    assert float(a[0, 1]) == 1.0 and int(a[1, 2]) == 5 and bool(a[0, 1] > 0) and a[1, 0].item() == 3.0
    assert a.tolist() == h.tolist() and f"{a[0, 2]:.1f}" == "2.0"
    assert ((np.float32(2) * a + 1 - a / 2.0) ** 2).get().tolist() == ((2 * h + 1 - h / 2) ** 2).tolist()
    assert a[:, np.array([2, 0])].get().tolist() == h[:, [2, 0]].tolist()  # (CuPy copies index arrays over)
    b = a.copy()
    b[0] = 7.0
    b[:, sc.asarray(np.array([1]))] += a[:, 1:2]
    assert b.get().tolist() == [[7.0, 8.0, 7.0], [3.0, 8.0, 5.0]] and a.get().tolist() == h.tolist()


def test_results_stay_on_the_device(a):
    for r in (a.sum(), a[0, 0], a.T, a.reshape(-1), a.max(axis=1), sc.linalg.norm(a), sc.einsum("ij->j", a),
              sc.linalg.solve(sc.eye(2) + a[:, :2], a), sc.zeros_like(a), sc.where(a > 2, a, 0), a > 1):
        assert type(r) is sc.ndarray, r
    assert a.sum().ndim == 0 and a.dtype == np.float64 and a.shape == (2, 3)
    assert sc.float32 is np.float32 and sc.newaxis is None
    out = sc.zeros_like(a)
    assert sc.maximum(a, 1.5, out=out) is out and out.get().tolist() == np.maximum(a.get(), 1.5).tolist()


def test_argsort_is_stable_and_takes_no_other_kind():
    ties = sc.asarray(np.array([1, 0, 1, 0, 1] * 20))
    assert sc.argsort(ties).get().tolist() == np.argsort(ties.get(), kind="stable").tolist()
    assert ties.argsort().get().tolist() == np.argsort(ties.get(), kind="stable").tolist()
    with pytest.raises(ValueError, match="stable"):
        sc.argsort(ties, kind="quicksort")


# --- the solver on device arrays ---

def _cross_problem(seed=0, m=6, n=14):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((6 * n, n))
    Xt = X + 0.2 * rng.standard_normal(X.shape)  # the partly quantized model's input
    return rng.standard_normal((m, n)), X.T @ X, Xt.T @ X, Xt.T @ Xt


@pytest.mark.parametrize("cfg", [SolverConfig(bits=3), SolverConfig(bits=3, order="greedy"),
                                 SolverConfig(bits=3, lambda_solves=3)], ids=["cyclic", "greedy", "solves3"])
def test_cross_statistics_objective_is_a_host_float(dev, cfg):
    """Sequential capture's solve (H, G0): the objective and history are floats on the host, not 0-d device arrays
    (the input-drift constant was a device array, so every history entry came back as one)."""
    W, G0, H, Gt = _cross_problem()
    cfg = dataclasses.replace(cfg, dtype="float64")
    got = comq_quantize(dev.asarray(W), dev.asarray(Gt), cfg, H=dev.asarray(H), G0=dev.asarray(G0))
    want = comq_quantize(W, Gt, cfg, H=H, G0=G0)
    assert all(type(v) is float or isinstance(v, np.floating) for v in [got.objective] + got.history)
    if dev is sc:
        assert got.objective == want.objective and got.history == want.history
        np.testing.assert_array_equal(got.codes, want.codes)
    else:
        np.testing.assert_allclose(got.objective, want.objective, rtol=1e-6)


class RowStats:
    """Duck-typed capture.gram.LayerStats from explicit rows: ``X[k]`` (N, n) per group and, for cross statistics,
    ``Xt[k]`` (the partly quantized model's rows); fold f holds the rows f, f + 2, ..."""

    def __init__(self, X, Xt=None):
        self.X, self.Xt, self.cross, self.folded = X, Xt, Xt is not None, True
        self.rows = X[0].shape[0]

    def _rows(self, k, fold):
        sl = slice(None) if fold is None else slice(fold, None, 2)
        X = self.X[k][sl]
        return X, (self.Xt[k][sl] if self.cross else X)

    def stats(self, k, centered=False, fold=None):
        X, Xt = self._rows(k, fold)
        if centered:
            X, Xt = X - X.mean(axis=0), Xt - Xt.mean(axis=0)
        return (X.T @ X, None, None) if not self.cross else (X.T @ X, Xt.T @ X, Xt.T @ Xt)

    def means(self, k, fold=None):
        X, Xt = self._rows(k, fold)
        return X.mean(axis=0), Xt.mean(axis=0)


def _layer_case(name):
    """(weights per group, statistics, policy) of a layer case."""
    rng = np.random.default_rng(len(name))
    groups, m, n, rows = (3, 4, 9, 60) if name == "groups" else (1, 12, 16, 48 if name == "damped" else 120)
    X = [rng.standard_normal((rows, n)) * rng.uniform(0.3, 2.0, n) + rng.uniform(0, 1, n) for _ in range(groups)]
    Xt = [x + 0.1 * rng.standard_normal(x.shape) for x in X] if name == "cross" else None
    mats = [rng.standard_normal((m, n)).astype(np.float32) for _ in range(groups)]
    solver = {"plain": SolverConfig(), "damped": SolverConfig(bits=3), "cross": SolverConfig(),
              "groups": SolverConfig(bits=3), "block": SolverConfig(granularity="block", block_size=4),
              "greedy": SolverConfig(bits=3, order="greedy", lambda_solves=3, dtype="float64")}[name]
    policy = LayerPolicy(solver=solver, free_bias=name in ("plain", "damped", "cross"),
                         damping="auto" if name == "damped" else 0.0, correct=name == "cross", strength=0.5)
    return mats, [RowStats(X, Xt)], policy


@pytest.mark.parametrize("name", ["plain", "damped", "cross", "groups", "block", "greedy"])
def test_layer_solve_on_device_matches_numpy(dev, name):
    """quantize_layer (free bias, held-out damping, cross statistics, batched groups, block grids, greedy order
    with several lambda solves) with xp = the device module: the NumPy result exactly on the double; on CuPy, whose
    sums run in another order, in float64 and within a tolerance."""
    mats, stats, policy = _layer_case(name)
    if dev is not sc:
        policy = dataclasses.replace(policy, solver=dataclasses.replace(policy.solver, dtype="float64"))
    want = quantize_layer(mats, stats, policy, mats[0].shape[1], np)
    before = sc.ndarray.created
    got = quantize_layer(mats, stats, policy, mats[0].shape[1], dev)
    assert dev is not sc or sc.ndarray.created > before  # the solve went through the double
    assert (got.damping > 0) == (name == "damped") and got.corrected == (name == "cross")
    assert (got.bias_delta is not None) == policy.free_bias
    exact = dev is sc
    for field in ("codes", "scales", "zero_points"):
        for g, w in zip(getattr(got, field), getattr(want, field)):
            assert type(g) is np.ndarray
            if exact or field == "zero_points":
                np.testing.assert_array_equal(g, w)
            elif field == "codes":  # (a near-tie may go the other way, and move its row's scale a little)
                assert (g == w).mean() >= 0.99
            else:
                np.testing.assert_allclose(g, w, rtol=1e-2)
    rest = [f.name for f in dataclasses.fields(got)][4:]  # the errors, fallbacks, damping, rows, solver used
    if exact:
        if policy.free_bias:
            np.testing.assert_array_equal(got.bias_delta, want.bias_delta)
        assert [getattr(got, k) for k in rest] == [getattr(want, k) for k in rest]
    else:
        assert got.comq_error == pytest.approx(want.comq_error, rel=1e-3)
        assert got.rtn_error == pytest.approx(want.rtn_error, rel=1e-9)


# --- capture: the Grams formed in the device module ---

@pytest.mark.parametrize("model,cross,folds", [("fmnist_vit.onnx", False, False), ("fmnist_vit.onnx", True, True),
                                               ("fmnist_cnn.onnx", True, False), ("fmnist_cnn.onnx", False, True)])
def test_capture_forms_the_grams_on_the_device(dev, model, cross, folds, monkeypatch):
    """capture(..., xp=device): every Gram update runs on device arrays (a transformer's row inputs are moved
    there, a convolution's im2col chunks are built on the host and moved), and the statistics come back to the host
    as numpy arrays: the NumPy capture's bytes on the double, within float tolerance on CuPy. (The twin is the
    model itself: cross statistics only need a second stream.)"""
    from onnxcomq.capture import gram
    from onnxcomq.capture.passes import capture
    from onnxcomq.graph.layers import find_layers

    m = onnx.load(os.path.join(MODELS, model))
    specs = {spec: L.groups for L in find_layers(m)[0] for _, spec in L.consumers}
    x = calibration(model.split(".")[0])["input"][:6]
    batches = [{"input": x[:4]}, {"input": x[4:]}]
    fold_below = {s: 1e12 for s in specs} if folds else None
    seen = []
    real = gram.GramStats._fold

    def spy(self, Xt):
        seen.append(array_module(self.G))
        return real(self, Xt)

    monkeypatch.setattr(gram.GramStats, "_fold", spy)
    want, n1 = capture(m, m if cross else None, specs, batches, fold_below=fold_below, total_samples=6)
    assert set(seen) == {np}
    seen.clear()
    got, n2 = capture(m, m if cross else None, specs, batches, fold_below=fold_below, total_samples=6, xp=dev)
    assert n1 == n2 == 6 and seen and set(seen) == {dev}
    for spec, st in want.items():
        assert len(got[spec].parts) == len(st.parts) == (2 if folds else 1)
        for pa, pb in zip(st.parts, got[spec].parts):
            assert pa.x.rows == pb.x.rows
            for a, b in [(pa.x.G, pb.x.G), (pa.x.sums, pb.x.sums)] + ([(pa.H, pb.H), (pa.Gt, pb.Gt)] if cross else []):
                assert type(b) is np.ndarray and b.dtype == np.float64
                if dev is sc:
                    np.testing.assert_array_equal(b, a)
                else:
                    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * float(np.abs(a).max()))


def test_padded_positions_leave_a_device_gram_too(dev):
    """The attention mask (host) selects the rows of a device tensor: the NumPy statistics."""
    from onnxcomq.capture.gram import GramStats
    from onnxcomq.graph.layers import XSpec

    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 7, 5)).astype(np.float32)
    mask = (rng.random((3, 7)) > 0.3).astype(np.int64)
    want, got = GramStats(XSpec("x", "rows", 5), 1), GramStats(XSpec("x", "rows", 5), 1, xp=dev)
    want.add(x, mask)
    got.add(dev.asarray(x), mask)
    assert got.rows == want.rows == int(mask.sum())
    np.testing.assert_allclose(to_numpy(got.G), want.G, rtol=0 if dev is sc else 1e-5)


def _cuda_provider() -> bool:
    import onnxruntime as ort
    return gpu_available() and "CUDAExecutionProvider" in ort.get_available_providers()


def test_capture_without_a_cuda_provider_runs_on_the_cpu_provider():
    from onnxcomq.capture.session import device_providers
    assert device_providers(np) is None and device_providers(sc) is None  # (the double has no CUDA)


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_provider(), reason="no CUDA device or no onnxruntime-gpu: GPU tests skipped")
def test_cuda_provider_outputs_stay_on_the_device():
    """With onnxruntime-gpu, capture's outputs are bound to device memory and read as CuPy arrays in place."""
    import cupy

    from onnxcomq.capture.passes import stage_model
    from onnxcomq.capture.session import device_providers, make_session, run_model, run_on
    from onnxcomq.graph.layers import find_layers

    m = onnx.load(os.path.join(MODELS, "fmnist_vit.onnx"))
    tensors = sorted({spec.tensor for L in find_layers(m)[0] for _, spec in L.consumers} - {"input"})
    sess = make_session(stage_model(m, tensors), device_providers(cupy), mem_pattern=False)
    assert sess.get_providers()[0] == "CUDAExecutionProvider"
    feed = {"input": calibration("fmnist_vit")["input"][:4]}
    got = run_on(sess, tensors, feed, 0, cupy)
    want = run_model(m, tensors, [feed])[0]
    for g, w in zip(got, want):
        assert isinstance(g, cupy.ndarray)
        np.testing.assert_allclose(cupy.asnumpy(g), w, rtol=1e-3, atol=1e-3 * float(np.abs(w).max()))


# --- whole runs ---

# default W4 (cyclic, lambda search), official (greedy), sequential (cross statistics), block grids (QDQ),
# W3 sym with two lambda solves, W8A8 on the Keras CNN: the golden cases whose runs take about 1 s each
RUNS = ["cnn_w4_channel", "cnn_official", "cnn_sequential", "vit_w4_block_qdq", "vit_w3_sym", "keras_cnn_w8a8_ort"]


@pytest.mark.parametrize("name", RUNS)
def test_run_on_the_double_writes_the_numpy_bytes(name, monkeypatch):
    """onnxcomq.run with the pipeline's array module forced to the double: byte for byte the model that NumPy
    writes in the same process (test_golden pins NumPy's output per machine)."""
    import onnxcomq.pipeline

    want = output_sha(name)
    monkeypatch.setattr(onnxcomq.pipeline, "get_xp", lambda device="auto": sc)
    before = sc.ndarray.created
    assert output_sha(name) == want
    assert sc.ndarray.created > before


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="no CUDA device: GPU tests skipped")
def test_run_on_cupy_close_to_numpy(monkeypatch):
    """The default W4 recipe on CuPy: float32 GEMMs sum in another order than NumPy's, so a few codes may differ."""
    import cupy
    from builders import recipe

    import onnxcomq.pipeline
    from onnxcomq import run

    def codes(xp):
        monkeypatch.setattr(onnxcomq.pipeline, "get_xp", lambda device="auto": xp)
        out, rep = run(os.path.join(MODELS, "fmnist_cnn.onnx"), calibration("fmnist_cnn"), recipe(batch_size=16))
        ints = [numpy_helper.to_array(t) for t in out.graph.initializer
                if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4, onnx.TensorProto.INT8,
                                   onnx.TensorProto.UINT8)]
        return np.concatenate([a.astype(np.int32).reshape(-1) for a in ints])

    want, got = codes(np), codes(cupy)
    assert got.shape == want.shape and (got == want).mean() >= 0.98


# --- the benchmark ---

def test_gpu_benchmark_runs_on_the_cpu(capsys):
    spec = importlib.util.spec_from_file_location("bench_gpu", os.path.join(ROOT, "tools", "bench", "gpu.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--device", "cpu", "--quick"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 7B")]
    assert [r.split("|")[1].strip() for r in rows] == ["7B attention (256 x 256)", "7B MLP up (688 x 256)"]
    assert all(float(r.split("|")[5].strip().rstrip("x")) > 0 for r in rows)
