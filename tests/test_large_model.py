"""A model over 2 GB (external data) quantized end to end through the CLI.

Protobuf cannot hold a message of 2 GiB or more, so every in-memory serialization (save, SerializeToString,
ByteSize, check_model(model), infer_shapes(model), InferenceSession(bytes)) fails on such a model. The test model is
shaped like a language model's front end: two float32 token-embedding tables of 1.1 GB (Gather, which stays float) feeding
three MatMul layers (quantized). It is written with external data, quantized to 8 bits with the CLI, and the output,
itself over 2 GB, must come back as <output> + <output>.data, pass onnx.checker (by path) and follow the float model
in onnxruntime; the input files stay untouched. Slow (1-3 minutes, about 5 GB of temporary disk) but CI runs it.
"""

import hashlib
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomq.cli import main

VOCAB, DIM, HIDDEN, OUT = 270_000, 1024, 512, 64  # two embedding tables of 270000 x 1024 float32: 2.21 GB
SEQ = 16


def _big_model(path: str) -> None:
    """Two token-embedding tables (one tensor cannot exceed 2 GiB either), summed, then three MatMul layers."""
    rng = np.random.default_rng(0)
    inits = []
    for name in ("embedding", "embedding2"):
        emb = np.empty((VOCAB, DIM), np.float32)
        for r in range(0, VOCAB, 30_000):  # in slices: no float64 temporary of the whole table
            emb[r:r + 30_000] = rng.standard_normal((min(30_000, VOCAB - r), DIM), dtype=np.float32)
        inits.append(numpy_helper.from_array(emb, name))
        del emb
    nodes = [helper.make_node("Gather", ["embedding", "input_ids"], ["e1"], name="embed", axis=0),
             helper.make_node("Gather", ["embedding2", "input_ids"], ["e2"], name="embed2", axis=0),
             helper.make_node("Add", ["e1", "e2"], ["h0"], name="add")]
    sizes = [DIM, HIDDEN, HIDDEN, OUT]
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        inits.append(numpy_helper.from_array((rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32), f"W{i}"))
        nodes.append(helper.make_node("MatMul", [f"h{i}", f"W{i}"], [f"m{i}"], name=f"matmul{i}"))
        last = i == len(sizes) - 2
        nodes.append(helper.make_node("Identity" if last else "Relu", [f"m{i}"], ["output" if last else f"h{i + 1}"],
                                      name=f"act{i}"))
    graph = helper.make_graph(
        nodes, "big", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["N", "L"])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", "L", OUT])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location="big.data")


def _digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


@pytest.mark.slow
def test_model_over_2gb_quantizes_end_to_end(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    model_path = str(src / "big.onnx")
    _big_model(model_path)
    assert os.path.getsize(src / "big.data") > 2**31  # really over the protobuf limit
    before = {f: (os.path.getmtime(src / f), _digest(str(src / f))) for f in os.listdir(src)}

    rng = np.random.default_rng(1)
    np.savez(tmp_path / "calib.npz", input_ids=rng.integers(0, VOCAB, (64, SEQ)))
    out = tmp_path / "out" / "big.w8.onnx"
    out.parent.mkdir()
    rc = main(["quantize", model_path, "-o", str(out), "--calib", str(tmp_path / "calib.npz"), "--bits", "8",
               "--quiet"])
    assert rc == 0
    assert {f: (os.path.getmtime(src / f), _digest(str(src / f))) for f in os.listdir(src)} == before
    assert sorted(os.listdir(out.parent)) == ["big.w8.onnx", "big.w8.onnx.data"]  # no temporary left behind
    assert os.path.getsize(str(out) + ".data") > 2**31

    onnx.checker.check_model(str(out), full_check=True)
    q = onnx.load(str(out), load_external_data=False)
    dq = [n for n in q.graph.node if n.op_type == "DequantizeLinear"]
    assert sorted(n.output[0] for n in dq) == ["W0", "W1", "W2"]
    assert not {"W0", "W1", "W2"} & {t.name for t in q.graph.initializer}  # the float weights are gone
    del q

    ids = rng.integers(0, VOCAB, (4, SEQ))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    (yf,) = ort.InferenceSession(model_path, so, providers=["CPUExecutionProvider"]).run(None, {"input_ids": ids})
    (yq,) = ort.InferenceSession(str(out), so, providers=["CPUExecutionProvider"]).run(None, {"input_ids": ids})
    rel = np.linalg.norm(yq - yf) / np.linalg.norm(yf)
    assert 0 < rel < 0.02  # 8-bit per-channel weights: close to the float model, and not the float model itself
