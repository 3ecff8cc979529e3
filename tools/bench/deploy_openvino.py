"""Run onnxcomq's outputs in OpenVINO beside onnxruntime: the cosine of OpenVINO's outputs to onnxruntime's on the
same file, and of each to the float model's (docs/benchmarks.md, "OpenVINO").

    pip install openvino        # (not a dependency of onnxcomq)
    python tools/bench/deploy_openvino.py --model out/effnet_lite0.onnx --calib out/effnet_calib.npz \
        --data out/effnet_eval.npz --variant "W4:--bits 4" --variant "W8A8:--bits 8 --act-bits 8"
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def cosine(a, b) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--data", required=True, help=".npz with the model's inputs (its first --samples are run)")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--variant", action="append", required=True, help="LABEL:onnxcomq quantize options")
    a = ap.parse_args(argv)
    import onnx
    import openvino as ov

    from onnxcomq.capture.session import make_session
    from onnxcomq.cli import main as cli

    data = np.load(a.data)
    float_session = make_session(onnx.load(a.model))
    feed = {i.name: data[i.name][:a.samples] for i in float_session.get_inputs()}
    ref = float_session.run(None, feed)[0]
    core = ov.Core()
    print("| variant | OpenVINO vs onnxruntime | onnxruntime vs float | OpenVINO vs float |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for v in a.variant:
            label, _, opts = v.partition(":")
            out = os.path.join(tmp, f"{len(os.listdir(tmp))}.onnx")
            if cli(["quantize", a.model, "-o", out, "--calib", a.calib, "--quiet", *shlex.split(opts)]):
                raise SystemExit(f"onnxcomq failed on variant {label}")
            got = make_session(onnx.load(out)).run(None, feed)[0]
            try:
                compiled = core.compile_model(out, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
                o = compiled.create_infer_request().infer(feed)[compiled.outputs[0]]
                print(f"| {label} | {cosine(o, got):.6f} | {cosine(got, ref):.4f} | {cosine(o, ref):.4f} |")
            except Exception as e:  # (OpenVINO's conversion errors)
                print(f"| {label} | not loaded: {' '.join(str(e).split())[-160:]} | {cosine(got, ref):.4f} | - |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
