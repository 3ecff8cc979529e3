"""Slow, obviously-correct float64 references for the solver tests.

``step_loop`` is the official COMQ step loop in Gram form (../shared/docs/comq.md, "Pseudocode of the official
semantics"): one coordinate per row per step, R updated by a rank-1 row update after every step, the grid searched by
brute force (argmin of |grid - target|, first index on ties, as ``torch.min`` does).
"""

import numpy as np


def grid_table(scale, lo, hi):
    """(m, L) table of grid values level * scale, like the official ``bit_code`` (with scalar = 1)."""
    L = int(hi[0] - lo[0]) + 1
    levels = lo[:, None] + np.arange(L)[None, :]
    return levels * scale[:, None], levels


def nearest_bruteforce(table, levels, t):
    idx = np.argmin(np.abs(table - t[:, None]), axis=1)
    r = np.arange(len(t))
    return table[r, idx], levels[r, idx]


def step_loop(W, G, scale, lo, hi, order, sweeps=1, scale_update=False, per_tensor=False):
    """Returns (Q, level, scale) after ``sweeps`` sweeps of the plain step loop, all in float64."""
    W = np.asarray(W, np.float64)
    G = np.asarray(G, np.float64)
    scale = np.asarray(scale, np.float64).copy()
    m, n = W.shape
    g = np.diag(G).copy()
    Q = W.copy()
    level = np.zeros_like(W)
    R = np.zeros_like(W)
    rows = np.arange(m)
    if order.ndim == 1:
        order = np.broadcast_to(order, (m, n))
    for _ in range(sweeps):
        table, levels = grid_table(scale, lo, hi)
        for t in range(n):
            J = order[:, t]
            target = np.empty(m)
            for i in range(m):
                j = J[i]
                target[i] = Q[i, j] + R[i, j] / g[j] if g[j] > 0 else W[i, j]
            q, lv = nearest_bruteforce(table, levels, target)
            d = Q[rows, J] - q
            for i in range(m):
                R[i] += d[i] * G[J[i]]
            Q[rows, J] = q
            level[rows, J] = lv
        if scale_update:
            C = level
            num = np.einsum("in,nk,ik->i", C, G, W)
            den = np.einsum("in,nk,ik->i", C, G, C)
            if per_tensor:
                num[:] = num.sum()
                den[:] = den.sum()
            ok = (den > 0) & (num > 0)
            scale = np.where(ok, num / np.where(ok, den, 1), scale)
            Q = level * scale[:, None]
            R = (W - Q) @ G
    return Q, level, scale


def objective(W, Q, G):
    E = np.asarray(W, np.float64) - np.asarray(Q, np.float64)
    return float(np.einsum("in,nk,ik->", E, np.asarray(G, np.float64), E))


def order(W, G, name):
    """The coordinate order: per row (greedy, (m, n)) or shared ((n,)), ties in column order."""
    g = np.sqrt(np.maximum(np.diag(G), 0))
    if name == "greedy":
        return np.argsort(-(np.abs(W) * g[None, :]), axis=1, kind="stable")
    if name == "importance":
        return np.argsort(-(g * np.linalg.norm(W, axis=0)), kind="stable")
    return np.arange(W.shape[1])


def sqrt_psd(G):
    """A matrix X with X^T X = G (G symmetric positive semi-definite): the rows of a data matrix for lstsq."""
    vals, vecs = np.linalg.eigh(np.asarray(G, np.float64))
    return (vecs * np.sqrt(np.maximum(vals, 0))).T


def block_scales_lstsq(W, G, level, scale, block):
    """Per row, the block scales minimizing ||X (w - sum_b s_b c_b)||^2 by np.linalg.lstsq on X = sqrt(G), with the
    solver's acceptance rule: keep the old scales unless the new ones are finite, > 0 and strictly better; blocks
    whose levels are all 0 keep their old scale."""
    W, G, level = (np.asarray(a, np.float64) for a in (W, G, level))
    X = sqrt_psd(G)
    m, n = W.shape
    nb = scale.shape[1]
    out = np.array(scale, np.float64)
    for i in range(m):
        C = np.zeros((n, nb))
        for j in range(n):
            C[j, j // block] = level[i, j]
        live = np.abs(C).sum(axis=0) > 0
        s = out[i].copy()
        s[live] = np.linalg.lstsq(X @ C[:, live], X @ W[i], rcond=None)[0]

        def obj(v):
            return float(np.sum((X @ (W[i] - C @ v)) ** 2))
        if np.all(np.isfinite(s)) and np.all(s > 0) and obj(s) < obj(out[i]):
            out[i] = s
    return out


def block_step_loop(W, G, scale, lo, hi, block, sweeps=1, scale_update=False):
    """The plain step loop on a block grid: scale/lo/hi are (m, nb), coordinate j uses block j // block's grid
    (searched by brute force); the scale update is ``block_scales_lstsq``. Returns (Q, level, scale), float64."""
    W = np.asarray(W, np.float64)
    G = np.asarray(G, np.float64)
    scale = np.asarray(scale, np.float64).copy()
    m, n = W.shape
    g = np.diag(G)
    Q = W.copy()
    level = np.zeros_like(W)
    R = np.zeros_like(W)
    for _ in range(sweeps):
        for j in range(n):
            b = j // block
            table, levels = grid_table(scale[:, b], lo[:, b], hi[:, b])
            target = Q[:, j] + R[:, j] / g[j] if g[j] > 0 else W[:, j].copy()
            q, lv = nearest_bruteforce(table, levels, target)
            d = Q[:, j] - q
            R += d[:, None] * G[j][None, :]
            Q[:, j] = q
            level[:, j] = lv
        if scale_update:
            scale = block_scales_lstsq(W, G, level, scale, block)
            Q = level * np.repeat(scale, block, axis=1)[:, :n]
            R = (W - Q) @ G
    return Q, level, scale
