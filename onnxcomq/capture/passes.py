"""The calibration pass: every batch runs once through the model (and, in sequential capture, through the partly
quantized twin), and each layer input is folded into its statistics. See docs/design.md, "Capture".
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import numpy as np
import onnx
from onnx import numpy_helper

from ..graph.layers import node_names
from ..graph.modelio import SESSION_FILE_BYTES, add_light, copy_fields, data_file, model_bytes, temp_folder
from .calib import batch_samples
from .carry import has_subgraphs
from .gram import LayerStats, to_host
from .rows import RNN_KINDS, free_scratch, rnn_rows, spec_tensors
from .session import capture_model, device_providers, make_session, run_on


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


@dataclasses.dataclass
class Twin:
    """The partly quantized twin of sequential capture, without a copy of the model: ``model`` whose initializers
    named in ``weights`` become ``weights[name].dequantized()`` where a stage's session reads them (a full twin
    was one more float copy of the model, every stage)."""

    model: onnx.ModelProto
    weights: dict


def stage_model(model: onnx.ModelProto, tensors: list, place=None, cut: list = (), replace: dict | None = None) \
        -> onnx.ModelProto:
    """A copy of ``model`` that outputs ``tensors`` only, without the nodes (and initializers) they do not depend
    on. Built field by field so that the initializers are copied once; with ``place`` (``modelio.data_file``), the
    large ones are not copied at all but written to that file and referenced as external data. ``cut``: graph
    inputs (ValueInfoProto) for tensors an earlier pass computed (``carry.py``); the nodes above them are left out.
    ``replace``: initializer name -> an object whose ``dequantized()`` array replaces it (``Twin``)."""
    m = onnx.ModelProto()
    copy_fields(model, m, skip="graph")
    copy_fields(model.graph, m.graph, skip="initializer")
    del m.graph.output[:]
    m.graph.input.extend(cut)
    subgraphs = has_subgraphs(m)
    if not subgraphs:  # (subgraphs read outer names implicitly: keep everything then)
        stop = {vi.name for vi in cut}
        need = set(tensors) - stop
        keep = []
        for n in reversed(m.graph.node):
            if any(o in need for o in n.output):
                keep.append(n)
                need.update(i for i in n.input if i and i not in stop)
        del m.graph.node[:]
        m.graph.node.extend(reversed(keep))
    used = {i for n in m.graph.node for i in n.input}
    kept = (t for t in model.graph.initializer if subgraphs or t.name in used)
    if not subgraphs:  # (IR < 4 lists every initializer as a graph input too: one left out would be required)
        dropped = {t.name for t in model.graph.initializer} - used
        if any(i.name in dropped for i in m.graph.input):
            keep_inputs = [i for i in m.graph.input if i.name not in dropped]
            del m.graph.input[:]
            m.graph.input.extend(keep_inputs)
    if replace:
        kept = (numpy_helper.from_array(replace[t.name].dequantized(), t.name) if t.name in replace else t
                for t in kept)
    if place is None:
        m.graph.initializer.extend(kept)
    else:
        add_light(kept, m.graph.initializer, place, STAGE_DATA)
    return capture_model(m, tensors, copy=False)


STAGE_DATA = "stage.data"


def stage_session(model, tensors: list, stack: contextlib.ExitStack, providers=None, cut: list = ()):
    """An onnxruntime session of ``stage_model(model, tensors, cut=cut)`` (no memory pattern); ``model`` a
    ModelProto or a ``Twin``. A model of ``SESSION_FILE_BYTES`` or more never gets a second copy in memory: the
    initializers the stage reads are written to a temporary folder, which ``stack`` keeps until the session is done
    with, and onnxruntime memory-maps them."""
    model, replace = (model.model, model.weights) if isinstance(model, Twin) else (model, None)
    if model_bytes(model) < SESSION_FILE_BYTES:
        return make_session(stage_model(model, tensors, cut=cut, replace=replace), providers, mem_pattern=False)
    folder = stack.enter_context(temp_folder())
    with data_file(os.path.join(folder, STAGE_DATA)) as place:
        m = stage_model(model, tensors, place, cut, replace)
    return make_session(m, providers, mem_pattern=False, folder=folder)


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
    """Split the layers (in graph order) into ``stages`` contiguous groups of about equal count, none starting at a
    depthwise conv (``Layer.depthwise``): such a boundary moves to the nearest other layer, by at most half a stage
    (the earlier one on a tie). A stage's entry layers correct the earlier stages' error, and a depthwise conv's
    output channel sees one input channel through a few taps, too few weights to correct it: it fits the
    calibration set instead (docs/experiments.md, "Stage boundaries")."""
    stages = max(1, min(stages, len(layers)))
    bounds = np.linspace(0, len(layers), stages + 1).round().astype(int)
    half = max(1, len(layers) // (2 * stages))
    for k in range(1, stages):
        b = bounds[k]
        if not layers[b].depthwise:
            continue
        near = [i for d in range(1, half + 1) for i in (b - d, b + d)
                if bounds[k - 1] < i < bounds[k + 1] and not layers[i].depthwise]
        if near:
            bounds[k] = near[0]
    return [layers[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def capture(model, twin, specs: dict, batches, progress=None, mask_input=None, fold_below: dict | None = None,
            total_samples: int = 0, observers: dict | None = None, xp=None, carry=None, group: int = 0,
            twin_carry=None, cross_specs=None) -> tuple:
    """Run every batch through ``model`` (and ``twin``, the partly quantized copy, when given) and return
    ({XSpec: LayerStats}, samples). ``specs``: XSpec -> groups; ``fold_below``: XSpec -> row threshold for folds.
    ``observers``: tensor name -> activation range observer (capture/observers.py), fed the float model's values of
    that tensor in the same pass. ``xp``: a device array module (CuPy) forms the Grams on the GPU, from onnxruntime
    outputs left in device memory where its CUDA provider runs the model (``session.run_on``); the
    statistics come back to the host at the end. ``carry`` (and ``twin_carry`` for the twin): a ``carry.Carry``
    (no observers): this is group ``group``'s pass, which starts from the tensors the earlier groups' passes stored
    and stores those later groups read. ``cross_specs`` (with ``twin``): the layer inputs that get cross
    statistics (the layers that may correct their input error); the others get G~ alone, from the twin (default:
    all get cross statistics)."""
    cross = twin is not None
    assert carry is None or not observers
    fold_below = fold_below or {}
    both = set(specs) if cross_specs is None or not cross else set(cross_specs)
    stats = {spec: LayerStats(spec, g, cross and spec in both, fold_below.get(spec, 0.0), total_samples, xp)
             for spec, g in specs.items()}
    graph_inputs = {i.name for i in model.graph.input}
    observers = observers or {}
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer
              if any(t.name == s.initial for s in specs if s.kind == "rnn_hidden")}  # a constant initial_h
    def tensors(specs) -> set:  # (what a run must output: graph inputs come with the feed, constants are known)
        return {t for s in specs for t in spec_tensors(s)} - graph_inputs - set(consts)

    fetch = sorted(tensors(specs))
    fetch_float = sorted(tensors(both) | (set(observers) - graph_inputs))
    carries = (carry, twin_carry) if cross else (carry,)
    pairs = [(m, _carried(f, c, group)) for m, f, c in zip((model, twin), (fetch_float, fetch), carries)]
    xp = xp or np
    providers = device_providers(xp)
    with contextlib.ExitStack() as stack:
        runs = [(stage_session(m, f, stack, providers, c.value_infos(group) if c else ()) if f else None, f, c)
                for (m, f), c in zip(pairs, carries)]
        samples = _stream(runs, stats, batches, graph_inputs, consts, observers, mask_input, cross, progress, xp,
                          group)
        del runs  # (the sessions before their files)
    for c in carries:
        if c is not None:
            c.done(group)
    for st in stats.values():
        st.to_host()
    free_scratch()  # (the chunk buffers of GramStats.chunks)
    return stats, samples


def _carried(fetch: list, carry, group: int) -> list:
    """A pass's session outputs with ``carry``: the stored tensors come in as graph inputs instead, and the
    tensors later groups read go out too."""
    if carry is None:
        return fetch
    return sorted((set(fetch) - set(carry.inputs[group])) | set(carry.outputs[group]))


def _stream(runs, stats, batches, graph_inputs, consts, observers, mask_input, cross, progress, xp, group) -> int:
    """capture's loop over the batches; returns the number of samples."""
    samples = 0
    for b, feed in enumerate(batches):
        vals = []
        for sess, f, carry in runs:
            stored = carry.load(group, b) if carry is not None else {}
            v = dict(zip(f, run_on(sess, f, {**feed, **stored} if stored else feed, samples, xp))) \
                if sess is not None else {}
            if carry is not None:
                v.update(stored)
                carry.store(group, b, v)
            vals.append(v)
            del stored, v
        for v in vals:
            v.update({k: a for k, a in feed.items() if k in graph_inputs})
            v.update(consts)
        mask = feed.get(mask_input) if mask_input else None
        n = batch_samples(feed)
        hosts = {}  # run index -> its values on the host (recurrent rows are built there), made once a batch
        for spec, st in stats.items():
            if st.cross:  # X from the float model, X~ from the twin
                x, xt = 0, 1
            else:  # X alone: the twin's input where there is a twin (a layer that does not correct fits X~)
                x, xt = (1 if cross else 0), None
            if spec.kind in RNN_KINDS:
                for k in (x, xt):
                    if k is not None and k not in hosts:
                        hosts[k] = {name: to_host(a) for name, a in vals[k].items()}
                st.add(rnn_rows(spec, hosts[x]), mask, rnn_rows(spec, hosts[xt]) if xt is not None else None, n)
            else:  # (GramStats places it: a row input's chunks in the Grams' array module, a conv's im2col on the host)
                st.add(vals[x][spec.tensor], mask, vals[xt][spec.tensor] if xt is not None else None, n)
        for name, obs in observers.items():
            obs.update(to_host(vals[0][name]))
        samples += n
        # (all of them: the loop variable v alone kept a batch's outputs alive through the next batch's run, which
        # doubled capture's peak memory from the second batch on)
        del vals, v, hosts
        if progress is not None:
            progress.update(n)
    return samples

