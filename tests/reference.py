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
