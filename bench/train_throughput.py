"""Train-only tokens/s: saeflow against SAELens and EleutherAI sparsify on the same rows, one run.

An SAE at d_model 384 (MiniLM-L6 layer 3 residual stream, docstring corpus), expansion 8,
batch 4096, trained three ways on the same activations:
- ours: the product's training loop (`pipeline.train.stage.train`, what `saeflow train` runs):
  store -> ActivationLoader (shuffle buffer, prefetch thread, fp16 -> fp32) -> SAETrainer.
  train_step (TopK forward on the sparse path, MSE, AuxK, Adam, decoder renormalization, logging);
- SAELens 6.54 (`SAETrainer.fit`) and sparsify 1.3.3 (`Trainer.fit`), through bench/peers, on
  our loader's training stream exported in batch order to a float16 .npy (held in RAM).
Only the training loop is timed, after `--warmup-steps` steps, for every tool (no import, init,
file load or export). TopK k=32 for all three; ReLU + L1 for ours and SAELens (sparsify has no
L1 SAE). Each tool runs with its default optimizer and lr. With `--repeats R` the tools run R
rounds in turn and the median per tool is kept (a shared machine's load drifts).

    .venv/bin/python bench/train_throughput.py [--tokens 409600] [--repeats 3] [--threads N] [--no-relu]

The store bench/out/minilm-l3.zarr is made by `saeflow generate` when missing (~1.2M tokens).
Last line: ours / the faster peer for TopK (goal >= 2).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch

from common import (
    DEFAULT_STORE, DEFAULT_STORE_TOKENS, OUT, PEERS_DIR, PEERS_PY, bench_config, ensure_peers_env,
    export_training_rows, generate_store, load_average, machine, run_ours, run_peer, say,
)

# SAELens's standard (ReLU + L1) SAE through the same SAETrainer seam as bench/peers/train_saelens.py
# (that adapter builds TopK only); run in bench/.peers-venv with bench/peers on sys.path.
SAELENS_RELU = r"""
import json, sys, torch
from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig, SAETrainer, TrainingSAE
from sae_lens.saes.sae import TrainingSAEConfig
from sae_lens.saes.standard_sae import StandardTrainingSAEConfig
from peer_rows import load_rows
from step_clock import StepClock
from train_saelens import RowProvider
acts, out, expansion, batch, tokens, warmup = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])
steps = tokens // batch
rows = load_rows(acts, steps * batch)
d = rows.shape[1]
cfg = LanguageModelSAERunnerConfig(
    sae=StandardTrainingSAEConfig(d_in=d, d_sae=expansion * d), training_tokens=steps * batch,
    train_batch_size_tokens=batch, device="cpu", seed=0, logger=LoggingConfig(log_to_wandb=False),
    checkpoint_path=None, output_path=None, verbose=False)
torch.manual_seed(0)
sae = TrainingSAE.from_dict(TrainingSAEConfig.from_dict(cfg.get_training_sae_cfg_dict()).to_dict())
clock = StepClock(warmup)
trainer = SAETrainer(cfg=cfg.to_sae_trainer_config(), sae=sae, data_provider=RowProvider(rows, batch, clock))
trainer.fit()
clock.stop()
json.dump({"tool": "sae-lens", "architecture": "standard (ReLU + L1)", "lr": cfg.lr,
           "torch_threads": torch.get_num_threads(), **clock.summary(batch)}, open(out, "w"), indent=1)
"""


def saelens_relu(acts: Path, out: Path, *, tokens: int, batch_size: int, expansion: int, warmup_steps: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    result = out / "run.json"
    command = [str(PEERS_PY), "-c", SAELENS_RELU, str(acts), str(result), str(expansion), str(batch_size),
               str(tokens), str(warmup_steps)]
    say("peer saelens (standard ReLU/L1)")
    subprocess.run(command, check=True, cwd=PEERS_DIR, stdout=subprocess.DEVNULL)
    return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=DEFAULT_STORE)
    parser.add_argument("--store-tokens", type=int, default=DEFAULT_STORE_TOKENS, help="when generating the store")
    parser.add_argument("--tokens", type=int, default=409_600, help="tokens trained per tool (100 steps)")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--expansion", type=int, default=8)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="rounds over all tools; the median is kept")
    parser.add_argument("--no-relu", action="store_true", help="TopK only")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for every tool (default: torch's, = cores); 1 is least "
                             "disturbed by other work on a shared machine")
    parser.add_argument("--out", type=Path, default=OUT / "throughput")
    args = parser.parse_args()
    args.out, args.store = args.out.resolve(), args.store.resolve()
    if args.threads:
        torch.set_num_threads(args.threads)
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # inherited by the peers' processes
            os.environ[name] = str(args.threads)

    ensure_peers_env()
    store = generate_store(args.store, args.store_tokens)
    common = [f"loader.batch_size={args.batch_size}", f"sae.top_k={args.k}", f"sae.expansion_factor={args.expansion}"]
    topk_cfg = bench_config(args.store, args.out / "ours-topk", args.tokens, common, warmup_steps=args.warmup_steps)
    relu_cfg = bench_config(args.store, args.out / "ours-relu", args.tokens, [*common, "sae.act_fn=relu"],
                            warmup_steps=args.warmup_steps)
    acts = export_training_rows(topk_cfg, args.out / f"rows-{args.tokens}.npy")
    peer = dict(tokens=args.tokens, batch_size=args.batch_size, expansion=args.expansion, warmup_steps=args.warmup_steps)

    runs: dict[str, list[dict]] = {}
    started = time.perf_counter()
    jobs = {
        "ours topk": lambda: run_ours(topk_cfg),
        "sae-lens topk": lambda: run_peer("saelens", acts, args.out / "saelens-topk", k=args.k, **peer),
        "sparsify topk": lambda: run_peer("sparsify", acts, args.out / "sparsify-topk", k=args.k, **peer),
    }
    if not args.no_relu:
        jobs["ours relu"] = lambda: run_ours(relu_cfg)
        jobs["sae-lens relu"] = lambda: saelens_relu(acts, args.out / "saelens-relu", **peer)
    names = list(jobs)
    for round_index in range(args.repeats):
        say(f"round {round_index + 1}/{args.repeats}, load average {load_average()}")
        shift = round_index % len(names)  # rotate the order: no tool always runs first
        for name in names[shift:] + names[:shift]:
            runs.setdefault(name, []).append(jobs[name]())
    runs = {name: runs[name] for name in names}

    rate = {name: statistics.median(r["tokens_per_second"] for r in results) for name, results in runs.items()}
    summary = {
        "machine": machine(),
        "store": store,
        "tokens_per_tool": args.tokens,
        "batch_size": args.batch_size,
        "k": args.k,
        "expansion": args.expansion,
        "warmup_steps": args.warmup_steps,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "seconds": time.perf_counter() - started,
        "tokens_per_second_median": rate,
        "runs": {name: [{key: r.get(key) for key in ("tokens_per_second", "timed_seconds", "timed_tokens",
                                                      "load_before_after", "host_load_1min_before_after",
                                                      "timed_cpu_seconds", "lr", "torch_threads")} for r in results]
                 for name, results in runs.items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "result.json").write_text(json.dumps(summary, indent=1))
    say(f"\n{'run':<16} {'tokens/s':>10}   load average (1 min) before/after")
    for name, results in runs.items():
        loads = [r.get("load_before_after") or r.get("host_load_1min_before_after") for r in results]
        say(f"{name:<16} {rate[name]:>10,.0f}   {loads}")
    best_peer = max(rate["sae-lens topk"], rate["sparsify topk"])
    if not args.no_relu:
        say(f"relu: ours/sae-lens {rate['ours relu'] / rate['sae-lens relu']:.2f}")
    say(f"written: {args.out / 'result.json'}")
    print(f"train tokens/s ours/best-peer (TopK k={args.k}): {rate['ours topk'] / best_peer:.2f} (goal >= 2)")


if __name__ == "__main__":
    main()
