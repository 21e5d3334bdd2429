"""The deterministic reading plan of the loader: which rows, in which groups, in which order.

Everything here is a pure function of (seed, epoch, rank, group), so batch b of a run never
depends on thread timing, and a resumed run can jump to a saved position without reading the
rows before it.

Why slices: rows within a chunk are consecutive tokens of a few documents, so a buffer of whole
chunks gives batches of few documents from a few regions of the corpus, shared by many steps.
Instead every training chunk (store/split.py says which) is cut into slices of `slice_rows`
consecutive rows (default 1: single rows), and each epoch deals all slices to groups by a seeded
permutation (store/permutation.py, O(K) work and memory per group): group g takes the slices at
positions [g K, (g + 1) K) of it, K = buffer_rows / slice_rows, so every row is read exactly
once per epoch and each group is a random sample of the whole training split. A group's rows
are then permuted together (seeded by (seed, epoch, group)). With slice_rows = 1 the stream is
a uniformly random permutation of the epoch's rows, a global shuffle. Larger slices mean fewer,
longer reads but batches of fewer documents (docs/training.md has the measured trade-off);
slice_rows = chunk_rows reads whole chunks.
- Ranks: every rank computes the same groups and takes every world_size-th one starting at its
  rank, so ranks are disjoint and together cover the split; when G is not a multiple of
  world_size, the first (G % world_size) ranks hold one group more in that epoch. Batches roll
  over epoch boundaries, so every rank still yields the same number of batches for the same
  max_rows.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any

import numpy as np

from store.format import StoreError
from store.permutation import Permutation

# Distinct first words keep the random streams independent.
_SLICE_ORDER_STREAM = 0
_ROW_ORDER_STREAM = 1
PLAN_VERSION = 2  # 1: groups of whole chunks (saeflow before the sliced plan); cursors name theirs
@dataclass(frozen=True)
class Pieces:
    """Row ranges [start, stop) inside chunks (rows counted from the chunk's first row), in the
    order a group buffer holds them; pieces of one chunk are consecutive."""

    chunk: np.ndarray
    start: np.ndarray
    stop: np.ndarray

    @classmethod
    def of(cls, triples: list[tuple[int, int, int]]) -> Pieces:
        columns = np.array(triples, dtype=np.int64).reshape(-1, 3)
        return cls(columns[:, 0], columns[:, 1], columns[:, 2])

    @property
    def rows(self) -> int:
        return int((self.stop - self.start).sum())

    def by_chunk(self) -> list[tuple[int, np.ndarray]]:
        """(chunk, its rows inside the chunk, as indices in buffer order) per chunk."""
        chunks, which, rows = self.locate()
        per_chunk = np.bincount(which, minlength=len(chunks))
        return list(zip(chunks, np.split(rows, np.cumsum(per_chunk)[:-1])))  # views of one array

    def locate(self) -> tuple[list[int], np.ndarray, np.ndarray]:
        """(the chunks, in buffer order; for each buffer position, the index of its chunk in
        that list and its row inside the chunk): the group read where it lies."""
        if not len(self.chunk):
            return [], np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
        first = np.concatenate([[True], np.diff(self.chunk) != 0])  # pieces of one chunk are consecutive
        which = np.repeat(np.cumsum(first) - 1, self.stop - self.start)
        return self.chunk[first].tolist(), which, ranges_to_indices(self.start, self.stop)


def ranges_to_indices(start: np.ndarray, stop: np.ndarray) -> np.ndarray:
    """The concatenation of arange(start[i], stop[i]) without a Python loop."""
    lengths = stop - start
    before = np.cumsum(lengths) - lengths
    return np.repeat(start - before, lengths) + np.arange(int(lengths.sum()), dtype=np.int64)


@dataclass(frozen=True)
class ShufflePlan:
    chunk_sizes: tuple[tuple[int, int], ...]  # (chunk, rows) of each training chunk, store order
    buffer_rows: int
    slice_rows: int
    seed: int
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise StoreError(f"rank {self.rank} is outside world_size {self.world_size}; use 0 <= rank < world_size")
        if self.buffer_rows < 1:
            raise StoreError(f"shuffle_buffer_chunks must be >= 1, got a buffer of {self.buffer_rows} rows")
        if self.slice_rows < 1:
            raise StoreError(f"loader.slice_rows must be >= 1, got {self.slice_rows}")
        if self.seed < 0:
            raise StoreError(f"the loader seed must be a non-negative integer, got {self.seed}")
        if self.groups < self.world_size:
            raise StoreError(
                f"the training split fills {self.groups} shuffle groups per epoch, fewer than {self.world_size} ranks; "
                "lower loader.shuffle_buffer_chunks, generate more rows, hold out fewer chunks or use fewer ranks"
            )

    # --- slices ---------------------------------------------------------------------------
    @cached_property
    def _slice_ends(self) -> np.ndarray:
        """Cumulative slice counts per training chunk (the last slice of a chunk may be short)."""
        return np.cumsum([-(-rows // self.slice_rows) for _, rows in self.chunk_sizes], dtype=np.int64)

    @property
    def n_slices(self) -> int:
        return int(self._slice_ends[-1]) if len(self._slice_ends) else 0

    @property
    def slices_per_group(self) -> int:
        """K, the number of strata."""
        return max(1, min(self.n_slices, math.ceil(self.buffer_rows / self.slice_rows)))

    @property
    def groups(self) -> int:
        """G, groups per epoch over all ranks."""
        return math.ceil(self.n_slices / self.slices_per_group) if self.n_slices else 0

    @property
    def groups_per_epoch(self) -> int:
        """Groups this rank reads per epoch (the same in every epoch)."""
        return len(range(self.rank, self.groups, self.world_size))

    @property
    def group_capacity(self) -> int:
        """Rows a group buffer must hold."""
        return min(self.slices_per_group * self.slice_rows, sum(rows for _, rows in self.chunk_sizes))

    def rows_per_epoch(self, epoch: int) -> int:
        """Rows this rank reads in `epoch` (ranks differ by up to a group; epochs by a few rows)."""
        return sum(self.group_rows(epoch, group) for group in range(self.groups_per_epoch))

    # --- groups ---------------------------------------------------------------------------
    def _global_group(self, group: int) -> int:
        return self.rank + group * self.world_size

    def group_slices(self, epoch: int, group: int) -> np.ndarray:
        """Indices (store order) of the slices of this rank's group `group` of `epoch`: the
        positions [g K, (g + 1) K) of the epoch's permutation of all slices."""
        k, g = self.slices_per_group, self._global_group(group)
        positions = np.arange(g * k, min((g + 1) * k, self.n_slices), dtype=np.int64)
        return np.sort(Permutation(self.n_slices, [self.seed, _SLICE_ORDER_STREAM, epoch])(positions))

    def group_pieces(self, epoch: int, group: int) -> Pieces:
        """The group's slices as row ranges inside chunks, store order, adjacent slices merged
        (fewer, longer reads)."""
        slices = self.group_slices(epoch, group)
        which = np.searchsorted(self._slice_ends, slices, side="right")
        first_slice = np.concatenate([[0], self._slice_ends])[which]
        start = (slices - first_slice) * self.slice_rows
        stop = np.minimum(start + self.slice_rows, self._chunk_rows[which])
        new_run = np.ones(len(slices), dtype=bool)
        new_run[1:] = (which[1:] != which[:-1]) | (start[1:] != stop[:-1])
        runs = np.flatnonzero(new_run)
        ends = np.append(runs[1:], len(slices)) - 1
        return Pieces(self._chunk_ids[which[runs]], start[runs], stop[ends])

    @cached_property
    def _chunk_ids(self) -> np.ndarray:
        return np.array([chunk for chunk, _ in self.chunk_sizes], dtype=np.int64)

    @cached_property
    def _chunk_rows(self) -> np.ndarray:
        return np.array([rows for _, rows in self.chunk_sizes], dtype=np.int64)

    def group_rows(self, epoch: int, group: int) -> int:
        return self.group_pieces(epoch, group).rows

    def row_order(self, epoch: int, group: int, n_rows: int) -> np.ndarray:
        """The order in which a group's concatenated rows are yielded (int64 indices)."""
        rng = np.random.default_rng([self.seed, _ROW_ORDER_STREAM, epoch, self._global_group(group)])
        return rng.permutation(n_rows).astype(np.int64)


@dataclass
class Cursor:
    """Where a training stream stands: the next unread row is row `offset` (in shuffled order) of
    group `group` of epoch `epoch`. `rows` and `batches` count what has been yielded so far; the
    remaining fields identify the plan, so a cursor is never applied to a different stream."""

    epoch: int = 0
    group: int = 0
    offset: int = 0
    rows: int = 0
    batches: int = 0
    seed: int = 0
    batch_size: int = 0
    buffer_chunks: int = 0
    rank: int = 0
    world_size: int = 1
    n_train_chunks: int = 0
    slice_rows: int = 0
    plan: int = PLAN_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> Cursor:
        if "plan" not in state:
            raise StoreError(
                "loader cursor was saved by an older saeflow whose loader read whole chunks in another order; "
                "the run cannot resume exactly: start a fresh run (or resume with the saeflow that saved it)"
            )
        unknown = set(state) - set(cls.__dataclass_fields__)
        if unknown:
            raise StoreError(f"loader cursor has unknown keys {sorted(unknown)}; it was saved by another saeflow version")
        return cls(**{key: int(value) for key, value in state.items()})

    def check_matches(self, expected: Cursor) -> None:
        """Refuse a cursor saved under another plan: the resumed batches would differ silently."""
        for key in ("plan", "seed", "batch_size", "buffer_chunks", "slice_rows", "rank", "world_size", "n_train_chunks"):
            saved, now = getattr(self, key), getattr(expected, key)
            if saved != now:
                raise StoreError(
                    f"loader cursor was saved with {key}={saved} but this loader has {key}={now}; "
                    "resume with the same loader settings and store, or start a fresh run"
                )
