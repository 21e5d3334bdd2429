"""Verify a store against its manifest: layout, shapes, counts, per-chunk checksums, statistics.

`validate_store(path)` returns one line per problem ([] = the store is sound) and names each bad
chunk, so a damaged store can be repaired by regenerating from before the first bad chunk.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import zarr

from store.dtypes import STORE_DTYPES
from store.format import (
    TOKEN_ARRAYS,
    acts_path,
    checksum_path,
    chunk_checksum,
    data_array_paths,
    read_manifest,
    stats_path,
)
from store.reader import StoreReader
from store.recorded_stats import STATS_ARRAYS, stats_problems

REQUIRED_KEYS = ("hook_points", "chunk_rows", "n_chunks", "n_rows", "complete", "checksum_algorithm", "cursor")


def validate_store(path: str | Path) -> list[str]:
    """Problems found in the store at `path`; raises StoreError if it is not a readable store."""
    path = Path(path)
    manifest = read_manifest(path)
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    if missing:
        return [f"manifest lacks {', '.join(missing)}"]
    group = zarr.open_group(str(path), mode="r")
    problems = _count_problems(manifest)
    problems += _layout_problems(group, manifest)
    if problems:
        return problems  # checksums of a store with the wrong layout would only repeat them
    problems += _checksum_problems(path, group, manifest)
    for hook in manifest["hook_points"]:
        problems += stats_problems(group, manifest, hook)
    stats = manifest.get("stats") or {}
    if manifest["complete"] and stats.get("rows") != manifest["n_rows"]:
        problems.append(f"statistics cover {stats.get('rows')} rows of a complete store of {manifest['n_rows']}")
    return problems


def _count_problems(manifest: dict) -> list[str]:
    rows, chunks, chunk_rows = int(manifest["n_rows"]), int(manifest["n_chunks"]), int(manifest["chunk_rows"])
    if chunk_rows <= 0 or rows < 0 or chunks < 0:
        return [f"manifest counts are invalid (chunk_rows {chunk_rows}, n_rows {rows}, n_chunks {chunks})"]
    if chunks != math.ceil(rows / chunk_rows):
        return [f"manifest says {chunks} chunks for {rows} rows of {chunk_rows}; expected {math.ceil(rows / chunk_rows)}"]
    if not manifest["complete"] and rows != chunks * chunk_rows:
        return [f"incomplete store ends with a short chunk ({rows} rows in {chunks} chunks of {chunk_rows})"]
    return []


def _layout_problems(group: zarr.Group, manifest: dict) -> list[str]:
    rows, chunk_rows = int(manifest["n_rows"]), int(manifest["chunk_rows"])
    problems = []
    expected = {acts_path(h): (int(info["d"]), STORE_DTYPES[info["dtype"]]) for h, info in manifest["hook_points"].items()}
    expected.update({name: (None, dtype) for name, dtype in TOKEN_ARRAYS.items()})
    for array_path in data_array_paths(manifest):
        try:
            array = group[array_path]
            sums = group[checksum_path(array_path)]
        except KeyError as error:
            problems.append(f"{array_path}: array missing ({error})")
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


def _checksum_problems(path: Path, group: zarr.Group, manifest: dict) -> list[str]:
    reader = StoreReader(path)
    algorithm = manifest["checksum_algorithm"]
    problems = []
    for array_path in data_array_paths(manifest):
        name = array_path if array_path in TOKEN_ARRAYS else array_path.removeprefix("acts/")
        recorded = group[checksum_path(array_path)][: reader.n_chunks]
        bad = []
        for index in range(reader.n_chunks):
            try:
                actual = chunk_checksum(reader.read_chunk(name, index), algorithm)
            except Exception as error:  # a truncated or undecodable chunk file
                problems.append(f"{array_path} chunk {index}: unreadable ({type(error).__name__}: {error})")
                continue
            if actual != int(recorded[index]):
                bad.append(index)
        if bad:
            shown = ", ".join(map(str, bad[:20])) + (f" (+{len(bad) - 20} more)" if len(bad) > 20 else "")
            problems.append(f"{array_path}: checksum mismatch in chunk(s) {shown} of {reader.n_chunks}")
    return problems


def compare_stores(a: str | Path, b: str | Path, ignore: tuple[str, ...] = ("created", "updated")) -> list[str]:
    """Differences between two stores' committed contents ([] = byte-identical data, checksums,
    statistics and manifests, apart from the manifest keys in `ignore`)."""
    first, second = read_manifest(a), read_manifest(b)
    differences = [
        f"manifest[{key!r}] differs"
        for key in sorted(set(first) | set(second))
        if key not in ignore and first.get(key) != second.get(key)
    ]
    if differences:
        return differences
    group_a, group_b = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    rows, chunks = int(first["n_rows"]), int(first["n_chunks"])
    paths = [(p, rows) for p in data_array_paths(first)] + [(checksum_path(p), chunks) for p in data_array_paths(first)]
    if first.get("stats"):
        paths += [(f"{stats_path(hook)}/{name}", None) for hook in first["hook_points"] for name in STATS_ARRAYS]
    for array_path, stop in paths:
        left, right = group_a[array_path][:stop], group_b[array_path][:stop]
        if left.shape != right.shape or left.tobytes() != right.tobytes():
            differences.append(f"{array_path} differs")
    return differences
