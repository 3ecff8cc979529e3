"""Decoder language models and text calibration (capture/text.py, ``--calib TEXT.txt --tokenizer DIR``).

The tiny random Llama of tools/export/llm.py (hidden 64, 2 layers, 4 heads / 2 KV heads, vocab 1024, a BPE
tokenizer trained on the machine's Debian package descriptions) is built and exported with torch.onnx (Optimum's
input and output names, with a KV cache) once per module; the tests that need it are skipped where torch or
transformers are not installed (tools/test.sh installs them). The onnxruntime-genai test needs onnxruntime-genai
(0.15.2: later versions need transformers 5). The input-checking tests need only the tokenizers library.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import builders
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from onnxcomq import Recipe, UserError, Weights
from onnxcomq.capture.calib import Calibration, model_inputs
from onnxcomq.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLM_TOOL = os.path.join(ROOT, "tools", "export", "llm.py")
# logits cosine (quantized vs float, real token positions of held-out text) of the tiny decoder at W4 block-32
# MatMulNBits, COMQ from 48 text samples (torch 2.13.0+cpu, transformers 4.57.6, onnxruntime 1.32): measured 0.9960
# with the lm_head quantized too (round-to-nearest on the same grid 0.9938), 0.9985 with it left float (the
# layers.lm_head default); the bound leaves room for other builds
W4_BLOCK32_MIN_COSINE = 0.993


def _tool():
    spec = importlib.util.spec_from_file_location("llm_export", LLM_TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder, the HF model folder, the exported model.onnx with a KV cache, a calibration text, a held-out text)."""
    pytest.importorskip("torch", reason="exporting the tiny Llama needs torch (tools/test.sh installs it)")
    pytest.importorskip("transformers", reason="exporting the tiny Llama needs transformers (tools/test.sh)")
    tool = _tool()
    d = tmp_path_factory.mktemp("llm")
    hf = d / "hf"
    tool.build_hf("tiny", str(hf))
    path = d / "torch" / "model.onnx"
    tool.export_torch(str(hf), str(path), past=True)
    texts = tool.descriptions()
    if len(texts) < 200:
        texts = tool.corpus()
    assert len(texts) >= 200, "too little local text for calibration"
    (d / "calib.txt").write_text("\n".join(texts[100:148]) + "\n", encoding="utf-8")
    (d / "heldout.txt").write_text("\n".join(texts[150:166]) + "\n", encoding="utf-8")
    return d, hf, path


def _head_quantized() -> int:
    """1 where the default recipe quantizes a language model's lm_head, 0 where it leaves it float."""
    return int(getattr(Recipe().layers, "lm_head", "quantize") != "float")


def _config(hf):
    with open(hf / "config.json") as f:
        return json.load(f)


def _real_cosine(a, b, mask):
    """Cosine of two logits arrays (batch, seq, vocab) over the positions where mask is 1."""
    keep = mask.astype(bool)
    x, y = a[keep].ravel().astype(np.float64), b[keep].ravel().astype(np.float64)
    return float(x @ y / np.linalg.norm(x) / np.linalg.norm(y))


def _session(model):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


# ----------------------------------------------------------------------------------------------- text -> feeds
def test_text_feeds_match_a_reference_built_by_hand(tiny):
    from transformers import AutoTokenizer

    from onnxcomq.capture.text import text_feeds

    d, hf, path = tiny
    batch, max_length, samples = 4, 120, 10
    feeds = text_feeds(d / "calib.txt", hf, path, batch_size=batch, max_length=max_length, max_samples=samples)
    # the reference: transformers' tokenizer, one sample at a time, batched longest first, padded by hand
    tok = AutoTokenizer.from_pretrained(str(hf))
    lines = [s.strip() for s in (d / "calib.txt").read_text(encoding="utf-8").splitlines() if s.strip()][:samples]
    full = [tok(s)["input_ids"] for s in lines]
    assert any(len(x) > max_length for x in full), "no sample truncated: the test would not check it"
    ids = [x[:max_length] for x in full]
    order = sorted(range(len(ids)), key=lambda k: -len(ids[k]))
    cfg = _config(hf)
    kv, hd = cfg["num_key_value_heads"], cfg["hidden_size"] // cfg["num_attention_heads"]
    assert len(feeds) == -(-samples // batch)
    assert sum(f["input_ids"].shape[0] for f in feeds) == samples
    for b, feed in enumerate(feeds):
        rows = [ids[k] for k in order[b * batch:(b + 1) * batch]]
        width = max(len(r) for r in rows)
        want_ids = [r + [tok.pad_token_id] * (width - len(r)) for r in rows]
        want_mask = [[1] * len(r) + [0] * (width - len(r)) for r in rows]
        want_pos = [list(range(len(r))) + [len(r) - 1] * (width - len(r)) for r in rows]
        assert feed["input_ids"].dtype == np.int64 and feed["input_ids"].tolist() == want_ids
        assert feed["attention_mask"].tolist() == want_mask
        assert feed["position_ids"].tolist() == want_pos
        for i in range(cfg["num_hidden_layers"]):
            for kind in ("key", "value"):
                cache = feed[f"past_key_values.{i}.{kind}"]
                assert cache.shape == (len(rows), kv, 0, hd) and cache.dtype == np.float32
    assert any(0 in f["attention_mask"] for f in feeds), "no padding: the test would not check it"
    assert all(f["input_ids"][:, 0].tolist() == [tok.bos_token_id] * f["input_ids"].shape[0] for f in feeds)
    # the feeds run, and a padded sample's logits on its tokens are those of the sample alone
    sess = _session(path)
    feed = feeds[-1]
    out = sess.run(["logits"], feed)[0]
    k = int(np.argmin(feed["attention_mask"].sum(1)))
    n = int(feed["attention_mask"][k].sum())
    alone = {name: v[k:k + 1, :n] if name in ("input_ids", "attention_mask", "position_ids") else v[k:k + 1]
             for name, v in feed.items()}
    np.testing.assert_allclose(sess.run(["logits"], alone)[0][0], out[k, :n], rtol=1e-4, atol=1e-5)


def test_padded_positions_stay_out_of_the_statistics(tiny):
    """One sample batched beside a longer one (so padded) gives the same Gram as each in a batch of its own."""
    from onnxcomq.capture.passes import collect_stats
    from onnxcomq.capture.text import text_feeds
    from onnxcomq.graph.layers import find_layers

    d, hf, path = tiny
    lines = [s for s in (d / "calib.txt").read_text(encoding="utf-8").splitlines() if s.strip()]
    lines = sorted(lines, key=len)
    (d / "pair.txt").write_text(f"{lines[0]}\n{lines[-1]}\n", encoding="utf-8")
    together = text_feeds(d / "pair.txt", hf, path, batch_size=2)
    apart = text_feeds(d / "pair.txt", hf, path, batch_size=1)
    assert len(together) == 1 and 0 in together[0]["attention_mask"]
    assert len(apart) == 2 and all(f["attention_mask"].all() for f in apart)
    model = onnx.load(path)
    layers, _ = find_layers(model)
    specs = {spec: layer.groups for layer in layers for _, spec in layer.consumers}
    padded, _ = collect_stats(model, specs, together, mask_input="attention_mask")
    plain, _ = collect_stats(model, specs, apart, mask_input="attention_mask")
    unmasked, _ = collect_stats(model, specs, together, mask_input=None)
    real = int(together[0]["attention_mask"].sum())
    for spec in specs:
        assert padded[spec].rows == plain[spec].rows == real
        np.testing.assert_allclose(padded[spec].G, plain[spec].G, rtol=1e-4, atol=1e-6 * np.abs(plain[spec].G).max())
    # without the mask the padded rows count: the comparison above can fail
    assert all(unmasked[s].rows == together[0]["attention_mask"].size > real for s in specs)
    assert any(not np.allclose(unmasked[s].G, plain[s].G, rtol=1e-3) for s in specs)


def test_carried_group_passes_give_the_one_pass_statistics_of_the_decoder(tiny):
    """Group passes of the KV-cache export that start from the stored residual stream (capture/carry.py) give the
    one-pass statistics, padded positions left out; the later groups read the hidden state, never the mask."""
    from onnxcomq.capture.carry import Carry
    from onnxcomq.capture.memory import layer_specs
    from onnxcomq.capture.passes import capture, collect_stats, split_stages
    from onnxcomq.capture.text import text_feeds
    from onnxcomq.graph.layers import find_layers

    d, hf, path = tiny
    feeds = text_feeds(d / "calib.txt", hf, path, batch_size=6, max_samples=12)
    assert any(0 in f["attention_mask"] for f in feeds)
    model = onnx.load(path)
    layers, _ = find_layers(model)
    specs = {spec: layer.groups for layer in layers for _, spec in layer.consumers}
    whole, _ = collect_stats(model, specs, feeds, mask_input="attention_mask")
    groups = split_stages(layers, 3)
    carry = Carry.for_groups(model, [layer_specs(g) for g in groups])
    try:
        hidden = _config(hf)["hidden_size"]
        for g, group in enumerate(groups):
            stored = carry.load(g, 0)  # (what this group reads of the first batch)
            assert set(stored) == set(carry.inputs[g]) and bool(stored) == (g > 0)
            # a hidden state or less per token: no (seq x seq) mask is stored
            assert all(a.size <= feeds[0]["input_ids"].size * hidden for a in stored.values())
            stats, _ = capture(model, None, layer_specs(group), feeds, mask_input="attention_mask", carry=carry,
                               group=g)
            for spec, st in stats.items():
                ref = whole[spec]
                assert st.part().x.rows == ref.rows
                np.testing.assert_allclose(st.part().x.G, ref.G, rtol=1e-4, atol=1e-6 * np.abs(ref.G).max())
    finally:
        carry.close()


# ------------------------------------------------------------------------------------------- quantize from text
def test_cli_quantizes_the_decoder_from_text_to_matmulnbits(tiny, tmp_path, capsys):
    from onnxcomq.capture.text import text_feeds

    d, hf, path = tiny
    out = tmp_path / "w4.onnx"
    rc = main(["quantize", str(path), "-o", str(out), "--calib", str(d / "calib.txt"), "--tokenizer", str(hf),
               "--bits", "4", "--granularity", "block", "--block-size", "32", "--format", "matmulnbits",
               "--device", "cpu", "-q"])
    assert rc == 0, capsys.readouterr().err
    float_model, q = onnx.load(path), onnx.load(out)
    inits = {t.name for t in float_model.graph.initializer}
    weighted = [n.name for n in float_model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    nbits = [n for n in q.graph.node if n.op_type == "MatMulNBits"]
    cfg = _config(hf)
    assert len(weighted) == 7 * cfg["num_hidden_layers"] + 1  # q k v o gate up down per layer, lm_head
    head = [n for n in weighted if "lm_head" in n]
    assert len(head) == 1
    assert len(nbits) == len(weighted) - 1 + _head_quantized()
    assert all(next(a.i for a in n.attribute if a.name == "block_size") == 32 for n in nbits)
    left = [n.name for n in q.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    assert left == ([] if _head_quantized() else head)
    # held-out text, with the empty caches: logits against float on the real tokens
    feeds = text_feeds(d / "heldout.txt", hf, path, batch_size=8)
    fs, qs = _session(path), _session(out)
    names = [o.name for o in fs.get_outputs()]
    assert names == [o.name for o in qs.get_outputs()]
    cos = []
    for f in feeds:
        a, b = fs.run(None, f), qs.run(None, f)
        assert all(np.isfinite(x).all() for x in b)
        cos.append(_real_cosine(a[0], b[0], f["attention_mask"]))
    print(f"W4 block-32 MatMulNBits logits cosine to float on held-out text: {min(cos):.4f}")
    assert min(cos) > W4_BLOCK32_MIN_COSINE
    assert min(cos) < 1 - 1e-6  # (really quantized)


def test_text_calibration_through_the_api_counts_real_tokens_only(tiny):
    """onnxcomq.run takes a TextCalibration: every layer's statistics hold one row per real token of the samples
    (the padding left out), and COMQ's error is below rounding's."""
    from tokenizers import Tokenizer

    import onnxcomq
    from onnxcomq.capture.text import TextCalibration

    d, hf, path = tiny
    lines = [s.strip() for s in (d / "calib.txt").read_text(encoding="utf-8").splitlines() if s.strip()][:16]
    tokens = sum(min(len(Tokenizer.from_file(str(hf / "tokenizer.json")).encode(s).ids), 512) for s in lines)
    src = TextCalibration(d / "calib.txt", hf, max_samples=16)
    _, report = onnxcomq.run(str(path), src, Recipe(weights=Weights(bits=4, granularity="block", block_size=32)))
    assert report.samples == 16
    assert len(report.layers) == 7 * _config(hf)["num_hidden_layers"] + _head_quantized()
    assert all(r.rows == tokens for r in report.layers), (tokens, [r.rows for r in report.layers])
    assert all(r.comq_error <= r.rtn_error for r in report.layers)
    assert sum(r.comq_error for r in report.layers) < sum(r.rtn_error for r in report.layers)


# ----------------------------------------------------------------------------------------------- input checks
@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A small BPE tokenizer (tokenizers only) in a folder, with a pad token."""
    tokenizers = pytest.importorskip("tokenizers", reason="text calibration needs the tokenizers library")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<pad>"], show_progress=False)
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 4 + ["hello world"] * 4, trainer)
    d = tmp_path_factory.mktemp("tok")
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad>"}))
    return d


def _decoder_stub(extra=(), cache_shape=("batch", 2, "past", 8), mask=True):
    """A model with a decoder's inputs (input_ids, attention_mask, one past_key_values pair) and ``extra`` ones;
    one MatMul on the gathered embeddings."""
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])]
    if mask:
        inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]))
    inputs += [helper.make_tensor_value_info(f"past_key_values.0.{k}", TensorProto.FLOAT, list(cache_shape))
               for k in ("key", "value")]
    inputs += [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"]) for n in extra]
    rng = np.random.default_rng(0)
    inits = [onnx.numpy_helper.from_array(rng.standard_normal((120, 8)).astype(np.float32), "emb"),
             onnx.numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w")]
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["h"]), helper.make_node("MatMul", ["h", "w"], ["y"])]
    graph = helper.make_graph(nodes, "stub", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_text_feeds_for_a_model_without_position_ids(tok_dir, tmp_path):
    from onnxcomq.capture.text import text_feeds

    (tmp_path / "t.txt").write_text("hello world\n\n  \nthe quick brown fox\n", encoding="utf-8")
    feeds = text_feeds(tmp_path / "t.txt", tok_dir, _decoder_stub(), batch_size=8)
    assert len(feeds) == 1 and set(feeds[0]) == {"input_ids", "attention_mask", "past_key_values.0.key",
                                                  "past_key_values.0.value"}
    assert feeds[0]["input_ids"].shape[0] == 2  # the blank lines are no samples
    assert feeds[0]["past_key_values.0.key"].shape == (2, 2, 0, 8)
    pad = json.loads((tok_dir / "tokenizer.json").read_text())["model"]["vocab"]["<pad>"]
    assert feeds[0]["input_ids"][1, -1] == pad and feeds[0]["attention_mask"][1, -1] == 0


@pytest.mark.parametrize("case,fragment", [
    ("unknown input", "token_type_ids"),
    ("dynamic cache dims", "past_key_values.0.key"),
])
def test_text_calibration_refuses_inputs_it_cannot_feed(tok_dir, tmp_path, case, fragment):
    from onnxcomq.capture.text import TextCalibration

    model = _decoder_stub(extra=("token_type_ids",)) if case == "unknown input" else \
        _decoder_stub(cache_shape=("batch", 2, "past", "head"))
    (tmp_path / "t.txt").write_text("hello world\n", encoding="utf-8")
    with pytest.raises(UserError, match=fragment) as e:
        Calibration(TextCalibration(tmp_path / "t.txt", tok_dir), model_inputs(model))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("bias", [False, True])
def test_cache_dims_from_group_query_attention(tok_dir, tmp_path, bias):
    """onnxruntime-genai writes the head size as a dynamic dim (kv_cache_dim): it is read from the
    GroupQueryAttention node (kv_num_heads; packed q|k|v width / (num_heads + 2 kv_num_heads))."""
    from onnxcomq.capture.text import text_feeds

    heads, kv, size = 6, 2, 5
    model = _decoder_stub(cache_shape=("batch", kv, "past", "kv_cache_dim"))
    g = model.graph
    width = (heads + 2 * kv) * size
    g.initializer.append(onnx.numpy_helper.from_array(np.zeros((8, width), np.float32), "wqkv"))
    g.node.append(helper.make_node("MatMul", ["h", "wqkv"], ["qkv0" if bias else "qkv"]))
    if bias:
        g.initializer.append(onnx.numpy_helper.from_array(np.zeros(width, np.float32), "bqkv"))
        g.node.append(helper.make_node("Add", ["bqkv", "qkv0"], ["qkv"]))
    g.node.append(helper.make_node("GroupQueryAttention", ["qkv", "", "", "past_key_values.0.key",
                                                           "past_key_values.0.value", "seqlens", "total"],
                                   ["attn", "present.0.key", "present.0.value"], domain="com.microsoft",
                                   num_heads=heads, kv_num_heads=kv))
    (tmp_path / "t.txt").write_text("hello world\nthe lazy dog\n", encoding="utf-8")
    feeds = text_feeds(tmp_path / "t.txt", tok_dir, model, batch_size=4)
    assert feeds[0]["past_key_values.0.key"].shape == (2, kv, 0, size)
    assert feeds[0]["past_key_values.0.value"].shape == (2, kv, 0, size)


def test_missing_tokenizers_library_is_one_clear_line(tmp_path, monkeypatch):
    from onnxcomq.capture.text import load_tokenizer

    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(UserError, match="pip install tokenizers"):
        load_tokenizer(tmp_path)


def test_cli_text_mistakes_are_one_line(tok_dir, tmp_path, capsys):
    onnx.save(_decoder_stub(), tmp_path / "m.onnx")
    (tmp_path / "t.txt").write_text("hello world\n", encoding="utf-8")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    (tmp_path / "empty.txt").write_text("\n \n", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    out = tmp_path / "out.onnx"
    base = ["quantize", str(tmp_path / "m.onnx"), "-o", str(out), "--device", "cpu", "-q"]
    cases = [
        (["--calib", str(tmp_path / "t.txt")], "--tokenizer"),
        (["--calib", str(tmp_path / "t.txt"), "--tokenizer", str(tmp_path / "nowhere")], "no tokenizer"),
        (["--calib", str(tmp_path / "t.txt"), "--tokenizer", str(tmp_path)], "no tokenizer"),
        (["--calib", str(tmp_path / "t.txt"), "--tokenizer", str(tmp_path / "bad")], "cannot read the tokenizer"),
        (["--calib", "random", "--tokenizer", str(tok_dir)], "--tokenizer"),
        (["--calib", str(tmp_path / "empty.txt"), "--tokenizer", str(tok_dir)], "no sample"),
        (["--calib", str(tmp_path / "latin1.txt"), "--tokenizer", str(tok_dir)], "not UTF-8"),
        (["--calib", str(tmp_path / "none.txt"), "--tokenizer", str(tok_dir)], "not found"),
    ]
    failures = []
    for args, fragment in cases:
        rc = main(base + args)
        err = capsys.readouterr().err
        lines = builders.error_lines(err)
        if not (rc == 2 and len(lines) == 1 and lines[0].startswith("onnxcomq: error:") and fragment in lines[0]
                and "Traceback" not in err):
            failures.append(f"{args}: rc={rc} {err.strip()[-300:]!r}")
    assert not failures, "\n".join(failures)
    assert not out.exists()
    # and the same stub quantizes from text (the cache dims are static there)
    rc = main(base + ["--calib", str(tmp_path / "t.txt"), "--tokenizer", str(tok_dir), "--bits", "8"])
    assert rc == 0, capsys.readouterr().err
    assert out.exists()


# ---------------------------------------------------------------------------------------------- onnxruntime-genai
@pytest.mark.slow
def test_genai_export_quantized_from_text_generates(tiny, tmp_path, capsys):
    """The model builder's decoder (GroupQueryAttention, head size a dynamic dim): text calibration (and random
    feeds) read the cache dims from the attention node; the quantized model, beside the builder's genai_config.json, loads in
    onnxruntime-genai and generates 8 tokens."""
    og = pytest.importorskip("onnxruntime_genai", reason="needs onnxruntime-genai (tools/test.sh installs 0.15.2)")
    d, hf, _ = tiny
    gen = tmp_path / "genai"
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(gen), "-p", "fp32",
           "-e", "cpu", "-c", str(tmp_path / "cache")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if r.returncode != 0 and ("cannot import name" in r.stderr or "No module named" in r.stderr):
        pytest.skip(f"this onnxruntime-genai's builder does not run with this transformers: {r.stderr[-200:]}")
    assert r.returncode == 0, r.stderr[-2000:]
    model = onnx.load(gen / "model.onnx", load_external_data=False)
    assert any(n.op_type == "GroupQueryAttention" for n in model.graph.node)
    qdir = tmp_path / "q"
    qdir.mkdir()
    for f in os.listdir(gen):
        if not f.startswith("model.onnx"):
            shutil.copy(gen / f, qdir / f)
    rc = main(["quantize", str(gen / "model.onnx"), "-o", str(qdir / "model.onnx"), "--calib", str(d / "calib.txt"),
               "--tokenizer", str(hf), "--bits", "4", "--granularity", "block", "--block-size", "32", "--format",
               "matmulnbits", "--device", "cpu", "-q"])
    assert rc == 0, capsys.readouterr().err
    # random feeds also take the empty caches' heads and head size from the attention node (they were 1: onnxruntime
    # refused "past_key dimension 3 should match the packed KV head dimension")
    rc = main(["quantize", str(gen / "model.onnx"), "-o", str(tmp_path / "random.onnx"), "--calib", "random",
               "--max-samples", "2", "--bits", "4", "--granularity", "block", "--block-size", "32", "--format",
               "matmulnbits", "--device", "cpu", "-q"])
    assert rc == 0, capsys.readouterr().err
    q = onnx.load(qdir / "model.onnx")
    nbits = sum(n.op_type == "MatMulNBits" for n in q.graph.node)
    assert nbits == 5 * _config(hf)["num_hidden_layers"] + _head_quantized()  # q|k|v o gate up down, lm_head
    m = og.Model(str(qdir))
    ids = [1, 40, 50, 60, 70]
    params = og.GeneratorParams(m)
    params.set_search_options(max_length=len(ids) + 8, do_sample=False)
    g = og.Generator(m, params)
    g.append_tokens(ids)
    while not g.is_done():
        g.generate_next_token()
    seq = list(g.get_sequence(0))
    assert seq[:len(ids)] == ids and len(seq) == len(ids) + 8
    assert all(0 <= t < _config(hf)["vocab_size"] for t in seq)
