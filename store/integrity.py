"""Whether a store's metadata agree with its manifest: counts, arrays, dtypes, chunking.

Shared by StoreReader, which refuses to open a store that fails these checks (before any row is
read), and by validate, which also recomputes every chunk checksum.
"""

from __future__ import annotations

import math

import numpy as np
import zarr

from store.dtypes import STORE_DTYPES
from store.format import TOKEN_ARRAYS, acts_path, checksum_path, data_array_paths

REQUIRED_KEYS = ("hook_points", "chunk_rows", "n_chunks", "n_rows", "complete", "checksum_algorithm", "cursor")


def manifest_problems(manifest: dict) -> list[str]:
    """What is wrong with the manifest's own counts ([] = they agree)."""
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    if missing:
        return [f"manifest lacks {', '.join(missing)}"]
    try:
        rows, chunks, chunk_rows = int(manifest["n_rows"]), int(manifest["n_chunks"]), int(manifest["chunk_rows"])
        hooks = {hook: (int(info["d"]), STORE_DTYPES[info["dtype"]]) for hook, info in manifest["hook_points"].items()}
    except (TypeError, ValueError, KeyError, AttributeError) as error:
        return [f"manifest values are malformed ({type(error).__name__}: {error})"]
    if not hooks:
        return ["manifest lists no hook points"]
    if chunk_rows <= 0 or rows < 0 or chunks < 0:
        return [f"manifest counts are invalid (chunk_rows {chunk_rows}, n_rows {rows}, n_chunks {chunks})"]
    if chunks != math.ceil(rows / chunk_rows):
        return [f"manifest says {chunks} chunks for {rows} rows of {chunk_rows}; expected {math.ceil(rows / chunk_rows)}"]
    if not manifest["complete"] and rows != chunks * chunk_rows:
        return [f"incomplete store ends with a short chunk ({rows} rows in {chunks} chunks of {chunk_rows})"]
    return []


def layout_problems(group: zarr.Group, manifest: dict) -> list[str]:
    """Where the arrays' metadata disagree with the manifest: missing arrays, dtypes, widths,
    chunking, row counts ([] = they agree). Reads metadata only: cheap enough for every open."""
    rows, chunk_rows = int(manifest["n_rows"]), int(manifest["chunk_rows"])
    problems = []
    expected = {acts_path(h): (int(info["d"]), STORE_DTYPES[info["dtype"]]) for h, info in manifest["hook_points"].items()}
    expected.update({name: (None, dtype) for name, dtype in TOKEN_ARRAYS.items()})
    for array_path in data_array_paths(manifest):
        try:
            array = group[array_path]
            sums = group[checksum_path(array_path)]
        except (KeyError, ValueError, TypeError) as error:  # absent or unreadable zarr.json
            problems.append(f"{array_path}: array metadata missing or unreadable ({type(error).__name__}: {error})")
            continue
        d, dtype = expected[array_path]
        shape = (rows, d) if d is not None else (rows,)
        if array.dtype != np.dtype(dtype):
            problems.append(f"{array_path}: dtype {array.dtype}, manifest says {np.dtype(dtype)}")
        if array.shape[1:] != shape[1:] or array.chunks[0] != chunk_rows:
            problems.append(f"{array_path}: shape {array.shape} chunks {array.chunks}, expected (N, {d}) in chunks of {chunk_rows}")
        if array.shape[0] < rows or (manifest["complete"] and array.shape[0] != rows):
            problems.append(f"{array_path}: {array.shape[0]} rows, manifest commits {rows}")
        if sums.shape[0] < int(manifest["n_chunks"]):
            problems.append(f"{checksum_path(array_path)}: {sums.shape[0]} entries for {manifest['n_chunks']} chunks")
    return problems
