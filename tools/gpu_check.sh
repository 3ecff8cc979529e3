#!/usr/bin/env bash
# The GPU checks in one command, for a machine with an NVIDIA GPU, CuPy and onnxruntime (pip install -e ".[gpu,test]"):
# the GPU-marked tests (the solver, layer, capture and whole-run cases on CuPy), then the solver and Gram benchmark,
# NumPy on the CPU against CuPy on the GPU (tools/bench/gpu.py), then a whole 7B-width 2-block run if exported.
# Sized to finish within 10 minutes on an H100 (not yet timed there); --quick: benchmark shapes 16x smaller.
# Python: $PYTHON, else .venv/bin/python, else python.
# Usage: bash tools/gpu_check.sh [--quick]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
if ! "$PY" -c "import sys; from onnxcomq.solve.backend import gpu_available; sys.exit(not gpu_available())"; then
  echo "gpu_check.sh: no usable GPU (CuPy with a CUDA device) for $PY" >&2
  exit 1
fi
rc=0
echo "== GPU tests: pytest -m gpu"
"$PY" -m pytest -q -ra -p no:cacheprovider -m gpu tests || rc=1
echo "== solver: COMQ sweep vs GEMM, NumPy (CPU) and CuPy (GPU)"
"$PY" tools/bench/gpu.py --device both "$@" || rc=1
echo "== solver: a layer's 7 lambda candidates solved one by one against stacked (k = 2, 3, 7), CuPy"
"$PY" tools/bench/stack.py --device gpu --repeats 2 || rc=1
echo "== whole run: the 7B-width 2-block export, W4 block-128 MatMulNBits, capture and solve on the GPU"
M=out/llm/7b/optimum/model.onnx
if [ -f "$M" ] && [ -f out/llm/7b/calib.txt ]; then
  start=$(date +%s)
  "$PY" -m onnxcomq.cli quantize "$M" -o out/llm/7b/gpu_w4.onnx --device gpu --calib out/llm/7b/calib.txt \
    --tokenizer out/llm/7b/hf --bits 4 --granularity block --block-size 128 --format matmulnbits \
    --max-samples 16 --max-memory 8G --report out/llm/7b/gpu_w4.json || rc=1
  echo "whole run: $(( $(date +%s) - start )) s (report: out/llm/7b/gpu_w4.json)"
else
  echo "skipped: $M not found (python tools/export/llm.py --size 7b --exporters optimum makes it, ~3 min)"
fi
exit "$rc"
