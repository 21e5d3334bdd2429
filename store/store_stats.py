"""Statistics over a store's training split: moments (mean, norm, covariance), PCA, geometric median.

The training split is chunks 0 .. n_chunks - heldout_chunks - 1, the same split the loader
trains on, so statistics used for initialization or normalization never see held-out rows.

Generation records float64 moments of the stored rows under stats/<hook> (store/saved_stats.py),
covering the first stats["chunks"] chunks in store order. `store_moments` turns that snapshot
into the training split's moments by removing (or adding) only the chunks where the two differ,
typically the one held-out chunk, instead of a pass over the whole store.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import numpy as np
import torch

from store.format import StoreError
from store.reader import StoreReader, to_torch
from store.saved_stats import load_stats
from store.stats import RunningMoments, geometric_median, norm_scale_factor, principal_components

Split = Literal["train", "heldout"]
DEFAULT_SAMPLE_ROWS = 100_000


def split_chunks(reader: StoreReader, split: Split = "train", heldout_chunks: int = 1) -> range:
    """The chunk indices of a split (the held-out split is the store's last chunks)."""
    if not 0 <= heldout_chunks < reader.n_chunks:
        raise StoreError(
            f"heldout_chunks={heldout_chunks} must leave training chunks in a store of {reader.n_chunks} chunks"
        )
    n_train = reader.n_chunks - heldout_chunks
    return range(0, n_train) if split == "train" else range(n_train, reader.n_chunks)


def rows_as_tensor(reader: StoreReader, hook: str, rows: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return to_torch(rows, reader.store_dtype(hook)).to(dtype)


def compute_moments(
    reader: StoreReader, hook: str, chunks: Iterable[int], *, track_covariance: bool = True
) -> RunningMoments:
    """One float64 pass over `chunks`, chunk by chunk (the order generation accumulates in)."""
    moments = RunningMoments(reader.d(hook), track_covariance=track_covariance)
    for chunk in chunks:
        moments.update(rows_as_tensor(reader, hook, reader.read_chunk(hook, chunk), torch.float64))
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
    train = split_chunks(reader, "train", heldout_chunks)
    recorded = _recorded_moments(reader, hook) if use_recorded else None
    if recorded is None:
        return compute_moments(reader, hook, train, track_covariance=track_covariance)
    moments, covered = recorded
    if not track_covariance:
        moments.track_covariance, moments.M2 = False, None
    n_train = len(train)
    if covered > n_train:
        extra = compute_moments(reader, hook, range(n_train, covered), track_covariance=track_covariance)
        return moments.subtract(extra)
    missing = compute_moments(reader, hook, range(covered, n_train), track_covariance=track_covariance)
    return moments.merge(missing)


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


def store_norm_scale(reader: StoreReader, hook: str, *, heldout_chunks: int = 1) -> float:
    """sqrt(d) / mean L2 norm of the training rows: scales activations to a mean norm of sqrt(d)."""
    moments = store_moments(reader, hook, heldout_chunks=heldout_chunks, track_covariance=False)
    return norm_scale_factor(moments.mean_norm, reader.d(hook))


def store_principal_components(
    reader: StoreReader, hook: str, k: int | None = None, *, heldout_chunks: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k principal directions (k, d) of the training rows and their explained variance ratios."""
    moments = store_moments(reader, hook, heldout_chunks=heldout_chunks)
    return principal_components(moments.covariance(), k)


def sample_rows(
    reader: StoreReader,
    hook: str,
    n: int = DEFAULT_SAMPLE_ROWS,
    seed: int = 0,
    split: Split = "train",
    *,
    heldout_chunks: int = 1,
    chunk_oversample: int = 4,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """About-uniform random rows of a split: (min(n, split rows), d).

    Reads `chunk_oversample` times as many random whole chunks as n rows would fill and takes an
    equal random share of rows from each, so the sample spans many documents (rows within a chunk
    are consecutive tokens, hence correlated) while reading whole chunks sequentially. A split no
    larger than n is returned whole, in store order.
    """
    chunks = list(split_chunks(reader, split, heldout_chunks))
    bounds = [reader.chunk_bounds(c) for c in chunks]
    total = sum(stop - start for start, stop in bounds)
    if n >= total:
        return torch.cat([rows_as_tensor(reader, hook, reader.read_chunk(hook, c), dtype) for c in chunks])
    rng = np.random.default_rng([seed, 2])
    wanted_chunks = min(len(chunks), -(-n // reader.chunk_rows) * chunk_oversample)
    chosen = sorted(rng.choice(len(chunks), size=wanted_chunks, replace=False).tolist())
    sizes = np.array([bounds[i][1] - bounds[i][0] for i in chosen])
    if sizes.sum() < n:  # short chunks: top up with further random chunks
        rest = [i for i in rng.permutation(len(chunks)).tolist() if i not in set(chosen)]
        while sizes.sum() < n:
            chosen.append(rest.pop())
            sizes = np.append(sizes, bounds[chosen[-1]][1] - bounds[chosen[-1]][0])
    take = _shares(n, sizes)
    parts = []
    for index, size, count in zip(chosen, sizes, take):
        rows = reader.read_chunk(hook, chunks[index])
        pick = np.sort(rng.choice(int(size), size=int(count), replace=False))
        parts.append(rows_as_tensor(reader, hook, np.asarray(rows[pick]), dtype))
    return torch.cat(parts)


def _shares(n: int, sizes: np.ndarray) -> np.ndarray:
    """Split n rows over chunks in proportion to their sizes, never above a chunk's size."""
    take = np.floor(n * sizes / sizes.sum()).astype(np.int64)
    for i in np.argsort(-(sizes - take)):  # hand out the remainder where room is left
        if take.sum() == n:
            break
        take[i] += min(n - take.sum(), sizes[i] - take[i])
    return take


def store_geometric_median(
    reader: StoreReader,
    hook: str,
    *,
    n: int = DEFAULT_SAMPLE_ROWS,
    seed: int = 0,
    heldout_chunks: int = 1,
    tol: float = 1e-6,
    max_iter: int = 200,
) -> torch.Tensor:
    """Geometric median (float64, (d,)) of a random sample of n training rows, by Weiszfeld."""
    sample = sample_rows(reader, hook, n, seed, "train", heldout_chunks=heldout_chunks, dtype=torch.float64)
    return geometric_median(sample, tol=tol, max_iter=max_iter)
