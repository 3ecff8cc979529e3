"""A layer's solve in row chunks (solve.layer.row_chunks, issue 17): the same results as the whole layer at once.

Rows are independent problems with per-channel and block grids, so solving them in chunks changes nothing: codes,
zero points, the fallback count and the settings are compared exactly. Scales and the bias change come out of float32
matrix products whose rows OpenBLAS computes with kernels that depend on the product's shape: chunks that start at
multiples of CHUNK_ALIGN rows made them bit-identical on one machine (with chunks of 50 rows they differed in their
last bits), but on an AMD EPYC (Zen 3) they differ by a few float32 ulps whatever the alignment, so they are compared
to float32 rounding (rel 2e-6; bias 1e-5 of its largest entry). The reported errors are sums over the chunks' rows in
another order: float64 rounding (rel 1e-12) where the products are bit-identical, 1e-6 otherwise."""

from __future__ import annotations

import dataclasses
import tracemalloc

import numpy as np
import pytest
import strict_cupy as sc
from test_gpu_path import RowStats

from onnxcomq.solve import layer
from onnxcomq.solve.comq import SolverConfig
from onnxcomq.solve.layer import LayerPolicy, quantize_layer, row_chunks

M, N = 3 * 96 + 40, 40  # three chunks of 96, 96 and 136 rows at the smallest chunk size (CHUNK_ALIGN 96)

CASES = {  # name -> (groups, m, n, calibration rows, solver, policy fields)
    "channel": (1, M, N, 200, SolverConfig(), dict(free_bias=True, damping="scaled")),
    "channel_sym_w3": (1, M, N, 200, SolverConfig(bits=3, scheme="sym"), {}),
    "lambda_solves": (1, M, N, 200, SolverConfig(lambda_solves=3), dict(free_bias=True)),
    "block": (1, M, N, 200, SolverConfig(granularity="block", block_size=8), dict(free_bias=True, damping="scaled")),
    "block_no_bias": (1, M, N, 200, SolverConfig(granularity="block", block_size=16, bits=3), {}),
    # (n = 128: the greedy order's step block depends on the rows, 1100 of them: fixed from the whole layer)
    "greedy": (1, 1100, 128, 400, SolverConfig(order="greedy", lambda_solves=2), dict(free_bias=True)),
    "importance": (1, M, N, 200, SolverConfig(order="importance"), dict(free_bias=True)),
    "official": (1, M, N, 200, SolverConfig.official(bits=4), {}),
    "cross": (1, M, N, 200, SolverConfig(), dict(free_bias=True, correct=True, strength=0.5, damping="scaled")),
    "cross_lambda_solves": (1, M, N, 200, SolverConfig(lambda_solves=2), dict(correct=True)),
    "auto_damping": (1, M, N, 60, SolverConfig(bits=3), dict(free_bias=True, damping="auto")),
    "tensor": (1, M, N, 200, SolverConfig(granularity="tensor"), {}),  # (not chunked: one scale for all rows)
    "groups": (5, 4, 9, 60, SolverConfig(bits=3), {}),  # batched groups (depthwise), in chunks of one group
    "groups_greedy": (3, 200, 24, 100, SolverConfig(order="greedy"), {}),  # groups one by one, each in chunks
    "rtn": (1, M, N, 200, SolverConfig(), dict(comq=False)),
}


def _case(name):
    groups, m, n, rows, solver, fields = CASES[name]
    rng = np.random.default_rng(len(name))
    X = [rng.standard_normal((rows, n)) * rng.uniform(0.3, 2.0, n) + rng.uniform(0, 1, n) for _ in range(groups)]
    Xt = [x + 0.1 * rng.standard_normal(x.shape) for x in X] if fields.get("correct") else None
    mats = [(rng.standard_normal((m, n)) * rng.uniform(0.5, 2.0, (m, 1))).astype(np.float32) for _ in range(groups)]
    return mats, [RowStats(X, Xt)], LayerPolicy(solver=solver, **fields)


def _solve(monkeypatch, name, chunk_bytes, xp=np):
    mats, stats, policy = _case(name)
    monkeypatch.setattr(layer, "CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(layer, "DEVICE_CHUNK_BYTES", chunk_bytes)
    return quantize_layer(mats, stats, policy, mats[0].shape[1], xp)


def _assert_same(got, want):
    for field in ("codes", "scales", "zero_points"):
        for g, w in zip(getattr(got, field), getattr(want, field)):
            assert g.dtype == w.dtype
            if field == "scales":  # (float32 products of another shape: a few ulps)
                np.testing.assert_allclose(g, w, rtol=2e-6, atol=0)
            else:
                np.testing.assert_array_equal(g, w)
    if want.bias_delta is None:
        assert got.bias_delta is None
    else:
        np.testing.assert_allclose(got.bias_delta, want.bias_delta, rtol=0,
                                   atol=1e-5 * float(np.abs(want.bias_delta).max()))
    for field in ("rtn_groups", "damping", "corrected", "rows", "solver"):
        assert getattr(got, field) == getattr(want, field), field
    for field in ("comq_error", "rtn_error", "input_energy"):  # (sums over the rows in another order)
        assert getattr(got, field) == pytest.approx(getattr(want, field), rel=1e-6, abs=0), field


@pytest.mark.parametrize("name", sorted(CASES))
def test_chunked_solve_equals_whole(monkeypatch, name):
    chunks = []
    real = layer.row_chunks
    monkeypatch.setattr(layer, "row_chunks", lambda m, n, b: chunks.append(real(m, n, b)) or chunks[-1])
    whole = _solve(monkeypatch, name, 1 << 40)
    assert all(len(c) == 1 for c in chunks)
    chunks.clear()
    got = _solve(monkeypatch, name, 1)
    groups, m = CASES[name][:2]
    if name not in ("tensor", "groups"):  # (the batched groups come in chunks of whole groups)
        assert chunks and all(len(c) == m // 96 for c in chunks)
    assert got.codes[0].dtype == (np.int8 if CASES[name][4].scheme == "sym" else np.uint8)
    _assert_same(got, whole)


@pytest.mark.parametrize("name", ["channel", "cross", "block"])
def test_chunked_solve_on_the_device_double(monkeypatch, name):
    """Chunks keep CuPy's host/device rules: on the strict CuPy double, the NumPy result bit for bit."""
    want = _solve(monkeypatch, name, 1)
    got = _solve(monkeypatch, name, 1, sc)
    _assert_same(got, want)
    assert got.comq_error == want.comq_error and got.rtn_error == want.rtn_error


@pytest.mark.parametrize("name", ["channel", "block", "groups", "greedy"])
def test_rtn_fallback_in_chunks(monkeypatch, name):
    """A group whose COMQ objective is not below RTN's ships RTN: rounded again chunk by chunk, the RTN results."""
    for fn in ("comq_quantize", "comq_quantize_block", "comq_quantize_groups"):
        orig = getattr(layer, fn)

        def worse(*a, _orig=orig, **k):  # COMQ's result, its objective reported as worse than any RTN's
            res = _orig(*a, **k)
            for r in res if isinstance(res, list) else [res]:
                r.objective = float("inf")
            return res
        monkeypatch.setattr(layer, fn, worse)
    mats, stats, policy = _case(name)
    rtn = dataclasses.replace(policy, comq=False)
    for chunk_bytes in (1 << 40, 1):
        got = _solve(monkeypatch, name, chunk_bytes)
        monkeypatch.setattr(layer, "CHUNK_BYTES", 1 << 40)
        want = quantize_layer(mats, stats, rtn, mats[0].shape[1], np)
        assert got.rtn_groups == len(mats)
        for g, w in zip(got.codes + got.scales + got.zero_points, want.codes + want.scales + want.zero_points):
            np.testing.assert_array_equal(g, w)
        assert got.rtn_error == pytest.approx(want.rtn_error, rel=1e-6)  # (sums in another order: see above)


@pytest.mark.parametrize("m,n,chunk,want", [
    (100, 10, 1 << 40, [(0, 100)]),
    (4000, 1024, 64 << 20, [(0, 4000)]),
    (16000, 2048, 64 << 20, [(0, 4032), (4032, 8064), (8064, 12096), (12096, 16000)]),
    (250, 10, 1, [(0, 96), (96, 250)]),  # (the last chunk is never shorter than CHUNK_ALIGN)
    (95, 10, 1, [(0, 95)]),
])
def test_row_chunks(monkeypatch, m, n, chunk, want):
    monkeypatch.setattr(layer, "CHUNK_BYTES", chunk)
    got = row_chunks(m, n)
    assert row_chunks(m, n, chunk) == got
    assert got == want
    assert all(a % layer.CHUNK_ALIGN == 0 for a, _ in got)


def test_chunked_solve_bounds_memory(monkeypatch):
    """The memory a large layer's solve allocates (tracemalloc: numpy's arrays) beyond its weight and statistics:
    the codes, scales and bias change plus one chunk's solve, however many rows; the whole layer's solve holds
    several copies of the weight."""
    rng = np.random.default_rng(0)
    m, n = 3000, 128
    W = (rng.standard_normal((m, n)) * 0.02).astype(np.float32)
    X = rng.standard_normal((4 * n, n))
    stats = [RowStats([X])]
    policy = LayerPolicy(solver=SolverConfig(), free_bias=True, damping="scaled")

    def peak(chunk_bytes):
        monkeypatch.setattr(layer, "CHUNK_BYTES", chunk_bytes)
        tracemalloc.start()
        try:
            quantize_layer([W], stats, policy, n, np)
            return tracemalloc.get_traced_memory()[1] / W.nbytes
        finally:
            tracemalloc.stop()
    whole, chunked = peak(1 << 40), peak(192 * n * 8)  # (chunks of 192 rows)
    assert chunked < 1.5 < 4 < whole


@pytest.mark.parametrize("name,fns", [("groups", ("rtn_quantize_groups", "comq_quantize_groups")),
                                      ("channel", ("rtn_quantize", "comq_quantize")),
                                      ("block", ("rtn_quantize_block", "comq_quantize_block"))])
def test_each_chunk_is_solved_once(monkeypatch, name, fns):
    """Every chunk is rounded once and solved once (RTN again only where a group falls back)."""
    calls = {fn: 0 for fn in fns}
    for fn in fns:
        def count(*a, _fn=fn, _orig=getattr(layer, fn), **k):
            calls[_fn] += 1
            return _orig(*a, **k)
        monkeypatch.setattr(layer, fn, count)
    for chunk_bytes in (1 << 40, 1):
        calls.update({fn: 0 for fn in fns})
        res = _solve(monkeypatch, name, chunk_bytes)
        assert res.rtn_groups == 0
        want = CASES[name][0] if chunk_bytes == 1 and name == "groups" else 1 if chunk_bytes > 1 else M // 96
        assert calls == {fn: want for fn in fns}


def test_float64_solve_is_chosen_for_the_whole_layer(monkeypatch):
    """The solver works in float64 where float32 products could overflow, judged on max |w| and max |G| of the whole
    layer (all its rows, all groups of a batch): a chunk without the large weights is solved in float64 too."""
    from onnxcomq.solve.comq import overflow_risk

    rng = np.random.default_rng(3)
    n = 40
    X = rng.standard_normal((200, n))
    G = X.T @ X
    gmax = float(np.abs(G.astype(np.float32)).max())
    W = rng.standard_normal((M, n)).astype(np.float32)
    W[-1] *= np.float32(np.sqrt(6e35 / (n * gmax * 256)) / np.abs(W[-1]).max())  # (the last chunk's row)
    policy = LayerPolicy(solver=SolverConfig(), damping=1.0, few_rows=1e9)  # (the damped G crosses the line)
    assert not overflow_risk(n, float(np.abs(W).max()), gmax)
    assert overflow_risk(n, float(np.abs(W).max()), 2 * gmax)
    got = {}
    for chunk_bytes in (1 << 40, 1):
        monkeypatch.setattr(layer, "CHUNK_BYTES", chunk_bytes)
        got[chunk_bytes] = quantize_layer([W], [RowStats([X])], policy, n, np)
    assert got[1].solver.dtype == "float32" and got[1].scales[0].dtype == np.float64  # (COMQ's, in float64)
    _assert_same(got[1], got[1 << 40])

    # batched groups: the large weights in one group, the large inputs in another
    Xs = [X * 1e3, X, X]
    gmax = float(np.abs((Xs[0].T @ Xs[0]).astype(np.float32)).max())
    mats = [rng.standard_normal((4, n)).astype(np.float32) for _ in range(3)]
    mats[2] *= np.float32(np.sqrt(2e36 / (n * gmax * 256)) / np.abs(mats[2]).max())
    assert overflow_risk(n, float(np.abs(mats[2]).max()), gmax)
    for k in range(3):
        assert not overflow_risk(n, float(np.abs(mats[k]).max()), float(np.abs(Xs[k].T @ Xs[k]).max()) * 1.01)
    policy = LayerPolicy(solver=SolverConfig(bits=3))
    for chunk_bytes in (1 << 40, 1):
        monkeypatch.setattr(layer, "CHUNK_BYTES", chunk_bytes)
        got[chunk_bytes] = quantize_layer(mats, [RowStats(Xs)], policy, n, np)
    assert got[1].solver.dtype == "float32" and all(s.dtype == np.float64 for s in got[1].scales)
    _assert_same(got[1], got[1 << 40])


@pytest.mark.parametrize("bits", [4, 8])
def test_tiny_weights_on_huge_inputs_are_solved_in_float64(bits):
    """The float32 rule looked at max |w|^2 max |G| only, but the scale update sums c^T G c over integer levels c:
    with weights of 0.003 (the ONNX backend's ResNet-50 skeleton, every weight a constant, batch norms folded) and
    inputs whose Gram reaches 1e34, that sum overflowed float32, the scale became 0 and the codes NaN: "internal
    error: solver codes outside the 0..15 range of their grid". The levels' bound now picks float64 there."""
    from onnxcomq.solve.comq import overflow_risk

    rng = np.random.default_rng(0)
    n, m = 256, 8
    X = rng.standard_normal((4 * n, n)) + 3.0  # (correlated inputs: c^T G c near n^2 c^2 G)
    W = np.full((m, n), 0.003, np.float32) + rng.uniform(-1e-4, 1e-4, (m, n)).astype(np.float32)
    assert overflow_risk(n, 0.003, 1e34) and not overflow_risk(n, 0.003, 1e20)
    policy = LayerPolicy(solver=SolverConfig(bits=bits), damping=0.0, few_rows=0)
    st = RowStats([X * np.sqrt(1e34 / np.abs(X.T @ X).max())])  # (max |G| 1e34, below float32's 3.4e38)
    res = quantize_layer([W], [st], policy, n, np)
    assert res.solver.dtype == "float64"
    codes = np.asarray(res.codes[0]).astype(np.int64)
    assert codes.min() >= 0 and codes.max() <= 2 ** bits - 1
    assert np.isfinite(res.scales[0]).all() and (res.scales[0] > 0).all()
    ref = quantize_layer([W.astype(np.float64)], [RowStats([X])], dataclasses.replace(
        policy, solver=SolverConfig(bits=bits, dtype="float64")), n, np)  # (the same problem at a sane scale)
    assert res.comq_error == pytest.approx(ref.comq_error, rel=1e-6)
