"""tools/bench/silero.py: the streaming that emulates silero-vad's OnnxWrapper (each chunk fed behind the last
context samples of the previous input, the state carried), checked on a hand-made model whose outputs show what
it was fed (the real models and espeak-ng are not needed)."""

import builders
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper


@pytest.fixture(scope="module")
def sv():
    return builders.load_bench("silero")


def echo_model():
    """output = the first sample of the input (the oldest context sample); stateN = state + 1."""
    one = numpy_helper.from_array(np.array(1.0, np.float32), "one")
    idx = numpy_helper.from_array(np.array([0], np.int64), "idx")
    g = helper.make_graph([
        helper.make_node("Gather", ["input", "idx"], ["first"], axis=1),
        helper.make_node("Add", ["state", "one"], ["stateN"]),
        helper.make_node("Identity", ["first"], ["output"])], "echo",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, None]),
         helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, 1, 128]),
         helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 1]),
         helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, 1, 128])], [one, idx])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("rate", [16000, 8000])
def test_each_chunk_follows_the_previous_inputs_last_context_samples(sv, rate):
    chunk, ctx = sv.RATES[rate]
    x = np.arange(5 * chunk + 7, dtype=np.float32)  # (a partial last chunk is dropped)
    probs, seen = sv.Streamer(echo_model()).run(x, rate, record=True)
    assert len(probs) == len(seen) == 5
    for k, (inp, state) in enumerate(seen):
        want = np.concatenate([np.zeros(ctx) if k == 0 else x[k * chunk - ctx:k * chunk], x[k * chunk:(k + 1) * chunk]])
        np.testing.assert_array_equal(inp, want)
        np.testing.assert_array_equal(state, np.full((2, 1, 128), k, np.float32))  # (the state carried k times)
        assert probs[k] == want[0]
