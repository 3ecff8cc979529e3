"""The calibration pass: every batch runs once through the model (and, in sequential capture, through the partly
quantized twin), and each layer input is folded into its statistics. See docs/design.md, "Capture".
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from ..graph.layers import node_names
from ..graph.modelio import copy_fields
from .calib import batch_samples
from .gram import LayerStats
from .rows import RNN_KINDS, free_scratch, rnn_rows, spec_tensors
from .session import capture_model, make_session, run_session


def collect_stats(model: onnx.ModelProto, specs: dict, batches, progress=None,
                  mask_input: str | None = None, observers: dict | None = None) -> tuple[dict, int]:
    """Run every calibration batch once and return ({XSpec: GramStats}, number of samples).

    ``specs`` maps XSpec -> number of groups. ``batches`` yields feed dicts. ``progress`` is a tqdm-like object (or
    None) advanced by the batch size. ``mask_input``: the name of the attention-mask input whose zeros mark padded
    token positions to leave out of the statistics. ``observers``: tensor name -> activation range observer
    (``capture/observers.py``), fed each batch's value of that tensor in the same pass. (The pipeline calls
    ``capture``, which also streams the cross statistics of sequential capture.)
    """
    stats, samples = capture(model, None, specs, batches, progress, mask_input, observers=observers)
    return {spec: st.part().x for spec, st in stats.items()}, samples


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


def split_stages(layers: list, stages: int) -> list:
    """Split the layers (in graph order) into ``stages`` contiguous groups of about equal count."""
    stages = max(1, min(stages, len(layers)))
    bounds = np.linspace(0, len(layers), stages + 1).round().astype(int)
    return [layers[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def capture(model, twin, specs: dict, batches, progress=None, mask_input=None, fold_below: dict | None = None,
            total_samples: int = 0, observers: dict | None = None) -> tuple:
    """Run every batch through ``model`` (and ``twin``, the partly quantized copy, when given) and return
    ({XSpec: LayerStats}, samples). ``specs``: XSpec -> groups; ``fold_below``: XSpec -> row threshold for folds.
    ``observers``: tensor name -> activation range observer (capture/observers.py), fed the float model's values of
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
