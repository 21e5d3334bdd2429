"""Verify a store against its manifest: layout, shapes, counts, per-chunk checksums, statistics.

`validate_store(path)` returns one line per problem ([] = the store is sound) and names each bad
chunk, so a damaged store can be repaired by regenerating from before the first bad chunk.
"""

from __future__ import annotations

from pathlib import Path

from store.location import StoreLocation, locate
from store.format import TOKEN_ARRAYS, ChunkError, checksum_path, data_array_paths, open_store_group, read_manifest, stats_path
from store.integrity import layout_problems, manifest_problems
from store.reader import CHECKSUM_MISMATCH, StoreReader
from store.recorded_stats import STATS_ARRAYS, stats_problems


def validate_store(path: str | Path | StoreLocation) -> list[str]:
    """Problems found in the store at `path`; raises StoreError if it is not a readable store."""
    path = locate(path)
    group = open_store_group(path)
    manifest = read_manifest(path, group)
    problems = manifest_problems(manifest) or layout_problems(group, manifest)
    if problems:
        return problems  # checksums of a store with the wrong layout would only repeat them
    problems += _checksum_problems(path)
    for hook in manifest["hook_points"]:
        problems += stats_problems(group, manifest, hook)
    stats = manifest.get("stats") or {}
    if manifest["complete"] and stats.get("rows") != manifest["n_rows"]:
        problems.append(f"statistics cover {stats.get('rows')} rows of a complete store of {manifest['n_rows']}")
    return problems


def _checksum_problems(path: StoreLocation) -> list[str]:
    """Every chunk read as training reads it (verified), one line per unreadable chunk and one per
    array listing the chunks whose bytes no longer match their checksums."""
    reader = StoreReader(path)
    problems = []
    for array_path in reader.manifest.array_paths:
        name = array_path if array_path in TOKEN_ARRAYS else array_path.removeprefix("acts/")
        mismatched = []
        for index in range(reader.n_chunks):
            try:
                reader.read_chunk(name, index)
            except ChunkError as error:
                if error.reason == CHECKSUM_MISMATCH:
                    mismatched.append(index)
                else:
                    problems.append(f"{array_path} chunk {index}: {error.reason}")
        if mismatched:
            shown = ", ".join(map(str, mismatched[:20])) + (f" (+{len(mismatched) - 20} more)" if len(mismatched) > 20 else "")
            problems.append(f"{array_path}: checksum mismatch in chunk(s) {shown} of {reader.n_chunks}")
    return problems


def compare_stores(a: str | Path | StoreLocation, b: str | Path | StoreLocation, ignore: tuple[str, ...] = ("created", "updated")) -> list[str]:
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
    group_a, group_b = open_store_group(a), open_store_group(b)
    rows, chunks = int(first["n_rows"]), int(first["n_chunks"])
    paths = [(p, rows) for p in data_array_paths(first)] + [(checksum_path(p), chunks) for p in data_array_paths(first)]
    if first.get("stats"):
        paths += [(f"{stats_path(hook)}/{name}", None) for hook in first["hook_points"] for name in STATS_ARRAYS]
    for array_path, stop in paths:
        left, right = group_a[array_path][:stop], group_b[array_path][:stop]
        if left.shape != right.shape or left.tobytes() != right.tobytes():
            differences.append(f"{array_path} differs")
    return differences
