"""Tokens/s of 1 rank against 2 ranks (torchrun, gloo on the CPU, nccl on CUDA) for generate and train.

On the CPU the comparison is at equal total threads: 1 rank with N threads against 2 ranks with
N/2 threads each, on the same machine in one run, so the ratio is the cost of the ranks'
collectives, part stores and merge (no speed-up is expected from splitting the same cores):
goal >= 0.9. Generate is timed end to end (the command's wall time, model load and merge
included); train by the tokens/s of its log windows (median; the 2-rank log counts every rank's
rows). With --device cuda, one rank per GPU (torchrun --nproc_per_node 1 and 2 when there are
two GPUs) and tokens/s per GPU are printed.

    .venv/bin/python bench/distributed_scaling.py [--tokens N] [--device cpu|cuda] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "minilm-docstrings.yaml"


def command(ranks: int, *args: str) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks > 1 \
        else [sys.executable]
    return [*launcher, "-m", "pipeline.cli", *args]


def run(ranks: int, threads: int, args: list[str], cwd: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
    began = time.perf_counter()
    result = subprocess.run(command(ranks, *args), cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{' '.join(args)} on {ranks} rank(s) failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - began


def train_tokens_per_second(run_dir: Path) -> float:
    records = [json.loads(line) for line in (run_dir / "sae" / "train_log.jsonl").read_text().splitlines()]
    return statistics.median(record["tokens_per_second"] for record in records[1:] or records)  # first window warms up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=262_144, help="rows generated and trained on")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="CPU threads in all, split over the ranks")
    args = parser.parse_args()
    two = 2
    if args.device == "cuda":
        import torch

        two = 2 if torch.cuda.device_count() >= 2 else 0
    settings = ["--set", f"generate.target_tokens={args.tokens}", "--set", f"train.total_tokens={args.tokens}",
                "--set", f"model.device={args.device}", "--set", f"sae.device={args.device}",
                "--set", "train.checkpoint_every_tokens=null", "--set", "train.sweep=[]", "--set", "train.log_every_steps=8"]
    print(f"{args.tokens} tokens of {CONFIG.name}; device {args.device}; {args.threads} CPU threads in all; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        tmp = Path(tmp)
        rates: dict[tuple[str, int], float] = {}
        for ranks in [1, two] if two else [1]:
            threads = max(args.threads // ranks, 1)
            store = [*settings, "--set", f"generate.store={tmp / f'store-{ranks}.zarr'}"]
            seconds = run(ranks, threads, ["generate", str(CONFIG), *store], REPO)
            rates["generate", ranks] = args.tokens / seconds
            out = tmp / f"run-{ranks}"
            run(ranks, threads, ["train", str(CONFIG), *store, "--set", f"train.out_dir={out}"], REPO)
            rates["train", ranks] = train_tokens_per_second(out)
            print(f"{ranks} rank(s) x {threads} thread(s): generate {rates['generate', ranks]:,.0f} tok/s end to end, "
                  f"train {rates['train', ranks]:,.0f} tok/s ({rates['train', ranks] / ranks:,.0f} per rank)")
    if not two:
        print(f"one GPU: generate {rates['generate', 1]:,.0f} tok/s, train {rates['train', 1]:,.0f} tok/s per GPU")
        print(f"train tokens/s per GPU: {rates['train', 1]:,.0f} (goal > 0)")
        return
    print(f"generate 2 ranks / 1 rank tokens/s: {rates['generate', 2] / rates['generate', 1]:.2f}")
    print(f"train 2 ranks / 1 rank tokens/s: {rates['train', 2] / rates['train', 1]:.2f} (goal >= 0.9 at equal threads)")


if __name__ == "__main__":
    main()
