"""The loader's background work: load groups of chunk slices, gather their rows into batches.

A planner thread walks the stream of groups. Reader threads copy a group's pieces (row ranges of
chunks, store/shuffle.py) into one of two group buffers while the other is gathered from: one
task per chunk, a single pread for a piece that is one range of a raw chunk file, one np.take
out of the mapped (or decoded) chunk for several. A shuffled stream keeps each raw chunk mapped
for the reader's life (store/chunk_maps.py: every group returns to every chunk), and where the
compiled gather delivers the batch dtype (store/gather.py), its groups are not copied at all:
loading one only maps and verifies its chunks, and each batch is gathered straight from the maps
(one row copy fewer, and no group buffers). Each batch's rows are gathered (store/staging.py's
gather_rows, converting for CPU training) by builder threads as soon as they are planned, then
finished by the thread that ends its last gather; the planner queues each batch's future in
order, so batches arrive in plan order however many builders run. A buffer is reloaded only
after every gather reading it has finished; a batch may span any number of groups. A finite
stream (max_rows) loads no group past the one that completes it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from store.gather import take_from
from store.rawread import read_mapped_into
from store.reader import StoreReader
from store.shuffle import Cursor, Pieces
from store.staging import gather_rows, serial_openmp_team

END = object()
_POLL_S = 0.1  # how often a blocked planner checks whether the consumer went away


@dataclass(frozen=True)
class Group:
    """One buffer-load of rows: which pieces, the order their rows are yielded, from where."""

    epoch: int
    index: int
    pieces: Pieces  # row ranges inside chunks; the buffer holds them in this order
    n_rows: int
    order: np.ndarray | None  # None = store order (held-out split)
    start: int  # rows of `order` already consumed before this stream began


class Sink(Protocol):
    def begin(self, stop: threading.Event) -> Any | None: ...  # a handle with .targets, None if stopped
    def finish(self, handle: Any, rows: int) -> Any: ...  # runs in the thread that ends the batch's last gather


@dataclass
class _Slot:
    """A group buffer (one array per hook) and the gathers still reading it."""

    arrays: list[np.ndarray]
    readers: list[Future] = field(default_factory=list)

    def wait_idle(self) -> None:
        wait(self.readers)
        for future in self.readers:
            future.result()  # surface a failed gather here rather than reading a reloaded buffer
        self.readers = []


@dataclass(frozen=True)
class _MappedRows:
    """A group's rows where they lie: the maps of its chunks (a tuple per hook) and, for each
    position of the group, which of them holds its row and where."""

    maps: list[tuple[np.ndarray, ...]]
    which: np.ndarray
    rows: np.ndarray


@dataclass
class _Loading:
    """A group being loaded: its reads, and what its gathers read once those are done."""

    futures: list[Future]
    source: Callable[[], list[np.ndarray] | _MappedRows]  # called once the reads are done

    def result(self) -> list[np.ndarray] | _MappedRows:
        for future in self.futures:
            future.result()
        return self.source()


@dataclass
class _PendingBatch:
    handle: Any
    parts: list[Future] = field(default_factory=list)
    filled: int = 0


class Producer:
    def __init__(
        self,
        reader: StoreReader,
        hooks: list[str],
        groups: Iterator[Group],
        sink: Sink,
        *,
        batch_size: int,
        max_rows: int | None,
        start: Cursor,
        num_workers: int,
        buffer_rows: int,
        buffer_dtypes: list[np.dtype],
        keep_maps: bool = False,
        from_maps: bool = False,
    ):
        self.reader, self.hooks, self.groups, self.sink = reader, hooks, groups, sink
        self.batch_size, self.max_rows, self.num_workers = batch_size, max_rows, num_workers
        self.keep_maps = keep_maps  # store/chunk_maps.py
        self.from_maps = from_maps  # gathers read the kept maps: no group buffers
        self.position = replace(start)
        self.rows_emitted = start.rows
        buffers = 0 if from_maps else buffer_rows
        self.slots = [
            _Slot([np.empty((buffers, reader.d(h)), dtype=dt) for h, dt in zip(hooks, buffer_dtypes)])
            for _ in range(2)
        ]

    def run(self, ready: queue.Queue, stop: threading.Event) -> None:
        """Thread body: put (future of a finished batch, cursor after it) items, then END."""

        def put(item: Any) -> bool:
            while not stop.is_set():  # the consumer may have gone away
                try:
                    ready.put(item, timeout=_POLL_S)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            with ThreadPoolExecutor(self.num_workers, thread_name_prefix="saeflow-read") as loaders, \
                    ThreadPoolExecutor(self.num_workers, thread_name_prefix="saeflow-gather",
                                       initializer=serial_openmp_team) as builders:
                for item in self._batches(loaders, builders, stop):
                    if not put(item):
                        break
            put(END)  # leaving the pools waited for every load and gather still running
        except BaseException as error:  # noqa: BLE001 - re-raised in the consumer thread
            put(error)

    # --- planning -----------------------------------------------------------------------
    def _target_rows(self) -> int:
        if self.max_rows is None:
            return self.batch_size
        return max(0, min(self.batch_size, self.max_rows - self.rows_emitted))

    def _batches(self, loaders: ThreadPoolExecutor, builders: ThreadPoolExecutor, stop: threading.Event) -> Iterator[tuple]:
        current = next(self.groups, None)
        loading = self._load(current, self.slots[0], loaders) if current else None
        slot, pending, target = 0, None, self._target_rows()
        try:
            while current is not None and target and not stop.is_set():
                source = loading.result()
                following = next(self.groups, None) if self._needs_more(current, pending) else None
                loading = None
                offset = current.start
                while offset < current.n_rows and target:
                    if pending is None:
                        handle = self.sink.begin(stop)
                        if handle is None:
                            return  # the consumer went away
                        pending = _PendingBatch(handle)
                    take = min(target - pending.filled, current.n_rows - offset)
                    part = builders.submit(self._gather, current, source, offset, take, pending.handle.targets, pending.filled)
                    self.slots[slot].readers.append(part)
                    pending.parts.append(part)
                    pending.filled += take
                    offset += take
                    self.position = replace(self.position, epoch=current.epoch, group=current.index, offset=offset)
                    if pending.filled == target:
                        yield self._finish(pending)
                        pending, target = None, self._target_rows()
                    if following is not None and loading is None:
                        # The other buffer's gathers were all submitted before this group's
                        # first one; once they finish, the next group loads into it.
                        other = self.slots[1 - slot]
                        other.wait_idle()
                        loading = self._load(following, other, loaders)
                current, slot = following, 1 - slot
            if pending is not None and pending.filled:  # the short last batch of a finite stream
                yield self._finish(pending)
        finally:
            for future in loading.futures if loading is not None else []:
                future.cancel()

    def _needs_more(self, current: Group, pending: _PendingBatch | None) -> bool:
        """Whether rows beyond `current` will be yielded (always, without max_rows)."""
        if self.max_rows is None:
            return True
        planned = self.rows_emitted + (pending.filled if pending is not None else 0)
        return planned + current.n_rows - current.start < self.max_rows

    def _finish(self, pending: _PendingBatch) -> tuple[Future, Cursor]:
        future = _when_all_done(pending.parts, self.sink.finish, pending.handle, pending.filled)
        self.rows_emitted += pending.filled
        self.position = replace(self.position, rows=self.rows_emitted, batches=self.position.batches + 1)
        return future, self.position

    @staticmethod
    def _gather(group: Group, source: list[np.ndarray] | _MappedRows, offset: int, take: int, targets: list, at: int) -> None:
        rows = slice(offset, offset + take) if group.order is None else group.order[offset : offset + take]
        if isinstance(source, _MappedRows):
            which, inside = source.which[rows], source.rows[rows]
            for maps, out in zip(source.maps, targets):
                take_from(maps, which, inside, out[at : at + take])
            return
        for buffer, out in zip(source, targets):
            gather_rows(buffer, rows, out[at : at + take])

    # --- loading ------------------------------------------------------------------------
    def _load(self, group: Group, slot: _Slot, loaders: ThreadPoolExecutor) -> _Loading:
        if self.from_maps:
            return self._map(group, loaders)
        futures, row = [], 0
        for chunk, rows in group.pieces.by_chunk():
            for hook, buffer in zip(self.hooks, slot.arrays):
                futures.append(loaders.submit(self._copy_rows, hook, chunk, rows, buffer[row : row + len(rows)]))
            row += len(rows)
        return _Loading(futures, lambda: slot.arrays)

    def _map(self, group: Group, loaders: ThreadPoolExecutor) -> _Loading:
        """Map and verify the group's chunks (once per reader); its gathers then read the maps."""
        chunks, which, rows = group.pieces.locate()
        # read_chunk verifies a chunk the first time this reader reads it, before any batch holds its rows
        futures = {hook: [loaders.submit(self.reader.read_chunk, hook, chunk, keep_map=True) for chunk in chunks]
                   for hook in self.hooks}

        def mapped_rows() -> _MappedRows:
            return _MappedRows([tuple(f.result() for f in futures[hook]) for hook in self.hooks], which, rows)
        return _Loading([f for hook in self.hooks for f in futures[hook]], mapped_rows)

    def _copy_rows(self, hook: str, chunk: int, rows: np.ndarray, target: np.ndarray) -> None:
        """Copy rows of a chunk (indices inside it) into the group buffer, verified before any batch
        uses them: a whole chunk is checked as copied; a part of one, by checking the whole chunk
        as read (once per reader: the first read of each chunk reads all of it)."""
        # a memmap of a raw chunk (kept for later groups when shuffled), or decoded by zarr
        stored = self.reader.read_chunk(hook, chunk, verify=False, keep_map=self.keep_maps)
        first, last = int(rows[0]), int(rows[-1])
        contiguous = last - first + 1 == len(rows)
        whole = contiguous and first == 0 and len(rows) == len(stored)
        if self.reader.verify and not whole:
            self.reader.verify_chunk(hook, chunk, stored)
        if contiguous:  # one range: one pread of a raw chunk file
            source = stored[first : last + 1]
            if not read_mapped_into(source, target):
                np.copyto(target, source, casting="no")
        else:  # mode="clip" skips numpy's buffered bounds check (indices are in range)
            np.take(stored, rows, axis=0, out=target, mode="clip")
        if self.reader.verify and whole:
            self.reader.verify_chunk(hook, chunk, target)


def _when_all_done(parts: list[Future], then: Callable[..., Any], *args: Any) -> Future:
    """A future of then(*args), run by whichever thread finishes the last of `parts` (the caller,
    if all are done already), or of the first part's error. No builder thread waits on the parts:
    one that did sat idle while the other gathered (half the builders, when the rows are not
    copied into group buffers first)."""
    batch: Future = Future()
    left, lock = len(parts), threading.Lock()
    pending: tuple | None = (batch, then, args)

    def part_done(_: Future) -> None:
        nonlocal left, pending
        with lock:
            left -= 1
            if left:
                return
            # The parts keep this callback (and the planner keeps the parts a while): it must not
            # keep the batch, or its memory could not be handed out again (store/staging.py).
            (done, finish, finish_args), pending = pending, None
        try:
            for part in parts:
                part.result()
            done.set_result(finish(*finish_args))
        except BaseException as error:  # noqa: BLE001 - handed to the consumer with the batch
            done.set_exception(error)

    for part in parts:
        part.add_done_callback(part_done)
    return batch
