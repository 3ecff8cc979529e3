"""Byte-identical outputs across refactors: a fixed matrix of configurations on the shipped models, whose output
models' sha256 are recorded. A change that alters any output byte fails here; a change meant to alter outputs updates
the hashes in the same commit and says why.

The bytes depend on the machine's floating-point arithmetic too: OpenBLAS computes a float32 product's rows with
kernels chosen by CPU and shape, and onnxruntime's kernels differ by CPU, so a scale may move by an ulp and, rarely,
a code by one level. The hashes are therefore recorded per arithmetic fingerprint (``fingerprint``: the bytes of a
few NumPy products and onnxruntime ops of the shapes the pipeline uses); on a machine whose fingerprint has no
recorded hashes the test is skipped and says so. To record (for this machine, or for an intended output change):
``python tests/test_golden.py``, and paste its output into GOLDEN.
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

# arithmetic fingerprint -> {case: sha256 of the output model}
GOLDEN = {
    "bcb2d65cd604a736": {  # AMD EPYC (Zen 3), 2 BLAS threads; numpy 2.4.6 (OpenBLAS 0.3.31), onnxruntime 1.32.0
        "cnn_official": "7baa8c337c3c6d3c139d7a26acada5742c83a8bba84e9e1fa9f672255b1ea3fa",
        "cnn_sequential": "4ed56ba8dcc263ff86d22429b6a1da6352de0658b0209965f9fe921e4f52dc19",
        "cnn_w3_channel": "4ba20e45fe5cd788321491b27669318993e31a3003d710bccbe15277f1ea19ac",
        "cnn_w4_channel": "3553e7dae37482f2b0a53f19536b60016cf1ba37ef856ef4308a7936523c3591",
        "cnn_w4_opset17": "7d9a6f696fb73cf5038dd33afaf57c436826d111b80576c9b9e6a7fd9de1dafd",
        "cnn_w4_rtn": "63b3bedb1d6b1e4d55222cdff79e6e0449c2f1ed06aa079d25df4b0045e0f827",
        "cnn_w8_channel": "f676804ac0d55b4033773c943a24071b9d5ca0c2ad89e9b9b59dc26a954c975a",
        "cnn_w8a8_ort": "7fe2c0abee767c6c32c92a571a08fbfcbaadf88747ea2b50939b319771316792",
        "cnn_w8a8_tensorrt": "f69faa6ed433eb2ea8091afd426d7c7bc838b635a7ef9449bb58f669a4af9a82",
        "keras_cnn_w8a8_ort": "e68a98acf6825a33c4568608983f19826baeb60ae75960d75e743d086903a2af",
        "keras_vit_w4": "d38326054d16e1297bd7c46bcbab80b50f44fbf7f9b2d3352c5adfff57ab3176",
        "paddle_cnn_w4": "bf164b4d58aba4a5529bccfae50f201be6156f166220e70713792f6fc32e666d",
        "vit_avg_bits": "e70079ed5eb5927edd4e8c3c40e9acb3901d20c32a7bb817edb5a786511373c2",
        "vit_w3_sym": "22df16c24318fc7b311504e7ed73cc1dce58d214a460aba84496fca40d3d802f",
        "vit_w4_block_nbits": "6c3a9969c1838ea58f7371e441b46ca110ec54697636ccac482ea3051adceb84",
        "vit_w4_block_qdq": "12ea2c9ff649b3496a8538c334b359481b4cd69a44e77ce340da9d4fa2e642eb",
        "vit_w8_tensor": "f9c99cf8e3e5ae6dc81f597dd0abd349d8e21be82b620c83dd0c030a43436662",
    },
}
# the same machine with OPENBLAS_NUM_THREADS=1: the cases whose bytes depend on the BLAS thread count differ
GOLDEN["199b7f9b16992aa8"] = {
    **GOLDEN["bcb2d65cd604a736"],
    "keras_cnn_w8a8_ort": "b19b324e6fd1dfd65fd33ccbe78a43c2c3e7fd9270e00a79813f3e0be0948b8a",
    "keras_vit_w4": "6ccbd3050f859d4a2502a7ce135710c00a8be2e3018a6fd3473ddb7bc02c0d2b",
    "paddle_cnn_w4": "8b596de87d874f41ca117519c6382afd9d2a1fd49973be43480d66cd465bd393",
    "vit_avg_bits": "99ce6a7eba8382536a614175219ba8597a3ad1f5a9f6807a30419c1e4882d51b",
    "vit_w3_sym": "d1957bde5a7013fbbaacf26c162f6427dd12ad0f7f0dd73beb4dde725669811c",
    "vit_w4_block_nbits": "ca3cdb039326525fa543ee05071fd1e342ac8b6f9dcd5003bcf7e56fa74a7cd0",
    "vit_w4_block_qdq": "ba3628040806a7a05c7ae22c587dc00b9a833a6b43643149339e95b84e1bd09e",
    "vit_w8_tensor": "a605badf8718411b7a79d9b4db7d4f8b25c15838253f83a9859e7fb6c842ce6a",
}


def fingerprint(seed: int = 0) -> str:
    """A short hash of this machine's floating-point results for products and ops of the kinds the pipeline runs:
    NumPy float32/float64 products with several row counts (the solver's row chunks), a Gram X^T X, and
    onnxruntime's Conv and MatMul on the CPU."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    h = hashlib.sha256()
    for dt in (np.float32, np.float64):
        a = rng.standard_normal((328, 200)).astype(dt)
        g = rng.standard_normal((200, 200)).astype(dt)
        for m in (1, 16, 96, 136, 328):
            h.update((a[:m] @ g).tobytes())
        h.update((a.T @ a).tobytes())
    w = rng.standard_normal((16, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal((16 * 6 * 6, 10)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Flatten", ["c"], ["f"]),
         helper.make_node("MatMul", ["f", "b"], ["y"])], "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [32, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [32, 10])],
        [onnx.numpy_helper.from_array(w, "w"), onnx.numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    h.update(sess.run(None, {"x": rng.standard_normal((32, 3, 8, 8)).astype(np.float32)})[0].tobytes())
    return h.hexdigest()[:16]


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


@pytest.fixture(scope="module")
def expected():
    fp = fingerprint()
    if fp not in GOLDEN:
        pytest.skip(f"no golden hashes for this machine's arithmetic (fingerprint {fp}; recorded: "
                    f"{', '.join(GOLDEN) or 'none'}): record them with python tests/test_golden.py")
    return GOLDEN[fp]


@pytest.mark.parametrize("name", sorted(CASES))
def test_output_bytes_unchanged(name, expected):
    assert name in expected, f"{name}: no recorded hash"
    assert output_sha(name) == expected[name]


def test_fingerprint_is_stable_and_hashes_results():
    assert fingerprint() == fingerprint()
    assert fingerprint(1) != fingerprint()  # (other operands, other results)


if __name__ == "__main__":
    print(f'    "{fingerprint()}": {{  # {np.__version__=}, onnxruntime, CPU: fill in')
    for n in sorted(CASES):
        print(f'        "{n}": "{output_sha(n)}",', flush=True)
    print("    },")
