"""Tokens/s of 1 rank against 2 ranks (torchrun, gloo on the CPU, nccl on CUDA) for generate and train.

On the CPU the comparison is at equal total threads: 1 rank with N threads against 2 ranks with
N/2 threads each, on the same machine in one run, so the ratio is the cost of the ranks'
collectives, part stores and merge (no speed-up is expected from splitting the same cores):
goal >= 0.9. Generate is timed end to end (the command's wall time, model load and merge
included), once per side. Train runs --rounds times per side, the two sides alternating (1 then
2 ranks, then 2 then 1, ...) on the same store (the 1-rank one: the 2-rank store holds the same
rows bitwise), each run read off its log windows of 8 steps: the median of every window but the
first (warm-up: first steps, loader start, DDP's bucket set-up), on both sides; the 2-rank log
counts every rank's rows. A round's ratio pairs two runs next to each other in time; the figure
is the median over rounds, printed with its spread and every run's window spread, because other
processes on a small machine move single runs by 10-30%. With --device cuda, one rank per GPU
(torchrun --nproc_per_node 1 and 2 when there are two GPUs) and tokens/s per GPU are printed.

    .venv/bin/python bench/distributed_scaling.py [--tokens N] [--device cpu|cuda] [--threads N] [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from host import print_host

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "minilm-docstrings.yaml"


def command(ranks: int, *args: str) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks > 1 \
        else [sys.executable]
    return [*launcher, "-m", "pipeline.cli", *args]


def run(ranks: int, threads: int, args: list[str], cwd: Path) -> tuple[float, float]:
    """(wall seconds, the share of the machine's cores other processes used meanwhile): a busy
    host slows 1 rank's 2 threads (each waits for the slower) more than 2 ranks of 1 thread."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
    began, busy, ours = time.perf_counter(), busy_cpu_seconds(), children_cpu_seconds()
    result = subprocess.run(command(ranks, *args), cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{' '.join(args)} on {ranks} rank(s) failed:\n{result.stderr[-3000:]}")
    wall = time.perf_counter() - began
    others = (busy_cpu_seconds() - busy) - (children_cpu_seconds() - ours)
    return wall, max(others, 0.0) / (wall * (os.cpu_count() or 1))


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def busy_cpu_seconds() -> float:
    """CPU seconds every process on the machine has used (Linux /proc/stat; 0 elsewhere)."""
    try:
        fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # user..steal, without guest (counted in user)


def train_windows(run_dir: Path) -> list[float]:
    """Tokens/s of the run's log windows after the first (warm-up)."""
    records = [json.loads(line) for line in (run_dir / "sae" / "train_log.jsonl").read_text().splitlines()]
    return [record["tokens_per_second"] for record in records[1:] or records]


def spread(values: list[float], digits: int = 0) -> str:
    return f"{min(values):,.{digits}f}-{max(values):,.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=262_144, help="rows generated and trained on")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="CPU threads in all, split over the ranks")
    parser.add_argument("--rounds", type=int, default=3, help="training runs per side (alternating sides)")
    args = parser.parse_args()
    two = 2
    if args.device == "cuda":
        import torch

        two = 2 if torch.cuda.device_count() >= 2 else 0
    sides = [1, two] if two else [1]
    settings = ["--set", f"generate.target_tokens={args.tokens}", "--set", f"train.total_tokens={args.tokens}",
                "--set", f"model.device={args.device}", "--set", f"sae.device={args.device}",
                "--set", "train.checkpoint_every_tokens=null", "--set", "train.sweep=[]", "--set", "train.log_every_steps=8"]
    print_host()
    print(f"{args.tokens} tokens of {CONFIG.name}; device {args.device}; {args.threads} CPU threads in all")
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        tmp = Path(tmp)
        threads = {ranks: max(args.threads // ranks, 1) for ranks in sides}
        stores = {ranks: ["--set", f"generate.store={tmp / f'store-{ranks}.zarr'}"] for ranks in sides}
        generate: dict[int, float] = {}
        for ranks in sides:
            seconds, share = run(ranks, threads[ranks], ["generate", str(CONFIG), *settings, *stores[ranks]], REPO)
            generate[ranks] = args.tokens / seconds
            print(f"{ranks} rank(s) x {threads[ranks]} thread(s): generate {generate[ranks]:,.0f} tok/s end to end "
                  f"(others used {share:.0%} of the cores)")
        train: dict[int, list[float]] = {ranks: [] for ranks in sides}
        shares: list[float] = []
        for round_ in range(args.rounds):
            for ranks in sides if round_ % 2 == 0 else sides[::-1]:
                out = tmp / f"run-{ranks}-{round_}"
                load = os.getloadavg()[0]
                _, share = run(ranks, threads[ranks], ["train", str(CONFIG), *settings, *stores[1], "--set", f"train.out_dir={out}"],
                               REPO)
                shares.append(share)
                windows = train_windows(out)
                train[ranks].append(statistics.median(windows))
                print(f"round {round_ + 1}, {ranks} rank(s) x {threads[ranks]} thread(s): train {train[ranks][-1]:,.0f} tok/s "
                      f"({train[ranks][-1] / ranks:,.0f} per rank; {len(windows)} windows {spread(windows)}; "
                      f"others used {share:.0%} of the cores; load average {load:.1f} before)")
    if not two:
        print(f"one GPU: generate {generate[1]:,.0f} tok/s, train {statistics.median(train[1]):,.0f} tok/s per GPU "
              f"(rounds {spread(train[1])})")
        print(f"train tokens/s per GPU: {statistics.median(train[1]):,.0f} (goal > 0)")
        return
    ratios = [b / a for a, b in zip(train[1], train[two])]
    print(f"train 2 ranks / 1 rank by round: {' '.join(f'{r:.3f}' for r in ratios)} (spread {spread(ratios, 3)}); "
          f"load average {os.getloadavg()[0]:.1f} at the end")
    if args.device == "cpu" and max(shares) > 0.1:
        print(f"other processes used up to {max(shares):.0%} of the cores during a run: the ratios measure the "
              "host's load as much as the ranks' cost; rerun on a quiet host")
    print(f"generate 2 ranks / 1 rank tokens/s: {generate[two] / generate[1]:.2f} (goal >= 0.9 at equal threads)")
    print(f"train 2 ranks / 1 rank tokens/s: {statistics.median(ratios):.2f} (goal >= 0.9 at equal threads)")


if __name__ == "__main__":
    main()
