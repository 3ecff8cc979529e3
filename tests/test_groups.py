"""Block-sequential statistics: when the layers' statistics exceed the memory budget, capture and solve run one
group of layers at a time (capture/memory.fit_groups), with the same result as one pass; and the attention mask of a
decoder with a key/value cache (capture/gram.row_mask)."""

from __future__ import annotations

import builders
import numpy as np
import onnx
import pytest
from builders import recipe
from onnx import numpy_helper

from onnxcomq.capture.gram import GramStats, row_mask
from onnxcomq.capture.memory import fit_groups, layer_specs, stats_bytes
from onnxcomq.graph.layers import XSpec, find_layers
from onnxcomq.pipeline import run

MODELS = "models/"


def _layers():
    return find_layers(builders.mlp_model([16, 32, 64, 48, 24, 8], seq=5))[0]


def test_fit_groups_fits_the_budget_keeps_the_order_and_fills_each_group():
    layers = _layers()
    sizes = sorted(stats_bytes(layer_specs([L])) for L in layers)
    for budget in [1, sizes[0], sizes[len(sizes) // 2], sizes[-1], sum(sizes) - 1, 10 * sum(sizes)]:
        groups = fit_groups([layers], budget)
        assert [L for g in groups for L in g] == layers
        for g, nxt in zip(groups, groups[1:] + [None]):
            assert len(g) == 1 or stats_bytes(layer_specs(g)) <= budget
            if nxt is not None:  # greedy: the next layer did not fit
                assert stats_bytes(layer_specs(g + nxt[:1])) > budget
    assert len(fit_groups([layers], 10 * sum(sizes))) == 1
    assert len(fit_groups([layers], 1)) == len(layers)
    # stages are never merged, only split; folds double what a group holds
    assert fit_groups([layers[:2], layers[2:]], 10 * sum(sizes)) == [layers[:2], layers[2:]]
    mid = sizes[len(sizes) // 2]
    assert len(fit_groups([layers], mid, folds=True)) >= len(fit_groups([layers], mid))


def _assert_same_weights(a: onnx.ModelProto, b: onnx.ModelProto):
    """The same integer codes and zero points; float tensors (scales, biases) equal to float32 rounding."""
    ta = {t.name: numpy_helper.to_array(t) for t in a.graph.initializer}
    tb = {t.name: numpy_helper.to_array(t) for t in b.graph.initializer}
    assert ta.keys() == tb.keys()
    for k, v in ta.items():
        if np.issubdtype(v.dtype, np.floating):
            np.testing.assert_allclose(tb[k], v, rtol=1e-5, atol=1e-5 * float(np.abs(v).max(initial=0)), err_msg=k)
        else:
            np.testing.assert_array_equal(tb[k].astype(np.int64), v.astype(np.int64), err_msg=k)


@pytest.mark.parametrize("model,flat,exact", [
    ("fmnist_cnn.onnx", dict(bits=4), True),
    ("fmnist_cnn.onnx", dict(bits=4, damping="auto"), True),
    ("fmnist_vit.onnx", dict(bits=4), False),
    ("fmnist_vit.onnx", dict(bits=4, granularity="block", block_size=16, weight_format="matmulnbits"), False),
], ids=["cnn", "cnn-damping-auto", "vit", "vit-matmulnbits"])
def test_grouped_run_writes_the_same_model_as_one_pass(model, flat, exact):
    """Byte-identical on the CNN. On the ViT, onnxruntime fuses the pruned capture graph of a group differently
    (fewer outputs are asked for), so the activations, and with them the scales, differ in the last float32 bits:
    the codes are still the same."""
    path = MODELS + model
    calib = MODELS + "fmnist_calib.npz"
    whole, r1 = run(path, calib, recipe(batch_size=1, max_samples=12, **flat))
    grouped, r2 = run(path, calib, recipe(batch_size=1, max_samples=12, max_memory="1M", **flat))
    assert r1.config["groups"] == 1 and r2.config["groups"] > 1
    assert {rep.stage for rep in r2.layers} == set(range(r2.config["groups"]))
    _assert_same_weights(grouped, whole)
    if exact:
        assert grouped.SerializeToString() == whole.SerializeToString()


def test_one_shot_calibration_is_kept_for_the_later_groups():
    data = np.load(MODELS + "fmnist_calib.npz")
    name = onnx.load(MODELS + "fmnist_cnn.onnx").graph.input[0].name
    x = data[name][:8]

    def batches():
        for i in range(len(x)):
            yield {name: x[i:i + 1]}

    whole, _ = run(MODELS + "fmnist_cnn.onnx", {name: x}, recipe(bits=4, batch_size=1))
    grouped, rep = run(MODELS + "fmnist_cnn.onnx", batches(), recipe(bits=4, batch_size=1, max_memory="1M"))
    assert rep.config["groups"] > 1 and rep.samples == 8
    assert grouped.SerializeToString() == whole.SerializeToString()


def test_sequential_stages_are_split_to_fit_the_budget():
    calib = MODELS + "fmnist_calib.npz"
    _, roomy = run(MODELS + "fmnist_cnn.onnx", calib, recipe(bits=4, sequential=True, stages=2, batch_size=4, max_samples=16))
    _, tight = run(MODELS + "fmnist_cnn.onnx", calib,
                   recipe(bits=4, sequential=True, stages=2, batch_size=4, max_samples=16, max_memory="1M"))
    assert roomy.config["groups"] == 2 < tight.config["groups"]
    assert tight.verification["outputs"]


# -- the attention mask of a decoder with a key/value cache ---------------------------------------------------------

def _reference_keep(mask, batch, seq):
    """The current tokens' mask, position by position: with ``past`` cached positions first in each mask row."""
    past = mask.shape[1] - seq
    return np.array([mask[b, past + s] != 0 for b in range(batch) for s in range(seq)])


@pytest.mark.parametrize("batch,past,seq", [(2, 0, 5), (2, 4, 3), (1, 9, 1), (3, 2, 6)])
def test_row_mask_takes_the_current_tokens_from_a_mask_that_covers_the_cache(batch, past, seq):
    rng = np.random.default_rng(batch * 100 + past * 10 + seq)
    mask = (rng.random((batch, past + seq)) > 0.3).astype(np.int64)
    np.testing.assert_array_equal(row_mask(mask, batch * seq), _reference_keep(mask, batch, seq))


def test_row_mask_ignores_rows_that_are_not_token_positions():
    mask = np.ones((2, 6), np.int64)
    assert row_mask(mask, 2 * 4 * 6) is None  # e.g. (batch, heads, seq) rows: longer than the mask
    assert row_mask(mask, 7) is None
    assert row_mask(None, 12) is None


def test_padded_positions_stay_out_of_g_with_a_cache():
    rng = np.random.default_rng(5)
    batch, past, seq, d = 3, 4, 5, 6
    x = rng.standard_normal((batch, seq, d)).astype(np.float32)
    mask = np.ones((batch, past + seq), np.int64)
    mask[0, -2:] = 0  # right padding of the current tokens
    mask[1, :3] = 0  # padded cache positions: they do not decide which current rows count
    mask[2, past + 1] = 0
    x[mask[:, past:] == 0] = 1e3  # garbage at the padded positions
    st = GramStats(XSpec("x", "rows", d), 1)
    st.add(x, mask)
    keep = _reference_keep(mask, batch, seq)
    X = x.reshape(-1, d).astype(np.float64)[keep]
    assert st.rows == keep.sum() == batch * seq - 3
    np.testing.assert_allclose(st.G[0], X.T @ X, rtol=1e-5)


def test_sequential_block_granularity_fits_the_partly_quantized_inputs():
    """Sequential capture with a block grid (MatMulNBits): block layers never correct their input error (the block
    solver has no cross objective), so each solves the plain problem on G~ of the partly quantized model; its
    reported error is ||X W^T - X~ Q^T||^2 / ||X W^T||^2, which for the first stage (X~ = X) is the one-pass error."""
    path, calib = MODELS + "fmnist_vit.onnx", MODELS + "fmnist_calib.npz"
    flat = dict(bits=4, granularity="block", block_size=16, weight_format="matmulnbits", batch_size=4,
                max_samples=16)
    one, r1 = run(path, calib, recipe(**flat))
    seq, r2 = run(path, calib, recipe(sequential=True, stages=3, **flat))
    assert r2.config["groups"] == 3 and {rep.stage for rep in r2.layers} == {0, 1, 2}
    assert sum(n.op_type == "MatMulNBits" for n in seq.graph.node) == sum(
        n.op_type == "MatMulNBits" for n in one.graph.node) > 0
    first = [(a.comq_error, b.comq_error) for a, b in zip(r1.layers, r2.layers) if b.stage == 0]
    np.testing.assert_allclose(*zip(*first), rtol=1e-4)
    later = [(a.comq_error, b.comq_error) for a, b in zip(r1.layers, r2.layers) if b.stage > 0]
    assert any(abs(a - b) > 1e-3 * a for a, b in later)  # later stages saw other inputs
