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
set +e
.venv/bin/python -m pytest -q -ra "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
