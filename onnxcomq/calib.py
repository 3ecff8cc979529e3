"""Calibration data: .npz files (NVIDIA ModelOpt's convention), folders of .npy/.npz, Python iterables of feed
dicts, onnxruntime ``CalibrationDataReader`` objects, and ``random`` for smoke tests.

Every source is validated against the model's inputs (names, rank, static dims, dtype, finite values) and re-batched
to ``batch_size``. Files are read with ``allow_pickle=False``: loading calibration data never runs code.
"""

from __future__ import annotations

import logging
import os
import zipfile
from dataclasses import dataclass

import numpy as np
import onnx

from .errors import UserError

log = logging.getLogger(__name__)

_NP_TYPES = {
    onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64, onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32, onnx.TensorProto.INT8: np.int8,
    onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.BOOL: np.bool_,
}


@dataclass
class InputInfo:
    name: str
    dtype: type
    shape: tuple  # ints for static dims, None for dynamic ones


def model_inputs(model: onnx.ModelProto) -> list[InputInfo]:
    """Real inputs of the graph (initializers listed as inputs are not fed)."""
    inits = {t.name for t in model.graph.initializer}
    out = []
    for i in model.graph.input:
        if i.name in inits:
            continue
        tt = i.type.tensor_type
        if tt.elem_type not in _NP_TYPES:
            raise UserError(f"model input {i.name} has unsupported type "
                            f"{onnx.TensorProto.DataType.Name(tt.elem_type)}")
        shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
        out.append(InputInfo(i.name, _NP_TYPES[tt.elem_type], shape))
    return out


class _Meta:
    """Shape and dtype of an array not read yet (validates .npz headers before any data is loaded)."""

    def __init__(self, dtype, shape: tuple):
        self.dtype, self.shape, self.ndim = np.dtype(dtype), tuple(shape), len(shape)


def _check_layout(where: str, info: InputInfo, dtype, shape) -> None:
    """Dtype kind, rank, static dims and emptiness: everything that a file header already tells."""
    if dtype == object:
        raise UserError(f"{where}: input {info.name} holds Python objects, expected numeric data")
    if not (np.issubdtype(dtype, np.number) or dtype == np.bool_):
        raise UserError(f"{where}: input {info.name} has dtype {dtype}, the model expects "
                        f"{np.dtype(info.dtype).name}")
    if len(shape) != len(info.shape):
        raise UserError(f"{where}: input {info.name} has rank {len(shape)} (shape {tuple(shape)}), the model "
                        f"expects rank {len(info.shape)} {_fmt_shape(info.shape)}")
    for ax, (got, want) in enumerate(zip(shape, info.shape)):
        if ax > 0 and want is not None and got != want:
            raise UserError(f"{where}: input {info.name} has shape {tuple(shape)}, the model expects "
                            f"{_fmt_shape(info.shape)} (axis {ax}: {got} != {want})")
    if shape[0] == 0:
        raise UserError(f"{where}: input {info.name} is empty (0 samples)")
    if not np.issubdtype(info.dtype, np.floating) and np.issubdtype(dtype, np.floating):
        pass  # float data for an integer input: allowed when the values are integers (checked on the data)
    elif np.issubdtype(info.dtype, np.floating) and not (np.issubdtype(dtype, np.floating)
                                                         or np.issubdtype(dtype, np.integer)):
        raise UserError(f"{where}: input {info.name} has dtype {dtype}, the model expects "
                        f"{np.dtype(info.dtype).name}")


def _check_array(where: str, info: InputInfo, a):
    if isinstance(a, _Meta):
        _check_layout(where, info, a.dtype, a.shape)
        return a
    if not isinstance(a, np.ndarray):
        a = np.asarray(a)
    _check_layout(where, info, a.dtype, a.shape)
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise UserError(f"{where}: input {info.name} contains NaN or Inf values")
        if not np.issubdtype(info.dtype, np.floating) and not np.array_equal(a, np.round(a)):
            raise UserError(f"{where}: input {info.name} has dtype {a.dtype} with non-integer values, the model "
                            f"expects {np.dtype(info.dtype).name}")
    return a.astype(info.dtype, copy=False)


def _fmt_shape(shape) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _check_feed(where: str, inputs: list[InputInfo], feed) -> dict:
    if not isinstance(feed, dict):
        raise UserError(f"{where}: expected a dict of input name -> array, got {type(feed).__name__}")
    names = [i.name for i in inputs]
    missing = [n for n in names if n not in feed]
    extra = [k for k in feed if k not in names]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing)}")
        if extra:
            parts.append(f"unexpected {', '.join(map(str, extra))}")
        raise UserError(f"{where}: keys do not match the model inputs ({'; '.join(parts)}; the model's inputs are "
                        f"{', '.join(names)})")
    out = {i.name: _check_array(where, i, feed[i.name]) for i in inputs}
    sizes = {k: v.shape[0] for k, v in out.items()}
    if len(set(sizes.values())) > 1:
        raise UserError(f"{where}: inputs have different numbers of samples along axis 0: {sizes}")
    return out


def _load_npz(path: str) -> dict:
    try:
        with np.load(path, allow_pickle=False) as z:
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise UserError(f"{path}: not an .npz archive")
            return {k: z[k] for k in z.files}
    except UserError:
        raise
    except ValueError as e:
        if "pickle" in str(e).lower():
            raise UserError(f"{path}: holds pickled Python objects, which are refused (they could run code); save "
                            "plain numeric arrays with numpy.savez") from None
        raise UserError(f"{path}: cannot read calibration data: {e}") from None
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise UserError(f"{path}: cannot read calibration data: {e}") from None


class NpzStream:
    """Reads the arrays of an .npz a slice of samples at a time, without loading whole arrays.

    Members are parsed with numpy's own .npy header reader (pickled object arrays are refused); C-ordered arrays
    are read in chunks straight from the (possibly compressed) zip member, so memory stays O(batch).
    """

    def __init__(self, path: str):
        self.path = path
        try:
            self._zip = zipfile.ZipFile(path)
            self.members = {n[:-4]: n for n in self._zip.namelist() if n.endswith(".npy")}
            self.headers = {}
            for key, member in self.members.items():
                with self._zip.open(member) as f:
                    self.headers[key] = self._header(f)
        except UserError:
            raise
        except (OSError, zipfile.BadZipFile, EOFError, ValueError, KeyError) as e:
            raise UserError(f"{path}: cannot read calibration data: {e}") from None
        if not self.members:
            raise UserError(f"{path}: the .npz holds no arrays")

    def _header(self, f):
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise UserError(f"{self.path}: unsupported .npy format version {version}")
        if dtype.hasobject:
            raise UserError(f"{self.path}: holds pickled Python objects, which are refused (they could run code); "
                            "save plain numeric arrays with numpy.savez")
        return shape, fortran, dtype

    def shape(self, key):
        return self.headers[key][0]

    def dtype(self, key):
        return self.headers[key][2]

    def chunks(self, keys, size: int):
        """Yield dicts {key: array of up to ``size`` samples} in order, all keys in lockstep."""
        files, rowbytes = {}, {}
        try:
            for k in keys:
                shape, fortran, dtype = self.headers[k]
                if fortran or len(shape) == 0:  # rare: read it whole
                    files[k] = None
                    continue
                f = self._zip.open(self.members[k])
                self._header(f)
                files[k] = f
                rowbytes[k] = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
            whole = {k: _load_npz_member(self.path, self._zip, self.members[k]) for k in keys if files[k] is None}
            n = min(self.shape(k)[0] if self.shape(k) else 0 for k in keys)
            for start in range(0, n, size):
                count = min(size, n - start)
                out = {}
                for k in keys:
                    if files[k] is None:
                        out[k] = whole[k][start:start + count]
                        continue
                    shape, _, dtype = self.headers[k]
                    buf = files[k].read(count * rowbytes[k])
                    if len(buf) != count * rowbytes[k]:
                        raise UserError(f"{self.path}: array {k} is truncated")
                    out[k] = np.frombuffer(buf, dtype).reshape((count,) + tuple(shape[1:]))
                yield out
        except (OSError, zipfile.BadZipFile, EOFError, ValueError) as e:
            raise UserError(f"{self.path}: cannot read calibration data: {e}") from None
        finally:
            for f in files.values():
                if f is not None:
                    f.close()


def _load_npz_member(path, zf, member):
    with zf.open(member) as f:
        try:
            return np.lib.format.read_array(f, allow_pickle=False)
        except ValueError as e:
            raise UserError(f"{path}: cannot read {member}: {e}") from None


def _load_npy(path: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as e:
        if "pickle" in str(e).lower():
            raise UserError(f"{path}: holds pickled Python objects, which are refused (they could run code)") from None
        raise UserError(f"{path}: cannot read calibration data: {e}") from None
    except (OSError, EOFError) as e:
        raise UserError(f"{path}: cannot read calibration data: {e}") from None


def _rebatch(chunks, batch_size: int, max_samples: int | None):
    """Split/concatenate a stream of validated feeds into batches of ``batch_size`` samples."""
    pending: list[dict] = []
    count = 0
    total = 0
    for feed in chunks:
        n = next(iter(feed.values())).shape[0]
        if max_samples is not None and total + n > max_samples:
            feed = {k: v[:max_samples - total] for k, v in feed.items()}
            n = max_samples - total
        if n <= 0:
            break
        total += n
        pending.append(feed)
        count += n
        while count >= batch_size:
            merged = {k: np.concatenate([p[k] for p in pending]) for k in pending[0]}
            yield {k: v[:batch_size] for k, v in merged.items()}
            rest = {k: v[batch_size:] for k, v in merged.items()}
            count -= batch_size
            pending = [rest] if count else []
        if max_samples is not None and total >= max_samples:
            break
    if count:
        yield {k: np.concatenate([p[k] for p in pending]) for k in pending[0]}


class Calibration:
    """A re-iterable, validated source of calibration batches (dicts of input name -> array)."""

    def __init__(self, source, inputs: list[InputInfo], batch_size: int = 32, max_samples: int | None = None,
                 seed: int = 0):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(f"batch size must be a positive integer, got {batch_size!r}")
        if max_samples is not None and max_samples < 1:
            raise UserError(f"max samples must be a positive integer, got {max_samples!r}")
        self.inputs = inputs
        self.batch_size = batch_size
        self.max_samples = max_samples
        self.seed = seed
        self.is_random = isinstance(source, str) and source == "random"
        self._source = source
        self.num_samples = None
        self._chunks_fn = self._resolve(source)
        if self._arrays is not None:
            n = next(iter(self._arrays.values())).shape[0]
            self.num_samples = min(n, max_samples) if max_samples else n

    _arrays = None

    def _resolve(self, source):
        if isinstance(source, (str, os.PathLike)):
            path = os.fspath(source)
            if path == "random":
                log.warning("calibration data: RANDOM inputs (smoke test only): the quantized model's accuracy "
                            "means nothing")
                return self._random_chunks
            if os.path.isdir(path):
                files = sorted(f for f in os.listdir(path) if f.endswith((".npz", ".npy")))
                if not files:
                    raise UserError(f"{path}: folder holds no .npz or .npy files")
                self._files = [os.path.join(path, f) for f in files]
                return self._folder_chunks
            if not os.path.exists(path):
                raise UserError(f"{path}: calibration file not found")
            if not path.endswith(".npz"):
                if path.endswith(".npy"):
                    self._files = [path]
                    return self._folder_chunks
                raise UserError(f"{path}: calibration file must be .npz (keys = model input names) or .npy")
            self._npz = NpzStream(path)
            _check_feed(path, self.inputs, {k: _Meta(self._npz.dtype(k), self._npz.shape(k))
                                            for k in self._npz.members})
            n = self._npz.shape(self.inputs[0].name)[0]
            self.num_samples = min(n, self.max_samples) if self.max_samples else n
            return self._npz_chunks
        if isinstance(source, dict):
            self._arrays = _check_feed("calibration dict", self.inputs, source)
            return self._array_chunks
        if hasattr(source, "get_next"):  # onnxruntime.quantization.CalibrationDataReader
            return self._reader_chunks
        if hasattr(source, "__iter__"):
            return self._iter_chunks
        raise UserError(f"calibration must be a path, 'random', a dict, an iterable of feed dicts or a "
                        f"CalibrationDataReader; got {type(source).__name__}")

    def _array_chunks(self):
        yield self._arrays

    def _npz_chunks(self):
        names = [i.name for i in self.inputs]
        limit = self.max_samples
        for chunk in self._npz.chunks(names, self.batch_size):
            yield _check_feed(self._npz.path, self.inputs, chunk)
            if limit is not None:
                limit -= next(iter(chunk.values())).shape[0]
                if limit <= 0:
                    break

    def _folder_chunks(self):
        for f in self._files:
            if f.endswith(".npz"):
                feed = _load_npz(f)
            else:
                if len(self.inputs) != 1:
                    raise UserError(f"{f}: .npy files only work for single-input models; this model has inputs "
                                    f"{', '.join(i.name for i in self.inputs)} (use .npz with one key per input)")
                feed = {self.inputs[0].name: _load_npy(f)}
            # a file holding one sample without the batch axis gets one
            feed = {k: (v[None] if isinstance(v, np.ndarray) and k in {i.name for i in self.inputs}
                        and v.ndim == len(next(i for i in self.inputs if i.name == k).shape) - 1 else v)
                    for k, v in feed.items()}
            yield _check_feed(f, self.inputs, feed)

    def _reader_chunks(self):
        if hasattr(self._source, "rewind"):
            self._source.rewind()
        i = 0
        while True:
            feed = self._source.get_next()
            if feed is None:
                break
            yield _check_feed(f"calibration reader batch {i}", self.inputs, feed)
            i += 1

    def _iter_chunks(self):
        for i, feed in enumerate(self._source):
            yield _check_feed(f"calibration batch {i}", self.inputs, feed)

    def _random_chunks(self):
        rng = np.random.default_rng(self.seed)
        n = self.max_samples or 64
        feed = {}
        for i in self.inputs:
            shape = (n,) + tuple(d if d is not None else 1 for d in i.shape[1:])
            if np.issubdtype(i.dtype, np.floating):
                feed[i.name] = rng.standard_normal(shape).astype(i.dtype)
            else:
                feed[i.name] = np.zeros(shape, i.dtype)
        yield feed

    def __iter__(self):
        empty = True
        for b in _rebatch(self._chunks_fn(), self.batch_size, self.max_samples):
            empty = False
            yield b
        if empty:
            raise UserError("calibration data is empty")
