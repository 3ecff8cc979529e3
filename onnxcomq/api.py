"""The pipeline: read graph -> capture statistics -> solve -> emit QDQ -> verify.

    model = onnxcomq.quantize("model.onnx", "calib.npz", onnxcomq.QuantizeConfig(bits=4))
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import onnx

from .backend import get_xp
from .bias import apply as apply_bias
from .bias import bias_target
from .calib import Calibration, model_inputs
from .emit import QuantizedWeight, emit_qdq
from .errors import UserError
from .graph import SUPPORTED_OPS, find_layers, load_weight, node_names
from .modelio import prepare_model
from .sequential import capture, plan_stages, quantized_twin, reiterable, stage_entries
from .solver import (SolverConfig, comq_quantize, comq_quantize_groups, cross_objective, objective, rtn_quantize,
                     rtn_quantize_groups)

log = logging.getLogger("onnxcomq")
AUTO_DAMPING_FALLBACK = 0.1  # damping "auto" for a layer that turned out short of rows but kept no folds


@dataclass
class QuantizeConfig:
    """Everything that decides the output. ``official=True`` selects the official COMQ code's configuration
    (greedy order, one sweep, asymmetric per-channel min-max grid, no scale update), whatever the other fields say."""

    bits: int = 4
    granularity: str = "channel"  # channel | tensor
    scheme: str = "asym"  # asym | sym
    order: str = "cyclic"  # cyclic | importance | greedy (per row, the official code's; gathers, slower on CPU)
    sweeps: int = 3
    scale_update: bool = True
    lam: float = 1.0
    # per-channel lam among SolverConfig.lambda_grid by the objective (replaces lam); None: at <= 4 bits, where it
    # was measured to help (MiniLM W4: -21 % objective); at 6 bits it cost +5..8 % on the reference CNN and ViT
    lambda_search: bool | None = None
    bias_correction: bool = True  # free bias: solve on the centered Gram, fold the mean error into the bias
    # add damping * mean(diag G) * I to G of layers with few calibration rows (measured: EfficientNet-Lite0 W4 KL
    # 0.203 -> 0.165, MiniLM W4 cosine 0.9798 -> 0.9805; 0.3 was worse than 0.1). "auto": per layer, the value of
    # damping_grid with the lowest held-out error (solve on one half of the samples, evaluate on the other);
    # measured vs 0.1: MiniLM W4 cosine 0.9805 -> 0.9810, W3 0.9335 -> 0.9344 (1.6-3.3x the solve time),
    # EfficientNet-Lite0 W4 agreement 0.755 -> 0.7375, KL 0.165 -> 0.173 (it chose 1.0 there): 0.1 stays the default
    damping: float | str = 0.1
    damping_rows: float = 4.0  # "few": fewer rows than this times the fan-in
    damping_grid: tuple = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0)
    # sequential (error-feeding) capture: quantize in `stages` topological stages; each later stage's layers solve
    # min ||X W^T - X~ Q^T||^2 with X~ their input in the model whose earlier stages are quantized (2 passes/stage).
    # Off by default: measured on EfficientNet-Lite0 W4 (64 calibration images, 96 held-out crops) agreement
    # 0.802 one pass, 0.781 with 4 stages, 0.750 with 8, 0.771 with 4 stages without correction, at 2-10x the time
    sequential: bool = False
    stages: int = 4
    # which layers of a stage fit the float output X W from X~ (error correction); the others fit X~ W: "entry"
    # (those whose input depends on no layer of their stage), "all", or "none"
    correction: str = "entry"
    mask_input: str | None = "auto"  # attention-mask input: padded tokens stay out of G ("auto": common names)
    method: str = "comq"  # comq | rtn (round-to-nearest baseline on the same grid)
    official: bool = False
    batch_size: int = 32
    max_samples: int | None = None
    device: str = "auto"  # auto | cpu | gpu
    dtype: str = "float32"
    op_types: tuple = SUPPORTED_OPS
    exclude: tuple = ()

    def solver_config(self) -> SolverConfig:
        if self.official:
            cfg = SolverConfig.official(bits=self.bits, lam=self.lam, dtype=self.dtype)
        else:
            cfg = SolverConfig(bits=self.bits, granularity=self.granularity, scheme=self.scheme, order=self.order,
                               sweeps=self.sweeps, scale_update=self.scale_update, lam=self.lam, dtype=self.dtype,
                               lambda_search=self.bits <= 4 if self.lambda_search is None
                               else self.lambda_search)
        try:
            return cfg.validate()
        except ValueError as e:
            raise UserError(str(e)) from None

    def validate(self) -> "QuantizeConfig":
        self.solver_config()
        if self.damping != "auto" and not (isinstance(self.damping, (int, float)) and self.damping >= 0
                                           and np.isfinite(self.damping)):
            raise UserError(f"damping must be 'auto' or a finite number >= 0, got {self.damping!r}")
        if not self.damping_grid or any(not (isinstance(a, (int, float)) and a >= 0 and np.isfinite(a))
                                        for a in self.damping_grid):
            raise UserError(f"damping grid must hold finite numbers >= 0, got {self.damping_grid!r}")
        if self.correction not in ("entry", "all", "none"):
            raise UserError(f"correction must be entry, all or none, got {self.correction!r}")
        if not isinstance(self.stages, int) or self.stages < 1:
            raise UserError(f"stages must be an integer >= 1, got {self.stages!r}")
        if self.method not in ("comq", "rtn"):
            raise UserError(f"method must be comq or rtn, got {self.method!r}")
        if self.device not in ("auto", "cpu", "gpu"):
            raise UserError(f"device must be auto, cpu or gpu, got {self.device!r}")
        return self


@dataclass
class LayerReport:
    node: str
    op_type: str
    weight: str
    shape: list
    groups: int
    bits: int
    rows: int  # calibration rows of X
    comq_error: float  # ||X (W - Q)^T||^2 / ||X W^T||^2 of the chosen weights
    rtn_error: float  # the same for round-to-nearest on the same initial grid
    seconds: float
    rtn_groups: int = 0  # groups (conv groups; 1 for other layers) where COMQ did not beat RTN and RTN was kept
    bias_corrected: bool = False  # the layer's bias was re-fitted (free bias)
    damped: bool = False  # few calibration rows for the fan-in: G was damped
    damping: float = 0.0  # the damping strength used (chosen on held-out rows with damping "auto")
    stage: int = 0  # the sequential-capture stage that quantized the layer
    corrected: bool = False  # sequential capture: the layer fit the float output from the quantized model's input
    consumers: list = field(default_factory=list)


@dataclass
class Report:
    layers: list
    skipped: list
    config: dict
    samples: int
    capture_seconds: float
    solve_seconds: float
    total_seconds: float = 0.0
    float_bytes: int = 0
    quant_bytes: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


MASK_NAMES = ("attention_mask", "input_mask", "mask", "attn_mask")


def resolve_mask_input(model: onnx.ModelProto, name: str | None) -> str | None:
    """The attention-mask input to use: ``name``, or with "auto" the first input with a common mask name."""
    inputs = [i.name for i in model_inputs(model)]
    if name in (None, "", "none"):
        return None
    if name == "auto":
        return next((n for n in MASK_NAMES if n in inputs), None)
    if name not in inputs:
        raise UserError(f"--mask-input {name}: the model has no such input (inputs: {', '.join(inputs)})")
    return name


def _rel(num: float, den: float) -> float:
    return float(num / den) if den > 0 else 0.0


def run(model_or_path, calibration, config: QuantizeConfig | None = None, progress: bool = False):
    """Quantize and return ``(quantized ModelProto, Report)``."""
    config = (config or QuantizeConfig()).validate()
    t_start = time.perf_counter()
    model = prepare_model(model_or_path)
    layers, skipped = find_layers(model, op_types=tuple(config.op_types), exclude=tuple(config.exclude))
    if not layers:
        why = "; ".join(f"{s.node}: {s.reason}" for s in skipped[:5]) or "it has no Conv, Gemm or MatMul node"
        raise UserError(f"no quantizable layer found ({why})")
    calib = calibration if isinstance(calibration, Calibration) else Calibration(
        calibration, model_inputs(model), batch_size=config.batch_size, max_samples=config.max_samples)

    mask_input = resolve_mask_input(model, config.mask_input)
    scfg = config.solver_config()
    comq = config.method == "comq"
    sequential = config.sequential and comq and not config.official and len(layers) > 1
    batches = calib
    if sequential and not reiterable(calib):  # a one-shot source: keep its batches for the later stages
        batches = list(calib)
    stages = plan_stages(layers, config.stages) if sequential else [layers]
    ctx = _LayerContext(config, scfg, config.bias_correction and comq and not config.official,
                        0.0 if config.official else config.damping, get_xp(config.device),
                        dict(zip(node_names(model), model.graph.node)), {t.name: t for t in model.graph.initializer},
                        model, np.float64 if scfg.dtype == "float64" else np.float32)
    qweights, reports, deltas = [], [], {}
    t_capture = t_solve = 0.0
    bar = _bar(progress, total=(calib.num_samples or 0) * len(stages) or None, desc="capture", unit="sample")
    solve_bar = _bar(progress, total=len(layers), desc="solve", unit="layer")
    for s, stage in enumerate(stages):
        specs = {spec: layer.groups for layer in stage for _, spec in layer.consumers}
        fold_below = {spec: config.damping_rows * spec.fan_in for spec in specs} if ctx.damping == "auto" else None
        t0 = time.perf_counter()
        twin = quantized_twin(model, qweights, apply_bias, deltas) if s > 0 else None
        try:
            stats, samples = capture(model, twin, specs, batches, bar, mask_input, fold_below, calib.num_samples or 0)
        except BaseException:
            for b in (bar, solve_bar):
                if b is not None:
                    b.close()
            raise
        t_capture += time.perf_counter() - t0
        t0 = time.perf_counter()
        entry = stage_entries(model, stage) if config.correction == "entry" else \
            {layer.node for layer in stage} if config.correction == "all" else set()
        for layer in stage:
            qw, delta, rep = _quantize_layer(ctx, layer, stats, layer.node in entry)
            rep.stage = s
            qweights.append(qw)
            reports.append(rep)
            if delta is not None:
                deltas[layer.consumers[0][0]] = delta
            if solve_bar is not None:
                solve_bar.update(1)
        t_solve += time.perf_counter() - t0
        del stats, twin
    for b in (bar, solve_bar):
        if b is not None:
            b.close()

    meta = {"method": config.method, "bits": scfg.bits, "granularity": scfg.granularity, "scheme": scfg.scheme,
            "order": scfg.order, "sweeps": scfg.sweeps, "scale_update": scfg.scale_update,
            "lambda": "search" if scfg.lambda_search else scfg.lam,
            "official": config.official, "bias_correction": bool(deltas), "calibration_samples": samples,
            "mask_input": mask_input, "damping": ctx.damping, "sequential_stages": len(stages) if len(stages) > 1 else 0}
    out = emit_qdq(apply_bias(model, deltas) if deltas else model, qweights, meta)
    report = Report(reports, [dataclasses.asdict(s) for s in skipped], meta, samples, t_capture, t_solve)
    report.total_seconds = time.perf_counter() - t_start
    report.float_bytes = model.ByteSize()
    report.quant_bytes = out.ByteSize()
    return out, report


def quantize(model_or_path, calibration, config: QuantizeConfig | None = None) -> onnx.ModelProto:
    """Quantize a float ONNX model (path or ModelProto) with COMQ; returns the QDQ ModelProto.

    ``calibration``: an .npz path (keys = input names), a folder of .npy/.npz, a dict of arrays, an iterable of
    feed dicts, an onnxruntime CalibrationDataReader, or "random" (smoke tests only).
    """
    return run(model_or_path, calibration, config)[0]


def _solve_groups(xp, mats, grams, solve_grams, scfg: SolverConfig, dt, comq: bool, cross=None, rtn: bool = True):
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
    rtns, comqs = [] if rtn else None, [] if comq else None
    for k, (Wk, Gk, Sk) in enumerate(zip(mats, grams, solve_grams)):
        Wd = xp.asarray(Wk.astype(dt))
        if rtn:
            rtns.append(rtn_quantize(Wd, xp.asarray(Gk.astype(dt)), scfg, xp))
        if comq:
            comqs.append(comq_quantize(Wd, xp.asarray(Sk.astype(dt)), scfg, xp,
                                       H=None if H is None else xp.asarray(H[k].astype(dt)),
                                       G0=None if G0 is None else xp.asarray(G0[k])))
    return rtns, comqs


@dataclass
class _LayerContext:
    config: "QuantizeConfig"
    scfg: SolverConfig
    use_bias: bool
    damping: object  # a float, or "auto"
    xp: object
    nodes: dict
    inits: dict
    model: onnx.ModelProto
    dt: type


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


def _damp(stats: list, alpha: float) -> list:
    """Each group's (G, H, G~) + alpha * mean(diag of G~, or G) * I: penalizes alpha * d * ||w - q||^2."""
    if alpha <= 0:
        return stats
    out = []
    for G, H, Gt in stats:
        ref = G if Gt is None else Gt
        eye = alpha * max(float(np.mean(np.diag(ref))), 0.0) * np.eye(ref.shape[0])
        out.append(tuple(None if a is None else a + eye for a in (G, H, Gt)))
    return out


def _split_solve(stats: list):
    """(solve Grams, cross (G0, H) per group or None) for _solve_groups."""
    if stats[0][1] is None:
        return [st[0] for st in stats], None
    return [st[2] for st in stats], [(st[0], st[1]) for st in stats]


def _held_out_alpha(ctx: _LayerContext, mats, fold_stats) -> tuple:
    """The damping strength among config.damping_grid whose COMQ solution on fold 0 has the lowest objective on
    fold 1 (the held-out error); returns (alpha, {alpha: held-out error})."""
    errs = {}
    for alpha in ctx.config.damping_grid:
        solve, cross = _split_solve(_damp(fold_stats[0], alpha))
        _, comqs = _solve_groups(ctx.xp, mats, solve, solve, ctx.scfg, ctx.dt, True, cross, rtn=False)
        errs[alpha] = sum(_objective(Wk, r.qweight, st, ctx.dt) for Wk, r, st in zip(mats, comqs, fold_stats[1]))
    return min(errs, key=errs.get), errs


def _quantize_layer(ctx: _LayerContext, layer, stats: dict, correct: bool = True):
    """Quantize one layer from its captured statistics: (QuantizedWeight, bias delta or None, LayerReport).

    With cross statistics, ``correct`` says whether the layer may correct its input error (fit X W from X~): only
    where its input depends on no other layer of its stage, else it would correct the error that those layers
    correct already; the others fit X~ W (the partly quantized model's input, no correction)."""
    config, scfg, dt = ctx.config, ctx.scfg, ctx.dt
    tl = time.perf_counter()
    mats = layer.to_matrices(load_weight(ctx.model, layer.weight))
    sts = [stats[spec] for _, spec in layer.consumers]
    rows = sum(st.rows for st in sts)
    comq = config.method == "comq"
    # free bias only where it is exact: one consumer, a bias we can write
    bc = ctx.use_bias and comq and len(sts) == 1 and bias_target(ctx.nodes[layer.consumers[0][0]], ctx.inits) is None
    correct = correct and sts[0].cross

    def gather(centered: bool, fold=None) -> list:  # per group (G, H, G~), summed over the consumers
        out = []
        for k in range(layer.groups):
            parts = [st.stats(k, centered, fold) for st in sts]
            out.append(_mix(tuple(None if parts[0][i] is None else sum(p[i] for p in parts) for i in range(3)),
                            1.0 if correct else 0.0))
        return out

    raw = gather(False)  # the reported errors and the RTN baseline: uncentered, undamped
    solve = gather(True) if bc else raw  # what COMQ solves
    few_rows = rows < config.damping_rows * layer.x.fan_in
    alpha = 0.0
    if few_rows and comq and ctx.damping != 0:  # G is (near) rank-deficient: COMQ would fit the calibration noise
        if ctx.damping != "auto":
            alpha = float(ctx.damping)
        elif all(st.folded for st in sts):
            alpha, _ = _held_out_alpha(ctx, mats, [gather(bc, 0), gather(bc, 1)])
        else:  # the first batch promised enough rows: no folds were kept
            alpha = AUTO_DAMPING_FALLBACK
    plain, solve = solve, _damp(solve, alpha)
    solve_g, cross = _split_solve(solve)
    rtns, comqs = _solve_groups(ctx.xp, mats, [st[0] for st in raw] if cross is None else solve_g, solve_g, scfg,
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
            mu = mu if correct else mut
            delta.append(Wk.astype(np.float64) @ mu - res.qweight.astype(np.float64) @ mut)
        num_c += o_c
        num_r += o_r
        den += objective(Wk.astype(dt), np.zeros_like(Wk, dt), raw[k][0].astype(dt))  # ||X W^T||^2
        codes.append(res.codes)
        scales.append(res.scale)
        zps.append(res.zero_point)
    scale = np.concatenate(scales)
    zp = np.concatenate(zps)
    if scfg.granularity == "tensor":
        if np.unique(scale).size > 1 or np.unique(zp).size > 1:
            raise UserError(f"{layer.node}: per-tensor granularity with {layer.groups} conv groups is not "
                            "supported (each group gets its own scale); use --granularity channel")
        scale, zp = scale[:1].reshape(()), zp[:1].reshape(())
    qw = QuantizedWeight(layer.weight, layer.from_matrices(codes), scale, zp, layer.axis, scfg.bits,
                         signed=scfg.scheme == "sym", float16=layer.float16)
    report = LayerReport(layer.node, layer.op_type, layer.weight, list(layer.weight_shape), layer.groups, scfg.bits,
                         rows, _rel(num_c, den), _rel(num_r, den), time.perf_counter() - tl, rtn_groups=fallback,
                         bias_corrected=bc, damped=alpha > 0, damping=alpha, corrected=correct,
                         consumers=[c for c, _ in layer.consumers])
    return qw, np.concatenate(delta) if bc else None, report


def _bar(enabled: bool, **kw):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(leave=False, dynamic_ncols=True, **kw)


__all__ = ["QuantizeConfig", "Report", "LayerReport", "quantize", "run"]
