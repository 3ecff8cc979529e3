"""The memory budget of capture: bytes per calibration sample and the largest batch that fits.
"""

from __future__ import annotations

import contextlib
import logging
import re

import numpy as np
import onnx

from ..errors import UserError
from ..graph.modelio import skeleton
from .calib import reiterable
from .gram import CHUNK_BYTES
from .rows import spec_tensors
from .session import run_session

log = logging.getLogger("onnxcomq")
CAPTURE_OVERHEAD = 2.5  # capture's memory per byte of captured tensors (the outputs, onnxruntime's own activations)


DEFAULT_MEMORY_FRACTION = 0.25  # --max-memory default: this share of the machine's RAM
STATS_SHARE = 0.5  # the share of the budget the statistics of one group of layers may hold (the rest: capture)


_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_bytes(text, what: str = "max memory") -> int:
    """'4G', '512M', '1.5g', '800k', '4GB', '4GiB' or a byte count -> bytes; anything else is a UserError."""
    if isinstance(text, (int, np.integer)) and not isinstance(text, bool):
        value = int(text)
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", str(text))
        if m is None:
            raise UserError(f"{what} must be a size such as 4G, 512M or a number of bytes, got {text!r}")
        value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value < (1 << 20):
        raise UserError(f"{what} must be at least 1M, got {text!r}")
    return value


def default_max_memory() -> int:
    """The default budget: ``DEFAULT_MEMORY_FRACTION`` of the machine's physical RAM (8 GiB if unknown)."""
    import os

    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 32 << 30
    return int(total * DEFAULT_MEMORY_FRACTION)


def current_rss() -> int:
    """This process's resident memory now, in bytes (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            import os
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def tensor_bytes(model: onnx.ModelProto, tensors: list, feed: dict, last_dims: dict | None = None) -> dict | None:
    """{tensor: bytes} of ``tensors`` (the captured layer inputs) for the one-sample ``feed``, from ONNX shape
    inference with the graph inputs set to the feed's shapes; None when a shape stays unknown. ``last_dims``:
    tensor -> its known last dimension (a MatMul input's features, which inference may lose in a Reshape)."""
    m = skeleton(model)  # (a copy without the bytes of the large tensors: inference needs only their dims)
    for i in m.graph.input:
        if i.name in feed:
            dims = i.type.tensor_type.shape.dim
            shape = np.shape(feed[i.name])
            if len(dims) == len(shape):
                for d, v in zip(dims, shape):
                    d.Clear()
                    d.dim_value = int(v)
    try:
        inferred = onnx.shape_inference.infer_shapes(m, data_prop=True)
    except Exception:  # best effort: the caller falls back to a measured run
        return None
    known = {vi.name: vi for vi in list(inferred.graph.value_info) + list(inferred.graph.output)
             + list(inferred.graph.input)}
    sizes = {}
    for t in tensors:
        vi = known.get(t)
        if vi is None or not vi.type.tensor_type.HasField("shape"):
            return None
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in vi.type.tensor_type.shape.dim]
        if dims and dims[-1] <= 0 and (last_dims or {}).get(t):
            dims[-1] = last_dims[t]
        if any(d <= 0 for d in dims):
            return None
        size = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type).itemsize \
            if vi.type.tensor_type.elem_type else 4
        sizes[t] = size * int(np.prod(dims))
    return sizes


def measured_tensor_bytes(model: onnx.ModelProto, tensors: list, feed: dict) -> dict:
    """{tensor: bytes} of ``tensors`` for the one-sample ``feed``, from one onnxruntime run of the capture model."""
    inputs = {i.name for i in model.graph.input}
    fetch = [t for t in tensors if t not in inputs]
    sizes = {t: np.asarray(feed[t]).nbytes for t in tensors if t in inputs and t in feed}
    if fetch:  # (the model cut down to what the tensors depend on: no full copy of a large model)
        from .passes import stage_session
        with contextlib.ExitStack() as stack:
            sess = stage_session(model, fetch, stack)
            sizes.update((t, np.asarray(v).nbytes) for t, v in zip(fetch, run_session(sess, fetch, feed)))
            del sess
    return sizes


def stats_bytes(specs: dict, cross: bool = False) -> int:
    """Memory of the streamed statistics: G (and H, G~ with cross statistics) per group, float64."""
    return sum(8 * g * spec.fan_in * spec.fan_in * (3 if cross else 1) for spec, g in specs.items())


def layer_specs(layers) -> dict:
    """{XSpec: groups} of ``layers``' inputs."""
    return {spec: L.groups for L in layers for _, spec in L.consumers}


def fit_groups(stages: list, budget: int, cross: bool = False, folds: bool = False) -> list:
    """Split each stage (its layers in graph order) into consecutive groups whose statistics fit ``budget`` bytes
    (a layer whose statistics alone exceed it is a group of its own). Capture and solve then run one group at a
    time and free its statistics before the next (docs/design.md, "Groups"). Layers that read one input share its
    statistics, so they are kept together where they are consecutive."""
    out = []
    for stage in stages:
        group, specs = [], {}
        for layer in stage:
            trial = {**specs, **layer_specs([layer])}
            if group and stats_bytes(trial, cross) * (2 if folds else 1) > budget:
                out.append(group)
                group, trial = [], layer_specs([layer])
            group.append(layer)
            specs = trial
        if group:
            out.append(group)
    return out


def batch_for_budget(per_sample: int, budget: int, fixed: int, requested: int) -> int:
    """The largest batch <= ``requested`` whose capture (``CAPTURE_OVERHEAD`` x ``per_sample`` bytes a sample,
    plus the chunk buffers) fits ``budget`` beside ``fixed`` bytes (the process so far and the statistics); at
    least 1."""
    room = budget - fixed - 4 * CHUNK_BYTES
    per = max(CAPTURE_OVERHEAD * per_sample, 1)
    return int(max(1, min(requested, room // per)))


def peak_rss_mb() -> float:
    try:
        import resource
    except ImportError:  # (not on Windows)
        return 0.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0




def memory_budget(max_memory) -> int:
    """--max-memory in bytes (the default share of the RAM when None)."""
    return parse_bytes(max_memory, "max memory") if max_memory is not None else default_max_memory()


def choose_batch(model, layers, calib, max_memory, cross: bool = False, folds: bool = False,
                 groups: list | None = None) -> tuple:
    """Set ``calib.batch_size`` to the largest batch <= config.batch_size whose capture fits the memory budget
    (``max_memory`` bytes, or the default share of the RAM), from the bytes of the captured layer inputs of one
    calibration sample (shape inference on the first sample's shapes, else one measured run) and the statistics
    held beside them. ``groups``: the groups of layers captured one at a time (fit_groups; default: all layers
    at once): the largest group's inputs and statistics count. ``cross``: sequential capture holds two activations
    and three matrices per input; ``folds``: held-out folds double the statistics. A model with a fixed batch keeps
    it. Returns (budget in bytes, a line saying what was chosen and why)."""
    budget = memory_budget(max_memory)
    requested = calib.batch_size
    if getattr(calib, "fixed_batch", False):
        return budget, f"{calib.batch_size} (the model's fixed batch)"
    if not reiterable(calib) or requested <= 1:
        return budget, f"{calib.batch_size} (as given)"
    groups = groups or [layers]
    inits = {t.name for t in model.graph.initializer}
    wanted = [sorted({t for spec in layer_specs(g) for t in spec_tensors(spec)} - inits) for g in groups]
    first = next(iter(calib))
    if getattr(calib, "fixed_batch", False):  # (known once data was seen)
        return budget, f"{calib.batch_size} (the model's fixed batch)"
    one = calib.head(first, 1)
    del first
    tensors = sorted({t for w in wanted for t in w})
    last = {s.tensor: s.fan_in for g in groups for s in layer_specs(g) if s.kind == "rows" and not s.transpose}
    sizes = tensor_bytes(model, tensors, one, last)
    if sizes is None:
        sizes = measured_tensor_bytes(model, tensors, one)
    per = max(sum(sizes.get(t, 0) for t in w) for w in wanted)
    held = max(stats_bytes(layer_specs(g), cross) for g in groups) * (2 if folds else 1)
    fixed = current_rss() + held
    batch = batch_for_budget(per * (2 if cross else 1), budget, fixed, requested)
    calib.batch_size = batch
    note = (f"{batch}: captured activations {per / 2**20:.1f} MiB a sample, memory budget "
            f"{budget / 2**30:.2f} GiB" + ("" if batch == requested else f" (lowered from {requested})"))
    if batch < requested and batch == 1 and fixed + CAPTURE_OVERHEAD * per > budget:
        log.warning("calibration batch %s; the layer statistics held at once (%.2f GiB) leave no room for more, and "
                    "the run may exceed the budget (--max-memory)", note, held / 2**30)
    else:
        log.info("calibration batch %s", note)
    return budget, note
