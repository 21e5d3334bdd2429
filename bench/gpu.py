"""The GPU path measured on a CUDA device: generate, loader, train and peak memory, one line each.

(a) generate tokens/s: a seeded random decoder of GPT-2 small's shape (model.name random: 12
    layers, d_model 768, 12 heads, n_ctx 1024; no hub download; its tokenizer is MiniLM's, so the
    vocabulary is 30,522 instead of 50,257) over the built-in python-docstrings corpus, hook
    blocks.6.hook_resid_post, context 1024, batch 32: the whole stage
    (pipeline.generate.stage.generate: tokenize, forward, fp16, store writer, checksums, stats)
    against the bare forward (LanguageModel.run_hooks on the same batches, tokenized beforehand,
    as bench/generate_overhead.py separates them). Tokens/s counts positions forwarded.
(b) loader GB/s into device memory: shuffled epochs of ActivationLoader(device="cuda",
    pin_memory=True) float16 batches ({hook: tensor}, stored bytes counted) from a random fp16
    store, d 768, ~10 GB (--store-gb), built once by bench/loader_throughput.py's build_store
    (checksums included) and reused; warm (page cache) and cold (page cache dropped).
(c) train tokens/s: TopK k=32, d_sae 24576 (expansion 32), bf16 autocast, batch 4096, through
    pipeline.train.stage.train on the store of (a) (that of (b) when (a) never ran), read from
    train_log.jsonl after the first log window (bench/common.py run_ours).
(d) peak device memory of (c): torch.cuda.max_memory_allocated over the whole train stage
    (initialization, loop, held-out report), the language model freed before.
Every clock that stops after GPU work stops after torch.cuda.synchronize() (generate's own clock
stops after the writer's flush, which needs every row on the host).

    .venv/bin/python bench/gpu.py [--tokens N] [--train-tokens N] [--store-gb G] [--out DIR]
                                  [--skip-generate] [--skip-loader] [--workers K]
Writes DIR/result.json. Last line: train tokens/s (goal >= 1,000,000).
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from host import print_host

NO_CUDA = ("no CUDA device: bench/gpu.py measures the GPU path; run it on a CUDA machine "
           "(pip install torch with the CUDA index, see README)")
HOOK = "blocks.6.hook_resid_post"
RANDOM_GPT2 = {"n_layers": 12, "d_model": 768, "n_heads": 12, "n_ctx": 1024, "seed": 0}
# Goal: 1M tokens/s. Per token the sparse TopK step does one dense matmul, the encoder forward:
# 2 * 768 * 24576 = 37.7 MFLOP, i.e. 26M tokens/s at the H100 SXM's 989 dense bf16 TFLOP/s
# (NVIDIA datasheet); the (4096, 24576) bf16 pre-activations are written and read at least 3 times
# (top-k, AuxK, gather): ~150 KB per token, 22M tokens/s at its 3.35 TB/s. 1M tokens/s is 5% of
# either bound (a 4096-row step in 4 ms), a modest goal that leaves room for the per-step host
# syncs and Python overhead of an unfused PyTorch step.
GOAL_TRAIN_TOKENS_S = 1_000_000


def experiment(out: Path, store: Path, tokens: int, train_tokens: int, workers: int, lm_dtype: str):
    """The bench's config, written out here so that every setting measured is in one place."""
    from pipeline.config import validate_config

    return validate_config({
        "model": {"name": "random", "random": RANDOM_GPT2, "dtype": lm_dtype, "device": "cuda"},
        "dataset": {"source": "python-docstrings"},
        "generate": {"store": str(store), "hook_points": [HOOK], "context_size": 1024, "batch_size": 32,
                     "target_tokens": tokens},
        "sae": {"hook_point_in": HOOK, "hook_point_out": HOOK, "d_model": 768, "expansion_factor": 32,
                "act_fn": "topk", "top_k": 32, "device": "cuda"},
        "loader": {"batch_size": 4096, "heldout_chunks": 1, "num_workers": workers},
        "train": {"out_dir": str(out / "train"), "total_tokens": train_tokens, "autocast_dtype": "bfloat16",
                  "checkpoint_every_tokens": None, "log_every_steps": 20},
    })


def synchronized_seconds(run) -> tuple[float, object]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    value = run()
    torch.cuda.synchronize()
    return time.perf_counter() - start, value


# --- (a) generate ----------------------------------------------------------------------------
def bench_generate(cfg) -> dict:
    from generate_overhead import same_batches
    from pipeline.generate.lm import load_language_model
    from pipeline.generate.stage import generate

    lm = load_language_model(cfg.model)
    hooks = list(cfg.generate.hook_points)
    batches = same_batches(cfg, lm)
    tokens = sum(batch.tokens.size for batch in batches)

    def forward(some) -> None:
        for batch in some:
            mask = None if batch.attention_mask is None else torch.from_numpy(batch.attention_mask)
            lm.run_hooks(torch.from_numpy(batch.tokens), hooks, attention_mask=mask)

    synchronized_seconds(lambda: forward(batches[:2]))  # warm-up: kernels, allocator
    forward_s, _ = synchronized_seconds(lambda: forward(batches))
    shutil.rmtree(cfg.generate.store, ignore_errors=True)
    result = generate(cfg, lm=lm)
    if result.tokens_forwarded != tokens:
        raise RuntimeError(f"generate forwarded {result.tokens_forwarded} tokens, the bare forward {tokens}")
    lm = batches = None  # free the language model before (c)
    gc.collect()
    torch.cuda.empty_cache()  # (d) should not count the language model
    return {"tokens_forwarded": tokens, "rows": result.n_rows, "forward_tokens_per_second": tokens / forward_s,
            "generate_tokens_per_second": tokens / result.seconds, "generate_seconds": result.seconds}


# --- (b) loader ------------------------------------------------------------------------------
def loader_store(path: Path, store_gb: float) -> Path:
    """The random fp16 store of (b), built once (reused while its row count matches)."""
    from loader_throughput import CHUNK_ROWS, D, build_store
    from store.format import read_manifest

    rows = max(int(store_gb * 1e9 / (2 * D)) // CHUNK_ROWS, 2) * CHUNK_ROWS
    try:
        manifest = read_manifest(path)
        if manifest.get("complete") and int(manifest["n_rows"]) == rows:
            return path
    except Exception:  # noqa: BLE001 - absent or unreadable: build it
        pass
    shutil.rmtree(path, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    build_store(path, rows)
    print(f"built {path}: {rows:,} rows x {D} fp16 = {rows * D * 2 / 1e9:.2f} GB in {time.perf_counter() - start:.0f} s",
          flush=True)
    return path


def loader_gb_s(path: Path, workers: int, *, cold: bool) -> float:
    from loader_throughput import chunk_files, drop_cache
    from store.format import read_manifest
    from store.loader import ActivationLoader

    if cold:
        drop_cache(chunk_files(path))
    loader = ActivationLoader(path, HOOK, batch_size=4096, heldout_chunks=0, shuffle_buffer_chunks=8,
                              prefetch_batches=4, num_workers=workers, dtype=None, device="cuda",
                              pin_memory=True, max_rows=int(read_manifest(path)["n_rows"]), seed=0)

    def epoch() -> int:
        nbytes = 0
        for batch in loader:
            rows = batch[HOOK]
            assert rows.is_cuda and rows.dtype == torch.float16
            nbytes += rows.numel() * rows.element_size()
        return nbytes

    seconds, nbytes = synchronized_seconds(epoch)
    return nbytes / seconds / 1e9


# --- (c), (d) train --------------------------------------------------------------------------
def bench_train(cfg) -> dict:
    from common import run_ours

    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    run = run_ours(cfg)
    run.update(peak_bytes=torch.cuda.max_memory_allocated(), baseline_bytes=baseline,
               reserved_peak_bytes=torch.cuda.max_memory_reserved())
    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2_000_000, help="rows generate stores in (a)")
    parser.add_argument("--train-tokens", type=int, default=10_000_000, help="rows trained on in (c)")
    parser.add_argument("--store-gb", type=float, default=10.0, help="size of the random store of (b)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out" / "gpu")
    parser.add_argument("--workers", type=int, default=4, help="loader reader threads in (b) and (c)")
    parser.add_argument("--lm-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--skip-generate", action="store_true", help="skip (a); (c) uses a store of (a) left by an earlier run, else (b)'s")
    parser.add_argument("--skip-loader", action="store_true", help="skip (b)")
    args = parser.parse_args()
    print_host()
    if not torch.cuda.is_available():
        print(NO_CUDA)
        return 0

    from common import machine, store_complete  # imports the pipeline: only past the CUDA check

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = experiment(out, out / "generate.zarr", args.tokens, args.train_tokens, args.workers, args.lm_dtype)
    facts = {"machine": {**machine(), "gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda},
             "args": {k: str(v) for k, v in vars(args).items()}}
    print(f"{facts['machine']['gpu']}, torch {torch.__version__} (CUDA {torch.version.cuda})", flush=True)
    if not args.skip_generate:
        gen = facts["generate"] = bench_generate(cfg)
        print(f"generate tokens/s, random GPT-2-small shape, {HOOK}, context 1024, batch 32, {args.lm_dtype}: "
              f"{gen['generate_tokens_per_second']:,.0f} vs bare forward {gen['forward_tokens_per_second']:,.0f} "
              f"(ratio {gen['generate_tokens_per_second'] / gen['forward_tokens_per_second']:.3f})", flush=True)
    big = out / f"loader-{args.store_gb:g}gb.zarr"
    if not args.skip_loader:
        loader_store(big, args.store_gb)
        warm = max(loader_gb_s(big, args.workers, cold=False) for _ in range(2))
        cold = loader_gb_s(big, args.workers, cold=True)
        facts["loader"] = {"warm_gb_s": warm, "cold_gb_s": cold, "store": str(big)}
        print(f"loader GB/s into device memory, fp16 d 768, {args.workers} workers, pinned: "
              f"{warm:.2f} warm (best of 2), {cold:.2f} cold", flush=True)
    store = Path(cfg.generate.store)
    if not store_complete(store):
        store = loader_store(big, args.store_gb)  # no recorded stats: train reads its moments in a pass
        cfg = cfg.model_copy(update={"generate": cfg.generate.model_copy(update={"store": str(store)})})
    train = facts["train"] = bench_train(cfg)
    print(f"peak device memory of train: {train['peak_bytes'] / 2**30:.2f} GiB allocated "
          f"({train['reserved_peak_bytes'] / 2**30:.2f} GiB reserved; {train['baseline_bytes'] / 2**30:.2f} before)")
    (out / "result.json").write_text(json.dumps(facts, indent=1, default=str))
    print(f"train tokens/s, TopK k=32 d_sae 24576 bf16, batch 4096, store {store.name}: "
          f"{train['tokens_per_second']:,.0f} (goal >= {GOAL_TRAIN_TOKENS_S:,})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
