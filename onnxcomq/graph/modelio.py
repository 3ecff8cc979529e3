"""Reading, preparing and writing models: clear errors for bad files, constant folding, atomic writes."""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import shutil
import tempfile

import onnx

from ..errors import UserError
from .layers import RECURRENT_OPS, SUPPORTED_OPS, base_op, node_names

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


WEIGHT_OPS = SUPPORTED_OPS + ("Einsum",)  # Einsum: rewritten as MatMul (graph/rewrite.py)


def _needs_folding(model: onnx.ModelProto) -> bool:
    """Whether some weight of a Conv/ConvTranspose/Gemm/MatMul is computed from constants (a ``Constant`` node,
    ``Identity``, ``Transpose`` or tf2onnx's Shape/Concat/Reshape subgraphs of initializers) instead of being an initializer: only then is the graph folded
    (folding copies every tensor, which costs minutes on a model of gigabytes)."""
    graph = model.graph
    inputs = {i.name for i in graph.input}
    # (IR < 4 lists every initializer as an input too: a constant all the same, as the layers take it)
    const = {t.name for t in graph.initializer} - (inputs if model.ir_version >= 4 else set())
    inits = set(const)
    for n in graph.node:  # topological order: a node of constant inputs has constant outputs
        if n.op_type == "Constant" or (n.input and all(i in const or i == "" for i in n.input)
                                       and n.op_type not in ("RandomNormal", "RandomUniform", "Multinomial")):
            const.update(o for o in n.output if o)
    for n in graph.node:
        if base_op(n) in WEIGHT_OPS:  # (onnxruntime's fused layers too)
            w = list(n.input if n.op_type == "Einsum" else n.input[1:3] if n.op_type in RECURRENT_OPS
                     else n.input[:2])
            if any(t in const and t not in inits for t in w):
                return True
    return False


def _inlined(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with its local functions inlined, so that the layers inside them are found (and the
    quantized model needs no functions: onnx's version converter, which raises the opset for int4, drops them)."""
    from onnx import inliner

    try:
        return inliner.inline_local_functions(model)
    except Exception as e:  # (e.g. a model over protobuf's 2 GB with its data loaded)
        raise UserError(f"the model's local functions ({', '.join(sorted({f.name for f in model.functions}))}) "
                        f"cannot be inlined: {' '.join(str(e).split())[:200]}") from None


# the ops of a model quantized already: QDQ, onnxruntime's static (QLinear*) and dynamic quantization, its 4-bit
# formats
QUANTIZED_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger", "MatMulInteger",
    "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "DynamicQuantizeLSTM", "QGemm", "QAttention", "MatMulNBits",
    "MatMulBnb4", "GatherBlockQuantized"})


def opset_of(model: onnx.ModelProto) -> int:
    """The model's default-domain (ai.onnx) opset."""
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    raise UserError("model has no default-domain (ai.onnx) opset import")


def prepare_model(model_or_path) -> onnx.ModelProto:
    """Load (if a path) and fold constant subgraphs so that weights held in ``Constant`` nodes or behind
    ``Identity`` become initializers. The caller's ModelProto is never modified."""
    model = load_model(model_or_path) if isinstance(model_or_path, (str, os.PathLike)) else model_or_path
    if not isinstance(model, onnx.ModelProto):
        raise UserError(f"expected an ONNX ModelProto or a path, got {type(model).__name__}")
    found = collections.Counter(n.op_type for n in model.graph.node
                                if n.op_type in QUANTIZED_OPS or n.op_type.startswith("QLinear"))
    if found:
        ops = ", ".join(f"{v} {k}" for k, v in sorted(found.items()))
        raise UserError(f"the model is already quantized (it holds {ops}): give onnxcomq the float model")
    if model.functions:  # layers inside model-local functions (torch.onnx's export_modules_as_functions)
        model = _inlined(model)
    if not _needs_folding(model):
        return model
    original = model
    model = onnx.ModelProto()
    model.CopyFrom(original)  # graphsurgeon's import shares and edits protos: never touch the caller's
    try:
        import onnx_graphsurgeon as gs

        with gs.logger.G_LOGGER.suppress():  # (its warnings would interleave with the run's lines)
            graph = gs.import_onnx(model)
            graph.fold_constants(error_ok=True).cleanup().toposort()
        folded = gs.export_onnx(graph, do_type_check=False)
        # (graphsurgeon lists no initializer as an input, which IR 4 is the first to allow)
        folded.ir_version = max(model.ir_version, 4)
        del folded.opset_import[:]
        folded.opset_import.extend(model.opset_import)
        folded.metadata_props.extend(model.metadata_props)
        return folded
    except Exception as e:  # folding is an optimization: keep the model as it is
        log.warning("constant folding failed (%s); continuing without it", e)
        return original


# Protobuf cannot serialize a message of 2 GiB or more: past this size models go through files with external data.
LARGE_MODEL_BYTES = 1_800_000_000
# From this size on, onnxruntime sessions load the model from a file with external data, which onnxruntime
# memory-maps, instead of from serialized bytes (the bytes and onnxruntime's parsed copy were two more copies of the
# model: 1.2 GB model, session from bytes +2.4 GB, from a file +0.9 GB; docs/design.md, "Memory").
SESSION_FILE_BYTES = 64 << 20


def model_bytes(model: onnx.ModelProto) -> int:
    """The serialized size of ``model``. Exact (ByteSize) for a model whose initializers hold less than
    ``SESSION_FILE_BYTES``; above, the initializers' data bytes (from their dims and types) and names plus the rest's
    ByteSize: protobuf's ByteSize encodes the whole message to measure it (a transient copy of a language model, the
    peak of a run), and fails past 2 GiB."""
    inits = model.graph.initializer
    inline = sum(_data_bytes(t) for t in inits if t.data_location != onnx.TensorProto.EXTERNAL)
    if inline < SESSION_FILE_BYTES:
        return model.ByteSize()
    rest = onnx.ModelProto()
    copy_fields(model, rest, skip="graph")
    copy_fields(model.graph, rest.graph, skip="initializer")
    return rest.ByteSize() + inline + sum(len(t.name) + 8 * len(t.dims) + 16 for t in inits)


def _data_bytes(t: onnx.TensorProto) -> int:
    """The bytes of a tensor's data, from its dims and element type (no copy of the data)."""
    if t.data_location == onnx.TensorProto.EXTERNAL:
        return 0
    n = 1
    for d in t.dims:
        n *= d
    if t.data_type == onnx.TensorProto.STRING:
        return sum(len(v) for v in t.string_data)
    bits = 4 if t.data_type in _FOUR_BIT else 8 * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return (n * bits + 7) // 8


_FOUR_BIT = {getattr(onnx.TensorProto, k) for k in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(onnx.TensorProto, k)}


def is_large(model: onnx.ModelProto) -> bool:
    return model_bytes(model) >= LARGE_MODEL_BYTES


def copy_fields(src, dst, skip: str) -> None:
    """Copy every set field of protobuf message ``src`` into ``dst`` except the field named ``skip``."""
    for fd, value in src.ListFields():
        if fd.name == skip:
            continue
        if fd.is_repeated:
            getattr(dst, fd.name).extend(value)
        elif fd.message_type is not None:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def drop_weight(graph: onnx.GraphProto, init: onnx.TensorProto) -> None:
    """Remove a float weight that is replaced (by DequantizeLinear or MatMulNBits) or no longer read (a folded batch
    norm's parameters): its initializer and, where the float model also listed it as a graph input (older exporters
    list every initializer there), that input, which would otherwise clash with the new producer of the name
    (onnxruntime: "Duplicate definition") or be required of the caller."""
    graph.initializer.remove(init)
    drop_input(graph, init.name)


def drop_input(graph: onnx.GraphProto, name: str) -> None:
    """Remove the graph input ``name``, if listed (a replaced weight's listing; see drop_weight)."""
    listed = next((i for i in graph.input if i.name == name), None)
    if listed is not None:
        graph.input.remove(listed)


def copy_to_edit(model: onnx.ModelProto) -> tuple:
    """(a copy of ``model``, its initializers by name, every name its graph uses: tensors, inputs, nodes), for
    a rewrite that adds tensors under new names (``layers.unique_name``)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    inits = {t.name: t for t in g.initializer}
    return out, inits, set(inits) | {o for n in g.node for o in n.output} | {i.name for i in g.input} | \
        set(node_names(out))


def skeleton(model: onnx.ModelProto, threshold: int = 1024, place=None,
             data_name: str = "onnxcomq-not-written.data") -> onnx.ModelProto:
    """A copy of ``model`` in which every initializer of ``threshold`` bytes or more is an external-data reference
    instead of its bytes, built without copying those bytes. ``place(raw) -> offset`` writes a tensor's bytes into
    ``data_name`` and says where; without it nothing is written (enough for shape inference, which reads only
    dims and small tensors)."""
    skel = onnx.ModelProto()
    copy_fields(model, skel, skip="graph")
    copy_fields(model.graph, skel.graph, skip="initializer")
    add_light(model.graph.initializer, skel.graph.initializer, place, data_name, threshold)
    return skel


def add_light(tensors, dst, place=None, data_name: str = "onnxcomq-not-written.data", threshold: int = 1024) -> None:
    """Append ``tensors`` to the repeated field ``dst``, those of ``threshold`` bytes or more as external-data
    references to ``data_name`` (their bytes written by ``place``, as in ``skeleton``), the others copied."""
    for t in tensors:
        if t.data_location == onnx.TensorProto.EXTERNAL or not t.HasField("raw_data") or len(t.raw_data) < threshold:
            dst.add().CopyFrom(t)
            continue
        e = dst.add()
        copy_fields(t, e, skip="raw_data")
        raw = t.raw_data
        offset = place(raw) if place is not None else 0
        e.data_location = onnx.TensorProto.EXTERNAL
        for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
            e.external_data.add(key=k, value=v)
        del raw


@contextlib.contextmanager
def data_file(path: str):
    """Yields ``place(raw) -> offset``, which appends a tensor's bytes to the file ``path`` at a page-aligned
    offset (as onnx's own writer does, so that runtimes can memory-map them)."""
    with open(path, "wb") as f:
        def place(raw: bytes) -> int:
            f.write(b"\0" * (-f.tell() % 4096))
            offset = f.tell()
            f.write(raw)
            return offset

        yield place


def _save_external(model: onnx.ModelProto, path: str, data_name: str, threshold: int = 1024) -> None:
    """Write ``model`` to ``path`` with every initializer of ``threshold`` bytes or more in ``data_name`` beside it.

    Unlike onnx.save(save_as_external_data=True), this never copies the model in memory (the tensors' bytes are
    streamed into the data file), so a model near the 2 GiB limit costs no second copy."""
    with data_file(os.path.join(os.path.dirname(path), data_name)) as place:
        skel = skeleton(model, threshold, place, data_name)
    with open(path, "wb") as f:
        f.write(skel.SerializeToString())


def _chmod_default(path: str) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)  # mkstemp/mkdtemp make private files; give outputs ordinary permissions


def _os_reason(e: OSError) -> str:
    return e.strerror or str(e) or type(e).__name__


def _name_max(folder: str) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255


def check_output_path(path, what: str = "output") -> str:
    """Before a long run: a one-line UserError unless ``path`` can be written as a new or replaced regular file.

    Refused: an empty path, a path ending with a separator or naming a directory, an existing file that is not a
    regular file (a device, pipe or socket: replacing ``/dev/null`` as root would be a disaster), a missing folder,
    a name longer than the file system allows, and a folder where no file can be created (read-only, immutable,
    ``/proc``, no permission), probed by creating and removing a temporary file (root ignores permission bits, so
    asking os.access would not do). Returns the path."""
    path = os.fspath(path)
    if not path:
        raise UserError(f"{what} path is empty; give a file name")
    if path.endswith((os.sep, os.altsep or os.sep)) or os.path.basename(path) in (".", ".."):
        raise UserError(f"{path}: {what} path names a folder, expected a file path")
    if os.path.isdir(path):
        raise UserError(f"{path}: is a directory, expected a file path")
    if os.path.lexists(path) and os.path.exists(path) and not os.path.isfile(path):
        raise UserError(f"{path}: exists and is not a regular file (a device, pipe or socket); refusing to replace "
                        f"it with the {what}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        if os.path.exists(folder):
            raise UserError(f"{path}: {what} folder {folder} is not a folder")
        raise UserError(f"{path}: {what} folder {folder} does not exist")
    name = os.fsencode(os.path.basename(path))
    if len(name) > _name_max(folder):
        raise UserError(f"{path[:40]}...: {what} file name is {len(name)} bytes long, longer than the file "
                        f"system's limit of {_name_max(folder)}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".onnxcomq-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{path}: cannot write the {what} in folder {folder} ({_os_reason(e)})") from None
    return path


class AtomicFiles:
    """Files staged beside their final paths and put in place together, all or none.

    Each file is written into a temporary folder (``.onnxcomq-*``) in its destination folder, so the final
    ``os.replace`` is a rename within one file system. ``commit`` replaces the destinations one after the other,
    keeping a hard link to each file it replaces; if a replace fails (or the run is interrupted) the ones already
    done are rolled back. Leaving the ``with`` block always removes the temporary folders. Every OSError becomes a
    one-line UserError naming the destination."""

    def __init__(self):
        self._dirs: dict = {}  # folder -> temporary folder in it
        self._staged: list = []  # (temporary path, final path)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.cleanup()
        return False

    def cleanup(self) -> None:
        for d in self._dirs.values():
            shutil.rmtree(d, ignore_errors=True)
        self._dirs.clear()

    def _tmpdir(self, path: str) -> str:
        folder = os.path.dirname(os.path.abspath(path))
        if folder not in self._dirs:
            try:
                self._dirs[folder] = tempfile.mkdtemp(prefix=".onnxcomq-", dir=folder)
            except OSError as e:
                raise UserError(f"{path}: cannot write in folder {folder} ({_os_reason(e)})") from None
        return self._dirs[folder]

    def _stage(self, path: str, write) -> None:
        tmp = os.path.join(self._tmpdir(path), f"{len(self._staged)}-{os.path.basename(path)[:200]}")
        try:
            write(tmp)
            _chmod_default(tmp)
        except OSError as e:
            raise UserError(f"{path}: cannot write ({_os_reason(e)})") from None
        self._staged.append((tmp, os.path.abspath(path)))

    def add_bytes(self, path, data: bytes | str) -> None:
        data = data.encode() if isinstance(data, str) else data

        def write(tmp):
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())

        self._stage(os.fspath(path), write)

    def add_model(self, model: onnx.ModelProto, path, external_data: bool | None = None) -> None:
        """Stage ``model`` for ``path``; large models (or ``external_data=True``) keep their tensors in
        ``<name>.data`` beside it."""
        path = os.fspath(path)
        if external_data is None:
            external_data = is_large(model)
        name = os.path.basename(path)
        if not external_data:
            self._stage(path, lambda tmp: onnx.save(model, tmp))
            return
        data_name = name + ".data"
        if len(os.fsencode(data_name)) > _name_max(os.path.dirname(os.path.abspath(path))):
            raise UserError(f"{path[:40]}...: the name of its external data file {data_name[:20]}... is too long "
                            "for the file system")
        tmpdir = self._tmpdir(path)
        sub = tempfile.mkdtemp(prefix="m", dir=tmpdir)  # the model refers to its data file by the final name
        try:
            _save_external(model, os.path.join(sub, name), data_name)
            for f in (name, data_name):
                _chmod_default(os.path.join(sub, f))
        except OSError as e:
            raise UserError(f"{path}: cannot write ({_os_reason(e)})") from None
        folder = os.path.dirname(os.path.abspath(path))
        self._staged.append((os.path.join(sub, data_name), os.path.join(folder, data_name)))
        self._staged.append((os.path.join(sub, name), os.path.abspath(path)))

    def commit(self) -> None:
        done = []  # (final, backup or None)
        try:
            for i, (tmp, final) in enumerate(self._staged):
                backup = None
                if os.path.lexists(final):
                    backup = os.path.join(os.path.dirname(tmp), f".old-{i}")
                    try:
                        os.link(final, backup, follow_symlinks=False)
                    except OSError:  # no hard links here (or an immutable file, which the replace will refuse)
                        backup = None
                try:
                    os.replace(tmp, final)
                except OSError as e:
                    raise UserError(f"{final}: cannot write ({_os_reason(e)})") from None
                done.append((final, backup))
        except BaseException:
            for final, backup in reversed(done):
                try:
                    if backup is not None:
                        os.replace(backup, final)
                    else:
                        os.unlink(final)
                except OSError:
                    pass
            raise
        finally:
            self.cleanup()


def save_model(model: onnx.ModelProto, path, external_data: bool | None = None, also: dict | None = None) -> None:
    """Write ``model`` to ``path`` atomically: into a temporary folder beside it, then renamed into place.

    Large models (or ``external_data=True``) keep their tensors in ``<name>.data`` beside the model file.
    ``also``: {path: bytes or str} of further files (a report) written in the same all-or-nothing step: if any of
    them cannot be written, none is, and no temporary file is left. OSErrors are one-line UserErrors.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"{path}: output folder {folder} does not exist")
    with AtomicFiles() as files:
        for p, data in (also or {}).items():  # small: staged first, so a failure costs no model write
            files.add_bytes(p, data)
        files.add_model(model, path, external_data)
        files.commit()


@contextlib.contextmanager
def temp_folder():
    """A new temporary folder (under $TMPDIR), removed with everything in it on exit."""
    tmpdir = tempfile.mkdtemp(prefix="onnxcomq-")
    try:
        yield tmpdir
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


@contextlib.contextmanager
def model_path(model: onnx.ModelProto):
    """A path to ``model`` on disk (with external data), for the APIs that must not serialize it in memory."""
    with temp_folder() as tmpdir:
        path = os.path.join(tmpdir, "model.onnx")
        _save_external(model, path, "model.data")
        yield path
