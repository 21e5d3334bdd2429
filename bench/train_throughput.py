"""Train-only tokens/s at several widths: saeflow against EleutherAI sparsify on the same rows, one run.

TopK SAEs (k=32, batch 4096) on MiniLM-L6 layer 3 residual rows (d_model 384, docstring
corpus) at each width of `--widths` (default 3072, 6144 and 12288 latents):
- ours: the product's training loop (`pipeline.train.stage.train`, what `saeflow train` runs):
  store -> ActivationLoader (shuffle buffer, prefetch thread, fp16 -> fp32) -> SAETrainer.
  train_step (TopK forward on the sparse path, normalized MSE, AuxK, Adam, decoder
  renormalization, logging);
- sparsify 1.3.3 (`Trainer.fit`, its defaults: AuxK off), through bench/peers, on our loader's
  training stream exported in batch order to a float16 .npy (held in RAM); and, for the same
  objective as ours, sparsify with AuxK on at our coefficient and dead window (`--no-same-work`
  skips it; at defaults ours does AuxK's work and sparsify does not); `--saelens` adds
  SAELens 6.54 (slow: ~1k tokens/s), `--relu` ReLU + L1 for ours and SAELens at the first width;
- planted dead: our SAETrainer at the same width, `--planted-dead` (10%) of its latents marked
  dead before every step (so AuxK always works on at least that many), against the same trainer
  with AuxK off (aux_k_coefficient 0), step by step on the same batches, alternating which goes
  first; the ratio of their median step times.
Only the training loop is timed, after `--warmup-steps` steps, for every tool (no import, init,
file load or export). Each tool runs with its default optimizer and lr. With `--repeats R` the
tools run R rounds in turn and the median per tool is kept (a shared machine's load drifts).

    .venv/bin/python bench/train_throughput.py [--widths 3072 6144 12288] [--tokens 163840]
        [--repeats 1] [--threads N] [--saelens] [--relu]

The store bench/out/minilm-l3.zarr is made by `saeflow generate` when missing (~1.2M tokens).
Last lines: the AuxK step ratio at every width (goal <= 1.15), ours / sparsify with AuxK on in
both, then ours / sparsify at each tool's defaults at every width, the smallest last (goal >= 2).
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
    DEFAULT_STORE, DEFAULT_STORE_TOKENS, HOOK, OUT, PEERS_DIR, PEERS_PY, bench_config, ensure_peers_env,
    export_training_rows, generate_store, load_average, machine, run_ours, run_peer, say, training_loader,
)
from host import print_host

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
D_MODEL = 384


def saelens_relu(acts: Path, out: Path, *, tokens: int, batch_size: int, expansion: int, warmup_steps: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    result = out / "run.json"
    command = [str(PEERS_PY), "-c", SAELENS_RELU, str(acts), str(result), str(expansion), str(batch_size),
               str(tokens), str(warmup_steps)]
    say("peer saelens (standard ReLU/L1)")
    subprocess.run(command, check=True, cwd=PEERS_DIR, stdout=subprocess.DEVNULL)
    return json.loads(result.read_text())


def planted_dead(cfg, share: float, steps: int, warmup: int) -> dict:
    """Median step time of our trainer with `share` of its latents kept dead (AuxK on) over the
    same trainer's with AuxK off, on the same batches; the two alternate which steps first."""
    from pipeline.heap import keep_large_blocks_in_heap
    from pipeline.train.stage import build_trainer, open_store

    keep_large_blocks_in_heap()  # as the training stage does on the CPU
    reader = open_store(str(cfg.generate.store))
    off_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"aux_k_coefficient": 0.0})})
    out = Path(cfg.train.out_dir)
    trainers = {name: build_trainer(name, c, reader, out / name, steps, writes=False)
                for name, c in (("on", cfg), ("off", off_cfg))}
    d_sae = trainers["on"].sae.cfg.d_sae
    planted = torch.randperm(d_sae, generator=torch.Generator().manual_seed(0))[: int(share * d_sae)]
    seconds: dict[str, list[float]] = {"on": [], "off": []}
    dead_counts = []
    batches = training_loader(cfg.model_copy(update={"train": cfg.train.model_copy(
        update={"total_tokens": steps * cfg.loader.batch_size})}), reader, torch.float32)
    for step, batch in enumerate(batches):
        x = batch[HOOK]
        order = ("on", "off") if step % 2 == 0 else ("off", "on")
        for name in order:
            trainer = trainers[name]
            counters = trainer.tokens_since_fired
            counters[planted] = counters[planted].clamp(min=trainer.dead_window)
            if name == "on":
                dead_counts.append(int(trainer.dead_mask().sum()))
            started = time.perf_counter()
            trainer.train_step(x, x)
            if step >= warmup:
                seconds[name].append(time.perf_counter() - started)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    return {"d_sae": d_sae, "planted": len(planted), "dead_during_steps": [min(dead_counts), max(dead_counts)],
            "k_aux": trainers["on"].k_aux, "timed_steps": len(seconds["on"]),
            "step_seconds_aux_on": median["on"], "step_seconds_aux_off": median["off"],
            "ratio": median["on"] / median["off"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=DEFAULT_STORE)
    parser.add_argument("--store-tokens", type=int, default=DEFAULT_STORE_TOKENS, help="when generating the store")
    parser.add_argument("--widths", type=int, nargs="+", default=[3072, 6144, 12288], help="latents (multiples of 384)")
    parser.add_argument("--tokens", type=int, default=163_840, help="tokens trained per tool and width (40 steps)")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1, help="rounds over all tools; the median is kept")
    parser.add_argument("--planted-dead", type=float, default=0.1, help="share of latents kept dead (0: skip)")
    parser.add_argument("--planted-steps", type=int, default=16, help="steps of the planted case, 4 of them warm-up")
    parser.add_argument("--no-same-work", dest="same_work", action="store_false",
                        help="skip sparsify with AuxK on at our coefficient and dead window")
    parser.add_argument("--saelens", action="store_true", help="also SAELens TopK (slow)")
    parser.add_argument("--relu", action="store_true", help="also ReLU + L1, ours and SAELens, at the first width")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for every tool (default: torch's, = cores); 1 is least "
                             "disturbed by other work on a shared machine")
    parser.add_argument("--out", type=Path, default=OUT / "throughput")
    args = parser.parse_args()
    print_host()
    args.out, args.store = args.out.resolve(), args.store.resolve()
    if any(width % D_MODEL for width in args.widths):
        parser.error(f"--widths must be multiples of d_model {D_MODEL}, got {args.widths}")
    if args.threads:
        torch.set_num_threads(args.threads)
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # inherited by the peers' processes
            os.environ[name] = str(args.threads)

    ensure_peers_env()
    store = generate_store(args.store, args.store_tokens)
    started = time.perf_counter()
    runs: dict[str, list[dict]] = {}
    planted: dict[int, dict] = {}
    acts = None
    for width in args.widths:
        expansion = width // D_MODEL
        # the dead window of a default 1M-token run, not of this short one (a hundredth of it)
        common = [f"loader.batch_size={args.batch_size}", f"sae.top_k={args.k}", f"sae.expansion_factor={expansion}",
                  "train.dead_threshold_tokens=10000"]
        topk_cfg = bench_config(args.store, args.out / f"ours-topk-{width}", args.tokens, common,
                                warmup_steps=args.warmup_steps)
        acts = acts or export_training_rows(topk_cfg, args.out / f"rows-{args.tokens}.npy")  # the same rows at every width
        peer = dict(tokens=args.tokens, batch_size=args.batch_size, expansion=expansion, warmup_steps=args.warmup_steps)
        jobs = {
            f"ours topk {width}": lambda: run_ours(topk_cfg),
            f"sparsify topk {width}": lambda: run_peer("sparsify", acts, args.out / f"sparsify-topk-{width}", k=args.k, **peer),
        }
        if args.same_work:  # the same objective as ours: sparsify with AuxK at our coefficient and dead window
            same_aux = ["--auxk-alpha", str(topk_cfg.train.aux_k_coefficient),
                        "--dead-feature-threshold", str(topk_cfg.train.dead_window_tokens())]
            jobs[f"sparsify topk+auxk {width}"] = lambda: run_peer(
                "sparsify", acts, args.out / f"sparsify-topk-auxk-{width}", k=args.k, extra=same_aux, **peer)
        if args.saelens:
            jobs[f"sae-lens topk {width}"] = lambda: run_peer("saelens", acts, args.out / f"saelens-topk-{width}", k=args.k, **peer)
        if args.relu and width == args.widths[0]:
            relu_cfg = bench_config(args.store, args.out / "ours-relu", args.tokens, [*common, "sae.act_fn=relu"],
                                    warmup_steps=args.warmup_steps)
            jobs["ours relu"] = lambda: run_ours(relu_cfg)
            jobs["sae-lens relu"] = lambda: saelens_relu(acts, args.out / "saelens-relu", **peer)
        names = list(jobs)
        for round_index in range(args.repeats):
            say(f"width {width}: round {round_index + 1}/{args.repeats}, load average {load_average()}")
            shift = round_index % len(names)  # rotate the order: no tool always runs first
            for name in names[shift:] + names[:shift]:
                runs.setdefault(name, []).append(jobs[name]())
        if args.planted_dead:
            say(f"width {width}: planted dead ({args.planted_dead:.0%}), AuxK on vs off, load average {load_average()}")
            planted[width] = planted_dead(topk_cfg, args.planted_dead, args.planted_steps, warmup=4)

    rate = {name: statistics.median(r["tokens_per_second"] for r in results) for name, results in runs.items()}
    speed = {width: rate[f"ours topk {width}"] / rate[f"sparsify topk {width}"] for width in args.widths}
    same_work = {width: rate[f"ours topk {width}"] / rate[f"sparsify topk+auxk {width}"]
                 for width in args.widths if f"sparsify topk+auxk {width}" in rate}
    summary = {
        "machine": machine(), "store": store, "widths": args.widths, "tokens_per_tool": args.tokens,
        "batch_size": args.batch_size, "k": args.k, "warmup_steps": args.warmup_steps, "repeats": args.repeats,
        "threads": torch.get_num_threads(), "seconds": time.perf_counter() - started,
        "tokens_per_second_median": rate, "ours_over_sparsify": speed, "ours_over_sparsify_both_auxk": same_work, "planted_dead": planted,
        "runs": {name: [{key: r.get(key) for key in ("tokens_per_second", "timed_seconds", "timed_tokens",
                                                      "load_before_after", "host_load_1min_before_after",
                                                      "timed_cpu_seconds", "lr", "torch_threads", "dead_latents_at_end")} for r in results]
                 for name, results in runs.items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "result.json").write_text(json.dumps(summary, indent=1))
    say(f"\n{'run':<24} {'tokens/s':>10}   load average (1 min) before/after")
    for name, results in runs.items():
        loads = [r.get("load_before_after") or r.get("host_load_1min_before_after") for r in results]
        dead = [r["dead_latents_at_end"] for r in results if "dead_latents_at_end" in r]
        say(f"{name:<24} {rate[name]:>10,.0f}   {loads}" + (f"   dead at the end: {dead}" if dead else ""))
    if args.relu:
        say(f"relu: ours/sae-lens {rate['ours relu'] / rate['sae-lens relu']:.2f}")
    for width, facts in planted.items():
        say(f"planted dead at {width}: {facts['planted']} latents kept dead (dead {facts['dead_during_steps']}), "
            f"k_aux {facts['k_aux']}: step {facts['step_seconds_aux_on'] * 1e3:.0f} ms with AuxK, "
            f"{facts['step_seconds_aux_off'] * 1e3:.0f} ms without")
    say(f"written: {args.out / 'result.json'}")
    if planted:
        ratios = " / ".join(f"{planted[w]['ratio']:.2f}" for w in planted)
        say(f"step with AuxK active / without at {' / '.join(map(str, planted))} latents: {ratios} "
            f"(goal <= 1.15 at every width)")
    if same_work:
        shown = " / ".join(f"{same_work[w]:.2f}" for w in same_work)
        say(f"train tokens/s ours/sparsify, AuxK on in both (coefficient {topk_cfg.train.aux_k_coefficient:g}, dead after "
            f"{topk_cfg.train.dead_window_tokens()} tokens) at {' / '.join(map(str, same_work))} latents: {shown}")
    shown = " / ".join(f"{speed[w]:.2f}" for w in args.widths)
    print(f"train tokens/s ours/sparsify at {' / '.join(map(str, args.widths))} latents: {shown}; "
          f"smallest: {min(speed.values()):.2f} (goal >= 2)")


if __name__ == "__main__":
    main()
