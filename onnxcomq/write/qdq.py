"""Stage 4: write the QDQ model: each quantized weight becomes DequantizeLinear(codes, scale, zero_point).

The DequantizeLinear node outputs the original weight name, so every consumer (shared weights included) reads the
dequantized weight unchanged; the float initializer is removed from the file. 8..5-bit codes are int8/uint8 (opset
>= 13 for the per-channel axis); 4..2-bit codes are int4/uint4, two per byte (opset >= 21), or, under a
``max_opset`` below 21 (older runtimes), the same codes in int8/uint8 containers (opset 13, twice the bytes, the same
dequantized weights). Older models are converted with onnx's version converter, not just renumbered.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace

import ml_dtypes
import numpy as np
import onnx
from onnx import helper, numpy_helper, version_converter

from .. import __version__
from ..errors import UserError
from ..graph.layers import unique_name
from ..graph.modelio import drop_weight, opset_of


@dataclass
class QuantizedWeight:
    """Codes in the weight's stored layout and the DequantizeLinear parameters."""

    name: str
    codes: np.ndarray  # integer codes, same shape as the float weight
    scale: np.ndarray  # (C,) per channel or () per tensor
    zero_point: np.ndarray  # same shape as scale, integers
    axis: int
    bits: int
    signed: bool
    float16: bool = False  # a float16 weight: the scale (and so the DequantizeLinear output) is float16
    block_size: int = 0  # > 0: blocked DequantizeLinear (opset 21), scale like codes with axis cut in blocks
    # > 0: W/R [directions, rows, n] of a bidirectional LSTM/GRU/RNN, scale [directions, rows]: one per direction and
    # gate row (axis 1), written as one per-channel DequantizeLinear per direction and a Concat (exact, opset 13)
    directions: int = 0

    def expand(self, a: np.ndarray) -> np.ndarray:
        """A scale-shaped array broadcast against the codes (blocks repeated along ``axis``)."""
        if self.directions:
            return a.reshape(a.shape + (1,))
        if self.block_size:
            rep = np.repeat(a, self.block_size, axis=self.axis)
            return rep[tuple(slice(0, d) for d in self.codes.shape)]
        shape = [1] * self.codes.ndim
        if a.ndim:
            shape[self.axis] = -1
        return a.reshape(shape)

    def code_dtype(self, max_opset: int | None = None):
        """The stored code type: int4/uint4 for 2..4 bits (int8/uint8 containers under a max_opset below 21)."""
        if self.bits <= 4 and not (max_opset and max_opset < 21):
            return ml_dtypes.int4 if self.signed else ml_dtypes.uint4
        return np.int8 if self.signed else np.uint8

    def storage(self, max_opset: int | None = None):
        """(codes, zero_point, dtype) as stored. Codes whose zero point does not fit the stored type (the official
        min-max grid of a row whose weights all have one sign does not contain 0) are stored as signed levels
        ``codes - zero_point`` with zero point 0 in the smallest signed type that holds them (int8, int16, int32;
        int16 needs opset 21, so under a lower ``max_opset`` int32)."""
        lo, hi = (-(1 << (self.bits - 1)), (1 << (self.bits - 1)) - 1) if self.signed else (0, (1 << self.bits) - 1)
        if self.codes.min() < lo or self.codes.max() > hi:
            raise ValueError(f"codes of {self.name} outside the {self.bits}-bit range [{lo}, {hi}]")
        dt = self.code_dtype(max_opset)
        zlo, zhi = lo, hi
        if self.bits <= 4 and dt in (np.int8, np.uint8):  # an 8-bit container of 4-bit codes holds more zero points
            zlo, zhi = np.iinfo(dt).min, np.iinfo(dt).max
        if zlo <= self.zero_point.min() and self.zero_point.max() <= zhi:
            return self.codes, self.zero_point, dt
        levels = self.codes.astype(np.int64) - self.expand(self.zero_point.astype(np.int64))
        for dt in (np.int8, np.int16, np.int32) if not (max_opset and max_opset < 21) else (np.int8, np.int32):
            info = np.iinfo(dt)
            if info.min <= levels.min() and levels.max() <= info.max:
                return levels, np.zeros_like(self.zero_point), dt
        raise ValueError(f"levels of {self.name} do not fit int32")

    def dequantized(self) -> np.ndarray:
        """What the DequantizeLinear produces, in the stored layout and float type (float16 for a float16 weight):
        (codes - zero point) * scale, rounded once to the output type."""
        dt = np.float16 if self.float16 else np.float32
        levels = self.codes.astype(np.int32) - self.expand(np.asarray(self.zero_point, np.int32))
        return (levels * self.expand(np.asarray(self.scale, dt))).astype(dt)


def quantized_weight(layer, res) -> QuantizedWeight:
    """A layer's solve (solve.layer.LayerResult, rows per group) in the layout of its weight tensor: per-tensor
    scales as scalars, block scales beside the codes, per-direction scales of a bidirectional recurrent weight."""
    from ..graph.layers import RECURRENT_OPS
    from ..solve.blockwise import block_layout

    scfg = res.solver
    scale = np.concatenate(res.scales)
    zp = np.concatenate(res.zero_points)
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
        # per (direction, gate row) scales of W/R [2, gates * hidden, n]: scale [2, gates * hidden] (written as
        # one DequantizeLinear per direction and a Concat)
        scale, zp, directions = scale.reshape(layer.groups, -1), zp.reshape(layer.groups, -1), layer.groups
    return QuantizedWeight(layer.weight, layer.from_matrices(res.codes), scale, zp, axis, scfg.bits,
                           signed=scfg.scheme == "sym", float16=layer.float16, block_size=scfg.block_size,
                           directions=directions)


WHOLE_BLOCK_REPEAT = 4  # whole_blocks: at most this many times the scales (24 channels in blocks of 32: 3 of 8)


def whole_blocks(scale: np.ndarray, zero_point: np.ndarray, axis: int, block: int, length: int) -> tuple:
    """(scale, zero point, block size) with the same values element for element, in blocks that divide the
    ``length`` of the weight's ``axis``: where the last block of ``block`` is partial (80 input channels in
    blocks of 32), each scale repeated in blocks of gcd(length, block) (16), if that stores at most
    WHOLE_BLOCK_REPEAT times the scales. ONNX allows a partial last block; OpenVINO's ONNX frontend refuses it
    ("dimension of X at axis 1 (80) cannot be divided by block_size (32)")."""
    fine = math.gcd(length, block)
    if length % block == 0 or block // fine > WHOLE_BLOCK_REPEAT:
        return scale, zero_point, block
    keep = tuple(slice(0, length // fine) if a == axis else slice(None) for a in range(scale.ndim))
    return (np.repeat(scale, block // fine, axis=axis)[keep], np.repeat(zero_point, block // fine, axis=axis)[keep],
            fine)


def _in_whole_blocks(w: QuantizedWeight) -> QuantizedWeight:
    """``w`` with its block scales as ``whole_blocks`` writes them (``w`` itself without blocks)."""
    if not w.block_size:
        return w
    scale, zero_point, block = whole_blocks(w.scale, w.zero_point, w.axis, w.block_size, w.codes.shape[w.axis])
    return replace(w, scale=scale, zero_point=zero_point, block_size=block)


def weight_opset(w: "QuantizedWeight", dtype) -> tuple[int, str]:
    """(the opset the DequantizeLinear of ``w`` stored as ``dtype`` needs, why): a per-channel axis needs 13, float16
    scales 19, int4/uint4 and int16 inputs and block_size 21."""
    if w.block_size:
        return 21, "block-wise scales (DequantizeLinear block_size)"
    if dtype in (ml_dtypes.int4, ml_dtypes.uint4):
        return 21, f"{w.bits}-bit codes stored as int4/uint4"
    if dtype == np.int16:
        return 21, "int16 weight levels"
    if w.float16:
        return 19, "float16 scales of float16 weights"
    return 13, "per-channel DequantizeLinear axis" if w.scale.ndim else "int8 DequantizeLinear"


def upgrade_opset(model: onnx.ModelProto, target: int, why: str = "", max_opset: int | None = None) \
        -> onnx.ModelProto:
    """Convert ``model`` to at least opset ``target`` with onnx's version converter; ``why``: what needs it (for
    the error when ``max_opset`` is lower)."""
    if max_opset is not None and target > max_opset:
        raise UserError(f"weights.max_opset {max_opset}: {why or 'the quantized model'} needs opset {target}")
    if opset_of(model) >= target:
        return model
    try:
        converted = version_converter.convert_version(model, target)
    except Exception as e:  # the converter raises plain RuntimeErrors with its own text
        raise UserError(f"cannot convert the model from opset {opset_of(model)} to {target} (needed for the "
                        f"quantized weights): {str(e).splitlines()[0]}") from None
    if converted.ir_version < 4:  # (there every initializer is listed as an input too, and is a constant; from IR 4
        # on such a listing makes it an input the caller may override, which onnxruntime then neither folds nor fuses)
        inits = {t.name for t in converted.graph.initializer}
        keep = [i for i in converted.graph.input if i.name not in inits]
        del converted.graph.input[:]
        converted.graph.input.extend(keep)
    if converted.ir_version < 7:
        converted.ir_version = 7
    return converted


def emit_qdq(model: onnx.ModelProto, weights: list[QuantizedWeight], metadata: dict | None = None,
             inplace: bool = False, max_opset: int | None = None) -> onnx.ModelProto:
    """A new model in which every weight of ``weights`` is replaced by a DequantizeLinear of its codes.

    ``inplace``: ``model`` is a private copy that may be edited (saves a copy of a large model). ``max_opset``:
    the highest opset the output may have (2..4-bit codes then go in int8/uint8 containers below 21)."""
    if not weights:
        raise UserError("no layer was quantized: nothing to write")
    if max_opset is not None and opset_of(model) > max_opset:
        raise UserError(f"weights.max_opset {max_opset}: the model is already at opset {opset_of(model)} (onnxcomq "
                        "does not lower a model's opset)")
    weights = [_in_whole_blocks(w) for w in weights]  # (here: MatMulNBits pads a partial block itself)
    stored = [(w,) + tuple(w.storage(max_opset)) for w in weights]
    target, why = max((weight_opset(w, dt) for w, *_, dt in stored), key=lambda t: t[0])
    if max_opset is not None and target > max_opset:
        raise UserError(f"weights.max_opset {max_opset}: {why} need opset {target}")
    out = upgrade_opset(model, target, why, max_opset)
    if out is model and not inplace:
        out = onnx.ModelProto()
        out.CopyFrom(model)
    g = out.graph
    by_name = {t.name: t for t in g.initializer}
    taken = set(by_name) | {o for n in g.node for o in n.output} | {i.name for i in g.input}
    dq_nodes = []
    for w, codes, zp, dt in stored:
        if w.name not in by_name:
            raise UserError(f"weight {w.name} is not an initializer of the model")
        init = by_name[w.name]
        if tuple(init.dims) != tuple(codes.shape):
            raise ValueError(f"codes for {w.name} have shape {w.codes.shape}, weight has {tuple(init.dims)}")
        drop_weight(g, init)
        sdt = np.float16 if w.float16 else np.float32
        if w.directions:  # one DequantizeLinear per direction (codes [1, rows, n], scale [rows]), then Concat
            parts = []
            for d in range(w.directions):
                qd, sd, zd, od = (unique_name(f"{w.name}_{k}_dir{d}", taken)
                                  for k in ("quantized", "scale", "zero_point", "dequantized"))
                g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(codes[d:d + 1]).astype(dt), qd))
                g.initializer.append(numpy_helper.from_array(np.asarray(w.scale[d], sdt), sd))
                g.initializer.append(numpy_helper.from_array(np.asarray(zp[d]).astype(dt), zd))
                dq_nodes.append(helper.make_node("DequantizeLinear", [qd, sd, zd], [od], axis=1,
                                                 name=unique_name(f"{w.name}_DequantizeLinear_dir{d}", taken)))
                parts.append(od)
            dq_nodes.append(helper.make_node("Concat", parts, [w.name], axis=0,
                                             name=unique_name(f"{w.name}_Concat", taken)))
            continue
        qname = unique_name(f"{w.name}_quantized", taken)
        sname = unique_name(f"{w.name}_scale", taken)
        zname = unique_name(f"{w.name}_zero_point", taken)
        g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(codes).astype(dt), qname))
        g.initializer.append(numpy_helper.from_array(np.asarray(w.scale, sdt), sname))
        g.initializer.append(numpy_helper.from_array(np.asarray(zp).astype(dt), zname))
        attrs = {"axis": int(w.axis)} if w.scale.ndim else {}
        if w.block_size:
            attrs["block_size"] = int(w.block_size)
        dq_nodes.append(helper.make_node("DequantizeLinear", [qname, sname, zname], [w.name],
                                         name=unique_name(f"{w.name}_DequantizeLinear", taken), **attrs))
    nodes = dq_nodes + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    return set_metadata(out, metadata, copy=False)


def opset_change(before: onnx.ModelProto, after: onnx.ModelProto, max_opset: int | None = None) -> dict:
    """{'input': opset, 'output': opset, 'reason': what in ``after`` needs its opset ('' when unchanged), and
    'max': max_opset when one was set}: for the report and the run summary (raising the opset is not silent)."""
    inits = {t.name: t for t in after.graph.initializer}
    need, why = 0, ""
    T = onnx.TensorProto
    for n in after.graph.node:
        if n.op_type not in ("DequantizeLinear", "QuantizeLinear"):
            continue
        at = {a.name for a in n.attribute}
        x = inits.get(n.input[0])
        s = inits.get(n.input[1]) if len(n.input) > 1 else None
        cands = [(10, "QuantizeLinear/DequantizeLinear")]
        if "axis" in at and s is not None and len(s.dims):
            cands.append((13, "per-channel DequantizeLinear axis"))
        if s is not None and s.data_type == T.FLOAT16:
            cands.append((19, "float16 scales (a float16 model)"))
        if x is not None and x.data_type in (T.INT4, T.UINT4):
            cands.append((21, "2..4-bit weights stored as int4/uint4"))
        if x is not None and x.data_type == T.INT16:
            cands.append((21, "int16 weight levels"))
        if "block_size" in at:
            cands.append((21, "block-wise scales (DequantizeLinear block_size)"))
        top = max(cands, key=lambda c: c[0])
        if top[0] > need:
            need, why = top
    a, b = opset_of(before), opset_of(after)
    out = {"input": a, "output": b, "reason": why if b > a else ""}
    if max_opset is not None:
        out["max"] = max_opset
    return out


def set_metadata(model: onnx.ModelProto, metadata: dict | None, copy: bool = True) -> onnx.ModelProto:
    """The model (a copy unless ``copy`` is False) with onnxcomq's version and configuration in metadata_props."""
    out = model
    if copy:
        out = onnx.ModelProto()
        out.CopyFrom(model)
    meta = {p.key: p.value for p in out.metadata_props}
    meta["onnxcomq.version"] = __version__
    if metadata:
        meta["onnxcomq.config"] = json.dumps(metadata, sort_keys=True)
    del out.metadata_props[:]
    for k, v in meta.items():
        out.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    return out


def with_float_weights(model: onnx.ModelProto, weights: dict) -> onnx.ModelProto:
    """A copy of ``model`` with the named initializers replaced by float arrays (e.g. the dequantized weights)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.name in weights:
            t.CopyFrom(numpy_helper.from_array(np.asarray(weights[t.name], np.float32), t.name))
    return out


def quantized_twin(model: onnx.ModelProto, qweights: list, apply_bias, deltas: dict) -> onnx.ModelProto:
    """A float copy of ``model`` carrying the dequantized weights (and the re-fitted biases) of ``qweights``."""
    m = apply_bias(model, deltas) if deltas else onnx.ModelProto()
    if not deltas:
        m.CopyFrom(model)
    by_name = {qw.name: qw for qw in qweights}
    for t in m.graph.initializer:
        qw = by_name.get(t.name)
        if qw is not None:
            t.CopyFrom(numpy_helper.from_array(qw.dequantized(), t.name))
    return m
