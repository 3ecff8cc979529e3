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
        "cnn_sequential": "eab8e11cf2341abc947bc7abc195a44aeb6f515425d3443bb911121920cc3cab",
        "cnn_w3_channel": "0456682813acb7d65db26fe8df43eb0db5c51daa54dc203d66be365de5222f35",
        "cnn_w4_channel": "a661bed1dfbb4700efc76a91d517a24d2e41f9fb6ae18fafd99ab59df233209b",
        "cnn_w4_opset17": "0ba0b51b949b57d628ed4bf923ed3834f7a3199d60eaa97d745323547008f8bc",
        "cnn_w4_rtn": "63b3bedb1d6b1e4d55222cdff79e6e0449c2f1ed06aa079d25df4b0045e0f827",
        "cnn_w8_channel": "f676804ac0d55b4033773c943a24071b9d5ca0c2ad89e9b9b59dc26a954c975a",
        "cnn_w8a8_ort": "7fe2c0abee767c6c32c92a571a08fbfcbaadf88747ea2b50939b319771316792",
        "cnn_w8a8_tensorrt": "f69faa6ed433eb2ea8091afd426d7c7bc838b635a7ef9449bb58f669a4af9a82",
        "keras_cnn_w8a8_ort": "e68a98acf6825a33c4568608983f19826baeb60ae75960d75e743d086903a2af",
        "keras_vit_w4": "be18f54f4ff8534331c5929cf7f97ca4c144ada7a998fbf10e58814c51abf30e",
        "paddle_cnn_w4": "26a9b8cb1bf51b4fe45a5c3b348fa52de4186126f9085307db7bec8eb325ff74",
        "vit_avg_bits": "a249ef94bfc30b92b091f0e45f02a4cfa16cf282ba08ae239e7b1812c3116644",
        "vit_w3_sym": "11cea8cb750c4a99498df14da01d452d224eaa9b0359d31952eadb91eef749db",
        "vit_w4_block_nbits": "c2d8639babef6598993530799d65215800a50e9d3180b7860abbcc008224f56d",
        "vit_w4_block_qdq": "a88dc3ede49263baf16f01a797804bfdb12af4b05f19c9e46939b51985a6d240",
        "vit_w8_tensor": "f9c99cf8e3e5ae6dc81f597dd0abd349d8e21be82b620c83dd0c030a43436662",
    },
}
# the same machine with OPENBLAS_NUM_THREADS=1: the cases whose bytes depend on the BLAS thread count differ
GOLDEN["199b7f9b16992aa8"] = {
    **GOLDEN["bcb2d65cd604a736"],
    "cnn_sequential": "988b4687019adb7790f2d13ae5b7d20a9ef6a02a63b093def62f4786ceef4da8",
    "cnn_w3_channel": "b32c11ed00fe0a4313eea9502142eaa7a9d362cb839017d8367241c0524c7ce8",
    "cnn_w4_channel": "cb155d5b978a915cb40981344ee527acc34ed047a3009401f094b0a70cdf2869",
    "cnn_w4_opset17": "97009bdb3894b986d772ed220b3a6608aec0c8a0ef20a6a7c78aed8e390fe2c1",
    "keras_cnn_w8a8_ort": "b19b324e6fd1dfd65fd33ccbe78a43c2c3e7fd9270e00a79813f3e0be0948b8a",
    "keras_vit_w4": "c92c98246be2e7f62f8bed3218e9da02d767c906f74bd67dfe431a1994688265",
    "paddle_cnn_w4": "c53cc85c359fb092d8f9bb3b2f835ca2318742c33d62fbe59983715a3984f6d8",
    "vit_avg_bits": "1b4e7334856f10c94610d81ac668ab6c23abd8cf61979bb9e9328c55fb513bae",
    "vit_w3_sym": "f3334b3c0ac17a91cdfc8413c85deb367ba8732d6aa2443fdb2ce747384be929",
    "vit_w4_block_nbits": "98a2f63baf93f712e7bb98dd5a8490321df2d418ee28e2c22383fd0b47510e65",
    "vit_w4_block_qdq": "c918a91299eb47c9ea5d0c166e164d7f1076212f80255dbb27074a9e51d6e2e7",
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
