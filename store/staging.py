"""Where builder threads gather each batch, and how a finished batch reaches the consumer.

Rows are gathered in the stored dtype with np.take (one thread per call, GIL released).

- CPU (`HostBatches`): a builder also converts to the training dtype, so the consumer (the
  training loop) only receives finished tensors. The conversion runs in pieces below torch's
  parallel grain size: each piece runs on the calling thread and never starts an OpenMP team,
  which stalls badly when cores are busy and would compete with the trainer's intra-op threads.
  Batch memory comes from numpy, whose allocator reuses freed pages (torch.empty of a multi-MB
  tensor returns fresh pages that fault on first write).
- CUDA (`DeviceBatches`): batches are gathered into a small pool of (pinned) staging buffers; the
  consumer copies the stored dtype (half the bytes of float32) with non_blocking and converts on
  the device. A buffer goes back to the pool with an event recorded after its copy, and the
  planner waits on that event before reusing it. Pinned memory is allocated once.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from store.dtypes import as_stored_numpy, empty_host

_POLL_S = 0.1  # how often a blocked producer checks whether the consumer went away
_GRAIN = 32_768  # at::internal::GRAIN_SIZE: elementwise ops below it run on the calling thread


def convert_on_this_thread(source: torch.Tensor, target: torch.Tensor) -> None:
    """target.copy_(source) (with dtype conversion) in row blocks that stay on the calling thread."""
    rows = max(1, (_GRAIN - 1) // max(1, source.shape[1]))
    for piece, part in zip(target.split(rows), source.split(rows)):  # split: all views in one call
        piece.copy_(part)


@dataclass
class _HostBatch:
    arrays: list[np.ndarray]  # where the rows are gathered (stored dtype)
    tensors: list[torch.Tensor]  # the same memory as tensors


class HostBatches:
    """CPU batches, finished (converted) by a builder thread."""

    def __init__(self, batch_size: int, widths: list[int], stored: list[torch.dtype], out: list[torch.dtype]):
        self.shapes = [(batch_size, d) for d in widths]
        self.stored, self.out_dtypes = stored, out

    def begin(self, stop: threading.Event) -> _HostBatch:
        # Rows whose dtype already matches are gathered straight into the batch tensor; others
        # into a stored-dtype buffer converted in finish.
        tensors = [empty_host(shape, dtype) for shape, dtype in zip(self.shapes, self.stored)]
        return _HostBatch([as_stored_numpy(t) for t in tensors], tensors)

    def finish(self, handle: _HostBatch, rows: int) -> list[torch.Tensor]:
        out = []
        for gathered, dtype in zip(handle.tensors, self.out_dtypes):
            if gathered.dtype != dtype:
                converted = empty_host((rows, gathered.shape[1]), dtype)
                convert_on_this_thread(gathered[:rows], converted)
                gathered = converted
            out.append(gathered[:rows])
        return out

    def deliver(self, item: list[torch.Tensor]) -> list[torch.Tensor]:
        return item


@dataclass
class _Staging:
    tensors: list[torch.Tensor]  # stored dtype (bfloat16 for bfloat16 stores)
    arrays: list[np.ndarray]  # the same memory as numpy
    copied: torch.cuda.Event | None = field(default=None)  # recorded after a non_blocking copy


class DeviceBatches:
    """Device batches: gathered into pooled (pinned) buffers, copied and converted by the consumer."""

    def __init__(
        self, pool_size: int, batch_size: int, widths: list[int], stored: list[torch.dtype],
        out: list[torch.dtype], device: torch.device, pinned: bool,
    ):
        self.out_dtypes, self.device, self.pinned = out, device, pinned
        self._free: queue.Queue[_Staging] = queue.Queue()
        for _ in range(pool_size):
            tensors = [torch.empty(batch_size, d, dtype=s, pin_memory=pinned) for d, s in zip(widths, stored)]
            self._free.put(_Staging(tensors, [as_stored_numpy(t) for t in tensors]))

    def begin(self, stop: threading.Event) -> _Staging | None:
        while not stop.is_set():
            try:
                staging = self._free.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            if staging.copied is not None:
                staging.copied.synchronize()  # the previous batch's copy has left this buffer
                staging.copied = None
            return staging
        return None

    def finish(self, staging: _Staging, rows: int) -> tuple[_Staging, int]:
        return staging, rows

    def deliver(self, item: tuple[_Staging, int]) -> list[torch.Tensor]:
        staging, rows = item
        # copy=True: the buffer is reused, so even a same-device "move" must not alias it.
        moved = [t[:rows].to(self.device, non_blocking=self.pinned, copy=True) for t in staging.tensors]
        if self.pinned and self.device.type == "cuda":
            staging.copied = torch.cuda.Event()
            staging.copied.record(torch.cuda.current_stream(self.device))
        self._free.put(staging)
        return [m.to(dtype) for m, dtype in zip(moved, self.out_dtypes)]
