"""Random rows of a store's split, for initialization statistics (geometric median, PCA, norms)."""

from __future__ import annotations

import numpy as np
import torch

from store.reader import Split, StoreReader

DEFAULT_SAMPLE_ROWS = 100_000


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
    ranges = reader.split_ranges(split, heldout_chunks)
    bounds = [(r.start, r.stop) for r in ranges]
    total = sum(stop - start for start, stop in bounds)

    def rows_of(index: int) -> np.ndarray:  # the split's rows of its index-th chunk
        r = ranges[index]
        first, _ = reader.chunk_bounds(r.chunk)
        return np.asarray(reader.read_chunk(hook, r.chunk)[r.start - first : r.stop - first])

    if n >= total:
        return torch.cat([reader.read_tensor(hook, rows_of(i), dtype) for i in range(len(ranges))])
    rng = np.random.default_rng([seed, 2])
    wanted_chunks = min(len(ranges), -(-n // reader.chunk_rows) * chunk_oversample)
    chosen = sorted(rng.choice(len(ranges), size=wanted_chunks, replace=False).tolist())
    sizes = np.array([bounds[i][1] - bounds[i][0] for i in chosen])
    if sizes.sum() < n:  # short chunks: top up with further random chunks
        rest = [i for i in rng.permutation(len(ranges)).tolist() if i not in set(chosen)]
        while sizes.sum() < n:
            chosen.append(rest.pop())
            sizes = np.append(sizes, bounds[chosen[-1]][1] - bounds[chosen[-1]][0])
    take = _shares(n, sizes)
    parts = []
    for index, size, count in zip(chosen, sizes, take):
        pick = np.sort(rng.choice(int(size), size=int(count), replace=False))
        parts.append(reader.read_tensor(hook, rows_of(index)[pick], dtype))
    return torch.cat(parts)


def _shares(n: int, sizes: np.ndarray) -> np.ndarray:
    """Split n rows over chunks in proportion to their sizes, never above a chunk's size."""
    take = np.floor(n * sizes / sizes.sum()).astype(np.int64)
    for i in np.argsort(-(sizes - take)):  # hand out the remainder where room is left
        if take.sum() == n:
            break
        take[i] += min(n - take.sum(), sizes[i] - take[i])
    return take
