"""One batch handed to the writer, checked and converted to the stored dtypes on the host.

Activations are cast on their own device (a GPU casts for free) and only then copied; values the
store dtype cannot hold are refused here, before anything of the batch reaches a chunk.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from store.dtypes import TORCH_DTYPES, as_stored_numpy
from store.format import TOKEN_ARRAYS, StoreError, acts_path


def stored_rows(
    layout: Mapping[str, tuple[int, str]],
    acts: Mapping[str, torch.Tensor | np.ndarray],
    token_arrays: Mapping[str, torch.Tensor | np.ndarray],
    label: str,
) -> dict[str, np.ndarray]:
    """{array path: host array} for n rows: acts[hook] (n, d) per hook of `layout` ({hook: (d,
    store dtype)}) and the (n,) tokens/doc/pos. Raises StoreError naming the hook and `label`."""
    if set(acts) != set(layout):
        raise StoreError(f"put() needs rows for exactly the hooks {sorted(layout)}; got {sorted(acts)}")
    rows = {name: _host(token_arrays[name], dtype) for name, dtype in TOKEN_ARRAYS.items()}
    n = len(rows["tokens"])
    for name in TOKEN_ARRAYS:
        if rows[name].shape != (n,):
            raise StoreError(f"{name}: got shape {tuple(rows[name].shape)}, expected ({n},) like tokens")
    for hook, (d, store_dtype) in layout.items():
        values = _cast(acts[hook], store_dtype, hook, label)
        if values.shape != (n, d):
            raise StoreError(f"hook {hook!r}: got rows of shape {tuple(values.shape)}, expected ({n}, {d})")
        rows[acts_path(hook)] = values
    return rows


def _host(values: torch.Tensor | np.ndarray, dtype: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values).astype(dtype, copy=False)


def _cast(values: torch.Tensor | np.ndarray, store_dtype: str, hook: str, label: str) -> np.ndarray:
    """(n, d) values in the store dtype on the host; refuses NaN/inf and float16 overflow."""
    tensor = torch.as_tensor(values).detach()
    converted = tensor.to(TORCH_DTYPES[store_dtype])
    if not bool(torch.isfinite(converted).all()):
        if bool(torch.isfinite(tensor).all()):
            peak = float(tensor.abs().max())
            raise StoreError(
                f"activations of hook {hook!r} in {label} reach {peak:.4g}, beyond {store_dtype}'s range; "
                "set generate.store_dtype to bfloat16 or float32"
            )
        bad = int((~torch.isfinite(tensor)).sum())
        raise StoreError(
            f"activations of hook {hook!r} in {label} contain {bad} NaN/inf values; nothing of this batch "
            "was committed: check the model's dtype (try model.dtype float32) and its weights"
        )
    return as_stored_numpy(converted.cpu())
