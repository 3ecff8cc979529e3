"""Block-wise weight grids: one scale (and zero point) per (output row, block of B consecutive input columns).

Row i of W (m, n) is split into blocks b = [b*B, min((b+1)*B, n)) (the last one shorter when B does not divide n,
as ONNX DequantizeLinear's block_size allows). Each block has its own grid level * scale_ib, lo_ib <= level <=
hi_ib, built like the per-channel grid (grid.make_grid) on the block's weights.

COMQ on this grid (same objective sum_i e_i^T G e_i):
- coordinate update: unchanged, t_ij = q_ij + R_ij / G_jj moved to the nearest point of *its block's* grid. The lazy
  blocks of the step loop are cut at the quantization blocks, so every lazy block uses one grid (solver._step_block).
- scale update with the levels fixed: q_i = sum_b s_ib c_ib (c_ib: row i's levels restricted to block b), so the
  objective of row i is quadratic in s_i: s^T A s - 2 r^T s + w^T G w with A_bc = c_b^T G c_c and r_b = c_b^T G w.
  The minimizer solves A s = r (a small nb x nb system per row). A row keeps its old scales where the solution is not
  finite, has a scale <= 0 (ONNX scales must be positive), or is not better: the objective never increases.
- lambda search: per (row, block), the shrink factor whose round-to-nearest error on the block's own diagonal sub-Gram
  G[b, b] is lowest (the cross-block terms are left out: a per-block choice stays one GEMM per candidate).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .backend import array_module as _xp
from .backend import to_numpy
from .comq import QuantResult, SolverConfig, _objective_from_R, _prepare, _step_block, _swept, objective
from .grid import Grid, make_grid, search_lambda

LAZY_MAX = 256  # at most this many steps per lazy block (a quantization block larger than this is cut further)


def block_bounds(n: int, block: int) -> list:
    """[(start, end)] of the blocks of ``n`` columns, the last one shorter if ``block`` does not divide ``n``."""
    return [(s, min(s + block, n)) for s in range(0, n, block)]


@dataclass
class BlockGrid:
    """Per-(row, block) grid parameters: scale, lo, hi are (m, nb) arrays in the solver's array module."""

    scale: object
    lo: object
    hi: object
    bits: int
    scheme: str
    block: int
    n: int

    def expand(self, a):
        """(m, nb) -> (m, n): each block's value repeated over its columns."""
        xp = _xp(a)
        return xp.repeat(a, self.block, axis=1)[:, :self.n]

    def grid(self, b: int) -> Grid:
        """The per-row grid of block ``b`` (a view of this grid's column b)."""
        return Grid(scale=self.scale[:, b].copy(), lo=self.lo[:, b].copy(), hi=self.hi[:, b].copy(), bits=self.bits,
                    scheme=self.scheme, granularity="channel")

    def nearest(self, W):
        """Nearest grid value and level of every entry of W (m, n), block by block (ties to the lower level)."""
        xp = _xp(W)
        Q, level = xp.empty_like(W), xp.empty_like(W)
        for b, (s, e) in enumerate(block_bounds(self.n, self.block)):
            Q[:, s:e], level[:, s:e] = self.grid(b).nearest(W[:, s:e])
        return Q, level

    def values(self, level):
        return level * self.expand(self.scale)

    def codes(self, level):
        return level - self.expand(self.lo) if self.scheme == "asym" else level

    def zero_point(self):
        return -self.lo if self.scheme == "asym" else _xp(self.lo).zeros_like(self.lo)


def make_block_grid(W, G, cfg: SolverConfig) -> BlockGrid:
    """The initial block grid of W (m, n): per (row, block) min-max (or max-abs) with the shrink factor ``cfg.lam``
    or, with ``cfg.lambda_search``, the best of ``cfg.lambda_grid`` on the block's diagonal sub-Gram."""
    xp = _xp(W)
    m, n = W.shape
    parts = []
    for s, e in block_bounds(n, cfg.block_size):
        lam = cfg.lam
        if cfg.lambda_search:
            lam = search_lambda(W[:, s:e], G[s:e, s:e], cfg.bits, cfg.scheme, "channel", cfg.lambda_grid,
                                cfg.zero_in_range)
        parts.append(make_grid(W[:, s:e], cfg.bits, cfg.scheme, "channel", lam, cfg.zero_in_range))
    return BlockGrid(scale=xp.stack([p.scale for p in parts], axis=1), lo=xp.stack([p.lo for p in parts], axis=1),
                     hi=xp.stack([p.hi for p in parts], axis=1), bits=cfg.bits, scheme=cfg.scheme,
                     block=cfg.block_size, n=n)


def block_scale_system(W, level, G, block: int):
    """A (m, nb, nb) and r (m, nb) of the scale update: A_ibc = c_ib^T G c_ic, r_ib = c_ib^T G w_i (float64)."""
    xp = _xp(W)
    m, n = W.shape
    nb = -(-n // block)
    N = nb * block
    if N == n:  # (no padding: the arrays themselves, not zero-padded copies)
        Lp, Gp = xp.ascontiguousarray(xp.asarray(level, dtype=W.dtype)), xp.ascontiguousarray(G)
    else:
        Lp = xp.zeros((m, N), dtype=W.dtype)
        Lp[:, :n] = level
        Gp = xp.zeros((N, N), dtype=G.dtype)
        Gp[:n, :n] = G
    A = xp.empty((m, nb, nb), dtype=xp.float64)
    for c in range(nb):
        Tc = Lp[:, c * block:(c + 1) * block] @ Gp[c * block:(c + 1) * block, :]  # (m, N): sum_k L_ick G_ck,:
        Tc *= Lp  # (in place: L * Tc, one array less)
        A[:, :, c] = Tc.reshape(m, nb, block).sum(axis=-1, dtype=xp.float64)
        del Tc
    if N == n:
        WG = W @ G
    else:
        WG = xp.zeros((m, N), dtype=W.dtype)
        WG[:, :n] = W @ G
    WG *= Lp
    r = WG.reshape(m, nb, block).sum(axis=-1, dtype=xp.float64)
    return A, r


def solve_block_scales(A, r, old):
    """Per row the minimizer of s^T A s - 2 r^T s, or the old scales where that is not finite, not > 0, or not
    better. Blocks whose levels are all 0 (A_bb = 0) keep their old scale (it does not matter for the objective)."""
    xp = _xp(A)
    m, nb, _ = A.shape
    old = old.astype(xp.float64)
    idx = xp.arange(nb)
    dead = A[:, idx, idx] <= 0  # (m, nb)
    A = xp.where(dead[:, :, None] | dead[:, None, :], 0.0, A)
    A[:, idx, idx] = xp.where(dead, 1.0, A[:, idx, idx])
    r = xp.where(dead, old, r)
    eye = xp.eye(nb)[None] * A[:, idx, idx].mean(axis=1)[:, None, None]
    try:
        new = xp.linalg.solve(A + 1e-12 * eye, r[:, :, None])[:, :, 0]
    except Exception:  # numpy raises for the whole batch when one system is singular: row by row (a row's result
        new = xp.stack([_solve_row(xp, A[i], r[i], eye[i]) for i in range(m)])  # never depends on the others)

    def q(s):
        return (s[:, :, None] * A * s[:, None, :]).sum(axis=(1, 2)) - 2 * (r * s).sum(axis=1)

    ok = xp.isfinite(new).all(axis=1) & (new > 0).all(axis=1)
    ok &= q(xp.where(ok[:, None], new, old)) < q(old)
    return xp.where(ok[:, None], new, old)


def _solve_row(xp, A, r, eye):
    """One row's block scales: A s = r with a ridge of 1e-12 (1e-6 where that is singular; NaN where both are)."""
    for ridge in (1e-12, 1e-6):
        try:
            return xp.linalg.solve((A + ridge * eye)[None], r[None, :, None])[0, :, 0]
        except Exception:
            pass
    return xp.full_like(r, xp.nan)


def _block_update(xp, W, level, G, bg: BlockGrid):
    """Scale update in the (m, n) layout; returns the new Q."""
    A, r = block_scale_system(W, level, G, bg.block)
    bg.scale = solve_block_scales(A, r, bg.scale).astype(W.dtype)
    return bg.values(level)


def _check(cfg: SolverConfig):
    if cfg.granularity != "block" or cfg.block_size < 1:
        raise ValueError(f"block-wise solver needs granularity 'block' and a block size >= 1, got "
                         f"{cfg.granularity!r}, {cfg.block_size}")
    if cfg.order != "cyclic":
        raise ValueError(f"order {cfg.order!r} works with channel granularity only; block granularity uses the "
                         "cyclic order")


def _block_result(W, G, bg: BlockGrid, Q, level, history, obj=None) -> QuantResult:
    return QuantResult(codes=to_numpy(bg.codes(level)).astype(np.int32), scale=to_numpy(bg.scale).astype(W.dtype),
                       zero_point=to_numpy(bg.zero_point()).astype(np.int32), qweight=to_numpy(Q),
                       objective=objective(W, Q, G) if obj is None else obj, history=history, bits=bg.bits,
                       scheme=bg.scheme, granularity="block")


def _per_tap(fn, W, G, cfg: SolverConfig, xp) -> QuantResult:
    """Conv weights (m, channels * taps), columns (channel, tap) as in W.reshape(O, -1): solve with the columns in
    (tap, channel) order, where each tap's channels form whole blocks, and map the result back. The scales come back
    in (channel block, tap) order, i.e. the DequantizeLinear scale [O, channels / B, *kernel] flattened."""
    m, n = W.shape
    taps = cfg.block_taps
    ch = n // taps
    if ch * taps != n or ch % cfg.block_size:
        raise ValueError(f"conv blocks need the channels ({ch}) to be a multiple of the block size "
                         f"({cfg.block_size}) when the kernel has {taps} taps")
    perm = np.arange(n).reshape(ch, taps).T.reshape(-1)
    inv = np.argsort(perm)
    xp = xp or _xp(W)
    pd = xp.asarray(perm)
    res = fn(W[:, pd], G[pd][:, pd], replace(cfg, block_taps=1), xp)
    nbc = ch // cfg.block_size

    def back(a):
        return np.ascontiguousarray(a.reshape(m, taps, nbc).transpose(0, 2, 1).reshape(m, nbc * taps))
    return replace(res, codes=np.ascontiguousarray(res.codes[:, inv]),
                   qweight=np.ascontiguousarray(res.qweight[:, inv]), scale=back(res.scale),
                   zero_point=back(res.zero_point))


def rtn_quantize_block(W, G, cfg: SolverConfig, xp=None) -> QuantResult:
    """Round-to-nearest on the initial block grid (min-max with ``cfg.lam``, no search: the baseline)."""
    if cfg.block_taps > 1:
        return _per_tap(rtn_quantize_block, W, G, cfg, xp)
    cfg, xp, W, G = _prepare(W, G, cfg, xp)
    _check(cfg)
    bg = make_block_grid(W, G, replace(cfg, lambda_search=False))
    Q, level = bg.nearest(W)
    return _block_result(W, G, bg, Q, level, [objective(W, Q, G)])


def comq_quantize_block(W, G, cfg: SolverConfig, xp=None) -> QuantResult:
    """COMQ on the block grid: cyclic sweeps (the coordinate step of ``comq_quantize``, each coordinate on its
    block's grid), each followed by the block scale update when ``cfg.scale_update``."""
    if cfg.block_taps > 1:
        return _per_tap(comq_quantize_block, W, G, cfg, xp)
    cfg, xp, W, G = _prepare(W, G, cfg, xp)
    _check(cfg)
    m, n = W.shape
    bg = make_block_grid(W, G, cfg)
    g = xp.ascontiguousarray(xp.diagonal(G)).copy()
    gsafe = xp.where(g > 0, g, 1)
    Wt = xp.ascontiguousarray(W.T)
    Qt = Wt.copy()
    Rt = xp.zeros_like(Wt)
    level_t = xp.zeros_like(Wt)
    bounds = block_bounds(n, cfg.block_size)
    history = []
    for _ in range(cfg.sweeps):
        for b, (s, e) in enumerate(bounds):
            grid = bg.grid(b)
            for t0 in range(s, e, LAZY_MAX):
                t1 = min(t0 + LAZY_MAX, e)
                D = _step_block(xp, Rt[t0:t1].copy(), Qt[t0:t1], Wt[t0:t1], g[t0:t1, None], gsafe[t0:t1, None],
                                G[t0:t1, t0:t1, None], grid.nearest_value, False, 16)
                Rt += G[:, t0:t1] @ D
            level_t[s:e] = grid.levels_of(Qt[s:e], transposed=True)
        _swept()
        history.append(_objective_from_R(Wt, Qt, Rt))
        if cfg.scale_update:
            del Rt  # (recomputed from the new Q: not held meanwhile)
            Q = _block_update(xp, W, xp.ascontiguousarray(level_t.T), G, bg)
            Qt = xp.ascontiguousarray(Q.T)
            del Q
            Rt = G @ (Wt - Qt)
            history.append(_objective_from_R(Wt, Qt, Rt))
    del Wt, Rt  # (the solve's arrays go before the result's are made)
    Q = xp.ascontiguousarray(Qt.T)
    del Qt
    level = xp.ascontiguousarray(level_t.T)
    del level_t
    return _block_result(W, G, bg, Q, level, history, obj=history[-1])


__all__ = ["BlockGrid", "block_bounds", "make_block_grid", "block_scale_system", "solve_block_scales",
           "rtn_quantize_block", "comq_quantize_block"]


def block_layout(layer, scale, zero_point):
    """Matrix-form block parameters (out rows m, blocks nb) -> (scale, zero_point, axis) of the DequantizeLinear on
    the stored 2-D weight: MatMul B[K, N] and Gemm transB=0 (layer.axis 1) block along axis 0 with scale[nb, N];
    Gemm transB=1 W[N, K] along axis 1 with scale[N, nb]; Conv W[O, I, *k] along axis 1 with scale[O, I/B, *k]."""
    if layer.base == "Conv":  # W[O, I, *k]: scale [O, I / B, *k] on axis 1, rows in (channel block, tap) order
        shape = (scale.shape[0], -1) + tuple(layer.weight_shape[2:])
        return scale.reshape(shape), zero_point.reshape(shape), 1
    if layer.axis == 1:
        return np.ascontiguousarray(scale.T), np.ascontiguousarray(zero_point.T), 0
    return scale, zero_point, 1
