"""The recipe: everything that decides the output, as frozen sections that validate themselves.

    Recipe()                                   # the defaults (sequential capture in 16 stages)
    Recipe(weights=Weights(bits=8))            # one section changed
    Recipe.official(bits=4)                    # a preset: a named constructor, not a flag
    Recipe.load("recipe.yaml").updated({"weights": {"bits": 3}})

A recipe file (YAML or JSON) holds any subset of the sections, e.g. ``{"weights": {"bits": 4}, "sequential":
null}``; a missing section keeps its default, ``null`` turns an optional section off. ``to_dict`` gives
the whole effective recipe (the report embeds it, so a run can be reproduced from it). The reasons behind the
defaults, with their measurements, are in docs/experiments.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass, field

from .errors import UserError
from .graph.layers import SUPPORTED_OPS, check_op_types
from .precision import NBITS_BITS, parse_layer_bits
from .solve.comq import SolverConfig

GRANULARITIES = ("channel", "tensor", "block")
FORMATS = ("qdq", "matmulnbits")
TARGETS = ("ort", "tensorrt")
ACT_METHODS = ("minmax", "percentile", "mse")
MIN_MAX_OPSET = 13


def _finite(v, lo=None) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (lo is None or v >= lo)


def _int(v, lo=None, hi=None) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and (lo is None or v >= lo) and (hi is None or v <= hi)


def _choice(section: str, name: str, value, options) -> None:
    if value not in options:
        raise UserError(f"{section}.{name} must be one of {', '.join(map(str, options))}, got {value!r}")


@dataclass(frozen=True)
class Weights:
    """How weights are stored: bits, grid granularity and scheme, the weight operator."""

    bits: int = 4
    granularity: str = "channel"  # channel | tensor | block (one scale per output row and block of inputs)
    block_size: int = 32  # granularity "block": input channels per scale (MatMulNBits: a power of two >= 16)
    scheme: str | None = None  # asym | sym; None: sym where activations are quantized or the target is tensorrt
    format: str = "qdq"  # qdq (DequantizeLinear) | matmulnbits (MatMul, Gemm weights as com.microsoft MatMulNBits)
    method: str = "comq"  # comq | rtn (round-to-nearest on the same grid: the baseline)
    nbits_accuracy_level: int = 0  # MatMulNBits accuracy_level (0: float activations; 4: int8, faster)
    # the output's highest opset (None: what the weights need, 21 for int4); below 21, 2..4-bit codes are stored
    # in int8 containers for runtimes without int4 DequantizeLinear
    max_opset: int | None = None

    def validate(self) -> None:
        if not _int(self.bits, 2, 8):
            raise UserError(f"bits must be an integer in 2..8 (--bits, weights.bits), got {self.bits!r}")
        _choice("weights", "granularity", self.granularity, GRANULARITIES)
        if not _int(self.block_size, 1):
            raise UserError(f"--block-size must be a positive integer, got {self.block_size!r}")
        _choice("weights", "scheme", self.scheme, (None, "asym", "sym"))
        _choice("weights", "format", self.format, FORMATS)
        _choice("weights", "method", self.method, ("comq", "rtn"))
        _choice("weights", "nbits_accuracy_level", self.nbits_accuracy_level, (0, 1, 2, 3, 4))
        if self.format == "matmulnbits":
            if self.granularity != "block":
                raise UserError(f"--format matmulnbits needs --granularity block (MatMulNBits has one scale per "
                                f"block of K), got --granularity {self.granularity}")
            b = self.block_size
            if b < 16 or b & (b - 1):
                raise UserError(f"--format matmulnbits needs --block-size a power of two >= 16 (onnxruntime's "
                                f"MatMulNBits), got {b}")
            if self.bits not in NBITS_BITS:
                raise UserError(f"--format matmulnbits supports {'/'.join(map(str, NBITS_BITS))} bits, got --bits "
                                f"{self.bits}")
        m = self.max_opset
        if m is not None:
            if not _int(m, MIN_MAX_OPSET):
                raise UserError(f"max opset must be an integer >= {MIN_MAX_OPSET} (per-channel DequantizeLinear "
                                f"needs opset 13), got {m!r}")
            if m < 21 and self.granularity == "block" and self.format != "matmulnbits":
                raise UserError(f"weights.max_opset {m}: --granularity block needs DequantizeLinear's block_size, opset "
                                "21; use --granularity channel, or --format matmulnbits (com.microsoft MatMulNBits "
                                "for the MatMul weights, no opset 21 needed)")


@dataclass(frozen=True)
class Layers:
    """Which layers are quantized, and at which bits (fnmatch patterns on node names or op types)."""

    op_types: tuple = SUPPORTED_OPS
    exclude: tuple = ()  # nodes left float
    keep_8bit: tuple = ()  # kept at 8 bits: "first", "last", "depthwise", or patterns
    layer_bits: tuple = ()  # "PATTERN=BITS" items (or (pattern, bits) pairs), a later match winning
    rewrite_matmul: bool = True  # Einsum with a constant weight and MatMul(W, x) rewritten as MatMul(x, W')
    lm_head: str = "float"  # a language model's output projection (graph/layers.lm_heads): float | int8 | quantize

    def validate(self) -> None:
        check_op_types(self.op_types)
        _choice("layers", "lm_head", self.lm_head, ("float", "int8", "quantize"))
        parse_layer_bits(self.layer_bits)


@dataclass(frozen=True)
class Solver:
    """The COMQ solve of each layer (docs/design.md, "Solve")."""

    order: str = "cyclic"  # cyclic | importance | greedy (per row, the official code's)
    sweeps: int = 3
    scale_update: bool = True
    lam: float = 1.0  # grid shrink factor of the initial scales (without the search)
    lambda_search: bool | None = None  # per channel among the lambda grid; None: at <= 4 bits
    lambda_solves: int = 7  # with the search: full solves from each channel's k best candidates (block grids: 1)
    zero_in_range: bool = True  # widen the asym min-max range to contain 0
    bias_correction: bool = True  # free bias: solve on the centered Gram, fold the mean error into the bias
    dtype: str = "float32"  # float32 | float64
    device: str = "auto"  # auto | cpu | gpu
    workers: str | None = None  # None: solve here; local:N processes; ray or ray://HOST:PORT (CPU, NumPy)

    def validate(self) -> None:
        _choice("solver", "order", self.order, ("cyclic", "importance", "greedy"))
        if not _int(self.sweeps, 1):
            raise UserError(f"solver.sweeps must be an integer >= 1, got {self.sweeps!r}")
        if not (_finite(self.lam) and self.lam > 0):
            raise UserError(f"lambda must be a finite number > 0, got {self.lam!r}")
        _choice("solver", "dtype", self.dtype, ("float32", "float64"))
        _choice("solver", "device", self.device, ("auto", "cpu", "gpu"))
        from .workers import parse

        if parse(self.workers)[0] != "process" and self.device == "gpu":
            raise UserError(f"--workers {self.workers} solves on CPU workers (NumPy): drop --device gpu, or drop "
                            "--workers to solve on the GPU here")


@dataclass(frozen=True)
class Regularization:
    """Damping: the solve uses G + alpha * mean(diag G) * I, so that the codes do not fit what is particular to the
    calibration data. "scaled": every layer, alpha = min(max, scale * sqrt(fan_in / rows)); a number: that alpha
    on layers with fewer than few_rows x fan-in rows; "auto": per such layer, the value of ``grid`` with the lowest
    error on held-out rows."""

    damping: float | str = "scaled"
    scale: float = 3.0
    max: float = 10.0
    few_rows: float = 4.0
    grid: tuple = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0)

    def validate(self) -> None:
        if self.damping not in ("auto", "scaled") and not _finite(self.damping, 0):
            raise UserError(f"damping must be 'scaled', 'auto' or a finite number >= 0, got {self.damping!r}")
        for name in ("scale", "max", "few_rows"):
            if not _finite(getattr(self, name), 0):
                raise UserError(f"damping {name.replace('_', ' ')} must be a finite number >= 0 (regularization.{name}), "
                                f"got {getattr(self, name)!r}")
        if not self.grid or any(not _finite(a, 0) for a in self.grid):
            raise UserError(f"damping grid must hold finite numbers >= 0, got {self.grid!r}")


@dataclass(frozen=True)
class Sequential:
    """Sequential (error-feeding) capture, on by default: the layers in ``stages`` topological stages; each later
    stage's layers solve min ||X W^T - X~ Q^T||^2 with X~ their input in the model whose earlier stages are
    quantized. A mixed-precision budget allocates its bits from one float pass over every layer first; runs with
    quantized activations take one float pass instead (they need every layer's statistics at once); ``null`` turns
    it off."""

    stages: int = 16
    correction: str = "entry"  # which layers fit the float output from X~: entry | all | none
    strength: float = 1.0  # the share of its input error a correcting layer's weights fit (0..1)
    min_rows: float = 4.0  # a layer corrects only with at least min_rows x fan-in calibration rows
    few_rows: bool = False  # let every entry layer correct, whatever its rows

    def validate(self) -> None:
        if not _int(self.stages, 1):
            raise UserError(f"stages must be an integer >= 1, got {self.stages!r}")
        _choice("sequential", "correction", self.correction, ("entry", "all", "none"))
        if not (_finite(self.strength) and 0 <= self.strength <= 1):
            raise UserError(f"correction strength must be a number in 0..1, got {self.strength!r}")
        if not _finite(self.min_rows, 0):
            raise UserError(f"sequential.min_rows must be a finite number >= 0, got {self.min_rows!r}")


@dataclass(frozen=True)
class MixedPrecision:
    """Mixed precision under a size budget: the parameter-weighted mean bits of the quantized weights, allocated by
    measured sensitivity among ``candidates`` (5..8-bit codes are all stored as int8: (8,) makes it a file-size
    budget)."""

    avg_bits: float = 4.5
    candidates: tuple = (5, 6, 8)
    sensitivity: str = "output"  # output (measured model-output error per layer) | layer (layer error only)
    samples: int = 8  # calibration samples for the output sensitivity
    estimate: str = "scaling"  # a layer's error at other bits: "scaling" from its base solve (x 1/4 per bit), "solve"

    def validate(self, weights: Weights) -> None:
        if not (_finite(self.avg_bits) and weights.bits <= self.avg_bits <= 8):
            raise UserError(f"mixed_precision.avg_bits must be between the bits ({weights.bits}) and 8, got {self.avg_bits!r}")
        cand = tuple(self.candidates)
        if not cand or any(not _int(b) or not weights.bits < b <= 8 for b in cand):
            raise UserError(f"mixed_precision.candidates must be bit widths above --bits ({weights.bits}) and <= 8, "
                            f"got {','.join(map(str, cand)) or 'nothing'}")
        if weights.format == "matmulnbits" and any(b not in NBITS_BITS for b in cand):
            raise UserError(f"--format matmulnbits supports {'/'.join(map(str, NBITS_BITS))} bits: "
                            f"mixed_precision.candidates {','.join(map(str, cand))} is not possible")
        _choice("mixed_precision", "sensitivity", self.sensitivity, ("output", "layer"))
        _choice("mixed_precision", "estimate", self.estimate, ("solve", "scaling"))
        if not _int(self.samples, 1):
            raise UserError(f"mixed_precision.samples must be a positive integer, got {self.samples!r}")


@dataclass(frozen=True)
class Activations:
    """Activation quantization (Q/DQ pairs placed for the recipe's target)."""

    bits: int = 8
    method: str = "minmax"  # minmax | percentile | mse
    percentile: float = 99.99
    scheme: str | None = None  # asym | sym; None: the target's
    dtype: str | None = None  # uint8 | int8; None: the target's
    exclude: tuple = ()  # fnmatch patterns over node names, op types and tensor names kept float
    aware: bool = False  # a second capture pass with the activations fake-quantized: G from quantized inputs
    # activations whose quantization noise / power on the calibration data exceeds this stay float
    max_noise: float = 0.003

    def validate(self) -> None:
        if self.bits != 8:
            raise UserError(f"activations.bits must be 8 (int8/uint8 activations), got {self.bits!r}")
        _choice("activations", "method", self.method, ACT_METHODS)
        if not (_finite(self.percentile) and 50.0 < self.percentile <= 100.0):
            raise UserError(f"activations.percentile must be in (50, 100], got {self.percentile!r}")
        if not (isinstance(self.max_noise, (int, float)) and self.max_noise > 0):
            raise UserError(f"activations.max_noise must be > 0 (inf: quantize every planned tensor), got "
                            f"{self.max_noise!r}")
        _choice("activations", "scheme", self.scheme, (None, "asym", "sym"))
        _choice("activations", "dtype", self.dtype, (None, "uint8", "int8"))


@dataclass(frozen=True)
class Data:
    """Calibration data handling."""

    batch_size: int = 32  # the largest batch; lowered so that capture fits max_memory
    max_samples: int | None = None
    max_memory: int | str | None = None  # bytes, or "4G" / "512M"; None: a quarter of the machine's RAM
    mask_input: str | None = "auto"  # attention-mask input (padded tokens stay out of G); "auto": common names

    def validate(self) -> None:
        if not _int(self.batch_size, 1):
            raise UserError(f"batch size must be a positive integer (--batch-size), got {self.batch_size!r}")
        if self.max_samples is not None and not _int(self.max_samples, 1):
            raise UserError(f"max samples must be a positive integer (--max-samples), got {self.max_samples!r}")
        if self.max_memory is not None:
            from .capture.memory import parse_bytes
            parse_bytes(self.max_memory, "max memory")


@dataclass(frozen=True)
class Check:
    """The check of the quantized model against the float one before it is returned (verify.py)."""

    enabled: bool = True
    samples: int = 8  # calibration samples (a model with a fixed batch: one whole batch)

    def validate(self) -> None:
        if not _int(self.samples, 1):
            raise UserError(f"verify samples must be an integer >= 1, got {self.samples!r}")


SECTIONS = {"weights": Weights, "layers": Layers, "solver": Solver, "regularization": Regularization,
            "data": Data, "check": Check, "sequential": Sequential, "mixed_precision": MixedPrecision,
            "activations": Activations}
OPTIONAL = ("sequential", "mixed_precision", "activations")


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the output. Presets are named constructors (``Recipe.official()`` etc.)."""

    target: str = "ort"  # ort | tensorrt: where the model is deployed (activation format, weight scheme)
    weights: Weights = field(default_factory=Weights)
    layers: Layers = field(default_factory=Layers)
    solver: Solver = field(default_factory=Solver)
    regularization: Regularization = field(default_factory=Regularization)
    data: Data = field(default_factory=Data)
    check: Check = field(default_factory=Check)
    sequential: Sequential | None = field(default_factory=Sequential)
    mixed_precision: MixedPrecision | None = None
    activations: Activations | None = None

    # ------------------------------------------------------------------ presets
    @classmethod
    def official(cls, bits: int = 4, **sections) -> "Recipe":
        """The official COMQ code's configuration: greedy order, one sweep, asymmetric per-channel min-max grid
        without widening to 0, no scale update, no lambda search, no free bias, no damping."""
        return cls(weights=Weights(bits=bits, granularity="channel", scheme="asym"),
                   solver=Solver(order="greedy", sweeps=1, scale_update=False, lambda_search=False,
                                 zero_in_range=False, bias_correction=False),
                   regularization=Regularization(damping=0.0), sequential=None, **sections)

    @classmethod
    def fast(cls, bits: int = 4, **sections) -> "Recipe":
        """One float capture pass and one COMQ solve per layer from the best round-to-nearest grid (the default
        captures in 16 sequential stages and solves from 7 candidate grids): about 0.4x the default's time."""
        return cls(weights=Weights(bits=bits), solver=Solver(lambda_solves=1), sequential=None, **sections)

    @classmethod
    def preset(cls, name: str, **kw) -> "Recipe":
        """A preset by name: default, fast or official (``best``, the default plus sequential capture before
        sequential capture became the default, is the default)."""
        def default(**k):
            return cls(weights=Weights(**({"bits": k.pop("bits")} if "bits" in k else {})), **k)

        makers = {"default": default, "official": cls.official, "fast": cls.fast, "best": default}
        if name not in makers:
            raise UserError(f"--preset must be one of default, fast, official, got {name!r}")
        return makers[name](**kw)

    # ------------------------------------------------------------------ derived values
    def layer_policy(self, bits: int, granularity: str, taps: int, free_bias: bool, damping, correct: bool):
        """What solve.layer.quantize_layer does for one layer (its bits and granularity from precision.py's plan,
        ``taps`` of a conv kernel; ``free_bias`` where a re-fitted bias is exact; ``correct``: may correct its input
        error in sequential capture)."""
        from .solve.layer import LayerPolicy

        reg, seq = self.regularization, self.sequential_capture()
        return LayerPolicy(self.solver_config(bits, granularity, taps), comq=self.weights.method == "comq",
                           free_bias=free_bias, damping=damping, damping_scale=reg.scale, damping_max=reg.max,
                           few_rows=reg.few_rows, damping_grid=reg.grid, correct=correct,
                           **({} if seq is None else dict(strength=seq.strength, correct_rows=seq.min_rows,
                                                          correct_few_rows=seq.few_rows)))

    def sequential_capture(self) -> Sequential | None:
        """The sequential section where it applies. Runs that quantize activations need every layer's float
        statistics at once, and round-to-nearest and the official COMQ code have no input error to fit: those take
        one float pass whatever the section says. (A size budget's bits come from a float pass before the stages.)"""
        if self.activations is not None or self.weights.method != "comq" or self.is_official():
            return None
        return self.sequential

    def weight_scheme(self) -> str:
        return self.weights.scheme or ("sym" if self.activations is not None or self.target == "tensorrt"
                                       else "asym")

    def is_official(self) -> bool:
        """Whether the solve is the official COMQ code's (the model's metadata says so)."""
        s = self.solver
        return (s.order, s.sweeps, s.scale_update, s.lambda_search, s.zero_in_range, s.bias_correction) == \
            ("greedy", 1, False, False, False, False)

    def solver_config(self, bits: int | None = None, granularity: str | None = None, taps: int = 1) -> SolverConfig:
        """The solver's settings for one layer (its bits and granularity may differ from the run's: precision.py;
        ``taps``: a conv kernel's taps, for block grids)."""
        w, s = self.weights, self.solver
        bits = w.bits if bits is None else bits
        granularity = granularity or w.granularity
        block = granularity == "block"
        cfg = SolverConfig(bits=bits, granularity=granularity, scheme=self.weight_scheme(), order=s.order,
                           sweeps=s.sweeps, scale_update=s.scale_update, lam=s.lam, zero_in_range=s.zero_in_range,
                           lambda_search=bits <= 4 if s.lambda_search is None else bool(s.lambda_search),
                           lambda_solves=s.lambda_solves if not block else 1, dtype=s.dtype,
                           block_size=w.block_size if block else 0, block_taps=taps if block else 1)
        try:
            return cfg.validate()
        except ValueError as e:
            raise UserError(str(e)) from None

    # ------------------------------------------------------------------ validation
    def validate(self) -> "Recipe":
        _choice("recipe", "target", self.target, TARGETS)
        for name in SECTIONS:
            sec = getattr(self, name)
            if sec is None:
                continue
            sec.validate(self.weights) if name == "mixed_precision" else sec.validate()
        w = self.weights
        if w.granularity == "block" and self.is_official():
            raise UserError("--preset official uses per-channel grids: it cannot be combined with --granularity "
                            "block")
        self.solver_config()
        if self.target == "tensorrt":
            self._validate_tensorrt()
        return self

    def _validate_tensorrt(self) -> None:
        w = self.weights
        if self.activations is None:  # weight-only for TensorRT: symmetric; INT4 only block-wise (DQ block_size)
            if self.weight_scheme() != "sym":
                raise UserError("target tensorrt needs symmetric weights (zero point 0): drop --scheme asym / "
                                "--preset official")
            if w.bits <= 4 and w.granularity != "block":
                raise UserError(f"target tensorrt takes {w.bits}-bit weights only block-wise (DequantizeLinear "
                                "with block_size, opset 21): add --granularity block --block-size 32|64|128")
            if w.bits > 4 and w.granularity != "channel":
                raise UserError("target tensorrt takes int8 weights per channel: use --granularity channel")
            return
        a = self.activations
        bad = [f"{name} {val}" for name, val, want in (
            ("weight scheme", self.weight_scheme(), "sym"), ("activation scheme", a.scheme or "sym", "sym"),
            ("activation dtype", a.dtype or "int8", "int8")) if val != want]
        if bad:
            raise UserError(f"target tensorrt needs symmetric int8 weights and activations with zero point 0; got "
                            f"{', '.join(bad)}")
        if w.bits < 5:
            raise UserError(f"target tensorrt with {w.bits}-bit weights and quantized activations: TensorRT "
                            "takes INT4 only as weight-only block-wise weights; use --bits 8 with --act-bits 8, "
                            f"or drop --act-bits for weight-only --bits {w.bits} --granularity block")
        if w.granularity != "channel":
            raise UserError(f"target tensorrt with quantized activations uses per-channel weights: --granularity "
                            f"{w.granularity} is not supported")

    # ------------------------------------------------------------------ dicts and files
    def to_dict(self) -> dict:
        out = {"target": self.target}
        for name in SECTIONS:
            sec = getattr(self, name)
            out[name] = None if sec is None else {k: _plain(v) for k, v in dataclasses.asdict(sec).items()}
        return out

    @classmethod
    def from_dict(cls, d: dict, source: str = "recipe") -> "Recipe":
        return cls().updated(d, source)

    def updated(self, d: dict, source: str = "recipe") -> "Recipe":
        """A copy with the sections and fields of ``d`` changed (nested dicts; a section set to None is turned
        off, an optional section given as a dict is turned on with its defaults for the fields not given)."""
        if not isinstance(d, dict):
            raise UserError(f"{source}: expected a mapping of sections, got {type(d).__name__}")
        unknown = sorted(set(d) - set(SECTIONS) - {"target"})
        if unknown:
            raise UserError(f"{source}: unknown section(s) {', '.join(unknown)} (sections: target, "
                            f"{', '.join(SECTIONS)})")
        changes = {}
        if "target" in d:
            changes["target"] = d["target"]
        for name, cls_ in SECTIONS.items():
            if name not in d:
                continue
            v = d[name]
            if v is None:
                if name not in OPTIONAL:
                    raise UserError(f"{source}: section {name} cannot be turned off (null)")
                changes[name] = None
                continue
            if isinstance(v, cls_):
                changes[name] = v
                continue
            if not isinstance(v, dict):
                raise UserError(f"{source}: section {name}: expected a mapping of fields, got {v!r}")
            names = {f.name for f in dataclasses.fields(cls_)}
            bad = sorted(set(v) - names)
            if bad:
                raise UserError(f"{source}: unknown field(s) {', '.join(f'{name}.{b}' for b in bad)} (fields of "
                                f"{name}: {', '.join(sorted(names))})")
            hints = typing.get_type_hints(cls_)
            base = getattr(self, name) or cls_()
            changes[name] = dataclasses.replace(base, **{k: _typed(hints[k], x) for k, x in v.items()})
        return dataclasses.replace(self, **changes)

    @classmethod
    def load(cls, path: str) -> "Recipe":
        """A recipe from a .yaml/.yml or .json file (the sections it holds; the rest default)."""
        return cls.from_dict(cls.read(path), source=os.fspath(path))

    @staticmethod
    def read(path: str) -> dict:
        """The sections of a .yaml/.yml or .json recipe file, as a dict (``updated`` applies them)."""
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise UserError(f"{path}: cannot read the recipe: {e.strerror or e}") from None
        if path.endswith((".yaml", ".yml")):
            try:
                import yaml
            except ImportError:
                raise UserError(f"{path}: YAML recipes need PyYAML (pip install pyyaml); or write it as .json") \
                    from None
            try:
                d = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise UserError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
        else:
            try:
                d = json.loads(text)
            except ValueError as e:
                raise UserError(f"{path}: not valid JSON: {e}") from None
        return d or {}

    def dumps(self, fmt: str = "yaml") -> str:
        d = self.to_dict()
        if fmt == "yaml":
            try:
                import yaml
                return yaml.safe_dump(d, sort_keys=False)
            except ImportError:
                pass
        return json.dumps(d, indent=2) + "\n"

    @staticmethod
    def schema() -> dict:
        """The JSON schema of a recipe file."""
        props = {"target": {"enum": list(TARGETS)}}
        for name, cls_ in SECTIONS.items():
            hints = typing.get_type_hints(cls_)
            fields = {f.name: _json_type(hints[f.name]) for f in dataclasses.fields(cls_)}
            sec = {"type": "object", "properties": fields, "additionalProperties": False,
                   "description": " ".join((cls_.__doc__ or "").split())}
            props[name] = {"anyOf": [sec, {"type": "null"}]} if name in OPTIONAL else sec
        return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "onnxcomq recipe",
                "type": "object", "properties": props, "additionalProperties": False}


# Where the flat settings of onnxcomq 0.1.0 (QuantizeConfig fields; as options: --damping-scale for damping_scale)
# went: flat name -> (section, field). The command line names the field when an old option is given; benchmark
# scripts use it to keep their flat variant syntax.
MOVED = {
    **{k: ("weights", k) for k in ("bits", "granularity", "block_size", "scheme", "method", "nbits_accuracy_level",
                                    "max_opset")},
    "weight_format": ("weights", "format"),
    **{k: ("layers", k) for k in ("keep_8bit", "layer_bits", "op_types", "exclude", "rewrite_matmul")},
    **{k: ("solver", k) for k in ("order", "sweeps", "scale_update", "lam", "lambda_search", "lambda_solves",
                                   "bias_correction", "dtype", "device", "zero_in_range")},
    "lambda": ("solver", "lam"),
    "damping": ("regularization", "damping"), "damping_scale": ("regularization", "scale"),
    "damping_max": ("regularization", "max"), "damping_rows": ("regularization", "few_rows"),
    "damping_grid": ("regularization", "grid"),
    "stages": ("sequential", "stages"), "correction": ("sequential", "correction"),
    "correction_strength": ("sequential", "strength"), "correct_rows": ("sequential", "min_rows"),
    "correct_min_rows": ("sequential", "min_rows"), "correct_few_rows": ("sequential", "few_rows"),
    "avg_bits": ("mixed_precision", "avg_bits"), "mp_bits": ("mixed_precision", "candidates"),
    "mp_sensitivity": ("mixed_precision", "sensitivity"), "mp_samples": ("mixed_precision", "samples"),
    "mp_estimate": ("mixed_precision", "estimate"),
    "act_bits": ("activations", "bits"), "act_method": ("activations", "method"),
    "act_percentile": ("activations", "percentile"), "act_scheme": ("activations", "scheme"),
    "act_dtype": ("activations", "dtype"), "act_exclude": ("activations", "exclude"),
    "act_aware": ("activations", "aware"), "act_max_noise": ("activations", "max_noise"),
    **{k: ("data", k) for k in ("batch_size", "max_samples", "max_memory", "mask_input")},
    "verify": ("check", "enabled"), "verify_samples": ("check", "samples"),
}


def moved_option(option: str) -> str | None:
    """For an option of 0.1.0's command line that is now a recipe field (e.g. --sweeps): where it went."""
    name = option.lstrip("-").split("=")[0].replace("-", "_").removeprefix("no_")
    if name == "official":
        return "--preset official"
    if name == "sequential":
        return "the default (sequential capture; the recipe's 'sequential: null' or --preset fast turn it off)"
    where = MOVED.get(name)
    if where is None or option.startswith("--no-") and name not in ("scale_update", "bias_correction",
                                                                    "rewrite_matmul"):
        return None
    return f"the recipe's {where[0]}.{where[1]}"


def _plain(v):
    return [_plain(x) for x in v] if isinstance(v, (tuple, list)) else v


def _typed(hint, v):
    """A value read from JSON/YAML in the field's Python type (lists as tuples; one value for a list field is a list
    of one: ``candidates: 8``)."""
    if isinstance(v, list):
        return tuple(tuple(x) if isinstance(x, list) else x for x in v)
    if hint is tuple and not isinstance(v, tuple):
        return (v,)
    return v


def _json_type(hint) -> dict:
    args = typing.get_args(hint)
    if hint is bool:
        return {"type": "boolean"}
    if hint is int:
        return {"type": "integer"}
    if hint is float:
        return {"type": "number"}
    if hint is str:
        return {"type": "string"}
    if hint is tuple or typing.get_origin(hint) is tuple:
        return {"type": "array"}
    if args:
        return {"anyOf": [_json_type(a) for a in args]}
    return {}


__all__ = ["MOVED", "Recipe", "Weights", "Layers", "Solver", "Regularization", "Data", "Check", "Sequential",
           "MixedPrecision", "Activations"]
