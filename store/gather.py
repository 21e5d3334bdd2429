"""One-pass row gathers by the compiled kernel (store/_gather.c), where the install built it.

The loader's batches are rows gathered in a random order, delivered in the stored dtype (the
CUDA path) or widened to float32 (CPU training). In Python that takes numpy and torch: np.take
into a stored-dtype scratch, then torch's conversion of it (numpy converts float16 without SIMD;
torch does not gather into another dtype), one source array per call. The kernel reads each row
once and writes it once, copied or widened (float16 through the F16C instructions, bfloat16 by a
shift), and takes rows from many sources in one call. The loader uses it twice:
- `take_widen`: a float32 batch gathered from a group buffer of 16-bit rows;
- `take_from`: a batch gathered straight from the kept chunk maps of a shuffle group, so the
  group's rows are never copied into a group buffer first (store/producer.py): where
  `gathers_from_maps` says the kernel can deliver the batch dtype.
bench/loader_throughput.py measures the kernel's paths against the Python gather side by side.

The kernel is an optional part of the install (pyproject.toml): where it was not compiled, or
the CPU has no F16C for float16, the loader gathers in Python from group buffers.
SAEFLOW_PYTHON_GATHER=1 makes that choice for the whole process (the bench's baseline, and the
tests of the Python path on machines that have the kernel).
"""

from __future__ import annotations

import os

import numpy as np
import torch

try:
    from store import _gather
except ImportError:  # not compiled here: the install skipped the optional extension
    _gather = None

PYTHON_GATHER_ENV = "SAEFLOW_PYTHON_GATHER"  # "1": the Python gather, kernel or not
_COPY, _WIDEN_F16, _WIDEN_BF16 = 0, 1, 2  # the kernel's modes
_F16C = bool(_gather is not None and _gather.converts_f16())
_WIDEN_MODES = {np.dtype(np.float16): _WIDEN_F16, np.dtype(np.uint16): _WIDEN_BF16}  # uint16: bfloat16 bits


def _python_gather_forced() -> bool:
    return os.environ.get(PYTHON_GATHER_ENV) == "1"  # read per call: the bench switches it in one process


def _mode(stored: np.dtype, out: torch.dtype | None) -> int | None:
    """The kernel's mode for rows stored as `stored` delivered as `out` (None: as stored), or
    None where the kernel cannot do it here (the switch aside: see _chosen_mode)."""
    if _gather is None:
        return None
    if out is None:
        return _COPY
    mode = _WIDEN_MODES.get(np.dtype(stored)) if out == torch.float32 else None
    return None if mode == _WIDEN_F16 and not _F16C else mode


def _chosen_mode(stored: np.dtype, out: torch.dtype | None) -> int | None:
    """_mode, unless SAEFLOW_PYTHON_GATHER=1 asks for the Python gather."""
    return None if _python_gather_forced() else _mode(stored, out)


def kernel_in_use(stored: np.dtype) -> bool:
    """Whether rows stored as `stored` (bfloat16 as uint16 bits) are widened by the kernel here."""
    return _chosen_mode(stored, torch.float32) is not None


def gathers_from_maps(stored: np.dtype, out: torch.dtype | None) -> bool:
    """Whether a loader starting now gathers batches of `out` (None: the stored dtype) with
    `take_from`; a loader keeps its choice for its life."""
    return _chosen_mode(stored, out) is not None


def describe(stored: np.dtype, out: torch.dtype | None, from_maps: bool) -> str:
    """For logs: how batches of rows stored as `stored` (delivered as `out`, None: as stored) are
    gathered in this process, from the kept chunk maps or from group buffers."""
    into = "" if out is None else f" and widened to {str(out).removeprefix('torch.')}"
    if from_maps:
        return f"gathered straight from the kept chunk maps{into} in one pass (store/_gather.c)"
    if out is not None and _chosen_mode(stored, out) is not None:
        return f"gathered from the group buffers{into} in one pass (store/_gather.c)"
    python = "gathered by np.take from the group buffers" + (", then converted by torch" if out is not None else "")
    if _gather is None:
        return f"{python} (the compiled kernel was not built in this install)"
    if _python_gather_forced():
        return f"{python} ({PYTHON_GATHER_ENV}=1)"
    if out is None:
        return python
    if np.dtype(stored) == np.float16 and out == torch.float32:
        return f"{python} (this CPU has no F16C instructions)"
    return f"{python} (no one-pass kernel to {out})"


def _target_mode(stored: np.dtype, target: np.ndarray | torch.Tensor) -> int | None:
    """_mode for gathering into `target` (a numpy array of the stored dtype, or a tensor)."""
    if isinstance(target, np.ndarray):
        return _mode(stored, None) if target.dtype == stored and target.flags.c_contiguous else None
    if not target.is_contiguous() or target.device.type != "cpu":
        return None
    return _mode(stored, target.dtype)


def _as_array(target: np.ndarray | torch.Tensor) -> np.ndarray:
    return target if isinstance(target, np.ndarray) else target.numpy()


def take_widen(source: np.ndarray, rows: np.ndarray, target: torch.Tensor) -> bool:
    """target[:] = float32(source[rows]) in one pass; False (nothing written) where the kernel
    does not apply: no kernel, a dtype it does not widen, or a target that is not contiguous
    float32 CPU memory."""
    if isinstance(target, np.ndarray) or not source.flags.c_contiguous or _python_gather_forced():
        return False
    mode = _target_mode(source.dtype, target)
    if mode is None or mode == _COPY:
        return False
    _gather.take((source,), None, np.ascontiguousarray(rows, dtype=np.int64), target.numpy(), mode)
    return True


def take_from(sources: tuple[np.ndarray, ...], which: np.ndarray, rows: np.ndarray,
              target: np.ndarray | torch.Tensor) -> None:
    """target[i] = sources[which[i]][rows[i]], copied or widened to the target's dtype in one
    pass; every index is checked before anything is written (IndexError). Only for what
    `gathers_from_maps` accepts."""
    mode = _target_mode(sources[0].dtype, target)
    if mode is None:
        raise TypeError(f"no one-pass gather of {sources[0].dtype} rows into {target.dtype} here")
    _gather.take(sources, np.ascontiguousarray(which, dtype=np.int64), np.ascontiguousarray(rows, dtype=np.int64),
                 _as_array(target), mode)
