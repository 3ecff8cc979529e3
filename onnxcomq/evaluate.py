"""Stage 5 helpers: run a model in onnxruntime and measure it (top-1 accuracy on a labelled .npz)."""

from __future__ import annotations

import os

import numpy as np

from .capture.calib import Calibration, _load_npz, model_inputs
from .capture.session import make_session, run_session
from .errors import UserError
from .graph.modelio import load_model
from .verify import as_array


def top1_accuracy(model, data_path: str, batch_size: int = 256) -> tuple[float, int]:
    """(accuracy, samples) of ``model`` (path or ModelProto) on ``data_path``: an .npz with the model's inputs and
    an integer ``labels`` array (class indices, one per sample, each below the model's number of classes)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise UserError(f"--batch-size must be a positive integer, got {batch_size!r}")
    if isinstance(model, (str, os.PathLike)):
        model = load_model(model)
    if not os.path.exists(data_path):
        raise UserError(f"{data_path}: data file not found")
    data = _load_npz(data_path)
    if "labels" not in data:
        raise UserError(f"{data_path}: no 'labels' array (keys: {', '.join(data)})")
    labels = np.asarray(data.pop("labels"))
    if labels.dtype == bool or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{data_path}: 'labels' must hold integer class indices, got dtype {labels.dtype}")
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise UserError(f"{data_path}: 'labels' must be one class index per sample (shape [N]), got shape "
                        f"{list(labels.shape)}")
    n = labels.shape[0]
    if n == 0:
        raise UserError(f"{data_path}: 'labels' is empty")
    if labels.min() < 0:
        raise UserError(f"{data_path}: 'labels' holds a negative class index ({int(labels.min())})")
    cal = Calibration(data, model_inputs(model), batch_size=batch_size, name=data_path)  # (the same input layouts)
    expected = n - n % cal.fixed_batch if cal.fixed_batch else n
    if cal.num_samples != expected:
        raise UserError(f"{data_path}: 'labels' has {n} entries, the inputs have {cal.num_samples} samples")
    sess = make_session(model)
    names = [o.name for o in sess.get_outputs()]
    correct = i = 0
    for feed in cal:
        k = feed.samples
        outs = [as_array(o) for o in run_session(sess, None, feed, what=f"onnxruntime failed on {data_path} at "
                                                                          f"sample {i}")]
        name, pred, classes = _predictions(names, outs, k, data_path)
        if i == 0 and classes is not None and labels.max() >= classes:
            raise UserError(f"{data_path}: 'labels' holds class index {int(labels.max())}, but the model's output "
                            f"{name} has {classes} classes")
        correct += int((pred == labels[i:i + k]).sum())
        i += k
    return correct / i, i


def _predictions(names: list, outs: list, k: int, where: str) -> tuple:
    """(output name, predicted class per sample, number of classes or None) of one batch of ``k`` samples: the
    argmax of the first float output with several scores per sample (logits, probabilities; scikit-learn's
    ZipMap maps in key order), else the first integer output with one value per sample (a predicted label)."""
    for name, a in zip(names, outs):
        if np.issubdtype(a.dtype, np.floating) and a.ndim and a.shape[0] == k and a.size > k:
            return name, a.reshape(k, -1).argmax(axis=1), a.size // k
    for name, a in zip(names, outs):
        if np.issubdtype(a.dtype, np.integer) and a.size == k:
            return name, a.reshape(k), None
    shapes = ", ".join(f"{n} {list(a.shape)} {a.dtype}" for n, a in zip(names, outs))
    raise UserError(f"{where}: no output of the model holds one score vector or one class index per sample "
                    f"(batch of {k}; outputs: {shapes})")
