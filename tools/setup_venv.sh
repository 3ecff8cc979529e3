#!/usr/bin/env bash
# Create .venv (if missing) and install onnxcomq into it with the given extras, e.g. `tools/setup_venv.sh test`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e ".${1:+[$1]}"
