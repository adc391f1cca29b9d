#!/usr/bin/env bash
# Set up a fresh machine: apt packages, a virtual environment with every extra, torch pinned to
# the CPU wheel. Idempotent: a second run only checks.
set -euo pipefail
PY="${1:-python3}"
VENV="${2:-.venv}"
cd "$(dirname "$0")/.."

missing=()
while read -r pkg; do
  [[ -z "$pkg" || "$pkg" == \#* ]] && continue
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done < requirements/apt.txt
if (( ${#missing[@]} )); then
  echo "installing apt packages: ${missing[*]}"
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get update -q && $SUDO apt-get install -y -q "${missing[@]}"
fi

[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip setuptools wheel
# torch first and pinned: an unpinned resolve would pull a multi-GB CUDA build.
"$VENV/bin/pip" install -q "torch==2.13.0"
"$VENV/bin/pip" install -q -e ".[all]"
echo "environment ready in $VENV"

# The old TFLite runtime that devices stuck on numpy < 2 still run: tflite-runtime 2.14 cannot live beside
# numpy 2, so it gets its own small environment, where the converter validates every TFLite variant too
# (converter/workers.py finds it here, or through EDGEFLEET_TFLITE_RUNTIME_PYTHON).
TFLITE_VENV="${TFLITE_VENV:-.venv-tflite214}"
if ! "$TFLITE_VENV/bin/python" -c "import tflite_runtime.interpreter" >/dev/null 2>&1; then
  [[ -x "$TFLITE_VENV/bin/python" ]] || "$PY" -m venv "$TFLITE_VENV"
  if "$TFLITE_VENV/bin/pip" install -q "tflite-runtime==2.14.0" "numpy<2"; then
    echo "tflite-runtime 2.14 environment ready in $TFLITE_VENV"
  else
    echo "warning: tflite-runtime 2.14 has no wheel for $("$PY" --version) here: TFLite variants will be" \
         "validated on LiteRT only (set EDGEFLEET_TFLITE_RUNTIME_PYTHON to a python 3.9-3.11 environment with it)" >&2
  fi
fi
