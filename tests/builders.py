"""Small ONNX models built with onnx.helper for the pipeline tests."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def conv_model(x_shape, w, bias=True, opset=17, op="Conv", **attrs):
    """input -> Conv(W[, b]) (or ConvTranspose) -> output, batch dim dynamic."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(w.astype(np.float32), "W")]
    inputs = ["input", "W"]
    if bias:
        nout = w.shape[0] if op == "Conv" else w.shape[1] * attrs.get("group", 1)
        inits.append(numpy_helper.from_array(rng.standard_normal(nout).astype(np.float32), "B"))
        inputs.append("B")
    node = helper.make_node(op, inputs, ["output"], name=op.lower(), **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                          ["N"] + list(x_shape[1:]))],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [None] * len(x_shape))],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def mlp_model(sizes, seed=0, opset=17, gemm_transb=(1,), seq=None, constant_nodes=False, identity=False,
              shared=False):
    """A chain of weight layers with ReLUs: Gemm (transB=1 or 0) and MatMul (+Add bias) alternately.

    seq: if set, the input is [N, seq, d] and only MatMul layers are used (transformer-like 3-D activations).
    constant_nodes: weights held in Constant nodes instead of initializers. identity: weights behind Identity.
    shared: the last MatMul reuses the first MatMul's weight (needs sizes to allow it).
    """
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x = "input"
    first_matmul_w = None
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        w = (rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32)  # [K, N] layout
        bias = (0.1 * rng.standard_normal(b)).astype(np.float32)
        use_gemm = seq is None and i % 2 == 0
        tb = gemm_transb[i // 2 % len(gemm_transb)] if use_gemm else 0
        stored = w.T.copy() if tb else w
        wname = f"W{i}"
        if shared and not use_gemm and first_matmul_w is not None and i == len(sizes) - 2 \
                and first_matmul_w[1].shape == stored.shape:
            wname = first_matmul_w[0]
        elif constant_nodes:
            nodes.append(helper.make_node("Constant", [], [wname], value=numpy_helper.from_array(stored, wname + "_v")))
        elif identity:
            inits.append(numpy_helper.from_array(stored, wname + "_raw"))
            nodes.append(helper.make_node("Identity", [wname + "_raw"], [wname]))
        else:
            inits.append(numpy_helper.from_array(stored, wname))
        if not use_gemm and first_matmul_w is None:
            first_matmul_w = (wname, stored)
        inits.append(numpy_helper.from_array(bias, f"b{i}"))
        y = f"h{i}"
        if use_gemm:
            nodes.append(helper.make_node("Gemm", [x, wname, f"b{i}"], [y], name=f"gemm{i}", transB=tb))
        else:
            nodes.append(helper.make_node("MatMul", [x, wname], [y + "_mm"], name=f"matmul{i}"))
            nodes.append(helper.make_node("Add", [y + "_mm", f"b{i}"], [y], name=f"add{i}"))
        if i < len(sizes) - 2:
            nodes.append(helper.make_node("Relu", [y], [y + "_r"], name=f"relu{i}"))
            y = y + "_r"
        x = y
    nodes.append(helper.make_node("Identity", [x], ["output"], name="out"))
    in_shape = ["N", sizes[0]] if seq is None else ["N", seq, sizes[0]]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("input", TensorProto.FLOAT, in_shape)],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [None] * len(in_shape))],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def attention_like(d=16, seq=6, seed=1):
    """q/k/v projections (MatMul weights) and an activation x activation MatMul that must be skipped."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []
    for n in ("q", "k", "v"):
        inits.append(numpy_helper.from_array((rng.standard_normal((d, d)) / 4).astype(np.float32), f"W{n}"))
        nodes.append(helper.make_node("MatMul", ["input", f"W{n}"], [n], name=f"{n}_proj"))
    nodes.append(helper.make_node("Transpose", ["k"], ["kT"], perm=[0, 2, 1]))
    nodes.append(helper.make_node("MatMul", ["q", "kT"], ["scores"], name="qk"))
    nodes.append(helper.make_node("Softmax", ["scores"], ["p"], axis=-1))
    nodes.append(helper.make_node("MatMul", ["p", "v"], ["output"], name="pv"))
    graph = helper.make_graph(nodes, "attn", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                            ["N", seq, d])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [None] * 3)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def save(model, path):
    onnx.save(model, str(path))
    return str(path)


def with_if_subgraph(seed=0):
    """A top-level MatMul, then an If whose branches each hold a MatMul with its own constant weight."""
    rng = np.random.default_rng(seed)
    w0 = numpy_helper.from_array(rng.standard_normal((6, 5)).astype(np.float32), "W0")
    wt = numpy_helper.from_array(rng.standard_normal((5, 4)).astype(np.float32), "Wthen")
    we = numpy_helper.from_array(rng.standard_normal((5, 4)).astype(np.float32), "Welse")
    out_vi = [helper.make_tensor_value_info("branch_out", TensorProto.FLOAT, [None, 4])]
    then_g = helper.make_graph([helper.make_node("MatMul", ["h", "Wthen"], ["branch_out"], name="then_mm")],
                               "then", [], out_vi, [wt])
    else_g = helper.make_graph([helper.make_node("MatMul", ["h", "Welse"], ["branch_out"], name="else_mm")],
                               "else", [], out_vi, [we])
    nodes = [
        helper.make_node("MatMul", ["input", "W0"], ["h"], name="top_mm"),
        helper.make_node("ReduceSum", ["h"], ["s"], keepdims=0),
        helper.make_node("ReduceSum", ["s"], ["s2"], keepdims=0),
        helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array(0, np.float32))),
        helper.make_node("Greater", ["s2", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["output"], name="branch", then_branch=then_g, else_branch=else_g),
    ]
    graph = helper.make_graph(nodes, "ifg", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 6])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [None, 4])], [w0])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def to_float16(model):
    """The same model with float16 initializers, inputs and outputs (a float16 export)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:
        if t.data_type == TensorProto.FLOAT:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for vi in list(m.graph.input) + list(m.graph.output):
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
            vi.type.tensor_type.elem_type = TensorProto.FLOAT16
    return m


def masked_encoder(d=8, seq=5, seed=0):
    """input [N, seq, d] and attention_mask [N, seq] (int64): a MatMul + Add, output zeroed at padded positions."""
    m = mlp_model([d, 6], seq=seq, seed=seed)
    g = m.graph
    g.input.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", seq]))
    out = g.node[-1]  # Identity -> output
    out.output[0] = "pre_mask"
    g.node.extend([
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask_f", "axes2"], ["mask_3d"]),
        helper.make_node("Mul", ["pre_mask", "mask_3d"], ["output"]),
    ])
    g.initializer.append(numpy_helper.from_array(np.array([2], np.int64), "axes2"))
    return m


def assert_cli_one_line_error(tmp_path, capsys, args, needle):
    """``onnxcomq quantize`` on a small MLP with ``args`` exits 2 with one line naming ``needle``, writing nothing."""
    from onnxcomq.cli import main

    src = tmp_path / "m.onnx"
    onnx.save(mlp_model([8, 6, 5], seq=3), str(src))
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(src), "-o", str(out), "--calib", "random", "--quiet"] + args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("onnxcomq: error:") and needle in err[0], err
    assert not out.exists()


# The flat option names of the tests (0.1.0's QuantizeConfig fields) -> (section, field): the package's own table
from onnxcomq.config import MOVED as FLAT  # noqa: E402


def recipe(official=False, sequential=False, **flat):
    """An onnxcomq Recipe from flat option names: ``recipe(bits=3, sequential=True, stages=4, act_bits=8)``.
    The optional sections (sequential, mixed_precision, activations) are on where sequential=True, avg_bits or
    act_bits is given; sequential=False is one float pass (the package's default is sequential capture), None the
    package's default."""
    from onnxcomq import Recipe

    d = {}
    target = flat.pop("target", None)
    if flat.get("avg_bits") is None:
        flat.pop("avg_bits", None)
    if flat.get("act_bits") is None:
        flat.pop("act_bits", None)
    for k, v in flat.items():
        sec, name = FLAT[k]
        d.setdefault(sec, {})[name] = v
    if sequential:
        d.setdefault("sequential", {})
    else:
        assert "sequential" not in d, "sequential fields without sequential=True"
        if sequential is False:
            d["sequential"] = None
    base = Recipe.official(bits=flat.get("bits", 4)) if official else Recipe()
    if target is not None:
        d["target"] = target
    return base.updated(d)


def recipe_args(tmp_path, official=False, sequential=False, **flat) -> list:
    """Command-line arguments ``["--recipe", FILE]`` for the settings that have no option of their own: the
    sections the flat names touch (tests/builders.py FLAT), written to a JSON recipe file under ``tmp_path``;
    sequential as in ``recipe``."""
    import json
    import os

    d = {}
    if official:
        d = {k: v for k, v in recipe(official=True).to_dict().items() if k in ("weights", "solver", "regularization")}
    for k, v in flat.items():
        sec, name = FLAT[k]
        d.setdefault(sec, {})[name] = list(v) if isinstance(v, tuple) else v
    if sequential:
        d.setdefault("sequential", {})
    elif sequential is False:
        d["sequential"] = None
    path = os.path.join(str(tmp_path), f"recipe{len(os.listdir(str(tmp_path)))}.json")
    with open(path, "w") as f:
        json.dump(d, f)
    return ["--recipe", path]


_PROGRESS = None


def error_lines(stderr: str) -> list:
    """The lines of a command's stderr other than its progress lines (``onnxcomq: capture: 8/8 samples ...``,
    written where stderr is not a terminal): what a user mistake must reduce to is one error line."""
    import re

    global _PROGRESS
    if _PROGRESS is None:
        _PROGRESS = re.compile(r"^onnxcomq: [\w ()/.-]+: \d+(/\d+)? \w+( \(\d+ s\)| in [\d.]+ s)?$")
    return [line for line in stderr.strip().splitlines() if not _PROGRESS.match(line)]


def tones(n: int, seed: int, samples: int, rate: int, bumps: tuple) -> np.ndarray:
    """(n, samples) float32 audio at ``rate`` Hz: three tones with int16-like amplitudes under an envelope of
    |sin(pi t u)|, u uniform in ``bumps`` (clipped at 0), plus a little noise."""
    r = np.random.default_rng(seed)
    t = np.arange(samples) / rate
    out = []
    for _ in range(n):
        a = r.uniform(500, 8000)
        x = sum(np.sin(2 * np.pi * f * t + r.uniform(0, 6)) for f in r.uniform(100, 3000, 3)) * a / 3
        x = x * np.clip(np.sin(np.pi * t * r.uniform(*bumps)), 0, 1) + r.normal(0, 0.05 * a, t.size)
        out.append(x.astype(np.float32))
    return np.stack(out)


def run_unverified(*args, **kwargs):
    """``onnxcomq.run`` returning a model that fails the check before writing (an output far from float) instead of
    raising, as ``--write-unverified`` writes it: for baselines that are meant to be bad (RTN at 2 bits, a rule
    turned off)."""
    from onnxcomq import VerificationError, run

    try:
        return run(*args, **kwargs)
    except VerificationError as e:
        assert e.model is not None
        return e.model, e.report


def load_bench(name: str):
    """tools/bench/NAME.py as a module (the script's sys.path additions taken back after the import)."""
    import importlib.util
    import os
    import sys

    path = list(sys.path)
    try:
        spec = importlib.util.spec_from_file_location(
            f"bench_{name}", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools", "bench",
                                          f"{name}.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path[:] = path
    return mod
