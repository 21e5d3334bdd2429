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

Pages are mapped by the faults of the first reads (the kernel maps 16 pages a fault around the
faulting one). Setting a kept map's page table up front with madvise(MADV_POPULATE_READ), for
a chunk already in the page cache, was measured on Linux 6.18 in alternation with this: a fresh
loader's first batch came 20% later and no epoch ran faster, so the loader leaves it to faults.
"""

from __future__ import annotations

import resource
from pathlib import Path

import numpy as np

MAX_KEPT_MAPS = 4096


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
            self._maps.setdefault((array_path, index), mapped)

    def __len__(self) -> int:
        return len(self._maps)

    def close(self) -> None:
        """Drop every kept map (each unmaps once no array views it any more)."""
        self._maps.clear()

