#!/usr/bin/env bash
# Smoke check of the peer adapters: seeded synthetic rows (200k x 384), both adapters for ~200k
# tokens, then check_output.py (loads the safetensors, FVU must be < 1). Outputs: bench/out/smoke.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="$HERE/../.peers-venv/bin/python"
OUT="${1:-$HERE/../out/smoke}"
TOKENS="${TOKENS:-204800}"
mkdir -p "$OUT"

[ -f "$OUT/acts.npy" ] || "$PY" "$HERE/make_smoke_acts.py" --out "$OUT/acts.npy" --rows 200000 --d 384 --dirs 3000
for tool in saelens sparsify; do
  "$PY" "$HERE/train_$tool.py" --acts "$OUT/acts.npy" --out "$OUT/$tool" \
    --k 32 --expansion 8 --batch-size 4096 --tokens "$TOKENS" 2>"$OUT/$tool.log"
  "$PY" "$HERE/check_output.py" --acts "$OUT/acts.npy" --sae "$OUT/$tool"
done
