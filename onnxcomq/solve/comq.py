"""COMQ solver: closed-form coordinate descent on integer codes, plus scale updates (docs/design.md, "Solve").

Pure functions over an array module ``xp`` (numpy or cupy): the same code runs on the CPU and on a GPU.

Problem, per layer: minimize  ||X W^T - X Q^T||_F^2 = sum_i e_i^T G e_i  with G = X^T X, e_i = w_i - q_i.
State: Q (m, n) and R = (W - Q) G (m, n). The coordinate update of (i, j) moves q_ij to the grid point nearest to
t_ij = q_ij + R_ij / G_jj, and after a change q_old - q_new = d, R_i += d * G_j,: .

Speed: the step loop is blocked like GPTQ's lazy batch updates (exact: the same codes in float64). For a block of B
steps each row's B coordinates S_i are gathered with their sub-Gram G[S_i, S_i]; the steps inside the block only touch
those; then the block's changes D (m, B) update all of R at once: one GEMM ``D @ G[S, :]`` for an order shared by all
rows (cyclic), and a scatter + GEMM for per-row (greedy) orders.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass, field, replace

import numpy as np

from .backend import array_module, to_numpy
from .grid import GRANULARITIES, SCHEMES, Grid, make_grid, search_lambda

ORDERS = ("greedy", "cyclic", "importance")


_SWEEP_HOOK = contextvars.ContextVar("onnxcomq_sweep_hook", default=None)


@contextlib.contextmanager
def on_sweep(fn):
    """Within the block, ``fn()`` is called after every coordinate sweep of every solve (progress of long layers)."""
    token = _SWEEP_HOOK.set(fn)
    try:
        yield
    finally:
        _SWEEP_HOOK.reset(token)


def _swept() -> None:
    fn = _SWEEP_HOOK.get()
    if fn is not None:
        fn()


@dataclass(frozen=True)
class SolverConfig:
    """How one layer is quantized. Defaults are the improved configuration; ``official()`` is the paper's code."""

    bits: int = 4
    granularity: str = "channel"  # channel | tensor
    scheme: str = "asym"  # asym (min-max grid with zero point) | sym (zero point 0, TensorRT)
    # greedy: per row, |W_ij| sqrt(G_jj) descending (the official code); cyclic: j = 0..n-1; importance: one order
    # for all rows, columns by sqrt(G_jj) ||W_:j|| descending. Shared orders run at GEMM speed, per-row ones gather.
    order: str = "cyclic"
    sweeps: int = 3
    scale_update: bool = True  # closed-form scale update after each sweep (paper)
    lam: float = 1.0  # grid shrink factor ("scalar" in the official code)
    zero_in_range: bool = True  # widen the asym min-max range to contain 0 (needed for ONNX zero points)
    lambda_search: bool = True  # choose lam per row among lambda_grid by the objective (replaces lam)
    lambda_grid: tuple = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)
    # with lambda_search: full COMQ solves from each row's k best candidates (ranked by round-to-nearest error);
    # each row keeps the solve with its lowest COMQ objective. 1: one solve from the best candidate. Rows are
    # independent problems (channel granularity), so the choice per row is exact; tensor granularity: 1 solve.
    lambda_solves: int = 1
    dtype: str = "float32"  # float32 | float64
    step_block: int = 0  # coordinate steps per lazy-update block (an implementation detail); 0: from the shape
    block_size: int = 0  # granularity "block": input columns per scale (blockwise.py)
    block_taps: int = 1  # conv kernel taps: columns are (channel, tap), blocks run along channels per tap

    @classmethod
    def official(cls, bits: int = 4, lam: float = 1.0, **kw) -> "SolverConfig":
        """The official COMQ code's exact configuration: greedy, one sweep, asym per-channel min-max, no scale update."""
        base = dict(bits=bits, granularity="channel", scheme="asym", order="greedy", sweeps=1, scale_update=False,
                    lam=lam, zero_in_range=False, lambda_search=False)
        base.update(kw)
        return cls(**base)

    def validate(self) -> "SolverConfig":
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be an integer in 2..8, got {self.bits!r}")
        if self.granularity not in GRANULARITIES + ("block",):
            raise ValueError(f"granularity must be one of {GRANULARITIES + ('block',)}, got {self.granularity!r}")
        if (self.granularity == "block") != (self.block_size > 0):
            raise ValueError("granularity 'block' needs a block size >= 1 (and a block size needs granularity "
                             f"'block'), got granularity {self.granularity!r} with block size {self.block_size}")
        if self.granularity == "block" and self.order != "cyclic":
            raise ValueError(f"order {self.order!r} works with channel granularity only; block granularity needs "
                             "the cyclic order")
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}, got {self.scheme!r}")
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {self.order!r}")
        if not isinstance(self.sweeps, int) or self.sweeps < 1:
            raise ValueError(f"sweeps must be an integer >= 1, got {self.sweeps!r}")
        if not (isinstance(self.lam, (int, float)) and math.isfinite(self.lam) and self.lam > 0):
            raise ValueError(f"lambda must be a finite number > 0, got {self.lam!r}")
        if not isinstance(self.lambda_solves, int) or not 1 <= self.lambda_solves <= len(self.lambda_grid):
            raise ValueError(f"lambda_solves must be an integer in 1..{len(self.lambda_grid)} (the lambda grid), got "
                             f"{self.lambda_solves!r}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype!r}")
        if self.step_block < 0:
            raise ValueError(f"step_block must be >= 0, got {self.step_block}")
        return self


@dataclass
class QuantResult:
    """Result for one layer, as host (numpy) arrays.

    ``qweight = scale[:, None] * (codes - zero_point[:, None])`` (exactly: level * scale, see grid.py).
    """

    codes: np.ndarray  # int32 (m, n): unsigned 0..2^b-1 (asym) or signed -2^(b-1)..2^(b-1)-1 (sym)
    scale: np.ndarray  # (m,) float
    zero_point: np.ndarray  # int32 (m,)
    qweight: np.ndarray  # (m, n) dequantized weight, the solver's dtype
    objective: float  # sum_i e_i^T G e_i of the final weights (float64 evaluation)
    history: list = field(default_factory=list)  # objective after each sweep / scale update, in order
    bits: int = 0
    scheme: str = "asym"
    granularity: str = "channel"
    # per row, the objective up to a constant of the row's (from the solver's maintained residual; None for RTN)
    row_objective: np.ndarray | None = field(default=None, repr=False)


def _check_inputs(xp, W, G):
    if W.ndim != 2:
        raise ValueError(f"W must be 2-D (out_channels, fan_in), got shape {tuple(W.shape)}")
    m, n = W.shape
    if G.shape != (n, n):
        raise ValueError(f"G must be ({n}, {n}) to match W of shape {tuple(W.shape)}, got {tuple(G.shape)}")
    if m == 0 or n == 0:
        raise ValueError(f"W is empty (shape {tuple(W.shape)})")
    if not bool(xp.isfinite(W).all()):
        raise ValueError("W contains NaN or Inf")
    if not bool(xp.isfinite(G).all()):
        raise ValueError("G (the layer's input Gram matrix X^T X) contains NaN or Inf: check the calibration data")


def objective(W, Q, G) -> float:
    """sum_i (w_i - q_i)^T G (w_i - q_i): the product in the arrays' dtype, the sum in float64."""
    return energy(W - Q, G)


def energy(E, G) -> float:
    """sum_i e_i^T G e_i of the rows of E (``objective`` with Q = 0: W - 0 is W, bit for bit), in place of
    (E G) * E: two arrays of E's size at a time, not three."""
    EG = E @ G
    EG *= E
    return float(EG.sum(dtype="float64"))


def _row_products(W, Q, R, R0, at=slice(None)):
    """(W - Q) * R (or * (R + R0)) at index ``at`` of each array: the summands of ``_objective_from_R``, in one new
    array of W[at]'s size."""
    E = W[at] - Q[at]
    E *= R[at] if R0 is None else R[at] + R0[at]
    return E


def _objective_from_R(W, Q, R, R0=None, c=0.0, at=slice(None)) -> float:
    """The objective from the maintained R = (W - Q) G: O(mn) instead of a GEMM. Cross statistics (``R0`` = the
    initial R = W (H^T - G~), ``c`` = the input-drift constant): c + sum (W - Q) * (R + R0) (see cross_objective).
    ``at``: of the rows (or columns) it indexes only (the first candidate's of a stacked solve)."""
    return float(_row_products(W, Q, R, R0, at).sum(dtype="float64")) + c


def _rows_from_R(W, Q, R, R0, axis, at=slice(None)):
    """``_objective_from_R`` without the constant, summed over ``axis`` only (per row, or per group), on the host."""
    xp = array_module(W)
    return to_numpy(_row_products(W, Q, R, R0, at).sum(axis=axis, dtype=xp.float64))


def cross_objective(W, Q, G0, H, Gt) -> float:
    """||X W^T - X~ Q^T||^2 = sum_i w_i^T G0 w_i - 2 q_i^T H w_i + q_i^T G~ q_i from G0 = X^T X, H = X~^T X and
    G~ = X~^T X~ (inputs of the float and of the partly quantized model, docs/design.md, "Sequential capture").

    Evaluated without cancellation as c + 2 sum E * (W (H - G~)^T) + sum E * (E G~), E = W - Q, with the input-drift
    constant c = sum_i w_i^T (G0 - H - H^T + G~) w_i formed in float64; with H = G~ = G0 it is sum e_i^T G e_i."""
    xp = array_module(W)
    D = xp.asarray(G0, dtype=xp.float64) - H - xp.asarray(H).T + Gt  # (X - X~)^T (X - X~)
    P = W @ xp.asarray(H - Gt, dtype=W.dtype).T
    P *= W - Q
    return (energy(W, D.astype(W.dtype)) + 2 * float(P.sum(dtype="float64"))
            + objective(W, Q, xp.asarray(Gt, dtype=W.dtype)))


def _prepare_cross(xp, W, Gt, H, G0):
    """H in the solver's dtype and layout, and the objective's input-drift constant (0 without G0)."""
    H = xp.ascontiguousarray(xp.asarray(H, dtype=W.dtype))
    if H.shape != Gt.shape:
        raise ValueError(f"H (X~^T X) must have the shape of G~ {tuple(Gt.shape)}, got {tuple(H.shape)}")
    if not bool(xp.isfinite(H).all()):
        raise ValueError("H (the cross statistics X~^T X) contains NaN or Inf: check the calibration data")
    if G0 is None:
        return H, 0.0
    D = xp.asarray(G0, dtype=xp.float64) - H - xp.swapaxes(H, -1, -2) + Gt  # (X - X~)^T (X - X~), per group
    WD = W @ D.astype(W.dtype)
    WD *= W
    c = WD.sum(axis=(-2, -1), dtype=xp.float64)
    return H, c


def greedy_order(W, g):
    """Per-row order of coordinates, |W_ij| * sqrt(G_jj) descending (stable: ties keep column order)."""
    xp = array_module(W)
    score = xp.abs(W) * xp.sqrt(xp.maximum(g, 0))[None, :]
    if xp is np:
        return np.argsort(-score, axis=1, kind="stable")
    return xp.argsort(-score, axis=1)  # cupy's argsort is stable (radix sort)


def importance_order(W, g):
    """One order for all rows: columns by sqrt(G_jj) * ||W_:j||_2 descending (stable)."""
    xp = array_module(W)
    score = xp.sqrt(xp.maximum(g, 0)) * xp.sqrt((W * W).sum(axis=0))
    if xp is np:
        return np.argsort(-score, kind="stable")
    return xp.argsort(-score)


def safe_dtype(xp, W, G, dtype: str):
    """The solver's float type: ``dtype``, or float64 for a layer whose products would overflow float32 (weights
    or input statistics near float32's range: sum_j |e_j| |G_jk| |e_k| reaches n * max|w|^2 * max|G|, and the
    scale update's c^T G c over integer levels c up to 255 reaches n^2 255^2 max|G|)."""
    if dtype == "float64":
        return xp.float64
    return xp.float64 if overflow_risk(W.shape[-1], _absmax(xp, W), _absmax(xp, G)) else xp.float32


def overflow_risk(n: int, wmax: float, gmax: float) -> bool:
    """``safe_dtype``'s rule from max |w| and max |G|: float32 products could overflow."""
    with np.errstate(over="ignore"):  # (the levels' term: a layer of tiny weights whose inputs are huge)
        risk = np.float64(n) * np.float64(gmax) * max(np.float64(wmax) ** 2 * 256, np.float64(n) * 256 ** 2)
    return not np.isfinite(risk) or risk > 1e36


def _absmax(xp, a) -> float:
    """max |a| (0 for an empty array) without an |a| copy of the array: max(max a, -min a), the same number."""
    a = xp.asarray(a)
    return max(float(a.max()), -float(a.min())) if a.size else 0.0


def _prepare(W, G, cfg: SolverConfig, xp):
    cfg = cfg.validate()
    if xp is None:
        xp = array_module(W) if array_module(G) is array_module(W) else np
    dt = safe_dtype(xp, W, G, cfg.dtype)
    # C order matters: the sweep writes through flat views (reshape(-1) of an F-ordered array is a copy)
    W = xp.ascontiguousarray(xp.asarray(W, dtype=dt))
    G = xp.ascontiguousarray(xp.asarray(G, dtype=dt))
    _check_inputs(xp, W, G)
    return cfg, xp, W, G


def _result(xp, W, G, grid: Grid, Q, level, history, obj=None) -> QuantResult:
    codes = grid.codes(level)
    return QuantResult(
        codes=to_numpy(codes).astype(np.int32),
        scale=to_numpy(grid.scale).astype(W.dtype),
        zero_point=to_numpy(grid.zero_point()).astype(np.int32),
        qweight=to_numpy(Q),
        objective=objective(W, Q, G) if obj is None else obj,
        history=history,
        bits=grid.bits, scheme=grid.scheme, granularity=grid.granularity,
    )


def rtn_quantize(W, G, cfg: SolverConfig = SolverConfig(), xp=None) -> QuantResult:
    """Round-to-nearest on the same initial grid as COMQ (the baseline every report compares against)."""
    cfg, xp, W, G = _prepare(W, G, cfg, xp)
    grid = make_grid(W, cfg.bits, cfg.scheme, cfg.granularity, cfg.lam, cfg.zero_in_range)
    Q, level = grid.nearest(W)
    return _result(xp, W, G, grid, Q, level, [objective(W, Q, G)])


def _default_block(m: int, n: int, per_row: bool) -> int:
    if per_row:
        # the gathered sub-Grams are m * B * B; keep them around 16 M elements
        return int(max(16, min(128, n, math.isqrt(max(1, (1 << 24) // max(m, 1))))))
    return int(min(256, n))


def _step_block(xp, Rb, Qb, Wb, gb, gs, Gs, nearest, per_row: bool, sub: int):
    """The steps of one block, in place on (B, m) arrays: row k of Rb/Qb/Wb is step k's coordinate in every row.

    gb/gs: G_jj (and G_jj with 0 -> 1) per step, (B, 1) for a shared order or (B, m) per row. Gs: the block's
    sub-Gram, (B, B, 1) shared or (B, B, m) per row. The block is split recursively into chunks (4 per level,
    down to ``sub`` steps); a finished chunk updates the later rows of its parent with one GEMM, and inside the
    smallest chunks each step updates the next rows directly. Returns the changes D = Q_old - Q_new (B, m).
    """
    live = gb > 0
    # dead inputs (G_jj = 0) keep the nearest grid point of w_ij
    live = None if bool(live.all()) else live
    Q0 = Qb.copy()
    # (module-level helpers, not closures: a recursive closure is a reference cycle that kept every call's copies
    # of R and Q0 alive until Python's cycle collector ran, so peak memory grew with the number of calls)
    _step_chunk(xp, Rb, Qb, Q0, Wb, gs, Gs, live, nearest, per_row, sub, 0, Rb.shape[0])
    Q0 -= Qb
    return Q0


def _step_range(xp, Rb, Qb, Wb, gs, Gs, live, nearest, a: int, e: int):
    """Steps a..e-1 of a block, each updating the later rows of the range directly (``_step_block``)."""
    for t in range(a, e):
        qt = Qb[t]
        target = Rb[t] / gs[t]
        target += qt
        if live is not None:
            target = xp.where(live[t], target, Wb[t])
        q = nearest(target)
        d = qt - q
        Qb[t] = q
        if t + 1 < e:
            Rb[t + 1:e] += Gs[t, t + 1:e] * d


def _step_chunk(xp, Rb, Qb, Q0, Wb, gs, Gs, live, nearest, per_row: bool, sub: int, a: int, e: int):
    """Steps a..e-1 of a block, split recursively into 4 chunks per level down to ``sub`` steps (``_step_block``)."""
    if e - a <= sub:
        _step_range(xp, Rb, Qb, Wb, gs, Gs, live, nearest, a, e)
        return
    size = max(sub, -(-(e - a) // 4))
    for c in range(a, e, size):
        c1 = min(c + size, e)
        _step_chunk(xp, Rb, Qb, Q0, Wb, gs, Gs, live, nearest, per_row, sub, c, c1)
        if c1 < e:
            Dc = Q0[c:c1] - Qb[c:c1]  # (s, m)
            if per_row:
                Rb[c1:e] += xp.einsum("si,ski->ki", Dc, Gs[c:c1, c1:e])
            else:
                Rb[c1:e] += Gs[c1:e, c:c1, 0] @ Dc


def _sweep_shared(xp, Wt, Qt, Rt, G, g, gsafe, grid: Grid, block: int, sub: int = 16):
    """One exact cyclic pass in the transposed layout: Wt, Qt, Rt are (n, m) (Rt = G (W - Q)^T), so a block of
    coordinates is a slice of rows and every step works on one contiguous row. Any shared order is turned into
    this cyclic one by permuting W and G beforehand."""
    n = Wt.shape[0]
    nearest = grid.nearest_value
    for t0 in range(0, n, block):
        t1 = min(t0 + block, n)
        # the steps update a copy of the block's rows of R; then every row of R, the block's own included, gets
        # all of the block's changes in one GEMM
        D = _step_block(xp, Rt[t0:t1].copy(), Qt[t0:t1], Wt[t0:t1], g[t0:t1, None], gsafe[t0:t1, None],
                        G[t0:t1, t0:t1, None], nearest, False, sub)
        Rt += G[:, t0:t1] @ D


def _sweep_rows(xp, W, Q, R, G, g, gsafe, grid: Grid, order, block: int, sub: int = 16):
    """One exact pass with a per-row order (m, n) in the (m, n) layout: each block gathers, per row, the step's
    coordinates and their sub-Gram; the block's changes reach all of R by a scatter and one GEMM."""
    m, n = W.shape
    Qf, Wf, Rf = Q.reshape(-1), W.reshape(-1), R.reshape(-1)
    row_base = (xp.arange(m) * n)[None, :]
    for t0 in range(0, n, block):
        S = order[:, t0:min(t0 + block, n)].T  # (B, m): the coordinate of row i at step t0 + k
        flat = row_base + S
        Qb = Qf[flat]
        Gs = G.reshape(-1)[S[:, None, :] * n + S[None, :, :]]  # Gs[k, l, i] = G[S[k, i], S[l, i]]
        D = _step_block(xp, Rf[flat], Qb, Wf[flat], g[S], gsafe[S], Gs, grid.nearest_value, True, sub)
        Qf[flat] = Qb
        Dsp = xp.zeros_like(R)
        Dsp.reshape(-1)[flat] = D
        R += Dsp @ G


def _scale_update(xp, W, level, R, G, grid: Grid, transposed: bool = False, H=None):
    """Closed-form best scale for fixed integer levels (per row, or one per layer); keeps the old one if not > 0.

    q_i = scale_i * c_i with integer levels c_i, so scale_i = (c_i^T G w_i) / (c_i^T G c_i). Returns the new
    R = (W - Q) G from the same product C G: R_new = R_old + (scale_old - scale_new) * C G (one GEMM, not two).
    ``transposed``: W, level, R are (n, m) and R = G (W - Q)^T. W, level, R may also be (groups, m, n) with G
    (groups, n, n): independent groups whose rows are the grid's rows. Cross statistics (``H`` = X~^T X, or H^T
    in C order when ``transposed``, so that H = G gives bit for bit the products of G; G = G~):
    scale_i = (c_i^T H w_i) / (c_i^T G~ c_i), and R = W H^T - Q G~ moves by the same (scale_old - scale_new) C G~.
    """
    ax = 0 if transposed else -1
    CG = G @ level if transposed else level @ G
    CH = CG if H is None else (H @ level if transposed else level @ H)
    num = (CH * W).sum(axis=ax).reshape(-1)
    den = (CG * level).sum(axis=ax).reshape(-1)
    if grid.granularity == "tensor":
        num = xp.full_like(num, num.sum())
        den = xp.full_like(den, den.sum())
    ok = (den > 0) & (num > 0)
    new = xp.where(ok, num / xp.where(ok, den, 1), grid.scale).astype(W.dtype)
    step = grid.scale - new
    CG *= step[None, :] if transposed else step.reshape(W.shape[:-1] + (1,))
    R += CG  # (in place: the same numbers as R + step * CG, one array of R's size less)
    grid.set_scale(new)
    return R


def comq_quantize(W, G, cfg: SolverConfig = SolverConfig(), xp=None, H=None, G0=None, perm=None) -> QuantResult:
    """Quantize one layer's weight W (m, n) given its input Gram G = X^T X (n, n) with COMQ.

    ``xp`` selects numpy or cupy (default: the module of W). Returns host arrays (``QuantResult``).
    Cross statistics (sequential capture): with ``H`` = X~^T X, ``G`` is G~ = X~^T X~ and the problem is
    min ||X W^T - X~ Q^T||^2: the same sweeps from R = W (H^T - G~) instead of 0, the scale update with H. ``G0`` =
    X^T X only adds the objective's constant (reported objective = ``cross_objective``; without it, up to a constant).
    With H = G~ = G the codes are exactly those of the plain problem. ``perm``: the column order of the importance
    order, given (a chunk of W's rows is solved in the order of the whole W: solve.layer); else from W.
    """
    cfg, xp, W, G = _prepare(W, G, cfg, xp)
    cross = H is not None
    c = 0.0
    if cross:
        H, c = _prepare_cross(xp, W, G, H, G0)
        c = float(c)  # (a 0-d device array on a GPU: the objectives and history are host floats)
    lams = [cfg.lam]
    if cfg.lambda_search:
        solves = cfg.lambda_solves if cfg.granularity == "channel" else 1
        lams = search_lambda(W, G, cfg.bits, cfg.scheme, cfg.granularity, cfg.lambda_grid, cfg.zero_in_range,
                             top=solves)
    if len(lams) == 1:
        return _comq_solve(cfg, xp, W, G, H, c, lams[0], perm)
    m, n = W.shape
    if cfg.order == "importance" and perm is None:  # (from W itself: the stacked copies would round its norms)
        perm = importance_order(W, xp.diagonal(G))

    def solve(batch):  # the rows of several candidates' solves at once
        if len(batch) == 1:
            return [_comq_solve(cfg, xp, W, G, H, c, batch[0], perm)]
        lam = xp.concatenate([xp.broadcast_to(xp.asarray(v, dtype=W.dtype), (m,)) for v in batch])
        r = _comq_solve(cfg, xp, xp.concatenate([W] * len(batch)), G, H, c, lam, perm, first=m)
        rows, r.row_objective = _pick(r.row_objective, len(batch))
        return [replace(r, codes=r.codes[rows], scale=r.scale[rows], zero_point=r.zero_point[rows],
                        qweight=r.qweight[rows])]

    return _best_rows(_stacked(solve, lams, m * n), c)[0]


STACK_ELEMENTS = 1 << 21  # weights in one stacked solve: only small layers gain (the big ones are GEMM-bound)


def _stacked(solve, lams, size: int):
    """The lambda candidates' solves in batches: ``solve(batch)`` of a list of lams -> the result list (one per
    group) of each row's best candidate of the batch; as many candidates per batch as keep a solve within
    ``STACK_ELEMENTS`` weights, in order. Rows are independent problems: stacking k candidates' copies of W solves
    them in one pass of the coordinate loop (k times fewer, k times wider steps), every row as its own solve would
    (to the last bits of float32 sums of other widths)."""
    per = max(1, min(len(lams), STACK_ELEMENTS // max(size, 1)))
    for i in range(0, len(lams), per):
        yield solve(lams[i:i + per])


def _pick(row_objective, k: int) -> tuple:
    """For rows stacked as k candidates' copies (``(..., k * m)`` objectives on the host): per row, the index of
    its best copy among the k * m rows (ties: the earlier candidate, as ``_best_rows``) and its objective."""
    *lead, km = row_objective.shape
    m = km // k
    obj = row_objective.reshape(*lead, k, m)
    j = np.argmin(obj, axis=-2)[..., None, :]
    return j[..., 0, :] * m + np.arange(m), np.take_along_axis(obj, j, axis=-2)[..., 0, :]


def _best_rows(results, const) -> list:
    """Per row, the best of the candidate solves ``results`` (an iterable of lists of QuantResult, one per group;
    one list per lam) by the rows' objectives (ties: the earlier lam), merged in place into the first solve's
    results so that few solves are held at a time. Rows are independent problems with per-channel grids, so mixing
    rows is exact. ``const``: the constant of each group's objective beyond its rows' (0, or the cross statistics'
    input-drift term)."""
    best = None
    for rs in results:
        if best is None:
            best = rs
            continue
        for rb, r in zip(best, rs):
            take = r.row_objective < rb.row_objective
            if take.any():
                for name in ("codes", "scale", "zero_point", "qweight", "row_objective"):
                    getattr(rb, name)[take] = getattr(r, name)[take]
        del rs, r, rb  # (this solve's results go before the next solve's arrays are made)
    for b, rb in enumerate(best):
        obj = float(rb.row_objective.sum() + (const[b] if np.ndim(const) else const))
        rb.history = rb.history + [obj]
        rb.objective = obj
    return best


def _comq_solve(cfg: SolverConfig, xp, W, G, H, c, lam, perm=None, first: int = 0) -> QuantResult:
    """``comq_quantize`` on prepared arrays from the grid of shrink factor ``lam`` (a number or one per row).
    ``first`` > 0: W is several candidates' copies stacked (``_stacked``), and the history is the first's, its
    first ``first`` rows."""
    cross = H is not None
    m, n = W.shape
    f = slice(0, first or m)
    grid = make_grid(W, cfg.bits, cfg.scheme, cfg.granularity, lam, cfg.zero_in_range)
    g = xp.ascontiguousarray(xp.diagonal(G)).copy()
    gsafe = xp.where(g > 0, g, 1)
    history = []
    if cfg.order == "greedy":  # per-row orders: (m, n) layout with gathers
        order = greedy_order(W, g)
        block = cfg.step_block or _default_block(m, n, True)
        Q = W.copy()  # the official start: Q = W, so R = (W - Q) G = 0
        R = W @ (H.T - G) if cross else xp.zeros_like(W)
        R0, c0 = (R.copy(), c) if cross else (None, 0.0)
        for _ in range(cfg.sweeps):
            level = None  # (the last sweep's levels are not held during this one)
            _sweep_rows(xp, W, Q, R, G, g, gsafe, grid, order, block)
            _swept()
            level = grid.levels_of(Q)
            history.append(_objective_from_R(W, Q, R, R0, c0, f))
            if cfg.scale_update:
                R = _scale_update(xp, W, level, R, G, grid, H=H)
                Q = grid.values(level)
                history.append(_objective_from_R(W, Q, R, R0, c0, f))
        res = _result(xp, W, G, grid, Q, level, history, obj=history[-1])
        res.row_objective = _rows_from_R(W, Q, R, R0, axis=1)
        return res

    # shared orders: permute the columns so that the order is cyclic, and work in the transposed layout
    if cfg.order != "importance":
        perm = None
    elif perm is None:
        perm = importance_order(W, g)
    Wp, Gp, gp, gsp = W, G, g, gsafe
    Hp = H
    if perm is not None:
        Wp, Gp, gp, gsp = W[:, perm], G[perm][:, perm], g[perm], gsafe[perm]
        Hp = H[perm][:, perm] if cross else None
    Wt = xp.ascontiguousarray(Wp.T)
    Gp = xp.ascontiguousarray(Gp)
    Qt = Wt.copy()
    Rt = (Hp - Gp) @ Wt if cross else xp.zeros_like(Wt)  # R^T = (H - G~) W^T at Q = W
    Rt0, c0 = (Rt.copy(), c) if cross else (None, 0.0)
    Hpt = xp.ascontiguousarray(Hp.T) if cross else None
    block = cfg.step_block or _default_block(m, n, False)
    for _ in range(cfg.sweeps):
        level_t = None  # (the last sweep's levels are not held during this one)
        _sweep_shared(xp, Wt, Qt, Rt, Gp, gp, gsp, grid, block)
        _swept()
        level_t = grid.levels_of(Qt, transposed=True)
        history.append(_objective_from_R(Wt, Qt, Rt, Rt0, c0, (slice(None), f)))
        if cfg.scale_update:
            Rt = _scale_update(xp, Wt, level_t, Rt, Gp, grid, transposed=True, H=Hpt)
            Qt = grid.values(level_t, transposed=True)
            history.append(_objective_from_R(Wt, Qt, Rt, Rt0, c0, (slice(None), f)))
    rows = _rows_from_R(Wt, Qt, Rt, Rt0, axis=0)
    del Wt, Rt, Rt0  # (the solve's arrays go before the result's are made)
    Q, level = xp.empty_like(W), xp.empty_like(W)
    cols = perm if perm is not None else slice(None)
    Q[:, cols] = Qt.T
    del Qt
    level[:, cols] = level_t.T
    del level_t
    # the last history entry is the final objective, from R (exact up to the float drift of the lazy updates)
    res = _result(xp, W, G, grid, Q, level, history, obj=history[-1])
    res.row_objective = rows
    return res


def _group_results(xp, W3, G3, grid: Grid, Q3, level3, objs, histories, pick=None) -> list:
    """One QuantResult per group; ``pick`` (B, m'), host: the rows of each group to keep (``_pick``)."""
    B, m, n = W3.shape
    codes = to_numpy(grid.codes(level3.reshape(B * m, n))).astype(np.int32).reshape(B, m, n)
    scale = to_numpy(grid.scale).astype(W3.dtype).reshape(B, m)
    zp = to_numpy(grid.zero_point()).astype(np.int32).reshape(B, m)
    Qh = to_numpy(Q3)
    if pick is not None:
        codes, Qh = (np.take_along_axis(a, pick[:, :, None], axis=1) for a in (codes, Qh))
        scale, zp = (np.take_along_axis(a, pick, axis=1) for a in (scale, zp))
    return [QuantResult(codes=codes[b], scale=scale[b], zero_point=zp[b], qweight=Qh[b], objective=float(objs[b]),
                        history=[float(h[b]) for h in histories], bits=grid.bits, scheme=grid.scheme,
                        granularity=grid.granularity) for b in range(B)]


def _group_from_R(W3, Q3, R3, R30, c3, at=slice(None)):
    """Per-group ``_objective_from_R``."""
    return _rows_from_R(W3, Q3, R3, R30, (1, 2), at) + c3


def _group_objective(E3, G3):
    xp = array_module(E3)
    return to_numpy(((E3 @ G3) * E3).sum(axis=(1, 2), dtype=xp.float64))


def _prepare_groups(W3, G3, cfg: SolverConfig, xp):
    cfg = cfg.validate()
    if cfg.granularity != "channel" or cfg.order != "cyclic":
        raise ValueError("the batched group solver supports channel granularity and the cyclic order only")
    xp = xp or array_module(W3)
    dt = safe_dtype(xp, W3, G3, cfg.dtype)
    W3 = xp.ascontiguousarray(xp.asarray(W3, dtype=dt))
    G3 = xp.ascontiguousarray(xp.asarray(G3, dtype=dt))
    if W3.ndim != 3 or G3.shape != (W3.shape[0], W3.shape[2], W3.shape[2]):
        raise ValueError(f"expected W (groups, m, n) and G (groups, n, n), got {W3.shape} and {G3.shape}")
    _check_inputs(xp, W3.reshape(-1, W3.shape[2]), G3.reshape(-1, G3.shape[2])[:G3.shape[2]])
    if not bool(xp.isfinite(G3).all()):
        raise ValueError("G (the layer's input Gram matrix X^T X) contains NaN or Inf: check the calibration data")
    return cfg, xp, W3, G3


def rtn_quantize_groups(W3, G3, cfg: SolverConfig = SolverConfig(), xp=None) -> list:
    """``rtn_quantize`` of many independent small problems at once: W3 (groups, m, n), G3 (groups, n, n)."""
    cfg, xp, W3, G3 = _prepare_groups(W3, G3, replace(cfg, order="cyclic", granularity="channel"), xp)
    B, m, n = W3.shape
    grid = make_grid(W3.reshape(B * m, n), cfg.bits, cfg.scheme, "channel", cfg.lam, cfg.zero_in_range)
    Q, level = grid.nearest(W3.reshape(B * m, n))
    Q3 = Q.reshape(B, m, n)
    objs = _group_objective(W3 - Q3, G3)
    return _group_results(xp, W3, G3, grid, Q3, level.reshape(B, m, n), objs, [objs])


def comq_quantize_groups(W3, G3, cfg: SolverConfig = SolverConfig(), xp=None, H3=None, G03=None) -> list:
    """``comq_quantize`` of many independent small problems at once (conv groups, e.g. depthwise convs): W3
    (groups, m, n), G3 (groups, n, n); cyclic order, per-channel grids. Each step updates one coordinate of every
    row of every group with a few vector ops; the same results as solving the groups one by one. ``H3``/``G03``:
    cross statistics per group, as in ``comq_quantize`` (then G3 holds G~)."""
    cfg, xp, W3, G3 = _prepare_groups(W3, G3, cfg, xp)
    cross = H3 is not None
    if cross:
        H3, c3 = _prepare_cross(xp, W3, G3, H3, G03)
    B, m, n = W3.shape
    W2 = W3.reshape(B * m, n)
    c3 = to_numpy(c3) if cross and G03 is not None else 0.0
    lams = [cfg.lam]
    if cfg.lambda_search:
        lams = search_lambda(W2, G3, cfg.bits, cfg.scheme, "channel", cfg.lambda_grid, cfg.zero_in_range,
                             top=cfg.lambda_solves)
    if len(lams) == 1:
        return _comq_solve_groups(cfg, xp, W3, G3, H3, c3, lams[0])

    def solve(batch):  # the candidates' rows stacked in each group
        if len(batch) == 1:
            return _comq_solve_groups(cfg, xp, W3, G3, H3, c3, batch[0])
        lam = xp.stack([xp.broadcast_to(xp.asarray(v, dtype=W3.dtype), (B * m,)).reshape(B, m) for v in batch], 1)
        return _comq_solve_groups(cfg, xp, xp.concatenate([W3] * len(batch), axis=1), G3, H3, c3, lam.reshape(-1),
                                  first=m)

    return _best_rows(_stacked(solve, lams, W3.size), c3)


def _comq_solve_groups(cfg: SolverConfig, xp, W3, G3, H3, c3, lam, first: int = 0) -> list:
    """``comq_quantize_groups`` on prepared arrays from the grid of shrink factor ``lam``. ``first``: as in
    ``_comq_solve``, per group."""
    cross = H3 is not None
    B, m, n = W3.shape
    f = slice(0, first or m)
    W2 = W3.reshape(B * m, n)
    grid = make_grid(W2, cfg.bits, cfg.scheme, "channel", lam, cfg.zero_in_range)
    g = xp.ascontiguousarray(xp.diagonal(G3, axis1=1, axis2=2))  # (B, n)
    gsafe = xp.where(g > 0, g, 1)
    live = g > 0
    has_dead = not bool(live.all())
    Q3 = W3.copy()
    R3 = W3 @ (xp.swapaxes(H3, 1, 2) - G3) if cross else xp.zeros_like(W3)
    R30 = R3.copy() if cross else None
    histories = []
    for _ in range(cfg.sweeps):
        for t in range(n):
            qt = Q3[:, :, t]
            target = qt + R3[:, :, t] / gsafe[:, t, None]
            if has_dead:
                target = xp.where(live[:, t, None], target, W3[:, :, t])
            q = grid.nearest_value(target.reshape(-1)).reshape(B, m)
            d = qt - q
            Q3[:, :, t] = q
            R3 += d[:, :, None] * G3[:, None, t, :]
        _swept()
        level3 = grid.levels_of(Q3.reshape(B * m, n)).reshape(B, m, n)
        histories.append(_group_from_R(W3, Q3, R3, R30, c3, (slice(None), f)))
        if cfg.scale_update:
            R3 = _scale_update(xp, W3, level3, R3, G3, grid, H=H3)
            Q3 = grid.values(level3.reshape(B * m, n)).reshape(B, m, n)
            histories.append(_group_from_R(W3, Q3, R3, R30, c3, (slice(None), f)))
    rows = _rows_from_R(W3, Q3, R3, R30, axis=2)  # (B, m)
    pick = None
    if first:  # each group's rows: the best of its stacked candidates' copies
        pick, rows = _pick(rows, m // first)
    out = _group_results(xp, W3, G3, grid, Q3, level3, histories[-1], histories, pick)
    for r, row in zip(out, rows):
        r.row_objective = row
    return out


__all__ = ["SolverConfig", "QuantResult", "on_sweep", "comq_quantize", "rtn_quantize", "comq_quantize_groups",
           "rtn_quantize_groups", "objective", "cross_objective", "greedy_order", "importance_order"]
