"""StoreWriter: rows of several hooks in, committed fixed-size chunks out, on a background thread.

The producer (the LM loop) calls put() with one batch of rows: activations per hook plus the
tokens/doc/pos of each row and an opaque JSON `cursor` saying how to regenerate that batch. put()
converts to the store dtype (refusing NaN/inf), copies the rows into the current chunk buffer and,
when a chunk is full, hands it to the writer thread through a queue of `queue_chunks` chunks: the
LM never waits on disk unless the disk is slower than the LM, and memory stays bounded.

Each chunk's float64 statistics are computed as it fills: by the producer on a CPU (between two
forwards, on the LM's threads), by the writer thread on a GPU. The writer thread commits in order.
A commit writes every array's rows, the chunks' checksums, merges the chunks' statistics (and
saves them when due), then rewrites the manifest (atomic):
n_chunks, n_rows and the resume cursor {"batch": <cursor of the batch holding the next row>,
"rows_into_batch": <rows of that batch already committed>}. A crash at any point leaves the store
at its last commit. With zarr shards, writing an inner chunk rewrites its whole shard file, so a
commit is a whole shard (shard_chunks chunks) and the unit a crash can lose grows to match.

Only a store completed with close(complete=True) gets a short final chunk; close(complete=False)
drops rows that do not fill a commit (a resume regenerates them from the cursor).
"""

from __future__ import annotations

import errno
import math
import os
import queue
import shutil
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from store.batch_rows import stored_rows
from store.dtypes import numpy_dtype
from store.format import (
    TOKEN_ARRAYS,
    Manifest,
    StoreError,
    acts_path,
    checksum_path,
    chunk_checksum,
    create_store,
    open_store_group,
    read_manifest,
    resize_rows,
    write_manifest,
)
from store.kill_points import COMMIT_PHASES, KILL_AT_ENV, KillSwitch  # noqa: F401 - KILL_AT_ENV, COMMIT_PHASES: re-exported for tests
from store.lease import RemoteLease, writer_lock
from store.leftovers import CREATING_PREFIX, remove_interrupted_creations, remove_interrupted_remote_creation  # noqa: F401
from store.location import StoreLocation, locate
from store.lock import StoreLock
from store.moments import RunningMoments
from store.recorded_stats import StatsRecorder

_PUT_POLL_S = 0.1  # how often a producer blocked on a full queue checks for a writer failure
_STOP = object()


@dataclass
class _Chunk:
    index: int
    rows: int
    arrays: dict[str, np.ndarray]  # array path -> buffer of chunk_rows rows (first `rows` valid)
    cursor: dict[str, Any] | None
    moments: dict[str, RunningMoments] | None = None  # computed by the producer (CPU statistics)


class StoreWriter:
    """Append rows to a store; create() a new one or open() an incomplete one to resume it."""

    def __init__(self, path: StoreLocation, lock: StoreLock | RemoteLease, queue_chunks: int, stats_device: str | torch.device):
        self.path = path
        self._lock = lock
        self._group = open_store_group(path, mode="r+")
        self.manifest = read_manifest(path, self._group)
        self.hooks = self.manifest.hooks
        self.chunk_rows = self.manifest.chunk_rows
        self._commit_chunks = int(self.manifest.get("shard_chunks") or 1)
        self._layout = self.manifest.layout
        self._open_arrays()
        self._stats = StatsRecorder(path, self._group, self.manifest, stats_device)
        # On a CPU the producer computes each chunk's statistics as it fills, on the LM's own
        # threads between two forwards: on the writer thread the float64 product ran beside the
        # forward, and a parallel forward stalls on its slowest thread (bench/generate_overhead.py).
        # A GPU's statistics stay on the writer thread, whose copy back would stall the LM's stream.
        self._stats_by_producer = torch.device(stats_device).type == "cpu"
        # Producer-side state.
        self.rows_accepted = self.manifest.n_rows
        self._next_index = self.manifest.n_chunks
        self._buffers = self._new_buffers()
        self._fill = 0
        self._last_cursor: dict[str, Any] | None = None
        self._closed = False
        # Writer-thread state.
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, queue_chunks))
        self._error: BaseException | None = None
        self._error_message = ""
        self._finish_complete = False
        self._kill_switch = KillSwitch(os.environ.get(KILL_AT_ENV))
        self._thread = threading.Thread(target=self._run, name=f"saeflow-writer:{path.name}", daemon=True)
        self._thread.start()

    # --- construction -------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | Path | StoreLocation,
        *,
        hook_dims: dict[str, int],
        chunk_rows: int,
        capacity_rows: int,
        store_dtype: str = "float16",
        shard_chunks: int | None = None,
        compressor: str | None = None,
        manifest: dict[str, Any] | None = None,
        queue_chunks: int = 4,
        lock: StoreLock | RemoteLease | None = None,
        stats_device: str | torch.device = "cpu",
    ) -> StoreWriter:
        """Create a new store at `path` (which must not exist yet, or be empty) and open it for writing.
        The store is built under a temporary name beside `path` and renamed into place with its
        manifest, so a kill during creation leaves no half-made store at `path`.

        stats_device: where each chunk's d x d statistics are computed (the LM's GPU, if any);
        resume on the same kind of device for bit-identical statistics."""
        path = locate(path)

        def build(lock: StoreLock | RemoteLease) -> StoreWriter:
            if not path.is_empty():
                raise StoreError(f"{path} already exists; choose another store path or remove it")
            if chunk_rows <= 0 or (shard_chunks is not None and shard_chunks <= 0):
                raise StoreError(f"chunk_rows ({chunk_rows}) and shard_chunks ({shard_chunks}) must be positive")
            rows = capacity_rows
            if shard_chunks:
                rows = math.ceil(capacity_rows / (chunk_rows * shard_chunks)) * chunk_rows * shard_chunks
            layout = dict(hook_dims=hook_dims, store_dtype=store_dtype, chunk_rows=chunk_rows, capacity_rows=rows,
                          shard_chunks=shard_chunks, compressor=compressor, manifest=dict(manifest or {}))
            if path.remote:  # no rename on an object store: the manifest, written last, marks it made
                create_store(path, **layout)
                KillSwitch(os.environ.get(KILL_AT_ENV)).reached("store_created")
                return cls(path, lock, queue_chunks, stats_device)
            remove_interrupted_creations(path.local)
            temp = path.local.with_name(f"{CREATING_PREFIX.format(name=path.name)}{os.getpid()}")
            create_store(temp, **layout)
            KillSwitch(os.environ.get(KILL_AT_ENV)).reached("store_created")
            os.rename(temp, path.local)  # onto nothing or an empty directory
            return cls(path, lock, queue_chunks, stats_device)

        return _under_lock(path, lock, build)

    @classmethod
    def open(
        cls,
        path: str | Path | StoreLocation,
        *,
        queue_chunks: int = 4,
        lock: StoreLock | RemoteLease | None = None,
        stats_device: str | torch.device = "cpu",
    ) -> StoreWriter:
        """Open an incomplete store to append after its last commit (resume)."""
        path = locate(path)

        def build(lock: StoreLock | RemoteLease) -> StoreWriter:
            manifest = read_manifest(path)
            if manifest["complete"]:
                raise StoreError(f"{path} is complete ({manifest['n_rows']} rows); nothing can be appended to it")
            # temp files of writes a crash interrupted (an object store's puts are atomic: none there)
            if path.local is not None:
                for leftover in path.local.rglob("*.partial"):
                    leftover.unlink(missing_ok=True)
                remove_interrupted_creations(path.local)
            return cls(path, lock, queue_chunks, stats_device)

        return _under_lock(path, lock, build)

    # --- producer side ------------------------------------------------------------------
    def put(
        self,
        acts: Mapping[str, torch.Tensor | np.ndarray],
        tokens: np.ndarray | torch.Tensor,
        doc: np.ndarray | torch.Tensor,
        pos: np.ndarray | torch.Tensor,
        cursor: dict[str, Any] | None = None,
        label: str = "batch",
        rows_before: int = 0,
    ) -> None:
        """Add one batch of n rows: acts[hook] (n, d) for every hook, tokens/doc/pos (n,).

        `cursor` (JSON) says how to regenerate this batch; a commit records it with the number of
        this batch's rows already committed, counting the `rows_before` rows of it that an earlier
        run committed (the first batch of a resume continues where that run stopped). Raises
        StoreError, with nothing of this batch kept, on NaN/inf (or values the store dtype cannot
        hold) and on a failure of the writer thread.
        """
        self._raise_if_failed()
        if self._closed:
            raise StoreError(f"writer of {self.path} is closed")
        rows = stored_rows(self._layout, acts, {"tokens": tokens, "doc": doc, "pos": pos}, label)
        n = len(rows["tokens"])
        offset = 0
        while offset < n:
            take = min(n - offset, self.chunk_rows - self._fill)
            for path, values in rows.items():
                self._buffers[path][self._fill : self._fill + take] = values[offset : offset + take]
            self._fill += take
            offset += take
            if self._fill == self.chunk_rows:
                self._enqueue({"batch": cursor, "rows_into_batch": rows_before + offset})
        self.rows_accepted += n
        self._last_cursor = {"batch": cursor, "rows_into_batch": rows_before + n}

    def close(self, complete: bool = True) -> dict[str, Any]:
        """Commit what is queued; complete=True also commits the short final chunk and marks the
        store complete. Returns the final manifest. Raises the writer thread's error, if any."""
        if self._closed:
            self._raise_if_failed()
            return self.manifest
        try:
            if complete and self._fill:
                self._enqueue(self._last_cursor)
            self._finish_complete = complete
            self._queue_put(_STOP)
            self._thread.join()
            self._raise_if_failed()
            return self.manifest
        finally:
            self._closed = True
            self._lock.release()

    def abort(self) -> None:
        """Stop after committing the full chunks already queued; the store stays resumable."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._thread.is_alive():
                self._finish_complete = False
                self._queue_put(_STOP)
                self._thread.join()
        except (StoreError, RuntimeError):
            pass  # the writer thread already failed; the store is at its last commit
        finally:
            self._lock.release()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close(complete=False)

    def _enqueue(self, cursor: dict[str, Any] | None) -> None:
        moments = self._stats.moments_of(self._buffers, self._fill) if self._stats_by_producer else None
        chunk = _Chunk(self._next_index, self._fill, self._buffers, cursor, moments)
        self._queue_put(chunk)
        self._next_index += 1
        self._buffers = self._new_buffers()  # the thread owns the old buffers now
        self._fill = 0

    def _queue_put(self, item) -> None:
        while True:
            self._raise_if_failed()
            try:
                self._queue.put(item, timeout=_PUT_POLL_S)
                return
            except queue.Full:
                if not self._thread.is_alive():
                    self._raise_if_failed()
                    raise StoreError(f"the writer thread of {self.path} stopped unexpectedly")

    def _raise_if_failed(self) -> None:
        if self._error is None:
            return
        if isinstance(self._error, (OSError, StoreError)):
            raise StoreError(self._error_message) from self._error
        raise RuntimeError(self._error_message) from self._error

    def _open_arrays(self) -> None:
        """Array handles for the data and its checksums (reopened after a resize)."""
        # write_empty_chunks is a property of an open array, not of the stored metadata: without it
        # an all-zero chunk (a doc chunk of document 0) would get no file
        self._arrays = {path: self._group[path].with_config({"write_empty_chunks": True}) for path in self.manifest.array_paths}
        self._checksums = {path: self._group[checksum_path(path)] for path in self._arrays}

    def _new_buffers(self) -> dict[str, np.ndarray]:
        buffers = {name: np.zeros(self.chunk_rows, dtype=dtype) for name, dtype in TOKEN_ARRAYS.items()}
        for hook, (d, store_dtype) in self._layout.items():
            buffers[acts_path(hook)] = np.zeros((self.chunk_rows, d), dtype=numpy_dtype(store_dtype))
        return buffers

    # --- writer thread ------------------------------------------------------------------
    def _run(self) -> None:
        pending: list[_Chunk] = []
        try:
            while True:
                item = self._queue.get()
                if item is _STOP:
                    break
                pending.append(item)
                # a short chunk can only be the last: it is committed with the completion, so an
                # incomplete store never ends in one
                if item.rows == self.chunk_rows and (item.index + 1) % self._commit_chunks == 0:
                    self._commit(pending)
                    pending = []
            if self._finish_complete:
                self._commit(pending, final=True)
            elif self._stats.saved_chunks < self.manifest.n_chunks:
                self._commit([], save_stats=True)  # a clean stop leaves statistics of every commit
        except BaseException as error:  # surfaced to the producer by put()/close()
            first = pending[0].index if pending else self.manifest.n_chunks
            self._error_message = self._describe_failure(error, first)
            self._error = error

    def _commit(self, chunks: list[_Chunk], final: bool = False, save_stats: bool = False) -> None:
        """Write `chunks` (consecutive, a whole shard with shards), then the manifest. The new
        manifest replaces self.manifest only once written, so a failure reports the last commit."""
        reached = self._kill_switch.reached
        reached("commit_started")
        manifest = Manifest(self.manifest)
        if chunks:
            start = chunks[0].index * self.chunk_rows
            stop = start + sum(chunk.rows for chunk in chunks)
            if stop > self._arrays["tokens"].shape[0]:
                resize_rows(self._group, manifest, max(stop, 2 * self._arrays["tokens"].shape[0]))
                self._open_arrays()
            parts = {path: [chunk.arrays[path][: chunk.rows] for chunk in chunks] for path in self._arrays}
            for path, array in self._arrays.items():  # activations first, then tokens, doc, pos
                array[start:stop] = parts[path][0] if len(chunks) == 1 else np.concatenate(parts[path])
                if path == acts_path(self.hooks[-1]):
                    reached("acts_written")
            reached("data_written")
            for path, sums in self._checksums.items():
                sums[chunks[0].index : chunks[-1].index + 1] = np.array(
                    [chunk_checksum(part, manifest["checksum_algorithm"]) for part in parts[path]], dtype="<u8")
            reached("checksums_written")
            for chunk in chunks:
                self._stats.add(chunk.moments or self._stats.moments_of(chunk.arrays, chunk.rows))
            manifest.update(n_chunks=chunks[-1].index + 1, n_rows=stop, cursor=chunks[-1].cursor)
        if final or save_stats or self._stats.due(manifest.n_chunks):
            manifest["stats"] = self._stats.save(manifest)
        reached("stats_written")
        if final:
            resize_rows(self._group, manifest, manifest["n_rows"])
            manifest["complete"] = True
            reached("arrays_trimmed")
        write_manifest(self._group, manifest)
        reached("manifest_written")
        self.manifest = manifest
        self._stats.saved_chunks = int(manifest["stats"]["chunks"]) if manifest["stats"] else 0

    def _describe_failure(self, error: BaseException, chunk: int) -> str:
        where = f"chunk {chunk} of {self.path}"
        kept = f"the store is consistent at {self.manifest.n_chunks} committed chunks ({self.manifest.n_rows} rows)"
        if isinstance(error, OSError) and error.errno == errno.ENOSPC and self.path.local is not None:
            free = shutil.disk_usage(self.path.local).free // 2**20
            return f"disk full while writing {where} ({free} MiB free); {kept}: free space and rerun to resume"
        if isinstance(error, OSError):
            return f"writing {where} failed ({error}); {kept}: fix the cause and rerun to resume"
        return f"the writer thread failed on {where}: {error!r}; {kept}"


def _under_lock(path: StoreLocation, lock: StoreLock | RemoteLease | None, build) -> StoreWriter:
    """build(lock) with the store's lock held; a lock taken here is released if build fails."""
    lock = lock or writer_lock(path)
    owns_lock = not lock.held
    lock.acquire()
    try:
        return build(lock)
    except BaseException:
        if owns_lock:
            lock.release()
        raise
