#!/usr/bin/env bash
# Set up .venv with onnxcomq, quantize the shipped Fashion-MNIST CNN to 4 bits with COMQ, and print what it achieved
# (float vs quantized top-1 accuracy and file size). Extra arguments go to `onnxcomq quantize` (e.g. --bits 3).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_venv.sh
mkdir -p out
.venv/bin/onnxcomq quantize models/fmnist_cnn.onnx -o out/fmnist_cnn.w4.onnx --calib models/fmnist_calib.npz \
  --bits 4 --report out/fmnist_cnn.w4.json "$@"
echo
echo "float:     $(.venv/bin/onnxcomq eval models/fmnist_cnn.onnx --data models/fmnist_test.npz)"
echo "quantized: $(.venv/bin/onnxcomq eval out/fmnist_cnn.w4.onnx --data models/fmnist_test.npz)"
echo "size:      $(stat -c %s models/fmnist_cnn.onnx) bytes -> $(stat -c %s out/fmnist_cnn.w4.onnx) bytes"
