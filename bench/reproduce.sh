#!/usr/bin/env bash
# Reproduces every table of docs/benchmarks.md from a clean checkout, in one command:
#   bash bench/reproduce.sh
# Installs saeflow into .venv (as README's set-up commands do) and the peers into
# bench/.peers-venv when missing, then runs the three training benchmarks and the generate,
# loader and step benchmarks in turn (~32 minutes on 2 CPU cores). Results:
# bench/out/<name>/result.json and the printed tables.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if [ ! -x .venv/bin/saeflow ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q -c constraints.txt -e '.[dev]'
fi
bash bench/make_peers_env.sh

.venv/bin/python bench/compare_peers.py "$@"
.venv/bin/python bench/train_throughput.py
.venv/bin/python bench/init_ablation.py
.venv/bin/python bench/generate_overhead.py
.venv/bin/python bench/loader_throughput.py
.venv/bin/python bench/sae_step.py
.venv/bin/python bench/profile_step.py
