"""Keep large allocations in the process heap (glibc), for CPU training and generate.

CPU training allocates and frees several (batch, d_sae) tensors a step (48 MiB each at 4096 x
3072), and the LM forward of generate its (batch, context, d_mlp) activations every batch. glibc
serves blocks above its mmap threshold (32 MiB at most) with fresh mmaps and unmaps them on
free, so every step page-faults and zeroes them again: elementwise passes over them ran 2-5x
slower than on reused memory (bench/train_throughput.py), and the MiniLM forward paid ~60k minor
faults a batch (bench/generate_overhead.py). Here the process keeps such blocks in its heap (no
mmap for allocations, no trimming of the heap's top below 2 GiB), so a freed block is reused by
the next step. Process-wide and harmless beyond holding on to the peak heap.
"""

from __future__ import annotations

import ctypes
import sys


def keep_large_blocks_in_heap() -> bool:
    """Apply the setting; False where it does not apply (not Linux/glibc: no mallopt)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))
