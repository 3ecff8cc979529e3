"""Memory: no reference cycles in the solver, capture's chunks, the batch size chosen from a memory budget."""

from __future__ import annotations

import gc
import subprocess
import sys

import numpy as np
import onnx
import pytest
from builders import recipe
from onnx import TensorProto, helper, numpy_helper

from onnxcomq.capture import gram, memory
from onnxcomq.capture.gram import GramStats
from onnxcomq.capture.memory import batch_for_budget, parse_bytes
from onnxcomq.capture.rows import im2col, im2col_t
from onnxcomq.errors import UserError
from onnxcomq.graph.layers import XSpec
from onnxcomq.pipeline import run
from onnxcomq.solve.blockwise import comq_quantize_block
from onnxcomq.solve.comq import SolverConfig, comq_quantize, comq_quantize_groups


def _problem(m=12, n=40, rows=300, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((rows, n)).astype(np.float32)
    return rng.standard_normal((m, n)).astype(np.float32), (X.T @ X).astype(np.float32)


@pytest.mark.parametrize("solve", [
    lambda W, G: comq_quantize(W, G, SolverConfig(bits=4)),
    lambda W, G: comq_quantize(W, G, SolverConfig(bits=4, order="greedy")),
    lambda W, G: comq_quantize(W, G, SolverConfig(bits=3, lambda_solves=4)),
    lambda W, G: comq_quantize(W, G, SolverConfig(bits=4), H=0.9 * G, G0=G),
    lambda W, G: comq_quantize_groups(W.reshape(3, 4, -1), np.stack([G] * 3), SolverConfig(bits=4)),
    lambda W, G: comq_quantize_block(W, G, SolverConfig(bits=4, granularity="block", block_size=16)),
], ids=["cyclic", "greedy", "lambda-solves", "cross", "groups", "block"])
def test_solver_leaves_no_reference_cycle(solve):
    """With the cycle collector off, a solve must free everything it allocated: a cycle (a recursive closure)
    kept each call's copies of R and Q alive until the collector ran, so memory grew with the calls."""
    W, G = _problem()
    solve(W, G)  # (warm-up: caches, lazy imports)
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        for _ in range(3):
            solve(W, G)
        unreachable = gc.collect()
    finally:
        if was:
            gc.enable()
    assert unreachable == 0


def test_repeated_solves_do_not_grow_traced_memory():
    import tracemalloc

    W, G = _problem(m=64, n=128, rows=600)
    cfg = SolverConfig(bits=4)
    was = gc.isenabled()
    gc.disable()
    tracemalloc.start()
    try:
        comq_quantize(W, G, cfg)
        base = tracemalloc.get_traced_memory()[0]
        for _ in range(5):
            comq_quantize(W, G, cfg)
        grown = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
        if was:
            gc.enable()
    assert grown < W.nbytes  # (each leaked solve held several m x n arrays)


@pytest.mark.parametrize("shape,kernel,strides,pads,dil,group", [
    ((2, 6, 9, 8), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),
    ((3, 6, 9, 8), (3, 2), (2, 1), (1, 0, 2, 1), (1, 2), 3),
    ((2, 6, 11, 7), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 6),
    ((2, 4, 7), (1,), (1,), (0, 0), (1,), 2),
    ((2, 4, 7, 5), (1, 1), (2, 2), (0, 0, 0, 0), (1, 1), 1),
    ((3, 4, 7, 5), (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 4),
])
def test_transposed_chunks_and_bands_give_the_same_statistics(shape, kernel, strides, pads, dil, group,
                                                              monkeypatch):
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    c = shape[1]
    spec = XSpec("x", "conv", fan_in=c // group * int(np.prod(kernel)), kernel=kernel, strides=strides, pads=pads,
                 dilations=dil, group=group)
    X = im2col(x, spec)  # (rows, groups, n): the reference layout
    assert np.array_equal(im2col_t(x, spec), X.transpose(1, 2, 0))
    X64 = X.astype(np.float64).transpose(1, 0, 2)
    G = np.matmul(X64.transpose(0, 2, 1), X64)
    for chunk_bytes, chunk_rows in ((1 << 30, 8192), (64, 3), (1, 1)):  # whole, bands of output rows, single rows
        monkeypatch.setattr(gram, "CHUNK_BYTES", chunk_bytes)
        monkeypatch.setattr(gram, "CHUNK_ROWS", chunk_rows)
        st = GramStats(spec, group)
        st.add(x)
        assert st.rows == X.shape[0]
        np.testing.assert_allclose(st.G, G, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(st.sums, X64.sum(axis=1), rtol=1e-5, atol=1e-4)


def test_batch_for_budget():
    mb = 1 << 20
    big = batch_for_budget(10 * mb, 64 << 30, 200 * mb, 32)
    small = batch_for_budget(10 * mb, 1 << 30, 200 * mb, 32)
    assert big == 32  # room to spare: the requested batch
    assert 1 <= small < big
    assert batch_for_budget(10 * mb, 300 * mb, 200 * mb, 32) == 1  # never below one sample
    assert batch_for_budget(10 * mb, 1 << 30, 200 * mb, 4) <= 4


@pytest.mark.parametrize("text,value", [("4G", 4 << 30), ("512M", 512 << 20), ("1.5g", 3 << 29),
                                        ("2GiB", 2 << 30), ("3000000", 3000000), (5 << 20, 5 << 20)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["abc", "-1G", "", "4X", "0", "1k", "G"])
def test_parse_bytes_refuses(text):
    with pytest.raises(UserError):
        parse_bytes(text)


def _conv_model(batch, seed=0):
    """x [batch, 4, 16, 16] -> Conv 3x3 (8) -> Relu -> Conv 1x1 (4)."""
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 4, 3, 3)).astype(np.float32) * 0.3, "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((4, 8, 1, 1)).astype(np.float32) * 0.3, "w2")
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1, 1, 1, 1], name="c1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="c2")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4, 16, 16])], [w1, w2])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_small_budget_gives_a_smaller_batch():
    model = _conv_model("N")
    calib = {"x": np.random.default_rng(2).standard_normal((64, 4, 16, 16)).astype(np.float32)}
    _, roomy = run(model, calib, recipe(bits=8, batch_size=32, max_memory="64G"))
    assert roomy.config["batch_size"] == 32
    # a budget just above what the process holds already: room for a few samples of activations only
    per = 2 * 4 * 16 * 16 * 4 + 8 * 16 * 16 * 4  # x (twice: it is also fed) and r, bytes a sample (about)
    tight = memory.current_rss() + 4 * gram.CHUNK_BYTES + 40 * 8 * 16 * 16 * 4 + int(6 * memory.CAPTURE_OVERHEAD * per)
    _, small = run(model, calib, recipe(bits=8, batch_size=32, max_memory=tight))
    assert 1 <= small.config["batch_size"] < 32
    assert small.samples == roomy.samples == 64
    assert "lowered from 32" in small.config["batch_choice"]


def test_a_budget_that_even_one_sample_exceeds_says_so(caplog):
    """A budget below what the process holds already: batch 1, and a warning that names the statistics held and
    --max-memory (it named only the activations before, which were not the reason on a 3-D conv net)."""
    model = _conv_model("N")
    calib = {"x": np.random.default_rng(2).standard_normal((8, 4, 16, 16)).astype(np.float32)}
    with caplog.at_level("WARNING", logger="onnxcomq"):
        _, rep = run(model, calib, recipe(bits=8, batch_size=32, max_memory=memory.current_rss() // 2))
    assert rep.config["batch_size"] == 1
    said = [r.getMessage() for r in caplog.records if "calibration batch" in r.getMessage()]
    assert said and "layer statistics held at once" in said[0] and "--max-memory" in said[0], said


def test_fixed_batch_model_keeps_its_batch():
    model = _conv_model(4)
    calib = {"x": np.random.default_rng(3).standard_normal((16, 4, 16, 16)).astype(np.float32)}
    _, rep = run(model, calib, recipe(bits=8, batch_size=32, max_memory="2M"))
    assert rep.config["batch_size"] == 4
    assert rep.samples == 16


@pytest.mark.parametrize("value", ["abc", "-5G", "0", "12X", "1k"])
def test_cli_max_memory_bad_value_is_one_line(tmp_path, value):
    model = tmp_path / "m.onnx"
    onnx.save(_conv_model("N"), str(model))
    np.savez(tmp_path / "c.npz", x=np.zeros((2, 4, 16, 16), np.float32))
    out = tmp_path / "q.onnx"
    p = subprocess.run([sys.executable, "-m", "onnxcomq.cli", "quantize", str(model), "-o", str(out), "--calib",
                        str(tmp_path / "c.npz"), "--max-memory", value, "--quiet"], capture_output=True, text=True)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxcomq: error:") and "memory" in lines[0]
    assert not out.exists()
