"""Group passes that start from the tensors earlier passes stored (capture/carry.py): which tensors cross a group
boundary, how long they are kept, and that a carried pass gives the statistics of a pass over the whole prefix."""

from __future__ import annotations

import glob
import os
import tempfile

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomq.capture.carry import Carry, plan
from onnxcomq.capture.memory import layer_specs
from onnxcomq.capture.passes import capture, stage_model
from onnxcomq.graph.layers import find_layers

D = 6


def _model(seed=0) -> onnx.ModelProto:
    """x -> mm0 -> relu=b -> mm1 -> c; d = c + b; f = d * cast(m); mm2(f) = e; g = e + b; mm3(g).
    m is a graph input through a cheap Cast (recomputed, never stored); b is read by the groups of mm1, mm2
    (through d) and mm3 (through g)."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((D, D)).astype(np.float32), f"W{i}") for i in range(4)]
    nodes = [
        helper.make_node("MatMul", ["x", "W0"], ["a"], name="mm0"),
        helper.make_node("Relu", ["a"], ["b"], name="relu"),
        helper.make_node("MatMul", ["b", "W1"], ["c"], name="mm1"),
        helper.make_node("Add", ["c", "b"], ["d"], name="add_d"),
        helper.make_node("Cast", ["m"], ["mc"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Mul", ["d", "mc"], ["f"], name="mul"),
        helper.make_node("MatMul", ["f", "W2"], ["e"], name="mm2"),
        helper.make_node("Add", ["e", "b"], ["g"], name="add_g"),
        helper.make_node("MatMul", ["g", "W3"], ["y"], name="mm3"),
    ]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", D]),
                                               helper.make_tensor_value_info("m", TensorProto.INT64, ["N", 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", D])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _feeds(n_batches=3, seed=1):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((4, D)).astype(np.float32), "m": rng.integers(1, 3, (4, 1))}
            for _ in range(n_batches)]


def test_plan_stores_the_heavy_tensors_each_later_group_reads_and_recomputes_the_cheap_ones():
    inputs, outputs = plan(_model(), [["x"], ["b"], ["f"], ["g"]])
    assert inputs == [[], [], ["b"], ["b", "f"]]  # (mc, from the graph input m through a Cast: never stored)
    assert outputs == [[], ["b"], ["f"], []]


def test_carried_group_passes_give_the_whole_prefix_statistics_and_clean_up(monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model = _model()
    layers = find_layers(model)[0]
    assert [L.node for L in layers] == ["mm0", "mm1", "mm2", "mm3"]
    groups = [[L] for L in layers]
    carry = Carry.for_groups(model, [layer_specs(g) for g in groups])
    feeds = _feeds()
    left = []
    for g, group in enumerate(groups):
        specs = layer_specs(group)
        full, n_full = capture(model, None, specs, feeds)
        carried, n = capture(model, None, specs, feeds, carry=carry, group=g)
        assert n == n_full == 12
        for s in specs:
            ref = full[s].part().x
            np.testing.assert_allclose(carried[s].part().x.G, ref.G, rtol=1e-6, atol=1e-6 * np.abs(ref.G).max())
        left.append(len(glob.glob(str(tmp_path / "onnxcomq-carry-*" / "*.npz"))))
    # b (stored by group 1's 3 batches) is kept until group 3 has read it; f (group 2) likewise; then nothing
    assert left == [0, 3, 6, 0]
    carry.close()
    assert not glob.glob(str(tmp_path / "onnxcomq-carry-*"))


def _scalar_model(seed=0) -> onnx.ModelProto:
    """x -> mm0 = a; n = Gather(Shape(a), 0), a 0-d tensor (the batch size, as TorchScript exports of attention
    compute it), which two Reshapes read: b = Reshape(relu(a), [n, D]) -> mm1 = c; Reshape(c, [n, D]) -> mm2."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((D, D)).astype(np.float32), f"W{i}") for i in range(3)]
    inits += [numpy_helper.from_array(np.array(0, np.int64), "i0"), numpy_helper.from_array(np.array([0]), "ax0"),
              numpy_helper.from_array(np.array([D]), "dvec")]
    nodes = [helper.make_node("MatMul", ["x", "W0"], ["a"], name="mm0"),
             helper.make_node("Shape", ["a"], ["sh"], name="shape"),
             helper.make_node("Gather", ["sh", "i0"], ["n"], name="gather")]
    for k, (src, dst) in enumerate([("ar", "b"), ("c", "r")]):
        nodes += [helper.make_node("Unsqueeze", ["n", "ax0"], [f"nu{k}"], name=f"unsqueeze{k}"),
                  helper.make_node("Concat", [f"nu{k}", "dvec"], [f"shp{k}"], name=f"concat{k}", axis=0),
                  helper.make_node("Reshape", [src, f"shp{k}"], [dst], name=f"reshape{k}")]
    nodes.insert(3, helper.make_node("Relu", ["a"], ["ar"], name="relu"))
    nodes.insert(7, helper.make_node("MatMul", ["b", "W1"], ["c"], name="mm1"))
    nodes.append(helper.make_node("MatMul", ["r", "W2"], ["y"], name="mm2"))
    graph = helper.make_graph(nodes, "scalar", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", D])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", D])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_a_stored_0d_tensor_stays_0d():
    """A 0-d tensor that crosses a group boundary (torchvision's ViT and Swin from the TorchScript exporter) is
    stored and declared 0-d: stored as 1-d, the Concat after its Unsqueeze got a rank-2 input and onnxruntime
    refused the group's model."""
    model = _scalar_model()
    onnx.checker.check_model(model, full_check=True)
    inputs, outputs = plan(model, [["x"], ["b"], ["r"]])
    assert inputs[2] == ["b", "n"] and outputs[1] == ["b", "n"]
    layers = find_layers(model)[0]
    groups = [layer_specs([L]) for L in layers]
    carry = Carry.for_groups(model, groups)
    feeds = [{"x": f["x"]} for f in _feeds()]
    try:
        for g, specs in enumerate(groups):
            full, _ = capture(model, None, specs, feeds)
            carried, _ = capture(model, None, specs, feeds, carry=carry, group=g)
            for s in specs:
                np.testing.assert_allclose(carried[s].part().x.G, full[s].part().x.G, rtol=1e-6, atol=1e-6)
        assert carry.types["n"][1] == 0
    finally:
        carry.close()


def test_a_carried_group_session_holds_only_its_own_weights():
    model = _model()
    layers = find_layers(model)[0]
    carry = Carry.for_groups(model, [layer_specs([L]) for L in layers])
    for g in range(3):  # the earlier groups' passes (they store what group 3 reads, and its types)
        capture(model, None, layer_specs([layers[g]]), _feeds(1), carry=carry, group=g)
    m = stage_model(model, ["g"], cut=carry.value_infos(3))  # group 3's session: mm3 reads g = mm2(f) + b
    assert [t.name for t in m.graph.initializer] == ["W2"]
    assert [n.name for n in m.graph.node] == ["mm2", "add_g"]
    whole = stage_model(model, ["g"])  # (the session of a pass from the model's inputs)
    assert sorted(t.name for t in whole.graph.initializer) == ["W0", "W1", "W2"]
    carry.close()


@pytest.mark.parametrize("name", ["fmnist_cnn.onnx", "fmnist_vit.onnx"])
def test_carry_plans_one_boundary_per_cut_on_the_shipped_models(name):
    """A chain (the CNN) hands one tensor across each boundary; a transformer its residual stream and the next
    block's normalized input. Nothing is read that was not stored by an earlier group."""
    model = onnx.load(os.path.join("models", name))
    layers = find_layers(model)[0]
    third = len(layers) // 3
    carry = Carry.for_groups(model, [layer_specs(g) for g in (layers[:third], layers[third:2 * third],
                                                              layers[2 * third:])])
    assert carry.inputs[0] == [] and carry.outputs[-1] == []
    assert 1 <= len(carry.inputs[1]) <= 2 and 1 <= len(carry.inputs[2]) <= 2
    for g in (1, 2):
        assert set(carry.inputs[g]) <= set(carry.outputs[0]) | set(carry.outputs[1])


def test_twin_plan_runs_the_previous_and_the_current_group_from_what_earlier_twin_passes_stored():
    """Twin pass g (layers of the groups before g quantized) recomputes the nodes of group g - 1's float pass, whose
    values changed when g - 1 was quantized; tensors of older groups are final and read from the store."""
    inputs, outputs = plan(_model(), [["x"], ["b"], ["f"], ["g"]], twin=True)
    assert inputs == [[], [], [], ["b"]]
    assert outputs == [[], [], ["b"], []]


def _no_carry(monkeypatch):
    from onnxcomq import pipeline
    monkeypatch.setattr(pipeline.Carry, "for_groups", classmethod(lambda cls, *a, **k: None))


@pytest.mark.parametrize("name,flat,exact", [
    ("fmnist_cnn.onnx", dict(bits=4, sequential=True, stages=4), True),
    ("fmnist_vit.onnx", dict(bits=4, sequential=True, stages=5), False),
    ("fmnist_vit.onnx", dict(bits=4, max_memory="1M"), False),
], ids=["cnn-sequential", "vit-sequential", "vit-groups"])
def test_runs_with_carried_passes_write_the_model_of_full_passes(monkeypatch, tmp_path, name, flat, exact):
    """The same codes as passes that run the whole prefix (byte for byte on the CNN; on the ViT onnxruntime fuses
    the cut-down graphs differently, float32 rounding); no stored tensor is left behind."""
    from builders import recipe

    from onnxcomq.pipeline import run
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    stored = set()  # (twin, group) of every pass that stored tensors
    store = Carry.store
    monkeypatch.setattr(Carry, "store", lambda self, g, b, v: (stored.add((self.twin, g)) if self.outputs[g] else None,
                                                              store(self, g, b, v)))
    path, calib = os.path.join("models", name), os.path.join("models", "fmnist_calib.npz")
    carried, rep = run(path, calib, recipe(batch_size=4, max_samples=16, **flat))
    assert rep.config["groups"] > 1
    assert {t for t, _ in stored} == ({False, True} if "sequential" in flat else {False})
    assert not os.listdir(tmp_path)
    with monkeypatch.context() as m:
        _no_carry(m)
        full, _ = run(path, calib, recipe(batch_size=4, max_samples=16, **flat))
    ta = {t.name: numpy_helper.to_array(t) for t in carried.graph.initializer}
    tb = {t.name: numpy_helper.to_array(t) for t in full.graph.initializer}
    assert ta.keys() == tb.keys()
    codes = 0
    for k, v in ta.items():
        if np.issubdtype(v.dtype, np.floating):
            np.testing.assert_allclose(v, tb[k], rtol=1e-4, atol=1e-5 * float(np.abs(tb[k]).max(initial=0)), err_msg=k)
        else:
            codes += int((v.astype(np.int64) != tb[k].astype(np.int64)).sum())
    print(f"{codes} codes differ")
    assert codes == 0 if exact else codes <= 0.001 * sum(v.size for v in ta.values())
    if exact:
        assert carried.SerializeToString() == full.SerializeToString()


def test_a_full_disk_is_one_line_and_leaves_nothing_behind(monkeypatch, tmp_path):
    from builders import recipe

    from onnxcomq import UserError
    from onnxcomq.pipeline import run
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    savez = np.savez

    def full(path, **arrays):
        savez(path, **arrays)  # (a partial file is left, as a real full disk leaves one)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", full)
    with pytest.raises(UserError) as e:
        run("models/fmnist_cnn.onnx", "models/fmnist_calib.npz", recipe(bits=4, batch_size=4, max_samples=8,
                                                                       max_memory="1M"))
    msg = str(e.value)
    assert "\n" not in msg and "No space left on device" in msg and str(tmp_path) in msg and "TMPDIR" in msg
    assert not os.listdir(tmp_path)


def test_layers_that_do_not_correct_get_the_twins_gram_alone():
    """With ``cross_specs`` only those inputs get (G, H, G~); the others get G~ from the twin, equal to the G~ of
    full cross statistics, and the float model's pass does not fetch them."""
    model = _model()
    twin = _model()
    twin.graph.initializer[0].CopyFrom(numpy_helper.from_array(
        numpy_helper.to_array(twin.graph.initializer[0]) * 1.1, "W0"))  # W0 "quantized"
    layers = find_layers(model)[0]
    specs = layer_specs(layers[1:])
    full, _ = capture(model, twin, specs, _feeds())
    first = next(spec for _, spec in layers[1].consumers)
    from onnxcomq.capture import passes
    fetched = []
    session = passes.stage_session
    passes.stage_session = lambda m, tensors, *a: (fetched.append((m is model, sorted(tensors))),
                                                   session(m, tensors, *a))[1]
    try:
        part, _ = capture(model, twin, specs, _feeds(), cross_specs={first})
    finally:
        passes.stage_session = session
    assert fetched == [(True, [first.tensor]), (False, sorted(s.tensor for s in specs))]
    for spec in specs:
        ref, got = full[spec].stats(0), part[spec].stats(0)
        if spec == first:
            assert part[spec].cross
            for a, b in zip(got, ref):
                np.testing.assert_allclose(a, b, rtol=1e-6)
        else:
            assert not part[spec].cross and got[1] is None
            np.testing.assert_allclose(got[0], ref[2], rtol=1e-6)
            assert not np.allclose(got[0], ref[0], rtol=1e-3)  # (X~ is not X here)


@pytest.mark.parametrize("name", ["fmnist_cnn.onnx", "fmnist_vit.onnx"])
def test_twin_without_a_model_copy_writes_the_full_twins_model(monkeypatch, name):
    """Sequential capture without re-fitted biases reads the dequantized weights through ``passes.Twin`` (no float
    copy of the model a stage): the same bytes as with a full twin model."""
    from builders import recipe

    from onnxcomq import pipeline
    from onnxcomq.write.bias import apply as apply_bias
    from onnxcomq.write.qdq import quantized_twin
    made = []
    twin = pipeline.Twin
    monkeypatch.setattr(pipeline, "Twin", lambda m, w: (made.append(len(w)), twin(m, w))[1])
    path, calib = os.path.join("models", name), os.path.join("models", "fmnist_calib.npz")
    r = recipe(bits=4, sequential=True, stages=3, bias_correction=False, batch_size=4, max_samples=16)
    lazy, _ = pipeline.run(path, calib, r)
    assert len(made) == 2 and 0 < made[0] < made[1]  # (stages 2 and 3, with the weights quantized so far)
    monkeypatch.setattr(pipeline, "Twin", lambda m, w: quantized_twin(m, list(w.values()), apply_bias, {}))
    full, _ = pipeline.run(path, calib, r)
    assert lazy.SerializeToString() == full.SerializeToString()
