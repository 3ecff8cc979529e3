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


def _vad_path():
    return os.path.join(os.path.dirname(MEL), "silero_vad.onnx") if MEL else None


def test_silero_vad_with_every_layer_inside_an_if_is_quantized_where_calibration_takes_it():
    """openwakeword's silero_vad.onnx (silero-vad v4): two networks, 16 and 8 kHz, each the branch of an If on the
    sample rate input, LSTMs inside a nested If. Calibrated at 16 kHz: that branch is quantized (it was refused:
    "no quantizable layer found"), the 8 kHz one stays float, exactly."""
    path = _vad_path()

    def feed(n, seed, sr):
        return {"input": builders.tones(n, seed, sr, 4096, (1, 4)) / 32768, "sr": np.array(sr, np.int64),
                "h": np.zeros((2, n, 64), np.float32), "c": np.zeros((2, n, 64), np.float32)}

    q, rep = run(path, feed(16, 1, 16000), Recipe().updated({"weights": {"bits": 8}}))
    nodes = [L.node for L in rep.layers]
    assert len(nodes) > 10 and all(n.startswith("If_25/then_branch/") for n in nodes)
    assert any(L.op_type == "LSTM" and "/If_177/then_branch/" in L.node for L in rep.layers)  # (the nested If)
    assert all("no calibration batch took" in s["reason"] for s in rep.skipped)
    assert rep.quant_bytes < 0.8 * rep.float_bytes  # (measured 0.75: the 8 kHz half stays float)

    def vad(model, f):
        src = model if isinstance(model, str) else model.SerializeToString()
        return ort.InferenceSession(src, providers=["CPUExecutionProvider"]).run(None, f)[0]

    ev8 = feed(4, 2, 8000)
    np.testing.assert_array_equal(vad(q, ev8), vad(path, ev8))
    ev = feed(8, 3, 16000)
    assert np.abs(vad(q, ev) - vad(path, ev)).max() < 0.02  # (speech probabilities 0.02-0.37; measured 0.012)
