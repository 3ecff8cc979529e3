"""The command line: help, the main job on the shipped model, and clear one-line errors for user mistakes."""

import hashlib
import json
import os
import subprocess
import sys

import builders
import numpy as np
import onnx
import pytest
from builders import recipe, recipe_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CNN = os.path.join(ROOT, "models", "fmnist_cnn.onnx")
CALIB = os.path.join(ROOT, "models", "fmnist_calib.npz")
TEST = os.path.join(ROOT, "models", "fmnist_test.npz")


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "onnxcomq.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=600)


def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_help_reads_well():
    r = cli("--help")
    assert r.returncode == 0 and "quantize" in r.stdout and "eval" in r.stdout
    r = cli("quantize", "--help")
    assert r.returncode == 0
    for flag in ("--bits", "--granularity", "--block-size", "--scheme", "--format", "--act-bits", "--target",
                 "--preset", "--recipe", "--report", "--device", "--exclude", "--calib", "--batch-size"):
        assert flag in r.stdout
    # the expert knobs live in the recipe, and the help quotes no benchmark figures
    for knob in ("--order", "--sweeps", "--damping", "--sequential", "--mp-bits", "--act-method", "KL ", "measured"):
        assert knob not in r.stdout, knob
    r = cli("recipe", "--help")
    assert r.returncode == 0 and "--dump" in r.stdout and "--schema" in r.stdout


def test_quantize_and_eval_shipped_cnn(tmp_path):
    out = tmp_path / "cnn.w8.onnx"
    rep = tmp_path / "report.json"
    before = digest(CNN)
    r = cli("quantize", CNN, "-o", out, "--calib", CALIB, "--bits", "8", "--report", rep, "--max-samples", "128",
            "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert digest(CNN) == before
    assert "COMQ err" in r.stdout and "RTN err" in r.stdout
    data = json.loads(rep.read_text())
    assert data["samples"] == 128 and len(data["layers"]) == 6
    for layer in data["layers"]:
        assert layer["comq_error"] <= layer["rtn_error"]
    onnx.checker.check_model(str(out), full_check=True)
    assert os.path.getsize(out) < os.path.getsize(CNN) / 3
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(out).st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    r = cli("eval", out, "--data", TEST)
    assert r.returncode == 0 and "top-1 accuracy" in r.stdout
    acc = float(r.stdout.split("accuracy")[1].split("%")[0])
    assert acc > 85


def _bad_cases(tmp):
    """(name, args, expected message fragment) for user mistakes; every one must fail cleanly."""
    x = np.random.default_rng(0).standard_normal((4, 1, 28, 28)).astype(np.float32)
    np.savez(tmp / "wrongkey.npz", image=x)
    np.savez(tmp / "wrongshape.npz", input=x[:, :, :20])
    np.savez(tmp / "wrongrank.npz", input=x[:, 0])
    np.savez(tmp / "empty.npz", input=x[:0])
    nan = x.copy()
    nan[0, 0, 0, 0] = np.nan
    np.savez(tmp / "nan.npz", input=nan)
    np.savez(tmp / "strings.npz", input=np.array(["a", "b"]))
    np.save(tmp / "pickled.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.savez(tmp / "pickled.npz", input=np.array([{"a": 1}], dtype=object))
    (tmp / "notonnx.onnx").write_bytes(b"this is not a model")
    with open(CNN, "rb") as f:
        (tmp / "truncated.onnx").write_bytes(f.read()[:5000])
    (tmp / "garbage.npz").write_bytes(b"PK\x03\x04garbage")
    m = builders.attention_like()
    onnx.save(m, tmp / "attn.onnx")
    inf = x.copy()
    inf[1, 0, 3, 3] = np.inf
    np.savez(tmp / "inf.npz", input=inf)
    (tmp / "emptydir").mkdir()
    (tmp / "calib.csv").write_text("1 2 3")
    np.savez(tmp / "mixed.npz", input=x, extra=x)
    out = tmp / "out.onnx"
    return [
        ("model is a folder", [tmp, "-o", out, "--calib", CALIB], "is a directory"),
        ("output is a folder", [CNN, "-o", tmp, "--calib", CALIB], "is a directory"),
        ("inf", [CNN, "-o", out, "--calib", tmp / "inf.npz"], "NaN or Inf"),
        ("calib folder empty", [CNN, "-o", out, "--calib", tmp / "emptydir"], "holds no .npz or .npy"),
        ("calib not npz", [CNN, "-o", out, "--calib", tmp / "calib.csv"], "must be .npz"),
        ("extra key", [CNN, "-o", out, "--calib", tmp / "mixed.npz"], "unexpected extra"),
        ("already quantized", [tmp / "quantized.onnx", "-o", out, "--calib", CALIB], "already quantized"),
        ("max samples 0", [CNN, "-o", out, "--calib", CALIB, "--max-samples", "0"], "max samples"),
        ("missing model", [tmp / "nope.onnx", "-o", out, "--calib", CALIB], "model file not found"),
        ("not onnx", [tmp / "notonnx.onnx", "-o", out, "--calib", CALIB], "not a valid ONNX model"),
        ("truncated", [tmp / "truncated.onnx", "-o", out, "--calib", CALIB], "not a valid ONNX model"),
        ("missing calib", [CNN, "-o", out, "--calib", tmp / "nope.npz"], "calibration file not found"),
        ("wrong key", [CNN, "-o", out, "--calib", tmp / "wrongkey.npz"], "missing input; unexpected image"),
        ("wrong shape", [CNN, "-o", out, "--calib", tmp / "wrongshape.npz"], "axis 2: 20 != 28"),
        ("wrong rank", [CNN, "-o", out, "--calib", tmp / "wrongrank.npz"], "has rank 3"),
        ("empty", [CNN, "-o", out, "--calib", tmp / "empty.npz"], "is empty"),
        ("nan", [CNN, "-o", out, "--calib", tmp / "nan.npz"], "NaN or Inf"),
        ("strings", [CNN, "-o", out, "--calib", tmp / "strings.npz"], "expects float32"),
        ("pickle npz", [CNN, "-o", out, "--calib", tmp / "pickled.npz"], "pickled"),
        ("pickle npy", [CNN, "-o", out, "--calib", tmp / "pickled.npy"], "pickled"),
        ("garbage npz", [CNN, "-o", out, "--calib", tmp / "garbage.npz"], "cannot read calibration data"),
        ("output is input", [CNN, "-o", CNN, "--calib", CALIB], "output path is the input model"),
        ("missing out dir", [CNN, "-o", tmp / "no" / "x.onnx", "--calib", CALIB], "does not exist"),
        ("bits 1", [CNN, "-o", out, "--calib", CALIB, "--bits", "1"], "bits must be"),
        ("bits 9", [CNN, "-o", out, "--calib", CALIB, "--bits", "9"], "bits must be"),
        ("sweeps 0", [CNN, "-o", out, "--calib", CALIB, *recipe_args(tmp, sweeps=0)], "sweeps must be"),
        ("lambda 0", [CNN, "-o", out, "--calib", CALIB, *recipe_args(tmp, lam=0, lambda_search=False)],
         "lambda must be"),
        ("batch 0", [CNN, "-o", out, "--calib", CALIB, "--batch-size", "0"], "batch size"),
        ("op types", [CNN, "-o", out, "--calib", CALIB, *recipe_args(tmp, op_types=("Conv2d",))],
         "unsupported op type"),
        ("nothing left", [tmp / "attn.onnx", "-o", out, "--calib", "random", "--exclude", "*_proj"],
         "no quantizable layer"),
        ("tensor + groups", [CNN, "-o", out, "--calib", CALIB, "--granularity", "tensor", "--max-samples", "8"],
         "per-tensor granularity with 64 conv groups"),
        # option combinations the emitter cannot express
        ("3-bit MatMulNBits", [CNN, "-o", out, "--calib", CALIB, "--bits", "3", "--granularity", "block",
                               "--format", "matmulnbits"], "supports 2/4/8 bits"),
        ("MatMulNBits block 24", [CNN, "-o", out, "--calib", CALIB, "--granularity", "block", "--block-size", "24",
                                  "--format", "matmulnbits"], "power of two >= 16"),
        ("MatMulNBits per channel", [CNN, "-o", out, "--calib", CALIB, "--format", "matmulnbits"],
         "needs --granularity block"),
        ("tensorrt asym", [CNN, "-o", out, "--calib", CALIB, "--bits", "8", "--act-bits", "8", "--target", "tensorrt",
                           "--scheme", "asym"], "symmetric int8"),
        ("tensorrt W4A8", [CNN, "-o", out, "--calib", CALIB, "--bits", "4", "--act-bits", "8", "--target",
                           "tensorrt"], "INT4 only as weight-only"),
        ("tensorrt W4 per channel", [CNN, "-o", out, "--calib", CALIB, "--bits", "4", "--target", "tensorrt"],
         "only block-wise"),
        ("budget above 8", [CNN, "-o", out, "--calib", CALIB, *recipe_args(tmp, avg_bits=9)],
         "avg_bits must be between"),
        ("layer-bits no match", [CNN, "-o", out, "--calib", CALIB, *recipe_args(tmp, layer_bits=("nomatch*=8",))],
         "matches no quantized layer"),
        ("stages 0", [CNN, "-o", out, "--calib", CALIB, *recipe_args(tmp, sequential=True, stages=0)], "stages must be"),
        ("lambda solves 0", [CNN, "-o", out, "--calib", CALIB, *recipe_args(tmp, lambda_solves=0)], "lambda_solves must be"),
        ("lambda solves 8", [CNN, "-o", out, "--calib", CALIB, *recipe_args(tmp, lambda_solves=8)], "lambda_solves must be"),
        ("correction strength 2", [CNN, "-o", out, "--calib", CALIB,
                                   *recipe_args(tmp, sequential=True, correction_strength=2)],
         "correction strength must be"),
        ("damping scale inf", [CNN, "-o", out, "--calib", CALIB, *recipe_args(tmp, damping_scale=float("inf"))],
         "damping scale must be a finite number"),
        ("recipe typo", [CNN, "-o", out, "--calib", CALIB, *recipe_args(tmp, sweeps=2)[:1], tmp / "nope.yaml"],
         "cannot read the recipe"),
        # ("act option alone" is gone: an activation setting exists only inside the activations section, which it
        # turns on)
    ]


def test_bad_input_corpus(tmp_path):
    import onnxcomq

    small = builders.mlp_model([6, 5, 4])
    onnx.save(onnxcomq.quantize(small, "random", recipe(bits=8, device="cpu")),
              tmp_path / "quantized.onnx")
    cases = _bad_cases(tmp_path)
    inputs = {p: digest(p) for p in (CNN, CALIB)}
    failures = []
    for name, args, fragment in cases:
        r = cli("quantize", *args, "--device", "cpu")
        lines = builders.error_lines(r.stderr)
        ok = (r.returncode == 2 and len(lines) == 1 and lines[0].startswith("onnxcomq: error:")
              and fragment in lines[0] and "Traceback" not in r.stderr)
        if not ok:
            failures.append(f"{name}: rc={r.returncode} stderr={r.stderr.strip()[-300:]!r}")
    assert not failures, "\n".join(failures)
    leftovers = [f for f in os.listdir(tmp_path) if f.endswith(".onnx") and f not in
                 ("notonnx.onnx", "truncated.onnx", "attn.onnx", "quantized.onnx")] + \
        [f for f in os.listdir(tmp_path) if f.startswith(".onnxcomq-")]
    assert leftovers == []
    assert {p: digest(p) for p in inputs} == inputs
    assert len(cases) >= 25


def test_random_calibration_warns_loudly(tmp_path):
    r = cli("quantize", CNN, "-o", tmp_path / "r.onnx", "--calib", "random", "--max-samples", "4", "--device", "cpu",
            "--quiet")
    assert r.returncode == 0, r.stderr
    assert "RANDOM" in r.stderr


def test_output_is_byte_identical_across_runs(tmp_path):
    args = ["--calib", CALIB, "--max-samples", "32", "--bits", "4", "--quiet", "--device", "cpu"]
    assert cli("quantize", CNN, "-o", tmp_path / "a.onnx", *args).returncode == 0
    assert cli("quantize", CNN, "-o", tmp_path / "b.onnx", *args).returncode == 0
    assert digest(tmp_path / "a.onnx") == digest(tmp_path / "b.onnx")


@pytest.mark.parametrize("source", ["folder", "iterable", "reader"])
def test_calibration_sources_agree(tmp_path, source):
    from onnxruntime.quantization import CalibrationDataReader

    import onnxcomq

    d = np.load(CALIB)["input"][:24]
    cfg = recipe(bits=4, batch_size=8, device="cpu")
    base = onnxcomq.quantize(CNN, {"input": d}, cfg).SerializeToString()
    if source == "folder":
        for i in range(3):
            np.savez(tmp_path / f"part{i}.npz", input=d[8 * i:8 * (i + 1)])
        src = str(tmp_path)
    elif source == "iterable":
        src = [{"input": d[i:i + 5]} for i in range(0, 24, 5)]
    else:
        class Reader(CalibrationDataReader):
            def __init__(self):
                self.it = iter([{"input": d[i:i + 6]} for i in range(0, 24, 6)])

            def get_next(self):
                return next(self.it, None)

        src = Reader()
    assert onnxcomq.quantize(CNN, src, cfg).SerializeToString() == base
