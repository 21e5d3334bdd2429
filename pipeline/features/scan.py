"""The one streaming pass of `saeflow features`: a split's rows, in store order, through the SAE.

The loader reads the split once in store order (shuffle=False), so the i-th row of the pass is
store row split_start + i: every firing is recorded with its store row, whose tokens, document
and position are then the example's context (context.py). The SAE reads raw activations (a
saved SAE has its normalization folded) and takes its sparse TopK path where it has one.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from pipeline.features.stats import LatentStats, firings
from pipeline.sae.model import SparseAutoencoder
from store.loader import ActivationLoader
from store.reader import Split, StoreReader


def split_rows(reader: StoreReader, split: Split, heldout_chunks: int) -> tuple[int, int]:
    """(first store row, rows) of a split."""
    chunks = reader.split_chunks(split, heldout_chunks)
    first, _ = reader.chunk_bounds(chunks.start)
    _, stop = reader.chunk_bounds(chunks.stop - 1)
    return first, stop - first


@torch.no_grad()
def scan(sae: SparseAutoencoder, reader: StoreReader, stats: LatentStats, *, split: Split = "heldout",
         heldout_chunks: int = 1, batch_size: int = 4096, max_rows: int | None = None, num_workers: int = 1,
         prefetch_batches: int = 4, desc: str | None = None) -> LatentStats:
    """Feed the latents of up to max_rows rows of the split to `stats`."""
    cfg = sae.cfg
    first, rows = split_rows(reader, split, heldout_chunks)
    rows = rows if max_rows is None else min(rows, max_rows)
    loader = ActivationLoader(
        reader, cfg.hook_point_in, batch_size=batch_size, split=split, shuffle=False,
        heldout_chunks=heldout_chunks, dtype=torch.float32, device=sae.W_dec.device, max_rows=rows,
        num_workers=num_workers, prefetch_batches=prefetch_batches,
    )
    was_training = sae.training
    sae.eval()
    row = first
    batches = tqdm(loader, total=-(-rows // batch_size), unit="batch", desc=desc, dynamic_ncols=True, disable=desc is None)
    for batch in batches:
        x_in = batch[cfg.hook_point_in]
        _, out = sae(sae.normalize_input(x_in))
        in_batch, latents, values = firings(out)
        stats.update(in_batch + row, latents, values, x_in.shape[0])
        row += x_in.shape[0]
    sae.train(was_training)
    return stats
