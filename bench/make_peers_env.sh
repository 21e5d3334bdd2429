#!/usr/bin/env bash
# Builds bench/.peers-venv: the peer SAE trainers (SAELens, EleutherAI sparsify) in their own
# environment, so their dependency pins never touch saeflow's .venv. Idempotent: re-running only
# re-checks the pins. torch is held to the cached CPU wheel via constraints.txt (an unconstrained
# resolve pulls GBs of CUDA wheels).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
VENV="$HERE/.peers-venv"

# Exact versions verified to train on CPU here. transformer-lens is pinned because sae-lens 6.x
# needs transformer-lens < 4 and 3.9.0 is the one measured to work.
PEER_PINS=(
  "sae-lens==6.54.12"
  "transformer-lens==3.9.0"
  "eai-sparsify==1.3.3"
  "numpy"
  "safetensors"
)

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi

"$VENV/bin/python" -m pip install --quiet -c "$ROOT/constraints.txt" "torch==2.13.0"
"$VENV/bin/python" -m pip install --quiet -c "$ROOT/constraints.txt" "${PEER_PINS[@]}"

"$VENV/bin/python" - <<'PY'
from importlib.metadata import version
for name in ("torch", "sae-lens", "transformer-lens", "eai-sparsify", "numpy", "safetensors"):
    print(f"{name}=={version(name)}")
PY
