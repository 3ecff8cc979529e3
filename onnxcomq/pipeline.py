"""The pipeline: read graph -> capture statistics -> solve -> emit QDQ -> verify.

    model = onnxcomq.quantize("model.onnx", "calib.npz", onnxcomq.QuantizeConfig(bits=4))
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from .capture.calib import Calibration, batch_samples, model_inputs
from .capture.memory import (
    CAPTURE_OVERHEAD,
    batch_for_budget,
    current_rss,
    default_max_memory,
    measured_sample_bytes,
    parse_bytes,
    sample_bytes,
    stats_bytes,
)
from .capture.passes import capture, plan_stages, reiterable, stage_entries
from .capture.rows import spec_tensors
from .errors import UserError
from .graph.layers import (
    RECURRENT_OPS,
    SUPPORTED_OPS,
    find_layers,
    load_weight,
    node_names,
    with_rnn_outputs,
)
from .graph.modelio import model_bytes, prepare_model
from .graph.rewrite import rewrite_to_matmul
from .precision import (
    allocate,
    average_bits,
    conv_taps,
    first_feeds,
    output_sensitivity,
    plan_layers,
    validate_precision,
)
from .solve.backend import get_xp
from .solve.blockwise import block_layout, comq_quantize_block, rtn_quantize_block
from .solve.comq import (
    SolverConfig,
    comq_quantize,
    comq_quantize_groups,
    cross_objective,
    objective,
    rtn_quantize,
    rtn_quantize_groups,
    safe_dtype,
)
from .verify import VerificationError, problems, verify
from .verify import to_dicts as verify_dicts
from .verify import warnings as verify_warnings
from .write.activations import ActivationQuantizer, validate_activations
from .write.bias import apply as apply_bias
from .write.bias import bias_target
from .write.matmulnbits import emit_matmulnbits
from .write.qdq import (
    QuantizedWeight,
    emit_qdq,
    opset_change,
    quantized_twin,
    set_metadata,
    validate_max_opset,
)

log = logging.getLogger("onnxcomq")
AUTO_DAMPING_FALLBACK = 0.1  # damping "auto" for a layer that turned out short of rows but kept no folds


@dataclass
class QuantizeConfig:
    """Everything that decides the output. ``official=True`` selects the official COMQ code's configuration
    (greedy order, one sweep, asymmetric per-channel min-max grid, no scale update), whatever the other fields say."""

    bits: int = 4
    granularity: str = "channel"  # channel | tensor | block (one scale per output row and block of input channels)
    block_size: int = 32  # granularity "block": input channels per scale (MatMulNBits: a power of two >= 16)
    weight_format: str = "qdq"  # qdq | matmulnbits (MatMul weights as com.microsoft MatMulNBits, needs block)
    # per-layer precision (precision.py): layers kept at 8 bits ("first"/"last" or fnmatch on node names / op
    # types), then (pattern, bits) overrides, a later match winning
    keep_8bit: tuple = ()
    layer_bits: tuple = ()
    # mixed precision: the parameter-weighted mean bits of the quantized weights, allocated by measured
    # sensitivity among mp_bits (None: every free layer at ``bits``). EfficientNet-Lite0 W4 at 4.5 bits: agreement
    # 0.890 with 5,6,8 against 0.852 with 8 alone; but 5..8-bit codes are all stored as int8, so (8,) is the choice
    # for a file-size budget
    avg_bits: float | None = None
    mp_bits: tuple = (5, 6, 8)
    mp_sensitivity: str = "output"  # output (measured model-output error per layer) | layer (layer error only)
    mp_samples: int = 8  # calibration samples for the output sensitivity
    # a layer's error at the candidate bits: "solve" it there, or "scaling" from its base-bits solve (x 1/4 per bit).
    # Measured at 4.5 bits: EfficientNet-Lite0 agreement 0.890 both, MiniLM cosine 0.9888 vs 0.9889, with one solve
    # per layer instead of four
    mp_estimate: str = "scaling"
    nbits_accuracy_level: int = 0  # MatMulNBits accuracy_level (0: float activations; 4: int8, faster, less exact)
    scheme: str | None = None  # asym | sym; None: asym, or sym when activations are quantized (act_bits)
    order: str = "cyclic"  # cyclic | importance | greedy (per row, the official code's; gathers, slower on CPU)
    sweeps: int = 3
    scale_update: bool = True
    lam: float = 1.0
    # per-channel lam among SolverConfig.lambda_grid by the objective (replaces lam); None: at <= 4 bits, where it
    # was measured to help (MiniLM W4: -21 % objective); at 6 bits it cost +5..8 % on the reference CNN and ViT
    lambda_search: bool | None = None
    # with the search: per channel, full COMQ solves from its k best candidates, the lowest COMQ objective wins
    # (the grid chosen by COMQ's own objective, not by round-to-nearest's); block grids: 1. Measured 7 vs 1:
    # EfficientNet-Lite0 W4 KL 0.180 -> 0.167 (mean of 4 calibration sets), MiniLM W4 cosine 0.9805 -> 0.9826,
    # W3 0.9335 -> 0.9391, at 7x the solve time (the whole run stays under 60 s)
    lambda_solves: int = 7
    bias_correction: bool = True  # free bias: solve on the centered Gram, fold the mean error into the bias
    # the solve uses G + alpha * mean(diag G) * I: alpha penalizes alpha * mean(diag G) * ||w - q||^2, so that the
    # codes do not fit what is particular to the calibration data. "scaled" (default): every layer, alpha =
    # min(damping_max, damping_scale * sqrt(fan_in / rows)): stronger where the rows per weight are few. Measured on
    # EfficientNet-Lite0 W4 (held-out error per layer, on G from held-out photos): the best alpha grows from ~0.03
    # (stem, 112x112 layers) to ~3 (7x7 layers of fan-in 1152) and ~10 (classifier, 64 rows for 1280 inputs), which
    # this rule follows; mean KL over 4 calibration sets 0.167 -> 0.153 (one pass), 0.138 -> 0.125 (sequential,
    # strength 0.5); MiniLM W4 cosine 0.9826 -> 0.9821, W3 0.9391 -> 0.9434. A number: that alpha on the layers
    # with few rows (fewer than damping_rows x fan-in) only (the previous default 0.1). "auto": per few-row layer, the
    # value of damping_grid with the lowest held-out error (solve on one half of the samples, evaluate on the other);
    # measured vs 0.1: MiniLM W4 cosine 0.9805 -> 0.9810, EfficientNet-Lite0 W4 KL 0.165 -> 0.173
    damping: float | str = "scaled"
    damping_scale: float = 3.0
    damping_max: float = 10.0
    damping_rows: float = 4.0  # "few": fewer rows than this times the fan-in
    damping_grid: tuple = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0)
    # sequential (error-feeding) capture: quantize in `stages` topological stages; each later stage's layers solve
    # min ||X W^T - X~ Q^T||^2 with X~ their input in the model whose earlier stages are quantized (2 passes/stage).
    # Off by default (2.7x the time of one pass on EfficientNet-Lite0 with 16 stages: 59 s, over the 60 s budget
    # with any slack). EfficientNet-Lite0 W4, mean KL over 4 calibration sets, 16 stages, damping "scaled": 0.121
    # against 0.153 for one pass (with the old damping: 0.138 at strength 0.5, against 0.167)
    sequential: bool = False
    stages: int = 16
    # which layers of a stage fit the float output X W from X~ (error correction); the others fit X~ W: "entry"
    # (those whose input depends on no layer of their stage), "all", or "none"
    correction: str = "entry"
    # how much of its input error a correcting layer's weights fit: their target is X_b = b X + (1 - b) X~ (1: all
    # of it); its free bias always fits the float output's mean (one number per channel does not overfit). Measured
    # on EfficientNet-Lite0 W4, 16 stages, mean KL over 4 calibration sets of 64, with damping "scaled": 0.121
    # (b = 1), 0.123 (0.75), 0.125 (0.5); MiniLM cosine W4 0.9856 (1) / 0.9851 (0.5), W3 0.9521 / 0.9498. With the
    # old damping (0.1 on few-row layers only) b = 0.5 was best: 0.138, and 0.149 with b = 0.5 for the bias too
    correction_strength: float = 1.0
    # a layer corrects only where it has at least correct_rows x fan-in calibration rows; with fewer, it fits X~ W,
    # because with few rows per weight the correction fits the calibration set itself (measured: EfficientNet-Lite0
    # W4, 16 stages, classifier correcting: calibration KL 0.009, held-out KL 0.214). Rows of one image are far from
    # independent, so the right threshold depends on the data: 256 crops of 14 photos (the 7x7 project convs then
    # have 11x their fan-in) give KL 0.161 at 4 and 0.129 at 16, 256 crops of 44 scenes 0.147 and 0.110; MiniLM (64
    # texts) wants 4: cosine W4 0.9856 at 4, 0.9816 at 16. correct_few_rows lets every entry layer correct.
    correct_rows: float = 4.0
    correct_few_rows: bool = False
    mask_input: str | None = "auto"  # attention-mask input: padded tokens stay out of G ("auto": common names)
    method: str = "comq"  # comq | rtn (round-to-nearest baseline on the same grid)
    official: bool = False
    batch_size: int = 32  # the largest calibration batch; lowered so that capture fits max_memory
    # memory budget of the run (bytes, or a size such as "4G" / "512M"); None: a quarter of the machine's RAM.
    # The calibration batch is the largest <= batch_size whose captured activations fit it (a model with a fixed
    # batch keeps its batch); the chosen batch is in the report's config ("batch_size")
    max_memory: int | str | None = None
    max_samples: int | None = None
    device: str = "auto"  # auto | cpu | gpu
    dtype: str = "float32"
    op_types: tuple = SUPPORTED_OPS
    exclude: tuple = ()
    # rewrite Einsum with a constant weight (tf2onnx's Keras EinsumDense) and MatMul(W, x) as MatMul(x', W')
    rewrite_matmul: bool = True
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
    # the highest opset of the output (None: what the quantized weights need, up to 21 for int4). Below 21, 2..4-bit
    # codes are stored in int8/uint8 containers (opset 13: twice the bytes, the same dequantized weights), for
    # runtimes without int4 DequantizeLinear; block granularity and float16 scales (19) cannot go below theirs
    max_opset: int | None = None
    # run the quantized model beside the float one on calibration samples before returning it: every graph output
    # must be finite and close to the float model's (verify.py); a failure raises VerificationError
    verify: bool = True
    verify_samples: int = 8  # calibration samples for the check (a model with a fixed batch: one whole batch)

    def solver_config(self, bits: int | None = None, granularity: str | None = None, taps: int = 1) -> SolverConfig:
        bits = self.bits if bits is None else bits
        granularity = granularity or self.granularity
        if self.official:
            cfg = SolverConfig.official(bits=bits, lam=self.lam, dtype=self.dtype)
        else:
            cfg = SolverConfig(bits=bits, granularity=granularity, scheme=self.weight_scheme(), order=self.order,
                               sweeps=self.sweeps, scale_update=self.scale_update, lam=self.lam, dtype=self.dtype,
                               lambda_search=bits <= 4 if self.lambda_search is None else self.lambda_search,
                               lambda_solves=self.lambda_solves if granularity != "block" else 1,
                               quant_block=self.block_size if granularity == "block" else 0,
                               block_taps=taps if granularity == "block" else 1)
        try:
            return cfg.validate()
        except ValueError as e:
            raise UserError(str(e)) from None

    def weight_scheme(self) -> str:
        return self.scheme or ("sym" if self.act_bits or self.target == "tensorrt" else "asym")

    def validate(self) -> "QuantizeConfig":
        validate_precision(self)
        self.solver_config()
        validate_activations(self)
        validate_max_opset(self)
        if self.damping not in ("auto", "scaled") and not (isinstance(self.damping, (int, float))
                                                           and self.damping >= 0 and np.isfinite(self.damping)):
            raise UserError(f"damping must be 'scaled', 'auto' or a finite number >= 0, got {self.damping!r}")
        for name, label in (("damping_scale", "damping scale"), ("damping_max", "damping max"),
                            ("correct_rows", "correct-min-rows")):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v >= 0 and np.isfinite(v)):
                raise UserError(f"{label} must be a finite number >= 0, got {v!r}")
        if not self.damping_grid or any(not (isinstance(a, (int, float)) and a >= 0 and np.isfinite(a))
                                        for a in self.damping_grid):
            raise UserError(f"damping grid must hold finite numbers >= 0, got {self.damping_grid!r}")
        if self.correction not in ("entry", "all", "none"):
            raise UserError(f"correction must be entry, all or none, got {self.correction!r}")
        if not (isinstance(self.correction_strength, (int, float)) and 0 <= self.correction_strength <= 1):
            raise UserError(f"correction strength must be a number in 0..1, got {self.correction_strength!r}")
        if not isinstance(self.stages, int) or self.stages < 1:
            raise UserError(f"stages must be an integer >= 1, got {self.stages!r}")
        if self.sequential and (self.granularity == "block" or self.avg_bits is not None or self.act_bits):
            raise UserError("sequential capture works with channel/tensor granularity, without --avg-bits and "
                            "without --act-bits")
        if self.method not in ("comq", "rtn"):
            raise UserError(f"method must be comq or rtn, got {self.method!r}")
        if not isinstance(self.verify_samples, int) or self.verify_samples < 1:
            raise UserError(f"verify samples must be an integer >= 1, got {self.verify_samples!r}")
        if self.max_memory is not None:
            self.max_memory = parse_bytes(self.max_memory, "max memory")
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
    granularity: str = ""  # channel | tensor | block (a Conv under --granularity block falls back to channel)
    weight_format: str = "qdq"  # qdq | matmulnbits
    note: str = ""  # why this layer's bits / granularity / format differ from the run's
    rtn_groups: int = 0  # groups (conv groups; 1 for other layers) where COMQ did not beat RTN and RTN was kept
    bias_corrected: bool = False  # the layer's bias was re-fitted (free bias)
    damped: bool = False  # G was damped (every layer with damping 'scaled'; else few rows for the fan-in)
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
    avg_bits: float = 0.0  # parameter-weighted mean bits of the quantized weights
    storage_bits: float = 0.0  # the same with the stored code widths (4 for 2..4 bits, 8 for 5..8)
    mixed_precision: dict = field(default_factory=dict)  # the allocation's inputs and result (--avg-bits)
    # peak RSS (MiB) of the process up to the end of each phase: capture, solve, emit (ru_maxrss: monotone)
    peak_rss_mb: dict = field(default_factory=dict)
    # the check of the quantized model against the float one: {"samples": n, "outputs": [OutputCheck as dict]}
    verification: dict = field(default_factory=dict)

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


def _capture(model, twin, specs, batches, progress, mask_input, total, observers=None, fold_below=None,
             desc="capture"):
    """One capture pass (sequential.capture) with a progress bar."""
    bar = _bar(progress, total=total or None, desc=desc, unit="sample")
    try:
        return capture(model, twin, specs, batches, bar, mask_input, fold_below, total, observers=observers)
    finally:
        if bar is not None:
            bar.close()


def run(model_or_path, calibration, config: QuantizeConfig | None = None, progress: bool = False):
    """Quantize and return ``(quantized ModelProto, Report)``."""
    config = (config or QuantizeConfig()).validate()
    t_start = time.perf_counter()
    model = prepare_model(model_or_path)
    model = rewrite_to_matmul(model) if config.rewrite_matmul else model
    layers, skipped = find_layers(model, op_types=tuple(config.op_types), exclude=tuple(config.exclude))
    if not layers:
        why = "; ".join(f"{s.node}: {s.reason}" for s in skipped[:5]) or "it has no Conv, Gemm or MatMul node"
        raise UserError(f"no quantizable layer found ({why})")
    _check_weights(model, layers)
    calib = calibration if isinstance(calibration, Calibration) else Calibration(
        calibration, model_inputs(model), batch_size=config.batch_size, max_samples=config.max_samples)

    budget, batch_note = _choose_batch(with_rnn_outputs(model, layers), layers, calib, config)
    mask_input = resolve_mask_input(model, config.mask_input)
    acts = ActivationQuantizer(model, layers, config) if config.act_bits else None
    model = acts.model if acts else model  # (every node named)
    base_cfg = config.solver_config()
    plan = plan_layers(layers, config)  # {weight: [bits, granularity, format, note, pinned]}
    comq = config.method == "comq"
    sequential = config.sequential and comq and not config.official and len(layers) > 1
    batches = calib
    if sequential and not reiterable(calib):  # a one-shot source: keep its batches for the later stages
        batches = list(calib)
    held = []  # the first calibration samples, for the check of the output (kept as the first pass streams)
    if config.verify:
        batches = _Keep(batches, held, calib, config.verify_samples)
    stages = plan_stages(layers, config.stages) if sequential else [layers]
    damping = 0.0 if config.official else config.damping
    ctx = _LayerContext(config, base_cfg, config.bias_correction and comq and not config.official, damping,
                        get_xp(config.device), dict(zip(node_names(model), model.graph.node)),
                        {t.name: t for t in model.graph.initializer}, model,
                        np.float64 if base_cfg.dtype == "float64" else np.float32, plan)
    qweights, reports, deltas, mp = [], [], {}, {}
    cap_model = with_rnn_outputs(model, layers)  # (recurrent nodes without a Y output get one for capture)
    t_capture = t_solve = 0.0
    peaks = {}
    total = calib.num_samples or 0
    solve_bar = None
    try:
        for s, stage in enumerate(stages):
            specs = {spec: layer.groups for layer in stage for _, spec in layer.consumers}
            fold_below = {spec: config.damping_rows * spec.fan_in for spec in specs} if damping == "auto" else None
            t0 = time.perf_counter()
            twin = quantized_twin(cap_model, qweights, apply_bias, deltas) if s > 0 else None
            stats, samples = _capture(cap_model, twin, specs, batches, progress, mask_input, total,
                                      observers=acts.observers if acts is not None else None, fold_below=fold_below,
                                      desc="capture" if len(stages) == 1 else f"capture {s + 1}/{len(stages)}")
            if acts is not None and config.act_aware:  # G from the inputs the deployed layers see
                stats = acts.aware_stats(specs, calib, lambda m, sp: _capture(
                    m, None, sp, calib, progress, mask_input, total, desc="capture (quantized activations)"))
            t_capture += time.perf_counter() - t0
            peaks["capture"] = _peak_rss_mb()
            _check_stats(model, stats)
            if config.avg_bits is not None:  # (one stage: sequential capture is refused with a budget)
                mp = _mixed_precision(model, layers, stats, calib, config, plan, ctx.xp, progress)
            t0 = time.perf_counter()
            entry = stage_entries(model, stage) if config.correction == "entry" else \
                {layer.node for layer in stage} if config.correction == "all" else set()
            if solve_bar is None:
                solve_bar = _bar(progress, total=len(layers), desc="solve", unit="layer")
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
            peaks["solve"] = _peak_rss_mb()
            del stats, twin
    finally:
        if solve_bar is not None:
            solve_bar.close()

    meta = {"method": config.method, "bits": base_cfg.bits, "granularity": base_cfg.granularity, "scheme": base_cfg.scheme,
            "order": base_cfg.order, "sweeps": base_cfg.sweeps, "scale_update": base_cfg.scale_update,
            "lambda": "search" if base_cfg.lambda_search else base_cfg.lam,
            "official": config.official, "bias_correction": bool(deltas), "calibration_samples": samples,
            "mask_input": mask_input, "damping": damping,
            "sequential_stages": len(stages) if len(stages) > 1 else 0}
    if base_cfg.granularity == "block":
        meta["block_size"] = base_cfg.quant_block
    if config.weight_format != "qdq":
        meta["weight_format"] = config.weight_format
    if acts is not None:
        meta.update(acts.metadata())
    out = apply_bias(model, deltas) if deltas else model
    owned = out is not model  # a private copy: the emitters may edit it in place (saves a copy of a large model)
    nbits = [q for q in qweights if plan[q.name][2] == "matmulnbits"]
    if nbits:
        out, owned = emit_matmulnbits(out, nbits, config.nbits_accuracy_level), True
    rest = [q for q in qweights if plan[q.name][2] != "matmulnbits"]
    out = emit_qdq(out, rest, meta, inplace=owned, max_opset=config.max_opset) if rest \
        else set_metadata(out, meta, copy=not owned)
    if acts is not None:
        out = acts.insert(out)
    meta["opset"] = opset_change(model, out, config.max_opset)  # (after the metadata: the report's only)
    # (after the metadata too: the report's only)
    meta.update(batch_size=calib.batch_size, max_memory=budget, batch_choice=batch_note)
    report = Report(reports, [dataclasses.asdict(s) for s in skipped], meta, samples, t_capture, t_solve)
    params = {L.weight: int(np.prod(L.weight_shape)) for L in layers}
    report.avg_bits = average_bits({L.weight: plan[L.weight][0] for L in layers}, params)
    int4 = config.max_opset is None or config.max_opset >= 21  # else 2..4-bit codes in int8 containers
    report.storage_bits = average_bits({L.weight: 4 if plan[L.weight][0] <= 4 and int4 else 8 for L in layers},
                                       params)
    report.mixed_precision = mp
    peaks["emit"] = _peak_rss_mb()
    report.peak_rss_mb = peaks
    report.total_seconds = time.perf_counter() - t_start
    report.float_bytes = model_bytes(model)
    report.quant_bytes = model_bytes(out)
    if config.verify:
        t0 = time.perf_counter()
        checks, n = verify(model, out, held)
        report.verification = {"samples": n, "outputs": verify_dicts(checks)}
        report.total_seconds += time.perf_counter() - t0
        for w in verify_warnings(checks):
            log.warning(w)
        bad = problems(checks)
        if bad:
            raise VerificationError(f"the quantized model failed its check on {n} calibration sample(s): "
                                    f"{'; '.join(bad)}", out, report)
    return out, report


class _Keep:
    """Iterates ``batches`` and keeps (in ``held``) the batches that hold the first ``samples`` samples."""

    def __init__(self, batches, held: list, calib, samples: int):
        self.batches, self.held, self.calib, self.samples = batches, held, calib, samples

    def __iter__(self):
        for feed in self.batches:
            room = self.samples - sum(batch_samples(f) for f in self.held)
            if room > 0:
                self.held.append(self.calib.head(feed, room))
            yield feed


def _check_weights(model: onnx.ModelProto, layers: list) -> None:
    """A NaN or Inf in a weight is the user's to fix (one line naming the tensor), before any work is done."""
    inits = {t.name: t for t in model.graph.initializer}
    for L in layers:
        w = numpy_helper.to_array(inits[L.weight])
        bad = ~np.isfinite(w)
        if bad.any():
            raise UserError(f"weight {L.weight} of node {L.node} holds {int(bad.sum())} NaN or Inf value(s) "
                            f"(of {w.size}): the float model itself is broken")


def _check_stats(model: onnx.ModelProto, stats: dict) -> None:
    """Input statistics beyond float32's range (calibration data that drives a layer input to |x|^2 > 3.4e38)."""
    limit = float(np.finfo(np.float32).max)
    for spec, st in stats.items():
        for part in getattr(st, "parts", None) or []:
            mats = [part.x.G] + [a for a in (part.H, part.Gt) if a is not None]
            if all(bool(np.isfinite(a).all()) and float(np.abs(a).max(initial=0.0)) < limit for a in mats):
                continue
            inputs = ", ".join(i.name for i in model_inputs(model))
            raise UserError(f"the calibration data drives tensor {spec.tensor} (the input of a quantized layer) "
                            f"beyond float32's range (its squares overflow): check the scale of the calibration "
                            f"input(s) {inputs}")


def _peak_rss_mb() -> float:
    try:
        import resource
    except ImportError:  # (not on Windows)
        return 0.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _choose_batch(model, layers, calib, config: QuantizeConfig) -> tuple:
    """Set ``calib.batch_size`` to the largest batch <= config.batch_size whose capture fits the memory budget
    (config.max_memory, or the default share of the RAM), from the bytes of the captured layer inputs of one
    calibration sample (shape inference on the first sample's shapes, else one measured run). A model with a
    fixed batch keeps it. Returns (budget in bytes, a line saying what was chosen and why)."""
    budget = config.max_memory if config.max_memory is not None else default_max_memory()
    requested = calib.batch_size
    if getattr(calib, "fixed_batch", False):
        return budget, f"{calib.batch_size} (the model's fixed batch)"
    if not reiterable(calib) or requested <= 1:
        return budget, f"{calib.batch_size} (as given)"
    specs = {spec: L.groups for L in layers for _, spec in L.consumers}
    inits = {t.name for t in model.graph.initializer}
    tensors = sorted({t for spec in specs for t in spec_tensors(spec)} - inits)
    first = next(iter(calib))
    if getattr(calib, "fixed_batch", False):  # (known once data was seen)
        return budget, f"{calib.batch_size} (the model's fixed batch)"
    one = calib.head(first, 1)
    del first
    per = sample_bytes(model, tensors, one)
    if per is None:
        per = measured_sample_bytes(model, tensors, one)
    cross = config.sequential and config.method == "comq"
    fixed = current_rss() + stats_bytes(specs, cross) * (2 if config.damping == "auto" else 1)
    batch = batch_for_budget(per * (2 if cross else 1), budget, fixed, requested)
    calib.batch_size = batch
    note = (f"{batch}: captured activations {per / 2**20:.1f} MiB a sample, memory budget "
            f"{budget / 2**30:.2f} GiB" + ("" if batch == requested else f" (lowered from {requested})"))
    (log.warning if batch < requested and batch == 1 and fixed + CAPTURE_OVERHEAD * per > budget else log.info)(
        "calibration batch %s", note)
    return budget, note


def quantize(model_or_path, calibration, config: QuantizeConfig | None = None) -> onnx.ModelProto:
    """Quantize a float ONNX model (path or ModelProto) with COMQ; returns the QDQ ModelProto.

    ``calibration``: an .npz path (keys = input names), a folder of .npy/.npz, a dict of arrays, an iterable of
    feed dicts, an onnxruntime CalibrationDataReader, or "random" (smoke tests only).
    """
    return run(model_or_path, calibration, config)[0]


def _layer_grams(layer, stats) -> list:
    """The layer's Gram per group (summed over the consumers of a shared weight)."""
    return [sum(stats[spec].stats(k)[0] for _, spec in layer.consumers) for k in range(layer.groups)]


def _mixed_precision(model, layers, stats, calib, config: QuantizeConfig, plan: dict, xp, progress) -> dict:
    """Choose the bits of the layers no pattern pinned (``plan`` is updated) under ``config.avg_bits``; returns
    what the report shows. The layer errors come from the captured G (plain, uncentered: the perturbed model of the
    output sensitivity has no bias re-fit either), the same solver as the final solve (COMQ or RTN)."""
    t0 = time.perf_counter()
    pinned = {L.weight for L in layers if plan[L.weight][4]}
    free = [L for L in layers if L.weight not in pinned]
    params = {L.weight: int(np.prod(L.weight_shape)) for L in layers}
    cands = sorted({config.bits, *config.mp_bits})
    relerr, base_w = {}, {}
    n_solve = len(cands) if config.mp_estimate == "solve" else 1
    bar = _bar(progress, total=len(free) * n_solve, desc="bits", unit="solve")
    for L in free:
        mats = L.to_matrices(load_weight(model, L.weight))
        grams = _layer_grams(L, stats)
        dt = np.float64 if config.dtype == "float64" else np.float32
        den = sum(objective(Wk.astype(dt), np.zeros_like(Wk, dt), Gk.astype(dt)) for Wk, Gk in zip(mats, grams))
        relerr[L.weight] = {}
        for b in cands if config.mp_estimate == "solve" else [config.bits]:
            rtns, comqs = _solve_groups(xp, mats, grams, grams,
                                        config.solver_config(b, plan[L.weight][1], taps=conv_taps(L)), dt,
                                        config.method == "comq")
            res = comqs if comqs is not None else rtns
            relerr[L.weight][b] = _rel(sum(r.objective for r in res), den)
            if b == config.bits:
                base_w[L.weight] = L.from_matrices([r.qweight for r in res]).astype(
                    np.float16 if L.float16 else np.float32)
            if bar is not None:
                bar.update(1)
        for b in cands:  # "scaling": the quantization noise model, error x 4 per bit fewer
            relerr[L.weight].setdefault(b, relerr[L.weight][config.bits] * 4.0 ** (config.bits - b))
    if bar is not None:
        bar.close()
    sens = {w: 1.0 for w in relerr}
    if config.mp_sensitivity == "output" and free:
        bar = _bar(progress, total=len(free), desc="sensitivity", unit="layer")
        out_err = output_sensitivity(model, first_feeds(calib, config.mp_samples), base_w, bar)
        if bar is not None:
            bar.close()
        sens = {w: out_err[w] / relerr[w][config.bits] if relerr[w][config.bits] > 0 else 0.0 for w in relerr}
    dist = {w: {b: sens[w] * e for b, e in relerr[w].items()} for w in relerr}
    bits = allocate(params, dist, config.bits, config.avg_bits, {w: plan[w][0] for w in pinned})
    if average_bits(bits, params) > config.avg_bits + 1e-9:
        logging.getLogger("onnxcomq").warning(
            f"--avg-bits {config.avg_bits}: the layers pinned by --keep-8bit/--layer-bits alone average "
            f"{average_bits(bits, params):.2f} bits; no layer was raised")
    for L in free:
        if bits[L.weight] != config.bits:
            plan[L.weight][0] = bits[L.weight]
            note = f"mixed precision: {bits[L.weight]} bits"
            plan[L.weight][3] = "; ".join(x for x in (plan[L.weight][3], note) if x)
    return {"budget": config.avg_bits, "achieved": average_bits(bits, params), "candidates": cands,
            "sensitivity": config.mp_sensitivity, "estimate": config.mp_estimate,
            "seconds": time.perf_counter() - t0,
            # (a recurrent node has two layers, W and R: named with their weight)
            "layers": {(f"{L.node} [{L.weight}]" if L.op_type in RECURRENT_OPS else L.node): {
                "bits": bits[L.weight], "params": params[L.weight], "sensitivity": sens[L.weight],
                "relerr": {str(b): e for b, e in relerr[L.weight].items()}} for L in free}}


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
    plan: dict  # weight -> [bits, granularity, format, note, pinned] (precision.plan_layers)


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
    scfg = ctx.config.solver_config(*ctx.plan[layer.weight][:2], taps=conv_taps(layer))  # this layer's bits
    ctx = dataclasses.replace(ctx, scfg=scfg, dt=np.float64 if scfg.dtype == "float64" else np.float32)
    config, dt = ctx.config, ctx.dt
    tl = time.perf_counter()
    mats = layer.to_matrices(load_weight(ctx.model, layer.weight))
    sts = [stats[spec] for _, spec in layer.consumers]
    rows = sum(st.rows for st in sts)
    comq = config.method == "comq"
    # free bias only where it is exact: one consumer, a bias we can write
    # (never for a recurrent layer: its B is left alone, a free bias would not be exact through the gates)
    bc = ctx.use_bias and comq and len(sts) == 1 and layer.op_type not in RECURRENT_OPS \
        and bias_target(ctx.nodes[layer.consumers[0][0]], ctx.inits) is None
    few_rows = rows < config.damping_rows * layer.x.fan_in
    correct = correct and sts[0].cross and (config.correct_few_rows or rows >= config.correct_rows * layer.x.fan_in)
    beta = float(config.correction_strength) if correct else 0.0

    def gather(centered: bool, fold=None) -> list:  # per group (G, H, G~), summed over the consumers
        out = []
        for k in range(layer.groups):
            parts = [st.stats(k, centered, fold) for st in sts]
            # (one consumer: its arrays as they are, no copy; they are only read from here on)
            out.append(_mix(tuple(None if parts[0][i] is None else parts[0][i] if len(parts) == 1
                                  else sum(p[i] for p in parts) for i in range(3)), beta))
        return out

    raw = gather(False)  # the reported errors and the RTN baseline: uncentered, undamped
    if dt is np.float32 and any(safe_dtype(np, Wk, st[0], "float32") is np.float64 for Wk, st in zip(mats, raw)):
        dt = np.float64  # weights or inputs near float32's range: the solver works in float64, and so do the errors
        scfg = dataclasses.replace(scfg, dtype="float64")  # (so that the solver need not check again)
        ctx = dataclasses.replace(ctx, dt=dt, scfg=scfg)
    solve = gather(True) if bc else raw  # what COMQ solves
    alpha = 0.0
    if comq and ctx.damping == "scaled":  # every layer, by its rows per input
        alpha = scaled_damping(rows, layer.x.fan_in, config.damping_scale, config.damping_max)
    elif few_rows and comq and ctx.damping != 0:  # G is (near) rank-deficient: COMQ would fit the calibration noise
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
            mu = mu if correct else mut  # the mean is corrected fully at any strength (measured better)
            delta.append(Wk.astype(np.float64) @ mu - res.qweight.astype(np.float64) @ mut)
        num_c += o_c
        num_r += o_r
        den += objective(Wk.astype(dt), np.zeros_like(Wk, dt), raw[k][0].astype(dt))  # ||X W^T||^2
        codes.append(res.codes.astype(np.int16))  # 2..8-bit codes: int16 holds them (int32 from the solver)
        scales.append(res.scale)
        zps.append(res.zero_point)
    del rtns, comqs, res  # free the solver's full-size arrays before the next layer (large models)
    if layer.op_type in RECURRENT_OPS and den == 0:
        log.warning("%s: weight %s (%s) read zeros in every calibration row (e.g. R, with one-step sequences from "
                    "a zero initial state): rounded to nearest", layer.node, layer.weight, _RNN_ROLE[layer.x.kind])
    scale = np.concatenate(scales)
    zp = np.concatenate(zps)
    if scfg.granularity == "tensor":
        if np.unique(scale).size > 1 or np.unique(zp).size > 1:
            raise UserError(f"{layer.node}: per-tensor granularity with {layer.groups} conv groups is not "
                            "supported (each group gets its own scale); use --granularity channel")
        scale, zp = scale[:1].reshape(()), zp[:1].reshape(())
    axis = layer.axis
    if scfg.granularity == "block":
        scale, zp, axis = block_layout(layer, scale, zp)
    directions = 0
    if layer.op_type in RECURRENT_OPS and layer.groups > 1 and scale.ndim:
        # per (direction, gate row) scales of W/R [2, gates * hidden, n]: scale [2, gates * hidden] (emit writes
        # one DequantizeLinear per direction and a Concat)
        scale, zp, directions = scale.reshape(layer.groups, -1), zp.reshape(layer.groups, -1), layer.groups
    qw = QuantizedWeight(layer.weight, layer.from_matrices(codes), scale, zp, axis, scfg.bits,
                         signed=scfg.scheme == "sym", float16=layer.float16, block_size=scfg.quant_block,
                         directions=directions)
    report = LayerReport(layer.node, layer.op_type, layer.weight, list(layer.weight_shape), layer.groups, scfg.bits,
                         rows, _rel(num_c, den), _rel(num_r, den), time.perf_counter() - tl, rtn_groups=fallback,
                         bias_corrected=bc, damped=alpha > 0, damping=alpha, corrected=correct,
                         consumers=[c for c, _ in layer.consumers], granularity=scfg.granularity,
                         weight_format=ctx.plan[layer.weight][2],
                         note="; ".join(x for x in (_RNN_ROLE.get(layer.x.kind, ""), ctx.plan[layer.weight][3]) if x))
    return qw, np.concatenate(delta) if bc else None, report


_RNN_ROLE = {"rnn_input": "W: input sequence", "rnn_hidden": "R: hidden states"}  # (the report's note)


def _bar(enabled: bool, **kw):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(leave=False, dynamic_ncols=True, **kw)


__all__ = ["QuantizeConfig", "Report", "LayerReport", "VerificationError", "quantize", "run"]
