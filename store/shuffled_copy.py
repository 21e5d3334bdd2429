"""`saeflow shuffle`: a copy of a store whose training rows lie in one seeded random order.

Why: the loader's global shuffle (store/shuffle.py, single-row slices) takes every group's rows
from every chunk, so a cold epoch reads the whole store before its first batch, and a store
larger than the page cache is read again by every group. Rows shuffled once, offline, can be
read whole chunk by chunk (sequential reads, bench/loader_throughput.py) while batches still mix
as a global shuffle's do (tests/store/test_mixing.py): cache once, shuffle once, train many.

What the copy holds: the source's geometry, provenance and tokenizer; its held-out chunks (for
the given `heldout_chunks`, store/split.py) byte for byte, so evaluation reads the same rows and
LM windows as on the source; and in its training chunks every training row of the source
exactly once, in the order of a seeded permutation (store/permutation.py), each with its own
tokens/doc/pos. The manifest's "shuffled" entry names the source, its identity, the seed and the
split, held-out row ranges included (a held-out chunk's neighbours are no longer its documents'
rows, so the copy's split is read from the manifest, store/reader.py).

Rows are gathered a block of output chunks at a time out of the source's kept chunk maps: the
memory is one block; a source larger than the page cache is read once per block, and so is a
remote source without a local chunk cache (loader.cache_dir).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from store.dtypes import from_stored_numpy
from store.format import TOKEN_ARRAYS, StoreError, read_manifest
from store.location import StoreLocation, locate
from store.permutation import Permutation
from store.reader import StoreReader
from store.split import SHUFFLED_KEY, RowMap, RowRange, check_heldout_chunks, heldout_chunk_indices
from store.tokenizer import TOKENIZER_DIR, TOKENIZER_FILE
from store.writer import StoreWriter

_ROW_ORDER_STREAM = 11  # apart from the loader's streams (store/shuffle.py) and the split's
_WRITER_KEYS = {"format", "version", "hook_points", "chunk_rows", "shard_chunks", "compressor", "capacity_rows",
                "n_chunks", "n_rows", "complete", "checksum_algorithm", "stats", "cursor", "created", "updated"}


def shuffle_store(source: str | Path | StoreLocation, out: str | Path | StoreLocation, *, heldout_chunks: int, seed: int,
                  overwrite: bool = False, cache_dir: str | Path | None = None, block_chunks: int = 8,
                  progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Write the shuffled copy of `source` at `out` and return its manifest. A finished copy of
    the same shuffle (source identity, seed, split) is left alone; an unfinished one resumes after
    its last commit; anything else at `out` is refused, or replaced with overwrite=True.
    cache_dir: where a remote source's chunks are kept (store/chunk_cache.py); without one every
    block fetches every chunk again. progress(rows) is called after each block."""
    reader = StoreReader(source, cache_dir=cache_dir)  # verified reads: a damaged source chunk stops the copy
    manifest = reader.manifest
    if not manifest["complete"]:
        raise StoreError(f"store {reader.path} is not complete; finish it with `saeflow generate` before shuffling it")
    if manifest.get(SHUFFLED_KEY):
        raise StoreError(f"store {reader.path} is a shuffled copy already; shuffle its source, {manifest[SHUFFLED_KEY]['source']}")
    check_heldout_chunks(reader.n_chunks, heldout_chunks, str(reader.path))
    held = set(heldout_chunk_indices(reader.n_chunks, heldout_chunks))
    heldout = reader.split_ranges("heldout", heldout_chunks) if held else []
    rows_of = _TrainingRows(reader.split_ranges("train", heldout_chunks), seed)
    shuffled = {"source": str(reader.path), "source_identity": reader.identity(), "seed": seed,
                "heldout_chunks": heldout_chunks, "heldout_ranges": [[r.chunk, r.start, r.stop] for r in heldout]}
    out = locate(out)
    existing = _existing_copy(out, reader, shuffled, overwrite)
    if existing is not None and existing["complete"]:
        _copy_tokenizer(reader.path, out)  # a copy killed between its last commit and its tokenizer
        return existing
    writer = StoreWriter.open(out) if existing is not None else _create_copy(out, reader, shuffled)
    _copy_tokenizer(reader.path, out)
    start = writer.manifest.n_chunks  # a copy stopped part way resumes after its last commit
    rows_of.skip_to(start)
    with writer:
        for first in range(start, reader.n_chunks, block_chunks):
            chunks = range(first, min(first + block_chunks, reader.n_chunks))
            rows = [np.arange(*reader.chunk_bounds(c)) if c in held else rows_of.next(c) for c in chunks]
            block = np.concatenate(rows)
            acts = {hook: _gather(reader, hook, block) for hook in reader.hooks}
            columns = {name: _gather(reader, name, block) for name in TOKEN_ARRAYS}
            at = 0
            for chunk, chunk_rows in zip(chunks, map(len, rows)):  # one put per chunk: its commit is the resume point
                part = slice(at, at + chunk_rows)
                writer.put({hook: from_stored_numpy(values[part], reader.store_dtype(hook)) for hook, values in acts.items()},
                           **{name: values[part] for name, values in columns.items()}, cursor={"chunk": chunk},
                           label=f"rows of chunk {chunk}")
                at += chunk_rows
            if progress is not None:
                progress(len(block))
        final = writer.close(complete=True)
    return final


def _existing_copy(out: StoreLocation, reader: StoreReader, shuffled: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    """The manifest of this shuffle's copy at `out` (finished or not); None when `out` is free."""
    if out.is_empty():
        return None
    try:
        existing = read_manifest(out)
    except StoreError:
        existing = {}
    if _same_shuffle(existing.get(SHUFFLED_KEY), shuffled):
        return existing
    if not overwrite:
        raise StoreError(f"{out} already exists and is not this shuffle of {reader.path} (its identity, seed and "
                         "split); pass --overwrite to replace it, or choose another --out")
    out.remove()
    return None


def _same_shuffle(recorded: dict[str, Any] | None, wanted: dict[str, Any]) -> bool:
    """The same source content, seed and split; where the source lives is no part of it (a moved
    store is the same store)."""
    return recorded is not None and all(recorded.get(key) == value for key, value in wanted.items() if key != "source")


def _create_copy(out: StoreLocation, reader: StoreReader, shuffled: dict[str, Any]) -> StoreWriter:
    manifest = reader.manifest
    return StoreWriter.create(
        out, hook_dims={hook: reader.d(hook) for hook in reader.hooks}, chunk_rows=reader.chunk_rows,
        capacity_rows=reader.n_rows, store_dtype=reader.store_dtype(reader.hooks[0]),
        shard_chunks=manifest.get("shard_chunks"), compressor=manifest.get("compressor"),
        manifest={**{k: v for k, v in manifest.items() if k not in _WRITER_KEYS}, SHUFFLED_KEY: shuffled},
    )


class _TrainingRows:
    """Store rows of the permuted training sequence, handed out in the sizes of the training
    chunks they fill (the copy's training chunks are the source's, so the sizes add up)."""

    def __init__(self, train: list[RowRange], seed: int):
        self.store_rows = RowMap(train).store_rows  # index in the training sequence -> store row
        self.sizes = {r.chunk: r.rows for r in train}
        self.order = Permutation(sum(self.sizes.values()), [seed, _ROW_ORDER_STREAM])
        self.position = 0

    def skip_to(self, chunk: int) -> None:
        """Start at output chunk `chunk` (the rows of the training chunks before it are written)."""
        self.position = sum(size for c, size in self.sizes.items() if c < chunk)

    def next(self, chunk: int) -> np.ndarray:
        """The store rows that fill training chunk `chunk` of the copy."""
        picked = self.order(np.arange(self.position, self.position + self.sizes[chunk], dtype=np.int64))
        self.position += self.sizes[chunk]
        return self.store_rows(picked)


def _gather(reader: StoreReader, name: str, rows: np.ndarray) -> np.ndarray:
    """The values of array `name` at store `rows` (in that order), one take per source chunk."""
    order = np.argsort(rows, kind="stable")
    ordered = rows[order]
    chunk_of = ordered // reader.chunk_rows
    edges = np.flatnonzero(np.diff(chunk_of)) + 1
    out = None
    for lo, hi in zip([0, *edges.tolist()], [*edges.tolist(), len(ordered)]):
        chunk = int(chunk_of[lo])
        stored = reader.read_chunk(name, chunk, keep_map=True)
        values = np.take(stored, ordered[lo:hi] - reader.chunk_bounds(chunk)[0], axis=0)
        if out is None:
            out = np.empty((len(rows), *values.shape[1:]), dtype=values.dtype)
        out[order[lo:hi]] = values
    return out


def _copy_tokenizer(source: StoreLocation, out: StoreLocation) -> None:
    """The source's tokenizer/ files (evaluate and features load the LM's tokenizer from the store),
    tokenizer.json last: its presence means the folder is whole (and that there is nothing to do)."""
    marker = f"{TOKENIZER_DIR}/{TOKENIZER_FILE}"
    if (out.local / marker).is_file() if out.local is not None else out.size(marker) is not None:
        return
    if source.local is not None:
        folder = source.local / TOKENIZER_DIR
        files = {file.name: file.read_bytes() for file in folder.iterdir()} if folder.is_dir() else {}
    else:
        files = {key.rsplit("/", 1)[-1]: source.read(key) for key in source.sizes(TOKENIZER_DIR)}
    for name in sorted(files, key=lambda name: name == TOKENIZER_FILE):
        if out.local is not None:
            (out.local / TOKENIZER_DIR).mkdir(exist_ok=True)
            (out.local / TOKENIZER_DIR / name).write_bytes(files[name])
        else:
            out.write(f"{TOKENIZER_DIR}/{name}", files[name])
