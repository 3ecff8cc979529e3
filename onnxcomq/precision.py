"""Per-layer weight precision: manual overrides (``layers.keep_8bit``, ``layers.layer_bits``) and mixed precision by measured
sensitivity under an average-bits budget (``--avg-bits``).

Allocation (``allocate``): every free layer starts at the base bits; an upgrade of layer L from b to b' costs
(b' - b) * params_L bits of the budget and gains D_L(b) - D_L(b'), where D_L(b) is the predicted end-to-end
distortion when L alone is quantized to b bits. Upgrades are taken greedily by gain per extra bit (for each layer its
best-ratio upgrade among the candidate bits) while the budget allows. Two distortion models:

- "layer": D_L(b) = relerr_L(b), the layer's relative output error ||X (W - Q)^T||^2 / ||X W^T||^2 (from the captured
  G; no forward pass). It treats every layer's output as equally important.
- "output" (default): D_L(b) = s_L * relerr_L(b) with s_L = the measured relative output error of the *model*
  ||y_L - y||^2 / ||y||^2 (all model outputs, a few calibration samples) when only layer L's weight is replaced by
  its base-bits quantization, divided by relerr_L(base). s_L is how strongly L's output error reaches the model's
  output (one forward pass per layer); relerr_L(b) scales it to the other candidate bits.
"""

from __future__ import annotations

import fnmatch
import logging
import re
import time
from dataclasses import dataclass

import numpy as np
import onnx

from .capture.calib import batch_samples
from .errors import UserError
from .graph.layers import RECURRENT_OPS, load_weight
from .solve.comq import objective
from .solve.layer import relative_error, solve_groups

NBITS_BITS = (2, 4, 8)  # bits com.microsoft MatMulNBits accepts


def parse_layer_bits(items) -> tuple:
    """["PATTERN=BITS", ...] (CLI) or [(pattern, bits)] -> ((pattern, bits), ...), validated."""
    out = []
    for it in items:
        if isinstance(it, str):
            pat, sep, b = it.rpartition("=")
            if not sep or not pat or not re.fullmatch(r"\s*\d+\s*", b):
                raise UserError(f"layers.layer_bits {it!r}: expected PATTERN=BITS, e.g. '*classifier*=8'")
            it = (pat, int(b))
        pat, b = it
        if not isinstance(b, (int, np.integer)) or not 2 <= int(b) <= 8:
            raise UserError(f"layers.layer_bits {pat}={b}: bits must be an integer in 2..8")
        out.append((str(pat), int(b)))
    return tuple(out)


def _match(pattern: str, layer, index: int, count: int) -> bool:
    if pattern == "first":
        return index == 0
    if pattern == "last":
        return index == count - 1
    if pattern == "depthwise":
        return layer.depthwise
    names = [layer.node] + [c for c, _ in layer.consumers]
    return any(fnmatch.fnmatchcase(n, pattern) for n in names) or fnmatch.fnmatchcase(layer.op_type, pattern)


def fixed_bits(layers, base: int, keep_8bit=(), layer_bits=(), strict: bool = True) -> dict:
    """{weight: (bits, why)} for the layers a user pinned: ``keep_8bit`` patterns ("first"/"last" = the first/last
    quantized layer in topological order, "depthwise" = depthwise convs, else fnmatch on node names or op types)
    get 8 bits, then ``layer_bits`` (pattern, bits) pairs in order (a later match wins). A pattern matching no
    layer is an error where ``strict`` (a model with If branches checks its patterns against every layer, branches
    included: pipeline._check_patterns)."""
    out = {}
    n = len(layers)
    rules = [(p, 8, "layers.keep_8bit") for p in keep_8bit] + [(p, b, "layers.layer_bits") for p, b in layer_bits]
    for pat, bits, flag in rules:
        hit = [L for i, L in enumerate(layers) if _match(pat, L, i, n)]
        if not hit and strict:
            raise UserError(f"{flag} {pat!r} matches no quantized layer (names are node names or op types, or "
                            "'first'/'last')")
        for L in hit:
            out[L.weight] = (bits, f"{flag} {pat}")
    return out


def average_bits(bits: dict, params: dict) -> float:
    """Parameter-weighted mean bits."""
    total = sum(params.values())
    return sum(bits[w] * params[w] for w in params) / total if total else 0.0


def allocate(params: dict, dist: dict, base: int, budget: float, fixed: dict) -> dict:
    """Greedy allocation. params: {weight: count}; dist: {weight: {bits: predicted distortion}} for the free layers
    (including ``base``); fixed: {weight: bits}. Returns {weight: bits} for every layer, with the parameter-weighted
    mean <= budget (when the fixed layers alone leave room)."""
    bits = {w: fixed.get(w, base) for w in params}
    total = sum(params.values())
    room = budget * total - sum(bits[w] * params[w] for w in params)
    free = [w for w in params if w not in fixed]
    while room > 0:
        best = None
        for w in free:
            cur = bits[w]
            for b, d in dist[w].items():
                cost = (b - cur) * params[w]
                if b <= cur or cost > room + 1e-9:
                    continue
                ratio = (dist[w][cur] - d) / cost
                if ratio > 0 and (best is None or ratio > best[0]):
                    best = (ratio, w, b, cost)
        if best is None:
            break
        _, w, b, cost = best
        bits[w] = b
        room -= cost
    return bits


def with_weights_as_inputs(model: onnx.ModelProto, names) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers ``names`` are also graph inputs, so a session can be fed other values."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    # (below IR 4 every initializer is listed as an input and onnxruntime takes them as constants: at IR 4 a
    # listed initializer is an input with a default)
    out.ir_version = max(out.ir_version, 4)
    inits = {t.name: t for t in out.graph.initializer}
    have = {i.name for i in out.graph.input}
    for n in names:
        if n not in have:
            t = inits[n]
            out.graph.input.append(onnx.helper.make_tensor_value_info(n, t.data_type, list(t.dims)))
    return out


def output_sensitivity(model: onnx.ModelProto, feeds: list, perturbed: dict, progress=None) -> dict:
    """{weight: relative output error of the model} with only that weight replaced by ``perturbed[weight]`` (the
    stored layout), on the calibration batches ``feeds``: sum over outputs and samples of ||y' - y||^2 / ||y||^2."""
    from .capture.session import make_session, run_session

    sess = make_session(with_weights_as_inputs(model, list(perturbed)))
    ref = [run_session(sess, None, f) for f in feeds]
    den = sum(float(np.sum(np.square(o, dtype=np.float64))) for outs in ref for o in outs)
    out = {}
    for w, value in perturbed.items():
        num = 0.0
        for f, outs in zip(feeds, ref):
            got = run_session(sess, None, {**f, w: value})
            num += sum(float(np.sum(np.square(a.astype(np.float64) - b))) for a, b in zip(got, outs))
        out[w] = num / den if den > 0 else 0.0
        if progress is not None:
            progress.update(1)
    return out


def first_feeds(calib, samples: int, batches=None) -> list:
    """The calibration batches holding the first ``samples`` samples (of ``batches``, where given: the run's
    batches, which a one-shot source leaves behind as a list)."""
    feeds, n = [], 0
    for feed in calib if batches is None else batches:
        feeds.append(calib.head(feed, samples - n))  # (a fixed batch is taken whole)
        n += batch_samples(feeds[-1])
        if n >= samples:
            break
    return feeds


__all__ = ["parse_layer_bits", "fixed_bits", "allocate", "average_bits", "output_sensitivity", "NBITS_BITS"]


def layer_grams(layer, stats) -> list:
    """The layer's Gram per group (summed over the consumers of a shared weight)."""
    return [sum(stats[spec].stats(k)[0] for _, spec in layer.consumers) for k in range(layer.groups)]


def mixed_precision(model, layers, stats, calib, recipe, plan: dict, xp, make_bar, batches=None) -> dict:
    """Choose the bits of the layers no pattern pinned (``plan`` is updated) under the recipe's
    ``mixed_precision.avg_bits``; ``make_bar(total, desc, unit)`` makes a progress bar (or None); ``batches``: the
    run's calibration batches (default: ``calib``'s), whose first samples measure the output sensitivity. Returns
    what the report shows. The layer errors come from the captured G (plain, uncentered: the perturbed model of the
    output sensitivity has no bias re-fit either), the same solver as the final solve (COMQ or RTN)."""
    mp = recipe.mixed_precision
    t0 = time.perf_counter()
    pinned = {L.weight for L in layers if plan[L.weight].pinned}
    free = [L for L in layers if L.weight not in pinned]
    params = {L.weight: int(np.prod(L.weight_shape)) for L in layers}
    cands = sorted({recipe.weights.bits, *mp.candidates})
    relerr, base_w = {}, {}
    n_solve = len(cands) if mp.estimate == "solve" else 1
    bar = make_bar(total=len(free) * n_solve, desc="bits", unit="solve")
    for L in free:
        mats = L.to_matrices(load_weight(model, L.weight))
        grams = layer_grams(L, stats)
        dt = np.float64 if recipe.solver.dtype == "float64" else np.float32
        den = sum(objective(Wk.astype(dt), np.zeros_like(Wk, dt), Gk.astype(dt)) for Wk, Gk in zip(mats, grams))
        relerr[L.weight] = {}
        for b in cands if mp.estimate == "solve" else [recipe.weights.bits]:
            rtns, comqs = solve_groups(xp, mats, grams, grams,
                                        recipe.solver_config(b, plan[L.weight].granularity, taps=conv_taps(L)), dt,
                                        recipe.weights.method == "comq")
            res = comqs if comqs is not None else rtns
            relerr[L.weight][b] = relative_error(sum(r.objective for r in res), den)
            if b == recipe.weights.bits:
                base_w[L.weight] = L.from_matrices([r.qweight for r in res]).astype(
                    np.float16 if L.float16 else np.float32)
            if bar is not None:
                bar.update(1)
        for b in cands:  # "scaling": the quantization noise model, error x 4 per bit fewer
            relerr[L.weight].setdefault(b, relerr[L.weight][recipe.weights.bits] * 4.0 ** (recipe.weights.bits - b))
    if bar is not None:
        bar.close()
    sens = {w: 1.0 for w in relerr}
    if mp.sensitivity == "output" and free:
        bar = make_bar(total=len(free), desc="sensitivity", unit="layer")
        out_err = output_sensitivity(model, first_feeds(calib, mp.samples, batches), base_w, bar)
        if bar is not None:
            bar.close()
        sens = {w: out_err[w] / relerr[w][recipe.weights.bits] if relerr[w][recipe.weights.bits] > 0 else 0.0 for w in relerr}
    dist = {w: {b: sens[w] * e for b, e in relerr[w].items()} for w in relerr}
    bits = allocate(params, dist, recipe.weights.bits, mp.avg_bits, {w: plan[w].bits for w in pinned})
    if average_bits(bits, params) > mp.avg_bits + 1e-9:
        logging.getLogger("onnxcomq").warning(
            f"mixed_precision.avg_bits {mp.avg_bits}: the layers pinned by layers.keep_8bit/layer_bits alone average "
            f"{average_bits(bits, params):.2f} bits; no layer was raised")
    for L in free:
        if bits[L.weight] != recipe.weights.bits:
            plan[L.weight].bits = bits[L.weight]
            note = f"mixed precision: {bits[L.weight]} bits"
            plan[L.weight].note = "; ".join(x for x in (plan[L.weight].note, note) if x)
    return {"budget": mp.avg_bits, "achieved": average_bits(bits, params), "candidates": cands,
            "sensitivity": mp.sensitivity, "estimate": mp.estimate,
            "seconds": time.perf_counter() - t0,
            # (a recurrent node has two layers, W and R: named with their weight)
            "layers": {(f"{L.node} [{L.weight}]" if L.op_type in RECURRENT_OPS else L.node): {
                "bits": bits[L.weight], "params": params[L.weight], "sensitivity": sens[L.weight],
                "relerr": {str(b): e for b, e in relerr[L.weight].items()}} for L in free}}


def conv_taps(layer) -> int:
    return int(np.prod(layer.weight_shape[2:])) if layer.base == "Conv" else 1


def block_unsupported(layer, block: int) -> str:
    """Why ``layer`` cannot have block scales along its input channels ("" if it can)."""
    if layer.base in ("MatMul", "Gemm"):
        return ""
    if layer.base != "Conv":
        return f"block granularity is not implemented for {layer.op_type}"
    if layer.groups > 1:
        return "block granularity is not implemented for grouped/depthwise convs"
    ch = layer.weight_shape[1]
    if conv_taps(layer) > 1 and ch % block:
        return f"a {'x'.join(map(str, layer.weight_shape[2:]))} conv needs its {ch} input channels to be a " \
               f"multiple of the block size {block}"
    return ""


@dataclass
class LayerPlan:
    """One layer's precision and format, decided before calibration (mixed precision may raise ``bits``)."""

    bits: int
    granularity: str  # channel | tensor | block (a layer block granularity cannot take falls back to channel)
    format: str  # qdq | matmulnbits
    note: str  # why this layer differs from the run's settings (the report's note)
    pinned: bool  # bits set by keep_8bit / layer_bits (mixed precision leaves it alone)


def plan_layers(layers, weights, choice, heads=(), strict: bool = True) -> dict:
    """{weight: LayerPlan} before mixed precision, from the recipe's ``weights`` and ``layers`` sections (``choice``):
    pinned bits, the Conv fallback of block granularity, and MatMulNBits only for MatMul and Gemm weights (the other
    layers stay DequantizeLinear). ``heads``: the nodes of a language model's output projection kept at 8 bits."""
    fixed = {L.weight: (8, "layers.lm_head int8") for L in layers if L.node in heads}
    fixed.update(fixed_bits(layers, weights.bits, choice.keep_8bit, parse_layer_bits(choice.layer_bits), strict))
    plan = {}
    for L in layers:
        bits, why = fixed.get(L.weight, (weights.bits, ""))
        gran, fmt, notes = weights.granularity, "qdq", [why] if why else []
        if gran == "tensor" and L.op_type in RECURRENT_OPS and L.groups > 1:  # (before any capture)
            raise UserError(f"{L.node}: per-tensor granularity is not supported for a bidirectional {L.op_type} "
                            "(each direction gets its own scale); use --granularity channel")
        if gran == "block":
            why_not = block_unsupported(L, weights.block_size)
            if why_not:
                gran = "channel"
                notes.append(f"{why_not}: per-channel")
        if weights.format == "matmulnbits" and L.op_type in ("MatMul", "Gemm"):  # (shared: all consumers alike)
            fmt = "matmulnbits"
            if bits not in NBITS_BITS:
                raise UserError(f"{L.node}: {bits} bits cannot be stored as MatMulNBits (supports "
                                f"{'/'.join(map(str, NBITS_BITS))} bits); change layers.layer_bits or --format")
        plan[L.weight] = LayerPlan(bits, gran, fmt, "; ".join(notes), L.weight in fixed)
    # A block wider than a layer's fan-in is padded to the block width (scale system (m, block), sub-Grams
    # block x block): harmless where another layer is at least that wide (the cost is bounded by the widest
    # layer's), but a block wider than every fan-in is a mistake that only costs memory (100000 on a 40-wide
    # layer: 37 GiB) for what is per-channel quantization: refused, naming the widest layer.
    blocked = [L for L in layers if plan[L.weight].granularity == "block"]
    if blocked:
        widest = max(blocked, key=lambda L: L.x.fan_in)
        if weights.block_size > widest.x.fan_in > 0:
            raise UserError(f"--block-size {weights.block_size} is wider than every block-wise layer's fan-in (the "
                            f"widest, {widest.node}, has fan-in {widest.x.fan_in}); use at most "
                            f"{widest.x.fan_in}, or --granularity channel")
    return plan
