"""TopK SAE training step (forward + MSE + backward): sparse path vs the dense baseline.

Both SAEs hold the same weights and see the same batch; runs are interleaved and the median
of REPEATS timed steps is reported, so machine load hits both sides alike. The sparse path
decodes with embedding_bag and sends the encoder's gradient only to the k kept latents; the
dense path is the textbook (B, d_sae) @ W_dec with autograd. Runs on CUDA when available (timed
between torch.cuda.synchronize() calls), else on the CPU.

Crossover: the --scan expansion factors are timed in increasing order until sparse wins; the
first ratio d_sae / k where it does is printed as `sparse/dense TopK crossover on <device>:
k*<r> <= d_sae` (the rule topk_decode: auto applies, with r = 8 measured on the CPU).

usage: python bench/sae_step.py [--batch 4096] [--d-model 384] [--k 32] [--expansions 8 32]
                                [--scan 0.25 0.5 1 2 4 8 16 32]
Last line: the speedup at the first expansion factor (the issue's goal: >= 1.5).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pipeline import SAEConfig
from pipeline.sae.model import SparseAutoencoder

WARMUP = 2
REPEATS = 5


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def make_pair(d_model: int, expansion: float, k: int) -> tuple[SparseAutoencoder, SparseAutoencoder]:
    fields = dict(hook_point_in="h", hook_point_out="h", d_model=d_model, expansion_factor=expansion,
                  act_fn="topk", top_k=k, device=str(DEVICE))
    torch.manual_seed(0)
    dense = SparseAutoencoder(SAEConfig(topk_decode="dense", **fields))
    sparse = SparseAutoencoder(SAEConfig(topk_decode="sparse", **fields))
    sparse.load_state_dict(dense.state_dict())
    return dense, sparse


def step_seconds(sae: SparseAutoencoder, x: torch.Tensor) -> float:
    sync()
    start = time.perf_counter()
    x_hat, _ = sae(x)
    loss = (x_hat - x).pow(2).sum(-1).mean()
    loss.backward()
    sae.zero_grad(set_to_none=True)
    sync()
    return time.perf_counter() - start


def compare(d_model: int, expansion: float, k: int, batch: int) -> float:
    dense, sparse = make_pair(d_model, expansion, k)
    x = (torch.randn(batch, d_model) * 0.5).to(DEVICE)
    timings = {"dense": [], "sparse": []}
    for round_index in range(WARMUP + REPEATS):
        for name, sae in (("dense", dense), ("sparse", sparse)):
            seconds = step_seconds(sae, x)
            if round_index >= WARMUP:
                timings[name].append(seconds)
    dense_s, sparse_s = statistics.median(timings["dense"]), statistics.median(timings["sparse"])
    print(
        f"d_model={d_model} d_sae={int(d_model * expansion)} k={k} batch={batch}: "
        f"dense {dense_s * 1e3:.0f} ms  sparse {sparse_s * 1e3:.0f} ms  "
        f"({batch / dense_s:,.0f} vs {batch / sparse_s:,.0f} tokens/s)  speedup {dense_s / sparse_s:.2f}"
    )
    return dense_s / sparse_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=384)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--expansions", type=float, nargs="+", default=[8, 32])
    parser.add_argument("--scan", type=float, nargs="+", default=[0.25, 0.5, 1, 2, 4, 8, 16, 32],
                        help="expansion factors scanned (ascending) for the sparse/dense crossover")
    args = parser.parse_args()
    where = torch.cuda.get_device_name() if DEVICE.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__} on {DEVICE} ({where}), {WARMUP} warmup + {REPEATS} timed steps each")
    measured: dict[float, float] = {}

    def speedup(expansion: float) -> float:
        if expansion not in measured:
            measured[expansion] = compare(args.d_model, expansion, args.k, args.batch)
        return measured[expansion]

    speedups = [speedup(expansion) for expansion in args.expansions]
    print(crossover(args, speedup))
    print(f"topk sparse/dense step speedup: {speedups[0]:.2f} (goal >= 1.5)")


def crossover(args, speedup) -> str:
    """The first scanned ratio d_sae / k at which the sparse step is faster (scan stops there)."""
    slower = None
    for expansion in sorted(e for e in args.scan if args.k <= args.d_model * e):  # top_k <= d_sae
        ratio = f"{args.d_model * expansion / args.k:g}"
        if speedup(expansion) > 1:
            below = f"dense faster at k*{slower}" if slower else "the smallest ratio scanned"
            print(f"sparse faster from d_sae/k = {ratio} on ({below})")
            return f"sparse/dense TopK crossover on {DEVICE.type}: k*{ratio} <= d_sae"
        slower = ratio
    return f"sparse/dense TopK crossover on {DEVICE.type}: none up to k*{slower} <= d_sae (dense faster throughout)"


if __name__ == "__main__":
    main()
