"""Generate throughput against the bare LM forward pass, and the store writer's own MB/s.

On the MiniLM default (configs/minilm-docstrings.yaml: layer 3 resid_post, context 128, batch
32), two comparisons, each in interleaved rounds of forward, generate, generate, forward (ABBA, so
a shared machine's drifting load cancels out of each round's ratio):
- end to end, at the default size (1M rows): the wall time of the `saeflow generate` command
  (interpreter start, imports, model load, tokenizing, forward, writes, statistics, final flush)
  against a bare forward of the same batches in a fresh process (the same imports and model
  load, tokenized beforehand, one warm-up batch, the allocator as a plain script leaves it),
  timed as a whole process (the goal) and over its batch loop alone (which charges generate
  with the ~7 s of torch and transformer_lens imports any forward needs);
- loop only, in one process (--tokens rows): generate's batch loop (`generate()`: tokenize,
  window, forward, select rows, fp16, queue, background writes, checksums, float64 statistics,
  commits, final flush) against `run_hooks` over the same batches, both under generate's heap
  setting (pipeline/heap.py), so the ratio is the cost of everything generate adds to the forward.
Tokens/s counts positions forwarded (the same number on both sides). Each comparison prints its
per-round ratios and their spread (max - min); the goal is on the end-to-end median. Then what
generate's main thread does besides the forward (tokenizing + windowing, each chunk's float64
statistics: timed apart on the same rows, as shares of its loop), and the writer alone: fp16 rows
of d=384 put as fast as possible (MB/s committed, checksums and stats).

    .venv/bin/python bench/generate_overhead.py [--e2e-tokens N] [--e2e-rounds R] [--tokens N] [--rounds R]
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
import timeit
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import load_config  # noqa: E402
from pipeline.generate.stage import check_model, generate, window_batches  # noqa: E402
from pipeline.generate.lm import load_language_model  # noqa: E402
from pipeline.heap import keep_large_blocks_in_heap  # noqa: E402
from store.writer import StoreWriter  # noqa: E402
from host import print_host  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "minilm-docstrings.yaml"


def same_batches(cfg, lm) -> list:
    """The batches generate makes for cfg, up to its row target."""
    _, spec = check_model(lm, cfg)
    batches, rows = [], 0
    for batch in window_batches(cfg, lm, spec):
        if rows >= cfg.generate.target_tokens:
            break
        batches.append(batch)
        rows += len(batch.kept(cfg.generate.drop_special_tokens))
    return batches


def forward_rate(lm, batches, hooks) -> tuple[float, float]:
    """(tokens per wall second, tokens per CPU second of this process)."""
    began, cpu = time.perf_counter(), time.process_time()
    tokens = 0
    for batch in batches:
        mask = None if batch.attention_mask is None else torch.from_numpy(batch.attention_mask)
        lm.run_hooks(torch.from_numpy(batch.tokens), hooks, attention_mask=mask)
        tokens += batch.tokens.size
    return tokens / (time.perf_counter() - began), tokens / (time.process_time() - cpu)


def generate_rate(cfg, lm, store: Path, batches: list) -> tuple[float, float, float]:
    """(tokens per wall second, per CPU second, share of the wall time in the LM forward) of a
    whole generate run into a fresh store."""
    run = cfg.model_copy(deep=True)
    run.generate.store = str(store)
    cpu = time.process_time()
    result = generate(run, lm=lm)
    cpu = time.process_time() - cpu
    assert result.tokens_forwarded == sum(b.tokens.size for b in batches), "generate made other batches"
    return result.tokens_forwarded / result.seconds, result.tokens_forwarded / cpu, result.forward_seconds / result.seconds


def bare_forward_seconds(tokens: int) -> float:
    """Child process: the forward loop's seconds over the batches of a `tokens`-row generate."""
    cfg = load_config(CONFIG, [f"generate.target_tokens={tokens}"])
    lm = load_language_model(cfg.model)
    hooks = list(cfg.generate.hook_points)
    batches = same_batches(cfg, lm)
    forward_rate(lm, batches[:1], hooks)  # the first call's lazy imports are start-up, not forward
    tokens_forwarded = sum(batch.tokens.size for batch in batches)
    return tokens_forwarded / forward_rate(lm, batches, hooks)[0]


def child(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    result = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return result


def end_to_end_round(tokens: int, directory: Path, round_: int) -> tuple[float, float]:
    """forward, generate, generate, forward in fresh processes. Returns (bare forward process wall
    s / command wall s, bare forward loop s / command wall s): the first compares two whole
    processes (both import torch and transformer_lens and load the model), the second charges
    generate with all of its start-up."""
    def forward() -> tuple[float, float]:
        began = time.perf_counter()
        loop = json.loads(child([__file__, "--bare-forward", str(tokens)]).stdout.splitlines()[-1])["seconds"]
        return time.perf_counter() - began, loop

    def command(name: str) -> float:
        began = time.perf_counter()
        child(["-m", "pipeline.cli", "generate", str(CONFIG), "--set", f"generate.target_tokens={tokens}",
               "--set", f"generate.store={directory / f'e2e{round_}{name}.zarr'}"])
        return time.perf_counter() - began

    f1, g1, g2, f2 = forward(), command("a"), command("b"), forward()
    process, loop = (f1[0] + f2[0]) / (g1 + g2), (f1[1] + f2[1]) / (g1 + g2)
    print(f"end to end, round {round_}: bare forward process {f1[0]:.1f} s, {f2[0]:.1f} s (its loop {f1[1]:.1f} s, "
          f"{f2[1]:.1f} s); saeflow generate {g1:.1f} s, {g2:.1f} s (ratio {process:.3f}; to the loop {loop:.3f})",
          flush=True)
    return process, loop


def outside_forward(cfg, lm, store: Path, loop_seconds: float) -> str:
    """What generate's main thread does besides the forward, timed apart on the same rows: the
    tokenizing and windowing of its batches, and each chunk's float64 statistics (written to a
    store by the rounds above), as shares of one generate loop's wall time."""
    from store.reader import StoreReader
    from store.recorded_stats import chunk_moments

    began = time.perf_counter()
    same_batches(cfg, lm)  # tokenize + window (the corpus is cached by the earlier calls)
    tokenize = time.perf_counter() - began
    reader = StoreReader(store)
    hook = cfg.generate.hook_points[0]
    chunk = reader.read_chunk(hook, 0)
    best = min(timeit.repeat(lambda: chunk_moments(chunk, reader.manifest.layout[hook][1]), number=1, repeat=3))
    stats = best * reader.manifest.n_chunks
    return (f"outside the forward, per generate loop of {loop_seconds:.1f} s: tokenize + window {tokenize:.2f} s "
            f"({tokenize / loop_seconds:.1%}), chunk statistics {best * 1e3:.0f} ms x {reader.manifest.n_chunks} chunks "
            f"of {len(chunk):,} rows = {stats:.2f} s ({stats / loop_seconds:.1%})")


def spread(values: list[float]) -> str:
    return f"{[round(v, 3) for v in values]}, spread {max(values) - min(values):.3f}"


def writer_rate(directory: Path, d: int = 384, chunk_rows: int = 16384, chunks: int = 24) -> float:
    rng = np.random.default_rng(0)
    rows = torch.from_numpy(rng.standard_normal((chunk_rows, d), dtype=np.float32)).to(torch.float16)
    ids = np.arange(chunk_rows)
    writer = StoreWriter.create(
        directory / "writer.zarr", hook_dims={"h": d}, chunk_rows=chunk_rows, capacity_rows=chunk_rows * chunks
    )
    began = time.perf_counter()
    for _ in range(chunks):
        writer.put({"h": rows}, ids, ids, ids)
    writer.close()
    return chunks * chunk_rows * d * 2 / 2**20 / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--e2e-tokens", type=int, default=1_048_576, help="rows per end-to-end run (the default config's)")
    parser.add_argument("--e2e-rounds", type=int, default=2, help="end-to-end rounds (0: skip)")
    parser.add_argument("--tokens", type=int, default=131072, help="rows per loop-only run (8 default chunks)")
    parser.add_argument("--rounds", type=int, default=4, help="loop-only rounds")
    parser.add_argument("--bare-forward", type=int, metavar="N", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.bare_forward:
        print(json.dumps({"seconds": bare_forward_seconds(args.bare_forward)}))
        return
    print_host()
    with tempfile.TemporaryDirectory(prefix="saeflow-bench-") as tmp:
        tmp = Path(tmp)
        e2e = [end_to_end_round(args.e2e_tokens, tmp, round_) for round_ in range(args.e2e_rounds)]
        keep_large_blocks_in_heap()  # generate's setting, on both sides of the loop-only rounds
        cfg = load_config(CONFIG, [f"generate.target_tokens={args.tokens}"])
        lm = load_language_model(cfg.model)
        hooks = list(cfg.generate.hook_points)
        batches = same_batches(cfg, lm)
        forward_rate(lm, batches[:4], hooks)  # warm-up: allocator, kernels, corpus cache
        forward, generated, ratios, cpu_ratios, shares = [], [], [], [], []
        for round_ in range(args.rounds):
            f1 = forward_rate(lm, batches, hooks)
            g1 = generate_rate(cfg, lm, tmp / f"round{round_}a.zarr", batches)
            g2 = generate_rate(cfg, lm, tmp / f"round{round_}b.zarr", batches)
            f2 = forward_rate(lm, batches, hooks)
            fwd_wall, fwd_cpu = (2 / (1 / f1[i] + 1 / f2[i]) for i in (0, 1))  # rates of the summed times
            gen_wall, gen_cpu = (2 / (1 / g1[i] + 1 / g2[i]) for i in (0, 1))
            forward.append(fwd_wall)
            generated.append(gen_wall)
            ratios.append(gen_wall / fwd_wall)
            cpu_ratios.append(gen_cpu / fwd_cpu)
            shares += [g1[2], g2[2]]
            print(f"loop only, round {round_}: forward {fwd_wall:,.0f} tok/s, generate {gen_wall:,.0f} tok/s "
                  f"(ratio {ratios[-1]:.3f}; per CPU second {cpu_ratios[-1]:.3f})", flush=True)
        loop_seconds = sum(batch.tokens.size for batch in batches) / statistics.median(generated)
        breakdown = outside_forward(cfg, lm, tmp / "round0a.zarr", loop_seconds)
        write_mb_s = writer_rate(tmp)
    fwd, gen = statistics.median(forward), statistics.median(generated)
    print(f"model {cfg.model.name}, hooks {hooks}, context {cfg.generate.context_size}, batch {cfg.generate.batch_size}, "
          f"torch threads {torch.get_num_threads()}; end to end {args.e2e_tokens:,} rows x {args.e2e_rounds} rounds, "
          f"loop only {args.tokens:,} rows ({len(batches)} batches) x {args.rounds} rounds")
    print(f"loop only: forward (median) {fwd:,.0f} tok/s; generate (median) {gen:,.0f} tok/s; "
          f"share of generate's wall time inside the LM forward (median) {statistics.median(shares):.3f}")
    print(f"loop only: generate/forward per round {spread(ratios)}; median {statistics.median(ratios):.3f}; "
          f"CPU-time ratio (median) {statistics.median(cpu_ratios):.3f}")
    print(f"loop only: {breakdown}")
    print(f"store writer alone (d=384 fp16, 16384-row chunks, checksums + float64 stats): {write_mb_s:,.0f} MB/s")
    if e2e:
        to_loop = [loop for _, loop in e2e]
        print(f"end to end, generate command / the bare forward's loop alone: per round {spread(to_loop)}; "
              f"median {statistics.median(to_loop):.3f}")
        print(f"end to end, generate command / bare forward process: per round {spread([p for p, _ in e2e])}")
        print(f"end-to-end generate/bare forward (whole processes): {statistics.median([p for p, _ in e2e]):.3f} "
              f"(goal >= 0.95)")
    else:
        print(f"loop-only generate/forward: {statistics.median(ratios):.3f} (goal >= 0.95)")


if __name__ == "__main__":
    main()
