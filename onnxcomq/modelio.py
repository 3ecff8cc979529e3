"""Reading, preparing and writing models: clear errors for bad files, constant folding, atomic writes."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
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
    """Constant/Identity nodes, or a node computed from initializers alone (tf2onnx reshapes weights through
    Shape/Concat/Reshape subgraphs)."""
    inits = {t.name for t in model.graph.initializer}
    return any(n.op_type in ("Constant", "Identity") or (n.input and all(i in inits for i in n.input if i))
               for n in model.graph.node)


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


# Protobuf cannot serialize a message of 2 GiB or more: past this size models go through files with external data.
LARGE_MODEL_BYTES = 1_800_000_000


def is_large(model: onnx.ModelProto) -> bool:
    return model.ByteSize() >= LARGE_MODEL_BYTES


def _save_external(model: onnx.ModelProto, path: str, data_name: str) -> None:
    """onnx.save with all tensors in one external file; on a copy, since onnx clears the saved tensors' data."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save(copy, path, save_as_external_data=True, all_tensors_to_one_file=True, location=data_name,
              size_threshold=1024)


def _chmod_default(path: str) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)  # mkstemp/mkdtemp make private files; give outputs ordinary permissions


def save_model(model: onnx.ModelProto, path, external_data: bool | None = None) -> None:
    """Write ``model`` to ``path`` atomically: into a temporary folder beside it, then renamed into place.

    Large models (or ``external_data=True``) keep their tensors in ``<name>.data`` beside the model file.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"{path}: output folder {folder} does not exist")
    if external_data is None:
        external_data = is_large(model)
    name = os.path.basename(path)
    tmpdir = tempfile.mkdtemp(prefix=".onnxcomq-", dir=folder)
    try:
        tmp_model = os.path.join(tmpdir, name)
        if external_data:
            data_name = name + ".data"
            _save_external(model, tmp_model, data_name)
            _chmod_default(os.path.join(tmpdir, data_name))
            os.replace(os.path.join(tmpdir, data_name), os.path.join(folder, data_name))
        else:
            onnx.save(model, tmp_model)
        _chmod_default(tmp_model)
        os.replace(tmp_model, path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


@contextlib.contextmanager
def model_path(model: onnx.ModelProto):
    """A path to ``model`` on disk (with external data), for the APIs that must not serialize it in memory."""
    tmpdir = tempfile.mkdtemp(prefix="onnxcomq-")
    try:
        path = os.path.join(tmpdir, "model.onnx")
        _save_external(model, path, "model.data")
        yield path
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
