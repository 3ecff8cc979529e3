"""Stage 5 helpers: run a model in onnxruntime and measure it (top-1 accuracy on a labelled .npz)."""

from __future__ import annotations

import os

import numpy as np

from .calib import _check_feed, _load_npz, model_inputs
from .capture import make_session
from .errors import UserError
from .modelio import load_model


def top1_accuracy(model, data_path: str, batch_size: int = 256) -> tuple[float, int]:
    """(accuracy, samples) of ``model`` (path or ModelProto) on ``data_path``: an .npz with the model's inputs and
    an integer ``labels`` array."""
    if isinstance(model, (str, os.PathLike)):
        model = load_model(model)
    if not os.path.exists(data_path):
        raise UserError(f"{data_path}: data file not found")
    data = _load_npz(data_path)
    if "labels" not in data:
        raise UserError(f"{data_path}: no 'labels' array (keys: {', '.join(data)})")
    labels = np.asarray(data.pop("labels"))
    feed = _check_feed(data_path, model_inputs(model), data)
    n = labels.shape[0]
    if next(iter(feed.values())).shape[0] != n:
        raise UserError(f"{data_path}: 'labels' has {n} entries, the inputs have a different number of samples")
    sess = make_session(model)
    correct = 0
    for i in range(0, n, batch_size):
        out = sess.run(None, {k: v[i:i + batch_size] for k, v in feed.items()})[0]
        correct += int((out.reshape(out.shape[0], -1).argmax(axis=1) == labels[i:i + batch_size]).sum())
    return correct / n, n
