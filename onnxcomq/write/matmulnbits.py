"""MatMul weights as onnxruntime's com.microsoft MatMulNBits (its int4/int8 kernels), from block-wise codes.

Y = A @ dequant(B) with B [K, N] stored as uint8 [N, k_blocks, block_size * bits / 8]: per output column n and
block of K, the unsigned codes packed along K, low bits first; scales [N * k_blocks] (the dtype of A); zero points
uint8 [N * ceil(k_blocks * bits / 8)], packed per column the same way (asymmetric), or absent (symmetric: ORT's
default zero point 2^(bits-1), so the signed code c is stored as c + 2^(bits-1)). Attributes K, N, bits,
block_size (a power of two >= 16) and accuracy_level (0: float computation).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import UserError
from ..graph.layers import unique_name
from ..graph.modelio import copy_fields, drop_input
from .qdq import QuantizedWeight

DOMAIN = "com.microsoft"


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes (..., L) along the last axis, 8 / bits per byte, low bits first (L padded with 0).
    Built in uint8 throughout (a wider type cost a language model's largest layer a few hundred MB at emit)."""
    per = 8 // bits
    L = codes.shape[-1]
    pad = -L % per
    c = np.pad(codes.astype(np.uint8, copy=False), [(0, 0)] * (codes.ndim - 1) + [(0, pad)])
    c = c.reshape(codes.shape[:-1] + (-1, per))
    out = c[..., 0].copy()
    for k in range(1, per):
        out |= c[..., k] << np.uint8(k * bits)
    return out


def nbits_arrays(q: QuantizedWeight):
    """(B packed [N, k_blocks, blob], scales [N * k_blocks], zero_points or None) of a block-quantized MatMul
    weight (codes [K, N], blocked along axis 0)."""
    if q.block_size <= 0 or q.axis != 0 or q.codes.ndim != 2:
        raise ValueError(f"{q.name}: MatMulNBits needs a MatMul weight [K, N] blocked along K")
    K, N = q.codes.shape
    B, bits = q.block_size, q.bits
    kb = -(-K // B)
    offset = (1 << (bits - 1)) if q.signed else 0
    lo, hi = int(q.codes.min()) + offset, int(q.codes.max()) + offset
    if lo < 0 or hi >= (1 << bits):
        raise ValueError(f"{q.name}: codes outside 0..{(1 << bits) - 1}")
    zp = None if q.signed else q.zero_point.T.astype(np.uint8)  # (N, kb)
    full = np.full((N, kb * B), offset, np.uint8)  # (the padding's code is the zero point of the symmetric grid)
    if q.signed:
        full[:, :K] = (q.codes.T.astype(np.int16) + offset).astype(np.uint8)
    else:
        full[:, :K] = q.codes.T
    packed = pack_codes(full.reshape(N, kb, B), bits)  # (N, kb, B * bits / 8)
    scales = np.ascontiguousarray(q.scale.T).reshape(-1)
    zps = pack_codes(zp, bits).reshape(-1) if zp is not None else None
    return packed, scales, zps


def emit_matmulnbits(model: onnx.ModelProto, weights: list, accuracy_level: int = 0, inplace: bool = False):
    """A copy of ``model`` (``model`` itself, edited, if ``inplace``) in which every MatMul reading a weight of
    ``weights`` (block-quantized, 2, 4 or 8 bits) as its input B is a MatMulNBits; the float initializers are
    removed (never copied: a language model's copy would be most of its size; in place, the other initializers
    are not copied either: a language model's embeddings and lm_head)."""
    replaced = {q.name for q in weights}
    taken = {t.name for t in model.graph.initializer}
    if inplace:
        out = model
        for i in reversed([i for i, t in enumerate(model.graph.initializer) if t.name in replaced]):
            del model.graph.initializer[i]
    else:
        out = onnx.ModelProto()
        copy_fields(model, out, skip="graph")
        copy_fields(model.graph, out.graph, skip="initializer")
        out.graph.initializer.extend(t for t in model.graph.initializer if t.name not in replaced)
    g = out.graph
    taken |= {o for n in g.node for o in n.output} | {i.name for i in g.input}
    for q in weights:
        if q.bits not in (2, 4, 8):
            raise UserError(f"{q.name}: MatMulNBits stores 2, 4 or 8 bits, got {q.bits}")
        packed, scales, zps = nbits_arrays(q)
        K, N = q.codes.shape
        bname = unique_name(f"{q.name}_Q{q.bits}", taken)
        sname = unique_name(f"{q.name}_scales", taken)
        g.initializer.append(numpy_helper.from_array(packed, bname))
        g.initializer.append(numpy_helper.from_array(scales.astype(np.float16 if q.float16 else np.float32), sname))
        inputs = ["", bname, sname]
        if zps is not None:
            zname = unique_name(f"{q.name}_zero_points", taken)
            g.initializer.append(numpy_helper.from_array(zps, zname))
            inputs.append(zname)
        for node in g.node:
            if q.name not in node.input:
                continue
            if node.op_type != "MatMul" or list(node.input).index(q.name) != 1:
                raise ValueError(f"{node.name or node.op_type} reads {q.name} but not as MatMul input B")
            new = helper.make_node("MatMulNBits", [node.input[0]] + inputs[1:], list(node.output), name=node.name,
                                   domain=DOMAIN, K=K, N=N, bits=q.bits, block_size=q.block_size,
                                   accuracy_level=int(accuracy_level))
            node.CopyFrom(new)
        drop_input(g, q.name)
    if not any(o.domain == DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return out
