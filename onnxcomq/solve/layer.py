"""One layer's solve from its captured statistics: ``quantize_layer(W, stats, policy) -> LayerResult``.

Around the COMQ solver (comq.py, blockwise.py) it adds what makes a layer's result safe to ship (docs/design.md,
"Solve"): the free bias (solve on the centered Gram, fold the mean error into the bias), damping (a ridge penalty
alpha * mean(diag G) * ||w - q||^2 against fitting what is particular to the calibration data), the cross statistics
of sequential capture (fit X W from X~), float64 where float32 products would overflow, and the round-to-nearest
fallback (COMQ descends from Q = W, not from RTN: a group where it is not better keeps RTN).

The statistics are duck-typed (capture.gram.LayerStats): ``stats(k, centered, fold) -> (G, H, G~)``,
``means(k) -> (mu, mu~)``, ``rows``, ``cross``, ``folded``. Nothing here imports onnx.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from .blockwise import comq_quantize_block, rtn_quantize_block
from .comq import (
    SolverConfig,
    comq_quantize,
    comq_quantize_groups,
    cross_objective,
    objective,
    rtn_quantize,
    rtn_quantize_groups,
    safe_dtype,
)

AUTO_DAMPING_FALLBACK = 0.1  # damping "auto" for a layer that turned out short of rows but kept no folds


@dataclass(frozen=True)
class LayerPolicy:
    """What a layer's solve does beyond the solver's grid and sweeps (from the recipe; see config.py)."""

    solver: SolverConfig
    comq: bool = True  # False: round to nearest only (the baseline)
    free_bias: bool = False  # re-fit the bias (the caller decides where that is exact: one consumer, a bias to write)
    damping: float | str = 0.0  # "scaled" | "auto" | a number (few-row layers only)
    damping_scale: float = 3.0
    damping_max: float = 10.0
    few_rows: float = 4.0  # "few": fewer calibration rows than this times the fan-in
    damping_grid: tuple = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0)
    correct: bool = False  # sequential capture: the layer may fit the float output from the quantized input
    strength: float = 1.0  # the share of the input error a correcting layer's weights fit
    correct_rows: float = 4.0  # ... only with at least this many rows per fan-in
    correct_few_rows: bool = False


@dataclass
class LayerResult:
    """Per group (conv groups, recurrent directions; 1 otherwise): codes (int16), scales and zero points in the
    solver's row layout; the bias change (or None) and the relative errors ||X (W - Q)^T||^2 / ||X W^T||^2."""

    codes: list
    scales: list
    zero_points: list
    bias_delta: np.ndarray | None
    comq_error: float
    rtn_error: float
    rtn_groups: int  # groups where RTN was kept
    damping: float
    corrected: bool
    rows: int
    solver: SolverConfig  # as used (dtype float64 where float32 would overflow)
    input_energy: float  # ||X W^T||^2 (0: the layer read only zeros)


def quantize_layer(mats: list, stats: list, policy: LayerPolicy, fan_in: int, xp=np) -> LayerResult:
    """Quantize one layer: ``mats`` its weight per group (m_k, n), ``stats`` the statistics of its input at each
    consumer (a weight shared by several nodes: summed), ``fan_in`` the inputs per output (per group).

    With cross statistics, ``policy.correct`` says whether the layer may correct its input error (fit X W from
    X~): only where its input depends on no other layer of its stage, else it would correct the error that those
    layers correct already; the others fit X~ W (the partly quantized model's input, no correction)."""
    scfg = policy.solver
    dt = np.float64 if scfg.dtype == "float64" else np.float32
    sts = stats
    groups = len(mats)
    rows = sum(st.rows for st in sts)
    comq = policy.comq
    bc = policy.free_bias and comq
    few_rows = rows < policy.few_rows * fan_in
    correct = policy.correct and sts[0].cross and (policy.correct_few_rows or rows >= policy.correct_rows * fan_in)
    beta = float(policy.strength) if correct else 0.0

    def gather(centered: bool, fold=None) -> list:  # per group (G, H, G~), summed over the consumers
        out = []
        for k in range(groups):
            parts = [st.stats(k, centered, fold) for st in sts]
            # (one consumer: its arrays as they are, no copy; they are only read from here on)
            out.append(_mix(tuple(None if parts[0][i] is None else parts[0][i] if len(parts) == 1
                                  else sum(p[i] for p in parts) for i in range(3)), beta))
        return out

    raw = gather(False)  # the reported errors and the RTN baseline: uncentered, undamped
    if dt is np.float32 and any(safe_dtype(np, Wk, st[0], "float32") is np.float64 for Wk, st in zip(mats, raw)):
        dt = np.float64  # weights or inputs near float32's range: the solver works in float64, and so do the errors
        scfg = dataclasses.replace(scfg, dtype="float64")  # (so that the solver need not check again)
    solve = gather(True) if bc else raw  # what COMQ solves
    alpha = 0.0
    if comq and policy.damping == "scaled":  # every layer, by its rows per input
        alpha = scaled_damping(rows, fan_in, policy.damping_scale, policy.damping_max)
    elif few_rows and comq and policy.damping != 0:  # G is (near) rank-deficient: COMQ would fit the noise
        if policy.damping != "auto":
            alpha = float(policy.damping)
        elif all(st.folded for st in sts):
            alpha, _ = _held_out_alpha(xp, mats, [gather(bc, 0), gather(bc, 1)], policy.damping_grid, scfg, dt)
        else:  # the first batch promised enough rows: no folds were kept
            alpha = AUTO_DAMPING_FALLBACK
    plain, solve = solve, damp(solve, alpha)
    solve_g, cross = _split_solve(solve)
    rtns, comqs = solve_groups(xp, mats, [st[0] for st in raw] if cross is None else solve_g, solve_g, scfg,
                               dt, comq, cross)
    codes, scales, zps, delta = [], [], [], []
    num_c = num_r = den = 0.0
    fallback = 0
    for k, Wk in enumerate(mats):
        rtn = rtns[k]  # the baseline: plain round-to-nearest, no bias change
        o_r = rtn.objective if cross is None else _objective(Wk, rtn.qweight, raw[k], dt)
        if comqs is None:
            res, o_c = rtn, o_r
        else:
            res, o_c = comqs[k], comqs[k].objective
            o_rs = _objective(Wk, rtn.qweight, solve[k], dt) if (bc or alpha or cross) else o_r
            if o_c > o_rs:  # COMQ is a descent from Q = W, not from RTN: never ship something worse than RTN
                res, o_c = rtn, o_rs
                fallback += 1
            if alpha:  # report the calibration error itself, not the damped objective
                o_c = _objective(Wk, res.qweight, plain[k], dt)
        if bc:  # b' = b + mu W^T - mu~ Q^T (mu~ = mu without sequential capture)
            mu, mut = sts[0].means(k)
            mu = mu if correct else mut  # the mean is corrected fully at any strength (measured better)
            delta.append(Wk.astype(np.float64) @ mu - res.qweight.astype(np.float64) @ mut)
        num_c += o_c
        num_r += o_r
        den += objective(Wk.astype(dt), np.zeros_like(Wk, dt), raw[k][0].astype(dt))  # ||X W^T||^2
        codes.append(res.codes.astype(np.int16))  # 2..8-bit codes: int16 holds them (int32 from the solver)
        scales.append(res.scale)
        zps.append(res.zero_point)
    del rtns, comqs, res  # free the solver's full-size arrays before the next layer (large models)
    return LayerResult(codes, scales, zps, np.concatenate(delta) if bc else None, relative_error(num_c, den), relative_error(num_r, den),
                       fallback, alpha, correct, rows, scfg, float(den))


def relative_error(num: float, den: float) -> float:
    return float(num / den) if den > 0 else 0.0


def solve_groups(xp, mats, grams, solve_grams, scfg: SolverConfig, dt, comq: bool, cross=None, rtn: bool = True):
    """RTN (on ``grams``) and COMQ (on ``solve_grams``) results per group: many groups of one shape (depthwise
    and grouped convs) in one batched solve, otherwise one by one. ``cross``: per group (G0, H) of the cross
    statistics (sequential capture; ``solve_grams`` then hold G~). ``rtn=False``: COMQ only (rtns is None)."""
    H = [c[1] for c in cross] if cross else None
    G0 = [c[0] for c in cross] if cross else None
    if len(mats) > 1 and scfg.order == "cyclic" and scfg.granularity == "channel":
        def stack(a):
            return None if a is None else xp.asarray(np.stack(a).astype(dt))
        W3 = stack(mats)
        rtns = rtn_quantize_groups(W3, stack(grams), scfg, xp) if rtn else None
        comqs = comq_quantize_groups(W3, stack(solve_grams), scfg, xp, H3=stack(H), G03=stack(G0)) if comq else None
        return rtns, comqs
    rtn_fn, comq_fn = (rtn_quantize_block, comq_quantize_block) if scfg.granularity == "block" \
        else (rtn_quantize, comq_quantize)
    rtns, comqs = [] if rtn else None, [] if comq else None
    for k, (Wk, Gk, Sk) in enumerate(zip(mats, grams, solve_grams)):
        Wd = xp.asarray(Wk.astype(dt))
        if rtn:
            rtns.append(rtn_fn(Wd, xp.asarray(Gk.astype(dt)), scfg, xp))
        if comq:  # cross statistics (sequential capture) only with the channel/tensor solver (validated)
            kw = {} if H is None else dict(H=xp.asarray(H[k].astype(dt)), G0=xp.asarray(G0[k]))
            comqs.append(comq_fn(Wd, xp.asarray(Sk.astype(dt)), scfg, xp, **kw))
    return rtns, comqs


def _objective(Wk, Qk, st, dt) -> float:
    """The layer objective of weights Qk on statistics st = (G, H, G~): e^T G e, or ||X W^T - X~ Q^T||^2 (cross)."""
    G, H, Gt = st
    W, Q = Wk.astype(dt), np.asarray(Qk).astype(dt)
    if H is None:
        return objective(W, Q, G.astype(dt))
    return cross_objective(W, Q, G, H, Gt)


def _mix(st: tuple, beta: float) -> tuple:
    """Cross statistics for the target X_b = b X + (1 - b) X~ instead of X: b = 1 corrects the input error fully
    (GPFQ), b = 0 only fits the partly quantized model's inputs (X~ W, GPTQ's sequential mode)."""
    G, H, Gt = st
    if H is None or beta == 1:
        return st
    return (beta * beta * G + beta * (1 - beta) * (H + H.T) + (1 - beta) ** 2 * Gt, beta * H + (1 - beta) * Gt, Gt)


def damp(stats: list, alpha: float) -> list:
    """Each group's (G, H, G~) + alpha * mean(diag of G~, or G) * I: penalizes alpha * d * ||w - q||^2."""
    if alpha <= 0:
        return stats
    out = []
    for G, H, Gt in stats:
        ref = G if Gt is None else Gt
        v = alpha * max(float(np.mean(np.diag(ref))), 0.0)
        out.append(tuple(None if a is None else _plus_diag(a, v) for a in (G, H, Gt)))
    return out


def _plus_diag(a: np.ndarray, v: float) -> np.ndarray:
    """a + v * I as one new array (the numbers of ``a + v * np.eye(n)`` without the n x n identity)."""
    out = np.array(a, dtype=np.result_type(a, np.float64))
    out.reshape(-1)[::out.shape[0] + 1] += v
    return out


def scaled_damping(rows: int, fan_in: int, scale: float, cap: float) -> float:
    """Damping "scaled": alpha = min(cap, scale * sqrt(fan_in / rows)) for a layer with ``rows`` calibration rows
    (all positions of all samples) and ``fan_in`` inputs per output (per group)."""
    return float(min(cap, scale * math.sqrt(fan_in / max(rows, 1))))


def _split_solve(stats: list):
    """(solve Grams, cross (G0, H) per group or None) for _solve_groups."""
    if stats[0][1] is None:
        return [st[0] for st in stats], None
    return [st[2] for st in stats], [(st[0], st[1]) for st in stats]


def _held_out_alpha(xp, mats, fold_stats, grid, scfg: SolverConfig, dt) -> tuple:
    """The damping strength among ``grid`` whose COMQ solution on fold 0 has the lowest objective on fold 1 (the
    held-out error); returns (alpha, {alpha: held-out error})."""
    errs = {}
    for alpha in grid:
        solve, cross = _split_solve(damp(fold_stats[0], alpha))
        _, comqs = solve_groups(xp, mats, solve, solve, scfg, dt, True, cross, rtn=False)
        errs[alpha] = sum(_objective(Wk, r.qweight, st, dt) for Wk, r, st in zip(mats, comqs, fold_stats[1]))
    return min(errs, key=errs.get), errs


