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
    _default_block,
    comq_quantize,
    comq_quantize_groups,
    cross_objective,
    energy,
    importance_order,
    objective,
    overflow_risk,
    rtn_quantize,
    rtn_quantize_groups,
    safe_dtype,
)

AUTO_DAMPING_FALLBACK = 0.1  # damping "auto" for a layer that turned out short of rows but kept no folds
# Row chunks of a layer's solve (row_chunks): one (rows, n) float64 array of a chunk holds at most about this many
# bytes (its solve holds a few such arrays at once), and chunks start at multiples of CHUNK_ALIGN rows. On a GPU
# (any device module) the step loop's cost is kernel launches, the same for any rows, so chunks are larger there:
# 7B-width layers, lm_head included, are solved whole.
CHUNK_BYTES = 64 << 20
DEVICE_CHUNK_BYTES = 1 << 30
CHUNK_ALIGN = 96


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
    """Per group (conv groups, recurrent directions; 1 otherwise): codes (uint8, or int8 for the symmetric grid),
    scales and zero points in the solver's row layout; the bias change (or None) and the relative errors
    ||X (W - Q)^T||^2 / ||X W^T||^2."""

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
    layers correct already; the others fit X~ W (the partly quantized model's input, no correction).

    Rows are solved in chunks (``row_chunks``: rows are independent problems with per-channel or block grids), and
    each chunk's codes, scales and bias change are written into the layer's arrays before the next chunk is solved:
    the memory beyond the weight is the codes plus one chunk's solve, however large the layer."""
    scfg = policy.solver
    dt = np.float64 if scfg.dtype == "float64" else np.float32
    sts = stats
    groups = len(mats)
    rows = sum(st.rows for st in sts)
    comq = policy.comq
    bc = policy.free_bias and comq
    few_rows = rows < policy.few_rows * fan_in
    # (the block solver has no cross objective: block layers fit X~ W, the partly quantized model's input)
    correct = policy.correct and sts[0].cross and scfg.granularity != "block" and \
        (policy.correct_few_rows or rows >= policy.correct_rows * fan_in)
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
    cast = _Cast(dt)
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
    grams = [st[0] for st in raw] if cross is None else solve_g  # RTN's
    outs = [_GroupOut(Wk.shape[0], scfg.scheme, scfg.bits) for Wk in mats]
    means = [sts[0].means(k) for k in range(groups)] if bc else None
    for k, sl, run_rtn, run_comq in _solves(xp, mats, grams, solve_g, cross, scfg, dt, comq, True, cast=cast):
        out, Wc = outs[k], np.asarray(mats[k][sl], dt)
        rtn = run_rtn()  # the baseline: plain round-to-nearest, no bias change
        o_r = rtn.objective if cross is None else _objective(Wc, rtn.qweight, raw[k], dt, cast)
        out.o_r += o_r
        out.den += energy(Wc, cast(raw[k][0]))  # ||X W^T||^2
        if not comq:  # round to nearest only: the baseline is the result
            out.o_c += o_r
            out.put(sl, rtn)
            del rtn, Wc
            continue
        out.o_rs += _objective(Wc, rtn.qweight, solve[k], dt, cast) if (bc or alpha or cross) else o_r
        del rtn  # (only its objectives are kept: RTN is solved again where it is shipped, below)
        res = run_comq()
        out.o_c += res.objective
        if alpha:  # report the calibration error itself, not the damped objective
            out.o_plain += _objective(Wc, res.qweight, plain[k], dt, cast)
        out.put(sl, res, _bias_delta(mats[k][sl], res.qweight, means[k], correct) if bc else None)
        del res, Wc  # (before the next chunk's solve)
    # COMQ is a descent from Q = W, not from RTN: never ship something worse than RTN. Where that happens (a whole
    # group), round to nearest again, chunk by chunk (the same numbers as before), instead of keeping every RTN code.
    back = {k for k, out in enumerate(outs) if comq and out.o_c > out.o_rs}
    if back:
        for k in back:
            outs[k].reset()
        for k, sl, run_rtn, _ in _solves(xp, mats, grams, solve_g, cross, scfg, dt, False, True, back, cast):
            if k in back:
                out, rtn = outs[k], run_rtn()
                if alpha:
                    out.o_plain += _objective(np.asarray(mats[k][sl], dt), rtn.qweight, plain[k], dt, cast)
                out.put(sl, rtn, _bias_delta(mats[k][sl], rtn.qweight, means[k], correct) if bc else None)
                del rtn
        for k in back:
            outs[k].o_c = outs[k].o_rs
    num_c = num_r = den = 0.0
    for out in outs:
        num_c += out.o_plain if alpha else out.o_c
        num_r += out.o_r
        den += out.den
    return LayerResult([o.codes for o in outs], [o.scale for o in outs], [o.zero_point for o in outs],
                       np.concatenate([o.delta for o in outs]) if bc else None, relative_error(num_c, den),
                       relative_error(num_r, den), len(back), alpha, correct, rows, scfg, float(den))


def relative_error(num: float, den: float) -> float:
    return float(num / den) if den > 0 else 0.0


def row_chunks(m: int, n: int, chunk_bytes: int | None = None) -> list:
    """[(start, end)] of the row chunks of an (m, n) weight: one (rows, n) float64 array of about ``chunk_bytes``
    (default ``CHUNK_BYTES``) each (the solve of a chunk holds a few such arrays), starting at multiples of
    ``CHUNK_ALIGN`` rows, the last one at least ``CHUNK_ALIGN`` rows long (unless it is the only one).

    The alignment keeps the solve exact: BLAS computes the last few rows or columns of a product with other kernels
    (another summation order) than the rest, by the kernel's unroll (which divides CHUNK_ALIGN), so a chunk that
    starts at such a multiple treats every row as the whole product does, and gives the same bits."""
    limit = max(1, (CHUNK_BYTES if chunk_bytes is None else chunk_bytes) // (8 * max(n, 1)))
    if m <= limit:
        return [(0, m)]
    k = -(-m // limit)
    step = -(-m // (k * CHUNK_ALIGN)) * CHUNK_ALIGN  # ceil(m / k), rounded up to whole CHUNK_ALIGN
    bounds = list(range(0, m, step)) + [m]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < CHUNK_ALIGN:
        del bounds[-2]
    return list(zip(bounds[:-1], bounds[1:]))


def _batched(mats, scfg: SolverConfig) -> bool:
    """Many groups of one shape go through the batched group solver (cyclic order, per-channel grids)."""
    return len(mats) > 1 and scfg.order == "cyclic" and scfg.granularity == "channel"


def _solves(xp, mats, grams, solve_grams, cross, scfg: SolverConfig, dt, comq: bool, rtn: bool, only=None,
            cast=None):
    """Yields (group k, row slice, RTN, COMQ) chunk by chunk (arguments as in ``solve_groups``), where RTN and COMQ
    are functions that solve the chunk (None where not asked for), so that a caller holds one result at a time: a
    batched layer comes in chunks of whole groups, other groups by the rows in ``row_chunks`` (per-tensor grids
    whole, as their scale depends on every row). A chunk's results are exactly those rows of the whole group's
    solve: what the solver derives from the whole weight (float64 where float32 would overflow, the importance
    order, the greedy order's step block) is fixed for every chunk. ``only``: the groups wanted; ``cast``: a
    _Cast whose host copies of the statistics in ``dt`` the solves share."""
    H = [c[1] for c in cross] if cross else None
    G0 = [c[0] for c in cross] if cross else None
    budget = CHUNK_BYTES if xp is np else DEVICE_CHUNK_BYTES
    if _batched(mats, scfg):
        m, n = mats[0].shape
        per = max(1, budget // max(8 * m * n, 1))
        scfg_r = scfg_c = scfg
        if per < len(mats):  # (the dtype the solver picks from all groups' weights and statistics)
            scfg_r = _whole_dtype(scfg, mats, grams, dt)
            scfg_c = _whole_dtype(scfg, mats, solve_grams, dt)
        for g0 in range(0, len(mats), per):
            g1 = min(g0 + per, len(mats))
            if only is not None and not only.intersection(range(g0, g1)):
                continue
            done = {}

            def run(kind: bool, j: int, g0=g0, g1=g1, done=done):  # (each kind solved once for the chunk's groups)
                if kind not in done:
                    done[kind] = solve_groups(xp, mats[g0:g1], grams[g0:g1], solve_grams[g0:g1],
                                              scfg_c if kind else scfg_r, dt, kind, cross[g0:g1] if cross else None,
                                              not kind, batched=True)[kind]
                return done[kind][j]
            for j, k in enumerate(range(g0, g1)):
                yield (k, slice(None), (lambda j=j: run(False, j)) if rtn else None,
                       (lambda j=j: run(True, j)) if comq else None)
        return
    block = scfg.granularity == "block"
    rtn_fn, comq_fn = (rtn_quantize_block, comq_quantize_block) if block else (rtn_quantize, comq_quantize)
    for k, Wk in enumerate(mats):
        if only is not None and k not in only:
            continue
        m, n = Wk.shape
        chunks = [(0, m)] if scfg.granularity == "tensor" else row_chunks(m, n, budget)
        Gr = _device(xp, grams[k], dt, cast) if rtn else None
        Gs = None
        if comq:
            Gs = Gr if Gr is not None and solve_grams[k] is grams[k] else _device(xp, solve_grams[k], dt, cast)
        # (block layers never correct: their cross statistics are (G~, G~, G~), a plain solve on G~)
        kw = {} if H is None or block else dict(H=_device(xp, H[k], dt, cast), G0=xp.asarray(G0[k]))
        cfg_r = cfg_c = scfg
        if len(chunks) > 1:
            cfg_r = _whole_dtype(scfg, [Wk], [grams[k]], dt) if rtn else scfg
            if comq:
                cfg_c = _whole_dtype(scfg, [Wk], [solve_grams[k]], dt)
                if scfg.order == "greedy" and not scfg.step_block:
                    cfg_c = dataclasses.replace(cfg_c, step_block=_default_block(m, n, True))
                if scfg.order == "importance":
                    kw["perm"] = _importance(xp, Wk, Gs, cfg_c, dt)
        for a, e in chunks:
            Wc = xp.asarray(np.asarray(Wk[a:e], dt))
            yield (k, slice(a, e), (lambda Wc=Wc: rtn_fn(Wc, Gr, cfg_r, xp)) if rtn else None,
                   (lambda Wc=Wc: comq_fn(Wc, Gs, cfg_c, xp, **kw)) if comq else None)


def _device(xp, a, dt, cast=None):
    """A host array in the solver's array module as ``dt`` (on the host: no copy where it is one already, or the
    copy ``cast`` holds)."""
    return xp.asarray(np.asarray(a, dt) if cast is None else cast(a))


def _whole_dtype(scfg: SolverConfig, mats, grams, dt) -> SolverConfig:
    """``scfg`` with dtype float64 where the solver would pick it for all of ``mats`` and ``grams`` at once
    (``safe_dtype`` on them in ``dt``), so that every chunk is solved alike. (max |w| in ``dt`` is max |w| rounded
    to ``dt``: rounding is monotone, so no copy of the weight is made.)"""
    if scfg.dtype == "float64" or not all(Wk.size for Wk in mats):
        return scfg
    wmax = max(float(np.asarray(max(Wk.max(), -Wk.min()), dt)) for Wk in mats)
    gmax = max(float(np.asarray(max(G.max(), -G.min()), dt)) for G in grams)
    return dataclasses.replace(scfg, dtype="float64") if overflow_risk(mats[0].shape[-1], wmax, gmax) else scfg


def _importance(xp, Wk, G, cfg: SolverConfig, dt):
    """The importance order of the whole Wk, as ``comq_quantize`` computes it (in the solver's dtype)."""
    sdt = np.float64 if cfg.dtype == "float64" else np.float32
    W = xp.asarray(np.asarray(np.asarray(Wk, dt), sdt))
    g = xp.ascontiguousarray(xp.diagonal(xp.asarray(G, dtype=sdt))).copy()
    return importance_order(W, g)


class _GroupOut:
    """One group's results, filled chunk by chunk: codes (uint8 for the asymmetric, int8 for the symmetric grid:
    2..8-bit codes), scales, zero points, bias change, and the sums of the chunks' objectives (o_r: RTN's on the
    raw statistics, o_rs: RTN's on the solved ones, o_c: COMQ's, o_plain: the chosen result's undamped one)."""

    def __init__(self, m: int, scheme: str, bits: int):
        self.m = m
        self.dtype = np.uint8 if scheme == "asym" else np.int8
        self.range = (0, (1 << bits) - 1) if scheme == "asym" else (-(1 << (bits - 1)), (1 << (bits - 1)) - 1)
        self.o_r = self.o_rs = self.o_c = self.den = 0.0
        self.reset()

    def reset(self):
        self.codes = self.scale = self.zero_point = self.delta = None
        self.o_plain = 0.0

    def put(self, sl: slice, res, delta=None):
        if self.codes is None:  # (the first chunk gives the layouts and types: block scales are (m, blocks))
            def empty(a, dtype=None):
                return np.empty((self.m,) + a.shape[1:], dtype or a.dtype)
            self.codes = empty(res.codes, self.dtype)
            self.scale, self.zero_point = empty(res.scale), empty(res.zero_point)
            self.delta = None if delta is None else np.empty(self.m, np.float64)
        lo, hi = self.range
        if res.codes.min() < lo or res.codes.max() > hi:
            raise ValueError(f"solver codes outside the {lo}..{hi} range of their grid")
        self.codes[sl] = res.codes
        self.scale[sl] = res.scale
        self.zero_point[sl] = res.zero_point
        if delta is not None:
            self.delta[sl] = delta


def _bias_delta(W, Q, means, correct: bool):
    """b' - b = mu W^T - mu~ Q^T per row of W (mu~ = mu without sequential capture); the mean is corrected fully
    at any strength (measured better)."""
    mu, mut = means
    mu = mu if correct else mut
    return W.astype(np.float64) @ mu - Q.astype(np.float64) @ mut


class _Cast:
    """Host statistics in the errors' dtype, cast once per array (and per layer) rather than once per chunk."""

    def __init__(self, dt):
        self.dt, self.done = dt, {}

    def __call__(self, a):
        hit = self.done.get(id(a))
        if hit is None:
            hit = self.done[id(a)] = (a, np.asarray(a, self.dt))  # (holds ``a``: its id stays its own)
        return hit[1]


def solve_groups(xp, mats, grams, solve_grams, scfg: SolverConfig, dt, comq: bool, cross=None, rtn: bool = True,
                 batched=None):
    """RTN (on ``grams``) and COMQ (on ``solve_grams``) results per group: many groups of one shape (depthwise
    and grouped convs) in one batched solve, otherwise one by one. ``cross``: per group (G0, H) of the cross
    statistics (sequential capture; ``solve_grams`` then hold G~). ``rtn=False``: COMQ only (rtns is None).
    ``batched``: use the batched solver (default: for several groups where it applies). The whole weight at once
    (``quantize_layer`` solves in row chunks)."""
    H = [c[1] for c in cross] if cross else None
    G0 = [c[0] for c in cross] if cross else None
    if _batched(mats, scfg) if batched is None else batched:
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
        Wd = xp.asarray(np.asarray(Wk, dt))
        if rtn:
            rtns.append(rtn_fn(Wd, _device(xp, Gk, dt), scfg, xp))
        if comq:  # (block layers never correct: their cross statistics are (G~, G~, G~), a plain solve on G~)
            kw = {} if H is None or scfg.granularity == "block" else dict(H=_device(xp, H[k], dt),
                                                                          G0=xp.asarray(G0[k]))
            comqs.append(comq_fn(Wd, _device(xp, Sk, dt), scfg, xp, **kw))
    return rtns, comqs


def _objective(Wk, Qk, st, dt, cast=None) -> float:
    """The layer objective of weights Qk on statistics st = (G, H, G~): e^T G e, or ||X W^T - X~ Q^T||^2 (cross)."""
    G, H, Gt = st
    W, Q = np.asarray(Wk, dt), np.asarray(Qk, dt)
    if H is None:
        return objective(W, Q, np.asarray(G, dt) if cast is None else cast(G))
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
        per, cast = [0.0] * len(mats), _Cast(dt)  # (casts of this alpha's statistics only)
        for k, sl, _, run_comq in _solves(xp, mats, solve, solve, cross, scfg, dt, True, False, cast=cast):
            per[k] += _objective(np.asarray(mats[k][sl], dt), run_comq().qweight, fold_stats[1][k], dt, cast)
        errs[alpha] = sum(per)
    return min(errs, key=errs.get), errs
