"""Stage 4: write the QDQ model: each quantized weight becomes DequantizeLinear(codes, scale, zero_point).

The DequantizeLinear node outputs the original weight name, so every consumer (shared weights included) reads the
dequantized weight unchanged; the float initializer is removed from the file. 8..5-bit codes are int8/uint8 (opset
>= 13 for the per-channel axis); 4..2-bit codes are int4/uint4, two per byte (opset >= 21). Older models are
converted with onnx's version converter, not just renumbered.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx
from onnx import helper, numpy_helper, version_converter

from . import __version__
from .errors import UserError
from .graph import unique_name


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

    def expand(self, a: np.ndarray) -> np.ndarray:
        """A scale-shaped array broadcast against the codes (blocks repeated along ``axis``)."""
        if self.block_size:
            rep = np.repeat(a, self.block_size, axis=self.axis)
            return rep[tuple(slice(0, d) for d in self.codes.shape)]
        shape = [1] * self.codes.ndim
        if a.ndim:
            shape[self.axis] = -1
        return a.reshape(shape)

    def code_dtype(self):
        if self.bits <= 4:
            return ml_dtypes.int4 if self.signed else ml_dtypes.uint4
        return np.int8 if self.signed else np.uint8

    def storage(self):
        """(codes, zero_point, dtype) as stored. Codes whose zero point does not fit the b-bit type (the official
        min-max grid of a row whose weights all have one sign does not contain 0) are stored as signed levels
        ``codes - zero_point`` with zero point 0 in the smallest signed type that holds them (int8, int16, int32)."""
        lo, hi = (-(1 << (self.bits - 1)), (1 << (self.bits - 1)) - 1) if self.signed else (0, (1 << self.bits) - 1)
        if self.codes.min() < lo or self.codes.max() > hi:
            raise ValueError(f"codes of {self.name} outside the {self.bits}-bit range [{lo}, {hi}]")
        if lo <= self.zero_point.min() and self.zero_point.max() <= hi:
            return self.codes, self.zero_point, self.code_dtype()
        levels = self.codes.astype(np.int64) - self.expand(self.zero_point.astype(np.int64))
        for dt in (np.int8, np.int16, np.int32):
            info = np.iinfo(dt)
            if info.min <= levels.min() and levels.max() <= info.max:
                return levels, np.zeros_like(self.zero_point), dt
        raise ValueError(f"levels of {self.name} do not fit int32")

    def dequantized(self) -> np.ndarray:
        """What DequantizeLinear computes (float32), in the stored layout."""
        s = self.expand(self.scale.astype(np.float32))
        z = self.expand(self.zero_point.astype(np.float32))
        return ((self.codes.astype(np.float32) - z) * s).astype(np.float32)


def _opset(model) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    raise UserError("model has no default-domain (ai.onnx) opset import")


def required_opset(dtype) -> int:
    """DequantizeLinear with a per-channel axis needs opset 13; int4/uint4 and int16 inputs need 21 (float16 scales
    need 19: see emit_qdq)."""
    return 21 if dtype in (ml_dtypes.int4, ml_dtypes.uint4, np.int16) else 13


def upgrade_opset(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """Convert ``model`` to at least opset ``target`` with onnx's version converter."""
    if _opset(model) >= target:
        return model
    try:
        converted = version_converter.convert_version(model, target)
    except Exception as e:  # the converter raises plain RuntimeErrors with its own text
        raise UserError(f"cannot convert the model from opset {_opset(model)} to {target} (needed for the "
                        f"quantized weights): {str(e).splitlines()[0]}") from None
    if converted.ir_version < 7:
        converted.ir_version = 7
    return converted


def emit_qdq(model: onnx.ModelProto, weights: list[QuantizedWeight], metadata: dict | None = None,
             inplace: bool = False) -> onnx.ModelProto:
    """A new model in which every weight of ``weights`` is replaced by a DequantizeLinear of its codes.

    ``inplace``: ``model`` is a private copy that may be edited (saves a copy of a large model)."""
    if not weights:
        raise UserError("no layer was quantized: nothing to write")
    stored = [(w,) + tuple(w.storage()) for w in weights]
    target = max(max(required_opset(dt), 19 if w.float16 else 0, 21 if w.block_size else 0)
                 for w, *_, dt in stored)
    out = upgrade_opset(model, target)
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
        g.initializer.remove(init)
        qname = unique_name(f"{w.name}_quantized", taken)
        sname = unique_name(f"{w.name}_scale", taken)
        zname = unique_name(f"{w.name}_zero_point", taken)
        g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(codes).astype(dt), qname))
        g.initializer.append(numpy_helper.from_array(
            np.asarray(w.scale, np.float16 if w.float16 else np.float32), sname))
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
