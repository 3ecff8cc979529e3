"""Export two small recurrent models whose tf2onnx export puts the layers inside a loop body, for
tests/test_loops.py (models/tf_simplernn_loop.onnx and models/tf1_rnn_scan.onnx).

- ``tf_simplernn_loop``: Keras 2 ``Input((16, 8)) -> SimpleRNN(32, return_sequences=True) -> Dense(10)``, exported
  by ``tf2onnx.convert.from_keras`` at opset 15. tf2onnx writes the SimpleRNN as a Loop that carries its kernel and
  recurrent kernel (frozen tf.Variables, top-level initializers) through the body unchanged, as loop values: the
  body's MatMuls read their weights as body inputs. The Dense head is a top-level MatMul.
- ``tf1_rnn_scan``: a TF1 graph (control flow v1), ``tf.compat.v1.nn.dynamic_rnn`` over a custom cell (concat,
  MatMul, ReLU, MatMul, tanh; 16 steps of 8 features, state 32, hidden 64), frozen and exported by
  ``tf2onnx.convert.from_graph_def`` at opset 15: a Scan whose body reads the weights from the outer graph. Input
  ``x:0``.

Weights are Keras's and TF's random initializers with fixed seeds (no training: the tests check structure and
closeness to float). TensorFlow pins numpy and protobuf versions that onnxcomq's environment must not get; run this
in the separate environment of tools/export/foreign.py::

    python3 -m venv /work/venv-exporters
    /work/venv-exporters/bin/pip install "tensorflow-cpu==2.15.1" "tf2onnx==1.17.0" "onnx==1.17.0" "numpy<2" \\
        "onnxruntime==1.20.1"
    /work/venv-exporters/bin/python tools/export/keras_loops.py       # writes the two models/ files

It checks each export against TensorFlow on random inputs (max abs difference printed; about 1e-6).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OPSET = 15
T, F = 16, 8


def simplernn():
    import tensorflow as tf
    import tf2onnx

    tf.keras.utils.set_random_seed(0)
    inp = tf.keras.Input((T, F), name="x")
    out = tf.keras.layers.Dense(10)(tf.keras.layers.SimpleRNN(32, return_sequences=True)(inp))
    model = tf.keras.Model(inp, out)
    path = os.path.join(ROOT, "models", "tf_simplernn_loop.onnx")
    tf2onnx.convert.from_keras(model, input_signature=[tf.TensorSpec((None, T, F), tf.float32, name="x")],
                               opset=OPSET, output_path=path)
    return path, "x", lambda x: np.asarray(model(x, training=False))


def tf1_scan():
    import tensorflow as tf
    import tf2onnx

    rng = np.random.default_rng(51)

    def w(shape):
        return (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)

    class Cell(tf.compat.v1.nn.rnn_cell.RNNCell):
        def __init__(self):
            super().__init__()
            self.W1 = tf.compat.v1.get_variable("W1", initializer=w((F + 32, 64)))
            self.b1 = tf.compat.v1.get_variable("b1", initializer=np.zeros(64, np.float32))
            self.W2 = tf.compat.v1.get_variable("W2", initializer=w((64, 32)))

        @property
        def state_size(self):
            return 32

        @property
        def output_size(self):
            return 32

        def __call__(self, x, h, scope=None):
            u = tf.nn.relu(tf.matmul(tf.concat([x, h], -1), self.W1) + self.b1)
            h = tf.tanh(tf.matmul(u, self.W2))
            return h, h

    tf.compat.v1.disable_control_flow_v2()
    try:
        g = tf.Graph()
        with g.as_default():
            x = tf.compat.v1.placeholder(tf.float32, [None, T, F], name="x")
            y, _ = tf.compat.v1.nn.dynamic_rnn(Cell(), x, dtype=tf.float32)
            tf.identity(y, name="y")
            sess = tf.compat.v1.Session(graph=g)
            sess.run(tf.compat.v1.global_variables_initializer())
            frozen = tf.compat.v1.graph_util.convert_variables_to_constants(sess, g.as_graph_def(), ["y"])
    finally:
        tf.compat.v1.enable_control_flow_v2()
    path = os.path.join(ROOT, "models", "tf1_rnn_scan.onnx")
    tf2onnx.convert.from_graph_def(frozen, input_names=["x:0"], output_names=["y:0"], opset=OPSET,
                                   output_path=path)
    return path, "x:0", lambda v: sess.run("y:0", {"x:0": v})


def main() -> int:
    import onnx
    import onnxruntime as ort

    x = np.random.default_rng(1).standard_normal((4, T, F)).astype(np.float32)
    for make in (simplernn, tf1_scan):
        path, name, reference = make()
        m = onnx.load(path)
        loops = [n.op_type for n in m.graph.node if n.op_type in ("Loop", "Scan")]
        got = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {name: x})[0]
        print(f"{os.path.relpath(path, ROOT)}: {loops}, {os.path.getsize(path)} bytes, max abs difference to "
              f"TensorFlow {np.abs(got - reference(x)).max():.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
