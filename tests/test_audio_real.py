"""A real audio front end: openwakeword's melspectrogram.onnx (from the openwakeword 0.5.1 wheel, which
tools/test.sh installs without its dependencies; skipped where it is missing). STFT as two bias-less Conv1d, power,
a bias-less mel MatMul, Log, dB scaling. Digital silence must stay at the float model's -100 dB (the default free
bias used to write biases into these layers: silence came out at about -6 dB at W8), and W8A8 must keep the
tensors that the Log magnifies float (the output correlation was 0.60)."""

from __future__ import annotations

import importlib.util
import os

import builders
import numpy as np
import onnxruntime as ort
import pytest

from onnxcomq import Recipe, run


def _model_path():
    spec = importlib.util.find_spec("openwakeword")  # (the package itself is not imported: no dependencies here)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "resources", "models", "melspectrogram.onnx")
    return path if os.path.exists(path) else None


MEL = _model_path()
pytestmark = pytest.mark.skipif(MEL is None, reason="openwakeword 0.5.1 not installed (tools/test.sh installs it)")


def audio(n: int, seed: int) -> np.ndarray:
    """One second at 16 kHz per sample: three tones under an envelope, a little noise, int16-like amplitudes."""
    return builders.tones(n, seed, 16000, 16000, (1, 4))


def infer(model, x):
    src = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(src, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


@pytest.mark.parametrize("bits, min_corr", [(8, 0.9999), (4, 0.99)])  # measured: 0.99999, 0.9924
def test_melspectrogram_weights_keep_silence_and_agree(bits, min_corr):
    q, rep = run(MEL, {"input": audio(32, 1)}, Recipe().updated({"weights": {"bits": bits}}))
    assert len(rep.layers) == 3 and not any(L.bias_corrected for L in rep.layers)
    silence = np.zeros((2, 16000), np.float32)
    np.testing.assert_array_equal(infer(q, silence), infer(MEL, silence))
    ev = audio(16, 2)
    assert np.corrcoef(infer(MEL, ev).ravel(), infer(q, ev).ravel())[0, 1] > min_corr


def test_melspectrogram_w8a8_keeps_what_the_log_magnifies_float(monkeypatch):
    from onnxcomq.write import activations

    r = Recipe().updated({"weights": {"bits": 8}, "activations": {}})
    q, rep = run(MEL, {"input": audio(32, 1)}, r)
    assert rep.config["act_float_sensitive"]
    ev = audio(16, 2)
    ref = infer(MEL, ev).ravel()
    assert np.corrcoef(ref, infer(q, ev).ravel())[0, 1] > 0.975  # measured 0.981
    monkeypatch.setattr(activations, "SENSITIVE_OPS", {})  # without the rule: 0.60
    q0, _ = run(MEL, {"input": audio(32, 1)}, r)
    assert np.corrcoef(ref, infer(q0, ev).ravel())[0, 1] < 0.9
