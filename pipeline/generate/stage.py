"""Stage 1: run the LM over the dataset and write hook-point activations into the store.

Documents are tokenized and cut into windows (windows.py), batched, run through the LM
once for all hook points (names_filter + stop_at_layer at the deepest hook), and the kept rows
(special tokens dropped by role per generate.drop_special_tokens) go to a StoreWriter, which
commits fixed-size chunks on a background thread.

Rows: generate.target_tokens is the number of rows stored (kept tokens, not tokens forwarded);
the last chunk may be short. If the data runs out first, the rows so far are committed, the last
chunk short, and the store marked complete all the same (the manifest tells how many rows).

Resume: each commit records the cursor of the batch holding the next row (document index and
offset into that document's token stream, batch number) and how many of that batch's rows are
already stored. A rerun regenerates that batch (same windows, same batch, so the same bits) and
skips those rows; the finished store equals an uninterrupted run's, byte for byte. A complete store
with the same config is left alone; another config is refused unless overwrite=True (provenance.py).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.config import ConfigError, ExperimentConfig
from pipeline.generate.lm import LanguageModel, load_language_model
from pipeline.heap import keep_large_blocks_in_heap
from pipeline.generate.provenance import complete_store, create_writer, existing_store, save_store_tokenizer
from pipeline.generate.text import DatasetError, iter_documents
from pipeline.generate.windows import Batch, WindowCursor, WindowSpec, encoded_documents, iter_batches, iter_windows
from store.lease import writer_lock
from store.location import StoreLocation
from store.writer import StoreWriter

# Test hook: seconds to sleep after each batch, so a test can SIGKILL a run between commits.
BATCH_DELAY_ENV = "SAEFLOW_GENERATE_BATCH_DELAY"


@dataclass
class GenerateResult:
    path: Path | str  # the store: a local directory, or the URL of a remote one
    n_rows: int  # rows in the store
    rows_written: int  # rows this call added
    tokens_forwarded: int  # positions run through the LM by this call (incl. dropped and padding)
    seconds: float  # time in the batch loop, including the final flush to disk
    forward_seconds: float  # of which in the LM forward pass
    resumed: bool
    already_complete: bool


def generate(cfg: ExperimentConfig, *, overwrite: bool = False, lm: LanguageModel | None = None) -> GenerateResult:
    """Create, resume or confirm the store of `cfg`; `lm` reuses a loaded model (benchmarks, tests)."""
    g = cfg.generate
    path = g.location()
    manifest = complete_store(path, cfg)  # needs no lock, so a read-only complete store is fine
    if manifest is not None:
        return _nothing_to_do(path, manifest)
    with writer_lock(path) as lock:  # before anything is read: a second writer fails fast
        manifest = existing_store(path, cfg, overwrite, say=say)
        if manifest is not None and manifest["complete"]:  # completed by a writer that just finished
            return _nothing_to_do(path, manifest)
        lm = ready_model(cfg, lm)
        hook_dims, spec = check_model(lm, cfg)
        torch.manual_seed(g.seed)
        if manifest is None:
            start, first_batch, skip = WindowCursor(), 0, 0
        else:
            start, first_batch, skip, _ = resume_point(manifest)
            say(f"resuming {path} at chunk {manifest['n_chunks']} (row {manifest['n_rows']}, document {start.doc})")
        batches = window_batches(cfg, lm, spec, start, first_batch)
        first = next(batches, None)  # an empty dataset fails here, before a store exists
        if first is None:
            raise DatasetError(f"dataset {cfg.dataset.source} yields no tokens to generate from; check dataset.source")
        if manifest is None:
            writer = create_writer(path, cfg, lm, hook_dims, spec, lock)
        else:
            writer = StoreWriter.open(path, queue_chunks=g.queue_chunks, lock=lock, stats_device=lm.device)
        with writer:
            save_store_tokenizer(path, lm)
            return write_batches(cfg, writer, _chain(first, batches), skip, manifest is not None, LMRows(lm, list(g.hook_points)))


def ready_model(cfg: ExperimentConfig, lm: LanguageModel | None) -> LanguageModel:
    """`lm`, or the model of cfg loaded; on the CPU the process keeps the forward's large blocks
    in its heap (pipeline/heap.py: ~20x fewer page faults per batch)."""
    lm = lm or load_language_model(cfg.model)
    if lm.device.type == "cpu":
        keep_large_blocks_in_heap()
    return lm


def _nothing_to_do(path: StoreLocation, manifest: dict) -> GenerateResult:
    say(f"store {path} is complete ({manifest['n_rows']} rows, same config); nothing to do")
    return GenerateResult(path.local or str(path), manifest["n_rows"], 0, 0, 0.0, 0.0, resumed=False, already_complete=True)


class LMRows:
    """A batch's kept rows from the LM's forward pass (its time and tokens counted for GenerateResult)."""

    def __init__(self, lm: LanguageModel, hooks: list[str]):
        self.lm, self.hooks = lm, hooks
        self.seconds, self.tokens = 0.0, 0

    def __call__(self, batch: Batch, keep: np.ndarray) -> dict[str, torch.Tensor]:
        mask = None if batch.attention_mask is None else torch.from_numpy(batch.attention_mask)
        began = time.perf_counter()
        acts = self.lm.run_hooks(torch.from_numpy(batch.tokens), self.hooks, attention_mask=mask)
        self.seconds += time.perf_counter() - began
        self.tokens += batch.tokens.size
        index = torch.from_numpy(keep).to(self.lm.device)
        return {hook: act.reshape(-1, act.shape[-1]).index_select(0, index) for hook, act in acts.items()}


def write_batches(cfg: ExperimentConfig, writer: StoreWriter, batches: Iterator[Batch], skip: int, resumed: bool, rows_of,
           *, owns=None, rows: int | None = None, tag_rows: bool = False, show: bool = True) -> GenerateResult:
    """The batch loop: keep rows, take their activations from `rows_of(batch, keep)` (LMRows, or
    a rank's part: pipeline/generate/ranks.py), hand them to the writer; complete the store at the end.

    owns(batch index): whether this store takes the batch (None: every batch); the others count
    towards the target only. rows: rows of all batches before the first one (default: the
    writer's); tag_rows: cursors also record them, so a rank's part knows them when it resumes."""
    g = cfg.generate
    delay = float(os.environ.get(BATCH_DELAY_ENV, "0") or 0)
    rows_before = rows = writer.rows_accepted if rows is None else rows
    began = time.perf_counter()
    bar = tqdm(total=g.target_tokens, initial=rows, unit="tok", unit_scale=True, desc="generate", dynamic_ncols=True,
               disable=not show)
    try:
        for batch in batches:
            if rows >= g.target_tokens:
                break
            keep = batch.kept(g.drop_special_tokens)[skip:][: g.target_tokens - rows]
            stored_of_batch, skip = skip, 0  # rows of this batch an interrupted run already stored
            if not len(keep):
                continue  # every row of this batch is already stored (resume at a batch's end)
            if owns is None or owns(batch.index):
                cursor = batch.cursor()
                if tag_rows:
                    cursor["rows_before"] = rows - stored_of_batch
                label = f"batch {batch.index} (documents {int(batch.doc.min())}-{int(batch.doc.max())})"
                writer.put(
                    rows_of(batch, keep),
                    batch.tokens.reshape(-1)[keep],
                    batch.doc.reshape(-1)[keep],
                    batch.pos.reshape(-1)[keep],
                    cursor=cursor,
                    label=label,
                    rows_before=stored_of_batch,
                )
                if delay:
                    time.sleep(delay)
            rows += len(keep)
            bar.update(len(keep))
        writer.close(complete=True)
    finally:
        bar.close()
    seconds = time.perf_counter() - began
    ended = "target reached" if rows >= g.target_tokens else "data exhausted"
    stored = writer.manifest
    if show:
        say(f"store {writer.path}: {stored.n_rows} rows in {stored.n_chunks} chunks ({ended})")
    return GenerateResult(writer.path.local or str(writer.path), stored.n_rows, rows - rows_before,
                          getattr(rows_of, "tokens", 0), seconds, getattr(rows_of, "seconds", 0.0), resumed, False)


def window_batches(cfg: ExperimentConfig, lm: LanguageModel, spec: WindowSpec, start: WindowCursor = WindowCursor(), first_batch: int = 0) -> Iterator[Batch]:
    """The batches of windows generate runs through the LM, from a cursor on."""
    documents = encoded_documents(iter_documents(cfg.dataset, start=start.doc), lm.encode, first=start.doc)
    return iter_batches(iter_windows(documents, spec, start), cfg.generate.batch_size, first_batch)


def _chain(first, rest):
    yield first
    yield from rest


# --- checks and provenance ----------------------------------------------------------------
def check_model(lm: LanguageModel, cfg: ExperimentConfig) -> tuple[dict[str, int], WindowSpec]:
    """(width per hook, window spec), or the one-line error that stops generate before any work."""
    g = cfg.generate
    hook_dims = lm.hook_dims(list(g.hook_points))  # ModelLoadError naming the valid hooks
    if g.context_size > lm.n_ctx:
        raise ConfigError(
            f"generate.context_size {g.context_size} exceeds {lm.name}'s context of {lm.n_ctx} tokens; "
            f"set generate.context_size <= {lm.n_ctx}"
        )
    if g.context_size < 2:
        raise ConfigError(f"generate.context_size {g.context_size} is too small; use at least 2")
    if g.prepend_bos and lm.bos_id is None:
        raise ConfigError(f"{lm.name}'s tokenizer has no BOS token; set generate.prepend_bos: false")
    if g.target_tokens <= 0 or g.batch_size <= 0 or g.queue_chunks <= 0:
        raise ConfigError("generate.target_tokens, batch_size and queue_chunks must be positive")
    if g.chunk_rows is not None and g.chunk_rows <= 0:
        raise ConfigError(f"generate.chunk_rows {g.chunk_rows} must be positive (or null for ~16 MiB chunks)")
    return hook_dims, window_spec(cfg, lm)


def window_spec(cfg: ExperimentConfig, lm: LanguageModel) -> WindowSpec:
    """How generate cuts windows for this model (pad falls back to EOS, then 0: pads are masked)."""
    g = cfg.generate
    pad_id = next((i for i in (lm.pad_id, lm.eos_id) if i is not None), 0)
    return WindowSpec(g.context_size, g.prepend_bos, g.pack, lm.bos_id, lm.eos_id, pad_id)


def resume_point(manifest: dict) -> tuple[WindowCursor, int, int, int]:
    """(window cursor, batch number, rows of that batch already stored, rows of every batch
    before it) after the last commit; the last: the store's rows, unless the cursor says (a part)."""
    cursor = manifest.get("cursor")
    if not cursor:
        return WindowCursor(), 0, 0, 0
    batch, skip = cursor["batch"], int(cursor["rows_into_batch"])
    before = int(batch.get("rows_before", int(manifest["n_rows"]) - skip))
    return WindowCursor(int(batch["doc"]), int(batch["offset"])), int(batch["batch"]), skip, before


def say(message: str) -> None:
    print(f"saeflow generate: {message}", file=sys.stderr, flush=True)
