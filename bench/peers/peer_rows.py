"""Training rows for the peer adapters: a raw float16 (N, d) .npy, read in the given order.

Rows are consumed as contiguous batches [i*B, (i+1)*B), wrapping around N when a run asks for
more tokens than the file holds, so every tool sees the same rows in the same order.
"""

from __future__ import annotations

import numpy as np
import torch


def load_rows(path: str, rows_needed: int) -> np.ndarray:
    """The first min(N, rows_needed) rows, copied into RAM so disk reads stay out of the timing."""
    acts = np.load(path, mmap_mode="r", allow_pickle=False)
    if acts.ndim != 2 or acts.dtype != np.dtype("<f2"):
        raise ValueError(f"{path}: expected a 2-D little-endian float16 array, got {acts.dtype} {acts.shape}")
    return np.array(acts[: min(len(acts), rows_needed)])  # a copy: the slice of a memmap is lazy


def batch_rows(rows: np.ndarray, step: int, batch_size: int) -> np.ndarray:
    """Rows of batch `step`, wrapping around the end of `rows`."""
    start = (step * batch_size) % len(rows)
    stop = start + batch_size
    if stop <= len(rows):
        return rows[start:stop]
    return np.concatenate([rows[start:], rows[: stop - len(rows)]])


def batch_tensor(rows: np.ndarray, step: int, batch_size: int) -> torch.Tensor:
    """Batch `step` as float32, the dtype both peers train in."""
    return torch.from_numpy(batch_rows(rows, step, batch_size)).float()
