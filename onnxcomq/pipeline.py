"""The pipeline, orchestration only: read the graph -> capture statistics -> solve each layer -> write the QDQ model
-> check it against the float model (docs/design.md).

    model, report = onnxcomq.run("model.onnx", "calib.npz", onnxcomq.Recipe(weights=onnxcomq.Weights(bits=4)))
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import time

import numpy as np
import onnx
from onnx import numpy_helper

from . import progress as _progress
from .capture.calib import (
    Batch,
    Calibration,
    Feeds,
    KeepFirst,
    batch_samples,
    model_inputs,
    reiterable,
    resolve_mask_input,
)
from .capture.carry import Carry
from .capture.gram import check_stats
from .capture.memory import STATS_SHARE, choose_batch, fit_groups, layer_specs, memory_budget, peak_rss_mb
from .capture.passes import Twin, capture, split_stages, stage_entries
from .capture.session import capture_model, make_session, run_model, run_session
from .config import Recipe
from .errors import UserError
from .graph.batchnorm import fold_batch_norms
from .graph.branches import (
    LOOP_OPS,
    branch_model,
    drop_unread,
    find_branches,
    free_names,
    hoist_carried_constants,
    outer_constants,
    splice,
    with_iteration_outputs,
)
from .graph.layers import (
    RECURRENT_OPS,
    _subgraphs,
    check_weights,
    find_layers,
    lm_heads,
    load_weight,
    node_names,
    readers_of,
    weight_params,
    with_rnn_outputs,
)
from .graph.modelio import model_bytes, prepare_model
from .graph.rewrite import rewrite_to_matmul
from .precision import conv_taps, first_feeds, mixed_precision, parse_layer_bits, plan_layers
from .report import RNN_ROLE, LayerReport, Report, bits_summary, layer_row, merge_branch_reports, run_metadata
from .solve.backend import get_xp
from .solve.comq import on_sweep
from .solve.layer import quantize_layer
from .verify import VerificationError, float_outputs, problems, verify
from .verify import to_dicts as verify_dicts
from .verify import warnings as verify_warnings
from .workers import open_pool, solve_layer
from .write.activations import ActivationQuantizer, NoActivations
from .write.bias import apply as apply_bias
from .write.bias import bias_target, has_bias
from .write.matmulnbits import emit_matmulnbits
from .write.qdq import emit_qdq, opset_change, opset_of, quantized_twin, quantized_weight, set_metadata, upgrade_opset

log = logging.getLogger("onnxcomq")


def quantize(model_or_path, calibration, recipe: Recipe | None = None) -> onnx.ModelProto:
    """Quantize a float ONNX model (path or ModelProto) with COMQ; returns the QDQ ModelProto.

    ``calibration``: an .npz path (keys = input names), a folder of .npy/.npz, a dict of arrays, an iterable of
    feed dicts, an onnxruntime CalibrationDataReader, or "random" (smoke tests only).
    """
    return run(model_or_path, calibration, recipe)[0]


BRANCH_FEEDS_SHARE = 0.1  # the share of the memory budget the feeds of If branches and loop bodies may hold
ITERATIONS_PER_BATCH = 64  # the iterations of a Loop / Scan body that calibrate it, per calibration batch
PER_CHANNEL_OPSET = 13  # DequantizeLinear's axis (per-channel scales)
# onnxruntime implements some ops only from this opset on (Gemm-6: "Could not find an implementation"; "ONNX
# Runtime only *guarantees* support for models stamped with opset version 7 or above")
ORT_MIN_OPSET = 7


def run(model_or_path, calibration, recipe: Recipe | None = None, progress: bool = False,
        stats_cache: dict | None = None, _in_branch: bool = False):
    """Quantize and return ``(quantized ModelProto, Report)``.

    ``stats_cache``: a dict in which the float model's layer statistics (one-pass capture in one group) are kept and
    looked up by the layers' inputs and the samples, so that several recipes on one model and one calibration set
    capture once (benchmarks). Give it only with the same model and calibration data. (``_in_branch``: the run of an
    If branch's or a loop body's model, whose layer patterns may name layers elsewhere.)"""
    recipe = (recipe or Recipe()).validate()
    w, sv = recipe.weights, recipe.solver
    t_start = time.perf_counter()
    model = prepare_model(model_or_path)
    model, n_folded = fold_batch_norms(model)
    model, n_hoisted = hoist_carried_constants(model)  # (tf2onnx's loops carry their weights as loop values)
    if n_hoisted:
        log.info("%d constant(s) that a Loop or Scan carried through its body unchanged are read from the outer "
                 "scope instead", n_hoisted)
    float_opsets = onnx.ModelProto(opset_import=model.opset_import)  # (the report's input opset: the file's)
    if (recipe.activations is not None or opset_of(model) < ORT_MIN_OPSET) and \
            (w.max_opset is None or w.max_opset >= PER_CHANNEL_OPSET):
        # the output needs opset 13 (per-channel DequantizeLinear) anyway: converted now, so that the activation
        # placement is made on the graph it is written into (below 10 the converter replaces Upsample by Resize),
        # and so that onnxruntime runs the calibration passes of a model below the opsets it implements
        model = upgrade_opset(model, PER_CHANNEL_OPSET, "per-channel DequantizeLinear", w.max_opset)
    model = rewrite_to_matmul(model) if recipe.layers.rewrite_matmul else model
    layers, skipped = find_layers(model, op_types=tuple(recipe.layers.op_types), exclude=tuple(recipe.layers.exclude),
                                  lm_head_float=recipe.layers.lm_head == "float")
    branches = find_branches(model)  # (If branches, loop bodies that hold layers: each quantized on its own)
    why = "; ".join(f"{s.node}: {s.reason}" for s in skipped[:5]) or "it has no Conv, Gemm or MatMul node"
    if not layers and not branches:
        if _in_branch:
            return None, None  # (an If branch of no quantizable layer: it stays as it is)
        raise UserError(f"no quantizable layer found ({why})")
    check_weights(model, layers)
    _say_shared_readers(model, layers)
    calib = calibration if isinstance(calibration, Calibration) else Calibration(
        calibration, model_inputs(model), batch_size=recipe.data.batch_size, max_samples=recipe.data.max_samples,
        model=model)
    source = calib  # what the passes read: a one-shot source's batches kept as a list where it is read twice
    spliced, untaken = [], []
    if branches:
        if not reiterable(calib):
            source = list(calib)
        spliced, untaken = _quantize_branches(model, branches, source, recipe, progress)
    if not layers and not spliced:
        if _in_branch:
            return None, None
        names = ", ".join(f"{b.op} {b.node} {b.attr}" for b in untaken)
        raise UserError("no layer was quantized: " + (
            f"the If branches and loop bodies that hold layers were calibrated on no batch ({names})" if untaken
            else f"no quantizable layer found ({why})"))
    if not layers:
        return _branches_only(model, source, calib, recipe, (spliced, untaken), skipped, float_opsets, n_folded,
                              t_start, _in_branch)

    comq = w.method == "comq"
    official = recipe.is_official()
    damping = recipe.regularization.damping
    seq = recipe.sequential_capture()  # (None where it does not apply: activations, RTN, official)
    sequential = seq is not None and len(layers) > 1
    stages = split_stages(layers, seq.stages) if sequential else [layers]
    cross, folds = sequential, damping == "auto"
    # a size budget allocates its bits from every layer's float statistics at once: in the one pass, or in a float
    # pass before sequential stages (which then solve with those bits)
    allocate_first = recipe.mixed_precision is not None and sequential
    if (recipe.mixed_precision is None or sequential) and recipe.activations is None:  # (else: every layer at once)
        stages = fit_groups(stages, STATS_SHARE * memory_budget(recipe.data.max_memory), sequential, folds)
    budget, batch_note = choose_batch(with_rnn_outputs(model, layers), layers, calib, recipe.data.max_memory,
                                      cross=cross, folds=folds, groups=stages + [layers] if allocate_first else stages)
    mask_input = resolve_mask_input(model, recipe.data.mask_input)
    acts = None
    if recipe.activations is not None:
        try:
            acts = ActivationQuantizer(model, layers, recipe.activations, recipe.target, w.max_opset)
        except NoActivations:
            if not _in_branch:
                raise
            log.info("no activation to quantize in this If branch: its weights only")  # (e.g. an LSTM alone)
    model = acts.model if acts else model  # (every node named)
    heads = lm_heads(model, layers) if recipe.layers.lm_head == "int8" else ()
    # (a pattern may name a layer inside an If branch: checked against every layer once the branches are done)
    plan = plan_layers(layers, w, recipe.layers, heads, strict=not (branches or _in_branch))  # {weight: LayerPlan}
    batches = source
    # a one-shot source: its batches kept for the later passes (and a budget's sensitivity samples)
    if (len(stages) > 1 or recipe.mixed_precision is not None) and not reiterable(source):
        batches = list(source)
    held = []  # the first calibration samples, for the check of the output (kept as the first pass streams)
    if recipe.check.enabled:
        batches = KeepFirst(batches, held, calib, recipe.check.samples)
    xp = get_xp(sv.device)
    nodes = dict(zip(node_names(model), model.graph.node))
    inits = {t.name: t for t in model.graph.initializer}
    readers = readers_of(model.graph)
    free_bias = sv.bias_correction and comq
    qweights, reports, deltas, mp = [], [], {}, {}
    cap_model = with_rnn_outputs(model, layers)  # (recurrent nodes without a Y output get one for capture)
    t_capture = t_solve = 0.0
    peaks = {}
    total = calib.num_samples or 0
    unit = getattr(calib, "unit", "sample")  # (a loop body's run counts sample-iterations)
    ref = None  # the float model's outputs on the check's samples

    bar = _progress.bars(progress)

    solve_bar = None
    # the layers that may correct their input error (sequential capture): the float model's pass after the first
    # stage captures their inputs alone (cross statistics); the others fit the twin's input X~ and need only G~
    correction = seq.correction if sequential else "entry"
    entries = [stage_entries(model, stage) if correction == "entry" else
               {layer.node for layer in stage} if correction == "all" else set() for stage in stages]
    # (block-grid layers never correct: the block solver has no cross objective)
    cross_specs = [{spec for layer in stage if layer.node in entries[s] and plan[layer.weight].granularity != "block"
                    for _, spec in layer.consumers}
                   if sequential and s > 0 else set(layer_specs(stage)) for s, stage in enumerate(stages)]
    # each group's pass starts from the tensors the earlier passes stored (capture/carry.py)
    carry = twin_carry = None
    if acts is None:
        carry = Carry.for_groups(cap_model, cross_specs)
        twin_carry = Carry.for_groups(cap_model, [layer_specs(st) for st in stages], twin=True) \
            if sequential and carry is not None else None
    pool = open_pool(sv.workers) if sv.workers else None  # None: the solves run here, one after the other

    def captured(m, specs, desc, cacheable, fold_below=None, twin=None, **kw):
        """(stats, samples) of one pass of model ``m`` over ``batches``, looked up in / stored into ``stats_cache`` if
        ``cacheable`` (a float pass of one group: its statistics depend on the layers' inputs and the data only)."""
        key = (tuple(sorted(specs, key=repr)), total, mask_input, fold_below is not None)
        if cacheable and key in stats_cache:
            return stats_cache[key]
        with bar(total or None, desc, unit) as b:
            got = capture(m, twin, specs, batches, b, mask_input, fold_below, total, xp=xp, **kw)
        if cacheable:
            stats_cache[key] = got
        return got

    try:
        if allocate_first:  # the budget's bits from one float pass over every layer, then the sequential stages
            t0 = time.perf_counter()
            stats, samples = captured(cap_model, layer_specs(layers), "capture (bits)", stats_cache is not None)
            t_capture += time.perf_counter() - t0
            check_stats(stats, [i.name for i in model_inputs(model)])
            mp = mixed_precision(model, layers, stats, calib, recipe, plan, xp, bar, batches)
            del stats
        for s, stage in enumerate(stages):
            specs = layer_specs(stage)
            fold_below = {spec: recipe.regularization.few_rows * spec.fan_in for spec in specs} \
                if damping == "auto" else None
            t0 = time.perf_counter()
            twin = None
            if sequential and s > 0:  # (re-fitted biases change the graph: a full twin then)
                twin = quantized_twin(cap_model, qweights, apply_bias, deltas) if deltas else \
                    Twin(cap_model, {q.name: q for q in qweights})
            desc = "capture" if len(stages) == 1 else f"capture {s + 1}/{len(stages)}"
            # (not with groups: each group's pass stores what the next one reads)
            cacheable = stats_cache is not None and len(stages) == 1 and acts is None
            stats, samples = captured(cap_model, specs, desc, cacheable, fold_below, twin,
                                      observers=acts.observers if acts is not None else None, carry=carry, group=s,
                                      twin_carry=twin_carry, cross_specs=cross_specs[s])
            if acts is not None:  # activations upstream of a Log, a divisor...: judged by the error at that op
                acts.judge_sensitive(held or first_feeds(calib, recipe.check.samples), run_model)
            if acts is not None and recipe.activations.aware:  # G from the inputs the deployed layers see
                def second_pass(m, sp):
                    with bar(total or None, "capture (quantized activations)", unit) as b:
                        return capture(m, None, sp, calib, b, mask_input, None, total)
                stats = acts.aware_stats(specs, calib, second_pass)
            t_capture += time.perf_counter() - t0
            peaks["capture"] = peak_rss_mb()
            check_stats(stats, [i.name for i in model_inputs(model)])
            if recipe.mixed_precision is not None and not allocate_first:  # (one pass: every layer's statistics)
                mp = mixed_precision(model, layers, stats, calib, recipe, plan, xp, bar, batches)
            t0 = time.perf_counter()
            entry = entries[s]
            if solve_bar is None:
                solve_bar = bar(len(layers), "solve", "layer")
            sweeps = [0]

            def swept(bar=solve_bar):  # a long layer's solve advances the line: "solve: 3/50 layers [node: sweep 7]"
                sweeps[0] += 1
                bar.set_postfix_str(f"[{layer.node}: sweep {sweeps[0]}]", refresh=False)
                bar.update(0)

            jobs = []  # (layer, use_bias, damping, correct)
            for layer in stage:
                node = nodes[layer.consumers[0][0]]
                use_bias = free_bias and not official and len(layer.consumers) == 1 and \
                    layer.op_type not in RECURRENT_OPS and bias_target(node, inits) is None and \
                    has_bias(node, inits, readers, layer.out_channels * (
                        layer.groups if layer.op_type == "ConvTranspose" else 1))
                jobs.append((layer, use_bias, 0.0 if official else damping, layer.node in entry))
            results = None
            if pool is not None:  # the group's statistics shared once; each task loads its weight when submitted
                shared = {spec: pool.share(st) for spec, st in stats.items() if spec in specs}
                results = pool.map(solve_layer, (_task(recipe, plan, model, *job, shared) for job in jobs),
                                   [f"layer {job[0].node}" for job in jobs])
            for layer, use_bias, damp, correct in jobs:
                if results is None:
                    sweeps[0] = 0
                    with on_sweep(swept):
                        qw, delta, rep = _quantize(recipe, plan, model, layer, stats, xp, use_bias, damp, correct)
                else:
                    qw, delta, rep = _finish(layer, plan[layer.weight], *next(results))
                rep.stage = s
                qweights.append(qw)
                reports.append(rep)
                if delta is not None:
                    deltas[layer.consumers[0][0]] = delta
                solve_bar.update(1)
            results = shared = None
            t_solve += time.perf_counter() - t0
            peaks["solve"] = peak_rss_mb()
            del stats, twin
            if recipe.check.enabled and held and ref is None:  # (the float session before the quantized model)
                ref = float_outputs(model, held)
    except BaseException:
        if pool is not None:
            pool.close(kill=True)  # (the tasks still running are of no use now)
        raise
    finally:
        for c in (carry, twin_carry):
            if c is not None:
                c.close()
        if solve_bar is not None:
            solve_bar.close()
        if pool is not None:
            pool.close()

    meta = run_metadata(recipe, official, bool(deltas), samples, mask_input, len(stages) if sequential else 1,
                        acts.metadata() if acts is not None else None)
    # What the float model is still needed for, taken now: a model loaded, folded or rewritten here is edited in
    # place into the quantized one (a language model then never has its embeddings and lm_head twice)
    float_bytes = model_bytes(model)
    if recipe.check.enabled and ref is None:
        held = held or first_feeds(calib, recipe.check.samples)  # (no calibration pass ran: stats_cache)
        ref = float_outputs(model, held)
    mine = model is not model_or_path and acts is None
    del nodes, inits, readers, cap_model  # (references into the model)
    out = apply_bias(model, deltas) if deltas else model
    owned = out is not model or mine  # the emitters may edit it in place (saves a copy of a large model)
    nbits = [q for q in qweights if plan[q.name].format == "matmulnbits"]
    if nbits:
        out, owned = emit_matmulnbits(out, nbits, w.nbits_accuracy_level, inplace=owned), True
    rest = [q for q in qweights if plan[q.name].format != "matmulnbits"]
    rest = acts.weight_storage(rest) if acts is not None else rest
    out = emit_qdq(out, rest, meta, inplace=owned, max_opset=w.max_opset) if rest \
        else set_metadata(out, meta, copy=not owned)
    if acts is not None:
        out = acts.insert(out)
    out = _splice_branches(model, out, spliced, w.max_opset)
    # (after the metadata: the report's only)
    meta["opset"] = opset_change(float_opsets, out, w.max_opset)
    meta["batch_norms_folded"] = n_folded
    meta.update(batch_size=calib.batch_size, max_memory=budget, batch_choice=batch_note, groups=len(stages))
    report = Report(reports, [dataclasses.asdict(s) for s in skipped], meta, samples, t_capture, t_solve)
    report.recipe = recipe.to_dict()
    merge_branch_reports(report, spliced, untaken, weight_params(model))
    bits_summary(report, w.max_opset)
    if branches and not _in_branch:
        _check_patterns(recipe, report)
    report.mixed_precision = mp
    peaks["emit"] = peak_rss_mb()
    report.peak_rss_mb = peaks
    report.total_seconds = time.perf_counter() - t_start
    report.float_bytes = float_bytes
    report.quant_bytes = model_bytes(out)
    _check(model, out, report, recipe, held, ref, acts)
    return out, report


def _check(model, out, report, recipe: Recipe, held: list, ref, acts) -> None:
    """The check of the quantized model's outputs against the float model's (``ref``, on ``held``): in the report;
    raises VerificationError where it fails."""
    if recipe.check.enabled:
        t0 = time.perf_counter()
        checks, n = verify(model, out, held, ref, kernels=recipe.target == "ort")
        report.verification = {"samples": n, "outputs": verify_dicts(checks)}
        report.total_seconds += time.perf_counter() - t0
        for line in verify_warnings(checks):
            log.warning(line)
        bad = problems(checks)
        if bad:
            hint = ""
            if acts is not None:  # name the activations that alone move the outputs most
                worst, probed, total = acts.culprits(held, run_model)
                report.verification["culprits"] = [{"tensor": t, "rel_sq_error": e} for t, e in worst]
                report.verification["culprits_probed"] = [probed, total]
                hint = "; the activations whose quantization alone moves the outputs most" + (
                    f" (of the first {probed} of {total}, all the time allowed)" if probed < total else "") + \
                    ": " + ", ".join(f"{t} ({e:.3g})" for t, e in worst) + \
                    " (a recipe's activations.exclude keeps them float; or quantize weights only)"
            raise VerificationError(f"the quantized model failed its check on {n} calibration sample(s): "
                                    f"{'; '.join(bad)}", out, report, hint)


def _quantize_branches(model, branches: list, batches, recipe: Recipe, progress: bool) -> tuple:
    """Quantize each If branch and Loop / Scan body of ``branches`` as a model of its own (graph/branches.py),
    calibrated on the outer tensors it reads, computed by the float model on the batches for which its If takes it,
    and, for a body, on its own inputs at each iteration. Returns [(Branch, quantized model, its Report, the outer
    constants copied in)] for those calibrated on some batch, and the others (each with its ``left`` reason)."""
    inits = {t.name: t for t in model.graph.initializer}
    inputs = {i.name for i in model.graph.input}
    consts_outer = outer_constants(model)
    reads = list(dict.fromkeys([b.cond for b in branches if b.cond] + [n for b in branches for n in b.reads]))
    fetch = [n for n in reads if n not in inits and n not in inputs]
    consts = {n: numpy_helper.to_array(inits[n]) for n in reads if n in inits}
    untaken = []
    try:
        sess, fetch_all, vals0 = _branch_session(model, branches, fetch, batches, inputs)
    except UserError as e:  # (a body whose inputs change shape between iterations cannot be stacked)
        bodies = [b for b in branches if b.op in LOOP_OPS]
        if not bodies:
            raise
        for b in bodies:
            log.warning("%s: its inputs could not be captured at each iteration (%s): its layers stay float",
                        b.where, e)
            b.left = f"inside the {b.attr} of {b.op} {b.node}, whose inputs could not be captured at each " \
                "iteration: left float"
        untaken += bodies
        branches = [b for b in branches if b.op not in LOOP_OPS]
        if not branches:
            return [], untaken
        sess, fetch_all, vals0 = _branch_session(model, branches, fetch, batches, inputs)
    # a first pass: which branch each batch takes (and the outer constants computed at run time). The feeds are
    # kept while they fit a tenth of the memory budget (silero-vad's: 2 MB); past it they are computed again at
    # each pass of a branch's run (_BranchFeeds), as capture streams: one batch in memory
    count = {id(b): [0, 0, None, 0] for b in branches}  # feeds' samples, largest feed, first feed, batches' samples
    kept: dict | None = {id(b): [] for b in branches}
    room = BRANCH_FEEDS_SHARE * memory_budget(recipe.data.max_memory)
    total = 0
    with _progress.bars(progress)(getattr(batches, "num_samples", None), "capture (If and loop inputs)",
                                  "sample") as bar:
        for batch in batches:
            vals = vals0 if total == 0 else _outer_values(sess, fetch_all, batch, inputs)
            for n in fetch:
                if n in consts_outer and n not in consts:
                    consts[n] = vals[n]
            for b in branches:
                subs = _branch_feeds(b, vals, consts, batch)
                count[id(b)][3] += batch_samples(batch) if subs else 0
                for sub in subs:
                    c = count[id(b)]
                    c[0], c[1] = c[0] + sub.samples, max(c[1], sub.samples)
                    c[2] = sub if c[2] is None else c[2]
                    if kept is not None:
                        kept[id(b)].append(sub)
                        room -= sum(np.asarray(v).nbytes for v in sub.values())
                        kept = kept if room >= 0 else None
            total += 1
            bar.update(batch_samples(batch))
    out = []
    for b in branches:
        samples, largest, first, seen = count[id(b)]
        if not samples:
            if b.op == "If":
                log.warning("If %s: its %s was taken on none of the %d calibration batches: its layers stay float",
                            b.node, b.attr, total)
                b.left = f"inside the {b.attr} of If {b.node}, which no calibration batch took (its condition " \
                    f"{b.cond} was {b.attr == 'else_branch'} on every batch): left float"
            else:
                log.warning("%s %s ran no iteration on the %d calibration batches: its layers stay float", b.op,
                            b.node, total)
                b.left = f"inside the body of {b.op} {b.node}, which ran no iteration on the calibration batches: " \
                    "left float"
            untaken.append(b)
            continue
        mine = {n: consts[n] for n in b.reads if n in consts}
        log.info("%s quantized on its own, on %d calibration %s", b.where, samples,
                 "samples that take it" if b.op == "If" else "sample-iterations")
        feeds = Feeds(kept[id(b)] if kept is not None else
                      _BranchFeeds(sess, [n for n in fetch_all if n not in consts], batches, inputs, consts, b),
                      b.where, samples, largest, "sample" if b.op == "If" else "sample-iteration")
        try:
            q, rep = run(branch_model(model, b, first, mine), feeds, _branch_recipe(recipe, f"{b.node}/{b.attr}/"),
                         progress, _in_branch=True)
        except VerificationError as e:  # (the whole model's check judges it, --write-unverified included)
            log.warning("%s: %s; the whole model's check decides", b.where, e.problem)
            q, rep = e.model, e.report
        except UserError as e:
            if b.op == "If":
                raise UserError(f"{b.where}: {e}") from None
            # (a body run on its own inputs can fail where the model does not: a sequence it reads, started empty)
            log.warning("%s: quantized on its own, it fails (%s): its layers stay float", b.where, e)
            b.left = f"inside the body of {b.op} {b.node}, which failed to run on its own: left float"
            untaken.append(b)
            continue
        if q is not None:  # (None: no quantizable layer inside after all, e.g. MatMuls of two activations)
            rep.samples = seen  # (calibration samples, not a body's sample-iterations)
            out.append((b, q, rep, mine))
    return out, untaken


def _branch_session(model, branches: list, fetch: list, batches, inputs: set) -> tuple:
    """The float model's session that computes what the branches read (a body's inputs stacked over its
    iterations too), the names it fetches, and its values on the first calibration batch (a body whose inputs
    cannot be stacked fails there)."""
    bodies = [b for b in branches if b.op in LOOP_OPS]
    base = with_iteration_outputs(model, bodies) if bodies else model
    fetch_all = fetch + [n for b in bodies for n in b.stacked if n]
    sess = make_session(capture_model(base, fetch) if fetch else base, what="the float model (If and loop inputs)")
    first = next(iter(batches), None)
    return sess, fetch_all, (_outer_values(sess, fetch_all, first, inputs) if first is not None else {})


class _BranchFeeds:
    """The feeds of one If branch or loop body, computed again by the float model at every pass over the
    calibration batches."""

    def __init__(self, sess, fetch: list, batches, inputs: set, consts: dict, branch):
        self.sess, self.batches, self.inputs, self.consts, self.branch = sess, batches, inputs, consts, branch
        mine = set(branch.reads) | {branch.cond} | {n for n in branch.stacked if n}
        self.fetch = [n for n in fetch if n in mine]

    def __iter__(self):
        for batch in self.batches:
            yield from _branch_feeds(self.branch, _outer_values(self.sess, self.fetch, batch, self.inputs),
                                     self.consts, batch)


def _outer_values(sess, fetch: list, batch, inputs: set) -> dict:
    """The float model's tensors ``fetch`` on one calibration batch, and the batch's graph inputs."""
    vals = dict(zip(fetch, run_session(sess, fetch, batch, what="onnxruntime cannot run the float model")
                    if fetch else []))
    vals.update((k, v) for k, v in batch.items() if k in inputs)
    return vals


def _branch_feeds(b, vals: dict, consts: dict, batch) -> list:
    """The feeds of branch ``b`` on a batch (the outer tensors it reads): none where its If takes the other; for a
    body, one per iteration (its own inputs at that iteration), at most ``ITERATIONS_PER_BATCH`` evenly spaced."""
    outer = {n: vals[n] for n in b.reads if n not in consts}
    if b.op == "If":
        cond = np.asarray(consts[b.cond] if b.cond in consts else vals[b.cond])
        if cond.size != 1:
            raise UserError(f"If {b.node}: its condition {b.cond} has {cond.size} elements on a calibration batch, "
                            "expected 1")
        if bool(cond.reshape(-1)[0]) != (b.attr == "then_branch"):
            return []
        steps, stacks = [None], []
    else:
        stacks = [(f, np.asarray(vals[n])) for f, n in zip(b.formals, b.stacked) if n]
        n = stacks[0][1].shape[0] if stacks and stacks[0][1].ndim else 0
        steps = np.unique(np.linspace(0, n - 1, ITERATIONS_PER_BATCH).round().astype(int)) \
            if n > ITERATIONS_PER_BATCH else range(n)
    out = []
    for t in steps:
        sub = Batch(outer)
        sub.update((f, np.array(s[t])) for f, s in stacks)  # (copies: a kept feed holds its iteration only)
        sub.samples = batch_samples(batch)
        out.append(sub)
    return out


def _branch_recipe(recipe: Recipe, prefix: str) -> Recipe:
    """The recipe of a branch's run: the run's, with the layer patterns that name its nodes as the report does
    (``If/branch/node``) cut to the names inside it."""
    def local(p):
        return p[len(prefix):] if isinstance(p, str) and p.startswith(prefix) else p
    L = recipe.layers
    bits = tuple(local(x) if isinstance(x, str) else (local(x[0]), x[1]) for x in L.layer_bits)
    layers = dataclasses.replace(L, exclude=tuple(map(local, L.exclude)), keep_8bit=tuple(map(local, L.keep_8bit)),
                                 layer_bits=bits)
    return dataclasses.replace(recipe, layers=layers)


def _check_patterns(recipe: Recipe, report: Report) -> None:
    """Each keep_8bit / layer_bits pattern of a model with If branches or loop bodies matched a quantized layer
    somewhere (the runs of the branches and of the top level each see only their own layers)."""
    L = recipe.layers
    rows = report.layers
    for pat, flag in [(p, "layers.keep_8bit") for p in L.keep_8bit] + \
            [(p, "layers.layer_bits") for p, _ in parse_layer_bits(L.layer_bits)]:
        if pat in ("first", "last", "depthwise") and rows:
            continue
        if not any(fnmatch.fnmatchcase(n, pat) for r in rows for n in (r.node, r.node.rsplit("/", 1)[-1], r.op_type)):
            raise UserError(f"{flag} {pat!r} matches no quantized layer (names are node names or op types, or "
                            "'first'/'last'; inside an If branch or a loop body as the report names them, "
                            "If/then_branch/node, Loop/body/node)")


def _splice_branches(model, out, spliced: list, max_opset):
    """``out`` with each quantized branch in place of its float one (and the float weights only they read gone)."""
    if not spliced:
        return out
    need = max(opset_of(q) for _, q, _, _ in spliced)
    if opset_of(out) < need:
        out = upgrade_opset(out, need, "the quantized If branches", max_opset)
    domains = {o.domain: o for o in out.opset_import}
    for _, q, _, _ in spliced:
        for o in q.opset_import:
            if o.domain not in domains:
                out.opset_import.append(o)
                domains[o.domain] = o
    for b, q, _, consts in spliced:
        splice(out, b, q, consts)
    drop_unread(out, {n for b, *_ in spliced for n in b.reads})
    return out


def _branches_only(model, source, calib, recipe: Recipe, spliced: list, skipped: list, float_opsets, n_folded: int,
                   t_start: float, _in_branch: bool):
    """A model whose layers are all inside If branches: the branches quantized, the rest as it was, checked."""
    held = first_feeds(calib, recipe.check.samples, source) if recipe.check.enabled else []
    ref = float_outputs(model, held) if held else None
    spliced, untaken = spliced
    samples = max((rep.samples for _, _, rep, _ in spliced), default=0)
    meta = run_metadata(recipe, recipe.is_official(), any(L.bias_corrected for _, _, rep, _ in spliced
                                                         for L in rep.layers), samples, None, 1, None)
    float_bytes = model_bytes(model)
    out = set_metadata(model, meta, copy=True)
    out = _splice_branches(model, out, spliced, recipe.weights.max_opset)
    meta["opset"] = opset_change(float_opsets, out, recipe.weights.max_opset)
    meta["batch_norms_folded"] = n_folded
    report = Report([], [dataclasses.asdict(s) for s in skipped], meta, samples,
                    sum(rep.capture_seconds for _, _, rep, _ in spliced),
                    sum(rep.solve_seconds for _, _, rep, _ in spliced))
    report.recipe = recipe.to_dict()
    merge_branch_reports(report, spliced, untaken, weight_params(model))
    bits_summary(report, recipe.weights.max_opset)
    if not _in_branch:
        _check_patterns(recipe, report)
    report.total_seconds = time.perf_counter() - t_start
    report.float_bytes = float_bytes
    report.quant_bytes = model_bytes(out)
    _check(model, out, report, recipe, held, ref, None)
    return out, report


def _say_shared_readers(model, layers) -> None:
    """A warning for each quantized weight that nodes other than its layers read (a language model's embedding
    table tied to its lm_head: the lookup then reads the quantized table)."""
    readers: dict = {}
    for name, n in zip(node_names(model), model.graph.node):
        if n.op_type not in ("Shape", "Size"):
            # (an If branch or a loop body reads outer names too: a body left float then reads the quantized weight)
            for i in set(n.input) | {f for _, g in _subgraphs(n) for f in free_names(g)}:
                readers.setdefault(i, []).append((name, n.op_type))
    for layer in layers:
        mine = {c for c, _ in layer.consumers}
        others = [f"{op} {name}" for name, op in readers.get(layer.weight, []) if name not in mine]
        if others:
            log.warning("weight %s of %s is also read by %s: %s the quantized weight (tied weights)", layer.weight,
                        layer.node, ", ".join(others), "they read" if len(others) > 1 else "it reads")


def _quantize(recipe: Recipe, plan: dict, model, layer, stats: dict, xp, use_bias: bool, damping, correct: bool):
    """One layer: its weight matrices and statistics to quantize_layer; returns the result in the weight's layout
    (QuantizedWeight), the bias change, and the report row."""
    t0 = time.perf_counter()
    mats, policy, fan_in, *consumers = _task(recipe, plan, model, layer, use_bias, damping, correct, stats)
    res = quantize_layer(mats, consumers, policy, fan_in, xp)
    return _finish(layer, plan[layer.weight], res, time.perf_counter() - t0)


def _task(recipe: Recipe, plan: dict, model, layer, use_bias: bool, damping, correct: bool, stats: dict) -> tuple:
    """What one layer's solve needs: (weight matrices, LayerPolicy, fan-in, statistics of each consumer)."""
    lp = plan[layer.weight]
    policy = recipe.layer_policy(lp.bits, lp.granularity, conv_taps(layer), use_bias, damping, correct)
    mats = layer.to_matrices(load_weight(model, layer.weight))
    return (mats, policy, layer.x.fan_in, *[stats[spec] for _, spec in layer.consumers])


def _finish(layer, lp, res, seconds: float):
    """A layer's LayerResult as (QuantizedWeight, bias change, report row)."""
    if layer.op_type in RECURRENT_OPS and res.input_energy == 0:
        log.warning("%s: weight %s (%s) read zeros in every calibration row (e.g. R, with one-step sequences from "
                    "a zero initial state): rounded to nearest", layer.node, layer.weight, RNN_ROLE[layer.x.kind])
    return quantized_weight(layer, res), res.bias_delta, layer_row(layer, res, lp, seconds)


__all__ = ["Recipe", "Report", "LayerReport", "VerificationError", "quantize", "run"]
