"""The one streaming pass of `saeflow features`: a split's rows, in store order, through the SAE.

The loader reads the split once in store order (shuffle=False); the split's row ranges
(store/split.py: held-out chunks are spread over the store) map the i-th row of the pass to its
store row, so every firing is recorded with its store row, whose tokens, document
and position are then the example's context (context.py). The SAE reads raw activations (a
saved SAE has its normalization folded) and takes its sparse TopK path where it has one.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from pipeline.features.stats import LatentStats, firings
from pipeline.sae.model import SparseAutoencoder
from store.loader import ActivationLoader
from store.reader import Split, StoreReader
from store.split import RowMap


def split_rows(reader: StoreReader, split: Split, heldout_chunks: int) -> tuple[int, int]:
    """(first store row, rows) of a split."""
    ranges = reader.split_ranges(split, heldout_chunks)
    return ranges[0].start, RowMap(ranges).rows


@torch.no_grad()
def scan(sae: SparseAutoencoder, reader: StoreReader, stats: LatentStats, *, split: Split = "heldout",
         heldout_chunks: int = 1, batch_size: int = 4096, max_rows: int | None = None, num_workers: int = 1,
         prefetch_batches: int = 4, desc: str | None = None) -> LatentStats:
    """Feed the latents of up to max_rows rows of the split to `stats`."""
    cfg = sae.cfg
    _, rows = split_rows(reader, split, heldout_chunks)
    rows = rows if max_rows is None else min(rows, max_rows)
    loader = ActivationLoader(
        reader, cfg.hook_point_in, batch_size=batch_size, split=split, shuffle=False,
        heldout_chunks=heldout_chunks, dtype=torch.float32, device=sae.W_dec.device, max_rows=rows,
        num_workers=num_workers, prefetch_batches=prefetch_batches,
    )
    was_training = sae.training
    sae.eval()
    row_map, row = RowMap(loader.ranges), 0
    batches = tqdm(loader, total=-(-rows // batch_size), unit="batch", desc=desc, dynamic_ncols=True, disable=desc is None)
    for batch in batches:
        x_in = batch[cfg.hook_point_in]
        _, out = sae(sae.normalize_input(x_in))
        in_batch, latents, values = firings(out)
        store_rows = torch.from_numpy(row_map.store_rows(np.arange(row, row + x_in.shape[0]))).to(in_batch.device)
        stats.update(store_rows[in_batch], latents, values, x_in.shape[0])
        row += x_in.shape[0]
    sae.train(was_training)
    return stats
