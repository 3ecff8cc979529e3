"""The shape of a decoder's key/value cache input, for an empty cache (text calibration and random feeds): where the
input leaves its heads or head size open (onnxruntime-genai's builder), from the GroupQueryAttention node reading it.
"""

from __future__ import annotations

import onnx

from ..errors import UserError


def cache_shape(model, info) -> tuple:
    """(kv_heads, head_dim) of a cache input: the non-batch dims of its shape (batch, kv_heads, past, head_dim)
    where static, else from the GroupQueryAttention node reading it."""
    shape = tuple(info.shape)
    if static_cache(info):
        return shape[1], shape[3]
    dims = _gqa_dims(model, info.name) if isinstance(model, onnx.ModelProto) else None
    if dims is None or len(shape) != 4:
        shown = "[" + ", ".join(str(d) if d is not None else (p or "?") for d, p in zip(shape, info.params)) + "]"
        raise UserError(f"cache input {info.name} has shape {shown}: cannot tell its key/value heads and head size "
                        "for an empty cache (expected [batch, kv_heads, past_length, head_dim] with static heads "
                        "and head size)")
    return dims


def static_cache(info) -> bool:
    return len(info.shape) == 4 and info.shape[1] is not None and info.shape[3] is not None


def _gqa_dims(model: onnx.ModelProto, name: str):
    """(kv_num_heads, head_size) of the com.microsoft GroupQueryAttention node that reads input ``name``, the head
    size from the width of its query (packed q|k|v where its key input is empty); None if not found."""
    nodes = list(model.graph.node)
    node = next((n for n in nodes if n.op_type == "GroupQueryAttention" and name in n.input), None)
    if node is None:
        return None
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    heads, kv = attrs.get("num_heads"), attrs.get("kv_num_heads")
    width = _width(model, nodes, node.input[0])
    if not heads or not kv or not width:
        return None
    packed = len(node.input) < 2 or not node.input[1]
    per = heads + 2 * kv if packed else heads
    return (int(kv), width // per) if width % per == 0 else None


def _width(model, nodes, tensor: str, depth: int = 0):
    """The last dim of ``tensor`` where a MatMul / MatMulNBits / Gemm with a constant weight (through Add) makes it."""
    inits = {t.name: t for t in model.graph.initializer}
    prod = next((n for n in nodes if tensor in n.output), None)
    if prod is None or depth > 4:
        return None
    if prod.op_type == "MatMulNBits":
        return next((onnx.helper.get_attribute_value(a) for a in prod.attribute if a.name == "N"), None)
    if prod.op_type in ("MatMul", "Gemm") and len(prod.input) > 1 and prod.input[1] in inits:
        dims = list(inits[prod.input[1]].dims)
        trans = any(a.name == "transB" and a.i for a in prod.attribute)
        return dims[0] if trans else dims[-1]
    if prod.op_type == "Add":
        return next((w for i in prod.input if i not in inits and (w := _width(model, nodes, i, depth + 1))), None)
    return None
