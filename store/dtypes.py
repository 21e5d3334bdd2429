"""The one map of dtype names to numpy and torch dtypes, and the bfloat16 bit-pattern views.

zarr 3.1 has no bfloat16: bfloat16 activations are stored as their uint16 bit patterns, and numpy
has no bfloat16 either, so a bfloat16 tensor crosses to numpy (and back) as a uint16 view of the
same memory. Every such crossing goes through `as_stored_numpy` / `from_stored_numpy`.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

# What raw chunk bytes hold, per store dtype.
STORE_DTYPES = {"float16": "<f2", "bfloat16": "<u2", "float32": "<f4"}
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def numpy_dtype(store_dtype: str) -> np.dtype:
    """The dtype that raw chunk bytes hold; bfloat16 is read as uint16 bit patterns."""
    return np.dtype(STORE_DTYPES[store_dtype])


def torch_dtype(value: str | torch.dtype) -> torch.dtype:
    """A torch dtype from itself or its name ("float32", "torch.bfloat16")."""
    if isinstance(value, torch.dtype):
        return value
    name = str(value).removeprefix("torch.")
    if name not in TORCH_DTYPES:
        raise ValueError(f"unknown dtype {value!r}; use one of {sorted(TORCH_DTYPES)}")
    return TORCH_DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def as_stored_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor in the stored layout (bfloat16 as its uint16 bits)."""
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()


def from_stored_numpy(rows: np.ndarray, store_dtype: str) -> torch.Tensor:
    """A CPU tensor of stored rows without a dtype conversion (bfloat16 bits reinterpreted).

    Read-only memmapped rows stay read-only: torch would warn that it cannot mark the tensor so,
    and callers only read these tensors (or convert them, which copies)."""
    rows = np.ascontiguousarray(rows)
    if store_dtype == "bfloat16":
        rows = rows.view(np.int16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the read-only warning
        tensor = torch.from_numpy(rows)
    return tensor.view(torch.bfloat16) if store_dtype == "bfloat16" else tensor


def empty_host(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized CPU tensor allocated by numpy (a gather into torch.empty's fresh pages
    cost 40-100% more here)."""
    if dtype == torch.bfloat16:
        return torch.from_numpy(np.empty(shape, dtype=np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.empty(shape, dtype=torch.empty(0, dtype=dtype).numpy().dtype))
