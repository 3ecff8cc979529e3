#!/usr/bin/env python3
"""Train small Fashion-MNIST models in Keras and PaddlePaddle and export them with tf2onnx and Paddle2ONNX.

The ONNX files this writes are shipped under ``models/`` so that the tests (tests/test_foreign_exporters.py) check
onnxcomq on what these two exporters really produce, without TensorFlow or Paddle installed:

``models/fmnist_keras_cnn.onnx``
    Keras CNN (Conv2D + BatchNormalization + ReLU, a strided Conv2D, DepthwiseConv2D + pointwise Conv2D, max
    pooling, global average pooling, Dense + Dense), exported by ``tf2onnx.convert.from_keras`` at opset 13.
    Input ``input``: float32 [N, 28, 28, 1] (NHWC, as Keras has it), output ``logits`` [N, 10].
``models/fmnist_keras_vit.onnx``
    A tiny Keras transformer: 4x4 patch Conv2D, learned position embedding, one pre-norm block with
    ``MultiHeadAttention`` (4 heads) and a Dense GELU MLP, Dense head; tf2onnx, opset 13. Input as above.
``models/fmnist_paddle_cnn.onnx``
    Paddle CNN (Conv2D + BatchNorm2D + ReLU, max pooling, a strided Conv2D, a 1x1 Conv2D, Linear + Linear) saved with
    ``paddle.jit.save`` and exported by ``paddle2onnx.export`` at opset 11 without the optional polygraphy
    folding (the exporter's raw output). Input ``input``: float32 [N, 1, 28, 28] (NCHW, like
    models/fmnist_calib.npz and models/fmnist_test.npz), output ``logits`` [N, 10].

All models take the same normalized pixels as the shipped torch models, ``(x / 255 - 0.2860) / 0.3530``; the Keras
ones in NHWC layout (``np.transpose(x, (0, 2, 3, 1))`` of the shipped NCHW arrays). Training: 800 Adam steps (batch
128, learning rate decayed linearly from 2e-3 to 1e-4) on the Fashion-MNIST training set (Debian package
``dataset-fashion-mnist``), fixed seeds, deterministic ops; the script prints each model's float top-1 accuracy on
models/fmnist_test.npz (with onnxruntime when the venv has it, and with the framework).

TensorFlow and Paddle pin numpy and protobuf versions that onnxcomq's own environment must not get, so run this in
a separate virtual environment outside the repository (versions that work together, measured on Python 3.11)::

    python3 -m venv /work/venv-exporters
    /work/venv-exporters/bin/pip install "tensorflow-cpu==2.15.1" "tf2onnx==1.17.0" "paddlepaddle==3.0.0" \\
        "paddle2onnx==2.1.0" "onnx==1.17.0" "numpy<2" "onnxruntime==1.20.1"
    /work/venv-exporters/bin/python tools/export/foreign.py            # writes the three models/ files

(TF 2.15 is the last release with Keras 2, the Keras that tf2onnx's from_keras was written for; later ones were not
tried. paddle2onnx 2.1 requires onnx <= 1.17 and reads the PIR ``.json`` program that Paddle 3's ``jit.save``
writes.)
"""

from __future__ import annotations

import argparse
import gzip
import os
import random
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
DATA_DIR = "/usr/share/datasets/fashion-mnist"
MEAN, STD = 0.2860, 0.3530


def read_images_labels(data_dir: str, prefix: str):
    """(images float32 [N, 28, 28] normalized, labels int64 [N]) of one Fashion-MNIST split."""
    with gzip.open(os.path.join(data_dir, f"{prefix}-images-idx3-ubyte.gz")) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(os.path.join(data_dir, f"{prefix}-labels-idx1-ubyte.gz")) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    return ((images.astype(np.float32) / 255.0 - MEAN) / STD).astype(np.float32), labels


def batches(n: int, batch: int, steps: int, seed: int):
    """``steps`` index batches of a seeded shuffle, reshuffled every epoch."""
    rng = np.random.default_rng(seed)
    order, pos = rng.permutation(n), 0
    for _ in range(steps):
        if pos + batch > n:
            order, pos = rng.permutation(n), 0
        yield order[pos:pos + batch]
        pos += batch


def onnx_accuracy(path: str, x: np.ndarray, labels: np.ndarray) -> float | None:
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    logits = np.concatenate([sess.run(None, {name: x[i:i + 500]})[0] for i in range(0, len(x), 500)])
    return float((logits.argmax(1) == labels).mean())


def describe(path: str) -> str:
    import onnx

    m = onnx.load(path)
    ops: dict = {}
    for n in m.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    opset = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    return (f"{os.path.basename(path)}: opset {opset}, {os.path.getsize(path) / 1e3:.0f} KB, "
            f"{len(m.graph.initializer)} initializers, ops {dict(sorted(ops.items()))}")


# ---------------------------------------------------------------------------------------------------- Keras
def keras_models(tf):
    L = tf.keras.layers

    def conv_bn(x, filters, k, strides=1, depthwise=False):
        if depthwise:
            x = L.DepthwiseConv2D(k, strides=strides, padding="same", use_bias=False)(x)
        else:
            x = L.Conv2D(filters, k, strides=strides, padding="same", use_bias=False)(x)
        # momentum 0.9, not Keras' 0.99: after a few hundred steps the 0.99 moving averages still lag the weights
        # (measured: 68 % test top-1 in inference mode against a 0.27 training loss)
        return L.ReLU()(L.BatchNormalization(momentum=0.9)(x))

    inp = tf.keras.Input((28, 28, 1), name="input")
    x = conv_bn(inp, 24, 3)
    x = conv_bn(x, 48, 3, strides=2)  # 14x14
    x = conv_bn(x, 0, 3, depthwise=True)
    x = conv_bn(x, 64, 1)
    x = L.MaxPooling2D(2)(x)  # 7x7
    x = conv_bn(x, 64, 3)
    x = L.GlobalAveragePooling2D()(x)
    x = L.Dense(64, activation="relu")(x)
    out = L.Dense(10, name="logits")(x)
    cnn = tf.keras.Model(inp, out, name="keras_cnn")

    dim, heads = 64, 4
    inp = tf.keras.Input((28, 28, 1), name="input")
    x = L.Conv2D(dim, 4, strides=4)(inp)  # 7x7 patches
    x = L.Reshape((49, dim))(x)
    x = PositionEmbedding(tf)(x)
    h = L.LayerNormalization(epsilon=1e-6)(x)
    h = L.MultiHeadAttention(num_heads=heads, key_dim=dim // heads)(h, h)
    x = L.Add()([x, h])
    h = L.LayerNormalization(epsilon=1e-6)(x)
    h = L.Dense(2 * dim, activation="gelu")(h)
    h = L.Dense(dim)(h)
    x = L.Add()([x, h])
    x = L.LayerNormalization(epsilon=1e-6)(x)
    x = L.GlobalAveragePooling1D()(x)
    out = L.Dense(10, name="logits")(x)
    vit = tf.keras.Model(inp, out, name="keras_vit")
    return cnn, vit


def PositionEmbedding(tf):
    class _Pos(tf.keras.layers.Layer):
        def build(self, shape):
            self.pos = self.add_weight(name="pos", shape=(1, shape[1], shape[2]),
                                       initializer=tf.keras.initializers.RandomNormal(stddev=0.02))

        def call(self, x):
            return x + self.pos

    return _Pos()


def export_keras(args, x_train, y_train, x_test, y_test):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    import tf2onnx

    tf.keras.utils.set_random_seed(args.seed)
    tf.config.experimental.enable_op_determinism()
    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.config.threading.set_intra_op_parallelism_threads(2)
    cnn, vit = keras_models(tf)
    xtr = x_train[..., None]  # NHWC
    xte = x_test[..., None]
    for model, name, steps in ((cnn, "fmnist_keras_cnn", args.steps), (vit, "fmnist_keras_vit", args.steps)):
        opt = tf.keras.optimizers.Adam(tf.keras.optimizers.schedules.PolynomialDecay(args.lr, steps, args.lr / 20))
        loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)

        @tf.function
        def step(xb, yb):
            with tf.GradientTape() as tape:
                loss = loss_fn(yb, model(xb, training=True))
            opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
            return loss

        for i, idx in enumerate(batches(len(xtr), args.batch, steps, args.seed)):
            loss = step(tf.constant(xtr[idx]), tf.constant(y_train[idx]))
            if i % 100 == 0 or i == steps - 1:
                print(f"{name} step {i} loss {float(loss):.3f}", flush=True)
        acc_fw = float((model.predict(xte, batch_size=500, verbose=0).argmax(1) == y_test).mean())
        path = str(args.out / f"{name}.onnx")
        spec = (tf.TensorSpec((None, 28, 28, 1), tf.float32, name="input"),)
        tf2onnx.convert.from_keras(model, input_signature=spec, opset=args.keras_opset, output_path=path)
        acc = onnx_accuracy(path, xte, y_test)
        print(f"{name}: Keras top-1 {100 * acc_fw:.2f} %, ONNX top-1 "
              f"{'n/a' if acc is None else f'{100 * acc:.2f} %'}; {describe(path)}", flush=True)
        for opset in args.opset_variants:
            vpath = str(args.out / f"{name}_opset{opset}.onnx")
            tf2onnx.convert.from_keras(model, input_signature=spec, opset=opset, output_path=vpath)
            print(f"variant {describe(vpath)}", flush=True)


# ---------------------------------------------------------------------------------------------------- Paddle
def export_paddle(args, x_train, y_train, x_test, y_test):
    import paddle
    import paddle2onnx
    from paddle import nn

    paddle.seed(args.seed)
    paddle.set_device("cpu")

    class PaddleCNN(nn.Layer):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2D(1, 16, 3, padding=1), nn.BatchNorm2D(16), nn.ReLU(),
                nn.Conv2D(16, 32, 3, padding=1), nn.BatchNorm2D(32), nn.ReLU(), nn.MaxPool2D(2),  # 14x14
                nn.Conv2D(32, 64, 3, stride=2, padding=1), nn.BatchNorm2D(64), nn.ReLU(),  # 7x7
                nn.Conv2D(64, 16, 1), nn.ReLU())
            self.fc1 = nn.Linear(16 * 7 * 7, 64)
            self.fc2 = nn.Linear(64, 10)

        def forward(self, x):
            x = paddle.flatten(self.features(x), 1)
            return self.fc2(nn.functional.relu(self.fc1(x)))

    model = PaddleCNN()
    lr = paddle.optimizer.lr.PolynomialDecay(args.lr, args.steps, args.lr / 20)
    opt = paddle.optimizer.Adam(learning_rate=lr, parameters=model.parameters())
    xtr = x_train[:, None]  # NCHW
    xte = x_test[:, None]
    model.train()
    for i, idx in enumerate(batches(len(xtr), args.batch, args.steps, args.seed)):
        loss = nn.functional.cross_entropy(model(paddle.to_tensor(xtr[idx])), paddle.to_tensor(y_train[idx]))
        loss.backward()
        opt.step()
        opt.clear_grad()
        lr.step()
        if i % 100 == 0 or i == args.steps - 1:
            print(f"fmnist_paddle_cnn step {i} loss {float(loss):.3f}", flush=True)
    model.eval()
    with paddle.no_grad():
        logits = np.concatenate([model(paddle.to_tensor(xte[i:i + 500])).numpy() for i in range(0, len(xte), 500)])
    acc_fw = float((logits.argmax(1) == y_test).mean())
    path = str(args.out / "fmnist_paddle_cnn.onnx")
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "model")
        paddle.jit.save(model, prefix, input_spec=[paddle.static.InputSpec([None, 1, 28, 28], "float32", "input")])
        program = prefix + (".json" if os.path.exists(prefix + ".json") else ".pdmodel")
        # optimize_tool other than polygraphy/onnxoptimizer: the exporter's own output, unfolded
        paddle2onnx.export(program, prefix + ".pdiparams", path, opset_version=args.paddle_opset,
                           auto_upgrade_opset=False, optimize_tool="none")
        for opset in args.opset_variants:
            vpath = str(args.out / f"fmnist_paddle_cnn_opset{opset}.onnx")
            paddle2onnx.export(program, prefix + ".pdiparams", vpath, opset_version=opset, auto_upgrade_opset=False,
                               optimize_tool="none")
            rename_output(vpath, "logits")
            print(f"variant {describe(vpath)}", flush=True)
    rename_output(path, "logits")
    acc = onnx_accuracy(path, xte, y_test)
    print(f"fmnist_paddle_cnn: Paddle top-1 {100 * acc_fw:.2f} %, ONNX top-1 "
          f"{'n/a' if acc is None else f'{100 * acc:.2f} %'}; {describe(path)}", flush=True)


def rename_output(path: str, name: str):
    """Name the single graph output ``name`` (Paddle2ONNX calls it after the last op's variable)."""
    import onnx

    m = onnx.load(path)
    old = m.graph.output[0].name
    for n in m.graph.node:
        n.output[:] = [name if o == old else o for o in n.output]
        n.input[:] = [name if i == old else i for i in n.input]
    m.graph.output[0].name = name
    onnx.save(m, path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=DATA_DIR)
    p.add_argument("--out", type=Path, default=REPO / "models")
    p.add_argument("--test", type=Path, default=REPO / "models" / "fmnist_test.npz",
                   help="labelled NCHW test set for the printed accuracy (default: the shipped one)")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3, help="Adam, decayed linearly to lr/20")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keras-opset", type=int, default=13)
    p.add_argument("--paddle-opset", type=int, default=11)
    p.add_argument("--only", choices=["keras", "paddle"], default=None)
    p.add_argument("--opset-variants", type=int, nargs="*", default=[],
                   help="also export each model at these opsets (<name>_opset<N>.onnx in --out), to check onnxcomq "
                        "on them; not shipped")
    args = p.parse_args(argv)
    random.seed(args.seed)
    np.random.seed(args.seed)
    x_train, y_train = read_images_labels(args.data_dir, "train")
    test = np.load(args.test)
    x_test, y_test = test["input"][:, 0], test["labels"]
    args.out.mkdir(parents=True, exist_ok=True)
    if args.only in (None, "keras"):
        export_keras(args, x_train, y_train, x_test, y_test)
    if args.only in (None, "paddle"):
        export_paddle(args, x_train, y_train, x_test, y_test)
    return 0


if __name__ == "__main__":
    sys.exit(main())
