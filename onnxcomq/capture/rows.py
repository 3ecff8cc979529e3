"""Rows of a layer input X from captured tensors: im2col for convolutions (per group), flattened leading dims
for MatMul/Gemm, hidden-state rows for recurrent layers; the BLAS thread count for the small GEMMs.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..errors import UserError
from ..graph.layers import XSpec


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
