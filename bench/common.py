"""Helpers shared by the training benchmarks (train_throughput, compare_peers, init_ablation).

- the MiniLM layer-3 store under bench/out/ (made with `saeflow generate` when missing, timed);
- our side: `run_ours` runs the product's own training (`pipeline.train.stage.train`, the code
  behind `saeflow train`) and reads its train-only tokens/s from the run's train_log.jsonl;
- the peers' side: the rows of our loader's training stream, exported in batch order to a
  float16 .npy, and the peer adapters of bench/peers run on them in bench/.peers-venv;
- evaluation of any SAE (ours or a peer's exported weights) with saeflow's metric code
  (pipeline.sae.metrics.heldout_metrics) on the store's held-out rows.

Timing conventions, the same for every tool: only the training loop counts, from the start of
step `warmup_steps` to the end of the last timed step (no import, file load, init or export).
Ours: the loop's own log windows (train_log.jsonl: rows / tokens_per_second per window); with
log_every_steps = warmup_steps the first window is the warm-up. Peers: their StepClock.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from host import cpu_isa, cpu_model, load_average  # noqa: E402,F401 (load_average: for the benches)
from pipeline.config import ExperimentConfig, load_config  # noqa: E402
from pipeline.sae.metrics import heldout_metrics  # noqa: E402
from pipeline.sae.model import SparseAutoencoder  # noqa: E402
from pipeline.sae.config import SAEConfig  # noqa: E402
from store.loader import ActivationLoader  # noqa: E402
from store.reader import StoreReader  # noqa: E402
from store.split_moments import store_moments  # noqa: E402

OUT = REPO / "bench" / "out"
CONFIG = REPO / "configs" / "minilm-docstrings.yaml"
HOOK = "blocks.3.hook_resid_post"
DEFAULT_STORE = OUT / "minilm-l3.zarr"
# 1M training tokens + one held-out chunk of 16,384 rows, rounded up to whole chunks.
DEFAULT_STORE_TOKENS = 1_196_032
# Our settings are configs/minilm-docstrings.yaml's own (lr 3e-3, 100-step decay, AuxK dead
# window 10k tokens, the default at 1M: found by sweeps at 1M tokens on this store,
# docs/benchmarks.md); kept explicit so the benchmark does not drift if the config is retuned.
OURS_SHORT_RUN = ["train.lr=0.003", "train.lr_decay_steps=100", "train.dead_threshold_tokens=10000"]
PEERS_DIR = REPO / "bench" / "peers"
PEERS_PY = REPO / "bench" / ".peers-venv" / "bin" / "python"
SAEFLOW = [sys.executable, "-m", "pipeline.cli"]


# --- machine and conditions ---------------------------------------------------------------------
def machine() -> dict:
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu_model(),
        "cpu_isa": cpu_isa(),
        "cores": os.cpu_count(),
        "memory_gib": round(memory_gib, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "saeflow": version("saeflow"),
        **peer_versions(),
    }


def peer_versions() -> dict:
    if not PEERS_PY.exists():
        return {}
    code = ("from importlib.metadata import version as v; import json; "
            "print(json.dumps({n: v(n) for n in ('sae-lens', 'eai-sparsify', 'transformer-lens', 'torch')}))")
    result = subprocess.run([str(PEERS_PY), "-c", code], capture_output=True, text=True, check=True)
    found = json.loads(result.stdout)
    return {"sae-lens": found["sae-lens"], "eai-sparsify": found["eai-sparsify"],
            "peers_torch": found["torch"], "peers_transformer-lens": found["transformer-lens"]}


def ensure_peers_env() -> None:
    if not PEERS_PY.exists():
        say("bench/.peers-venv missing: running bench/make_peers_env.sh")
        subprocess.run(["bash", str(REPO / "bench" / "make_peers_env.sh")], check=True)


def say(text: str) -> None:
    print(text, flush=True)


# --- the store -----------------------------------------------------------------------------------
def store_complete(path: Path) -> bool:
    try:
        reader = StoreReader(path)
    except Exception:  # noqa: BLE001 - absent or unreadable: (re)generate
        return False
    return bool(reader.manifest.get("complete")) and reader.n_chunks > 1


def generate_store(path: Path, tokens: int, *, hooks: list[str] | None = None, fresh: bool = False,
                   config: Path = CONFIG) -> dict:
    """`saeflow generate` into path unless a complete store is there (fresh=True: always anew).
    Returns {"store", "generated", "seconds" (wall time of the CLI call, None when reused)}."""
    record = path.with_suffix(".generate.json")
    if fresh and path.exists():
        shutil.rmtree(path)
    if store_complete(path):
        previous = json.loads(record.read_text()) if record.is_file() else {}
        return {"store": str(path), "generated": False, "seconds": None, "previous": previous}
    overrides = [f"generate.store={path}", f"generate.target_tokens={tokens}"]
    if hooks:
        overrides.append(f"generate.hook_points={json.dumps(hooks)}")
        overrides += [f"sae.hook_point_in={hooks[0]}", f"sae.hook_point_out={hooks[0]}"]
    command = [*SAEFLOW, "generate", str(config), *sum((["--set", o] for o in overrides), [])]
    say(f"generating {path} ({tokens:,} tokens): {' '.join(command[2:])}")
    load_before = load_average()
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    facts = {"store": str(path), "generated": True, "seconds": seconds, "tokens": tokens,
             "load_before_after": [load_before, load_average()]}
    record.write_text(json.dumps(facts, indent=1))
    return facts


# --- our side ------------------------------------------------------------------------------------
def bench_config(store: Path, out_dir: Path, tokens: int, overrides: list[str] = (), *,
                 warmup_steps: int = 10, config: Path = CONFIG) -> ExperimentConfig:
    """The experiment config of a bench run: configs/minilm-docstrings.yaml on `store`, no
    checkpoints (the peers save none either), log windows of warmup_steps steps."""
    return load_config(config, [
        f"generate.store={store}", f"train.out_dir={out_dir}", f"train.total_tokens={tokens}",
        "train.checkpoint_every_tokens=null", f"train.log_every_steps={warmup_steps}", *overrides,
    ])


def run_ours(cfg: ExperimentConfig) -> dict:
    """Train with the product's train stage (init, loop, held-out report, save); return the
    train-only tokens/s of the loop after its first log window (the warm-up) and the timings."""
    from pipeline.train.stage import train

    out = Path(cfg.train.out_dir)
    if out.exists():
        shutil.rmtree(out)  # never resume a previous bench run
    load_before = load_average()
    cpu_before = time.process_time()
    started = time.perf_counter()
    directory = train(cfg)[0]
    wall = time.perf_counter() - started
    records = [json.loads(line) for line in (directory / "train_log.jsonl").read_text().splitlines()]
    timed = records[1:]  # the first window holds the warm-up steps (and the clock's start-up)
    if not timed:
        raise RuntimeError("too few steps to time: raise the token budget or lower warmup_steps")
    # Each record's tokens_per_second is its window's rows over the window's wall time.
    seconds = sum((r["tokens"] - p["tokens"]) / r["tokens_per_second"] for p, r in zip(records, timed))
    tokens = timed[-1]["tokens"] - records[0]["tokens"]
    d_sae = SAEConfig.model_validate(json.loads((directory / "config.json").read_text())["sae"]).d_sae
    return {
        "tool": "saeflow",
        "dir": str(directory),
        "tokens_trained": records[-1]["tokens"],
        "timed_tokens": tokens,
        "timed_seconds": seconds,
        "tokens_per_second": tokens / seconds,
        "wall_seconds_incl_init_and_report": wall,
        "process_cpu_seconds": time.process_time() - cpu_before,
        "load_before_after": [load_before, load_average()],
        "last_log": records[-1],
        # latents AuxK counts as dead when training ends (the peers report the same count)
        "dead_latents_at_end": round(records[-1].get("dead_fraction_train_window", 0.0) * d_sae),
    }


# --- rows for the peers --------------------------------------------------------------------------
def training_loader(cfg: ExperimentConfig, reader: StoreReader, dtype: torch.dtype | None) -> ActivationLoader:
    """The loader the train stage builds (same seed, split, buffer, batch size and row budget)."""
    batch_size = cfg.loader.batch_size
    total_steps = max(cfg.train.total_tokens // batch_size, 1)
    return ActivationLoader(
        reader, [cfg.sae.hook_point_in], batch_size=batch_size, split="train", seed=cfg.loader.seed,
        shuffle_buffer_chunks=cfg.loader.shuffle_buffer_chunks, slice_rows=cfg.loader.slice_rows,
        prefetch_batches=cfg.loader.prefetch_batches, num_workers=cfg.loader.num_workers,
        heldout_chunks=cfg.loader.heldout_chunks, dtype=dtype,
        max_rows=total_steps * batch_size,
    )


def export_training_rows(cfg: ExperimentConfig, path: Path) -> Path:
    """Our loader's training stream (float16, batch after batch) as an (N, d) .npy: a peer
    that reads rows [i*B, (i+1)*B) at step i sees exactly our batches."""
    reader = StoreReader(cfg.generate.store)
    loader = training_loader(cfg, reader, dtype=None)
    total = loader.max_rows
    stamp = {"store": str(reader.path), "rows": total, "seed": cfg.loader.seed, "batch": cfg.loader.batch_size,
             "buffer": cfg.loader.shuffle_buffer_chunks, "heldout": cfg.loader.heldout_chunks,
             "store_rows": reader.n_rows, "store_created": reader.manifest.get("created")}
    stamp_path = path.with_suffix(".json")
    if path.is_file() and stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.lib.format.open_memmap(path, mode="w+", dtype="<f2", shape=(total, reader.d(cfg.sae.hook_point_in)))
    row = 0
    for batch in loader:
        batch = batch[cfg.sae.hook_point_in]
        array[row : row + len(batch)] = batch.numpy()
        row += len(batch)
    array.flush()
    del array
    if row != total:
        raise RuntimeError(f"exported {row} rows, expected {total}")
    stamp_path.write_text(json.dumps(stamp))
    return path


def run_peer(tool: str, acts: Path, out: Path, *, tokens: int, batch_size: int, k: int, expansion: int,
             warmup_steps: int, extra: list[str] = ()) -> dict:
    """One peer adapter (tool: saelens | sparsify) on the exported rows; returns its run.json."""
    acts, out = acts.resolve(), out.resolve()  # the adapters run in bench/peers
    if out.exists():
        shutil.rmtree(out)
    command = [str(PEERS_PY), str(PEERS_DIR / f"train_{tool}.py"), "--acts", str(acts), "--out", str(out),
               "--k", str(k), "--expansion", str(expansion), "--batch-size", str(batch_size),
               "--tokens", str(tokens), "--warmup-steps", str(warmup_steps), *extra]
    say(f"peer {tool}: {' '.join(command[1:])}")
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=PEERS_DIR, stdout=subprocess.DEVNULL)
    facts = json.loads((out / "run.json").read_text())
    facts["wall_seconds_incl_import_and_export"] = time.perf_counter() - started
    return facts


# --- evaluation ----------------------------------------------------------------------------------
def peer_sae(directory: Path, k: int) -> SparseAutoencoder:
    """A peer's exported weights as a saeflow SAE on raw activations: z = topk(relu(x W_enc +
    b_enc)) ranked by the pre-activation alone (as the peers rank), x_hat = z W_dec + b_dec."""
    from safetensors.torch import load_file

    weights = load_file(str(directory / "sae.safetensors"))
    d_model, d_sae = weights["W_enc"].shape
    cfg = SAEConfig(hook_point_in=HOOK, hook_point_out=HOOK, d_model=d_model, expansion_factor=d_sae / d_model,
                    act_fn="topk", top_k=k, norm_activation="inference", sparsity_include_decoder_norm=False)
    sae = SparseAutoencoder(cfg)
    state = sae.state_dict()
    state.update({name: weights[name].float() for name in ("W_enc", "b_enc", "W_dec", "b_dec")})
    sae.load_state_dict(state)
    return sae.eval()


def evaluate_sae(sae: SparseAutoencoder, store: Path, *, heldout_chunks: int, batch_size: int = 4096) -> dict:
    """saeflow's held-out metrics of any SAE: FVU (against the training split's mean, as the
    evaluator), L0 and dead_fraction_heldout (latents that fire on none of the held-out rows)."""
    reader = StoreReader(store)
    hook = sae.cfg.hook_point_in
    mean = store_moments(reader, hook, heldout_chunks=heldout_chunks, track_covariance=False).mean.double()
    heldout = ActivationLoader(reader, hook, batch_size=batch_size, split="heldout", heldout_chunks=heldout_chunks,
                               dtype=torch.float32)
    return heldout_metrics(sae, heldout, mean).result()
