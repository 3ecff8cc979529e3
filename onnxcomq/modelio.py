"""Reading, preparing and writing models: clear errors for bad files, constant folding, atomic writes."""

from __future__ import annotations

import logging
import os
import tempfile

import onnx

from .errors import UserError

log = logging.getLogger(__name__)


def load_model(path) -> onnx.ModelProto:
    """Load an ONNX file (with its external data), turning every failure into a one-line UserError."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UserError(f"{path}: model file not found")
    if os.path.isdir(path):
        raise UserError(f"{path}: is a directory, expected an .onnx file")
    if not os.access(path, os.R_OK):
        raise UserError(f"{path}: model file is not readable")
    try:
        model = onnx.load(path)
    except Exception as e:
        raise UserError(f"{path}: not a valid ONNX model ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'parse error'})") from None
    if not model.graph.node:
        raise UserError(f"{path}: not a valid ONNX model (the graph has no nodes)")
    return model


def _needs_folding(model: onnx.ModelProto) -> bool:
    return any(n.op_type in ("Constant", "Identity") for n in model.graph.node)


def prepare_model(model_or_path) -> onnx.ModelProto:
    """Load (if a path) and fold constant subgraphs so that weights held in ``Constant`` nodes or behind
    ``Identity`` become initializers. The caller's ModelProto is never modified."""
    model = load_model(model_or_path) if isinstance(model_or_path, (str, os.PathLike)) else model_or_path
    if not isinstance(model, onnx.ModelProto):
        raise UserError(f"expected an ONNX ModelProto or a path, got {type(model).__name__}")
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear", "MatMulNBits", "QLinearConv", "QLinearMatMul")
           for n in model.graph.node):
        raise UserError("the model is already quantized (it holds QuantizeLinear/DequantizeLinear or QLinear "
                        "nodes): give onnxcomq the float model")
    if not _needs_folding(model):
        return model
    original = model
    model = onnx.ModelProto()
    model.CopyFrom(original)  # graphsurgeon's import shares and edits protos: never touch the caller's
    try:
        import onnx_graphsurgeon as gs

        graph = gs.import_onnx(model)
        graph.fold_constants(error_ok=True).cleanup().toposort()
        folded = gs.export_onnx(graph, do_type_check=False)
        folded.ir_version = model.ir_version
        del folded.opset_import[:]
        folded.opset_import.extend(model.opset_import)
        folded.metadata_props.extend(model.metadata_props)
        return folded
    except Exception as e:  # folding is an optimization: keep the model as it is
        log.warning("constant folding failed (%s); continuing without it", e)
        return original


def save_model(model: onnx.ModelProto, path, overwrite_guard=None) -> None:
    """Write ``model`` to ``path`` atomically (temporary file in the same folder, then rename)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"{path}: output folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=".onnxcomq-", suffix=".onnx", dir=folder)
    os.close(fd)
    try:
        onnx.save(model, tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the output ordinary permissions
        os.replace(tmp, path)
    except Exception:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
