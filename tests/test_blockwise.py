"""Block-wise weight grids (one scale per output row and block of input channels): the solver against a float64
step loop, the scale-update system against brute force and lstsq, emitted DequantizeLinear(block_size) and
MatMulNBits models against float twins in onnxruntime."""

import math
import os

import builders
import hypothesis.strategies as st
import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import test_solver
from builders import recipe
from hypothesis import given, settings
from onnx import numpy_helper
from reference import block_scales_lstsq, block_step_loop, grid_table, nearest_bruteforce, objective

from onnxcomq import UserError, run
from onnxcomq.solve.blockwise import (
    block_scale_system,
    comq_quantize_block,
    make_block_grid,
    rtn_quantize_block,
    solve_block_scales,
)
from onnxcomq.solve.comq import SolverConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
xp = test_solver.xp  # the backends fixture: numpy, the strict CuPy double, cupy where a CUDA device is present


def problem(m, n, seed, rows=None):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((rows or 3 * n, n)) * rng.uniform(0.3, 2.0, n)
    W = rng.standard_normal((m, n))
    return W, X.T @ X


def cfg(bits=3, block=4, **kw):
    base = dict(bits=bits, granularity="block", block_size=block, sweeps=2, scale_update=True,
                lambda_search=False, dtype="float64")
    base.update(kw)
    return SolverConfig(**base)


@pytest.mark.parametrize("m,n,block", [(5, 12, 4), (6, 13, 5), (3, 7, 7), (4, 9, 16), (4, 10, 1), (7, 70, 32)])
@pytest.mark.parametrize("scale_update", [False, True])
@pytest.mark.parametrize("scheme", ["asym", "sym"])
def test_block_comq_equals_step_loop(xp, m, n, block, scale_update, scheme):
    W, G = problem(m, n, seed=m * n + block)
    c = cfg(block=block, scale_update=scale_update, scheme=scheme)
    res = comq_quantize_block(xp.asarray(W), xp.asarray(G), c)
    bg = make_block_grid(W, G, c)
    Q, level, scale = block_step_loop(W, G, bg.scale, bg.lo, bg.hi, block, sweeps=2, scale_update=scale_update)
    np.testing.assert_allclose(res.qweight, Q, rtol=0, atol=1e-9)
    np.testing.assert_allclose(res.scale, scale, rtol=1e-9)
    lo = np.repeat(bg.lo, block, axis=1)[:, :n]
    np.testing.assert_array_equal(res.codes, level - lo if scheme == "asym" else level)
    assert res.objective == pytest.approx(objective(W, Q, G), rel=1e-9)
    assert res.scale.shape == (m, -(-n // block))


def test_scale_system_equals_definition_and_lstsq():
    m, n, block = 4, 11, 3
    W, G = problem(m, n, seed=3)
    bg = make_block_grid(W, G, cfg(block=block))
    _, level = bg.nearest(W)
    A, r = block_scale_system(W, level, G, block)
    nb = -(-n // block)
    for i in range(m):  # A_bc = c_b^T G c_c, r_b = c_b^T G w with c_b = row i's levels restricted to block b
        C = np.zeros((n, nb))
        C[np.arange(n), np.arange(n) // block] = level[i]
        np.testing.assert_allclose(A[i], C.T @ G @ C, rtol=1e-10, atol=1e-9)
        np.testing.assert_allclose(r[i], C.T @ G @ W[i], rtol=1e-10, atol=1e-9)
    new = solve_block_scales(A, r, bg.scale)
    np.testing.assert_allclose(new, block_scales_lstsq(W, G, level, bg.scale, block), rtol=1e-8)
    # and it is the minimizer: no random perturbation of the scales does better
    rng = np.random.default_rng(0)
    for _ in range(20):
        s = new * (1 + 0.01 * rng.standard_normal(new.shape))
        for i in range(m):
            rep = np.repeat(new[i], block)[:n]
            per = np.repeat(s[i], block)[:n]
            assert objective(W[i:i + 1], level[i:i + 1] * rep, G) <= objective(W[i:i + 1], level[i:i + 1] * per, G)


def test_scale_update_keeps_dead_blocks_and_rejects_nonpositive():
    A = np.array([[[2.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]]])  # row 0: block 1 has no nonzero level
    r = np.array([[4.0, 0.0], [-1.0, 3.0]])  # row 1: the minimizer has a negative scale
    old = np.array([[0.5, 0.7], [0.2, 0.3]])
    new = solve_block_scales(A, r, old)
    np.testing.assert_allclose(new[0], [2.0, 0.7])
    np.testing.assert_allclose(new[1], old[1])


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 6), n=st.integers(1, 20), block=st.integers(1, 9), bits=st.integers(2, 5),
       seed=st.integers(0, 10 ** 6), scheme=st.sampled_from(["asym", "sym"]), lam=st.booleans())
def test_property_objective_never_increases(m, n, block, bits, seed, scheme, lam):
    W, G = problem(m, n, seed, rows=max(2, n // 2))  # often rank-deficient G
    c = cfg(bits=bits, block=block, scheme=scheme, sweeps=3, lambda_search=lam)
    res = comq_quantize_block(W, G, c)
    h = res.history
    assert all(b <= a * (1 + 1e-9) + 1e-9 for a, b in zip(h, h[1:]))
    assert res.objective == pytest.approx(objective(W, res.qweight, G), rel=1e-7, abs=1e-9)
    # codes in range, and codes/scale/zero point reproduce the weights
    hi = (1 << bits) - 1 if scheme == "asym" else (1 << (bits - 1)) - 1
    lo = 0 if scheme == "asym" else -(1 << (bits - 1))
    assert res.codes.min() >= lo and res.codes.max() <= hi
    rep = np.repeat(res.scale, block, axis=1)[:, :n]
    zp = np.repeat(res.zero_point, block, axis=1)[:, :n]
    np.testing.assert_allclose((res.codes - zp) * rep, res.qweight, rtol=1e-12, atol=1e-12)


def test_rtn_block_is_blockwise_nearest():
    m, n, block = 5, 14, 4
    W, G = problem(m, n, seed=7)
    c = cfg(bits=3, block=block)
    res = rtn_quantize_block(W, G, c)
    bg = make_block_grid(W, G, c)
    for j in range(n):
        b = j // block
        table, levels = grid_table(bg.scale[:, b], bg.lo[:, b], bg.hi[:, b])
        np.testing.assert_allclose(res.qweight[:, j], nearest_bruteforce(table, levels, W[:, j])[0])


def test_blocks_beat_channels_on_rtn_and_comq():
    """Finer grids: with outlier columns block scales must lower both errors (measured, not assumed)."""
    W, G = problem(16, 64, seed=11)
    W[:, ::16] *= 8
    ch = SolverConfig(bits=4, sweeps=2, lambda_search=False, dtype="float64")
    from onnxcomq.solve.comq import comq_quantize, rtn_quantize
    assert rtn_quantize_block(W, G, cfg(bits=4, block=8)).objective < rtn_quantize(W, G, ch).objective
    assert comq_quantize_block(W, G, cfg(bits=4, block=8)).objective < comq_quantize(W, G, ch).objective


@pytest.mark.parametrize("bad", [dict(order="greedy"), dict(order="importance"), dict(block_size=0),
                                 dict(granularity="channel", block_size=4)])
def test_block_config_errors(bad):
    with pytest.raises(ValueError):
        cfg(**bad).validate()


# ---- emitted models ----------------------------------------------------------------------------------------


def session(model):
    so = ort.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _expand(a, axis, block, shape):
    return np.repeat(a, block, axis=axis)[tuple(slice(0, d) for d in shape)]


def unpack(packed, bits, count):
    """Unsigned codes from bytes packed low bits first (independent of onnxcomq.nbits)."""
    per = 8 // bits
    vals = [(packed >> (k * bits)) & ((1 << bits) - 1) for k in range(per)]
    return np.stack(vals, axis=-1).reshape(packed.shape[:-1] + (-1,))[..., :count].astype(np.int64)


def float_twin(qmodel):
    """Float model with every DequantizeLinear (block_size too) and MatMulNBits replaced by MatMul (and an Add for
    its bias input) on weights dequantized here from the stored initializers."""
    out = onnx.ModelProto()
    out.CopyFrom(qmodel)
    g = out.graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    drop, new_w, nodes = set(), {}, []
    for n in g.node:
        at = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        if n.op_type == "DequantizeLinear":
            codes = inits[n.input[0]].astype(np.int64)
            scale = inits[n.input[1]].astype(np.float64)
            zp = inits[n.input[2]].astype(np.int64)
            axis, block = at.get("axis", 1), at.get("block_size", 0)
            if block:
                s, z = _expand(scale, axis, block, codes.shape), _expand(zp, axis, block, codes.shape)
            else:
                shape = [1] * codes.ndim
                if scale.ndim:
                    shape[axis] = -1
                s, z = scale.reshape(shape), zp.reshape(shape)
            new_w[n.output[0]] = ((codes - z) * s).astype(np.float32)
            drop.update(n.input)
            continue
        if n.op_type == "MatMulNBits":
            K, N, bits, B = at["K"], at["N"], at["bits"], at["block_size"]
            kb = -(-K // B)
            codes = unpack(inits[n.input[1]], bits, B).reshape(N, kb * B)[:, :K]
            scale = inits[n.input[2]].astype(np.float64).reshape(N, kb)
            if len(n.input) > 3 and n.input[3]:
                zp = unpack(inits[n.input[3]].reshape(N, -1), bits, kb)
            else:
                zp = np.full((N, kb), 1 << (bits - 1))
            wname = n.input[1] + "_float"
            new_w[wname] = ((codes - np.repeat(zp, B, axis=1)[:, :K]) * np.repeat(scale, B, axis=1)[:, :K]
                            ).T.astype(np.float32)
            drop.update(n.input[1:5])
            if len(n.input) > 5 and n.input[5]:  # (the bias input: a Gemm's C)
                nodes += [onnx.helper.make_node("MatMul", [n.input[0], wname], [n.output[0] + "_mm"], name=n.name),
                          onnx.helper.make_node("Add", [n.output[0] + "_mm", n.input[5]], list(n.output))]
            else:
                nodes.append(onnx.helper.make_node("MatMul", [n.input[0], wname], list(n.output), name=n.name))
            continue
        nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    keep = [t for t in g.initializer if t.name not in drop]
    del g.initializer[:]
    g.initializer.extend(keep + [numpy_helper.from_array(w, k) for k, w in new_w.items()])
    return out


def _gemm_model(transb, k=23, n=6, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k) if transb else (k, n)).astype(np.float32)
    node = onnx.helper.make_node("Gemm", ["input", "W", "B"], ["output"], name="gemm", transB=transb)
    graph = onnx.helper.make_graph(
        [node], "g", [onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["N", k])],
        [onnx.helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, ["N", n])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "B")])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("model_fn,block,bits,scheme", [
    (lambda: builders.mlp_model([20, 12, 9, 5], seq=3), 8, 4, "asym"),  # MatMul B[K, N]: axis 0, 20 = 8+8+4
    (lambda: builders.mlp_model([20, 12, 9, 5], seq=3), 5, 6, "sym"),
    (lambda: _gemm_model(1), 7, 3, "asym"),  # Gemm transB=1 W[N, K]: axis 1
    (lambda: _gemm_model(0), 7, 8, "sym"),  # Gemm transB=0 W[K, N]: axis 0
])
def test_emitted_block_dq_equals_float_twin(model_fn, block, bits, scheme):
    model = model_fn()
    x_shape = [i.type.tensor_type.shape.dim for i in model.graph.input][0]
    rng = np.random.default_rng(block)
    k = x_shape[-1].dim_value
    x = rng.standard_normal((16, 3, k) if len(x_shape) == 3 else (16, k)).astype(np.float32)
    q, rep = run(model, {"input": x}, recipe(bits=bits, scheme=scheme, granularity="block",
                                                     block_size=block, device="cpu"))
    onnx.checker.check_model(q, full_check=True)
    opset = next(o.version for o in q.opset_import if o.domain in ("", "ai.onnx"))
    assert opset >= 21
    dqs = [n for n in q.graph.node if n.op_type == "DequantizeLinear"]
    inits = {t.name: t for t in q.graph.initializer}
    for n in dqs:
        codes = inits[n.input[0]]
        assert codes.data_type == {(True, True): onnx.TensorProto.INT4, (True, False): onnx.TensorProto.UINT4,
                                   (False, True): onnx.TensorProto.INT8,
                                   (False, False): onnx.TensorProto.UINT8}[(bits <= 4, scheme == "sym")]
        axis = next(a.i for a in n.attribute if a.name == "axis")
        scale_dims = list(inits[n.input[1]].dims)
        want = list(codes.dims)
        # a partial last block is written in whole blocks of gcd(K, block) where that at most quadruples the scales
        fine = math.gcd(want[axis], block)
        b = block if want[axis] % block == 0 or block // fine > 4 else fine
        assert {a.name: a.i for a in n.attribute}["block_size"] == b
        want[axis] = -(-want[axis] // b)
        assert scale_dims == want
    assert all(L.granularity == "block" for L in rep.layers)
    (y,) = session(q).run(None, {"input": x})
    (yt,) = session(float_twin(q)).run(None, {"input": x})
    np.testing.assert_allclose(y, yt, rtol=1e-4, atol=1e-4)
    (yf,) = session(model).run(None, {"input": x})
    assert np.linalg.norm(y - yf) < 0.5 * np.linalg.norm(yf)  # it is still the model


@pytest.mark.parametrize("w_shape,attrs,block,why", [
    ((4, 3, 3, 3), dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1]), 2, "multiple of the block size"),
    ((6, 1, 3, 3), dict(kernel_shape=[3, 3], group=6, pads=[1, 1, 1, 1]), 2, "depthwise"),
])
def test_conv_falls_back_to_channel_with_reason(w_shape, attrs, block, why):
    rng = np.random.default_rng(0)
    w = rng.standard_normal(w_shape).astype(np.float32)
    cin = w_shape[1] * attrs.get("group", 1)
    m = builders.conv_model((2, cin, 8, 8), w, **attrs)
    q, rep = run(m, {"input": rng.standard_normal((4, cin, 8, 8)).astype(np.float32)},
                 recipe(granularity="block", block_size=block, device="cpu"))
    (L,) = rep.layers
    assert L.granularity == "channel" and why in L.note
    dq = next(n for n in q.graph.node if n.op_type == "DequantizeLinear")
    assert not any(a.name == "block_size" for a in dq.attribute)


@pytest.mark.parametrize("w_shape,attrs,block", [
    ((5, 8, 3, 3), dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1]), 4),  # 2 blocks per tap
    ((6, 10, 1, 1), {}, 4),  # 1x1: 4 + 4 + 2
    ((3, 6, 3, 2), dict(kernel_shape=[3, 2], strides=[2, 1]), 6),
])
def test_conv_blocks_equal_step_loop_and_float_twin(w_shape, attrs, block):
    rng = np.random.default_rng(block)
    w = rng.standard_normal(w_shape).astype(np.float32)
    cin = w_shape[1]
    m = builders.conv_model((2, cin, 7, 7), w, **attrs)
    x = rng.standard_normal((6, cin, 7, 7)).astype(np.float32)
    q, rep = run(m, {"input": x}, recipe(granularity="block", block_size=block, bits=3, device="cpu"))
    onnx.checker.check_model(q, full_check=True)
    (L,) = rep.layers
    assert L.granularity == "block" and not L.note
    dq = next(n for n in q.graph.node if n.op_type == "DequantizeLinear")
    at = {a.name: a.i for a in dq.attribute}
    b = block if cin % block == 0 else math.gcd(cin, block)  # (10 in blocks of 4: written in whole blocks of 2)
    assert at["axis"] == 1 and at["block_size"] == b
    scale = next(t for t in q.graph.initializer if t.name == dq.input[1])
    assert list(scale.dims) == [w_shape[0], -(-cin // b)] + list(w_shape[2:])
    (y,) = session(q).run(None, {"input": x})
    (yt,) = session(float_twin(q)).run(None, {"input": x})
    np.testing.assert_allclose(y, yt, rtol=1e-4, atol=1e-4)
    # the solver on the conv's (channel, tap) columns = the step loop on blocks of one tap's channels
    taps = int(np.prod(w_shape[2:]))
    W = w.reshape(w_shape[0], -1).astype(np.float64)
    G = problem(1, W.shape[1], seed=1)[1]
    c = cfg(bits=3, block=block, block_taps=taps)
    res = comq_quantize_block(W, G, c)
    perm = np.arange(W.shape[1]).reshape(cin, taps).T.reshape(-1)
    Wp, Gp = W[:, perm], G[perm][:, perm]
    bg = make_block_grid(Wp, Gp, cfg(bits=3, block=block))
    Q, _, s = block_step_loop(Wp, Gp, bg.scale, bg.lo, bg.hi, block, sweeps=2, scale_update=True)
    np.testing.assert_allclose(res.qweight[:, perm], Q, atol=1e-9)
    nbc = -(-cin // block)
    np.testing.assert_allclose(res.scale.reshape(w_shape[0], nbc, taps),
                               s.reshape(w_shape[0], taps, nbc).transpose(0, 2, 1), rtol=1e-9)


@pytest.mark.parametrize("bits,scheme,block", [(4, "asym", 16), (4, "sym", 32), (8, "asym", 16), (8, "sym", 16),
                                               (2, "asym", 16), (2, "sym", 32)])
def test_matmulnbits_equals_float_twin(bits, scheme, block):
    model = builders.mlp_model([40, 48, 33, 20], seq=3)  # K = 40, 48, 33: blocks that do not divide K
    rng = np.random.default_rng(bits)
    x = rng.standard_normal((16, 3, 40)).astype(np.float32)
    cfgq = recipe(bits=bits, scheme=scheme, granularity="block", block_size=block, device="cpu")
    q, rep = run(model, {"input": x}, cfgq.updated({"weights": {"format": "matmulnbits"}}))
    onnx.checker.check_model(q, full_check=True)
    ops = [n.op_type for n in q.graph.node]
    assert ops.count("MatMulNBits") == 3 and "MatMul" not in ops and "DequantizeLinear" not in ops
    (y,) = session(q).run(None, {"input": x})
    (yt,) = session(float_twin(q)).run(None, {"input": x})
    np.testing.assert_allclose(y, yt, rtol=1e-4, atol=1e-4)
    # the same codes as the DequantizeLinear model of the same configuration
    qd, _ = run(model, {"input": x}, cfgq)
    (yd,) = session(qd).run(None, {"input": x})
    np.testing.assert_allclose(y, yd, rtol=1e-4, atol=1e-4)


def test_matmulnbits_on_fmnist_vit():
    path = os.path.join(ROOT, "models", "fmnist_vit.onnx")
    with np.load(os.path.join(ROOT, "models", "fmnist_calib.npz")) as z:
        name = z.files[0]
        calib = {name: z[name][:64]}
    q, rep = run(path, calib, recipe(bits=4, granularity="block", block_size=16,
                                             weight_format="matmulnbits", device="cpu"))
    onnx.checker.check_model(q, full_check=True)
    fmts = {L.op_type: L.weight_format for L in rep.layers}
    assert fmts.get("MatMul") == "matmulnbits"
    assert sum(n.op_type == "MatMulNBits" for n in q.graph.node) == sum(L.op_type in ("MatMul", "Gemm")
                                                                        for L in rep.layers)
    x = calib[name][:32]
    (y,) = session(q).run(None, {name: x})[:1]
    (yt,) = session(float_twin(q)).run(None, {name: x})[:1]
    np.testing.assert_allclose(y, yt, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("args,needle", [
    (["--format", "matmulnbits", "--bits", "3", "--granularity", "block"], "--bits 3"),
    (["--format", "matmulnbits", "--granularity", "block", "--block-size", "24"], "power of two"),
    (["--format", "matmulnbits"], "--granularity block"),
    (["--format", "matmulnbits", "--granularity", "tensor"], "--granularity block"),
    (["--granularity", "block", "--preset", "official"], "--preset official"),
    (["--granularity", "block", dict(order="greedy")], "cyclic"),  # (a dict: settings of a recipe file)
    (["--granularity", "block", "--block-size", "0"], "--block-size"),
])
def test_cli_impossible_combinations_one_line(tmp_path, capsys, args, needle):
    args = [b for a in args for b in (builders.recipe_args(tmp_path, **a) if isinstance(a, dict) else [a])]
    builders.assert_cli_one_line_error(tmp_path, capsys, args, needle)
    with pytest.raises(UserError):
        cfgd = dict(granularity="block", block_size=3, weight_format="matmulnbits")
        recipe(**cfgd).validate()


def test_int4_storage_of_block_codes_is_packed():
    """2..4-bit block codes are stored as packed int4 (two per byte) like per-channel ones."""
    model = builders.mlp_model([32, 16], seq=2)
    x = np.random.default_rng(0).standard_normal((8, 2, 32)).astype(np.float32)
    q, _ = run(model, {"input": x}, recipe(bits=4, granularity="block", block_size=16, device="cpu"))
    t = next(t for t in q.graph.initializer if t.name.endswith("_quantized"))
    assert t.data_type == onnx.TensorProto.UINT4 and len(t.raw_data) == 32 * 16 // 2
    assert numpy_helper.to_array(t).dtype == ml_dtypes.uint4


def test_matmulnbits_shared_weight_and_unnamed_nodes():
    model = builders.mlp_model([16, 16, 16, 16], seq=3, shared=True)
    for n in model.graph.node:
        n.name = ""  # node names come from indices, which the bias Adds shift
    x = np.random.default_rng(3).standard_normal((8, 3, 16)).astype(np.float32)
    q, rep = run(model, {"input": x}, recipe(bits=4, granularity="block", block_size=16,
                                                     weight_format="matmulnbits", device="cpu"))
    onnx.checker.check_model(q, full_check=True)
    shared = [L for L in rep.layers if len(L.consumers) > 1]
    assert shared and sum(n.op_type == "MatMulNBits" for n in q.graph.node) == sum(
        len(L.consumers) for L in rep.layers if L.op_type == "MatMul")
    (y,) = session(q).run(None, {"input": x})
    (yt,) = session(float_twin(q)).run(None, {"input": x})
    np.testing.assert_allclose(y, yt, rtol=1e-4, atol=1e-4)


@settings(max_examples=60, deadline=None)
@given(length=st.integers(1, 200), block=st.sampled_from([16, 32, 64, 128]), axis=st.integers(0, 1),
       seed=st.integers(0, 1000))
def test_whole_blocks_keep_every_elements_scale(length, block, axis, seed):
    """A partial last block is rewritten in blocks of gcd(length, block) where that at most quadruples the
    scales: the same scale and zero point for every element (expanded as DequantizeLinear expands them)."""
    from onnxcomq.write.qdq import whole_blocks

    rng = np.random.default_rng(seed)
    nb = -(-length // block)
    shape = (nb, 5) if axis == 0 else (5, nb)
    scale, zp = rng.random(shape).astype(np.float32), rng.integers(0, 16, shape).astype(np.uint8)
    s2, z2, b2 = whole_blocks(scale, zp, axis, block, length)
    fine = math.gcd(length, block)
    if length % block and block // fine <= 4:  # rewritten: whole blocks, at most 4x the scales
        assert b2 == fine and s2.shape[axis] == length // fine
    else:  # (a whole number of blocks already, or too many scales: kept)
        assert b2 == block and s2 is scale

    def expand(a, b):
        return np.take(np.repeat(a, b, axis=axis), np.arange(length), axis=axis)

    np.testing.assert_array_equal(expand(s2, b2), expand(scale, block))
    np.testing.assert_array_equal(expand(z2, b2), expand(zp, block))


def test_a_conv_with_a_partial_last_block_is_written_in_whole_blocks(tmp_path):
    """An 80-channel 1x1 conv in blocks of 32 (EfficientNet-Lite0's): written with block_size 16, which OpenVINO's
    ONNX frontend accepts (it refused 32: "dimension of X at axis 1 (80) cannot be divided by block_size (32)"),
    with the dequantized weights of the 32-wide grid: at most 3 scales per output channel."""
    rng = np.random.default_rng(0)
    m = builders.conv_model((None, 80, 6, 6), rng.standard_normal((8, 80, 1, 1)).astype(np.float32))
    x = rng.standard_normal((16, 80, 6, 6)).astype(np.float32)
    q, _ = run(m, {"input": x}, recipe(bits=4, granularity="block", block_size=32))
    (dq,) = [n for n in q.graph.node if n.op_type == "DequantizeLinear"]
    assert {a.name: a.i for a in dq.attribute}["block_size"] == 16
    scale = numpy_helper.to_array(next(t for t in q.graph.initializer if t.name == dq.input[1]))
    assert scale.shape == (8, 5, 1, 1)
    np.testing.assert_array_equal(scale[:, 0], scale[:, 1])  # (channels 0-31: one scale, written twice)
    np.testing.assert_array_equal(scale[:, 2], scale[:, 3])  # (32-63; 64-79 the last)


def _gemm_forms_model(seed=0):
    """Four Gemms as exporters write Linear layers (jax2onnx: every Linear a Gemm on a 2-D input; torch: transB):
    transB with a per-column C; B as stored [K, N], alpha 0.5, beta 2, C [1, N]; transA; and C a graph input
    (computed at run time: an Add after the MatMulNBits)."""
    from onnx import TensorProto, helper
    rng = np.random.default_rng(seed)
    K = 48
    arrs = {"w1": rng.standard_normal((32, K)), "c1": rng.standard_normal(32), "w2": rng.standard_normal((32, 40)),
            "c2": rng.standard_normal((1, 40)), "w3": rng.standard_normal((40, 24)), "w4": rng.standard_normal((24, 16))}
    nodes = [helper.make_node("Gemm", ["x", "w1", "c1"], ["h1"], transB=1, name="g1"),
             helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("Gemm", ["r1", "w2", "c2"], ["h2"], alpha=0.5, beta=2.0, name="g2"),
             helper.make_node("Transpose", ["h2"], ["h2t"]),
             helper.make_node("Gemm", ["h2t", "w3"], ["h3"], transA=1, name="g3"),
             helper.make_node("Gemm", ["h3", "w4", "c4"], ["y"], beta=0.5, name="g4")]
    g = helper.make_graph(nodes, "gemms", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", K]),
                                           helper.make_tensor_value_info("c4", TensorProto.FLOAT, [16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])],
                          [numpy_helper.from_array((v / 4).astype(np.float32), k) for k, v in arrs.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def test_matmulnbits_replaces_gemms_too():
    """--format matmulnbits wrote only MatMul weights as MatMulNBits: a model whose Linear layers are Gemms
    (jax2onnx writes every one so; torch a Linear on a 2-D input) got DequantizeLinear weights throughout, without
    a word. Every Gemm form becomes MatMulNBits now (alpha in the scales, C as its bias, or an Add where C is
    computed; a Transpose for transA), with the codes of the DequantizeLinear model of the same settings."""
    model = _gemm_forms_model()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 48)).astype(np.float32)
    feed = {"x": x, "c4": rng.standard_normal(16).astype(np.float32)}
    cfgq = recipe(bits=4, granularity="block", block_size=16, device="cpu")
    q, rep = run(model, feed, cfgq.updated({"weights": {"format": "matmulnbits"}}))
    onnx.checker.check_model(q, full_check=True)
    ops = [n.op_type for n in q.graph.node]
    assert ops.count("MatMulNBits") == 4 and "Gemm" not in ops and "DequantizeLinear" not in ops
    assert {L.weight_format for L in rep.layers} == {"matmulnbits"}
    read = {i for n in q.graph.node for i in n.input}
    assert all(t.name in read for t in q.graph.initializer)  # (the Cs moved into biases are gone)
    qd, _ = run(model, feed, cfgq)
    test = {"x": x[:16], "c4": feed["c4"]}
    (y,), (yd,), (yf,) = (session(m).run(None, test) for m in (q, qd, model))
    np.testing.assert_allclose(y, yd, rtol=1e-4, atol=1e-4)
    assert np.linalg.norm(y - yf) < 0.2 * np.linalg.norm(yf)
