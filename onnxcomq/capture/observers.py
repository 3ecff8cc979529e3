"""Activation calibration: streaming per-tensor range observers and the quantization parameters they give.

Observers are fed every calibration batch of one tensor by ``capture.collect_stats`` (the same onnxruntime pass that
builds the layers' Gram matrices) and keep O(1) memory: a running min/max, or an exact histogram on a grid anchored at
0 whose bin width doubles (pairs of bins merged, no re-binning error) when a batch falls outside its range.

- ``minmax``: the observed min and max.
- ``percentile``: the ``p`` and ``100 - p`` percentiles of the values (from the histogram, within one bin width).
- ``mse``: the clipping range, among shrunk min/max candidates, whose quantize-dequantize mean squared error over the
  histogram (bin centres weighted by counts) is lowest.

``qparams`` turns a range into (scale, zero point) for int8/uint8, symmetric (zero point 0, or 128 for uint8) or
asymmetric (the range always contains 0, so 0 is exact and a Relu folds into the saturation of uint8).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import UserError

METHODS = ("minmax", "percentile", "mse")
MAX_BINS = 2048  # histogram bins before the width doubles
SHRINK = np.linspace(1.0, 0.05, 40)  # candidate clip factors of the mse method


@dataclass(frozen=True)
class ActFormat:
    """How activations are stored: bits, signed (int8) or not (uint8), symmetric or not."""

    bits: int = 8
    signed: bool = False
    symmetric: bool = False

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    @property
    def dtype(self):
        return np.int8 if self.signed else np.uint8


def half_up(scale):
    """The smallest float16 number >= ``scale`` (at least the smallest subnormal, 2^-24; at most float16's max),
    elementwise: a float16 scale that still covers the range (Q and DQ use the same stored scale, so its own
    rounding costs nothing). A float for a float, a float64 array for an array."""
    s = np.clip(np.asarray(scale, np.float64), 2.0 ** -24, 65504.0)
    h = s.astype(np.float16)
    h = np.where(h.astype(np.float64) < s, np.nextafter(h, np.float16(np.inf)), h).astype(np.float64)
    return float(h) if h.ndim == 0 else h


def qparams(lo: float, hi: float, fmt: ActFormat, float16: bool = False) -> tuple[np.float32, int]:
    """(scale, zero point) of the range [lo, hi] (widened to contain 0). ``float16``: the scale is a float16
    number (rounded up, the zero point fitted to it) for a float16 tensor's QuantizeLinear."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if fmt.symmetric:
        amax = max(-lo, hi)
        if fmt.signed:
            scale, zp = amax / fmt.qmax, 0
        else:  # uint8 symmetric: zero point 128, [-128, 127] levels around it
            scale, zp = amax / ((fmt.qmax - fmt.qmin) / 2), (fmt.qmax + fmt.qmin + 1) // 2
        if float16 and scale > 0 and np.isfinite(scale):
            scale = half_up(scale)
    else:
        scale = (hi - lo) / (fmt.qmax - fmt.qmin)
        if float16 and scale > 0 and np.isfinite(scale):
            scale = half_up(scale)
        zp = int(np.clip(round(fmt.qmin - lo / scale), fmt.qmin, fmt.qmax)) if scale > 0 else 0
    if not scale > 0 or not np.isfinite(scale):
        scale = 1.0  # an all-zero tensor: any scale represents it
        zp = (fmt.qmax + fmt.qmin + 1) // 2 if fmt.symmetric and not fmt.signed else max(fmt.qmin, 0)
    return np.float32(scale), int(zp)


def fake_quant(x: np.ndarray, scale, zp, fmt: ActFormat) -> np.ndarray:
    """QuantizeLinear then DequantizeLinear as onnxruntime computes them (round half to even, saturate)."""
    s = np.float32(scale)
    q = np.clip(np.rint(np.asarray(x, np.float32) / s) + zp, fmt.qmin, fmt.qmax)
    return ((q - zp) * s).astype(np.float32)


class MinMaxObserver:
    def __init__(self):
        self.lo, self.hi, self.count = np.inf, -np.inf, 0

    def update(self, x: np.ndarray):
        x = np.asarray(x)
        if x.size == 0:
            return
        if not np.issubdtype(x.dtype, np.floating):
            raise UserError(f"activation observer got a {x.dtype} tensor; only float tensors are quantized")
        fin = x[np.isfinite(x)] if not np.isfinite(x).all() else x
        if fin.size:
            self.lo = min(self.lo, float(fin.min()))
            self.hi = max(self.hi, float(fin.max()))
        self.count += x.size

    def range(self, fmt: ActFormat) -> tuple[float, float]:
        if self.count == 0 or self.lo > self.hi:
            return 0.0, 0.0
        return self.lo, self.hi


class HistogramObserver(MinMaxObserver):
    """Exact streaming histogram: bins [k w, (k+1) w) for integers k in [k0, k0 + len(counts)); w a power of two
    times the first batch's span / MAX_BINS, doubled (bins merged pairwise) whenever the span needs more bins."""

    def __init__(self, method: str = "percentile", percentile: float = 99.99):
        super().__init__()
        self.method = method
        self.percentile = percentile
        self.width = None
        self.k0 = 0
        self.counts = np.zeros(0, np.int64)

    def update(self, x: np.ndarray):
        super().update(x)
        x = np.asarray(x, np.float64).ravel()
        x = x[np.isfinite(x)]
        if x.size == 0:
            return
        lo, hi = float(x.min()), float(x.max())
        if self.width is None:
            span = max(hi - lo, abs(hi), abs(lo), 1e-30)
            self.width = 2.0 ** np.ceil(np.log2(span / (MAX_BINS // 2)))
        while True:
            k_lo = min(int(np.floor(lo / self.width)), self.k0 if self.counts.size else int(np.floor(lo / self.width)))
            k_hi = max(int(np.floor(hi / self.width)),
                       self.k0 + self.counts.size - 1 if self.counts.size else int(np.floor(hi / self.width)))
            if k_hi - k_lo + 1 <= MAX_BINS:
                break
            self._merge()
        if self.counts.size == 0:
            self.k0 = k_lo
        if k_lo < self.k0 or k_hi >= self.k0 + self.counts.size:
            new = np.zeros(k_hi - k_lo + 1, np.int64)
            if self.counts.size:
                new[self.k0 - k_lo:self.k0 - k_lo + self.counts.size] = self.counts
            self.counts, self.k0 = new, k_lo
        k = np.floor(x / self.width).astype(np.int64) - self.k0
        np.clip(k, 0, self.counts.size - 1, out=k)  # floor rounding at the very edge
        self.counts += np.bincount(k, minlength=self.counts.size)

    def _merge(self):
        """Double the bin width: bin k of the new grid holds old bins 2k and 2k + 1 (exact)."""
        k = np.arange(self.k0, self.k0 + self.counts.size)
        nk = np.floor_divide(k, 2)
        k0 = int(nk[0])
        self.counts = np.bincount(nk - k0, weights=self.counts, minlength=int(nk[-1]) - k0 + 1).astype(np.int64)
        self.k0 = k0
        self.width *= 2

    def noise(self, fmt: ActFormat) -> float:
        """Quantization noise to signal: E[(x - fq(x))^2] / E[x^2] with this observer's range, over the histogram
        (bin centres, clipped to the observed min/max)."""
        if self.count == 0 or self.counts.size == 0:
            return 0.0
        e = self.edges()
        c = np.clip(0.5 * (e[:-1] + e[1:]), self.lo, self.hi)
        w = self.counts.astype(np.float64)
        power = float(np.sum(w * c * c) / max(w.sum(), 1))
        return quant_mse(c, w, *self.range(fmt), fmt) / power if power > 0 else 0.0

    def edges(self) -> np.ndarray:
        return (self.k0 + np.arange(self.counts.size + 1)) * self.width

    def quantile(self, q: float) -> float:
        """The q-quantile (0..1) by linear interpolation inside the bin that holds it."""
        cum = np.cumsum(self.counts)
        total = cum[-1]
        target = q * total
        i = int(np.searchsorted(cum, target, side="left"))
        i = min(i, self.counts.size - 1)
        before = cum[i - 1] if i else 0
        frac = (target - before) / self.counts[i] if self.counts[i] else 0.0
        e = self.edges()
        return float(np.clip(e[i] + frac * self.width, self.lo, self.hi))

    def range(self, fmt: ActFormat) -> tuple[float, float]:
        if self.count == 0 or self.counts.size == 0:
            return 0.0, 0.0
        if self.method == "percentile":
            p = self.percentile / 100.0
            return min(self.quantile(1 - p), 0.0) if self.lo < 0 else self.lo, self.quantile(p)
        if self.method == "mse":
            return mse_range(self.edges(), self.counts, self.lo, self.hi, fmt)
        return self.lo, self.hi


def candidate_ranges(lo: float, hi: float, fmt: ActFormat) -> list[tuple[float, float]]:
    """Clip ranges the mse method chooses among: the min/max range shrunk by SHRINK (both ends independently when
    asymmetric and both signs occur)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if fmt.symmetric:
        amax = max(-lo, hi)
        return [(-amax * a, amax * a) for a in SHRINK]
    los = SHRINK if lo < 0 else [1.0]
    his = SHRINK if hi > 0 else [1.0]
    return [(lo * a, hi * b) for a in los for b in his]


def quant_mse(values: np.ndarray, weights: np.ndarray, lo: float, hi: float, fmt: ActFormat) -> float:
    """Weighted mean squared error of fake-quantizing ``values`` with the range [lo, hi]."""
    s, zp = qparams(lo, hi, fmt)
    err = values - fake_quant(values, s, zp, fmt).astype(np.float64)
    return float(np.sum(weights * err * err) / max(np.sum(weights), 1))


def mse_range(edges, counts, lo, hi, fmt: ActFormat) -> tuple[float, float]:
    centres = np.clip(0.5 * (edges[:-1] + edges[1:]), lo, hi)
    keep = counts > 0
    c, w = centres[keep], counts[keep].astype(np.float64)
    cands = candidate_ranges(lo, hi, fmt)
    errs = []
    for i in range(0, len(cands), 200):  # (candidates, bins) at a time, as quant_mse computes each
        sz = np.array([qparams(a, b, fmt) for a, b in cands[i:i + 200]], np.float64)
        s, z = sz[:, :1].astype(np.float32), sz[:, 1:]
        q = np.clip(np.rint(c.astype(np.float32)[None] / s) + z, fmt.qmin, fmt.qmax)
        err = c[None] - ((q - z) * s).astype(np.float32).astype(np.float64)
        errs.append((err * err) @ w / max(w.sum(), 1))
    return cands[int(np.argmin(np.concatenate(errs)))]


def make_observer(method: str, percentile: float = 99.99):
    if method in METHODS:  # minmax too: the histogram also tells how well a range represents the tensor
        return HistogramObserver(method, percentile)
    raise UserError(f"act_method must be one of {', '.join(METHODS)}, got {method!r}")
