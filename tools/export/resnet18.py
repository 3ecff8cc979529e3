#!/usr/bin/env python
"""Export a randomly initialized ResNet-18 (Hugging Face transformers) to ONNX and write a calibration .npz.

The weights are random (seeded), so accuracy is meaningless: this model is for timing and memory benchmarks only.
The calibration images are smooth random images (low-resolution noise upsampled bilinearly to 224x224, normalized
with the ImageNet mean/std), which give activations closer to real images than white noise.

    python tools/export/resnet18.py                                          # out/resnet18.onnx + 64 images
    python tools/export/resnet18.py --skip-model --samples 512 --calib-out out/resnet18_calib512.npz

Needs torch and transformers (``pip install transformers==4.57.6``); writes only under the given paths.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(1, 3, 1, 1)


def build_model(seed: int):
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(seed)
    cfg = ResNetConfig(layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512], num_labels=1000)
    model = ResNetForImageClassification(cfg).eval()
    return model


def _logits_only(model):
    """Wrap the HF model so the exported graph has one output, ``logits``."""
    import torch

    class LogitsOnly(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, pixel_values):
            return self.m(pixel_values=pixel_values, return_dict=False)[0]

    return LogitsOnly(model).eval()


def export(model, path: str, opset: int = 17) -> str:
    """Export with the TorchScript exporter (dynamo=False); fall back to dynamo=True. Returns which one worked."""
    import torch

    wrapped = _logits_only(model)
    dummy = torch.randn(1, 3, 224, 224)
    tmp = path + ".tmp"
    errors = []
    for dynamo in (False, True):
        try:
            kw = dict(input_names=["pixel_values"], output_names=["logits"], opset_version=opset)
            if dynamo:
                kw["dynamic_shapes"] = {"pixel_values": {0: torch.export.Dim("batch", min=1, max=4096)}}
                kw["external_data"] = False
            else:
                kw["dynamic_axes"] = {"pixel_values": {0: "batch"}, "logits": {0: "batch"}}
            with torch.no_grad():
                torch.onnx.export(wrapped, (dummy,), tmp, dynamo=dynamo, **kw)
            os.replace(tmp, path)
            return "dynamo=True" if dynamo else "dynamo=False"
        except Exception as e:  # noqa: BLE001 - try the other exporter
            errors.append(f"dynamo={dynamo}: {type(e).__name__}: {e}")
            if os.path.exists(tmp):
                os.remove(tmp)
    raise RuntimeError("ONNX export failed:\n" + "\n".join(errors))


def check(path: str, model) -> float:
    """onnx.checker plus a numerical comparison against torch on two images; returns max |diff|."""
    import onnx
    import onnxruntime as ort
    import torch

    m = onnx.load(path)
    onnx.checker.check_model(m, full_check=True)
    names = [i.name for i in m.graph.input]
    outs = [o.name for o in m.graph.output]
    if names != ["pixel_values"] or outs != ["logits"]:
        raise RuntimeError(f"unexpected graph I/O: inputs {names}, outputs {outs}")
    x = smooth_images(2, seed=123)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    y_ort = sess.run(None, {"pixel_values": x})[0]
    with torch.no_grad():
        y_pt = model(pixel_values=torch.from_numpy(x)).logits.numpy()
    return float(np.abs(y_ort - y_pt).max())


def smooth_images(n: int, seed: int = 0, size: int = 224, low: int = 14) -> np.ndarray:
    """n smooth random RGB images in [0, 1] (upsampled low-res noise plus a little fine noise), ImageNet-normalized,
    float32 NCHW."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, size, size), np.float32)
    # bilinear upsampling matrix from `low` to `size` (align_corners=False convention)
    src = (np.arange(size) + 0.5) * low / size - 0.5
    src = np.clip(src, 0, low - 1)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, low - 1)
    f = (src - i0).astype(np.float32)
    U = np.zeros((size, low), np.float32)
    U[np.arange(size), i0] += 1 - f
    U[np.arange(size), i1] += f
    for k in range(n):
        coarse = rng.random((3, low, low), dtype=np.float32)
        # a random per-image contrast and brightness, so images differ in statistics too
        coarse = 0.5 + (coarse - 0.5) * rng.uniform(0.5, 1.5) + rng.uniform(-0.2, 0.2)
        img = U @ coarse @ U.T
        img += 0.03 * rng.standard_normal(img.shape, dtype=np.float32)
        out[k] = np.clip(img, 0.0, 1.0)
    return ((out - MEAN) / STD).astype(np.float32)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-out", default=os.path.join("out", "resnet18.onnx"), help="ONNX path to write")
    ap.add_argument("--calib-out", default=None,
                    help="calibration .npz to write (default: out/resnet18_calib.npz for 64 samples, "
                         "out/resnet18_calib<N>.npz otherwise)")
    ap.add_argument("--samples", type=int, default=64, help="calibration images (default: 64)")
    ap.add_argument("--seed", type=int, default=0, help="seed for the weights and the images (default: 0)")
    ap.add_argument("--opset", type=int, default=17)
    ap.add_argument("--skip-model", action="store_true", help="only write the calibration data")
    ap.add_argument("--skip-calib", action="store_true", help="only export the model")
    a = ap.parse_args(argv)
    if a.samples < 1:
        ap.error("--samples must be positive")
    calib_out = a.calib_out or os.path.join(
        "out", "resnet18_calib.npz" if a.samples == 64 else f"resnet18_calib{a.samples}.npz")

    if not a.skip_model:
        os.makedirs(os.path.dirname(os.path.abspath(a.model_out)), exist_ok=True)
        t0 = time.perf_counter()
        model = build_model(a.seed)
        t_build = time.perf_counter() - t0
        n_params = sum(p.numel() for p in model.parameters())
        t0 = time.perf_counter()
        how = export(model, a.model_out, a.opset)
        t_export = time.perf_counter() - t0
        t0 = time.perf_counter()
        diff = check(a.model_out, model)
        t_check = time.perf_counter() - t0
        print(f"model: ResNet-18 (random init, seed {a.seed}), {n_params / 1e6:.2f} M parameters; "
              f"build {t_build:.2f} s, export ({how}, opset {a.opset}) {t_export:.2f} s, checker + ORT-vs-torch "
              f"{t_check:.2f} s (max |diff| {diff:.2e}); wrote {a.model_out} "
              f"({os.path.getsize(a.model_out) / 1e6:.1f} MB)")
        if diff > 1e-3:
            print(f"warning: onnxruntime and torch disagree by {diff:.2e}", file=sys.stderr)

    if not a.skip_calib:
        os.makedirs(os.path.dirname(os.path.abspath(calib_out)), exist_ok=True)
        t0 = time.perf_counter()
        x = smooth_images(a.samples, seed=a.seed + 1)
        tmp = calib_out + ".tmp.npz"
        np.savez(tmp, pixel_values=x)
        os.replace(tmp, calib_out)
        print(f"calib: {a.samples} smooth random images {list(x.shape)} float32 (mean {x.mean():.3f}, "
              f"std {x.std():.3f}) in {time.perf_counter() - t0:.2f} s; wrote {calib_out} "
              f"({os.path.getsize(calib_out) / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
