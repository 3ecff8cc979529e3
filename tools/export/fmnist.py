#!/usr/bin/env python3
"""Train the small Fashion-MNIST reference models shipped under ``models/``.

This script produces the float ONNX models and the data files that the
onnxcomq tests and examples use:

``models/fmnist_cnn.onnx``
    A ~96k-parameter CNN (3x3 convs with bias, a strided conv, a depthwise
    3x3 conv followed by a 1x1 pointwise conv, max pooling, global average
    pooling, Linear classifier).  Exported with the TorchScript exporter
    (``dynamo=False``); BatchNorm is folded into the preceding convs.
``models/fmnist_vit.onnx``
    A ~200k-parameter Vision Transformer (4x4 patch embedding, class token,
    learned position embedding, 4 pre-norm encoder blocks built from plain
    ``nn.Linear`` layers with hand-written MatMul/Softmax attention, GELU
    MLP, Linear head).  Exported with the dynamo exporter (``dynamo=True``).
``models/fmnist_calib.npz``
    ``input``: float32 [512, 1, 28, 28], a seeded random sample of the
    *training* set, meant for calibration.
``models/fmnist_test.npz``
    ``input``: float32 [2000, 1, 28, 28] and ``labels``: int64 [2000], a
    seeded random sample of the official t10k *test* set.

Both ONNX models use opset 17, input name ``input`` (float32
[N, 1, 28, 28], normalized as ``(x / 255 - 0.2860) / 0.3530``), output name
``logits`` (float32 [N, 10]) and a dynamic batch dimension.

The defaults reproduce the shipped files (CPU, 2 threads, fixed seeds)::

    python tools/export/fmnist.py

Requires torch, onnx, onnxruntime and (for the dynamo exporter) onnxscript.
The data defaults to the Debian ``dataset-fashion-mnist`` package location.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist"
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT_DIR = REPO_ROOT / "models"

# Fashion-MNIST training-set pixel statistics (after scaling to [0, 1]).
MEAN = 0.2860
STD = 0.3530
OPSET = 17
NUM_CLASSES = 10


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------
def _read_idx(path: Path) -> np.ndarray:
    """Read a gzip-compressed IDX file (ubyte data) into a numpy array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    if magic >> 8 != 0x08:  # 0x08 == unsigned byte
        raise ValueError(f"{path}: unsupported IDX data type (magic {magic:#x})")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    arr = np.frombuffer(data, dtype=np.uint8, offset=offset)
    return arr.reshape(dims)


def load_split(data_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (images float32 [N,1,28,28] normalized, labels int64 [N])."""
    images = _read_idx(data_dir / f"{split}-images-idx3-ubyte.gz")
    labels = _read_idx(data_dir / f"{split}-labels-idx1-ubyte.gz")
    x = (images.astype(np.float32) / 255.0 - MEAN) / STD
    x = x.reshape(-1, 1, 28, 28).astype(np.float32)
    return x, labels.astype(np.int64)


# --------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------
def conv_bn_relu(cin: int, cout: int, k: int = 3, stride: int = 1,
                 groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups,
                  bias=True),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class FmnistCNN(nn.Module):
    """Small CNN: 28x28 -> 14x14 (strided conv) -> 7x7 (max pool) -> GAP."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_relu(1, 32),                    # 28x28
            conv_bn_relu(32, 64, stride=2),         # 14x14, strided conv
            conv_bn_relu(64, 64, groups=64),        # depthwise 3x3
            conv_bn_relu(64, 96, k=1),              # pointwise 1x1
            nn.MaxPool2d(2),                        # 7x7
            conv_bn_relu(96, 80),                   # 7x7
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(80, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.pool(x).flatten(1)
        return self.classifier(x)


class Attention(nn.Module):
    """Multi-head self-attention written with plain Linear/MatMul/Softmax."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        assert dim % heads == 0
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim)
        qkv = qkv.permute(2, 0, 3, 1, 4)            # 3, B, H, N, Dh
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = torch.matmul(q, k.transpose(-2, -1)) * self.scale
        attn = torch.softmax(attn, dim=-1)
        out = torch.matmul(attn, v)                 # B, H, N, Dh
        out = out.transpose(1, 2).reshape(b, n, d)
        return self.proj(out)


class Block(nn.Module):
    """Pre-norm transformer encoder block."""

    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        x = x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
        return x


class FmnistViT(nn.Module):
    """Tiny ViT: 4x4 patches (7x7 grid = 49 tokens) + class token."""

    def __init__(self, dim: int = 64, depth: int = 4, heads: int = 4,
                 mlp_dim: int = 256, patch: int = 4) -> None:
        super().__init__()
        num_patches = (28 // patch) ** 2
        self.patch_embed = nn.Conv2d(1, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.blocks = nn.Sequential(
            *[Block(dim, heads, mlp_dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, NUM_CLASSES)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)   # B, 49, D
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        x = self.blocks(x)
        x = self.norm(x[:, 0])
        return self.head(x)


# --------------------------------------------------------------------------
# Training / evaluation
# --------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def torch_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   batch: int = 1000) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        correct += (model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item()
    return correct / len(x)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int,
          lr: float, weight_decay: float, batch: int, seed: int,
          warmup_frac: float = 0.1) -> None:
    """AdamW + linear warmup + cosine decay, stepped per batch."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(x) / batch)
    total = epochs * steps_per_epoch
    warmup = max(1, int(warmup_frac * total))

    def lr_lambda(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        t0 = time.time()
        run_loss = 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * batch:(i + 1) * batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            run_loss += loss.item()
        print(f"  epoch {epoch + 1}/{epochs}: loss {run_loss / steps_per_epoch:.4f}"
              f" ({time.time() - t0:.1f}s)", flush=True)


# --------------------------------------------------------------------------
# Export / verification
# --------------------------------------------------------------------------
def export_onnx(model: nn.Module, path: Path, dynamo: bool) -> str:
    """Export with the requested exporter, falling back to the other one.

    Returns a short description of the exporter actually used.
    """
    model.eval()
    example = torch.zeros(2, 1, 28, 28)
    path.parent.mkdir(parents=True, exist_ok=True)

    def _export(use_dynamo: bool) -> None:
        common = dict(input_names=["input"], output_names=["logits"],
                      opset_version=OPSET, dynamo=use_dynamo)
        if use_dynamo:
            batch = torch.export.Dim("batch", min=1, max=65536)
            torch.onnx.export(model, (example,), str(path),
                              dynamic_shapes={"x": {0: batch}},
                              external_data=False, optimize=True, **common)
        else:
            torch.onnx.export(model, (example,), str(path),
                              dynamic_axes={"input": {0: "batch"},
                                            "logits": {0: "batch"}},
                              do_constant_folding=True, **common)

    name = "dynamo (dynamo=True)" if dynamo else "TorchScript (dynamo=False)"
    try:
        _export(dynamo)
        return name
    except Exception as exc:  # pragma: no cover - depends on torch version
        other = "TorchScript (dynamo=False)" if dynamo else "dynamo (dynamo=True)"
        print(f"  WARNING: {name} export failed ({type(exc).__name__}: {exc});"
              f" falling back to {other}", file=sys.stderr)
        _export(not dynamo)
        return other + " [fallback]"


def check_onnx(path: Path, model: nn.Module, x: np.ndarray) -> dict:
    """Validate the ONNX file and compare ORT output with torch."""
    m = onnx.load(str(path))
    onnx.checker.check_model(m, full_check=True)
    opset = {o.domain or "ai.onnx": o.version for o in m.opset_import}
    graph = m.graph
    inits = {i.name for i in graph.initializer}
    if [i.name for i in graph.input] != ["input"]:
        raise RuntimeError(f"unexpected graph inputs {[i.name for i in graph.input]}")
    if [o.name for o in graph.output] != ["logits"]:
        raise RuntimeError(f"unexpected graph outputs {[o.name for o in graph.output]}")
    in_dim0 = graph.input[0].type.tensor_type.shape.dim[0]
    if not in_dim0.dim_param:
        raise RuntimeError("batch dimension of 'input' is not dynamic")
    # Weights of Conv / Gemm / MatMul-with-weight must be initializers.
    for node in graph.node:
        if node.op_type in ("Conv", "Gemm") and node.input[1] not in inits:
            raise RuntimeError(f"{node.op_type} {node.name}: weight is not an initializer")
    ops = collections.Counter(n.op_type for n in graph.node)
    n_const_matmul = sum(1 for n in graph.node
                         if n.op_type == "MatMul" and n.input[1] in inits)

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    out = sess.run(["logits"], {"input": x})[0]
    diff = float(np.abs(out - ref).max())
    # Also try a different batch size to exercise the dynamic axis.
    out1 = sess.run(["logits"], {"input": x[:1]})[0]
    diff = max(diff, float(np.abs(out1 - ref[:1]).max()))
    if diff >= 1e-4:
        raise RuntimeError(f"ORT vs torch max abs diff {diff:.3e} >= 1e-4")
    return dict(ops=ops, opset=opset, max_abs_diff=diff,
                const_matmul=n_const_matmul, n_init=len(inits))


def onnx_accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = np.concatenate([sess.run(["logits"], {"input": x[i:i + 500]})[0]
                             for i in range(0, len(x), 500)])
    return float((logits.argmax(1) == y).mean())


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=Path(DEFAULT_DATA_DIR),
                   help="directory holding the Fashion-MNIST IDX .gz files")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR,
                   help="where to write the .onnx and .npz files")
    p.add_argument("--models", nargs="+", choices=["cnn", "vit"],
                   default=["cnn", "vit"], help="which models to train")
    p.add_argument("--seed", type=int, default=0, help="global random seed")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--cnn-epochs", type=int, default=3)
    p.add_argument("--cnn-lr", type=float, default=3e-3)
    p.add_argument("--vit-epochs", type=int, default=3)
    p.add_argument("--vit-lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--n-calib", type=int, default=512,
                   help="calibration images drawn from the training set")
    p.add_argument("--n-test", type=int, default=2000,
                   help="test images drawn from the t10k set")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)

    x_train, y_train = load_split(args.data_dir, "train")
    x_test, y_test = load_split(args.data_dir, "t10k")
    print(f"train {x_train.shape}, test {x_test.shape}")

    # Data files (independent RNG so they do not depend on which models run).
    rng = np.random.default_rng(args.seed)
    calib_idx = np.sort(rng.choice(len(x_train), args.n_calib, replace=False))
    test_idx = np.sort(rng.choice(len(x_test), args.n_test, replace=False))
    np.savez_compressed(out / "fmnist_calib.npz", input=x_train[calib_idx])
    x_sub, y_sub = x_test[test_idx], y_test[test_idx]
    np.savez_compressed(out / "fmnist_test.npz", input=x_sub, labels=y_sub)

    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    xv, yv = torch.from_numpy(x_test), torch.from_numpy(y_test)

    specs = {
        "cnn": dict(cls=FmnistCNN, epochs=args.cnn_epochs, lr=args.cnn_lr,
                    dynamo=False),
        "vit": dict(cls=FmnistViT, epochs=args.vit_epochs, lr=args.vit_lr,
                    dynamo=True),
    }
    results = {}
    for name in args.models:
        spec = specs[name]
        torch.manual_seed(args.seed)
        model = spec["cls"]()
        n_params = count_params(model)
        print(f"\n[{name}] {n_params} parameters, training {spec['epochs']} epochs",
              flush=True)
        t0 = time.time()
        train(model, xt, yt, epochs=spec["epochs"], lr=spec["lr"],
              weight_decay=args.weight_decay, batch=args.batch_size,
              seed=args.seed)
        train_s = time.time() - t0
        model.eval()
        acc_full = torch_accuracy(model, xv, yv)
        print(f"[{name}] trained in {train_s:.1f}s, torch test acc (10k) "
              f"{acc_full:.4f}", flush=True)

        path = out / f"fmnist_{name}.onnx"
        exporter = export_onnx(model, path, spec["dynamo"])
        info = check_onnx(path, model, x_sub[:64])
        acc_onnx = onnx_accuracy(path, x_sub, y_sub)
        print(f"[{name}] exported with {exporter}: opset {info['opset']}, "
              f"ORT vs torch max abs diff {info['max_abs_diff']:.2e}")
        print(f"[{name}] ops: {dict(sorted(info['ops'].items()))}")
        results[name] = dict(params=n_params, train_s=train_s, acc_full=acc_full,
                             acc_onnx=acc_onnx, exporter=exporter, path=path,
                             **info)

    print("\n=== Summary ===")
    for name, r in results.items():
        print(f"{name}: params {r['params']}, train {r['train_s']:.0f}s, "
              f"torch acc 10k {r['acc_full']:.4f}, ONNX acc {args.n_test}-subset "
              f"{r['acc_onnx']:.4f}, exporter {r['exporter']}, "
              f"max|ORT-torch| {r['max_abs_diff']:.1e}")
    total = 0
    for f in sorted(out.iterdir()):
        if f.name.startswith("fmnist_"):
            size = f.stat().st_size
            total += size
            print(f"  {f.relative_to(out.parent) if out.parent in f.parents else f}"
                  f"  {size / 1024:.1f} KiB")
    print(f"  total {total / 1024 / 1024:.2f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
