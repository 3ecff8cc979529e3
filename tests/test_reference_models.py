"""Accuracy of the shipped Fashion-MNIST reference models after quantization (the project's main job)."""

import os

import numpy as np
import pytest
from builders import recipe, run_unverified

from onnxcomq import run
from onnxcomq.evaluate import top1_accuracy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CALIB = os.path.join(ROOT, "models", "fmnist_calib.npz")
TEST = os.path.join(ROOT, "models", "fmnist_test.npz")


def model(name):
    return os.path.join(ROOT, "models", f"fmnist_{name}.onnx")


@pytest.fixture(scope="module")
def float_acc():
    return {n: top1_accuracy(model(n), TEST)[0] for n in ("cnn", "vit")}


@pytest.mark.parametrize("name,max_drop", [("cnn", 0.003), ("vit", 0.010)])
def test_w4_accuracy_drop_within_paper_claims(float_acc, name, max_drop):
    q, rep = run(model(name), CALIB, recipe(bits=4, device="cpu"))
    acc, n = top1_accuracy(q, TEST)
    assert n == 2000
    assert float_acc[name] - acc <= max_drop, (float_acc[name], acc)
    for layer in rep.layers:
        assert layer.comq_error <= layer.rtn_error
    # weight-only int4: the file shrinks several times (biases, norms and embeddings stay float)
    assert rep.quant_bytes < rep.float_bytes / 4


def test_w2_comq_beats_rtn_clearly_on_cnn(float_acc):
    accs = {}
    for method in ("comq", "rtn"):
        q, rep = run_unverified(model("cnn"), CALIB, recipe(bits=2, method=method, device="cpu"))  # (RTN: far)
        accs[method] = top1_accuracy(q, TEST)[0]
    assert accs["comq"] - accs["rtn"] >= 0.2, accs
    assert float_acc["cnn"] - accs["comq"] <= 0.15, accs


def test_layer_errors_fall_with_bits():
    errs = {}
    for bits in (8, 4, 3):
        _, rep = run(model("cnn"), CALIB, recipe(bits=bits, device="cpu", max_samples=128))
        errs[bits] = np.array([L.comq_error for L in rep.layers])
    assert (errs[8] < errs[4]).all() and (errs[4] < errs[3]).all()
