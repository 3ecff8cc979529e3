"""Byte-identical outputs across refactors: a fixed matrix of configurations on the shipped models, whose output
models' sha256 were recorded on main before the redesign into stage subpackages (issue 15). A change that alters any
output byte fails here; a change meant to alter outputs updates the hashes in the same commit and says why.

To re-record (only for an intended output change): ``python tests/test_golden.py``.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest

MODELS = os.path.join(os.path.dirname(__file__), "..", "models")

# name -> (model, options by their flat names: tests/builders.py recipe): W8/W4/W3, channel/tensor/block, qdq/matmulnbits, official, sequential,
# avg-bits, W8A8 for ort and tensorrt, on the PyTorch CNN and ViT, the Paddle CNN and the Keras (tf2onnx) models
CASES = {
    "cnn_w4_channel": ("fmnist_cnn", {}),
    "cnn_w8_channel": ("fmnist_cnn", {"bits": 8}),
    "cnn_w3_channel": ("fmnist_cnn", {"bits": 3}),
    "vit_w8_tensor": ("fmnist_vit", {"bits": 8, "granularity": "tensor"}),
    "cnn_w4_rtn": ("fmnist_cnn", {"method": "rtn"}),
    "cnn_official": ("fmnist_cnn", {"official": True}),
    "cnn_sequential": ("fmnist_cnn", {"sequential": True, "stages": 3}),
    "cnn_w8a8_ort": ("fmnist_cnn", {"bits": 8, "act_bits": 8}),
    "cnn_w8a8_tensorrt": ("fmnist_cnn", {"bits": 8, "act_bits": 8, "target": "tensorrt"}),
    "cnn_w4_opset17": ("fmnist_cnn", {"max_opset": 17, "damping": "auto"}),
    "vit_w4_block_qdq": ("fmnist_vit", {"granularity": "block", "block_size": 32}),
    "vit_w4_block_nbits": ("fmnist_vit", {"granularity": "block", "block_size": 32,
                                          "weight_format": "matmulnbits"}),
    "vit_avg_bits": ("fmnist_vit", {"avg_bits": 4.5, "keep_8bit": ("first",)}),
    "vit_w3_sym": ("fmnist_vit", {"bits": 3, "scheme": "sym", "lambda_solves": 2}),
    "paddle_cnn_w4": ("fmnist_paddle_cnn", {}),
    "keras_vit_w4": ("fmnist_keras_vit", {}),
    "keras_cnn_w8a8_ort": ("fmnist_keras_cnn", {"bits": 8, "act_bits": 8}),
}

# sha256 of the output models, recorded on main at f59d09e (before the redesign)
EXPECTED = {
    "cnn_official": "7baa8c337c3c6d3c139d7a26acada5742c83a8bba84e9e1fa9f672255b1ea3fa",
    "cnn_sequential": "2bbc8d39c686d5f4c92664e3dbced2af7f891c6d87a235c2812c4a0b1bdd1c09",
    "cnn_w3_channel": "b5bf3749b30ede8cf9dfda6467aa87fb111b535033bc755984ee5e192e38aaba",
    "cnn_w4_channel": "b99a68240f2dcb660705aeddaf3dd380d2c35ec32f345882043291ce6a3a75a1",
    "cnn_w4_opset17": "871977eb273dc69798328d626780aebebc6ca963f62abc32449caa039005bb8b",
    "cnn_w4_rtn": "63b3bedb1d6b1e4d55222cdff79e6e0449c2f1ed06aa079d25df4b0045e0f827",
    "cnn_w8_channel": "9bc23660c6dd33910775eccf2373452dc30eb01cba38dfb13384f430da82f863",
    "cnn_w8a8_ort": "4776a7bd97cb53200fd9d75e5f3c5cb4e6a1fedcb464af76305f6bc999167b9d",
    "cnn_w8a8_tensorrt": "df4bdb2b771c1d3b14c17378b36f19a8b4a76c336f80ded250565a7832fa1730",
    "keras_cnn_w8a8_ort": "eace74df7237bd7e17c12042d90b923d1ac3883dbb59a6a345da38ed8d4077a1",
    "keras_vit_w4": "e2674cea9b0141acc522685a90e0e67f0ace6e1368ea57de382532c89bd4f888",
    "paddle_cnn_w4": "1e31036dc383e30618701c88f1aaa94521b31275725c287d2635dd852958c974",
    "vit_avg_bits": "86e073cbfa4d60a0dbfaa70baf0708c0460f4584dce584fad7aef0a0e89f2660",
    "vit_w3_sym": "81a88dfccdd3c62034e99ec949568d430468e469b1827bb6545871efd1a01a59",
    "vit_w4_block_nbits": "0d7b98af157e4bb8c0a3a2868293c14986a698f197e1348852ff0e3ad8a5b295",
    "vit_w4_block_qdq": "2d1af6b485af6dfd788ef2f687b599e92a31b054d8a73456581d1c8b963b2a2d",
    "vit_w8_tensor": "d7291a058b5eedaca9374ce1e58e07d99a60f8c452b62975eac1a20f4ce911aa",
}


def calibration(model: str) -> dict:
    x = np.load(os.path.join(MODELS, "fmnist_calib.npz"))["input"][:48]
    if "keras" in model:  # (NHWC exports)
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    return {"input": x}


def output_sha(name: str) -> str:
    from builders import recipe

    from onnxcomq import run

    model, fields = CASES[name]
    out, _ = run(os.path.join(MODELS, model + ".onnx"), calibration(model),
                 recipe(batch_size=16, **fields))
    return hashlib.sha256(out.SerializeToString()).hexdigest()


@pytest.mark.parametrize("name", sorted(CASES))
def test_output_bytes_unchanged(name):
    assert name in EXPECTED, f"{name}: no recorded hash"
    assert output_sha(name) == EXPECTED[name]


if __name__ == "__main__":
    for n in sorted(CASES):
        print(f'    "{n}": "{output_sha(n)}",', flush=True)
