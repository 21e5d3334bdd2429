"""Build small real activation stores for tests, without the generate stage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

from store.dtypes import from_stored_numpy
from store.format import (
    TOKEN_ARRAYS,
    acts_path,
    checksum_path,
    chunk_checksum,
    create_store,
    data_array_paths,
    read_manifest,
    resize_rows,
    write_manifest,
)
from store.recorded_stats import save_stats
from store.moments import RunningMoments


def make_store(
    path: str | Path,
    rows_by_hook: dict[str, np.ndarray],
    chunk_rows: int,
    *,
    store_dtype: str = "float16",
    shard_chunks: int | None = None,
    compressor: str | None = None,
    recorded_stats_chunks: int | None = None,
    docs: np.ndarray | None = None,
) -> Path:
    """A committed store holding `rows_by_hook` (each (n, d); all hooks the same n).

    Values are written as given (cast to the stored dtype; for bfloat16 pass uint16 bit patterns).
    `tokens` holds the row index, so a test can trace every loaded row back to its position.
    `doc` holds `docs` (the document of each row; documents are consecutive rows), by default
    each row its own document.
    `recorded_stats_chunks` records generation statistics (stats/<hook>, as store/recorded_stats.py
    lays them out) over that many leading chunks, accumulated chunk by chunk from the stored values.
    """
    path = Path(path)
    n_rows = {rows.shape[0] for rows in rows_by_hook.values()}
    if len(n_rows) != 1:
        raise ValueError(f"all hooks need the same number of rows, got {n_rows}")
    (n,) = n_rows
    group = create_store(
        path,
        hook_dims={hook: rows.shape[1] for hook, rows in rows_by_hook.items()},
        store_dtype=store_dtype,
        chunk_rows=chunk_rows,
        capacity_rows=n,
        shard_chunks=shard_chunks,
        compressor=compressor,
        manifest={},
    )
    for hook, rows in rows_by_hook.items():
        array = group[acts_path(hook)]
        array[:n] = rows.astype(array.dtype)
    group["tokens"][:n] = np.arange(n, dtype=TOKEN_ARRAYS["tokens"])
    group["doc"][:n] = np.arange(n) if docs is None else np.asarray(docs)
    manifest = read_manifest(path)
    if recorded_stats_chunks is not None:
        manifest["stats"] = _record_stats(group, rows_by_hook, chunk_rows, recorded_stats_chunks, store_dtype, manifest)
    manifest["n_rows"] = n
    manifest["n_chunks"] = -(-n // chunk_rows)
    manifest["complete"] = True
    resize_rows(group, manifest, n)  # a complete store is trimmed to its rows, as the writer does
    for array_path in data_array_paths(manifest):  # the checksums verified reads compare against
        values = group[array_path][:n]
        sums = [chunk_checksum(values[start : start + chunk_rows], manifest["checksum_algorithm"])
                for start in range(0, n, chunk_rows)]
        group[checksum_path(array_path)][:] = np.array(sums, dtype="<u8")
    write_manifest(zarr.open_group(str(path), mode="r+"), manifest)
    return path


def _record_stats(group, rows_by_hook, chunk_rows, n_chunks, store_dtype, manifest) -> dict:
    rows = min(n_chunks * chunk_rows, next(iter(rows_by_hook.values())).shape[0])
    checksums = {}
    for hook, values in rows_by_hook.items():
        stored = from_stored_numpy(group[acts_path(hook)][:rows], store_dtype).double()
        moments = RunningMoments(values.shape[1])
        for start in range(0, rows, chunk_rows):
            moments.update(stored[start : start + chunk_rows])
        checksums[hook] = save_stats(group, hook, moments, manifest["checksum_algorithm"])
    return {"chunks": n_chunks, "rows": rows, "checksums": checksums}


def random_rows(n: int, d: int, seed: int = 0, dtype: type = np.float16) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(dtype)
