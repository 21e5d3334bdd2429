"""Where builder threads gather each batch, and how a finished batch reaches the consumer.

Rows are gathered by `gather_rows`, one thread per call with the GIL released: np.take, or the
compiled one-pass gather (store/gather.py) for float32 batches of 16-bit rows. (Under the global
shuffle, store/producer.py may gather straight from the kept chunk maps with that kernel
instead: the same targets, no group buffer.)

- CPU (`HostBatches`): builders gather straight into the training dtype, so the consumer (the
  training loop) only receives finished tensors. A converting gather never starts an OpenMP
  team (a team per builder thread would spin on the cores the readers and the trainer need):
  builder threads run with an OpenMP team of one (`serial_openmp_team`, threadpoolctl: the
  setting is the calling thread's own). A float32 gather of float16 or bfloat16 rows is one
  pass of the compiled gather-and-widen kernel where it was built (store/gather.py); otherwise
  one np.take into the thread's stored-dtype scratch and one conversion call. Where the team
  cannot be set to one (no OpenMP runtime found), that conversion works in blocks below torch's
  parallel grain size instead: slower (a torch call per ~40 rows), as correct. Batch memory
  comes from numpy, whose allocator reuses freed pages (torch.empty of a multi-MB tensor returns
  fresh pages that fault on first write).
- CUDA (`DeviceBatches`): batches are gathered into a small pool of (pinned) staging buffers; the
  consumer copies the stored dtype (half the bytes of float32) with non_blocking and converts on
  the device. A buffer goes back to the pool with an event recorded after its copy, and the
  planner waits on that event before reusing it. Pinned memory is allocated once.
"""

from __future__ import annotations

import queue
import sys
import threading
from dataclasses import dataclass, field

import numpy as np
import torch
from threadpoolctl import ThreadpoolController

from store.dtypes import STORE_DTYPES, as_stored_numpy, from_stored_numpy
from store.gather import take_widen

_POLL_S = 0.1  # how often a blocked producer checks whether the consumer went away
_GRAIN = 32_768  # at::internal::GRAIN_SIZE: elementwise ops below it run on the calling thread


def convert_on_this_thread(source: torch.Tensor, target: torch.Tensor) -> None:
    """target.copy_(source) (with dtype conversion) in row blocks that stay on the calling thread."""
    rows = max(1, (_GRAIN - 1) // max(1, source.shape[1]))
    for piece, part in zip(target.split(rows), source.split(rows)):  # split: all views in one call
        piece.copy_(part)


def serial_openmp_team() -> bool:
    """Make torch's elementwise ops on the calling thread run on that thread alone (its OpenMP
    team of one); other threads keep their teams. False where no OpenMP runtime was found."""
    torch.get_num_threads()  # torch sets a new thread's team size on first use: let it happen first
    ThreadpoolController().limit(limits=1, user_api="openmp")
    return torch.get_num_threads() == 1


_STORE_DTYPE_OF = {np.dtype(raw): name for name, raw in STORE_DTYPES.items()}  # bfloat16 bits are uint16
_scratch = threading.local()  # each builder thread's conversion scratch (_thread_scratch)


def gather_rows(source: np.ndarray, rows: np.ndarray | slice, target: np.ndarray | torch.Tensor) -> None:
    """target[:] = source[rows]. source holds stored rows (bfloat16 as uint16 bits); target is a
    numpy array of that dtype (a plain gather) or a tensor of another dtype (converted here)."""
    if isinstance(target, np.ndarray):
        if isinstance(rows, slice):
            np.copyto(target, source[rows])
        else:  # mode="clip" skips numpy's buffered bounds check (indices are in range)
            np.take(source, rows, axis=0, out=target, mode="clip")
        return
    if not isinstance(rows, slice) and take_widen(source, rows, target):  # one pass (store/gather.py)
        return
    store_dtype = _STORE_DTYPE_OF[source.dtype]
    serial = torch.get_num_threads() == 1  # a team of one: the whole part in one conversion call
    if isinstance(rows, slice):  # consecutive rows convert in place
        part = from_stored_numpy(source[rows], store_dtype)
        if serial:
            target.copy_(part)
        else:
            convert_on_this_thread(part, target)
        return
    if serial:
        scratch = _thread_scratch(source.dtype, len(rows), source.shape[1])
        np.take(source, rows, axis=0, out=scratch, mode="clip")
        target.copy_(from_stored_numpy(scratch, store_dtype))
        return
    block = max(1, (_GRAIN - 1) // max(1, source.shape[1]))
    scratch = _thread_scratch(source.dtype, block, source.shape[1])  # a block: stays in cache
    tensor = from_stored_numpy(scratch, store_dtype)
    for index, piece in enumerate(target.split(block)):  # split: all views in one call
        n = piece.shape[0]
        np.take(source, rows[index * block : index * block + n], axis=0, out=scratch[:n], mode="clip")
        piece.copy_(tensor[:n])


def _thread_scratch(dtype: np.dtype, rows: int, width: int) -> np.ndarray:
    """(rows, width) of this thread's scratch, kept for its largest part so far (one batch)."""
    kept = getattr(_scratch, "rows", None)
    if kept is None or kept.dtype != dtype or kept.shape[1] != width or kept.shape[0] < rows:
        _scratch.rows = kept = np.empty((rows, width), dtype=dtype)
    return kept[:rows]


@dataclass
class _HostBatch:
    targets: list[np.ndarray | torch.Tensor]  # gather_rows' targets: numpy views in the stored dtype, or tensors


class _BatchMemory:
    """Batch memory handed out again once nothing but this pool references it.

    A fresh multi-MB array is fresh pages: the kernel zeroes each on first write, 10-15% of the
    loader's CPU. A batch tensor made by torch.from_numpy holds a reference to its array until
    the tensor and every view of it are gone, so an array whose only reference is the pool's is
    free: no tensor the consumer still holds can see it change. The `size` newest sets are kept.

    All `size` sets are allocated here, by the thread that starts the iteration, not by the
    planner thread that takes them: glibc serves each thread from its own arena, and a new
    loader's planner did not get the arena holding the last loader's freed batches, so every
    loader faulted its batch memory in afresh (page zeroing was a sixth of a later loader's
    first-epoch CPU under perf)."""

    def __init__(self, shapes: list[tuple[int, int]], dtypes: list[torch.dtype], size: int):
        self.shapes, self.dtypes, self.size = shapes, dtypes, size
        self._sets: list[list[np.ndarray]] = [self._new_set() for _ in range(size)]

    def _new_set(self) -> list[np.ndarray]:
        return [np.empty(shape, dtype=_numpy_dtype(dtype)) for shape, dtype in zip(self.shapes, self.dtypes)]

    def take(self) -> list[torch.Tensor]:
        for arrays in self._sets:
            # references: the set's list, getrefcount's argument (the consumer's only add to these)
            if all(sys.getrefcount(arrays[i]) == 2 for i in range(len(arrays))):
                return [_tensor_of(array, dtype) for array, dtype in zip(arrays, self.dtypes)]
        arrays = self._new_set()
        if len(self._sets) >= self.size:  # all held: forget the oldest (its holder keeps it alive)
            self._sets.pop(0)
        self._sets.append(arrays)
        return [_tensor_of(array, dtype) for array, dtype in zip(arrays, self.dtypes)]


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """What numpy allocates a tensor of `dtype` as (bfloat16: int16 bits), as empty_host does."""
    return np.dtype(np.int16) if dtype == torch.bfloat16 else torch.empty(0, dtype=dtype).numpy().dtype


def _tensor_of(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if dtype == torch.bfloat16 else tensor


class HostBatches:
    """CPU batches, gathered in the training dtype by builder threads."""

    def __init__(self, batch_size: int, widths: list[int], stored: list[torch.dtype], out: list[torch.dtype], pool_size: int = 8):
        self.shapes = [(batch_size, d) for d in widths]
        self.stored, self.out_dtypes = stored, out
        self._memory = _BatchMemory(self.shapes, out, pool_size)

    def begin(self, stop: threading.Event) -> _HostBatch:
        # A numpy view of each batch tensor whose dtype is the stored one; the tensor itself
        # where the gather converts.
        tensors = self._memory.take()
        return _HostBatch([as_stored_numpy(t) if t.dtype == stored else t for t, stored in zip(tensors, self.stored)])

    def finish(self, handle: _HostBatch, rows: int) -> list[torch.Tensor]:
        out = []
        for target in handle.targets:
            tensor = from_stored_numpy(target, _STORE_DTYPE_OF[target.dtype]) if isinstance(target, np.ndarray) else target
            out.append(tensor[:rows])
        return out

    def deliver(self, item: list[torch.Tensor]) -> list[torch.Tensor]:
        return item


@dataclass
class _Staging:
    tensors: list[torch.Tensor]  # stored dtype (bfloat16 for bfloat16 stores)
    targets: list[np.ndarray]  # the same memory as numpy (gather_rows' targets)
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
