"""Read the bytes behind an np.memmap straight into a buffer with one pread.

Copying out of a memmap faults the file in page by page; a pread of the same byte range lets the
kernel read ahead and copy in large pieces: 1.5-2x faster warm on these machines, and the
sequential access pattern a cold disk wants.
"""

from __future__ import annotations

import mmap
import os

import numpy as np


def mapped_byte_range(mapped: np.memmap) -> tuple[str, int, int] | None:
    """(file, offset, nbytes) of a C-contiguous memmap (or a slice of one), else None."""
    base = getattr(mapped, "_mmap", None)
    if base is None or not mapped.filename or not mapped.flags.c_contiguous:
        return None
    # The mapping starts at the requested offset rounded down to the allocation granularity;
    # the array's data pointer says how far into the mapping (and so into the file) it begins.
    map_start = mapped.offset - mapped.offset % mmap.ALLOCATIONGRANULARITY
    into_map = mapped.ctypes.data - np.frombuffer(base, dtype=np.uint8).ctypes.data
    return str(mapped.filename), map_start + into_map, mapped.nbytes


def read_mapped_into(source: np.ndarray, target: np.ndarray) -> bool:
    """Fill `target` with `source`'s bytes by reading its file; False when that does not apply."""
    if not isinstance(source, np.memmap) or source.dtype != target.dtype or source.shape != target.shape:
        return False
    if not target.flags.c_contiguous:
        return False
    location = mapped_byte_range(source)
    if location is None:
        return False
    path, offset, nbytes = location
    view = memoryview(target).cast("B")
    fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        while done < nbytes:  # pread may return less than asked (signals, huge reads)
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                raise OSError(f"{path} ended after {offset + done} bytes; expected {offset + nbytes}")
            done += n
    finally:
        os.close(fd)
    return True
