#!/usr/bin/env bash
# Create .venv with everything perceiver-vlm needs (offline-capable machine with PyPI access).
#
#   bash scripts/install.sh            # .venv in the checkout, ~3-5 min the first time
#   PVLM_VENV_CACHE=~/.cache/pvlm bash scripts/install.sh
#                                      # reuse a venv keyed on pyproject.toml; .venv links to it
#
# torch and torchvision are pinned as a pair: an unpinned torchvision silently moves torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

install_deps() {  # $1: venv dir
  "$PYTHON" -m venv "$1"
  "$1/bin/pip" install --quiet --upgrade pip setuptools wheel
  "$1/bin/pip" install --quiet "torch==2.14.1" "torchvision==0.29.1"
  "$1/bin/pip" install --quiet ".[dev,eval,bench]"
  # open-flamingo pins old torch/transformers; its code runs on ours (it needs einops, einops-exts: the
  # bench extra). Only the OpenFlamingo parity tests import it; vlm.convert.load_open_flamingo does not.
  "$1/bin/pip" install --quiet --no-deps "open-flamingo==2.0.1"
  "$1/bin/pip" uninstall --quiet -y perceiver-vlm
}

if [ -n "${PVLM_VENV_CACHE:-}" ]; then
  key=$(cat pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)
  venv="$PVLM_VENV_CACHE/venv-$key"
  if [ ! -f "$venv/.complete" ]; then
    rm -rf "$venv"
    mkdir -p "$PVLM_VENV_CACHE"
    install_deps "$venv"
    touch "$venv/.complete"
  fi
  [ -L .venv ] || [ ! -e .venv ] || rm -rf .venv
  ln -sfn "$venv" .venv
elif [ ! -f .venv/.complete ]; then
  rm -rf .venv
  install_deps .venv
  touch .venv/.complete
fi
# The package itself, editable, so the checkout is what runs.
.venv/bin/pip install --quiet --no-deps --no-build-isolation -e .
echo "perceiver-vlm installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
