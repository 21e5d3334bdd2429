"""Generate throughput against the bare LM forward pass, and the store writer's own MB/s.

In one run, on the MiniLM default (configs/minilm-docstrings.yaml: layer 3 resid_post, context
128, batch 32), alternating rounds of:
- forward: the same batches generate will make (tokenized beforehand, outside the timing)
  through LanguageModel.run_hooks, results discarded;
- generate: the whole stage (tokenize, window, forward, select rows, fp16, queue, background
  writes, checksums, float64 statistics, commits) into a fresh store, timed to the final flush.
Tokens/s counts positions forwarded (the same number in both); the ratio is the median over
rounds of forward, generate, generate, forward (ABBA, so a shared machine's drifting load cancels).
Also printed: the share of generate's wall time spent inside the LM forward (the rest is the
producer's own work and the final flush). Then the writer alone: fp16 rows of d=384 put as fast
as possible (MB/s of activation bytes committed, with checksums and stats).

    .venv/bin/python bench/generate_overhead.py [--tokens N] [--rounds R]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import load_config  # noqa: E402
from pipeline.generate.stage import check_model, generate, window_batches  # noqa: E402
from pipeline.generate.lm import load_language_model  # noqa: E402
from store.writer import StoreWriter  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "minilm-docstrings.yaml"


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
    parser.add_argument("--tokens", type=int, default=131072, help="rows per generate run (8 default chunks)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of forward, generate, generate, forward")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="saeflow-bench-") as tmp:
        tmp = Path(tmp)
        cfg = load_config(CONFIG, [f"generate.target_tokens={args.tokens}"])
        lm = load_language_model(cfg.model)
        hooks = list(cfg.generate.hook_points)
        batches = same_batches(cfg, lm)
        forward_rate(lm, batches[:4], hooks)  # warm-up: allocator, kernels, corpus cache
        forward, generated, ratios, cpu_ratios, shares = [], [], [], [], []
        for round_ in range(args.rounds):
            # forward, generate, generate, forward: a load that drifts linearly within a round
            # (this machine is shared) cancels out of the round's ratio.
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
            print(f"round {round_}: forward {fwd_wall:,.0f} tok/s, generate {gen_wall:,.0f} tok/s "
                  f"(ratio {ratios[-1]:.3f}; per CPU second {cpu_ratios[-1]:.3f})", flush=True)
        write_mb_s = writer_rate(tmp)
    fwd, gen = statistics.median(forward), statistics.median(generated)
    print(f"model {cfg.model.name}, hooks {hooks}, context {cfg.generate.context_size}, batch {cfg.generate.batch_size}, "
          f"{len(batches)} batches x {args.rounds} rounds, torch threads {torch.get_num_threads()}")
    print(f"forward (median): {fwd:,.0f} tok/s; generate (median): {gen:,.0f} tok/s")
    print(f"share of generate's wall time inside the LM forward (median): {statistics.median(shares):.3f}")
    print(f"per-round ratios {[round(r, 3) for r in ratios]}; CPU-time ratio (median) {statistics.median(cpu_ratios):.3f}")
    print(f"store writer alone (d=384 fp16, 16384-row chunks, checksums + float64 stats): {write_mb_s:,.0f} MB/s")
    print(f"generate/forward: {statistics.median(ratios):.3f} (goal >= 0.95)")


if __name__ == "__main__":
    main()
