"""Sessions of large models load from files with external data (which onnxruntime memory-maps) instead of from
serialized bytes, and a capture stage writes only the initializers it reads, never copying them in memory
(capture/session.make_session, capture/passes.stage_session): the same model comes out as through bytes."""

from __future__ import annotations

import contextlib
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import recipe

from onnxcomq.capture import passes, session
from onnxcomq.graph.layers import find_layers
from onnxcomq.pipeline import run

MODELS = "models/"


@pytest.fixture
def files_always(monkeypatch):
    """Every session through a file; records what each one loaded: (path, external tensors, data file bytes)."""
    loaded = []
    real = ort.InferenceSession

    def spy(what, *args, **kwargs):
        if isinstance(what, str):
            m = onnx.load(what, load_external_data=False)
            ext = [t.name for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
            data = {os.path.join(os.path.dirname(what), e.value) for t in m.graph.initializer
                    for e in t.external_data if e.key == "location"}
            loaded.append((what, m, ext, sum(os.path.getsize(d) for d in data)))
        else:
            loaded.append((None, None, [], 0))
        return real(what, *args, **kwargs)

    monkeypatch.setattr(session, "SESSION_FILE_BYTES", 0)
    monkeypatch.setattr(passes, "SESSION_FILE_BYTES", 0)
    monkeypatch.setattr(ort, "InferenceSession", spy)
    return loaded


@pytest.mark.parametrize("model,flat", [
    ("fmnist_cnn.onnx", dict(bits=4, max_memory="1M")),
    ("fmnist_vit.onnx", dict(bits=4, granularity="block", block_size=16, weight_format="matmulnbits")),
    ("fmnist_cnn.onnx", dict(bits=4, sequential=True, stages=2)),
], ids=["cnn-groups", "vit-matmulnbits", "cnn-sequential"])
def test_sessions_from_files_give_the_same_model(model, flat, files_always, monkeypatch):
    args = (MODELS + model, MODELS + "fmnist_calib.npz", recipe(batch_size=2, max_samples=8, **flat))
    through_files, rep = run(*args)
    assert files_always and all(path is not None for path, *_ in files_always)
    assert any(ext for *_, ext, _ in files_always)  # (the weights were external data, not bytes in the model file)
    monkeypatch.setattr(session, "SESSION_FILE_BYTES", 1 << 62)
    monkeypatch.setattr(passes, "SESSION_FILE_BYTES", 1 << 62)
    through_bytes, _ = run(*args)
    assert through_files.SerializeToString() == through_bytes.SerializeToString()


def test_a_stage_writes_only_the_initializers_it_reads_and_removes_them(files_always):
    model = onnx.load(MODELS + "fmnist_cnn.onnx")
    layers = find_layers(model)[0]
    first = layers[0].consumers[0][1].tensor  # the first layer's input: reads no weight of the model
    last = layers[-1].consumers[0][1].tensor
    big = {t.name: t.ByteSize() for t in model.graph.initializer if t.ByteSize() >= 1024}
    with contextlib.ExitStack() as stack:
        s = passes.stage_session(model, [last], stack)
        path, m, ext, data = files_always[-1]
        folder = os.path.dirname(path)
        assert os.path.isdir(folder)
        assert [o.name for o in s.get_outputs()] == [last]
        used = {i for n in m.graph.node for i in n.input}
        assert set(ext) == {t for t in big if t in used} and set(ext) < set(big)  # not the last layer's weight
        raw = sum(len(t.raw_data) for t in model.graph.initializer if t.name in ext)
        assert raw <= data < raw + 4096 * len(ext)  # (each tensor page-aligned)
        x = np.random.default_rng(0).standard_normal((2, 1, 28, 28)).astype(np.float32)
        name = model.graph.input[0].name
        ref = session.run_model(model, [last], [{name: x}])[0][0]
        np.testing.assert_array_equal(s.run([last], {name: x})[0], ref)
        del s
    assert not os.path.exists(folder)
    if first != model.graph.input[0].name:
        with contextlib.ExitStack() as stack:
            passes.stage_session(model, [first], stack)
            assert not files_always[-1][2]


@pytest.mark.parametrize("model", ["fmnist_cnn.onnx", "fmnist_vit.onnx", "fmnist_keras_vit.onnx"])
def test_model_bytes_estimate_is_within_a_percent_of_the_serialized_size(model, monkeypatch):
    """Above SESSION_FILE_BYTES the size comes from the tensors' dims and types (ByteSize would encode a copy)."""
    from onnxcomq.graph import modelio

    m = onnx.load(MODELS + model)
    exact = m.ByteSize()
    assert modelio.model_bytes(m) == exact  # (small: exact)
    monkeypatch.setattr(modelio, "SESSION_FILE_BYTES", 0)
    assert abs(modelio.model_bytes(m) - exact) <= 0.01 * exact
