"""TopK SAE training step (forward + MSE + backward): sparse path vs the dense baseline.

Both SAEs hold the same weights and see the same batch; runs are interleaved and the median
of REPEATS timed steps is reported, so machine load hits both sides alike. The sparse path
decodes with embedding_bag and sends the encoder's gradient only to the k kept latents; the
dense path is the textbook (B, d_sae) @ W_dec with autograd. Runs on CUDA when available (timed
between torch.cuda.synchronize() calls), else on the CPU.

Crossover: the --scan expansion factors are timed in increasing order until sparse wins; the
first ratio d_sae / k where it does is printed as `sparse/dense TopK crossover on <device>:
k*<r> <= d_sae` (the table topk_decode: auto starts from, pipeline/sae/decode_path.py, with r = 8
measured on the CPU; near r, and on a device it has no r for, a run times both paths itself).

AuxK (--aux): the sparse step with AuxK on (a share of latents planted dead) against off, each
AuxK decode timed: dead columns by matmul, and gathered (embedding_bag). pipeline/train/aux_k.py's
table switches between them at n_dead = DENSE_COLUMNS_PER_K_AUX * k_aux; near there a training
run times both on its first step (pipeline/train/aux_k_path.py), and "auto" is the decode that
timing picks here. Prints each step's ratio to the step without AuxK, and the n_dead / k_aux from
which gathered is faster; --profile adds, at 10% dead, the torch ops whose time AuxK adds (self
CPU ms a step).

usage: python bench/sae_step.py [--batch 4096] [--d-model 384] [--k 32] [--expansions 8 32]
                                [--scan 0.25 0.5 1 2 4 8 16 32]
       python bench/sae_step.py --aux [--expansions 16] [--dead 0.01 0.03 0.1 0.3] [--k-aux 192] [--profile]
Last line: the speedup at the first expansion factor (the issue's goal: >= 1.5); with --aux, the
step with AuxK (the decode aux_k.py picks) over the step without, at 10% dead (goal <= 1.15).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pipeline import SAEConfig
from pipeline.sae.model import SparseAutoencoder
from pipeline.train.aux_k import DENSE_COLUMNS_PER_K_AUX, aux_k_loss
from pipeline.train.aux_k_path import choose
from pipeline.train.losses import reconstruction_loss
from pipeline.heap import keep_large_blocks_in_heap
from host import print_host  # noqa: E402

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


def aux_step_seconds(sae: SparseAutoencoder, x: torch.Tensor, dead: torch.Tensor | None, k_aux: int,
                     columns: bool) -> float:
    """One sparse TopK training step: normalized MSE (+ AuxK over `dead`), backward."""
    sync()
    start = time.perf_counter()
    x_hat, out = sae(x)
    loss, _ = reconstruction_loss(x, x_hat, normalized=True)
    if dead is not None:
        encoder = (x, sae.W_enc, sae.b_enc)
        loss = loss + aux_k_loss((x - x_hat).detach(), out.hidden_pre, dead, sae.W_dec, k_aux, encoder,
                                 columns=columns) / 32
    loss.backward()
    sae.zero_grad(set_to_none=True)
    sync()
    return time.perf_counter() - start


def compare_aux(args, expansion: float) -> float:
    """Plain step vs AuxK with each decode, per dead share; returns auto's ratio at 10% dead."""
    _, sae = make_pair(args.d_model, expansion, args.k)
    d_sae = sae.cfg.d_sae
    x = (torch.randn(args.batch, args.d_model) * 0.5).to(DEVICE)
    order = torch.randperm(d_sae, generator=torch.Generator().manual_seed(0))
    goal = None
    faster_from = slower_at = None
    for share in args.dead:
        n_dead = max(int(share * d_sae), 1)
        dead = torch.zeros(d_sae, dtype=torch.bool, device=DEVICE)
        dead[order[:n_dead].to(DEVICE)] = True
        cases = {"off": (None, False), "columns": (dead, True), "gathered": (dead, False)}
        timings = {name: [] for name in cases}
        for round_index in range(WARMUP + REPEATS):
            for name, (mask, columns) in cases.items():
                seconds = aux_step_seconds(sae, x, mask, args.k_aux, columns)
                if round_index >= WARMUP:
                    timings[name].append(seconds)
        median = {name: statistics.median(values) for name, values in timings.items()}
        auto = "columns" if auto_uses_columns(sae, x, dead, args.k_aux) else "gathered"
        print(f"d_sae={d_sae} k_aux={args.k_aux} dead {n_dead} ({share:.0%}, n_dead/k_aux {n_dead / args.k_aux:.1f}): "
              f"off {median['off'] * 1e3:.0f} ms, columns {median['columns'] * 1e3:.0f} ms "
              f"({median['columns'] / median['off']:.2f}x), gathered {median['gathered'] * 1e3:.0f} ms "
              f"({median['gathered'] / median['off']:.2f}x); auto: {auto}")
        if median["gathered"] < median["columns"]:
            faster_from = faster_from or n_dead / args.k_aux
        else:
            slower_at = n_dead / args.k_aux
        if abs(share - 0.1) < 1e-9:
            goal = median[auto] / median["off"]
            if args.profile:
                print_aux_profile(sae, x, dead, args.k_aux, cases[auto][1])
    print(f"gathered faster than columns from n_dead/k_aux = {faster_from and f'{faster_from:.1f}'} "
          f"(columns faster at {slower_at and f'{slower_at:.1f}'}; auto switches at {DENSE_COLUMNS_PER_K_AUX})")
    return goal


def auto_uses_columns(sae: SparseAutoencoder, x: torch.Tensor, dead: torch.Tensor, k_aux: int) -> bool:
    """The decode a training step picks for these inputs: the table's, or timed near its crossover."""
    with torch.no_grad():
        x_hat, out = sae(x)
    return choose((x - x_hat).detach(), out.hidden_pre, dead, sae.W_dec, k_aux, (x, sae.W_enc, sae.b_enc))


def print_aux_profile(sae: SparseAutoencoder, x: torch.Tensor, dead: torch.Tensor, k_aux: int, columns: bool,
                      steps: int = 3, shown: int = 8) -> None:
    """What AuxK adds to a step, by torch op (self CPU time per step, torch.profiler): the ops
    whose time grows most between the step without AuxK and the step with it."""
    from torch.profiler import ProfilerActivity, profile

    per_op = {}
    for name, mask in (("off", None), ("on", dead)):
        with profile(activities=[ProfilerActivity.CPU]) as recorded:
            for _ in range(steps):
                aux_step_seconds(sae, x, mask, k_aux, columns)
        per_op[name] = {event.key: event.self_cpu_time_total / 1e3 / steps for event in recorded.key_averages()}
    added = {op: per_op["on"][op] - per_op["off"].get(op, 0.0) for op in per_op["on"]}
    total = sum(per_op["on"].values()) - sum(per_op["off"].values())
    top = sorted(added, key=added.get, reverse=True)[:shown]
    print(f"AuxK adds {total:.0f} ms of op time a step (profiled, {sum(per_op['off'].values()):.0f} ms without): "
          + ", ".join(f"{op} {added[op]:.1f}" for op in top))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=384)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--expansions", type=float, nargs="+", default=[8, 32])
    parser.add_argument("--scan", type=float, nargs="+", default=[0.25, 0.5, 1, 2, 4, 8, 16, 32],
                        help="expansion factors scanned (ascending) for the sparse/dense crossover")
    parser.add_argument("--aux", action="store_true", help="AuxK on vs off, and its two decodes")
    parser.add_argument("--dead", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3],
                        help="--aux: shares of latents planted dead")
    parser.add_argument("--k-aux", type=int, default=None, help="--aux: default d_model // 2")
    parser.add_argument("--profile", action="store_true", help="--aux: what AuxK adds by torch op, at 10%% dead")
    args = parser.parse_args()
    print_host()
    where = torch.cuda.get_device_name() if DEVICE.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__} on {DEVICE} ({where}), {WARMUP} warmup + {REPEATS} timed steps each")
    if args.aux:
        if DEVICE.type == "cpu":
            keep_large_blocks_in_heap()  # as CPU training does: no page faults on every (B, d_sae) tensor
        args.k_aux = args.k_aux or args.d_model // 2
        ratios = [compare_aux(args, expansion) for expansion in args.expansions]
        shown = ", ".join(f"{r:.2f}" for r in ratios if r is not None)
        print(f"AuxK step / plain step at 10% dead (d_sae {', '.join(f'{args.d_model * e:g}' for e in args.expansions)}): "
              f"{shown} (goal <= 1.15)")
        return
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
