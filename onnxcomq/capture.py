"""Stage 2: stream calibration batches through onnxruntime and accumulate each layer's Gram matrix G = X^T X.

One pass: the layers' input tensors are added as extra graph outputs, every batch is run once, and each captured
tensor is turned into X chunk by chunk (conv: im2col with the conv's own stride/pads/dilations, per group; MatMul and
Gemm: leading dims flattened) and folded into G in float32 GEMMs accumulated in float64. Only G (and the column sums
and row count) is kept: peak memory does not grow with the number of calibration samples.
"""

from __future__ import annotations

import math
import re
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


CHUNK_BYTES = 32 << 20  # bytes of X per chunk (a conv image too large for it is cut into bands of output rows)
_SCRATCH: dict = {}  # slot -> reused float32 buffer: fresh pages for every chunk cost more than the copies


def _scratch(slot, shape) -> np.ndarray:
    """A float32 array of ``shape`` over the reused buffer of ``slot`` (valid until the slot's next use)."""
    size = int(np.prod(shape))
    buf = _SCRATCH.get(slot)
    if buf is None or buf.size < size:
        buf = _SCRATCH[slot] = np.empty(size, np.float32)
    return buf[:size].reshape(shape)


def free_scratch() -> None:
    """Release the chunk buffers (at the end of a capture pass)."""
    _SCRATCH.clear()


def _openblas_threads():
    """(get, set) of the OpenBLAS thread count numpy uses, or None (another BLAS, or not found)."""
    import ctypes
    import glob
    import os

    try:
        libs = glob.glob(os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs", "*openblas*"))
        for path in libs:
            lib = ctypes.CDLL(path)
            for name in ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_",
                         "scipy_openblas_set_num_threads", "openblas_set_num_threads"):
                if hasattr(lib, name):
                    get = getattr(lib, name.replace("set_num", "get_num"), None)
                    return (get, getattr(lib, name)) if get is not None else None
    except OSError:
        pass
    return None


_BLAS = _openblas_threads()
SINGLE_THREAD_FAN_IN = 1024  # Gram GEMMs of a narrower X run on one BLAS thread


class blas_threads:
    """Context: BLAS on one thread while folding chunks of an X narrower than ``SINGLE_THREAD_FAN_IN`` columns.
    These GEMMs are skinny (n x n from thousands of rows): OpenBLAS's threads cost more than they gain there
    (measured: n = 144, 6272 rows: 51 ms on 2 threads, 4 ms on 1; n = 1152: 159 / 111 ms on a loaded 2-core
    machine)."""

    def __init__(self, fan_in: int):
        self.single = _BLAS is not None and fan_in < SINGLE_THREAD_FAN_IN
        self.before = None

    def __enter__(self):
        if self.single:
            self.before = int(_BLAS[0]())
            if self.before != 1:
                _BLAS[1](1)
        return self

    def __exit__(self, *exc):
        if self.single and self.before not in (None, 1):
            _BLAS[1](self.before)
        return False


def im2col_t(x: np.ndarray, spec: XSpec, band: tuple | None = None, slot=None) -> np.ndarray:
    """``im2col`` transposed, in the layout the Gram GEMMs want: float32 (groups, C/groups * prod(kernel), rows),
    C order. Row r of ``im2col(x, spec)[:, k]`` is column r of ``im2col_t(x, spec)[k]``.

    Built with one strided copy per kernel tap (no window view gathered element by element, no second transpose
    for the groups); a 1x1 stride-1 conv of one image is ``x[0].reshape(C, -1)`` itself, without a copy.
    ``band`` = (o0, o1): only output rows o0..o1-1 of the first spatial axis (their rows of X, in order).
    ``slot``: build into the reused scratch buffer of that slot (the result is then valid until its next use)."""
    nsp = x.ndim - 2
    n_img, c = x.shape[:2]
    g = spec.group
    x = x.astype(np.float32, copy=False)
    pads = conv_pads(spec, x.shape[2:])
    out = list(conv_output_shape(spec, x.shape[2:]))
    o0, o1 = band if band is not None else (0, out[0])
    out[0] = o1 - o0
    rows = n_img * int(np.prod(out))
    ones = all(k == 1 for k in spec.kernel)
    if ones and not any(pads) and all(s == 1 for s in spec.strides) and band is None:
        if n_img == 1:
            return x[0].reshape(g, c // g, rows)
        dst = np.empty((c, n_img, rows // n_img), np.float32) if slot is None else _scratch(slot, (c, n_img, rows // n_img))
        np.copyto(dst, x.reshape(n_img, c, -1).transpose(1, 0, 2))
        return dst.reshape(g, c // g, rows)
    # the input rows the band reads (padded coordinates), padded with zeros where they fall outside x
    eff0 = (spec.kernel[0] - 1) * spec.dilations[0] + 1
    lo, hi = o0 * spec.strides[0], (o1 - 1) * spec.strides[0] + eff0
    if any(pads):
        shape = (n_img, c, hi - lo) + tuple(x.shape[3 + i] + pads[1 + i] + pads[nsp + 1 + i] for i in range(nsp - 1))
        xp = np.zeros(shape, np.float32) if slot is None else _scratch((slot, "pad"), shape)
        if slot is not None:
            xp[...] = 0
        src0, src1 = max(lo - pads[0], 0), min(hi - pads[0], x.shape[2])
        if src1 > src0:
            dst = (slice(None), slice(None), slice(src0 + pads[0] - lo, src1 + pads[0] - lo)) + tuple(
                slice(pads[1 + i], pads[1 + i] + x.shape[3 + i]) for i in range(nsp - 1))
            xp[dst] = x[:, :, src0:src1]
        x = xp
    else:
        x = x[:, :, lo:hi]
    taps = list(np.ndindex(*spec.kernel))
    shape = (c, len(taps), n_img) + tuple(out)
    buf = np.empty(shape, np.float32) if slot is None else _scratch(slot, shape)
    perm = (1, 0) + tuple(range(2, 2 + nsp))
    for ti, tap in enumerate(taps):
        sl = tuple(slice(tap[i] * spec.dilations[i], tap[i] * spec.dilations[i] + (out[i] - 1) * spec.strides[i] + 1,
                         spec.strides[i]) for i in range(nsp))
        buf[:, ti] = x[(slice(None), slice(None)) + sl].transpose(perm)
    return buf.reshape(g, c // g * len(taps), rows)


RNN_KINDS = ("rnn_input", "rnn_hidden")


def spec_tensors(spec: XSpec) -> list:
    """The tensors X of ``spec`` is formed from: its tensor, and an rnn_hidden's initial_h."""
    return [spec.tensor] + ([spec.initial] if spec.kind == "rnn_hidden" and spec.initial else [])


def rnn_rows(spec: XSpec, vals: dict) -> np.ndarray:
    """X of a recurrent layer for one batch, (1 or directions, rows, n) float32 (``GramStats.chunks`` of an
    rnn_* XSpec reads this). rnn_input: the input sequence's (step, batch) rows (one array for every direction).
    rnn_hidden: per direction d the hidden state each step read, h_{t-1}: initial_h (zeros if absent) then
    Y[:-1, d] going forward; Y[1:, d] then initial_h at the last step going backwards (``spec.reverse[d]``)."""
    t = np.asarray(vals[spec.tensor])
    n = spec.fan_in
    if spec.kind == "rnn_input":
        if t.ndim != 3 or t.shape[-1] != n:
            raise UserError(f"recurrent input {spec.tensor} has shape {t.shape}, but its W expects "
                            f"[seq, batch, {n}]: the model's weight does not match its input")
        return t.reshape(1, -1, n).astype(np.float32, copy=False)
    nd = spec.group
    if t.ndim != 4:
        raise UserError(f"recurrent output {spec.tensor} has shape {t.shape}, expected rank 4")
    y = t  # [seq, num_directions, batch, hidden] (layout 0)
    if y.shape[1] != nd or y.shape[3] != n:
        raise UserError(f"recurrent output {spec.tensor} has shape {t.shape}, expected {nd} direction(s) of "
                        f"hidden size {n}")
    seq, batch = y.shape[0], y.shape[2]
    if spec.initial:
        h0 = np.asarray(vals[spec.initial])
        h0 = np.broadcast_to(h0, (nd, batch, n))
    else:
        h0 = np.zeros((nd, batch, n), np.float32)
    out = np.empty((nd, seq, batch, n), np.float32)
    for d in range(nd):
        if spec.reverse[d]:
            out[d, :-1] = y[1:, d]
            out[d, -1] = h0[d]
        else:
            out[d, 0] = h0[d]
            out[d, 1:] = y[:-1, d]
    return out.reshape(nd, -1, n)


@dataclass
class GramStats:
    """Streaming statistics of one X, per group: G = X^T X (groups, n, n), column sums (groups, n), row count.

    Chunks of X are handled transposed, ``Xt`` (groups, n, rows) float32 (``chunks``): G += Xt Xt^T is one
    product per group (a symmetric rank-k update, BLAS syrk, for one group), in float32 over at most ``CHUNK_ROWS``
    rows (and ``CHUNK_BYTES``) and accumulated in float64."""

    spec: XSpec
    groups: int
    G: np.ndarray = None
    sums: np.ndarray = None
    rows: int = 0

    def __post_init__(self):
        n = self.spec.fan_in
        self.G = np.zeros((self.groups, n, n), np.float64)
        self.sums = np.zeros((self.groups, n), np.float64)

    def _fold(self, Xt: np.ndarray):
        """Xt: one chunk (groups, n, rows), folded in float32 GEMMs and accumulated in float64."""
        Xt = Xt.astype(np.float32, copy=False)
        with np.errstate(over="ignore", invalid="ignore"):  # inputs beyond float32's range: api._check_stats
            if self.groups == 1:
                A = Xt[0]
                self.G[0] += np.dot(A, A.T)  # (np.dot runs A A^T as syrk, half the work; matmul does not)
            else:
                self.G += np.matmul(Xt, Xt.transpose(0, 2, 1))
        self.sums += Xt.sum(axis=-1)
        self.rows += Xt.shape[-1]

    def add(self, t: np.ndarray, mask: np.ndarray | None = None):
        """Fold one captured batch tensor into the statistics.

        ``mask`` (the batch's attention mask, (batch, seq)): for row-kind layers whose rows are the mask's token
        positions, the padded positions (mask 0) are left out of G.
        """
        with blas_threads(self.spec.fan_in):
            for Xt in self.chunks(t, mask):
                self._fold(Xt)

    def chunks(self, t: np.ndarray, mask: np.ndarray | None = None, slot=0):
        """X^T of one captured batch tensor, chunk by chunk (groups, n, rows) float32; the chunking depends on
        shapes only (so that two tensors of one shape give matching chunks). Each chunk is valid until the next
        one of the same ``slot`` (conv chunks are built in a reused buffer): two generators alive at once (X and
        X~ of cross statistics) need two slots."""
        if self.spec.kind in RNN_KINDS:  # t from rnn_rows: (1 or groups, rows, n)
            for r in range(0, t.shape[1], CHUNK_ROWS):
                c = t[:, r:r + CHUNK_ROWS].transpose(0, 2, 1).astype(np.float32, copy=False)
                yield c if c.shape[0] == self.groups else np.broadcast_to(c, (self.groups,) + c.shape[1:])
            return
        if self.spec.kind == "rows":
            if t.ndim == 0 or t.shape[0 if self.spec.transpose else -1] != self.spec.fan_in:
                raise UserError(f"tensor {self.spec.tensor} has shape {t.shape}, but the weight it is multiplied "
                                f"with expects {self.spec.fan_in} input features: the model's weight does not match "
                                "its input")
            X = t.T if self.spec.transpose else t
            X = X.reshape(-1, self.spec.fan_in)
            if mask is not None and X.shape[0] == mask.size and not self.spec.transpose:
                X = X[mask.reshape(-1) != 0]
            X = X.astype(np.float32, copy=False)
            for r in range(0, X.shape[0], CHUNK_ROWS):
                yield X[r:r + CHUNK_ROWS].T[None]
            return
        if t.ndim != len(self.spec.kernel) + 2:
            raise UserError(f"conv input {self.spec.tensor} has rank {t.ndim}, expected {len(self.spec.kernel) + 2}")
        channels = self.spec.fan_in // int(np.prod(self.spec.kernel)) * self.spec.group
        if t.shape[1] != channels:
            raise UserError(f"conv input {self.spec.tensor} has {t.shape[1]} channels, but its weight expects "
                            f"{channels}: the model's weight does not match its input")
        if self.spec.kind == "convT":
            for i0 in range(0, t.shape[0], 1):
                yield im2col_t(*convtranspose_as_conv(t[i0:i0 + 1], self.spec), slot=slot)
            return
        out = conv_output_shape(self.spec, t.shape[2:])
        rows_per_image = int(np.prod(out))
        row_bytes = 4 * self.spec.fan_in * self.groups
        limit = max(1, min(CHUNK_ROWS, CHUNK_BYTES // row_bytes))  # rows per chunk
        step = limit // max(rows_per_image, 1)
        if step >= 1:
            for i0 in range(0, t.shape[0], step):
                yield im2col_t(t[i0:i0 + step], self.spec, slot=slot)
            return
        # one image is more than a chunk: bands of output rows (of the first spatial axis), image by image
        band = max(1, limit // max(rows_per_image // out[0], 1))
        for i0 in range(t.shape[0]):
            for o0 in range(0, out[0], band):
                yield im2col_t(t[i0:i0 + 1], self.spec, (o0, min(o0 + band, out[0])), slot=slot)

    def centered(self, k: int) -> np.ndarray:
        """X^T X - N mu^T mu for group k (the Gram of the centered X), as one new array."""
        mu = self.sums[k] / max(self.rows, 1)
        out = np.outer(mu, mu)
        out *= -self.rows  # (the same numbers as G - N (mu^T mu), without a second n x n temporary)
        out += self.G[k]
        return out


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


def ort_message(e: Exception) -> str:
    """onnxruntime's error as one line, without its status-code preamble."""
    text = " ".join(str(e).split()).split("[ONNXRuntimeError] : ", 1)[-1]
    text = re.sub(r"^\d+ : [A-Z_]+ : ", "", text)
    return re.sub(r"^/\S+:\d+ .*?\) (?=[A-Z])", "", text)[:600]  # (the C++ source location and function)


def make_session(model: onnx.ModelProto, providers=None, what: str = "the model",
                 mem_pattern: bool = True) -> ort.InferenceSession:
    """An onnxruntime CPU session (MatMulNBits exact); a model onnxruntime refuses is a one-line UserError.

    ``mem_pattern=False`` (capture): no memory pattern. With one, the second run of a shape allocates one block
    for the whole planned pattern beside the arena chunks of the first run, which the capture model's many
    outputs make large: peak RSS then grew from one calibration batch to two by the size of a batch's activations
    (EfficientNet-Lite0, batch 32: +0.9 GB), at no measurable speed gain."""
    so = ort.SessionOptions()
    so.enable_mem_pattern = mem_pattern
    so.log_severity_level = 4  # (failures become one-line errors: onnxruntime need not print them too)
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    providers = providers or ["CPUExecutionProvider"]
    try:
        if is_large(model):  # too big for one protobuf message: load from a file with external data
            with model_path(model) as path:
                return ort.InferenceSession(path, so, providers=providers)
        return ort.InferenceSession(model.SerializeToString(), so, providers=providers)
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as e:  # onnxruntime's Fail / InvalidGraph / InvalidArgument / NotImplemented ...
        raise UserError(f"onnxruntime cannot load {what}: {ort_message(e)}") from None


def run_session(sess: ort.InferenceSession, fetch: list | None, feed: dict, first_sample: int = 0,
                what: str = "") -> list:
    """``sess.run(fetch, feed)``; an onnxruntime failure is a one-line UserError naming the batch (or saying
    ``what``) and, where onnxruntime names it, the node (token ids out of an embedding's range are said so)."""
    try:
        return sess.run(fetch, feed)
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as e:
        msg = ort_message(e)
        hint = ""
        if "out of data bounds" in msg or "out of bounds" in msg:
            ints = [f"{k} (values {int(v.min())}..{int(v.max())})" for k, v in feed.items()
                    if np.size(v) and np.issubdtype(np.asarray(v).dtype, np.integer)]
            hint = ("; an index (token id) is out of range for a Gather: check the calibration input" +
                    (f" {', '.join(ints)}" if ints else "") + " against the model's vocabulary / table size")
        what = what or f"onnxruntime failed on the calibration batch starting at sample {first_sample}"
        raise UserError(f"{what}: {msg}{hint}") from None


# ------------------------------------------------------------------------------------ memory budget (batch size)

CAPTURE_OVERHEAD = 2.5  # capture's memory per byte of captured tensors (the outputs, onnxruntime's own activations)
DEFAULT_MEMORY_FRACTION = 0.25  # --max-memory default: this share of the machine's RAM
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_bytes(text, what: str = "max memory") -> int:
    """'4G', '512M', '1.5g', '800k', '4GB', '4GiB' or a byte count -> bytes; anything else is a UserError."""
    if isinstance(text, (int, np.integer)) and not isinstance(text, bool):
        value = int(text)
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", str(text))
        if m is None:
            raise UserError(f"{what} must be a size such as 4G, 512M or a number of bytes, got {text!r}")
        value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value < (1 << 20):
        raise UserError(f"{what} must be at least 1M, got {text!r}")
    return value


def default_max_memory() -> int:
    """The default budget: ``DEFAULT_MEMORY_FRACTION`` of the machine's physical RAM (8 GiB if unknown)."""
    import os

    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 32 << 30
    return int(total * DEFAULT_MEMORY_FRACTION)


def current_rss() -> int:
    """This process's resident memory now, in bytes (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            import os
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def sample_bytes(model: onnx.ModelProto, tensors: list, feed: dict) -> int | None:
    """Bytes of ``tensors`` (the captured layer inputs) for the one-sample ``feed``, from ONNX shape inference
    with the graph inputs set to the feed's shapes; None when a shape stays unknown."""
    m = skeleton(model)  # (a copy without the bytes of the large tensors: inference needs only their dims)
    for i in m.graph.input:
        if i.name in feed:
            dims = i.type.tensor_type.shape.dim
            shape = np.shape(feed[i.name])
            if len(dims) == len(shape):
                for d, v in zip(dims, shape):
                    d.Clear()
                    d.dim_value = int(v)
    try:
        inferred = onnx.shape_inference.infer_shapes(m, data_prop=True)
    except Exception:  # best effort: the caller falls back to a measured run
        return None
    known = {vi.name: vi for vi in list(inferred.graph.value_info) + list(inferred.graph.output)
             + list(inferred.graph.input)}
    total = 0
    for t in tensors:
        vi = known.get(t)
        if vi is None or not vi.type.tensor_type.HasField("shape"):
            return None
        dims = vi.type.tensor_type.shape.dim
        if any(not d.HasField("dim_value") or d.dim_value <= 0 for d in dims):
            return None
        size = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type).itemsize \
            if vi.type.tensor_type.elem_type else 4
        total += size * int(np.prod([d.dim_value for d in dims]))
    return total


def measured_sample_bytes(model: onnx.ModelProto, tensors: list, feed: dict) -> int:
    """Bytes of ``tensors`` for the one-sample ``feed``, from one onnxruntime run of the capture model."""
    inputs = {i.name for i in model.graph.input}
    fetch = [t for t in tensors if t not in inputs]
    total = sum(np.asarray(feed[t]).nbytes for t in tensors if t in inputs and t in feed)
    if fetch:
        sess = make_session(capture_model(model, fetch), mem_pattern=False)
        total += sum(np.asarray(v).nbytes for v in run_session(sess, fetch, feed))
    return total


def stats_bytes(specs: dict, cross: bool = False) -> int:
    """Memory of the streamed statistics: G (and H, G~ with cross statistics) per group, float64."""
    return sum(8 * g * spec.fan_in * spec.fan_in * (3 if cross else 1) for spec, g in specs.items())


def batch_for_budget(per_sample: int, budget: int, fixed: int, requested: int) -> int:
    """The largest batch <= ``requested`` whose capture (``CAPTURE_OVERHEAD`` x ``per_sample`` bytes a sample,
    plus the chunk buffers) fits ``budget`` beside ``fixed`` bytes (the process so far and the statistics); at
    least 1."""
    room = budget - fixed - 4 * CHUNK_BYTES
    per = max(CAPTURE_OVERHEAD * per_sample, 1)
    return int(max(1, min(requested, room // per)))


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
