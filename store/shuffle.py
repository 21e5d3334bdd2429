"""The deterministic reading plan of the loader: which chunks, in which groups, in which row order.

Everything here is a pure function of (seed, epoch, rank, group), so batch b of a run never
depends on thread timing, and a resumed run can jump to a saved position without reading the
chunks before it.

- Training chunks are 0 .. n_train-1; the held-out chunks after them are never planned for
  training.
- Each epoch draws one permutation of the training chunks from (seed, epoch); every rank draws
  the same one and takes every world_size-th entry starting at its rank, so ranks are disjoint
  and together cover the split. When n_train is not a multiple of world_size, the first
  (n_train % world_size) ranks hold one chunk more in that epoch; which chunks those are changes
  with the permutation, so no chunk is favoured. Batches roll over epoch boundaries, so every
  rank still yields the same number of batches for the same max_rows.
- A rank's chunk list is cut into groups of `buffer_chunks` consecutive chunks; a group's rows
  are loaded together and permuted with a generator seeded from (seed, epoch, rank, group).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from store.format import StoreError

# Distinct first words keep the chunk-order and row-order random streams independent.
_CHUNK_ORDER_STREAM = 0
_ROW_ORDER_STREAM = 1


@dataclass(frozen=True)
class ShufflePlan:
    n_train_chunks: int
    buffer_chunks: int
    seed: int
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise StoreError(f"rank {self.rank} is outside world_size {self.world_size}; use 0 <= rank < world_size")
        if self.buffer_chunks < 1:
            raise StoreError(f"shuffle_buffer_chunks must be >= 1, got {self.buffer_chunks}")
        if self.seed < 0:
            raise StoreError(f"the loader seed must be a non-negative integer, got {self.seed}")
        if self.n_train_chunks < self.world_size:
            raise StoreError(
                f"{self.n_train_chunks} training chunks cannot give each of {self.world_size} ranks a chunk; "
                "generate more rows, use smaller chunks, fewer held-out chunks or fewer ranks"
            )

    @property
    def chunks_per_epoch(self) -> int:
        """Chunks this rank reads per epoch (the same in every epoch)."""
        return len(range(self.rank, self.n_train_chunks, self.world_size))

    @property
    def groups_per_epoch(self) -> int:
        return math.ceil(self.chunks_per_epoch / self.buffer_chunks)

    def chunk_order(self, epoch: int) -> list[int]:
        """This rank's chunks for `epoch`, in reading order."""
        rng = np.random.default_rng([self.seed, _CHUNK_ORDER_STREAM, epoch])
        order = rng.permutation(self.n_train_chunks)
        return [int(c) for c in order[self.rank :: self.world_size]]

    def group_chunks(self, epoch: int, group: int) -> list[int]:
        start = group * self.buffer_chunks
        return self.chunk_order(epoch)[start : start + self.buffer_chunks]

    def row_order(self, epoch: int, group: int, n_rows: int) -> np.ndarray:
        """The order in which a group's concatenated rows are yielded (int64 indices)."""
        rng = np.random.default_rng([self.seed, _ROW_ORDER_STREAM, epoch, self.rank, group])
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> Cursor:
        unknown = set(state) - set(cls.__dataclass_fields__)
        if unknown:
            raise StoreError(f"loader cursor has unknown keys {sorted(unknown)}; it was saved by another saeflow version")
        return cls(**{key: int(value) for key, value in state.items()})

    def check_matches(self, expected: Cursor) -> None:
        """Refuse a cursor saved under another plan: the resumed batches would differ silently."""
        for key in ("seed", "batch_size", "buffer_chunks", "rank", "world_size", "n_train_chunks"):
            saved, now = getattr(self, key), getattr(expected, key)
            if saved != now:
                raise StoreError(
                    f"loader cursor was saved with {key}={saved} but this loader has {key}={now}; "
                    "resume with the same loader settings and store, or start a fresh run"
                )
