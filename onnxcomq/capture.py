"""Stage 2: stream calibration batches through onnxruntime and accumulate each layer's Gram matrix G = X^T X.

One pass: the layers' input tensors are added as extra graph outputs, every batch is run once, and each captured
tensor is turned into X chunk by chunk (conv: im2col with the conv's own stride/pads/dilations, per group; MatMul and
Gemm: leading dims flattened) and folded into G in float32 GEMMs accumulated in float64. Only G (and the column sums
and row count) is kept: peak memory does not grow with the number of calibration samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from numpy.lib.stride_tricks import sliding_window_view

from .errors import UserError
from .graph import XSpec
from .modelio import is_large, model_path, skeleton

CHUNK_ROWS = 8192  # rows of X per GEMM: large enough to keep the GEMMs efficient, small enough for the cache


def conv_pads(spec: XSpec, spatial: tuple) -> tuple:
    """Begin/end pads for each spatial axis, resolving auto_pad (ONNX Conv semantics)."""
    nsp = len(spatial)
    if spec.auto_pad in ("", "NOTSET"):
        return spec.pads if spec.pads else (0,) * (2 * nsp)
    if spec.auto_pad == "VALID":
        return (0,) * (2 * nsp)
    begin, end = [], []
    for i, size in enumerate(spatial):
        out = math.ceil(size / spec.strides[i])
        eff = (spec.kernel[i] - 1) * spec.dilations[i] + 1
        total = max((out - 1) * spec.strides[i] + eff - size, 0)
        small, big = total // 2, total - total // 2
        if spec.auto_pad == "SAME_UPPER":
            begin.append(small)
            end.append(big)
        else:  # SAME_LOWER
            begin.append(big)
            end.append(small)
    return tuple(begin + end)


def conv_output_shape(spec: XSpec, spatial: tuple) -> tuple:
    nsp = len(spatial)
    pads = conv_pads(spec, spatial)
    return tuple((spatial[i] + pads[i] + pads[i + nsp] - ((spec.kernel[i] - 1) * spec.dilations[i] + 1))
                 // spec.strides[i] + 1 for i in range(nsp))


def im2col(x: np.ndarray, spec: XSpec) -> np.ndarray:
    """X of every conv group at once: (rows, groups, C/groups * prod(kernel)) for images ``x`` (N, C, *spatial).

    Rows are output positions (image-major); the columns of group k are (c, k1, k2, ...) in the order of
    ``W.reshape(O, -1)``, so ``im2col(x, spec)[:, k] @ W_k.reshape(O_k, -1).T`` is group k's conv output (no bias).
    """
    nsp = x.ndim - 2
    g = spec.group
    pads = conv_pads(spec, x.shape[2:])
    if any(pads):
        x = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + nsp]) for i in range(nsp)])
    strides = tuple(slice(None, None, s) for s in spec.strides)
    if all(k == 1 for k in spec.kernel):  # 1x1: no windows, only strides
        v = np.moveaxis(x[(slice(None), slice(None)) + strides], 1, -1)
        return np.ascontiguousarray(v).reshape(-1, g, x.shape[1] // g)
    eff = tuple((k - 1) * d + 1 for k, d in zip(spec.kernel, spec.dilations))
    v = sliding_window_view(x, eff, axis=tuple(range(2, 2 + nsp)))  # (N, C, *out_full, *eff)
    v = v[(slice(None), slice(None)) + strides + tuple(slice(None, None, d) for d in spec.dilations)]
    perm = (0,) + tuple(range(2, 2 + nsp)) + (1,) + tuple(range(2 + nsp, 2 + 2 * nsp))
    v = v.transpose(perm)  # (N, *out, C, *kernel)
    return np.ascontiguousarray(v).reshape(-1, g, x.shape[1] // g * int(np.prod(spec.kernel)))


def convtranspose_as_conv(x: np.ndarray, spec: XSpec):
    """(input, XSpec) of the stride-1 conv equivalent to a ConvTranspose: zeros inserted between input pixels
    (``strides``), then the equivalent pads applied (negative ones crop)."""
    nsp = x.ndim - 2
    up_shape = x.shape[:2] + tuple((x.shape[2 + i] - 1) * spec.strides[i] + 1 for i in range(nsp))
    up = np.zeros(up_shape, x.dtype)
    up[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in spec.strides)] = x
    crop = tuple(slice(max(-spec.pads[i], 0), up_shape[2 + i] - max(-spec.pads[nsp + i], 0)) for i in range(nsp))
    up = up[(slice(None), slice(None)) + crop]
    pads = tuple(max(p, 0) for p in spec.pads)
    conv = XSpec(spec.tensor, "conv", fan_in=spec.fan_in, kernel=spec.kernel, strides=(1,) * nsp, pads=pads,
                 dilations=spec.dilations, group=spec.group)
    return up, conv


@dataclass
class GramStats:
    """Streaming statistics of one X, per group: G = X^T X (groups, n, n), column sums (groups, n), row count."""

    spec: XSpec
    groups: int
    G: np.ndarray = None
    sums: np.ndarray = None
    rows: int = 0

    def __post_init__(self):
        n = self.spec.fan_in
        self.G = np.zeros((self.groups, n, n), np.float64)
        self.sums = np.zeros((self.groups, n), np.float64)

    def _fold(self, X: np.ndarray):
        """X: (rows, groups, n), folded in float32 GEMMs and accumulated in float64."""
        X = X.astype(np.float32, copy=False)
        if self.groups == 1:
            X2 = X[:, 0]
            self.G[0] += X2.T @ X2
        else:
            Xg = np.ascontiguousarray(X.transpose(1, 0, 2))  # (groups, rows, n)
            self.G += np.matmul(Xg.transpose(0, 2, 1), Xg)
        self.sums += X.sum(axis=0)
        self.rows += X.shape[0]

    def add(self, t: np.ndarray, mask: np.ndarray | None = None):
        """Fold one captured batch tensor into the statistics.

        ``mask`` (the batch's attention mask, (batch, seq)): for row-kind layers whose rows are the mask's token
        positions, the padded positions (mask 0) are left out of G.
        """
        for X in self.chunks(t, mask):
            self._fold(X)

    def chunks(self, t: np.ndarray, mask: np.ndarray | None = None):
        """X of one captured batch tensor, chunk by chunk (rows, groups, n); the chunking depends on shapes only."""
        if self.spec.kind == "rows":
            X = t.T if self.spec.transpose else t
            X = X.reshape(-1, 1, self.spec.fan_in)
            if mask is not None and X.shape[0] == mask.size and not self.spec.transpose:
                X = X[mask.reshape(-1) != 0]
            for r in range(0, X.shape[0], CHUNK_ROWS):
                yield X[r:r + CHUNK_ROWS]
            return
        if t.ndim != len(self.spec.kernel) + 2:
            raise UserError(f"conv input {self.spec.tensor} has rank {t.ndim}, expected {len(self.spec.kernel) + 2}")
        if self.spec.kind == "convT":
            for i0 in range(0, t.shape[0], 1):
                yield im2col(*convtranspose_as_conv(t[i0:i0 + 1], self.spec))
            return
        rows_per_image = int(np.prod(conv_output_shape(self.spec, t.shape[2:])))
        step = max(1, CHUNK_ROWS // max(rows_per_image, 1))
        for i0 in range(0, t.shape[0], step):
            yield im2col(t[i0:i0 + step], self.spec)

    def centered(self, k: int) -> np.ndarray:
        """X^T X - N mu^T mu for group k (the Gram of the centered X)."""
        mu = self.sums[k] / max(self.rows, 1)
        return self.G[k] - self.rows * np.outer(mu, mu)


def capture_model(model: onnx.ModelProto, tensors: list[str], copy: bool = True) -> onnx.ModelProto:
    """A copy of ``model`` (``model`` itself if not ``copy``) whose graph also outputs ``tensors`` (those that are
    not graph inputs or outputs)."""
    m = model
    if copy:
        m = onnx.ModelProto()
        m.CopyFrom(model)
    have = {o.name for o in m.graph.output} | {i.name for i in m.graph.input}
    types = {}
    try:
        # a large model: infer on a skeleton without the big tensors' bytes (inference needs only their dims)
        inferred = onnx.shape_inference.infer_shapes(skeleton(model) if is_large(model) else model, data_prop=True)
        for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
            types[vi.name] = vi.type.tensor_type.elem_type
    except Exception:  # shape inference is best effort: ORT fills in the rest
        pass
    for t in tensors:
        if t in have:
            continue
        m.graph.output.append(onnx.helper.make_tensor_value_info(t, types.get(t, onnx.TensorProto.FLOAT), None))
        have.add(t)
    return m


def make_session(model: onnx.ModelProto, providers=None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    providers = providers or ["CPUExecutionProvider"]
    if is_large(model):  # too big for one protobuf message: load from a file with external data
        with model_path(model) as path:
            return ort.InferenceSession(path, so, providers=providers)
    return ort.InferenceSession(model.SerializeToString(), so, providers=providers)


def collect_stats(model: onnx.ModelProto, specs: dict, batches, progress=None,
                  mask_input: str | None = None, observers: dict | None = None) -> tuple[dict, int]:
    """Run every calibration batch once and return ({XSpec: GramStats}, number of samples).

    ``specs`` maps XSpec -> number of groups. ``batches`` yields feed dicts. ``progress`` is a tqdm-like object (or
    None) advanced by the batch size. ``mask_input``: the name of the attention-mask input whose zeros mark padded
    token positions to leave out of the statistics. ``observers``: tensor name -> activation range observer
    (``activations.py``), fed each batch's value of that tensor in the same pass. (The pipeline's pass is
    ``sequential.capture``, which also streams the cross statistics of sequential capture.)
    """
    from .sequential import capture  # (sequential.py imports this module)

    stats, samples = capture(model, None, specs, batches, progress, mask_input, observers=observers)
    return {spec: st.part().x for spec, st in stats.items()}, samples
