"""onnxruntime sessions: a model with extra outputs, sessions with one-line errors.
"""

from __future__ import annotations

import os
import re

import numpy as np
import onnx
import onnxruntime as ort

from ..errors import UserError
from ..graph.modelio import SESSION_FILE_BYTES, model_bytes, model_path, skeleton


def capture_model(model: onnx.ModelProto, tensors: list[str], copy: bool = True) -> onnx.ModelProto:
    """A copy of ``model`` (``model`` itself if not ``copy``) whose graph also outputs ``tensors`` (those that are
    not graph inputs or outputs)."""
    m = model
    if copy:
        m = onnx.ModelProto()
        m.CopyFrom(model)
    have = {o.name for o in m.graph.output} | {i.name for i in m.graph.input}
    types = {}
    try:
        # a large model: infer on a skeleton without the big tensors' bytes (inference needs only their dims;
        # infer_shapes serializes its argument and parses the result: two transient copies of the model)
        inferred = onnx.shape_inference.infer_shapes(skeleton(model) if model_bytes(model) >= SESSION_FILE_BYTES
                                                     else model, data_prop=True)
        for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
            types[vi.name] = vi.type.tensor_type.elem_type
    except Exception:  # shape inference is best effort: ORT fills in the rest
        pass
    for t in tensors:
        if t in have:
            continue
        m.graph.output.append(onnx.helper.make_tensor_value_info(t, types.get(t, onnx.TensorProto.FLOAT), None))
        have.add(t)
    return m


def ort_message(e: Exception) -> str:
    """onnxruntime's error as one line, without its status-code preamble."""
    text = " ".join(str(e).split()).split("[ONNXRuntimeError] : ", 1)[-1]
    text = re.sub(r"^\d+ : [A-Z_]+ : ", "", text)
    return re.sub(r"^/\S+:\d+ .*?\) (?=[A-Z])", "", text)[:600]  # (the C++ source location and function)


def make_session(model: onnx.ModelProto, providers=None, what: str = "the model",
                 mem_pattern: bool = True, folder: str | None = None, optimize: bool = True) -> ort.InferenceSession:
    """An onnxruntime CPU session (MatMulNBits exact); a model onnxruntime refuses is a one-line UserError.

    A model of ``SESSION_FILE_BYTES`` or more is loaded from a temporary file with external data, which
    onnxruntime memory-maps (no serialized copy, no parsed copy). ``folder``: the model's large tensors are
    already external data in that folder (``passes.stage_session``); the model file is written there.

    ``mem_pattern=False`` (capture): no memory pattern. With one, the second run of a shape allocates one block
    for the whole planned pattern beside the arena chunks of the first run, which the capture model's many
    outputs make large: peak RSS then grew from one calibration batch to two by the size of a batch's activations
    (EfficientNet-Lite0, batch 32: +0.9 GB), at no measurable speed gain.

    ``optimize=False``: no graph optimization, so each node runs as written (a QDQ model's QuantizeLinear and
    DequantizeLinear nodes around float ops, not onnxruntime's fused int8 kernels)."""
    so = ort.SessionOptions()
    so.enable_mem_pattern = mem_pattern
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 4  # (failures become one-line errors: onnxruntime need not print them too)
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    providers = providers or ["CPUExecutionProvider"]
    try:
        if folder is not None:
            path = os.path.join(folder, f"session-{len(os.listdir(folder))}.onnx")
            with open(path, "wb") as f:
                f.write(model.SerializeToString())
            return ort.InferenceSession(path, so, providers=providers)
        if model_bytes(model) >= SESSION_FILE_BYTES:  # (and so every model too large for one protobuf message)
            with model_path(model) as path:
                return ort.InferenceSession(path, so, providers=providers)
        return ort.InferenceSession(model.SerializeToString(), so, providers=providers)
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as e:  # onnxruntime's Fail / InvalidGraph / InvalidArgument / NotImplemented ...
        raise UserError(f"onnxruntime cannot load {what}: {ort_message(e)}") from None


def run_session(sess: ort.InferenceSession, fetch: list | None, feed: dict, first_sample: int = 0,
                what: str = "") -> list:
    """``sess.run(fetch, feed)``; an onnxruntime failure is a one-line UserError naming the batch (or saying
    ``what``) and, where onnxruntime names it, the node (token ids out of an embedding's range are said so)."""
    try:
        return sess.run(fetch, feed)
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as e:
        msg = ort_message(e)
        hint = ""
        if "out of data bounds" in msg or "out of bounds" in msg:
            ints = [f"{k} (values {int(v.min())}..{int(v.max())})" for k, v in feed.items()
                    if np.size(v) and np.issubdtype(np.asarray(v).dtype, np.integer)]
            hint = ("; an index (token id) is out of range for a Gather: check the calibration input" +
                    (f" {', '.join(ints)}" if ints else "") + " against the model's vocabulary / table size")
        what = what or f"onnxruntime failed on the calibration batch starting at sample {first_sample}"
        raise UserError(f"{what}: {msg}{hint}") from None


def device_providers(xp) -> list | None:
    """onnxruntime providers for a capture whose Grams are formed with ``xp``: CUDA first (float32 matmuls, no
    TF32, so that the activations are those of the CPU provider to float32 rounding) when ``xp`` is CuPy and
    onnxruntime-gpu is installed; None (the CPU provider) otherwise."""
    if xp is np or not hasattr(xp, "cuda") or "CUDAExecutionProvider" not in ort.get_available_providers():
        return None
    return [("CUDAExecutionProvider", {"device_id": str(xp.cuda.Device().id), "use_tf32": "0"}),
            "CPUExecutionProvider"]


# onnxruntime's output element types -> numpy (those a captured layer input can have)
_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
               "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
               "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}


def run_on(sess: ort.InferenceSession, fetch: list, feed: dict, first_sample: int = 0, xp=np) -> list:
    """``run_session``; when the session runs on onnxruntime's CUDA provider and ``xp`` is CuPy, the outputs stay
    in device memory (IOBinding) and come back as CuPy arrays that share it, with no copy through the host."""
    if xp is np or not hasattr(xp, "cuda") or sess.get_providers()[0] != "CUDAExecutionProvider":
        return run_session(sess, fetch, feed, first_sample)
    try:
        io = sess.io_binding()
        for k, v in feed.items():
            io.bind_cpu_input(k, np.ascontiguousarray(v))
        for name in fetch:
            io.bind_output(name, "cuda", xp.cuda.Device().id)
        sess.run_with_iobinding(io)
        return [_cupy_view(v, xp) for v in io.get_outputs()]
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as e:
        raise UserError(f"onnxruntime failed on the calibration batch starting at sample {first_sample}: "
                        f"{ort_message(e)}") from None


def _cupy_view(v, xp):
    """An OrtValue in CUDA memory as a CuPy array over the same memory (the array keeps the OrtValue alive)."""
    dtype = np.dtype(_ORT_DTYPES[v.data_type()])
    shape = tuple(v.shape())
    mem = xp.cuda.UnownedMemory(v.data_ptr(), int(np.prod(shape)) * dtype.itemsize, v)
    return xp.ndarray(shape, dtype, xp.cuda.MemoryPointer(mem, 0))


def run_model(model: onnx.ModelProto, names: list, feeds: list, what: str = "the model", optimize: bool = True) \
        -> list:
    """The values of tensors ``names`` of ``model`` for each feed (onnxruntime, CPU): [[array per name] per feed].
    (Graph outputs alone need no copy of the model.) ``optimize``: as make_session's."""
    outputs = {o.name for o in model.graph.output}
    sess = make_session(model if set(names) <= outputs else capture_model(model, names), what=what,
                        optimize=optimize)
    return [run_session(sess, names, feed, what=f"onnxruntime cannot run {what}") for feed in feeds]
