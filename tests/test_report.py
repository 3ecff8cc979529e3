"""The report a person reads: the per-layer table, the summary lines, the size with external data, the PNG, and the
progress lines written to logs."""

import os
import struct
import sys

import builders
import onnx
import pytest

from onnxcomq import progress
from onnxcomq.report import (
    LayerReport,
    PlotUnavailable,
    Report,
    format_table,
    model_files,
    model_size,
    png_path,
    png_size,
    summary,
    write_png,
)


def _layer(i, bits=4, note="", rtn_groups=0, comq=None, rtn=None, damped=True):
    comq = 1e-3 * (1 + i % 7) if comq is None else comq
    rtn = 2e-3 * (1 + i % 5) if rtn is None else rtn
    return LayerReport(node=f"/block{i}/conv", op_type="Conv", weight=f"w{i}", shape=[16, 8, 3, 3], groups=1,
                       bits=bits, rows=512, comq_error=comq, rtn_error=rtn, seconds=0.01 * i, granularity="channel",
                       note=note, rtn_groups=rtn_groups, damped=damped, damping=0.01)


def _report(layers, verification=None, opset=None, **config):
    cfg = {"method": "comq", "bits": 4, "granularity": "channel", "scheme": "symmetric",
           "opset": opset or {"input": 17, "output": 17, "reason": ""}, **config}
    r = Report(layers, [], cfg, samples=64, capture_seconds=1.0, solve_seconds=2.0, total_seconds=3.5)
    r.verification = verification or {}
    return r


# -- the table --------------------------------------------------------------------------------------------------


def test_table_drops_the_damped_and_rtn_markers_and_keeps_the_columns():
    text = format_table(_report([_layer(0, rtn_groups=1), _layer(1)]))
    assert "(damped)" not in text and "(rtn" not in text
    header = text.splitlines()[0].split()
    assert header == ["layer", "op", "shape", "bits", "rows", "COMQ", "err", "RTN", "err", "COMQ/RTN", "time", "s"]
    rows = text.splitlines()[2:]
    assert len(rows) == 2 and rows[0].split()[7] == f"{1e-3 / 2e-3:.3f}"


def test_table_shows_a_note_column_only_for_real_notes():
    text = format_table(_report([_layer(0, bits=8, note="mixed precision: 8 bits"), _layer(1)]))
    lines = text.splitlines()
    assert lines[0].split()[-1] == "note"
    assert lines[2].endswith("mixed precision: 8 bits")
    assert not lines[3].endswith(" ")  # no padding after the last real column
    assert set(lines[1]) == {"-"} and len(lines[1]) == max(len(line) for line in lines)


# -- the size with external data --------------------------------------------------------------------------------


def test_model_size_counts_external_data(tmp_path):
    m = builders.mlp_model([32, 64, 64, 10])
    plain = builders.save(m, tmp_path / "plain.onnx")
    assert model_files(plain) == [plain] and model_size(plain) == os.path.getsize(plain)

    path = str(tmp_path / "ext.onnx")
    onnx.save_model(m, path, save_as_external_data=True, all_tensors_to_one_file=True, location="ext.onnx.data",
                    size_threshold=0)
    data = tmp_path / "ext.onnx.data"
    assert data.stat().st_size > os.path.getsize(path)  # the weights are in the data file
    assert model_size(path) == os.path.getsize(path) + data.stat().st_size
    assert model_size(path) > 0.9 * model_size(plain)
    (tmp_path / "not_a_model.onnx").write_bytes(b"\x0a\x08location garbage")  # looks like external data: is not
    assert model_size(tmp_path / "not_a_model.onnx") == len(b"\x0a\x08location garbage")


def test_model_size_counts_each_file_once_and_subgraph_tensors(tmp_path):
    m = builders.with_if_subgraph()
    sub = tmp_path / "models"
    sub.mkdir()
    path = str(sub / "m.onnx")
    onnx.save_model(m, path, save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
    files = model_files(path)
    names = sorted(os.path.basename(f) for f in files[1:])
    assert names == sorted(p.name for p in sub.iterdir() if p.name != "m.onnx")
    assert {"W0", "Wthen", "Welse"} <= set(names)  # the If branches' weights too
    assert model_size(path) == sum(p.stat().st_size for p in sub.iterdir())


def test_summary_counts_external_data_in_the_size_line(tmp_path):
    m = builders.mlp_model([64, 256, 256, 10])
    src = builders.save(m, tmp_path / "float.onnx")
    out = str(tmp_path / "q.onnx")
    onnx.save_model(m, out, save_as_external_data=True, all_tensors_to_one_file=True, location="q.onnx.data",
                    size_threshold=0)
    size_line = summary(_report([_layer(0)]), src, out)[-1]
    mb_in, mb_out = model_size(src) / 1e6, model_size(out) / 1e6
    assert f"size {mb_in:.2f} MB -> {mb_out:.2f} MB" in size_line and "with external data" in size_line
    assert "0.0x" not in size_line
    assert f"wrote {out}" in size_line


# -- the summary lines ------------------------------------------------------------------------------------------


def test_summary_says_what_matters_after_the_table(tmp_path):
    src = builders.save(builders.mlp_model([8, 8, 4]), tmp_path / "a.onnx")
    ver = {"samples": 16, "outputs": [{"name": "logits", "finite": True, "cosine": 0.9991, "rel_error": 0.04}]}
    rep = _report([_layer(0, rtn_groups=1), _layer(1), _layer(2, rtn_groups=2)], verification=ver,
                  opset={"input": 11, "output": 13, "reason": "per-channel DequantizeLinear axis"})
    rep.skipped = [{"node": "emb", "op_type": "Gather", "reason": "embedding lookup", "share": 0.25}]
    lines = summary(rep, src, src)
    text = "\n".join(lines)
    assert "(damped)" not in text and "(rtn" not in text
    assert any(line.startswith("not quantized: 1 Gather node holding 25.0 % of the weights") for line in lines)
    assert "round-to-nearest kept for some groups in 2 of 3 layer(s)" in text
    assert "opset raised 11 -> 13 for per-channel DequantizeLinear axis" in text
    assert "check against float on 16 calibration sample(s): logits: cosine 0.9991" in text
    assert "(1.0x smaller)" in lines[-1] and "external data" not in lines[-1]
    assert "round-to-nearest kept" not in "\n".join(summary(_report([_layer(0)]), src, src))


# -- the PNG ----------------------------------------------------------------------------------------------------


def test_png_path():
    assert png_path("out/report.json") == os.path.join("out", "report.png")
    assert png_path("r.JSON") == "r.png"
    assert png_path("report") == "report.png"
    assert png_path("a.v2/report") == "a.v2/report.png"
    assert png_path("r.png") == "r.png.png"  # never the JSON's own path


def _png_dims(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])  # width, height


@pytest.mark.parametrize("n", [5, 40, 500])
def test_write_png(tmp_path, n):
    pytest.importorskip("matplotlib")
    import matplotlib.image

    layers = [_layer(i, bits=8 if i % 11 == 0 else 4, rtn_groups=int(i % 13 == 0)) for i in range(n)]
    layers[1].comq_error = layers[1].rtn_error = 0.0  # zero errors have no place on a log axis: left out
    layers[2].rtn_error = float("nan")
    ver = {"samples": 16, "outputs": [{"name": "logits", "finite": True, "cosine": 0.9991, "rel_error": 0.04}]}
    rep = _report(layers, verification=ver)
    rep.avg_bits = 4.3
    path = tmp_path / "report.png"
    assert write_png(rep, path) == str(path)
    assert path.stat().st_size > 1000
    w, h = _png_dims(path)
    assert (w, h) == png_size(n)
    img = matplotlib.image.imread(str(path))
    assert img.shape[:2] == (h, w)  # rows are the height
    assert img.std() > 0.01  # something is drawn
    assert [p.name for p in tmp_path.iterdir()] == ["report.png"]  # no temporary file left


def test_write_png_without_layers(tmp_path):
    pytest.importorskip("matplotlib")
    write_png(_report([]), tmp_path / "r.png")
    assert _png_dims(tmp_path / "r.png") == png_size(0)


def test_png_needs_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    with pytest.raises(ImportError, match="needs matplotlib") as e:
        write_png(_report([_layer(0)]), tmp_path / "r.png")
    assert isinstance(e.value, PlotUnavailable)
    assert not (tmp_path / "r.png").exists()


# -- progress ---------------------------------------------------------------------------------------------------


def test_progress_off_when_quiet():
    assert progress.enabled_for(False) and not progress.enabled_for(True)
    assert progress.bar(False, total=10, desc="capture", unit="sample") is None


def test_progress_lines_when_stderr_is_not_a_terminal(capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    b = progress.bar(True, total=512, desc="capture", unit="sample")
    assert isinstance(b, progress.LineProgress)
    for _ in range(8):
        b.update(64)
    b.close()
    b.close()  # twice: one end line
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert lines[0] == "onnxcomq: capture: 0/512 samples"
    assert lines[-1].startswith("onnxcomq: capture: 512/512 samples in ") and lines[-1].endswith(" s")
    assert len(lines) == 2 and "\r" not in err  # a quick stage: its start and its end


def test_progress_lines_at_most_every_interval(capsys):
    now = [0.0]
    with progress.LineProgress(None, "solve", "layer", clock=lambda: now[0]) as b:
        for _ in range(100):
            now[0] += 0.5  # 50 s in all: a line every 10 s
            b.update(1)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "onnxcomq: solve: 0 layers"
    assert lines[1] == "onnxcomq: solve: 20 layers (10 s)"
    assert len(lines) == 2 + 5 and lines[-1] == "onnxcomq: solve: 100 layers in 50.0 s"


def test_progress_is_tqdm_on_a_terminal():
    b = progress.bar(True, total=3, desc="solve", unit="layer", tty=True)
    try:
        from tqdm import tqdm
        assert isinstance(b, tqdm) and not b.leave and b.dynamic_ncols
        with b:
            b.update(2)
        assert b.n == 2
    finally:
        b.close()


def test_progress_survives_a_closed_stderr(monkeypatch):
    import io
    s = io.StringIO()
    s.close()
    b = progress.LineProgress(2, "capture", "sample", stream=s)
    b.update(2)
    b.close()
    assert b.closed


def test_a_long_solve_advances_the_progress_line(monkeypatch, capsys):
    """Off a terminal, the solve line names the layer and its sweep between layers (every INTERVAL_S; here 0)."""
    import functools

    import numpy as np

    import onnxcomq
    from onnxcomq import progress

    monkeypatch.setattr(progress, "LineProgress", functools.partial(progress.LineProgress, interval=0.0))
    x = np.load(os.path.join(os.path.dirname(__file__), "..", "models", "fmnist_calib.npz"))["input"][:8]
    r = onnxcomq.Recipe().updated({"solver": {"sweeps": 2, "lambda_solves": 1}})
    onnxcomq.run(os.path.join(os.path.dirname(__file__), "..", "models", "fmnist_cnn.onnx"), {"input": x}, r,
                 progress=True)
    err = capsys.readouterr().err
    assert "onnxcomq: solve: 0/6 layers (0 s) [/features/features.0/features.0.0/Conv: sweep 1]" in err
    assert "[/classifier/Gemm: sweep 2]" in err and "sweep 3]" not in err
