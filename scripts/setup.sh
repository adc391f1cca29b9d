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
