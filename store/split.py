"""The train/held-out split of a store: the one definition every stage reads.

- Held-out chunks are spread over the store: the chunks are cut into `heldout_chunks` equal
  strata (consecutive runs) and one chunk of each stratum, at a position drawn from a generator
  seeded by (n_chunks, heldout_chunks), is held out. A store therefore always holds out the same
  chunks, a cross-section of the corpus rather than its last documents.
- Training rows are every row of every other chunk.
- Held-out rows are the rows of the held-out chunks minus the rows of any document that also
  has rows in a training chunk (documents are consecutive rows, so such a document can only sit
  at the edge of a run of held-out chunks): no document is in both splits. Those edge rows are in
  neither split.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from store.format import StoreError

_HELDOUT_STREAM = 7  # the first word of the held-out choice's seed, apart from the loader's streams
SHUFFLED_KEY = "shuffled"  # the manifest entry of a shuffled copy (store/shuffled_copy.py)


def heldout_chunk_indices(n_chunks: int, heldout_chunks: int) -> list[int]:
    """The held-out chunks of a store of n_chunks chunks, in store order (one per stratum)."""
    if heldout_chunks == 0:
        return []
    rng = np.random.default_rng([_HELDOUT_STREAM, n_chunks, heldout_chunks])
    strata = np.array_split(np.arange(n_chunks), heldout_chunks)
    return [int(stratum[rng.integers(len(stratum))]) for stratum in strata]


@dataclass(frozen=True)
class RowRange:
    """Store rows [start, stop) of chunk `chunk`."""

    chunk: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


def check_heldout_chunks(n_chunks: int, heldout_chunks: int, where: str) -> None:
    if not 0 <= heldout_chunks < n_chunks:
        raise StoreError(
            f"loader.heldout_chunks={heldout_chunks} must leave training chunks in store {where} of "
            f"{n_chunks} chunks; lower loader.heldout_chunks or generate more rows"
        )


def training_chunks(n_chunks: int, heldout_chunks: int) -> list[int]:
    held = set(heldout_chunk_indices(n_chunks, heldout_chunks))
    return [c for c in range(n_chunks) if c not in held]


def heldout_ranges(
    n_chunks: int, heldout_chunks: int, bounds: Callable[[int], tuple[int, int]], docs: Callable[[int, int], np.ndarray]
) -> list[RowRange]:
    """The held-out rows, per held-out chunk: bounds(chunk) -> (start, stop) store rows and
    docs(start, stop) -> the doc ids of those rows (only rows next to training chunks are read)."""
    held = heldout_chunk_indices(n_chunks, heldout_chunks)
    held_set = set(held)
    ranges = {c: list(bounds(c)) for c in held}
    for chunk in held:
        start, stop = bounds(chunk)
        if chunk - 1 not in held_set and chunk > 0:  # a run of held-out chunks begins here
            _trim_run(ranges, held_set, chunk, +1, int(docs(start - 1, start)[0]), bounds, docs)
        if chunk + 1 not in held_set and chunk + 1 < n_chunks:  # a run ends here
            _trim_run(ranges, held_set, chunk, -1, int(docs(stop, stop + 1)[0]), bounds, docs)
    return [RowRange(c, *ranges[c]) for c in held if ranges[c][1] > ranges[c][0]]


def _trim_run(ranges: dict[int, list[int]], held: set[int], chunk: int, step: int, shared: int,
              bounds: Callable[[int], tuple[int, int]], docs: Callable[[int, int], np.ndarray]) -> None:
    """Drop the rows of document `shared` (which training rows also hold) from the run of held-out
    chunks that starts (step +1) or ends (step -1) at `chunk`, walking inwards while they hold it."""
    while chunk in held:
        start, stop = ranges[chunk]
        ids = docs(start, stop) if stop > start else np.empty(0, dtype=np.int64)
        if step > 0:
            keep = int(np.argmax(ids != shared)) if (ids != shared).any() else len(ids)
            ranges[chunk][0] = start + keep
        else:
            keep = int(np.argmax(ids[::-1] != shared)) if (ids != shared).any() else len(ids)
            ranges[chunk][1] = stop - keep
        if keep < len(ids):
            return  # the document ended inside this chunk
        chunk += step


class RowMap:
    """Row i of a one-pass, in-order read of `ranges` -> its store row."""

    def __init__(self, ranges: list[RowRange]):
        self.starts = np.array([r.start for r in ranges], dtype=np.int64)
        self.ends = np.cumsum([r.rows for r in ranges], dtype=np.int64)

    @property
    def rows(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def store_rows(self, index: np.ndarray) -> np.ndarray:
        index = np.asarray(index, dtype=np.int64)
        which = np.searchsorted(self.ends, index, side="right")
        before = np.concatenate([[0], self.ends])[which]
        return self.starts[which] + index - before


def recorded_heldout_ranges(manifest: dict[str, Any], heldout_chunks: int, where: str) -> list[RowRange] | None:
    """A shuffled copy's held-out ranges (None for a store in document order); a StoreError when
    asked for a split other than the one it was shuffled with (its training chunks hold the rows
    of every other chunk)."""
    shuffled = manifest.get(SHUFFLED_KEY)
    if not shuffled:
        return None
    if heldout_chunks != shuffled["heldout_chunks"]:
        raise StoreError(
            f"store {where} was shuffled with loader.heldout_chunks={shuffled['heldout_chunks']}, not {heldout_chunks}: "
            f"set loader.heldout_chunks={shuffled['heldout_chunks']}, or shuffle {shuffled['source']} again with {heldout_chunks}"
        )
    return [RowRange(*map(int, triple)) for triple in shuffled["heldout_ranges"]]
