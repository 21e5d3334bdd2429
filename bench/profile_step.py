"""Where a short training run's main thread spends its time (cProfile over the train stage).

A `saeflow train` run of configs/minilm-docstrings.yaml on the bench store (TopK k=32, x8,
batch 4096, the recommended init), profiled as one call of pipeline.train.stage.train. Printed:
the inclusive seconds and share of the run of each phase (initialization and its parts, the
steps, the end-of-run report and save); the loader's prefetch threads are not profiled, only
the main thread's waits for them (inside the steps' loop). The encoder-kernel probe
(pipeline/sae/encoder_kernel.py: once per process and shape, inside whichever forward comes
first, here the norm search's) runs before the profile and is printed apart.

    .venv/bin/python bench/profile_step.py [--tokens 409600] [--top 15]

Last line: the decoder-norm search's share of the main thread (goal < 2%: issue 23 measured the
34-forward grid at 22.5% of a 100-step run).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import shutil
import time
from pathlib import Path

import torch

from common import DEFAULT_STORE, DEFAULT_STORE_TOKENS, OURS_SHORT_RUN, OUT, bench_config, generate_store, load_average, machine, say
from host import print_host  # noqa: E402

# phase -> (module path suffix, function name), inclusive time as cProfile counts it
PHASES = {
    "initialization (all variants)": ("pipeline/train/stage.py", "build_trainer"),
    "  store sample": ("store/sampling.py", "sample_rows"),
    "  geometric median": ("pipeline/sae/geometry.py", "geometric_median"),
    "  decoder norm search (closed form)": ("pipeline/sae/initialize.py", "closed_form_decoder_norm"),
    "  decoder norm search (grid)": ("pipeline/sae/initialize.py", "grid_search_decoder_norm"),
    "training steps": ("pipeline/train/trainer.py", "train_step"),
    "held-out report, save, export": ("pipeline/train/stage.py", "_finish"),
}
NORM_SEARCH = ("  decoder norm search (closed form)", "  decoder norm search (grid)")


def inclusive_seconds(stats: pstats.Stats, path_suffix: str, name: str) -> float:
    return sum(entry[3] for (path, _, function), entry in stats.stats.items()
               if function == name and path.replace("\\", "/").endswith(path_suffix))


def probe_encoder_kernel(rows: int, d_model: int, d_sae: int) -> float:
    """Seconds of the kernel probe for the training shape (the run then finds it cached)."""
    from pipeline.sae.encoder_kernel import kernel_for

    x, W_enc, b_enc = torch.randn(rows, d_model), torch.randn(d_model, d_sae) / d_model**0.5, torch.zeros(d_sae)
    started = time.perf_counter()
    kernel_for(x, W_enc, b_enc)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=409_600, help="training tokens (100 steps of 4096)")
    parser.add_argument("--store", type=Path, default=DEFAULT_STORE)
    parser.add_argument("--out", type=Path, default=OUT / "profile-step")
    parser.add_argument("--top", type=int, default=15, help="also print the top functions by own time")
    args = parser.parse_args()
    print_host()
    generate_store(args.store.resolve(), DEFAULT_STORE_TOKENS)
    from pipeline.train.stage import train

    cfg = bench_config(args.store.resolve(), args.out.resolve(), args.tokens, list(OURS_SHORT_RUN))
    if args.out.exists():
        shutil.rmtree(args.out)
    probe_seconds = probe_encoder_kernel(cfg.loader.batch_size, cfg.sae.d_model, cfg.sae.d_sae)
    profiler = cProfile.Profile()
    load_before, started = load_average(), time.perf_counter()
    profiler.enable()
    train(cfg)
    profiler.disable()
    wall = time.perf_counter() - started
    stats = pstats.Stats(profiler)
    say(f"\n{args.tokens:,} tokens ({args.tokens // cfg.loader.batch_size} steps) in {wall:.1f} s of main thread "
        f"(load {load_before} -> {load_average()})")
    say(f"{'encoder kernel probe (before the profile)':<38} {probe_seconds:>8.2f} s")
    shares = {}
    for phase, (path, name) in PHASES.items():
        seconds = inclusive_seconds(stats, path, name)
        shares[phase] = seconds / wall
        say(f"{phase:<38} {seconds:>8.2f} s {shares[phase]:>7.1%}")
    result = {"machine": machine(), "tokens": args.tokens, "main_thread_seconds": wall, "probe_seconds": probe_seconds,
              "shares": shares, "load_before_after": [load_before, load_average()]}
    (args.out / "result.json").write_text(json.dumps(result, indent=1, default=str))
    if args.top:
        say("")
        stats.sort_stats("tottime").print_stats(args.top)
    print(f"decoder norm search share of the run's main thread: {sum(shares[p] for p in NORM_SEARCH):.2%} (goal < 2%)")


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    main()
