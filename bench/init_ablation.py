"""Initialization ablation on MiniLM-L6 activations of the docstring corpus (TopK k=32, x8).

1. Residual stream (blocks.3.hook_resid_post, the compare store): `all_zero` (b_dec = 0, no
   norm grid search, b_enc = 0, decoder rows at 0.1) against the seed's recommended init
   (b_dec = geometric median, grid_search_init_norm, init_encoder_bias_with_mean_hidden_pre).
2. Attention output (blocks.3.hook_attn_out, low rank; a small store generated for it), both
   with the recommended init: with and without initialize_W_D_with_active_subspace
   (d_active_subspace = d_model / 2 = 192).
Each pair trains in one pass over the same batches (a saeflow sweep: same loader, same steps).
Reported on the store's held-out rows with saeflow's metrics: FVU right after init (step 0),
FVU after training, the dead fraction (latents firing on none of the held-out rows) and the
seconds each initialization took (sampling, decoder bias, norm search).

    .venv/bin/python bench/init_ablation.py [--tokens 1000000] [--attn-store-tokens 401408]

Last line: dead fraction recommended / all_zero on the residual stream (goal < 1: the init
keeps latents alive); final FVU and initial FVU are printed above it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from common import (
    DEFAULT_STORE, DEFAULT_STORE_TOKENS, OURS_SHORT_RUN, OUT, bench_config, evaluate_sae, generate_store, load_average, machine, say,
)
from host import print_host  # noqa: E402

ATTN_HOOK = "blocks.3.hook_attn_out"
RECOMMENDED = {"initializer.bias_init_method": "geometric_median", "initializer.grid_search_init_norm": True,
               "initializer.init_encoder_bias_with_mean_hidden_pre": True}
ALL_ZERO = {"initializer.bias_init_method": "all_zero", "initializer.grid_search_init_norm": False,
            "initializer.init_encoder_bias_with_mean_hidden_pre": False}


def sweep_override(variants: dict[str, dict]) -> str:
    entries = [{**settings, "name": name} for name, settings in variants.items()]
    return f"train.sweep={json.dumps(entries)}"


def ablate(store: Path, out: Path, tokens: int, variants: dict[str, dict], hook: str | None = None) -> dict:
    """Initial and final held-out metrics of each variant, trained in one sweep."""
    from pipeline.sweeps import sweep_variants
    from pipeline.train.stage import build_trainer, open_store, train

    hooks = [] if hook is None else [f"generate.hook_points=[{hook}]", f"sae.hook_point_in={hook}",
                                     f"sae.hook_point_out={hook}"]
    cfg = bench_config(store, out, tokens, [*OURS_SHORT_RUN, *hooks, sweep_override(variants)])
    if out.exists():
        shutil.rmtree(out)
    reader = open_store(str(store))
    results: dict[str, dict] = {}
    steps = max(tokens // cfg.loader.batch_size, 1)
    for name, variant in sweep_variants(cfg):
        init_started = time.perf_counter()  # sampling, median, norm search: what a run pays before step 1
        trainer = build_trainer(name, variant, reader, out / "init" / name, steps)
        init_seconds = time.perf_counter() - init_started
        results[name] = {"initial": evaluate_sae(trainer.sae, store, heldout_chunks=cfg.loader.heldout_chunks),
                         "init_seconds": init_seconds}
    shutil.rmtree(out / "init")
    started, load_before = time.perf_counter(), load_average()
    directories = train(cfg)
    seconds = time.perf_counter() - started
    from pipeline.sae.io import load_sae

    for directory in directories:
        sae = load_sae(directory, device="cpu")
        results[directory.name]["final"] = evaluate_sae(sae, store, heldout_chunks=cfg.loader.heldout_chunks)
        log = [json.loads(line) for line in (directory / "train_log.jsonl").read_text().splitlines()]
        results[directory.name]["dead_fraction_train_window_last_log"] = log[-1]["dead_fraction_train_window"]
    for name in results:
        results[name]["settings"] = variants[name]
    return {"variants": results, "train_seconds_all_variants": seconds, "tokens": tokens,
            "load_before_after": [load_before, load_average()]}


def active_subspace_share(store: Path, hook: str, k: int) -> float:
    """Share of the hook's variance in its top-k principal directions (training split)."""
    from pipeline.sae.geometry import principal_components
    from store.reader import StoreReader
    from store.split_moments import store_moments

    _, ratio = principal_components(store_moments(StoreReader(store), hook).covariance(), k)
    return float(ratio.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1_000_000, help="training tokens, residual stream")
    parser.add_argument("--store", type=Path, default=DEFAULT_STORE)
    parser.add_argument("--store-tokens", type=int, default=DEFAULT_STORE_TOKENS)
    parser.add_argument("--attn-store", type=Path, default=OUT / "minilm-l3-attn.zarr")
    parser.add_argument("--attn-store-tokens", type=int, default=401_408, help="24 train + 1 held-out chunk")
    parser.add_argument("--attn-tokens", type=int, default=None, help="training tokens, attention (default: its split)")
    parser.add_argument("--out", type=Path, default=OUT / "init-ablation")
    args = parser.parse_args()
    print_host()
    args.out, args.store, args.attn_store = args.out.resolve(), args.store.resolve(), args.attn_store.resolve()
    started = time.perf_counter()

    generate_store(args.store, args.store_tokens)
    resid = ablate(args.store, args.out / "resid", args.tokens, {"all_zero": ALL_ZERO, "recommended": RECOMMENDED})

    attn_store = generate_store(args.attn_store, args.attn_store_tokens, hooks=[ATTN_HOOK])
    from store.reader import StoreReader

    reader = StoreReader(args.attn_store)
    d_model = reader.d(ATTN_HOOK)
    attn_tokens = args.attn_tokens or reader.chunk_bounds(reader.n_chunks - 1)[0]  # one epoch of its train split
    subspace = {"initializer.initialize_W_D_with_active_subspace": True,
                "initializer.d_active_subspace": d_model // 2}
    attn = ablate(args.attn_store, args.out / "attn", attn_tokens,
                  {"recommended": RECOMMENDED, "active_subspace": {**RECOMMENDED, **subspace}}, hook=ATTN_HOOK)
    attn["variance_share_top_half_pcs"] = active_subspace_share(args.attn_store, ATTN_HOOK, d_model // 2)
    resid["variance_share_top_half_pcs"] = active_subspace_share(args.store, "blocks.3.hook_resid_post", d_model // 2)

    summary = {"machine": machine(), "resid_post": resid, "attn_out": attn, "attn_store": attn_store,
               "seconds": time.perf_counter() - started,
               "dead_definition": "latents firing on none of the held-out rows"}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "result.json").write_text(json.dumps(summary, indent=1, default=str))
    say(f"\n{'hook':<10} {'init':<16} {'FVU init':>9} {'FVU final':>10} {'L0':>5} {'dead':>7} {'init s':>7}")
    for hook, block in (("resid_post", resid), ("attn_out", attn)):
        for name, facts in block["variants"].items():
            say(f"{hook:<10} {name:<16} {facts['initial']['fvu']:>9.4f} {facts['final']['fvu']:>10.4f} "
                f"{facts['final']['l0']:>5.1f} {facts['final']['dead_fraction_heldout']:>7.2%} {facts['init_seconds']:>7.2f}")
        say(f"{hook}: top {d_model // 2} principal directions hold {block['variance_share_top_half_pcs']:.1%} "
            f"of the variance; {block['tokens']:,} training tokens")
    say(f"written: {args.out / 'result.json'} ({summary['seconds']:.0f} s)")
    variants = resid["variants"]
    fvu = {name: facts["final"]["fvu"] for name, facts in variants.items()}
    say(f"final FVU recommended/all_zero (resid_post): {fvu['recommended'] / fvu['all_zero']:.2f}; "
        f"initial FVU {variants['recommended']['initial']['fvu']:.3f} vs {variants['all_zero']['initial']['fvu']:.3f}")
    dead = {name: facts["final"]["dead_fraction_heldout"] for name, facts in variants.items()}
    print(f"dead latents recommended/all_zero (resid_post, held-out, {args.tokens:,} tokens): "
          f"{dead['recommended'] / max(dead['all_zero'], 1e-9):.2f} (goal < 1)")


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    main()
