"""Sequential (error-feeding) capture and held-out statistics (../shared/docs/comq.md, "Two exact extensions").

Sequential capture quantizes the layers in topological stages. For stage s every calibration batch runs through the
float model and through a float copy whose earlier stages carry their dequantized weights and re-fitted biases; per
layer it streams, besides G = X^T X of the float input X, the cross statistics H = X~^T X and G~ = X~^T X~ of the
partly quantized model's input X~ (and the column sums of both). The solver then minimizes ||X W^T - X~ Q^T||^2, so
each layer also corrects the error its inputs already carry. Stage 0 sees X~ = X (one pass); later stages cost two
passes each, over the part of the graph that leads to the stage's layers only.

Held-out folds: for layers with few calibration rows for their fan-in, the statistics are also kept in two folds
(alternate samples of each batch), so that the damping strength can be chosen by the error on the fold that was not
solved on (api.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from .calib import batch_samples
from .capture import (RNN_KINDS, GramStats, blas_threads, capture_model, conv_output_shape, free_scratch,
                      make_session, rnn_rows, run_session, spec_tensors)
from .graph import node_names
from .modelio import copy_fields


@dataclass
class _Part:
    """The statistics of one fold: X's (GramStats) and, for cross statistics, H = X~^T X, G~ and X~'s column sums."""

    x: GramStats
    H: np.ndarray = None
    Gt: np.ndarray = None
    sums_t: np.ndarray = None

    def fold(self, X, Xt=None):
        """Fold one chunk of X (and X~), transposed: (groups, n, rows) float32 (``GramStats.chunks``); float32
        GEMMs accumulated in float64, like GramStats."""
        self.x._fold(X)
        if Xt is not None:
            A, B = X.astype(np.float32, copy=False), Xt.astype(np.float32, copy=False)
            self.H += np.matmul(B, A.transpose(0, 2, 1))
            self.Gt += np.matmul(B, B.transpose(0, 2, 1))
            self.sums_t += B.sum(axis=-1)


class LayerStats:
    """Streaming statistics of one layer input (an XSpec): G, and with ``cross`` also H and G~; kept in two folds
    when ``fold_below`` > 0 and the rows expected from the first batch (times ``total_samples``) are fewer."""

    def __init__(self, spec, groups: int, cross: bool = False, fold_below: float = 0.0, total_samples: int = 0):
        self.spec, self.groups, self.cross = spec, groups, cross
        self.fold_below, self.total_samples = fold_below, total_samples
        self.parts = None

    def _new_part(self) -> _Part:
        p = _Part(GramStats(self.spec, self.groups))
        if self.cross:
            p.H, p.Gt, p.sums_t = np.zeros_like(p.x.G), np.zeros_like(p.x.G), np.zeros_like(p.x.sums)
        return p

    def _expected_rows(self, t, mask, samples: int) -> float:
        if self.spec.kind in RNN_KINDS:
            rows = t.shape[1]
        elif self.spec.kind == "rows":
            rows = t.size // self.spec.fan_in
            if mask is not None and rows == mask.size and not self.spec.transpose:
                rows = int((mask != 0).sum())
        else:
            rows = t.shape[0] * int(np.prod(conv_output_shape(self.spec, t.shape[2:])))
        return rows / max(samples, 1) * max(self.total_samples, samples)

    @property
    def folded(self) -> bool:
        return self.parts is not None and len(self.parts) == 2

    def add(self, t: np.ndarray, mask: np.ndarray | None = None, tq: np.ndarray | None = None, samples: int = 1):
        """Fold one batch: ``t`` the float model's tensor, ``tq`` the partly quantized model's (cross only)."""
        if self.parts is None:
            few = self.fold_below > 0 and self._expected_rows(t, mask, samples) < self.fold_below
            self.parts = [self._new_part() for _ in range(2 if few else 1)]
        if not self.folded:
            self._fold_all(self.parts[0], t, mask, tq)
            return
        ax = 1 if (self.spec.kind == "rows" and self.spec.transpose) or self.spec.kind in RNN_KINDS else 0
        if t.shape[ax] >= 2:  # alternate samples go to the two folds
            for f, part in enumerate(self.parts):
                sl = (slice(None),) * ax + (slice(f, None, 2),)
                m = mask[f::2] if mask is not None and ax == 0 else None
                self._fold_all(part, t[sl], m, None if tq is None else tq[sl])
            return
        with blas_threads(self.spec.fan_in):
            for X, Xt in self._pairs(t, mask, tq):  # one sample: alternate rows
                for f, part in enumerate(self.parts):
                    part.fold(X[..., f::2], None if Xt is None else Xt[..., f::2])

    def _pairs(self, t, mask, tq):
        xs = self.parts[0].x.chunks(t, mask)
        if tq is None:
            return ((X, None) for X in xs)
        return zip(xs, self.parts[0].x.chunks(tq, mask, slot=1))

    def _fold_all(self, part, t, mask, tq):
        with blas_threads(self.spec.fan_in):
            for X, Xt in self._pairs(t, mask, tq):
                part.fold(X, Xt)

    def part(self, fold: int | None = None) -> _Part:
        """Fold 0 or 1, or (None) all rows (for two folds: a new merged part, not kept; ``stats`` and ``means``
        merge one group at a time instead, so that no full copy of the statistics outlives the call)."""
        if fold is not None:
            return self.parts[fold]
        if len(self.parts) == 1:
            return self.parts[0]
        a, b = self.parts
        s = _Part(GramStats.__new__(GramStats))
        s.x.spec, s.x.groups = self.spec, self.groups
        s.x.G, s.x.sums, s.x.rows = a.x.G + b.x.G, a.x.sums + b.x.sums, a.x.rows + b.x.rows
        if self.cross:
            s.H, s.Gt, s.sums_t = a.H + b.H, a.Gt + b.Gt, a.sums_t + b.sums_t
        return s

    def _group(self, k: int, fold: int | None):
        """(N, G, sums, H, G~, sums~) of group k over ``fold`` (None: both folds; H.. None without cross)."""
        ps = self.parts if fold is None else [self.parts[fold]]
        N = sum(p.x.rows for p in ps)

        def total(get):
            if len(ps) == 1:
                return get(ps[0])
            return get(ps[0]) + get(ps[1])

        G, sums = total(lambda p: p.x.G[k]), total(lambda p: p.x.sums[k])
        if not self.cross:
            return N, G, sums, None, None, None
        return N, G, sums, total(lambda p: p.H[k]), total(lambda p: p.Gt[k]), total(lambda p: p.sums_t[k])

    @property
    def rows(self) -> int:
        return sum(p.x.rows for p in self.parts)

    def stats(self, k: int, centered: bool = False, fold: int | None = None):
        """(G, H, G~) of group k (float64); H and G~ are None without cross statistics. ``centered``: the statistics
        of the centered X and X~ (free bias): G - N mu^T mu, H - N mu~^T mu, G~ - N mu~^T mu~. Uncentered ones of
        a single fold are views of the running sums (callers copy before changing them)."""
        N, G, sums, H, Gt, sums_t = self._group(k, fold)
        if centered:
            mu = sums / max(N, 1)
            G = _minus_outer(G, N, mu, mu)
        if not self.cross:
            return G, None, None
        if not centered:
            return G, H, Gt
        mut = sums_t / max(N, 1)
        return G, _minus_outer(H, N, mut, mu), _minus_outer(Gt, N, mut, mut)

    def means(self, k: int, fold: int | None = None):
        """(mu, mu~): the mean rows of X and X~ (mu~ = mu without cross statistics)."""
        N, _, sums, _, _, sums_t = self._group(k, fold)
        N = max(N, 1)
        mu = sums / N
        return mu, (sums_t / N if self.cross else mu)


def _minus_outer(A: np.ndarray, N: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """A - N u^T v as one new array (the same numbers as ``A - N * np.outer(u, v)``, one n x n temporary less)."""
    out = np.outer(u, v)
    out *= -N
    out += A
    return out


def stage_model(model: onnx.ModelProto, tensors: list) -> onnx.ModelProto:
    """A copy of ``model`` that outputs ``tensors`` only, without the nodes (and initializers) they do not depend
    on. Built field by field so that the initializers are copied once (large models)."""
    m = onnx.ModelProto()
    copy_fields(model, m, skip="graph")
    copy_fields(model.graph, m.graph, skip="initializer")
    del m.graph.output[:]
    subgraphs = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in m.graph.node
                    for a in n.attribute)
    if not subgraphs:  # (subgraphs read outer names implicitly: keep everything then)
        need = set(tensors)
        keep = []
        for n in reversed(m.graph.node):
            if any(o in need for o in n.output):
                keep.append(n)
                need.update(i for i in n.input if i)
        del m.graph.node[:]
        m.graph.node.extend(reversed(keep))
    used = {i for n in m.graph.node for i in n.input}
    m.graph.initializer.extend(t for t in model.graph.initializer if subgraphs or t.name in used)
    return capture_model(m, tensors, copy=False)


def stage_entries(model: onnx.ModelProto, stage: list) -> set:
    """The nodes of a stage's layers whose inputs depend on no layer of the same stage (graph order is
    topological, so one forward pass marks everything downstream of the stage's layers)."""
    nodes = {c for layer in stage for c, _ in layer.consumers}
    down = set()
    for name, n in zip(node_names(model), model.graph.node):
        if name in nodes or any(i in down for i in n.input):
            down.update(n.output)
    return {layer.node for layer in stage if all(spec.tensor not in down for _, spec in layer.consumers)}


def plan_stages(layers: list, stages: int) -> list:
    """Split the layers (in graph order) into ``stages`` contiguous groups of about equal count."""
    stages = max(1, min(stages, len(layers)))
    bounds = np.linspace(0, len(layers), stages + 1).round().astype(int)
    return [layers[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def dequantized(qw) -> np.ndarray:
    """The weight a QuantizedWeight's DequantizeLinear produces, in the stored layout and float type."""
    shape = [1] * qw.codes.ndim
    if np.ndim(qw.scale):
        shape[qw.axis] = -1
    dt = np.float16 if qw.float16 else np.float32
    if qw.directions:  # (a bidirectional recurrent weight: scale [2, rows])
        return ((qw.codes.astype(np.int32) - qw.expand(np.asarray(qw.zero_point, np.int32)))
                * qw.expand(np.asarray(qw.scale, dt))).astype(dt)
    scale = np.asarray(qw.scale, dt).reshape(shape)
    return ((qw.codes.astype(np.int32) - np.asarray(qw.zero_point, np.int32).reshape(shape)) * scale).astype(dt)


def quantized_twin(model: onnx.ModelProto, qweights: list, apply_bias, deltas: dict) -> onnx.ModelProto:
    """A float copy of ``model`` carrying the dequantized weights (and the re-fitted biases) of ``qweights``."""
    m = apply_bias(model, deltas) if deltas else onnx.ModelProto()
    if not deltas:
        m.CopyFrom(model)
    by_name = {qw.name: qw for qw in qweights}
    for t in m.graph.initializer:
        qw = by_name.get(t.name)
        if qw is not None:
            t.CopyFrom(numpy_helper.from_array(dequantized(qw), t.name))
    return m


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


def capture(model, twin, specs: dict, batches, progress=None, mask_input=None, fold_below: dict | None = None,
            total_samples: int = 0, observers: dict | None = None) -> tuple:
    """Run every batch through ``model`` (and ``twin``, the partly quantized copy, when given) and return
    ({XSpec: LayerStats}, samples). ``specs``: XSpec -> groups; ``fold_below``: XSpec -> row threshold for folds.
    ``observers``: tensor name -> activation range observer (activations.py), fed the float model's values of
    that tensor in the same pass."""
    cross = twin is not None
    fold_below = fold_below or {}
    stats = {spec: LayerStats(spec, g, cross, fold_below.get(spec, 0.0), total_samples) for spec, g in specs.items()}
    graph_inputs = {i.name for i in model.graph.input}
    observers = observers or {}
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer
              if any(t.name == s.initial for s in specs if s.kind == "rnn_hidden")}  # a constant initial_h
    fetch = sorted({t for s in specs for t in spec_tensors(s)} - graph_inputs - set(consts))
    fetch_float = sorted(set(fetch) | (set(observers) - graph_inputs))
    pairs = ((model, fetch_float), (twin, fetch)) if cross else ((model, fetch_float),)
    runs = [(make_session(stage_model(m, f), mem_pattern=False) if f else None, f) for m, f in pairs]
    samples = 0
    for feed in batches:
        vals = [dict(zip(f, run_session(sess, f, feed, samples))) if sess is not None else {} for sess, f in runs]
        for v in vals:
            v.update({k: a for k, a in feed.items() if k in graph_inputs})
            v.update(consts)
        mask = feed.get(mask_input) if mask_input else None
        n = batch_samples(feed)
        for spec, st in stats.items():
            if spec.kind in RNN_KINDS:
                tq = rnn_rows(spec, vals[1]) if cross else None
                st.add(rnn_rows(spec, vals[0]), mask, tq, n)
            else:
                tq = np.asarray(vals[1][spec.tensor]) if cross else None
                st.add(np.asarray(vals[0][spec.tensor]), mask, tq, n)
        for name, obs in observers.items():
            obs.update(vals[0][name])
        samples += n
        # (all of them: the loop variable v alone kept a batch's outputs alive through the next batch's run, which
        # doubled capture's peak memory from the second batch on)
        del vals, v
        if progress is not None:
            progress.update(n)
    free_scratch()  # (the chunk buffers of GramStats.chunks)
    return stats, samples
