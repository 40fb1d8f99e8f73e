#!/usr/bin/env bash
# Idempotent set-up: system OpenBLAS on Linux (MLX's CPU wheel ships a slow reference BLAS),
# a virtual environment in .venv, and the package in editable mode. `--dev` adds test tools.
set -euo pipefail
cd "$(dirname "$0")"
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"

if [ "$(uname -s)" = "Linux" ] && ! ldconfig -p 2>/dev/null | grep -q 'libopenblas.so.0'; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    echo "install.sh: installing libopenblas0-pthread (fast BLAS for MLX on Linux)"
    (apt-get install -y -qq libopenblas0-pthread >/dev/null 2>&1) || \
      (apt-get update -qq && apt-get install -y -qq libopenblas0-pthread >/dev/null)
  else
    echo "install.sh: warning: OpenBLAS not found and cannot apt-get as non-root; MLX will use its slow reference BLAS" >&2
  fi
fi

py=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$py" -m venv .venv
stamp=".venv/.agp-installed${extras}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e ".${extras}"
  touch "$stamp"
fi
