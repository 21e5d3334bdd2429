"""Moments (mean, mean norm, covariance) of a store's training split (StoreReader.split_chunks).

Generation records float64 moments of the stored rows under stats/<hook> (store/recorded_stats.py),
covering the first stats["chunks"] chunks in store order. `store_moments` turns that snapshot
into the training split's moments by removing the held-out chunks it covers and adding the
training chunks it does not cover yet, instead of a pass over the whole store.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from store.format import StoreError
from store.moments import RunningMoments
from store.reader import StoreReader
from store.recorded_stats import load_stats


def compute_moments(
    reader: StoreReader, hook: str, chunks: Iterable[int], *, track_covariance: bool = True
) -> RunningMoments:
    """One float64 pass over `chunks`, chunk by chunk (the order generation accumulates in)."""
    moments = RunningMoments(reader.d(hook), track_covariance=track_covariance)
    for chunk in chunks:
        moments.update(reader.read_tensor(hook, reader.read_chunk(hook, chunk), torch.float64))
    return moments


def store_moments(
    reader: StoreReader,
    hook: str,
    *,
    heldout_chunks: int = 1,
    use_recorded: bool = True,
    track_covariance: bool = True,
) -> RunningMoments:
    """Moments of the training split of `hook`.

    With `use_recorded` and a verified stats/<hook> snapshot in the store, the snapshot is
    corrected to exactly the training chunks (subtracting chunks it covers beyond them, adding
    training chunks it does not cover yet), which reads only those chunks. Otherwise, or when the
    snapshot is missing, torn, or not chunk-aligned, the training chunks are read in one pass.
    """
    train = reader.split_chunks("train", heldout_chunks)
    recorded = _recorded_moments(reader, hook) if use_recorded else None
    if recorded is None:
        return compute_moments(reader, hook, train, track_covariance=track_covariance)
    moments, covered = recorded
    if not track_covariance:
        moments.track_covariance, moments.M2 = False, None
    held = set(range(reader.n_chunks)) - set(train)
    extra = [c for c in sorted(held) if c < covered]
    if extra:
        moments = moments.subtract(compute_moments(reader, hook, extra, track_covariance=track_covariance))
    missing = [c for c in train if c >= covered]
    return moments.merge(compute_moments(reader, hook, missing, track_covariance=track_covariance))


def _recorded_moments(reader: StoreReader, hook: str) -> tuple[RunningMoments, int] | None:
    """(the saved snapshot, the number of leading chunks it covers), or None when unusable."""
    record = reader.manifest.get("stats")
    if not record:
        return None
    try:
        moments = load_stats(reader.path, hook)
    except StoreError:
        return None  # torn or missing: a fresh pass is always correct
    covered = int(record.get("chunks", -1))
    if not 0 <= covered <= reader.n_chunks:
        return None
    covered_rows = reader.chunk_bounds(covered - 1)[1] if covered else 0
    if moments.count != covered_rows:
        return None  # the snapshot does not end at a chunk boundary: cannot be corrected by chunks
    return moments, covered
