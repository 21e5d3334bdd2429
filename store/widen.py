"""Gather rows of a 16-bit float matrix into float32 in one pass, where the compiled kernel can.

The loader's CPU batches are float32 rows gathered from float16 or bfloat16 group buffers. In
Python that is two passes: np.take into a stored-dtype scratch, then torch's conversion of it
(numpy gathers but converts float16 without SIMD; torch converts fast but does not gather into
another dtype). store/_widen.c reads each row once and writes it once (float16 through the F16C
instructions, bfloat16 by a shift): bench/loader_throughput.py measures both paths side by side.

The kernel is an optional part of the install (pyproject.toml): where it was not compiled, or
the CPU has no F16C for float16, `take_widen` returns False and the caller gathers in Python.
SAEFLOW_PYTHON_GATHER=1 makes that choice for the whole process (the bench's baseline, and the
tests of the Python path on machines that have the kernel).
"""

from __future__ import annotations

import os

import numpy as np
import torch

try:
    from store import _widen
except ImportError:  # not compiled here: the install skipped the optional extension
    _widen = None

PYTHON_GATHER_ENV = "SAEFLOW_PYTHON_GATHER"  # "1": the Python gather, kernel or not
_F16C = bool(_widen is not None and _widen.converts_f16())
_WIDENS = {np.dtype(np.float16): _F16C, np.dtype(np.uint16): True}  # uint16: bfloat16 bits (store/dtypes.py)


def _python_gather_forced() -> bool:
    return os.environ.get(PYTHON_GATHER_ENV) == "1"  # read per call: the bench switches it in one process


def kernel_in_use(stored: np.dtype) -> bool:
    """Whether rows stored as `stored` (bfloat16 as uint16 bits) are widened by the kernel here."""
    return _widen is not None and not _python_gather_forced() and _WIDENS.get(np.dtype(stored), False)


def describe(stored: np.dtype) -> str:
    """For logs: how float32 batches of rows stored as `stored` are gathered in this process."""
    if kernel_in_use(stored):
        return "gathered and widened to float32 in one pass (store/_widen.c)"
    python = "gathered by np.take, then converted by torch"
    if _widen is None:
        return f"{python} (the compiled kernel was not built in this install)"
    if _python_gather_forced():
        return f"{python} ({PYTHON_GATHER_ENV}=1)"
    if np.dtype(stored) == np.float16:
        return f"{python} (this CPU has no F16C instructions)"
    return f"{python} (no one-pass kernel for {np.dtype(stored)})"


def take_widen(source: np.ndarray, rows: np.ndarray, target: torch.Tensor) -> bool:
    """target[:] = float32(source[rows]) in one pass; False (nothing written) where the kernel
    does not apply: no kernel, a dtype it does not widen, or a target that is not contiguous
    float32 CPU memory."""
    if target.dtype != torch.float32 or not target.is_contiguous() or target.device.type != "cpu":
        return False
    if not kernel_in_use(source.dtype) or not source.flags.c_contiguous:
        return False
    bfloat16 = source.dtype != np.float16
    _widen.take_widen(source, np.ascontiguousarray(rows, dtype=np.int64), target.numpy(), bfloat16)
    return True
