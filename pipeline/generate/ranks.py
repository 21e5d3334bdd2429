"""Stage 1 on several ranks (torchrun): one store, written as if by one process.

Every rank cuts the same batches of windows (tokenizing is cheap next to the forward pass); rank
r runs the LM only on batches b with b % world == r, into its own part store beside the store,
`<store>.rank-<r>-of-<world>` (a store like any other: committed chunks, checksums, its own writer
lock, resumable). A part's cursors also record the rows of every batch before theirs, so each rank
stops exactly where one process would (at generate.target_tokens rows) and resumes on its own.
Once every part is complete, rank 0 merges them into the store in batch order: the store holds
one process's rows in one process's order, checksums and statistics included (the manifest adds
"merged_from_ranks"), so training reads it as it reads any store. Then the parts are removed.

A kill of any rank at any point is recovered by rerunning the same command: complete parts are
kept, an incomplete one resumes, and a merge that did not finish is redone from the parts (they
are removed only after the store is complete). Rank 0 holds the store's writer lock throughout,
so an unrelated writer of the store is refused.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.config import ConfigError, ExperimentConfig, resolve_device
from pipeline.distributed import Ranks, join_ranks, leave_ranks
from pipeline.generate.lm import LanguageModel
from pipeline.generate.provenance import create_writer, existing_store, save_store_tokenizer
from pipeline.generate.stage import (GenerateResult, LMRows, say, check_model, ready_model, resume_point,
                                     window_batches, write_batches)
from pipeline.generate.windows import Batch, WindowCursor
from store.dtypes import TORCH_DTYPES
from store.format import StoreError
from store.lease import writer_lock
from store.location import StoreLocation
from store.reader import StoreReader
from store.validate import validate_store
from store.writer import StoreWriter

MERGED_KEY = "merged_from_ranks"


def part_location(store: StoreLocation, rank: int, world: int) -> StoreLocation:
    return store.sibling(f".rank-{rank}-of-{world}")


def generate_on_ranks(cfg: ExperimentConfig, *, overwrite: bool = False, lm: LanguageModel | None = None) -> GenerateResult:
    """generate() for a torchrun launch: each rank writes its part, rank 0 merges them."""
    ranks = join_ranks(resolve_device(cfg.model.device).type)
    path = cfg.generate.location()
    lock = writer_lock(path) if ranks.main else None
    try:
        problem, state = None, None
        if ranks.main:
            try:
                lock.acquire()
                state = _store_state(path, cfg, overwrite)
            except (ConfigError, StoreError) as error:
                problem = str(error)
        problem, state = ranks.broadcast_json([problem, state])
        if problem:  # every rank stops with rank 0's one line
            raise StoreError(problem)
        if state == "complete":
            manifest = StoreReader(path).manifest
            say(f"store {path} is complete ({manifest.n_rows} rows, same config); nothing to do")
            return GenerateResult(path.local or str(path), manifest.n_rows, 0, 0, 0.0, 0.0, False, True)
        lm = ready_model(cfg, lm)
        hook_dims, spec = check_model(lm, cfg)
        torch.manual_seed(cfg.generate.seed)
        part = _write_part(cfg, lm, part_location(path, ranks.rank, ranks.world), ranks, hook_dims, spec)
        ranks.barrier()
        result = _merge(cfg, lm, path, ranks, lock, hook_dims, spec) if ranks.main else part
        ranks.barrier()
        return result
    finally:
        if lock is not None:
            lock.release()
        leave_ranks()


def _store_state(path: StoreLocation, cfg: ExperimentConfig, overwrite: bool) -> str:
    """"complete", or "parts" (write or finish the parts, then merge); removes an unfinished merge."""
    manifest = existing_store(path, cfg, overwrite, say=say)
    if manifest is None:
        return "parts"
    if manifest["complete"]:
        return "complete"
    if MERGED_KEY not in manifest:
        raise ConfigError(f"store {path} was started by a single process; finish it with `saeflow generate` "
                          "(without torchrun), or remove it")
    path.remove()  # a merge a kill interrupted: redone from the parts
    return "parts"


def _write_part(cfg: ExperimentConfig, lm: LanguageModel, part: StoreLocation, ranks: Ranks, hook_dims, spec) -> GenerateResult:
    """This rank's batches into its part store (created, resumed, or found complete)."""
    g = cfg.generate
    with writer_lock(part) as lock:
        manifest = existing_store(part, cfg, overwrite=True, say=say)  # a part of another config is replaced
        if manifest is not None and manifest["complete"]:
            return GenerateResult(part.local or str(part), manifest["n_rows"], 0, 0, 0.0, 0.0, False, True)
        start, first_batch, skip, rows = resume_point(manifest) if manifest else (WindowCursor(), 0, 0, 0)
        if manifest is None:
            writer = create_writer(part, cfg, lm, hook_dims, spec, lock, extra={"part_of": {"rank": ranks.rank, "world": ranks.world}})
        else:
            writer = StoreWriter.open(part, queue_chunks=g.queue_chunks, lock=lock, stats_device=lm.device)
        with writer:
            return write_batches(cfg, writer, window_batches(cfg, lm, spec, start, first_batch), skip, manifest is not None,
                                 LMRows(lm, list(g.hook_points)), owns=lambda b: b % ranks.world == ranks.rank, rows=rows,
                                 tag_rows=True, show=ranks.main)


class PartRows:
    """A batch's rows from the part of the rank that ran it, checked against the batch's tokens."""

    def __init__(self, parts: list[StoreReader], hooks: list[str]):
        self.parts, self.hooks = parts, hooks
        self.offsets = [0] * len(parts)

    def __call__(self, batch: Batch, keep: np.ndarray) -> dict[str, torch.Tensor]:
        rank = batch.index % len(self.parts)
        part, start = self.parts[rank], self.offsets[rank]
        stop = start + len(keep)
        if stop > part.n_rows or not np.array_equal(part.read_rows("tokens", start, stop), batch.tokens.reshape(-1)[keep]):
            raise StoreError(f"part {part.path} does not hold the rows of batch {batch.index}; remove the parts "
                             f"({part.path.name.rsplit('.rank-', 1)[0]}.rank-*) and rerun")
        self.offsets[rank] = stop
        return {hook: part.read_tensor(hook, part.read_rows(hook, start, stop), TORCH_DTYPES[part.store_dtype(hook)])
                for hook in self.hooks}


def _merge(cfg: ExperimentConfig, lm: LanguageModel, path: StoreLocation, ranks: Ranks, lock, hook_dims, spec) -> GenerateResult:
    """Rank 0: the complete parts, batch by batch in order, into the store; then the parts go."""
    locations = [part_location(path, rank, ranks.world) for rank in range(ranks.world)]
    for location in locations:  # the merged store gets checksums of its own: the parts' must hold first
        problems = validate_store(location)
        if problems:
            raise StoreError(f"part {location} is damaged ({problems[0]}); remove it and rerun to regenerate it")
    parts = [StoreReader(location) for location in locations]
    say(f"merging {ranks.world} parts ({sum(part.n_rows for part in parts)} rows) into {path}")
    writer = create_writer(path, cfg, lm, hook_dims, spec, lock, extra={MERGED_KEY: ranks.world})
    with writer:
        save_store_tokenizer(path, lm)
        result = write_batches(cfg, writer, window_batches(cfg, lm, spec), 0, False, PartRows(parts, list(cfg.generate.hook_points)))
    for location in locations:
        location.remove()
    return result
