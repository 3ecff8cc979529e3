"""Streaming statistics of one layer input: G = X^T X (float64 accumulation of float32 GEMMs), column sums and
row count; with sequential capture also H = X~^T X and G~ = X~^T X~, and held-out folds. See docs/design.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import UserError
from ..graph.layers import XSpec
from .rows import RNN_KINDS, blas_threads, conv_output_shape, convtranspose_as_conv, im2col_t

CHUNK_ROWS = 8192  # rows of X per GEMM: large enough to keep the GEMMs efficient, small enough for the cache
CHUNK_BYTES = 32 << 20  # bytes of X per chunk (a conv image too large for it is cut into bands of output rows)


def to_host(a):
    """A numpy array of ``a``: itself, or a device array's host copy (CuPy's ``get``; capture knows no more of
    the device than that, and solve/backend.py the rest)."""
    return a if isinstance(a, np.ndarray) else a.get()


def row_mask(mask: np.ndarray | None, rows: int) -> np.ndarray | None:
    """Which of a (batch, seq, features) tensor's ``rows`` = batch x seq token rows are real tokens (bool), from
    the attention mask (batch, total); None when the rows are not the mask's positions. With a key/value cache the
    mask also covers the past positions (total = past + seq): the current tokens are its last ``seq`` columns."""
    if mask is None:
        return None
    mask = np.asarray(mask)
    if mask.size == rows:
        return mask.reshape(-1) != 0
    if mask.ndim == 2 and mask.shape[0] and rows % mask.shape[0] == 0 and 0 < rows // mask.shape[0] < mask.shape[1]:
        return mask[:, -(rows // mask.shape[0]):].reshape(-1) != 0
    return None


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
    xp: object = None  # the array module of G and sums (None: numpy); a device module forms the Grams on the GPU

    def __post_init__(self):
        n = self.spec.fan_in
        xp = self.xp or np
        self.G = xp.zeros((self.groups, n, n), np.float64)
        self.sums = xp.zeros((self.groups, n), np.float64)

    def _fold(self, Xt: np.ndarray):
        """Xt: one chunk (groups, n, rows), folded in float32 GEMMs and accumulated in float64."""
        xp = self.xp or np
        Xt = xp.asarray(Xt).astype(np.float32, copy=False)  # (a host chunk, e.g. im2col's, goes to the device)
        with np.errstate(over="ignore", invalid="ignore"):  # inputs beyond float32's range: check_stats
            if self.groups == 1:
                A = Xt[0]
                self.G[0] += xp.dot(A, A.T)  # (np.dot runs A A^T as syrk, half the work; matmul does not)
            else:
                self.G += xp.matmul(Xt, Xt.transpose(0, 2, 1))
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
        if self.spec.kind != "rows":
            t = to_host(t)  # (im2col and the recurrent rows are built on the host)
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
            keep = row_mask(mask, X.shape[0]) if not self.spec.transpose else None
            if keep is not None:
                X = X[keep]
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


@dataclass
class _Part:
    """The statistics of one fold: X's (GramStats) and, for cross statistics, H = X~^T X, G~ and X~'s column sums."""

    x: GramStats
    H: np.ndarray = None
    Gt: np.ndarray = None
    sums_t: np.ndarray = None

    def fold(self, X, Xt=None):
        """Fold one chunk of X (and X~), transposed: (groups, n, rows) float32 (``GramStats.chunks``); float32
        GEMMs accumulated in float64, like GramStats."""
        self.x._fold(X)
        if Xt is not None:
            xp = self.x.xp or np
            A, B = (xp.asarray(a).astype(np.float32, copy=False) for a in (X, Xt))
            self.H += xp.matmul(B, A.transpose(0, 2, 1))
            self.Gt += xp.matmul(B, B.transpose(0, 2, 1))
            self.sums_t += B.sum(axis=-1)

    def to_host(self):
        """The statistics as numpy arrays (after a capture whose Grams were formed on a device)."""
        self.x.G, self.x.sums, self.x.xp = to_host(self.x.G), to_host(self.x.sums), None
        if self.H is not None:
            self.H, self.Gt, self.sums_t = to_host(self.H), to_host(self.Gt), to_host(self.sums_t)


class LayerStats:
    """Streaming statistics of one layer input (an XSpec): G, and with ``cross`` also H and G~; kept in two folds
    when ``fold_below`` > 0 and the rows expected from the first batch (times ``total_samples``) are fewer."""

    def __init__(self, spec, groups: int, cross: bool = False, fold_below: float = 0.0, total_samples: int = 0,
                 xp=None):
        self.spec, self.groups, self.cross = spec, groups, cross
        self.fold_below, self.total_samples = fold_below, total_samples
        self.parts = None
        self.xp = None if xp is np else xp  # where the Grams are formed (``GramStats.xp``; None: numpy); ``to_host`` when capture ends

    def to_host(self):
        for p in self.parts or []:
            p.to_host()
        self.xp = None  # (a module does not pickle: the statistics go to worker processes)

    def _new_part(self) -> _Part:
        p = _Part(GramStats(self.spec, self.groups, xp=self.xp))
        if self.cross:
            p.H, p.Gt, p.sums_t = ((self.xp or np).zeros_like(a) for a in (p.x.G, p.x.G, p.x.sums))
        return p

    def _expected_rows(self, t, mask, samples: int) -> float:
        if self.spec.kind in RNN_KINDS:
            rows = t.shape[1]
        elif self.spec.kind == "rows":
            rows = t.size // self.spec.fan_in
            keep = row_mask(mask, rows) if not self.spec.transpose else None
            if keep is not None:
                rows = int(keep.sum())
        else:
            rows = t.shape[0] * int(np.prod(conv_output_shape(self.spec, t.shape[2:])))
        return rows / max(samples, 1) * max(self.total_samples, samples)

    @property
    def folded(self) -> bool:
        return self.parts is not None and len(self.parts) == 2

    def add(self, t: np.ndarray, mask: np.ndarray | None = None, tq: np.ndarray | None = None, samples: int = 1):
        """Fold one batch: ``t`` the float model's tensor, ``tq`` the partly quantized model's (cross only)."""
        if self.parts is None:
            few = self.fold_below > 0 and self._expected_rows(t, mask, samples) < self.fold_below
            self.parts = [self._new_part() for _ in range(2 if few else 1)]
        if not self.folded:
            self._fold_all(self.parts[0], t, mask, tq)
            return
        ax = 1 if (self.spec.kind == "rows" and self.spec.transpose) or self.spec.kind in RNN_KINDS else 0
        if t.shape[ax] >= 2:  # alternate samples go to the two folds
            for f, part in enumerate(self.parts):
                sl = (slice(None),) * ax + (slice(f, None, 2),)
                m = mask[f::2] if mask is not None and ax == 0 else None
                self._fold_all(part, t[sl], m, None if tq is None else tq[sl])
            return
        with blas_threads(self.spec.fan_in):
            for X, Xt in self._pairs(t, mask, tq):  # one sample: alternate rows
                for f, part in enumerate(self.parts):
                    part.fold(X[..., f::2], None if Xt is None else Xt[..., f::2])

    def _pairs(self, t, mask, tq):
        xs = self.parts[0].x.chunks(t, mask)
        if tq is None:
            return ((X, None) for X in xs)
        return zip(xs, self.parts[0].x.chunks(tq, mask, slot=1))

    def _fold_all(self, part, t, mask, tq):
        with blas_threads(self.spec.fan_in):
            for X, Xt in self._pairs(t, mask, tq):
                part.fold(X, Xt)

    def part(self, fold: int | None = None) -> _Part:
        """Fold 0 or 1, or (None) all rows (for two folds: a new merged part, not kept; ``stats`` and ``means``
        merge one group at a time instead, so that no full copy of the statistics outlives the call)."""
        if fold is not None:
            return self.parts[fold]
        if len(self.parts) == 1:
            return self.parts[0]
        a, b = self.parts
        s = _Part(GramStats.__new__(GramStats))
        s.x.spec, s.x.groups = self.spec, self.groups
        s.x.G, s.x.sums, s.x.rows = a.x.G + b.x.G, a.x.sums + b.x.sums, a.x.rows + b.x.rows
        if self.cross:
            s.H, s.Gt, s.sums_t = a.H + b.H, a.Gt + b.Gt, a.sums_t + b.sums_t
        return s

    def _group(self, k: int, fold: int | None):
        """(N, G, sums, H, G~, sums~) of group k over ``fold`` (None: both folds; H.. None without cross)."""
        ps = self.parts if fold is None else [self.parts[fold]]
        N = sum(p.x.rows for p in ps)

        def total(get):
            if len(ps) == 1:
                return get(ps[0])
            return get(ps[0]) + get(ps[1])

        G, sums = total(lambda p: p.x.G[k]), total(lambda p: p.x.sums[k])
        if not self.cross:
            return N, G, sums, None, None, None
        return N, G, sums, total(lambda p: p.H[k]), total(lambda p: p.Gt[k]), total(lambda p: p.sums_t[k])

    @property
    def rows(self) -> int:
        return sum(p.x.rows for p in self.parts)

    def stats(self, k: int, centered: bool = False, fold: int | None = None):
        """(G, H, G~) of group k (float64); H and G~ are None without cross statistics. ``centered``: the statistics
        of the centered X and X~ (free bias): G - N mu^T mu, H - N mu~^T mu, G~ - N mu~^T mu~. Uncentered ones of
        a single fold are views of the running sums (callers copy before changing them)."""
        N, G, sums, H, Gt, sums_t = self._group(k, fold)
        if centered:
            mu = sums / max(N, 1)
            G = _minus_outer(G, N, mu, mu)
        if not self.cross:
            return G, None, None
        if not centered:
            return G, H, Gt
        mut = sums_t / max(N, 1)
        return G, _minus_outer(H, N, mut, mu), _minus_outer(Gt, N, mut, mut)

    def means(self, k: int, fold: int | None = None):
        """(mu, mu~): the mean rows of X and X~ (mu~ = mu without cross statistics)."""
        N, _, sums, _, _, sums_t = self._group(k, fold)
        N = max(N, 1)
        mu = sums / N
        return mu, (sums_t / N if self.cross else mu)


def _minus_outer(A: np.ndarray, N: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """A - N u^T v as one new array (the same numbers as ``A - N * np.outer(u, v)``, one n x n temporary less)."""
    out = np.outer(u, v)
    out *= -N
    out += A
    return out


def check_stats(stats: dict, inputs: list) -> None:
    """Input statistics beyond float32's range (calibration data that drives a layer input to |x|^2 > 3.4e38)."""
    limit = float(np.finfo(np.float32).max)
    if stats and all(getattr(st, "parts", True) is None or st.rows == 0 for st in stats.values()):
        raise UserError(f"no calibration row reached any quantized layer (is every position of an attention mask "
                        f"0?): check the calibration input(s) {inputs}")
    for spec, st in stats.items():
        for part in getattr(st, "parts", None) or []:
            mats = [part.x.G] + [a for a in (part.H, part.Gt) if a is not None]
            if all(bool(np.isfinite(a).all()) and float(np.abs(a).max(initial=0.0)) < limit for a in mats):
                continue
            raise UserError(f"the calibration data drives tensor {spec.tensor} (the input of a quantized layer) "
                            f"beyond float32's range (its squares overflow): check the scale of the calibration "
                            f"input(s) {inputs}")
