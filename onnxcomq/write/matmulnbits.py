"""MatMul and Gemm weights as onnxruntime's com.microsoft MatMulNBits (its int4/int8 kernels), from block-wise
codes. A Gemm (alpha A' B' + beta C: jax2onnx writes every Linear so, torch a Linear on a 2-D input) becomes
MatMulNBits with alpha in its scales, C (times beta) as its bias input where C is one value per column, else an Add
after it, and a Transpose before it for transA.

Y = A @ dequant(B) with B [K, N] stored as uint8 [N, k_blocks, block_size * bits / 8]: per output column n and
block of K, the unsigned codes packed along K, low bits first; scales [N * k_blocks] (the dtype of A); zero points
uint8 [N * ceil(k_blocks * bits / 8)], packed per column the same way (asymmetric), or absent (symmetric: ORT's
default zero point 2^(bits-1), so the signed code c is stored as c + 2^(bits-1)). Attributes K, N, bits,
block_size (a power of two >= 16) and accuracy_level (0: float computation).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import UserError
from ..graph.layers import node_attr, unique_name
from ..graph.modelio import copy_fields, drop_input, drop_weight
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


def _as_kn(q: QuantizedWeight) -> QuantizedWeight:
    """``q`` of a weight stored [N, K] (a Gemm's B with transB, blocked along axis 1) as the [K, N] weight
    ``nbits_arrays`` reads (the same codes, transposed: views, no copy)."""
    return dataclasses.replace(q, codes=q.codes.T, scale=q.scale.T, zero_point=q.zero_point.T, axis=0)


def _gemm(g, node, q, inputs, scales, accuracy_level, taken, inits, spare: set) -> list:
    """The nodes that replace Gemm ``node`` (reading weight ``q`` as B, whose MatMulNBits ``inputs`` hold
    ``scales``): [Transpose of A,] MatMulNBits[, Mul and Add]."""
    alpha, beta = float(node_attr(node, "alpha", 1.0)), float(node_attr(node, "beta", 1.0))
    if list(node.input).index(q.name) != 1:
        raise ValueError(f"{node.name or node.op_type} reads {q.name} but not as Gemm input B")
    base = node.name or node.output[0]
    a = node.input[0]
    out = []
    if node_attr(node, "transA", 0):
        a_t = unique_name(f"{base}_A_transposed", taken)
        out.append(helper.make_node("Transpose", [a], [a_t], name=unique_name(f"{base}_transpose_A", taken)))
        a = a_t
    ins = [a] + inputs[1:]
    if alpha != 1.0:  # (into the scales: Y = A @ (alpha dequant(B)))
        sname = unique_name(f"{ins[2]}_alpha", taken)
        g.initializer.append(numpy_helper.from_array((scales * np.asarray(alpha, scales.dtype)), sname))
        spare.add(ins[2])
        ins[2] = sname
    c = node.input[2] if len(node.input) > 2 and node.input[2] and beta != 0.0 else None
    y = node.output[0]
    add = None
    if c is not None:
        ct = inits.get(c)
        if ct is not None and int(np.prod(ct.dims)) == q.codes.shape[1] and (len(ct.dims) == 1 or ct.dims[0] == 1):
            b = numpy_helper.to_array(ct).reshape(-1)
            if beta != 1.0:
                b = (b * beta).astype(b.dtype)
            bname = unique_name(f"{c}_bias", taken)
            g.initializer.append(numpy_helper.from_array(b, bname))
            ins += [""] * (5 - len(ins)) + [bname]  # (input 5: the bias)
            spare.add(c)
        else:  # a C of another shape, or computed: an Add after it, as Gemm broadcasts C
            if beta != 1.0:
                cs = unique_name(f"{c}_beta", taken)
                g.initializer.append(numpy_helper.from_array(np.asarray(beta, np.float16 if q.float16 else
                                                                        np.float32), cs))
                scaled = unique_name(f"{c}_scaled", taken)
                out_mul = helper.make_node("Mul", [c, cs], [scaled], name=unique_name(f"{base}_beta", taken))
                c = scaled
            else:
                out_mul = None
            y = unique_name(f"{node.output[0]}_matmul", taken)
            add = [n for n in (out_mul, helper.make_node("Add", [y, c], [node.output[0]],
                                                         name=unique_name(f"{base}_bias", taken))) if n]
    K, N = q.codes.shape
    out.append(helper.make_node("MatMulNBits", ins, [y], name=node.name, domain=DOMAIN, K=K, N=N, bits=q.bits,
                                block_size=q.block_size, accuracy_level=int(accuracy_level)))
    return out + (add or [])


def emit_matmulnbits(model: onnx.ModelProto, weights: list, accuracy_level: int = 0, inplace: bool = False):
    """A copy of ``model`` (``model`` itself, edited, if ``inplace``) in which every MatMul or Gemm reading a weight
    of ``weights`` (block-quantized, 2, 4 or 8 bits) as its input B is a MatMulNBits; the float initializers are
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
    taken |= {o for n in g.node for o in n.output} | {i.name for i in g.input} | {n.name for n in g.node}
    inits = {t.name: t for t in g.initializer}
    spare: set = set()  # initializers a Gemm's replacement may leave unread (its C, the scales before alpha)
    for q in weights:
        if q.bits not in (2, 4, 8):
            raise UserError(f"{q.name}: MatMulNBits stores 2, 4 or 8 bits, got {q.bits}")
        if q.axis == 1 and q.block_size > 0 and q.codes.ndim == 2:  # (a Gemm's B with transB: [N, K])
            q = _as_kn(q)
        packed, scales, zps = nbits_arrays(q)
        K, N = q.codes.shape
        bname = unique_name(f"{q.name}_Q{q.bits}", taken)
        sname = unique_name(f"{q.name}_scales", taken)
        g.initializer.append(numpy_helper.from_array(packed, bname))
        stored = scales.astype(np.float16 if q.float16 else np.float32)
        g.initializer.append(numpy_helper.from_array(stored, sname))
        inputs = ["", bname, sname]
        if zps is not None:
            zname = unique_name(f"{q.name}_zero_points", taken)
            g.initializer.append(numpy_helper.from_array(zps, zname))
            inputs.append(zname)
        for k in reversed(range(len(g.node))):
            node = g.node[k]
            if q.name not in node.input:
                continue
            if node.op_type == "Gemm":
                new = _gemm(g, node, q, inputs, stored, accuracy_level, taken, inits, spare)
                del g.node[k]
                for j, n in enumerate(new):
                    g.node.insert(k + j, n)
                continue
            if node.op_type != "MatMul" or list(node.input).index(q.name) != 1:
                raise ValueError(f"{node.name or node.op_type} reads {q.name} but not as MatMul input B")
            new = helper.make_node("MatMulNBits", [node.input[0]] + inputs[1:], list(node.output), name=node.name,
                                   domain=DOMAIN, K=K, N=N, bits=q.bits, block_size=q.block_size,
                                   accuracy_level=int(accuracy_level))
            node.CopyFrom(new)
        drop_input(g, q.name)
    # a Gemm's C that became a MatMulNBits bias, scales that took alpha: read no more (onnxruntime warns of unused
    # initializers)
    unread = spare - {i for n in g.node for i in n.input} - {o.name for o in g.output}
    for t in [t for t in g.initializer if t.name in unread]:
        drop_weight(g, t)
    if not any(o.domain == DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return out
