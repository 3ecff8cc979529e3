"""The pipeline: read graph -> capture statistics -> solve -> emit QDQ -> verify.

    model = onnxcomq.quantize("model.onnx", "calib.npz", onnxcomq.QuantizeConfig(bits=4))
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np
import onnx

from .backend import get_xp
from .bias import apply as apply_bias
from .bias import bias_target
from .calib import Calibration, model_inputs
from .capture import collect_stats
from .emit import QuantizedWeight, emit_qdq
from .errors import UserError
from .graph import SUPPORTED_OPS, find_layers, load_weight, node_names
from .modelio import prepare_model
from .placement import ActivationQuantizer, validate_activations
from .solver import (SolverConfig, comq_quantize, comq_quantize_groups, objective, rtn_quantize,
                     rtn_quantize_groups)


@dataclass
class QuantizeConfig:
    """Everything that decides the output. ``official=True`` selects the official COMQ code's configuration
    (greedy order, one sweep, asymmetric per-channel min-max grid, no scale update), whatever the other fields say."""

    bits: int = 4
    granularity: str = "channel"  # channel | tensor
    scheme: str | None = None  # asym | sym; None: asym, or sym when activations are quantized (act_bits)
    order: str = "cyclic"  # cyclic | importance | greedy (per row, the official code's; gathers, slower on CPU)
    sweeps: int = 3
    scale_update: bool = True
    lam: float = 1.0
    # per-channel lam among SolverConfig.lambda_grid by the objective (replaces lam); None: at <= 4 bits, where it
    # was measured to help (MiniLM W4: -21 % objective); at 6 bits it cost +5..8 % on the reference CNN and ViT
    lambda_search: bool | None = None
    bias_correction: bool = True  # free bias: solve on the centered Gram, fold the mean error into the bias
    # add damping * mean(diag G) * I to G of layers with few calibration rows (measured: EfficientNet-Lite0 W4 KL
    # 0.203 -> 0.165, MiniLM W4 cosine 0.9798 -> 0.9805; 0.3 was worse than 0.1)
    damping: float = 0.1
    damping_rows: float = 4.0  # "few": fewer rows than this times the fan-in
    mask_input: str | None = "auto"  # attention-mask input: padded tokens stay out of G ("auto": common names)
    method: str = "comq"  # comq | rtn (round-to-nearest baseline on the same grid)
    official: bool = False
    batch_size: int = 32
    max_samples: int | None = None
    device: str = "auto"  # auto | cpu | gpu
    dtype: str = "float32"
    op_types: tuple = SUPPORTED_OPS
    exclude: tuple = ()
    # activation quantization (placement.py, activations.py): None = weight-only
    act_bits: int | None = None
    target: str = "ort"  # ort (uint8 asym activations) | tensorrt (int8 symmetric, zero point 0)
    act_method: str = "minmax"  # minmax | percentile | mse
    act_percentile: float = 99.99
    act_scheme: str | None = None  # asym | sym; None: the target's
    act_dtype: str | None = None  # uint8 | int8; None: the target's
    act_exclude: tuple = ()  # fnmatch patterns over node names, op types and tensor names kept float
    act_aware: bool = False  # second capture pass with the activations fake-quantized: G from quantized inputs
    # activations whose quantization noise / power on the calibration data exceeds this stay float (MiniLM's
    # residual stream 1.3e-2 .. 6e-2 and LayerNorm outputs ~4e-3: cosine 0.959 at 0.01, 0.995 at 0.003; the CNN,
    # ViT and EfficientNet-Lite0 stay below 2.6e-3)
    act_max_noise: float = 0.003

    def solver_config(self) -> SolverConfig:
        if self.official:
            cfg = SolverConfig.official(bits=self.bits, lam=self.lam, dtype=self.dtype)
        else:
            cfg = SolverConfig(bits=self.bits, granularity=self.granularity, scheme=self.weight_scheme(),
                               order=self.order,
                               sweeps=self.sweeps, scale_update=self.scale_update, lam=self.lam, dtype=self.dtype,
                               lambda_search=self.bits <= 4 if self.lambda_search is None
                               else self.lambda_search)
        try:
            return cfg.validate()
        except ValueError as e:
            raise UserError(str(e)) from None

    def weight_scheme(self) -> str:
        return self.scheme or ("sym" if self.act_bits else "asym")

    def validate(self) -> "QuantizeConfig":
        self.solver_config()
        validate_activations(self)
        if not (self.damping >= 0 and np.isfinite(self.damping)):
            raise UserError(f"damping must be a finite number >= 0, got {self.damping!r}")
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


def _capture(model, specs, calib, progress, mask_input, observers=None, desc="capture"):
    bar = _bar(progress, total=calib.num_samples, desc=desc, unit="sample")
    try:
        return collect_stats(model, specs, calib, bar, mask_input=mask_input, observers=observers)
    finally:
        if bar is not None:
            bar.close()


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
    specs = {}
    for layer in layers:
        for _, spec in layer.consumers:
            specs[spec] = layer.groups
    t0 = time.perf_counter()
    acts = ActivationQuantizer(model, layers, config) if config.act_bits else None
    model = acts.model if acts else model  # (every node named)
    stats, samples = _capture(model, specs, calib, progress, mask_input,
                              observers=acts.observers if acts else None)
    if acts is not None and config.act_aware:  # G from the inputs the deployed layers see: activations quantized
        stats = acts.aware_stats(specs, calib, lambda m, sp: _capture(m, sp, calib, progress, mask_input,
                                                                        desc="capture (quantized activations)"))
    t_capture = time.perf_counter() - t0

    scfg = config.solver_config()
    use_bias = config.bias_correction and not config.official
    damping = 0.0 if config.official else config.damping
    xp = get_xp(config.device)
    qweights, reports = [], []
    deltas = {}
    nodes = dict(zip(node_names(model), model.graph.node))
    inits = {t.name: t for t in model.graph.initializer}
    t0 = time.perf_counter()
    bar = _bar(progress, total=len(layers), desc="solve", unit="layer")
    for layer in layers:
        tl = time.perf_counter()
        w = load_weight(model, layer.weight)
        mats = layer.to_matrices(w)
        specs_used = [spec for _, spec in layer.consumers]
        grams = [stats[specs_used[0]].G[k] if len(specs_used) == 1 else sum(stats[s].G[k] for s in specs_used)
                 for k in range(layer.groups)]
        rows = sum(stats[spec].rows for _, spec in layer.consumers)
        # free bias only where it is exact: one consumer, a bias we can write
        bc = use_bias and config.method == "comq" and len(specs_used) == 1 \
            and bias_target(nodes[layer.consumers[0][0]], inits) is None
        codes, scales, zps, delta = [], [], [], []
        num_c = num_r = den = 0.0
        fallback = 0
        dt = np.float64 if scfg.dtype == "float64" else np.float32
        st0 = stats[specs_used[0]]
        solve_grams = [st0.centered(k) for k in range(layer.groups)] if bc else grams  # the Gram COMQ solves
        few_rows = rows < config.damping_rows * layer.x.fan_in
        if few_rows and damping > 0:  # G is (near) rank-deficient: COMQ would fit the calibration noise
            solve_grams = [Gk + damping * max(float(np.mean(np.diag(Gk))), 0.0) * np.eye(Gk.shape[0])
                           for Gk in solve_grams]
        rtns, comqs = _solve_groups(xp, mats, grams, solve_grams, scfg, dt, config.method == "comq")
        for k, (Wk, Gk) in enumerate(zip(mats, grams)):
            rtn = rtns[k]  # the baseline: plain round-to-nearest, no bias change
            o_r = rtn.objective
            if comqs is None:
                res, o_c = rtn, o_r
            else:
                res, o_c = comqs[k], comqs[k].objective
                o_rs = objective(Wk.astype(dt), rtn.qweight.astype(dt), solve_grams[k].astype(dt)) if bc else o_r
                if o_c > o_rs:  # COMQ is a descent from Q = W, not from RTN: never ship something worse than RTN
                    res, o_c = rtn, o_rs
                    fallback += 1
            if bc:
                mu = st0.sums[k] / max(st0.rows, 1)
                delta.append((Wk.astype(np.float64) - res.qweight.astype(np.float64)) @ mu)
            num_c += o_c
            num_r += o_r
            den += objective(Wk.astype(dt), np.zeros_like(Wk, dt), Gk.astype(dt))  # ||X W^T||^2
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
        qweights.append(QuantizedWeight(layer.weight, layer.from_matrices(codes), scale, zp, layer.axis,
                                        scfg.bits, signed=scfg.scheme == "sym", float16=layer.float16))
        if bc:
            deltas[layer.consumers[0][0]] = np.concatenate(delta)
        reports.append(LayerReport(layer.node, layer.op_type, layer.weight, list(layer.weight_shape), layer.groups,
                                   scfg.bits, rows, _rel(num_c, den), _rel(num_r, den),
                                   time.perf_counter() - tl, rtn_groups=fallback, bias_corrected=bc,
                                   damped=bool(few_rows and damping > 0),
                                   consumers=[c for c, _ in layer.consumers]))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    t_solve = time.perf_counter() - t0

    meta = {"method": config.method, "bits": scfg.bits, "granularity": scfg.granularity, "scheme": scfg.scheme,
            "order": scfg.order, "sweeps": scfg.sweeps, "scale_update": scfg.scale_update,
            "lambda": "search" if scfg.lambda_search else scfg.lam,
            "official": config.official, "bias_correction": bool(deltas), "calibration_samples": samples,
            "mask_input": mask_input, "damping": damping}
    if acts is not None:
        meta.update(acts.metadata())
    out = emit_qdq(apply_bias(model, deltas) if deltas else model, qweights, meta)
    if acts is not None:
        out = acts.insert(out)
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


def _solve_groups(xp, mats, grams, solve_grams, scfg: SolverConfig, dt, comq: bool):
    """RTN (on ``grams``) and COMQ (on ``solve_grams``) results per group: many groups of one shape (depthwise
    and grouped convs) in one batched solve, otherwise one by one."""
    if len(mats) > 1 and scfg.order == "cyclic" and scfg.granularity == "channel":
        W3 = xp.asarray(np.stack(mats).astype(dt))
        rtns = rtn_quantize_groups(W3, xp.asarray(np.stack(grams).astype(dt)), scfg, xp)
        comqs = comq_quantize_groups(W3, xp.asarray(np.stack(solve_grams).astype(dt)), scfg, xp) if comq else None
        return rtns, comqs
    rtns, comqs = [], [] if comq else None
    for Wk, Gk, Sk in zip(mats, grams, solve_grams):
        Wd = xp.asarray(Wk.astype(dt))
        rtns.append(rtn_quantize(Wd, xp.asarray(Gk.astype(dt)), scfg, xp))
        if comq:
            comqs.append(comq_quantize(Wd, xp.asarray(Sk.astype(dt)), scfg, xp))
    return rtns, comqs


def _bar(enabled: bool, **kw):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(leave=False, dynamic_ncols=True, **kw)


__all__ = ["QuantizeConfig", "Report", "LayerReport", "quantize", "run"]
