"""The chunk maps a reader keeps open, so the shuffled loader faults each page in once.

Every shuffle group takes a few rows of (almost) every chunk (store/shuffle.py). A fresh
np.memmap per read starts without page table entries, so each group faulted in again every page
it touched: G groups per epoch cost G times the page faults of one sequential read, most of the
loader's time (bench/loader_throughput.py). A map kept for the reader's life faults a page once.

Bound: a kept map holds a file descriptor (Python's mmap keeps a dup of it) and a kernel map
area, so a reader keeps at most min(4096, RLIMIT_NOFILE soft limit / 4, vm.max_map_count / 4)
maps; further chunks are mapped afresh on every read, as before (the first chunks stay kept: an
LRU would evict every map of a cyclic scan before its next use). Kept pages are page cache,
never dirty: they show in RSS (RssFile) but the kernel reclaims them under memory pressure.

A chunk already in the page cache when it is first kept gets its page table set up by one
madvise(MADV_POPULATE_READ) call (about half the kernel time of faulting it in, measured); a
chunk on disk is left to the faults, whose readahead read it faster than the populating call.
"""

from __future__ import annotations

import ctypes
import mmap
import resource
from pathlib import Path

import numpy as np

MAX_KEPT_MAPS = 4096
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux >= 5.14; Python 3.11 lacks the name
_PAGE = mmap.PAGESIZE
try:
    _mincore = ctypes.CDLL(None, use_errno=True).mincore
    _mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
except (OSError, AttributeError):
    _mincore = None


def kept_maps_limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    files = MAX_KEPT_MAPS if soft == resource.RLIM_INFINITY else soft // 4
    try:
        areas = int(Path("/proc/sys/vm/max_map_count").read_text()) // 4
    except (OSError, ValueError):
        areas = MAX_KEPT_MAPS
    return max(0, min(MAX_KEPT_MAPS, files, areas))


class ChunkMaps:
    """{(array path, chunk): its memmap}, up to `limit` entries (default: kept_maps_limit())."""

    def __init__(self, limit: int | None = None):
        self.limit = kept_maps_limit() if limit is None else limit
        self._maps: dict[tuple[str, int], np.memmap] = {}

    def get(self, array_path: str, index: int) -> np.memmap | None:
        return self._maps.get((array_path, index))

    def keep(self, array_path: str, index: int, mapped: np.memmap) -> None:
        if len(self._maps) < self.limit:  # two threads may both add one: harmless, the bound is loose by that
            _populate_if_cached(mapped)
            self._maps.setdefault((array_path, index), mapped)

    def __len__(self) -> int:
        return len(self._maps)

    def close(self) -> None:
        """Drop every kept map (each unmaps once no array views it any more)."""
        self._maps.clear()


def _populate_if_cached(mapped: np.memmap) -> None:
    """Set up a kept map's page table in one call when the chunk is in the page cache already
    (its first, middle and last pages are): half the first epoch's kernel time of faulting it in.
    A chunk on disk is left to faults, whose readahead read it faster than a populating call."""
    if _mincore is None or mapped.nbytes == 0 or not isinstance(getattr(mapped, "_mmap", None), mmap.mmap):
        return
    start = mapped.ctypes.data - mapped.ctypes.data % _PAGE
    pages = (mapped.ctypes.data + mapped.nbytes - start + _PAGE - 1) // _PAGE
    resident = ctypes.create_string_buffer(1)
    for page in (0, pages // 2, pages - 1):
        if _mincore(start + page * _PAGE, _PAGE, resident) != 0 or not resident.raw[0] & 1:
            return
    try:
        mapped._mmap.madvise(_MADV_POPULATE_READ)
    except (OSError, ValueError):  # an older kernel: faults do the same work
        pass
