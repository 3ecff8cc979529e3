#!/usr/bin/env bash
# Set up .venv with onnxcomq and its test extra, then run the whole test suite.
# Usage: bash tools/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_venv.sh test
# a real Paddle2ONNX model for tests/test_ocr_real.py (its models only; the test is skipped where this fails)
.venv/bin/python -m pip install -q --no-deps rapidocr-onnxruntime==1.4.4 \
  || echo "rapidocr-onnxruntime not installed: tests/test_ocr_real.py will be skipped" >&2
# a real audio front end (openwakeword's melspectrogram.onnx) for tests/test_audio_real.py, its models only
.venv/bin/python -m pip install -q --no-deps openwakeword==0.5.1 \
  || echo "openwakeword not installed: tests/test_audio_real.py will be skipped" >&2
# a tiny Llama exported with torch.onnx, and onnxruntime-genai's model builder (0.15.2: later builders need
# transformers 5), for tests/test_llm.py (the tests that need them are skipped where this fails); onnxscript for
# torch.onnx's dynamo exporter (tests/test_branches.py: torch.cond as an If)
.venv/bin/python -m pip install -q torch==2.13.0 transformers==4.57.6 onnxruntime-genai==0.15.2 onnx-ir \
  onnxscript==0.7.2 \
  || echo "torch/transformers/onnxruntime-genai not installed: tests/test_llm.py will skip the exported models" >&2
# Ray, for the --workers ray cases of tests/test_workers.py (a local cluster of 2 CPUs; skipped where this fails)
.venv/bin/python -m pip install -q ray==2.60.0 \
  || echo "ray not installed: tests/test_workers.py will skip its Ray cases" >&2
set +e
.venv/bin/python -m pytest -q -ra "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
