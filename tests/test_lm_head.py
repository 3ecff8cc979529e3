"""A language model's output projection (lm_head, graph/layers.lm_heads): left float by default, at 8 bits or
quantized on request; never found in models without a token embedding, nor in an encoder's small classifier."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from builders import recipe
from onnx import TensorProto, helper, numpy_helper

from onnxcomq.graph.layers import find_layers, lm_heads
from onnxcomq.pipeline import run

V, H = 96, 32


def _decoder(tied_cast=False, classifier=0):
    """input_ids -> Gather(embedding V x H) -> MatMul -> Relu -> MatMul -> lm_head MatMul (H x V) -> logits;
    ``classifier``: instead of the lm_head, a classifier of that many outputs on the first token."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((V, H)).astype(np.float32), "emb"),
             numpy_helper.from_array((rng.standard_normal((H, H)) / np.sqrt(H)).astype(np.float32), "w1"),
             numpy_helper.from_array((rng.standard_normal((H, H)) / np.sqrt(H)).astype(np.float32), "w2"),
             numpy_helper.from_array((rng.standard_normal((H, classifier or V)) / np.sqrt(H)).astype(np.float32),
                                     "head")]
    ids = "input_ids"
    nodes = []
    if tied_cast:
        nodes.append(helper.make_node("Cast", ["input_ids"], ["ids32"], to=TensorProto.INT32, name="cast"))
        ids = "ids32"
    nodes += [helper.make_node("Gather", ["emb", ids], ["e"], name="embed"),
              helper.make_node("MatMul", ["e", "w1"], ["h1"], name="fc1"),
              helper.make_node("Relu", ["h1"], ["r1"], name="relu"),
              helper.make_node("MatMul", ["r1", "w2"], ["h2"], name="fc2"),
              helper.make_node("MatMul", ["h2", "head"], ["logits"], name="lm_head")]
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)
    g = helper.make_graph(nodes, "lm", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["N", "T"])],
                          [out], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _calib(n=16, t=12):
    return {"input_ids": np.random.default_rng(1).integers(0, V, (n, t)).astype(np.int64)}


@pytest.mark.parametrize("tied_cast", [False, True])
def test_the_output_projection_is_found(tied_cast):
    m = _decoder(tied_cast)
    layers, _ = find_layers(m)
    assert lm_heads(m, layers) == {"lm_head"}


def test_no_head_without_a_token_embedding_or_in_a_small_classifier():
    m = onnx.load("models/fmnist_vit.onnx")
    assert lm_heads(m, find_layers(m)[0]) == set()
    c = _decoder(classifier=2)  # out width 2, the embedding 96: a classifier, not an lm_head
    assert lm_heads(c, find_layers(c)[0]) == set()
    w = _decoder(classifier=V - 1)
    assert lm_heads(w, find_layers(w)[0]) == set()


def _head_weight(model):
    """What feeds the lm_head MatMul's weight input: a float initializer, or the output of a DequantizeLinear."""
    node = next(n for n in model.graph.node if n.name == "lm_head" or n.output[0] == "logits")
    producers = {o: n for n in model.graph.node for o in n.output}
    w = node.input[1]
    return producers[w].op_type if w in producers else "initializer"


def test_default_leaves_the_head_float_and_says_why():
    q, rep = run(_decoder(), _calib(), recipe(bits=4))
    assert [r.node for r in rep.layers] == ["fc1", "fc2"]
    why = [s for s in rep.skipped if s["node"] == "lm_head"]
    assert len(why) == 1 and "lm_head" in why[0]["reason"] and "left float" in why[0]["reason"]
    assert _head_weight(q) == "initializer"


@pytest.mark.parametrize("choice,bits", [("int8", 8), ("quantize", 4)])
def test_int8_or_quantize_on_request(choice, bits):
    q, rep = run(_decoder(), _calib(), recipe(bits=4).updated({"layers": {"lm_head": choice}}))
    row = {r.node: r for r in rep.layers}
    assert row["lm_head"].bits == bits and row["fc1"].bits == row["fc2"].bits == 4
    assert _head_weight(q) == "DequantizeLinear"
    assert not any(s["node"] == "lm_head" for s in rep.skipped)


def _masked_decoder():
    """_decoder with an attention_mask input that zeroes the padded positions' embeddings."""
    m = _decoder()
    g = m.graph
    g.input.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", "T"]))
    g.initializer.append(numpy_helper.from_array(np.array([2], np.int64), "axis2"))
    g.node[0].output[0] = "e0"
    g.node.insert(1, helper.make_node("Cast", ["attention_mask"], ["mf"], to=TensorProto.FLOAT, name="mcast"))
    g.node.insert(2, helper.make_node("Unsqueeze", ["mf", "axis2"], ["m3"], name="munsq"))
    g.node.insert(3, helper.make_node("Mul", ["e0", "m3"], ["e"], name="mmul"))
    return m


def test_random_calibration_feeds_a_mask_of_ones():
    _, rep = run(_masked_decoder(), "random", recipe(bits=4, max_samples=4))
    assert all(r.rows > 0 for r in rep.layers)


def test_a_mask_of_zeros_everywhere_is_an_error_not_a_silent_nothing():
    from onnxcomq.errors import UserError
    calib = {**_calib(4), "attention_mask": np.zeros((4, 12), np.int64)}
    with pytest.raises(UserError, match="no calibration row reached any quantized layer"):
        run(_masked_decoder(), calib, recipe(bits=4))


def _tied_decoder():
    """_decoder whose lm_head is Gemm(h2, emb, transB=1): the embedding table itself (tied weights)."""
    m = _decoder()
    head = next(n for n in m.graph.node if n.name == "lm_head")
    head.CopyFrom(helper.make_node("Gemm", ["h2_2d", "emb"], ["logits"], name="lm_head", transB=1))
    m.graph.initializer.append(numpy_helper.from_array(np.array([-1, H]), "flat"))
    m.graph.node.insert(len(m.graph.node) - 1, helper.make_node("Reshape", ["h2", "flat"], ["h2_2d"], name="flat"))
    return m


def test_a_head_tied_to_the_embedding_says_that_the_lookup_reads_it_quantized(caplog):
    """Quantizing an lm_head that shares its weight with the token embedding quantizes the embedding too (the
    Gather reads the DequantizeLinear output): said, not silent. Left float (the default), nothing to say."""
    x = {"input_ids": _calib()["input_ids"][:, :1]}
    q, rep = run(_tied_decoder(), x, recipe(bits=4).updated({"layers": {"lm_head": "quantize"}}))
    said = [r.getMessage() for r in caplog.records if "tied weights" in r.getMessage()]
    assert said == ["weight emb of lm_head is also read by Gather embed: it reads the quantized weight (tied weights)"]
    producers = {o: n.op_type for n in q.graph.node for o in n.output}
    assert producers[next(n for n in q.graph.node if n.op_type == "Gather").input[0]] == "DequantizeLinear"
    caplog.clear()
    _, rep = run(_tied_decoder(), x, recipe(bits=4))
    assert "lm_head" not in [r.node for r in rep.layers] and not any("tied" in r.getMessage() for r in caplog.records)
