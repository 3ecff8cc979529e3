"""Calibration data: .npz files (NVIDIA ModelOpt's convention), folders of .npy/.npz, Python iterables of feed
dicts, onnxruntime ``CalibrationDataReader`` objects, text and a tokenizer (``text.TextCalibration``), and
``random`` for smoke tests.

Every source is validated against the model's inputs (names, rank, static dims, dtype, finite values) and re-batched
to ``batch_size``. Files are read with ``allow_pickle=False``: loading calibration data never runs code.

How an array maps to an input (``Layout``), decided once from the first data seen:
- stacked: the samples are stacked along the input's batch axis (axis 0 when it is dynamic, unless another dynamic
  axis alone is named as a batch (batch, batch_size, N, B...): a time-major [seq, batch, features]; else the axis that
  carries the same symbolic dim as another input's batch axis, e.g. a recurrent state [2, batch, 128]; else the one
  axis whose size differs from the model's static shape; else its one free, unnamed axis where that holds as many
  entries as the inputs stacked on an unnamed axis 0 have samples: silero-vad's state [2, ?, 128] beside [?, ?]). A
  static batch axis (a model exported with batch 1 or N) fixes the batch size.
- per sample: one rank more than the input: entry i is sample i's whole feed (a state per sample, a fixed batch).
- constant: rank-0 (scalar) inputs, such as a sample rate, and arrays that are exactly the input's static shape
  are fed as they are with every batch.
"""

from __future__ import annotations

import itertools
import logging
import os
import zipfile
from dataclasses import dataclass

import numpy as np
import onnx

from ..errors import UserError
from .caches import cache_shape

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
    params: tuple = ()  # the symbolic name of each dynamic dim ("" if none)


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
        # Paddle2ONNX writes dynamic dims as dim_value -1 (rapidocr's classifier): a size <= 0 is dynamic
        shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim)
        out.append(InputInfo(i.name, _NP_TYPES[tt.elem_type], shape,
                             tuple("" if d.HasField("dim_value") else d.dim_param for d in tt.shape.dim)))
    return out


class _Meta:
    """Shape and dtype of an array not read yet (validates .npz headers before any data is loaded)."""

    def __init__(self, dtype, shape: tuple):
        self.dtype, self.shape, self.ndim = np.dtype(dtype), tuple(shape), len(shape)


def _fmt_shape(shape) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


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

    def chunks(self, keys, size: int, axes: dict | None = None):
        """Yield dicts {key: array of up to ``size`` samples} in order, all keys in lockstep. ``axes``: the axis
        of each key that holds the samples (default 0), or None for an array yielded whole with every chunk."""
        axes = axes or {}
        files, rowbytes = {}, {}
        try:
            for k in keys:
                shape, fortran, dtype = self.headers[k]
                if fortran or len(shape) == 0 or axes.get(k, 0) != 0:  # rare: read it whole
                    files[k] = None
                    continue
                f = self._zip.open(self.members[k])
                self._header(f)
                files[k] = f
                rowbytes[k] = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
            whole = {k: _load_npz_member(self.path, self._zip, self.members[k]) for k in keys if files[k] is None}
            counted = [k for k in keys if axes.get(k, 0) is not None]
            n = min((self.shape(k)[axes.get(k, 0)] if self.shape(k) else 0 for k in counted), default=1)
            for start in range(0, n, size):
                count = min(size, n - start)
                out = {}
                for k in keys:
                    if files[k] is None:
                        ax = axes.get(k, 0)
                        out[k] = whole[k] if ax is None or not whole[k].ndim else \
                            whole[k][(slice(None),) * ax + (slice(start, start + count),)]
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


@dataclass(frozen=True)
class Layout:
    """How the calibration arrays of one input become its feeds (see the module docstring)."""

    form: str  # "stacked" | "sample" (one entry per sample, rank + 1) | "const" (fed as it is)
    axis: int | None = None  # the input's batch axis (stacked / sample)
    fixed: int | None = None  # the model's static size of that axis: the batch size is fixed

    def data_axis(self) -> int | None:
        """The axis of the calibration array that counts the samples (None: a constant)."""
        return None if self.form == "const" else self.axis if self.form == "stacked" else 0


# 'random' calibration: the size of a free axis of an image or a signal (1 made strided networks fail: PP-OCRv6's
# detector, [N, 3, H, W], concatenates a branch upsampled to 2 x 2 with one of 1 x 1)
RANDOM_SIDE = 64


BATCH_NAMES = ("n", "b", "bs", "batch", "batch_size", "batchsize", "nbatch", "num_batches")


def _batch_like(name: str) -> bool:
    return bool(name) and (name.lower() in BATCH_NAMES or "batch" in name.lower())


def _own_batch_axis(info: InputInfo) -> int | None:
    """Axis 0 if it is dynamic, unless the one other dynamic axis named as a batch is (time-major [seq, batch, ...])."""
    if not info.shape or info.shape[0] is not None:
        return None
    named = [ax for ax, p in enumerate(info.params) if ax and info.shape[ax] is None and _batch_like(p)]
    return named[0] if len(named) == 1 and not _batch_like(info.params[0] if info.params else "") else 0


def model_batch_axis(info: InputInfo, inputs: list) -> int | None:
    """The input's batch axis as the model declares it: axis 0 if it is dynamic (unless the one dynamic axis named
    as a batch is another: a time-major sequence [seq, batch, features] is cut and joined along the batch), else the
    dynamic axis named like another input's batch axis (a recurrent state [2, batch, 128] beside an input [batch,
    seq]); None if the model does not say."""
    if not info.shape:
        return None
    own = _own_batch_axis(info)
    if own is not None:
        return own
    names = {i.params[a] for i in inputs if (a := _own_batch_axis(i)) is not None and len(i.params) > a and i.params[a]}
    return next((ax for ax, p in enumerate(info.params) if p and p in names and info.shape[ax] is None), None)


def _layout(where: str, info: InputInfo, inputs: list, shape: tuple) -> Layout:
    """The Layout of an input from its model shape and the shape of its first calibration array."""
    rank, want = len(shape), len(info.shape)
    bax = model_batch_axis(info, inputs)
    if want == 0:
        if rank == 0:
            return Layout("const")
        if rank == 1:  # one value per sample: fed as one scalar (all values must be equal, checked on the data)
            return Layout("sample", 0)
        raise UserError(f"{where}: input {info.name} is a scalar (rank 0), got an array of shape {tuple(shape)}")
    if rank == want + 1:
        if shape[0] == 0:
            raise UserError(f"{where}: input {info.name} is empty (0 samples)")
        _check_static(where, info, shape[1:], skip=bax)
        if bax is None:  # the model names no batch axis: each entry is one whole feed (batches of 1)
            return Layout("sample", None, 1)
        return Layout("sample", bax, info.shape[bax])
    if rank != want:
        raise UserError(f"{where}: input {info.name} has rank {rank} (shape {tuple(shape)}), the model "
                        f"expects rank {want} {_fmt_shape(info.shape)}")
    if bax is None:
        diff = [ax for ax, (g, w) in enumerate(zip(shape, info.shape)) if w is not None and g != w]
        if len(diff) > 1:
            raise UserError(f"{where}: input {info.name} has shape {tuple(shape)}, the model expects "
                            f"{_fmt_shape(info.shape)} (axes {', '.join(map(str, diff))} differ; at most the "
                            "batch axis may)")
        if not diff:
            return Layout("const")
        bax = diff[0]
    _check_static(where, info, shape, skip=bax)
    if shape[bax] == 0:
        raise UserError(f"{where}: input {info.name} is empty (0 samples)")
    return Layout("stacked", bax, info.shape[bax])


def _check_static(where: str, info: InputInfo, shape: tuple, skip: int | None) -> None:
    for ax, (got, want) in enumerate(zip(shape, info.shape)):
        if ax != skip and want is not None and got != want:
            raise UserError(f"{where}: input {info.name} has shape {tuple(shape)}, the model expects "
                            f"{_fmt_shape(info.shape)} (axis {ax}: {got} != {want})")


def _check_values(where: str, info: InputInfo, a: np.ndarray) -> np.ndarray:
    """Dtype kind, finite values, integer values for integer inputs; the array in the input's dtype."""
    if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
        raise UserError(f"{where}: input {info.name} has dtype {a.dtype}, the model expects "
                        f"{np.dtype(info.dtype).name}")
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise UserError(f"{where}: input {info.name} contains NaN or Inf values")
        if not np.issubdtype(info.dtype, np.floating) and not np.array_equal(a, np.round(a)):
            raise UserError(f"{where}: input {info.name} has dtype {a.dtype} with non-integer values, the model "
                            f"expects {np.dtype(info.dtype).name}")
    elif np.issubdtype(info.dtype, np.floating) and not np.issubdtype(a.dtype, np.integer):
        raise UserError(f"{where}: input {info.name} has dtype {a.dtype}, the model expects "
                        f"{np.dtype(info.dtype).name}")
    target = np.dtype(info.dtype)
    limits = np.iinfo(target) if np.issubdtype(target, np.integer) else \
        np.finfo(target) if np.issubdtype(target, np.floating) and a.dtype.itemsize > target.itemsize else None
    if limits is not None and a.size and a.dtype != np.bool_:  # (a cast would wrap around, or overflow to inf)
        lo, hi = a.min(), a.max()
        if lo < limits.min or hi > limits.max:
            span = f"{limits.min}..{limits.max}" if isinstance(limits, np.iinfo) else f"{limits.max:.6g} in magnitude"
            raise UserError(f"{where}: input {info.name} has values {lo}..{hi}, beyond the range of the model's "
                            f"{target.name} ({span})")
    return a.astype(info.dtype, copy=False)


class Batch(dict):
    """One feed (input name -> array, ready for onnxruntime) and the number of calibration samples it holds."""

    samples: int = 0


def batch_samples(feed) -> int:
    """The samples of a feed: a Batch says; a plain dict counts axis 0 of its first array (1 for a scalar)."""
    if isinstance(feed, Batch):
        return feed.samples
    first = next(iter(feed.values()), None)
    return int(np.shape(first)[0]) if first is not None and np.ndim(first) else 1


def _joined(parts: list) -> dict:
    """One feed of the samples of ``parts`` (feeds whose arrays differ on axis 0 only), in order."""
    return {k: np.concatenate([p[k] for p in parts]) if len(parts) > 1 else parts[0][k] for k in parts[0]}


def _rebatch(chunks, batch_size: int, max_samples: int | None, fixed: bool = False, dropped=None):
    """Split/concatenate a stream of canonical chunks (samples on axis 0 of every array) into batches of
    ``batch_size`` samples; samples of different shapes (other than on axis 0) never share a batch. ``fixed``: a
    shorter batch is not yielded (its sample count goes to ``dropped[0]``)."""
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
        if pending and any(v.shape[1:] != pending[0][k].shape[1:] for k, v in feed.items()):
            # samples of another shape (a folder of token sequences of different lengths): the batch so far goes
            # alone (a model with a fixed batch leaves it out)
            if not fixed:
                yield _joined(pending)
            elif dropped is not None:
                dropped[0] += count
            pending, count = [], 0
        total += n
        pending.append(feed)
        count += n
        while count >= batch_size:
            merged = _joined(pending)
            yield {k: v[:batch_size] for k, v in merged.items()}
            rest = {k: v[batch_size:] for k, v in merged.items()}
            count -= batch_size
            pending = [rest] if count else []
        if max_samples is not None and total >= max_samples:
            break
    if count and not fixed:
        yield _joined(pending)
    elif count and dropped is not None:
        dropped[0] += count


class Calibration:
    """A re-iterable, validated source of calibration batches (``Batch``: input name -> array, and its samples).

    ``fixed_batch``: the model's batch size when its batch axis is static (then every batch has exactly that many
    samples and ``batch_size`` equals it), else None. ``batch_size`` may be changed before iterating."""

    def __init__(self, source, inputs: list[InputInfo], batch_size: int = 32, max_samples: int | None = None,
                 seed: int = 0, name: str = "calibration dict", model=None):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(f"batch size must be a positive integer, got {batch_size!r}")
        if max_samples is not None and max_samples < 1:
            raise UserError(f"max samples must be a positive integer, got {max_samples!r}")
        self.inputs = inputs
        self.batch_size = batch_size
        self.max_samples = max_samples
        self.seed = seed
        self.model = model  # (random feeds: the empty caches' heads and head size where the inputs leave them open)
        self.is_random = isinstance(source, str) and source == "random"
        self._source = source
        self.name = name  # what errors about a dict source call it
        self.num_samples = None
        self._said_dropped = False
        self.layouts: dict | None = None
        self.fixed_batch: int | None = None
        self._chunks_fn = self._resolve(source)

    _arrays = None
    whole_feeds = False  # every input fed as it is (a fully static model): each source feed is one batch

    # ------------------------------------------------------------------------------------------------ layouts
    def _set_layouts(self, where: str, shapes: dict) -> None:
        """Decide every input's Layout from the shapes of the first data seen (once)."""
        if self.layouts is not None:
            return
        layouts = {i.name: _layout(where, i, self.inputs, tuple(shapes[i.name])) for i in self.inputs}
        self._unnamed_batch_axes(layouts, shapes)
        fixed = {n: L.fixed for n, L in layouts.items() if L.form != "const" and L.fixed is not None}
        if all(L.form == "const" or not self._info(n).shape for n, L in layouts.items()):
            # every array is exactly one feed (a fully static model): each is fed as it is, one batch each
            fixed = {"": 1}
            self.whole_feeds = True
        if len(set(fixed.values())) > 1:
            raise UserError(f"{where}: the model's inputs have different static batch sizes "
                            f"({', '.join(f'{n}: {v}' for n, v in fixed.items())}); cannot form a batch")
        self.layouts = layouts
        if fixed:
            n = next(iter(fixed.values()))
            self.fixed_batch = n
            if self.batch_size != n and not self.whole_feeds:
                log.info("the model's batch dimension is fixed at %d: calibration batches of %d", n, n)
            self.batch_size = n
        sizes = {n: s for n, s in ((n, _samples_in(L, shapes[n])) for n, L in layouts.items()
                                   if self._info(n).shape) if s is not None}
        if len(set(sizes.values())) > 1:
            raise UserError(f"{where}: inputs have different numbers of samples: "
                            f"{', '.join(f'{n}: {v}' for n, v in sizes.items())}")

    def _unnamed_batch_axes(self, layouts: dict, shapes: dict) -> None:
        """An array taken for a constant whose input leaves one axis free and unnamed, as the stacked inputs'
        dynamic axis 0 is (silero-vad's state [2, ?, 128] beside its input [?, ?]), is stacked on that axis where
        its size there is the stacked inputs' sample count (more than 1): the samples' states, not one state."""
        counts = {_samples_in(L, tuple(shapes[n])) for n, L in layouts.items() if L.form == "stacked" and L.axis == 0
                  and not (self._info(n).params and self._info(n).params[0])}
        counts.discard(None)
        if len(counts) != 1 or (n_samples := counts.pop()) < 2:
            return
        for name, L in layouts.items():
            info = self._info(name)
            free = [ax for ax, d in enumerate(info.shape) if d is None]
            if L.form == "const" and len(free) == 1 and not (info.params and info.params[free[0]]) and \
                    len(shapes[name]) == len(info.shape) and shapes[name][free[0]] == n_samples:
                layouts[name] = Layout("stacked", free[0])
                log.info("input %s: axis %d (free, unnamed) taken as its batch axis: %d samples, as the other "
                         "inputs have", name, free[0], n_samples)

    def _info(self, name: str) -> InputInfo:
        return next(i for i in self.inputs if i.name == name)

    def _canon(self, where: str, feed) -> tuple[dict, dict]:
        """A feed of the source -> (arrays with the samples on axis 0, constants), validated."""
        if not isinstance(feed, dict):
            raise UserError(f"{where}: expected a dict of input name -> array, got {type(feed).__name__}")
        _check_names(where, self.inputs, feed)
        arrays = {}
        for i in self.inputs:
            a = feed[i.name]
            arrays[i.name] = a if isinstance(a, (np.ndarray, _Meta)) else np.asarray(a)
        self._set_layouts(where, {k: v.shape for k, v in arrays.items()})
        samples, consts = {}, {}
        for i in self.inputs:
            L, a = self.layouts[i.name], arrays[i.name]
            if isinstance(a, _Meta):
                continue
            a = _check_values(where, i, a)
            if L.form == "const":  # (a dynamic axis beside a static batch, as an OCR line's width, takes any size)
                if a.ndim != len(i.shape) or any(w is not None and g != w for g, w in zip(a.shape, i.shape)):
                    raise UserError(f"{where}: input {i.name} has shape {a.shape}, the model expects "
                                    f"{_fmt_shape(i.shape)} (fed as it is, like the first calibration data)")
                consts[i.name] = a
            elif not i.shape:  # a scalar input given per sample: one value for all
                if a.ndim != 1 or (a.size and not np.all(a == a.flat[0])):
                    raise UserError(f"{where}: input {i.name} is a scalar (rank 0): give one value (shape ()), not "
                                    f"different values per sample (shape {a.shape})")
                consts[i.name] = a.reshape(-1)[:1].reshape(())
            elif L.form == "stacked":
                if a.ndim != len(i.shape):
                    raise UserError(f"{where}: input {i.name} has rank {a.ndim} (shape {a.shape}), the model "
                                    f"expects rank {len(i.shape)} {_fmt_shape(i.shape)}")
                _check_static(where, i, a.shape, skip=L.axis)
                samples[i.name] = np.moveaxis(a, L.axis, 0)
            else:  # one entry per sample: entry k is sample k's feed; its batch axis is merged into the samples
                if a.ndim != len(i.shape) + 1:
                    raise UserError(f"{where}: input {i.name} has rank {a.ndim} (shape {a.shape}), expected one "
                                    f"entry per sample of rank {len(i.shape)} {_fmt_shape(i.shape)}")
                _check_static(where, i, a.shape[1:], skip=L.axis)
                if L.axis is None:
                    samples[i.name] = a
                else:
                    b = np.moveaxis(a, 1 + L.axis, 1)
                    samples[i.name] = b.reshape((-1,) + b.shape[2:])
        sizes = {k: v.shape[0] for k, v in samples.items()}
        if len(set(sizes.values())) > 1:
            raise UserError(f"{where}: inputs have different numbers of samples: "
                            f"{', '.join(f'{n}: {v}' for n, v in sizes.items())}")
        if any(v == 0 for v in sizes.values()):
            raise UserError(f"{where}: input {next(k for k, v in sizes.items() if v == 0)} is empty (0 samples)")
        return samples, consts

    def head(self, feed: Batch, k: int) -> Batch:
        """The first ``k`` samples of a batch of this source; the whole batch where it has no more or cannot be cut
        (the model's batch is fixed)."""
        if self.fixed_batch or k >= batch_samples(feed):
            return feed
        out = Batch()
        for name, v in feed.items():
            L = self.layouts[name]
            batched = L.form != "const" and L.axis is not None and self._info(name).shape
            out[name] = v[(slice(None),) * L.axis + (slice(0, k),)] if batched else v
        out.samples = min(k, batch_samples(feed))
        return out

    def _to_feed(self, batch: dict, consts: dict) -> Batch:
        out = Batch()
        for i in self.inputs:
            if i.name in batch:
                v = batch[i.name]
                L = self.layouts[i.name]
                out[i.name] = v[0] if L.axis is None else np.ascontiguousarray(np.moveaxis(v, 0, L.axis)) \
                    if L.axis else v
            else:
                out[i.name] = consts[i.name]
        out.samples = next((v.shape[0] for v in batch.values()), 1)
        return out

    # ------------------------------------------------------------------------------------------------ sources
    def _resolve(self, source):
        if hasattr(source, "text_feeds"):  # capture/text.py's TextCalibration: batches made at the current batch size
            self.num_samples = source.bind(self.inputs, self.max_samples)
            return lambda: (self._canon(f"{source.path}: batch {k}", feed)
                            for k, feed in enumerate(source.text_feeds(self.batch_size)))
        if isinstance(source, (str, os.PathLike)):
            path = os.fspath(source)
            if path == "random":
                log.warning("calibration data: RANDOM inputs (smoke test only): the quantized model's accuracy "
                            "means nothing")
                self._set_layouts("random calibration", {i.name: self._random_shape(i, 2) for i in self.inputs})
                self.num_samples = self._random_count()
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
            metas = {k: _Meta(self._npz.dtype(k), self._npz.shape(k)) for k in self._npz.members}
            _check_names(path, self.inputs, metas)
            for i in self.inputs:
                _check_kind(path, i, metas[i.name].dtype)
            self._canon(path, metas)
            self.num_samples = self._count({k: m.shape for k, m in metas.items()})
            return self._npz_chunks
        if isinstance(source, dict):
            self._arrays = self._canon(self.name, source)
            self.num_samples = self._count({k: np.shape(v) for k, v in source.items()})
            return self._array_chunks
        if hasattr(source, "get_next"):  # onnxruntime.quantization.CalibrationDataReader
            return self._reader_chunks
        if hasattr(source, "__iter__"):
            return self._iter_chunks
        raise UserError(f"calibration must be a path, 'random', a dict, an iterable of feed dicts or a "
                        f"CalibrationDataReader; got {type(source).__name__}")

    def _count(self, shapes: dict) -> int:
        """Samples in a source of known shapes, after --max-samples and the fixed batch."""
        counts = [_samples_in(self.layouts[i.name], shapes[i.name]) for i in self.inputs if i.shape]
        n = next((c for c in counts if c is not None), 1)
        n = min(n, self.max_samples) if self.max_samples else n
        if self.fixed_batch:
            if n < self.fixed_batch:
                raise UserError(f"calibration data has {n} samples, fewer than the model's fixed batch size "
                                f"{self.fixed_batch}")
            n -= n % self.fixed_batch
        return n

    def _array_chunks(self):
        yield self._arrays

    def _npz_chunks(self):
        names = [i.name for i in self.inputs]
        axes = {n: self.layouts[n].data_axis() for n in names}
        limit = self.max_samples
        for chunk in self._npz.chunks(names, self.batch_size, axes):
            samples, consts = self._canon(self._npz.path, chunk)
            yield samples, consts
            if limit is not None and samples:
                limit -= next(iter(samples.values())).shape[0]
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
                        and v.ndim == len(next(i for i in self.inputs if i.name == k).shape) - 1
                        and v.ndim >= 1 else v)
                    for k, v in feed.items()}
            yield self._canon(f, feed)

    def _reader_chunks(self):
        if hasattr(self._source, "rewind"):
            self._source.rewind()
        i = 0
        while True:
            feed = self._source.get_next()
            if feed is None:
                break
            yield self._canon(f"calibration reader batch {i}", feed)
            i += 1

    def _iter_chunks(self):
        for i, feed in enumerate(self._source):
            yield self._canon(f"calibration batch {i}", feed)

    def _random_shape(self, i: InputInfo, n: int) -> tuple:
        """n samples along the model's dynamic batch axis; the other dynamic dims of a float input of rank 3 or more
        (an image's sides, a signal's length) RANDOM_SIDE, else 1; a static input as it is."""
        ax = model_batch_axis(i, self.inputs)
        side = RANDOM_SIDE if len(i.shape) >= 3 and np.issubdtype(i.dtype, np.floating) and \
            not i.name.startswith(("past_key", "past_value")) else 1
        return tuple(n if a == ax else (d if d is not None else side if a > 0 else 1) for a, d in enumerate(i.shape))

    def _random_count(self) -> int:
        return 1 if self.whole_feeds else self.max_samples or 64

    def _random_chunks(self):
        rng = np.random.default_rng(self.seed)
        n = self._random_count()
        feed = {}
        for i in self.inputs:
            shape = self._random_shape(i, n)
            if i.name.startswith(("past_key", "past_value")) and len(shape) == 4 and i.shape[2] is None:
                shape = shape[:2] + (0,) + shape[3:]  # an empty key/value cache (a decoder's prefill)
                if self.model is not None:  # heads and head size from the attention node where the input's are open
                    try:
                        heads, dim = cache_shape(self.model, i)
                        shape = (shape[0], heads, 0, dim)
                    except UserError:  # (not found: 1 where dynamic, as for any other input)
                        pass
            if np.issubdtype(i.dtype, np.floating):
                feed[i.name] = rng.standard_normal(shape).astype(i.dtype)
            elif i.name in MASK_NAMES:  # (zeros would mask every token out of the statistics)
                feed[i.name] = np.ones(shape, i.dtype)
            else:
                feed[i.name] = np.zeros(shape, i.dtype)
        yield self._canon("random calibration", feed)

    def __iter__(self):
        empty = True
        consts = {}
        dropped = [0]

        def canonical():
            for samples, c in self._chunks_fn():
                consts.update(c)
                if samples:
                    yield samples
                else:  # every input a constant: the chunk is one feed, as it is
                    yield {"": np.zeros((1, 0))}

        chunks = canonical()
        first = next(chunks, None)  # (the first data decide the layouts, and with them the model's fixed batch)
        chunks = itertools.chain([first], chunks) if first is not None else iter(())
        for b in _rebatch(chunks, self.batch_size, self.max_samples, bool(self.fixed_batch), dropped):
            empty = False
            b.pop("", None)
            yield self._to_feed(b, consts)
        if empty:
            if self.fixed_batch and dropped[0]:
                raise UserError(f"calibration data has {dropped[0]} samples, fewer than the model's fixed batch "
                                f"size {self.fixed_batch}")
            raise UserError("calibration data is empty")
        if dropped[0] and not self._said_dropped:  # (once: sequential capture reads the batches once a stage)
            self._said_dropped = True
            log.warning("the model's batch size is fixed at %d: the last %d calibration samples (not a whole batch) "
                        "were left out", self.fixed_batch, dropped[0])


class Feeds(Calibration):
    """Feeds given as they are, each one batch, never cut or joined (a model made of an If branch: its inputs are
    tensors of the outer model, computed batch by batch). ``feeds``: a re-iterable source of them (a list, or one
    that computes them again), holding ``num_samples`` samples in batches of at most ``batch_size``."""

    def __init__(self, feeds, name: str, num_samples: int, batch_size: int, unit: str = "sample"):
        super().__init__(feeds, [], name=name)
        self.num_samples = num_samples
        self.batch_size = self.fixed_batch = batch_size
        self.unit = unit  # what num_samples counts (a loop body's feeds: sample-iterations), for progress lines

    def _resolve(self, source):
        return None

    def __iter__(self):
        empty = True
        for feed in self._source:
            empty = False
            yield feed
        if empty:
            raise UserError("calibration data is empty")


def _samples_in(layout: Layout, shape: tuple) -> int | None:
    """The samples in an array of ``shape`` laid out as ``layout`` (None for a constant)."""
    if layout.form == "const":
        return None
    if layout.form == "sample":
        return shape[0] if layout.axis is None else shape[0] * shape[1 + layout.axis]
    return shape[layout.axis]


def _check_names(where: str, inputs: list, feed: dict) -> None:
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


def _check_kind(where: str, info: InputInfo, dtype) -> None:
    """What a file header tells of the dtype (before any data is read)."""
    if dtype == object:
        raise UserError(f"{where}: input {info.name} holds Python objects, expected numeric data")
    if not (np.issubdtype(dtype, np.number) or dtype == np.bool_):
        raise UserError(f"{where}: input {info.name} has dtype {dtype}, the model expects "
                        f"{np.dtype(info.dtype).name}")


MASK_NAMES = ("attention_mask", "input_mask", "mask", "attn_mask")


def resolve_mask_input(model, name: str | None) -> str | None:
    """The attention-mask input to use: ``name``, or with "auto" the first input with a common mask name."""
    inputs = [i.name for i in model_inputs(model)]
    if name in (None, "", "none"):
        return None
    if name == "auto":
        return next((n for n in MASK_NAMES if n in inputs), None)
    if name not in inputs:
        raise UserError(f"data.mask_input {name}: the model has no such input (inputs: {', '.join(inputs)})")
    return name




class KeepFirst:
    """Iterates ``batches`` and keeps (in ``held``) the batches that hold the first ``samples`` samples, in the
    first iteration only (a calibration set smaller than ``samples`` is not kept twice by the later passes)."""

    def __init__(self, batches, held: list, calib, samples: int):
        self.batches, self.held, self.calib, self.samples = batches, held, calib, samples
        self.kept = False

    def __iter__(self):
        keep, self.kept = not self.kept, True
        for feed in self.batches:
            room = self.samples - sum(batch_samples(f) for f in self.held)
            if keep and room > 0:
                self.held.append(self.calib.head(feed, room))
            yield feed


def reiterable(calib) -> bool:
    """Whether a Calibration yields the same batches again (sequential capture reads them once per stage)."""
    src = getattr(calib, "_source", calib)
    if hasattr(src, "get_next"):  # an onnxruntime CalibrationDataReader
        return hasattr(src, "rewind")
    if isinstance(src, (str, dict)) or hasattr(src, "__fspath__"):
        return True
    try:
        return iter(src) is not src  # a list or other container, not a one-shot iterator or generator
    except TypeError:
        return False
