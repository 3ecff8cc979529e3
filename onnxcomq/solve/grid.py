"""Quantization grids (docs/design.md, "Grids").

A grid is, per output row i, the values ``level * scale_i`` for integer levels ``lo_i <= level <= hi_i``, with
``scale_i = lam * delta_i`` (delta from min-max or max-abs, lam the shrink factor). With lam = 1 (the official
default) this is exactly the official code's ``bit_code`` table, so float64 codes can be compared bit for bit.

In ONNX terms ``zero_point_i = -lo_i`` (asymmetric, unsigned codes ``level - lo_i`` in ``0 .. 2^b-1``) or ``0``
(symmetric, signed codes ``level`` in ``-2^(b-1) .. 2^(b-1)-1``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backend import array_module

SCHEMES = ("asym", "sym")
DEAD_ROW = 2.0 ** -100  # rows whose weights are all smaller (zero, denormal) are quantized to exact zeros
GRANULARITIES = ("channel", "tensor")


@dataclass
class Grid:
    """Per-row grid parameters; all arrays have shape (m,) and live in the solver's array module."""

    scale: object  # float, > 0 (lam * delta)
    lo: object  # float holding integers: lowest level
    hi: object  # float holding integers: highest level
    bits: int
    scheme: str
    granularity: str

    @property
    def levels(self) -> int:
        return 1 << self.bits

    def values(self, level, transposed: bool = False):
        """Grid values of integer levels (m, n) (or (n, m) if ``transposed``): level * scale per row."""
        return level * (self.scale[None, :] if transposed else self.scale[:, None])

    def nearest(self, t):
        """Nearest grid point of ``t`` per row; ties go to the lower level (the official ``torch.min`` rule).

        ``t`` is (m,) (one value per row) or (m, k). Returns ``(value, level)`` with ``level`` a float array of
        integers. The floor of t / scale is only a guess: the choice between its two neighbours compares the exact
        grid values, so a guess that is off near an integer still lands on the nearest point.
        """
        xp = array_module(t)
        scale, inv, lo, hi1 = self.scale, self._inv, self.lo, self._hi1
        if t.ndim == 2:
            scale, inv, lo, hi1 = scale[:, None], inv[:, None], lo[:, None], hi1[:, None]
        k = t * inv  # (in place where the numbers allow it: fewer arrays of t's size at a time)
        xp.floor(k, out=k)
        xp.clip(k, lo, hi1, out=k)
        a = k * scale
        b = k + 1
        b *= scale
        db = t - b
        xp.abs(db, out=db)
        da = t - a
        xp.abs(da, out=da)
        take_b = db < da
        del db, da
        value = xp.where(take_b, b, a)
        del a, b
        return value, xp.where(take_b, k + 1, k)

    def nearest_value(self, t):
        """The nearest grid value for one value per row (t of shape (m,)): the solver's inner step, in 6 vector ops.

        level = ceil(t / scale - 1/2) rounds ties down like ``nearest``; it differs from the exact comparison of
        ``nearest`` only where t is within rounding of a midpoint between two levels (equally good choices).
        """
        xp = array_module(t)
        k = t * self._inv
        k -= 0.5
        xp.ceil(k, out=k)
        xp.maximum(k, self.lo, out=k)
        xp.minimum(k, self.hi, out=k)
        k *= self.scale
        return k

    def levels_of(self, q, transposed: bool = False):
        """Integer levels of grid values q (m, n) or (n, m) (exact: q = level * scale with |level| <= 255)."""
        lv = q * (self._inv[None, :] if transposed else self._inv[:, None])
        return array_module(q).rint(lv, out=lv)

    def __post_init__(self):
        self.set_scale(self.scale)
        self._hi1 = self.hi - 1

    def set_scale(self, scale):
        """Replace the scales (after a scale update); keeps the cached reciprocal in step."""
        self.scale = scale
        self._inv = 1 / scale

    def zero_point(self):
        """ONNX zero point per row: -lo for asym (unsigned codes), 0 for sym (signed codes)."""
        xp = array_module(self.lo)
        return -self.lo if self.scheme == "asym" else xp.zeros_like(self.lo)

    def codes(self, level):
        """Integer codes stored in the model for float ``level`` (m, n)."""
        return level - self.lo[:, None] if self.scheme == "asym" else level


def make_grid(W, bits: int, scheme: str = "asym", granularity: str = "channel", lam: float = 1.0,
              zero_in_range: bool = True) -> Grid:
    """Initial grid from the weights W (m, n).

    asym/channel is the official min-max grid: delta_i = (max_i - min_i) / (2^b - 1), lo_i = round(min_i / delta_i).
    With ``zero_in_range`` the range is widened to contain 0 (what ONNX zero points need: then 0 <= -lo <= 2^b-1);
    the official code does not widen it. sym: delta_i = max_i |w| / (2^(b-1) - 1), levels -2^(b-1) .. 2^(b-1)-1.
    tensor granularity: one delta for the layer from the average over rows (the paper's average-infinity-norm
    initialization), broadcast to all rows. ``lam`` is a number or one value per row (see ``search_lambda``).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    if not bool(array_module(W).all(array_module(W).asarray(lam) > 0)):
        raise ValueError(f"lambda (grid shrink factor) must be > 0, got {lam}")
    xp = array_module(W)
    m = W.shape[0]
    nlev = 1 << bits
    if scheme == "asym":
        wmax = W.max(axis=1)
        wmin = W.min(axis=1)
        if zero_in_range:
            wmax = xp.maximum(wmax, 0)
            wmin = xp.minimum(wmin, 0)
        with np.errstate(over="ignore"):  # a row of huge weights: see _safe_step
            span = wmax - wmin
        absmax = xp.maximum(xp.abs(wmax), xp.abs(wmin))
        if granularity == "tensor":
            span = xp.full(m, span.mean(), dtype=W.dtype)
            absmax = xp.full(m, absmax.mean(), dtype=W.dtype)
            wmin = xp.full(m, wmin.mean(), dtype=W.dtype)
        # constant rows (span 0): a step that still puts the constant on the grid; all-zero rows: any step.
        delta = xp.where(span > 0, span, xp.where(absmax > 0, absmax, 1)) / (nlev - 1)
        delta = _safe_step(delta.astype(W.dtype), absmax, wmax.astype(xp.float64) - wmin, nlev - 1)
        lo = xp.round(wmin / delta)
        if zero_in_range:
            lo = xp.minimum(xp.maximum(lo, -(nlev - 1)), 0)
        hi = lo + (nlev - 1)
    else:
        qmax = (nlev >> 1) - 1
        absmax = xp.abs(W).max(axis=1)
        if granularity == "tensor":
            absmax = xp.full(m, absmax.mean(), dtype=W.dtype)
        delta = (xp.where(absmax > 0, absmax, 1) / qmax).astype(W.dtype)
        delta = _safe_step(delta, absmax, absmax.astype(xp.float64), qmax)
        lo = xp.full(m, -(nlev >> 1), dtype=W.dtype)
        hi = xp.full(m, qmax, dtype=W.dtype)
    return Grid(scale=(lam * delta).astype(W.dtype), lo=lo.astype(W.dtype), hi=hi.astype(W.dtype), bits=bits,
                scheme=scheme, granularity=granularity)


def _safe_step(delta, absmax, span64, steps: int):
    """The grid step of each row, made finite and usable: a dead row (every |w| < DEAD_ROW: zero or denormal
    weights, whose step would underflow and whose reciprocal is inf) gets step 1, so it is quantized to exact
    zeros with a harmless scale; a row of huge weights (~3e38, whose span overflows) gets its step from the span
    in float64, capped so that every grid value stays finite. Other rows keep their step bit for bit."""
    xp = array_module(delta)
    dead = absmax < DEAD_ROW
    wide = ~xp.isfinite(delta)
    if not bool((dead | wide).any()):
        return delta
    cap = float(np.finfo(delta.dtype).max) / (2 * steps + 2)
    big = xp.minimum(span64 / steps, cap).astype(delta.dtype)
    return xp.where(dead, xp.ones_like(delta), xp.where(wide, big, delta))


def search_lambda(W, G, bits: int, scheme: str, granularity: str, candidates, zero_in_range: bool = True,
                  top: int = 0):
    """Per row (one for the layer with tensor granularity), the shrink factor among ``candidates`` whose
    round-to-nearest grid has the lowest objective e^T G e: the grid is chosen by the objective, not by min-max.
    Costs one GEMM per candidate. G may also be (groups, n, n), one Gram per block of W's rows.
    ``top`` = k >= 1: the k best per row instead, as a (k, m) array, best first (ties: the earlier candidate)."""
    xp = array_module(W)
    errs = []
    for lam in candidates:
        grid = make_grid(W, bits, scheme, granularity, lam, zero_in_range)
        E = W - grid.nearest(W)[0]
        if G.ndim == 3:  # independent groups: W holds groups x m rows, G one Gram per group
            E = E.reshape(G.shape[0], -1, E.shape[1])
        EG = E @ G
        EG *= E
        errs.append(EG.sum(axis=-1).reshape(-1))
        del E, EG
    errs = xp.stack(errs)  # (candidates, m)
    if granularity == "tensor":
        errs = xp.broadcast_to(errs.sum(axis=1, keepdims=True), errs.shape)
    cands = xp.asarray(candidates, dtype=W.dtype)
    if top:
        rank = xp.argsort(errs, axis=0, kind="stable") if xp.__name__ == "numpy" else xp.argsort(errs, axis=0)
        return cands[rank[:min(top, len(candidates))]]
    return cands[xp.argmin(errs, axis=0)]
