"""Shuffled, prefetching, resumable batches of activation rows from a store.

Reading plan (store/shuffle.py): each group (one buffer-load of `shuffle_buffer_chunks` chunks'
worth of rows) is a random sample of `slice_rows`-row slices (default: single rows) from across
the whole training split, its rows shuffled together; each epoch deals every slice to exactly
one group, so with single rows an epoch is a global shuffle. Batch b is
a pure function of (seed, epoch, rank, group), so a saved cursor restores the exact remaining
stream. The split itself (which chunks are held out) is store/split.py's.

Threads (store/producer.py): `num_workers` reader threads copy a group's slices (one np.take per
chunk out of its memmap, kept mapped for the reader's life, store/chunk_maps.py, or out of the
decoded chunk) into one of two preallocated group buffers while `num_workers` builder threads
gather batches out of the other (store/staging.py): on the CPU straight into the training dtype
(converted in the gather, each builder thread on its own: an OpenMP team of one); for CUDA kept
in the stored dtype in pooled pinned buffers, copied non_blocking and converted on the device by
the consumer. At most `prefetch_batches` finished batches wait ahead of the consumer. Private
host memory is bounded by 2 group buffers (2 x shuffle_buffer_chunks x chunk_rows rows) +
prefetch_batches + 2 * num_workers + 2 batches, allocated as iteration starts (+ a stored-dtype
batch of scratch per builder thread when it converts) + a chunk being decoded per reader thread
(compressed or remote stores only), whatever the store's size; the kept chunk maps are page
cache (RSS shows them as RssFile).

Training batches roll over epoch boundaries (the tail of epoch e and the head of e+1 share a
batch), so every batch is full and every rank yields the same number of batches; only the final
batch when `max_rows` is not a multiple of batch_size is short. The held-out split is read once,
in store order, unshuffled, with a short last batch; so is the training split with shuffle=False
(analysis passes that need each row's index: store.split.RowMap(loader.ranges) maps row i of
the pass to its store row).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from store.dtypes import TORCH_DTYPES, numpy_dtype
from store.format import StoreError
from store.gather import describe, gathers_from_maps
from store.producer import END, Group, Producer
from store.reader import StoreReader
from store.shuffle import Cursor, Pieces, ShufflePlan
from store.split import SHUFFLED_KEY
from store.staging import DeviceBatches, HostBatches

Batch = dict[str, torch.Tensor]  # {hook: (rows, d) tensor}; row i of every hook is the same token


class ActivationLoader:
    """Iterate batches {hook: tensor} of rows of one or several aligned hooks.

    hooks: a hook name, or a sequence such as (hook_in, hook_out) for a transcoder: row i of every
        tensor in a batch comes from the same token.
    split: "train" (shuffled, endless unless max_rows, resumable) or "heldout" (the rows of
        `heldout_chunks` chunks spread over the store, store order, one pass; store/split.py).
    shuffle: False reads the training split like the held-out one: once, in store order.
    dtype: dtype of yielded tensors; None keeps the stored dtype.
    pin_memory: page-locked batches and non_blocking copies when device is CUDA; ignored otherwise.
    max_rows: stop after this many rows in total (counted from the start of the run, including
        rows yielded before a restored cursor; per rank). None: training never ends.
    slice_rows: rows read together from a chunk (store/shuffle.py): 1 gives a global shuffle of
        every epoch; chunk_rows reads whole chunks (fewest reads, least mixing). None (the
        default): 1, or chunk_rows on a shuffled copy (store/shuffled_copy.py), whose rows are in
        random order already, so whole chunks read at disk speed and mix as well.
    rank/world_size: data-parallel sharding by group (see store/shuffle.py).
    num_workers: reader threads; prefetch_batches: finished batches queued ahead of the consumer.
    verify: check each chunk against its recorded checksum the first time it is read (when
        `store` is a path; a StoreReader brings its own setting). A damaged chunk stops the
        iteration with a StoreError before any batch holds its rows.

    Batches are dicts of tensors owned by the caller. state_dict() after batch b restores a
    loader that yields batch b+1 next, exactly as the uninterrupted run would.
    """

    def __init__(
        self,
        store: str | Path | StoreReader,
        hooks: str | Sequence[str],
        *,
        batch_size: int,
        split: Literal["train", "heldout"] = "train",
        shuffle: bool = True,
        seed: int = 0,
        shuffle_buffer_chunks: int = 8,
        slice_rows: int | None = None,
        prefetch_batches: int = 4,
        num_workers: int = 1,
        heldout_chunks: int = 1,
        rank: int = 0,
        world_size: int = 1,
        dtype: torch.dtype | None = torch.float32,
        device: str | torch.device = "cpu",
        pin_memory: bool = True,
        max_rows: int | None = None,
        cursor: dict[str, Any] | None = None,
        verify: bool = True,
    ):
        self.reader = store if isinstance(store, StoreReader) else StoreReader(store, verify=verify)
        self.hooks: list[str] = [hooks] if isinstance(hooks, str) else list(dict.fromkeys(hooks))
        if not self.hooks:
            raise StoreError("the loader needs at least one hook")
        for hook in self.hooks:
            self.reader.d(hook)  # raises a StoreError naming the store's hooks
        if batch_size < 1 or prefetch_batches < 1 or num_workers < 1:
            raise StoreError("batch_size, prefetch_batches and num_workers must all be >= 1")
        self.ranges = self.reader.split_ranges(split, heldout_chunks)
        self.batch_size = batch_size
        self.split = split
        self.prefetch_batches = prefetch_batches
        self.num_workers = num_workers
        self.max_rows = max_rows
        train = self.ranges if split == "train" else self.reader.split_ranges("train", heldout_chunks)
        self.n_train_chunks = len(train)
        self.buffer_chunks = shuffle_buffer_chunks
        if shuffle_buffer_chunks < 1:
            raise StoreError(f"shuffle_buffer_chunks must be >= 1, got {shuffle_buffer_chunks}")
        buffer_rows = shuffle_buffer_chunks * self.reader.chunk_rows
        if slice_rows is None:
            slice_rows = self.reader.chunk_rows if self.reader.manifest.get(SHUFFLED_KEY) else 1
        self.slice_rows = min(slice_rows, self.reader.chunk_rows)
        self.rank, self.world_size = rank, world_size
        if split == "train" and shuffle:
            sizes = tuple((r.chunk, r.rows) for r in train)
            self.plan = ShufflePlan(sizes, buffer_rows, self.slice_rows, seed, rank, world_size)
            self.buffer_rows = self.plan.group_capacity
        else:
            self.plan = None
            if len(self.ranges) < world_size:
                raise StoreError(f"{len(self.ranges)} {split} chunks cannot be split over {world_size} ranks")
            self.pass_ranges = self.ranges[rank::world_size]
            self.buffer_rows = buffer_rows
        self.device = torch.device(device)
        # Pinning only helps copies to a CUDA device; elsewhere the request is dropped and rows are
        # gathered by the same code into pageable memory.
        self.pinned = bool(pin_memory and self.device.type == "cuda" and torch.cuda.is_available())
        self.stored_dtypes = [TORCH_DTYPES[self.reader.store_dtype(h)] for h in self.hooks]
        self.out_dtypes = [dtype or stored for stored in self.stored_dtypes]
        self._cursor = self._fresh_cursor(seed)
        if cursor is not None:
            self.load_state_dict(cursor)

    # --- cursor -------------------------------------------------------------------------
    def _fresh_cursor(self, seed: int) -> Cursor:
        return Cursor(
            seed=seed,
            batch_size=self.batch_size,
            buffer_chunks=self.buffer_chunks,
            rank=self.rank,
            world_size=self.world_size,
            n_train_chunks=self.n_train_chunks,
            slice_rows=self.slice_rows,
        )

    def state_dict(self) -> dict[str, Any]:
        """The position after the last batch this loader handed out (JSON-able)."""
        if self.plan is None:
            raise StoreError("only the shuffled training split has a cursor; a one-pass iteration always starts at its beginning")
        return self._cursor.to_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        cursor = Cursor.from_dict(state)
        cursor.check_matches(self._cursor)
        self._cursor = cursor

    @property
    def rows_yielded(self) -> int:
        return self._cursor.rows

    # --- iteration ----------------------------------------------------------------------
    def __iter__(self) -> Iterator[Batch]:
        """Training: continue from the cursor. Held-out: one pass from the start."""
        start = self._cursor if self.plan is not None else self._fresh_cursor(self._cursor.seed)
        sink = self._new_sink()
        producer = Producer(
            self.reader, self.hooks, self._groups(start), sink, batch_size=self.batch_size, max_rows=self.max_rows,
            start=start, num_workers=self.num_workers, buffer_rows=self.buffer_rows,
            buffer_dtypes=[numpy_dtype(self.reader.store_dtype(h)) for h in self.hooks], keep_maps=self._returns_to_chunks,
            from_maps=self._gathers_from_maps,
        )
        ready: queue.Queue = queue.Queue(maxsize=self.prefetch_batches)
        stop = threading.Event()
        planner = threading.Thread(target=producer.run, args=(ready, stop), daemon=True, name="saeflow-loader")
        planner.start()
        try:
            while True:
                item = ready.get()
                if item is END:
                    return
                if isinstance(item, BaseException):
                    raise item
                future, position = item
                tensors = sink.deliver(future.result())
                if self.plan is not None:
                    self._cursor = position
                yield dict(zip(self.hooks, tensors))
        finally:
            stop.set()
            planner.join()

    @property
    def _returns_to_chunks(self) -> bool:
        """Whether every group reads parts of (nearly) every chunk, so chunks stay mapped
        (store/chunk_maps.py); whole-chunk groups read each chunk once an epoch, in one pread."""
        return self.plan is not None and self.slice_rows < self.reader.chunk_rows

    @property
    def refetches_remote_chunks(self) -> bool:
        """Whether every shuffle group fetches again each remote chunk it takes rows from: a
        store on object storage read in slices smaller than a chunk, without a chunk cache."""
        return self._returns_to_chunks and self.reader.path.remote and not self.reader.caches_chunks

    def _gathered_dtypes(self) -> list[torch.dtype | None]:
        """The dtype each hook's rows are gathered into (None: as stored): CPU batches are
        gathered in the training dtype, device batches in the stored one (converted on the device)."""
        if self.device.type != "cpu":
            return [None] * len(self.hooks)
        return [None if out == stored else out for out, stored in zip(self.out_dtypes, self.stored_dtypes)]

    @property
    def _gathers_from_maps(self) -> bool:
        """Whether batches are gathered straight from the kept chunk maps (store/producer.py)."""
        return self._returns_to_chunks and self.reader.keeps_every_map(self.hooks) and all(
            gathers_from_maps(numpy_dtype(self.reader.store_dtype(h)), out) for h, out in zip(self.hooks, self._gathered_dtypes())
        )

    def describe_gather(self) -> str:
        """For logs: how this loader's batches are gathered here (the first hook's)."""
        stored = self.reader.store_dtype(self.hooks[0])
        return f"{stored} rows {describe(numpy_dtype(stored), self._gathered_dtypes()[0], self._gathers_from_maps)}"

    def _new_sink(self) -> HostBatches | DeviceBatches:
        widths = [self.reader.d(h) for h in self.hooks]
        if self.device.type == "cpu":
            # Batch memory reused: the queued batches, those being gathered, two the consumer holds.
            pool = self.prefetch_batches + 2 * self.num_workers + 2
            return HostBatches(self.batch_size, widths, self.stored_dtypes, self.out_dtypes, pool)
        # One buffer being gathered, `prefetch_batches` queued, one being copied to the device.
        return DeviceBatches(
            self.prefetch_batches + 2, self.batch_size, widths, self.stored_dtypes, self.out_dtypes, self.device, self.pinned
        )

    def _groups(self, start: Cursor) -> Iterator[Group]:
        """The stream of groups from `start` on; endless for training."""
        if self.plan is None:
            for index in range(0, len(self.pass_ranges), self.buffer_chunks):
                ranges = self.pass_ranges[index : index + self.buffer_chunks]
                pieces = Pieces.of([(r.chunk, *self._in_chunk(r.chunk, r.start, r.stop)) for r in ranges])
                yield Group(0, index, pieces, pieces.rows, None, 0)
            return
        epoch, group, offset = start.epoch, start.group, start.offset
        while True:
            if group >= self.plan.groups_per_epoch:
                epoch, group, offset = epoch + 1, 0, 0
                continue
            pieces = self.plan.group_pieces(epoch, group)
            n_rows = pieces.rows
            if offset < n_rows:  # a cursor saved at a group's very end resumes at the next one
                yield Group(epoch, group, pieces, n_rows, self.plan.row_order(epoch, group, n_rows), offset)
            group, offset = group + 1, 0

    def _in_chunk(self, chunk: int, start: int, stop: int) -> tuple[int, int]:
        first, _ = self.reader.chunk_bounds(chunk)
        return start - first, stop - first
