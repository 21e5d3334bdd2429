"""Stage 2: train one SAE, or a sweep of them, from the activation store in one pass.

Every variant of a sweep sees the same shuffled batches (one read of the store feeds them all);
each has its own optimizer, logs, checkpoints and output directory <train.out_dir>/<name>/.
Checkpoints hold everything a bitwise resume needs (weights, Adam state, step and token counts,
dead-latent counters, RNG, the loader cursor); `saeflow train` on a run directory with
checkpoints continues from the newest step that every variant has saved.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline.config import ConfigError, ExperimentConfig, resolve_device
from pipeline.sweeps import SWEEP_PLOTS_FOLDER, sweep_variants
from pipeline.distributed import SINGLE, Ranks, join_ranks, leave_ranks
from pipeline.files import write_text_atomically
from pipeline.heap import keep_large_blocks_in_heap
from pipeline.sae.initialize import check_against_store, initialize_sae
from pipeline.sae.io import export_saelens, save_sae
from pipeline.sae.model import SparseAutoencoder
from pipeline.train.calibrate import calibrate_after_training
from pipeline.train.checkpoint import checkpoint_path, saved_steps
from pipeline.train.compare import compare_runs
from pipeline.train.report import write_heldout_report
from pipeline.train.run_record import finish_record, finished_here, start_record
from pipeline.train.trainer import SAETrainer
from store.format import StoreError
from store.loader import ActivationLoader
from store.location import StoreLocation
from store.moments import norm_scale_factor
from store.reader import StoreReader
from store.sampling import sample_rows
from store.split_moments import store_moments


def train(cfg: ExperimentConfig, *, overwrite: bool = False, allow_incomplete: bool = False) -> list[Path]:
    """Train every SAE variant of `cfg` (resuming from checkpoints); returns their directories.
    A variant whose folder holds its finished SAE is left alone; one holding a finished SAE of
    another config is refused unless `overwrite` (run_record.py). A store generate has not
    finished is refused unless `allow_incomplete`. A train.sweep's comparison plots go to
    <train.out_dir>/sweep/ (compare.py). Under torchrun the ranks train
    data-parallel or share out the variants (train.distribute; pipeline/distributed.py)."""
    reader = open_store(cfg.generate.location(), verify=cfg.loader.verify, cache_dir=cfg.loader.cache_dir,
                        allow_incomplete=allow_incomplete)
    root = Path(cfg.train.out_dir)
    everything = sweep_variants(cfg)
    device = _one_device(everything)
    ranks = join_ranks(device.type)
    try:
        # only rank 0 looks at (and with --overwrite, empties) the run folders; every rank follows it
        pending = [name for name, variant in everything if not finished_here(root / name, variant, reader, overwrite=overwrite)] \
            if ranks.main else None
        pending = ranks.broadcast_json(pending)
        variants = [(name, variant) for name, variant in everything if name in pending]
        if not variants:
            _say(f"{root}: every SAE of this config is trained already; nothing to do")
        elif ranks.distributed and cfg.train.distribute == "variants":
            mine = variants[ranks.rank :: ranks.world]
            _say(f"rank {ranks.rank} of {ranks.world}: {len(mine)} of the {len(variants)} variants "
                 f"({', '.join(name for name, _ in mine) or 'none'})")
            if mine:
                _train_variants(cfg, mine, reader, root, device, SINGLE, writes=True, launch=ranks)
        else:
            _train_variants(cfg, variants, reader, root, device, ranks, writes=ranks.main, launch=ranks)
        if cfg.train.sweep:
            ranks.barrier()  # every rank's variants are finished
            if ranks.main:
                compare_runs([root / name for name, _ in everything], root / SWEEP_PLOTS_FOLDER, title=root.resolve().name)
                _say(f"sweep comparison: {root / SWEEP_PLOTS_FOLDER}/ (fvu_vs_l0.png, training_curves.png)")
    finally:
        leave_ranks()
    return [root / name for name, _ in everything]


def _train_variants(cfg: ExperimentConfig, variants: list[tuple[str, ExperimentConfig]], reader: StoreReader, root: Path,
                    device: torch.device, ranks: Ranks, writes: bool, launch: Ranks) -> None:
    """One pass of the loader trains `variants`; with several `ranks`, data-parallel: each rank
    reads its own chunks and a 1/world share of every batch, gradients are averaged (DDP).
    launch: every rank torchrun started (recorded in run.json)."""
    if writes:
        _say(f"SAEs on {device} (sae.device: {cfg.sae.device}); store {reader.path}"
             + (f"; data-parallel over {ranks.world} ranks" if ranks.distributed else ""))
    hooks = _hooks_needed(variants)
    for _, variant_cfg in variants:
        check_against_store(variant_cfg.sae, {hook: reader.d(hook) for hook in reader.hooks})
    batch_size = cfg.loader.batch_size
    if batch_size % ranks.world:
        raise ConfigError(f"loader.batch_size={batch_size} must be a multiple of the {ranks.world} ranks "
                          "(each rank takes an equal share of every batch)")
    total_steps = max(cfg.train.total_tokens // batch_size, 1)
    trainers = [build_trainer(name, variant_cfg, reader, root / name, total_steps, ranks, writes)
                for name, variant_cfg in variants]
    cursor, start_step = _resume(trainers, ranks)
    if start_step and writes:
        _say(f"resuming from the checkpoints of step {start_step} of {total_steps}")
    records = [start_record(trainer.out_dir, trainer.cfg, reader, start_step) for trainer in trainers] if writes else []
    for trainer in trainers:
        trainer.open_tracker()

    if device.type == "cpu":
        keep_large_blocks_in_heap()
    local_batch = batch_size // ranks.world
    # float32 batches for every SAE of a sweep: on the CPU converted in the loader's gather (its
    # builder threads), on CUDA on the device after the copy of the stored dtype.
    loader = ActivationLoader(
        reader, hooks, batch_size=local_batch, split="train", seed=cfg.loader.seed,
        shuffle_buffer_chunks=cfg.loader.shuffle_buffer_chunks, slice_rows=cfg.loader.slice_rows,
        prefetch_batches=cfg.loader.prefetch_batches, num_workers=cfg.loader.num_workers,
        heldout_chunks=cfg.loader.heldout_chunks, dtype=torch.float32,
        device=device, pin_memory=cfg.loader.pin_memory, max_rows=total_steps * local_batch, cursor=cursor,
        rank=ranks.rank, world_size=ranks.world,
    )
    if writes:
        _say(f"loader: {loader.describe_gather()}")  # the path a run takes is logged (store/gather.py)
        if loader.refetches_remote_chunks:
            _say(f"{reader.path} is on object storage and loader.cache_dir is not set: each of an epoch's "
                 f"{loader.plan.groups_per_epoch} shuffle groups fetches every chunk again; set loader.cache_dir "
                 "to a local folder (or loader.slice_rows to the store's chunk rows)")
    every = _checkpoint_every_steps(cfg)
    # a failure closes the bar first, so the error line is the last one printed
    with tqdm(total=total_steps, initial=start_step, unit="step", desc="train", dynamic_ncols=True,
              disable=not writes) as progress:
        for batch in loader:
            for trainer in trainers:
                trainer.train_step(batch[trainer.sae.cfg.hook_point_in], batch[trainer.sae.cfg.hook_point_out])
            step = trainers[0].step
            progress.update(1)
            record = getattr(trainers[0], "last_record", None)
            if record and record["step"] == step:  # a line was logged at this step
                progress.set_postfix(fvu=f"{record['fvu']:.3f}", l0=f"{record['l0']:.1f}",
                                     tok_s=f"{record['tokens_per_second']:.0f}")
            if every and step % every == 0 and step < total_steps:
                cursors = ranks.gather_json(loader.state_dict())  # every rank's place in its own chunks
                for trainer in trainers:
                    trainer.save(cursors)
    for trainer in trainers:
        trainer.check_ranks_agree()
    for trainer, record in zip(trainers, records):
        _finish(trainer, reader)
        launched = {"world_size": launch.world, "distribute": cfg.train.distribute if launch.distributed else None}
        if launch.distributed and not ranks.distributed:
            launched["trained_by_rank"] = launch.rank
        finish_record(trainer.out_dir, {**record, "ranks": launched})


def open_store(path: str | StoreLocation, *, verify: bool = True, cache_dir: str | None = None,
               allow_incomplete: bool = False) -> StoreReader:
    reader = StoreReader(path, verify=verify, cache_dir=cache_dir)
    note = reader.require_complete(allow_incomplete=allow_incomplete)
    if note:
        _say(note)
    reader.check_chunk_files()
    if reader.n_chunks == 0:
        raise StoreError(f"store {path} has no committed rows; run `saeflow generate` first")
    return reader


def _one_device(variants: list[tuple[str, ExperimentConfig]]) -> torch.device:
    """The device every variant trains on: one loader feeds them all, so they must share it."""
    devices = {name: resolve_device(variant.sae.device) for name, variant in variants}
    if len(set(devices.values())) > 1:
        raise ConfigError(f"sweep variants resolve to different devices {devices}; one loader feeds them all: "
                          "give every variant the same sae.device")
    return next(iter(devices.values()))


def _say(message: str) -> None:
    print(f"saeflow train: {message}", file=sys.stderr, flush=True)


def _hooks_needed(variants: list[tuple[str, ExperimentConfig]]) -> list[str]:
    hooks: list[str] = []
    for _, variant in variants:
        for hook in (variant.sae.hook_point_in, variant.sae.hook_point_out):
            if hook not in hooks:
                hooks.append(hook)
    return hooks


def build_trainer(name: str, cfg: ExperimentConfig, reader: StoreReader, out_dir: Path, total_steps: int,
                  ranks: Ranks = SINGLE, writes: bool = True) -> SAETrainer:
    """The trainer of one variant, its SAE initialized from the store (normalization factors
    from the recorded statistics, the initializer's sample from the training split). With
    several ranks, rank 0 alone initializes and the trainer broadcasts its SAE to the others."""
    sae_cfg = cfg.sae
    hook_in, hook_out = sae_cfg.hook_point_in, sae_cfg.hook_point_out
    heldout = cfg.loader.heldout_chunks
    moments_in = store_moments(reader, hook_in, heldout_chunks=heldout, track_covariance=False)
    moments_out = store_moments(reader, hook_out, heldout_chunks=heldout, track_covariance=False)
    factor_in = norm_scale_factor(moments_in.mean_norm, reader.d(hook_in))
    factor_out = norm_scale_factor(moments_out.mean_norm, reader.d(hook_out))
    # Same seed for both hooks: sample_rows picks the same rows, so a transcoder's pairs align.
    def sample(hook: str) -> torch.Tensor:
        return sample_rows(reader, hook, cfg.initializer.n_samples, seed=cfg.initializer.seed, heldout_chunks=heldout)

    def say(message: str) -> None:
        _say(f"{name}: {message}")

    if ranks.main:
        say(f"sampling {cfg.initializer.n_samples} training rows for the initialization")
        x_in = sample(hook_in)
        x_out = sample(hook_out) if sae_cfg.is_transcoder else None
        sae = initialize_sae(sae_cfg, cfg.initializer, x_in, x_out, norm_factor_in=factor_in, norm_factor_out=factor_out,
                             say=say)
    else:
        sae = SparseAutoencoder(sae_cfg)  # replaced by rank 0's initialization when the trainer joins the ranks
    if writes:
        out_dir.mkdir(parents=True, exist_ok=True)
    return SAETrainer(name, cfg, sae, out_dir, moments_out.mean, total_steps, store_identity=reader.identity(),
                      ranks=ranks, writes=writes)


def _resume(trainers: list[SAETrainer], ranks: Ranks) -> tuple[dict | None, int]:
    """The newest checkpoint step saved by every variant (all or none resume), as rank 0 sees
    it; every rank restores it (train.out_dir is shared) and takes its own loader cursor."""
    for trainer in trainers:
        if trainer.writes:
            trainer.remove_interrupted_writes()
    common = set.intersection(*(saved_steps(trainer.checkpoint_dir) for trainer in trainers)) if trainers else set()
    step = ranks.broadcast_json(max(common) if common else 0)
    if not step:
        for trainer in trainers:
            if trainer.writes:
                trainer.log_path.unlink(missing_ok=True)
        return None, 0
    cursors = [trainer.restore(checkpoint_path(trainer.checkpoint_dir, step)) for trainer in trainers]
    return cursors[0], step


def _checkpoint_every_steps(cfg: ExperimentConfig) -> int | None:
    if not cfg.train.checkpoint_every_tokens:
        return None
    return max(cfg.train.checkpoint_every_tokens // cfg.loader.batch_size, 1)


def _finish(trainer: SAETrainer, reader: StoreReader) -> Path:
    cfg, sae = trainer.cfg, trainer.sae
    loader = ActivationLoader(
        reader, [sae.cfg.hook_point_in, sae.cfg.hook_point_out], batch_size=cfg.evaluate.batch_size, split="heldout",
        heldout_chunks=cfg.loader.heldout_chunks, dtype=torch.float32, device=sae.W_dec.device,
        pin_memory=cfg.loader.pin_memory,
    )
    calibration = calibrate_after_training(sae, cfg, reader)  # before the held-out report, which measures it
    if calibration:
        _say(f"{trainer.name}: BatchTopK threshold {calibration['running_estimate']:.4g} (running estimate) -> "
             f"{calibration['calibrated']:.4g}, mean L0 {calibration['l0_on_calibration_rows']:.2f} on "
             f"{calibration['rows']} training rows")
    metrics = write_heldout_report(trainer, loader)
    if calibration:
        metrics["batchtopk_threshold"] = calibration
    save_sae(sae, trainer.out_dir)
    manifest = reader.manifest  # what SAELens users expect to know about the activations
    export_saelens(sae, trainer.out_dir / "saelens", model_name=(manifest.get("model") or {}).get("name"), provenance={
        "context_size": manifest.get("context_size"), "prepend_bos": manifest.get("prepend_bos"),
        "dataset_path": (manifest.get("dataset") or {}).get("source"),
    })
    write_text_atomically(trainer.out_dir / "train_metrics.json", json.dumps(metrics, indent=1))
    trainer.close_tracker(metrics["heldout"])
    return trainer.out_dir

