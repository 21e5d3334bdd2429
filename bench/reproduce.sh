#!/usr/bin/env bash
# Reproduces every table of docs/benchmarks.md from a clean checkout, in one command:
#   bash bench/reproduce.sh
# Installs saeflow into .venv (as README's set-up commands do) and the peers into
# bench/.peers-venv when missing, then runs every benchmark the docs quote, in turn: the three
# training benchmarks, generate, loader, the step, its profile, features, S3 reads and ranks
# (about an hour on 2 CPU cores; bench/gpu.py needs a GPU and runs apart). Results:
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
.venv/bin/python bench/features_throughput.py
.venv/bin/python bench/remote_read.py
.venv/bin/python bench/distributed_scaling.py
