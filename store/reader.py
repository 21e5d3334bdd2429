"""Read committed chunks of a store: np.memmap for raw chunk files, zarr decoding otherwise.

Only rows below the manifest's committed count are ever returned, and only from a store whose
metadata agree with its manifest (store/integrity.py; checked when the reader opens). For
uncompressed arrays a chunk is a raw little-endian C-order file (or a byte range of a shard file
found through the shard index), so the fast path maps it without a copy or a codec.

Verified reads: the first read of each chunk is checked against the checksum the writer
recorded (verify=True, the default), so a flipped byte, a NaN written in, a truncated, grown or
deleted chunk file is a StoreError naming the store, array and chunk, never silently fill values
or wrong rows. The loader verifies the copy it trains on (verify_chunk).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import zarr

from store.chunk_cache import ChunkCache
from store.chunk_maps import ChunkMaps
from store.dtypes import from_stored_numpy, numpy_dtype
from store.format import TOKEN_ARRAYS, ChunkError, StoreError, acts_path, checksum_path, chunk_checksum, open_store_group, read_manifest
from store.location import StoreLocation, locate
from store.integrity import layout_problems, manifest_problems
from store.split import RowRange, check_heldout_chunks, heldout_chunk_indices, heldout_ranges, recorded_heldout_ranges, training_chunks

# An uncompressed shard ends with an index of (offset, nbytes) uint64 pairs per inner chunk,
# followed by a crc32c checksum of the index (zarr's default index codecs).
_SHARD_INDEX_CRC_BYTES = 4
CHECKSUM_MISMATCH = "does not match the checksum recorded when it was written"


Split = Literal["train", "heldout"]


@dataclass(frozen=True)
class _ArrayLayout:
    dtype: np.dtype  # of the raw bytes
    chunk_shape: tuple[int, ...]
    per_shard: int | None  # inner chunks per shard file; None without shards
    raw: bool  # no codec but the bytes codec: chunks can be memory-mapped

    @property
    def chunk_bytes(self) -> int:
        return int(np.prod(self.chunk_shape)) * self.dtype.itemsize


class StoreReader:
    """Committed chunks of the store at `path` (a directory, a URL or a StoreLocation).

    cache_dir: for a remote store, a local folder where fetched chunks are kept by checksum
    (store/chunk_cache.py); ignored for a local store, which is read in place."""

    def __init__(self, path: str | Path | StoreLocation, *, verify: bool = True, cache_dir: str | Path | None = None):
        self.path = locate(path)
        self._group = open_store_group(self.path)
        self.manifest = read_manifest(self.path, self._group)
        problems = manifest_problems(self.manifest) or layout_problems(self._group, self.manifest)
        if problems:
            raise StoreError(f"store {self.path} is damaged: {problems[0]}; run `saeflow validate {self.path}`")
        self.verify = verify
        self._verified: set[tuple[str, int]] = set()
        self._checksums: dict[str, np.ndarray] = {}
        remote = self.path.remote
        self._cache = ChunkCache(cache_dir, self.manifest["checksum_algorithm"]) if cache_dir and remote else None
        self._maps = ChunkMaps()  # read_chunk(keep_map=True): store/chunk_maps.py

    @property
    def caches_chunks(self) -> bool:
        """Whether fetched chunks are kept in a local cache_dir (a remote store given one)."""
        return self._cache is not None

    def close(self) -> None:
        """Release the chunk maps kept by read_chunk(keep_map=True); the reader stays usable."""
        self._maps.close()

    # --- shape of the store -------------------------------------------------------------
    @property
    def hooks(self) -> list[str]:
        return self.manifest.hooks

    @property
    def chunk_rows(self) -> int:
        return self.manifest.chunk_rows

    @property
    def n_chunks(self) -> int:
        return self.manifest.n_chunks

    @property
    def n_rows(self) -> int:
        return self.manifest.n_rows

    def require_complete(self, *, allow_incomplete: bool) -> str | None:
        """StoreError for a store that generate has not finished (it is still writing it, or was
        stopped) unless allow_incomplete, which returns the line saying how much of it is used;
        None for a complete store."""
        if self.manifest["complete"]:
            return None
        target = self.manifest.get("target_rows")
        rows = f"{self.n_rows:,} of {target:,} rows" if isinstance(target, int) else f"{self.n_rows:,} rows"
        if not allow_incomplete:
            raise StoreError(
                f"store {self.path} is not complete ({rows} written: generate is still writing it or was stopped); "
                "rerun `saeflow generate` to finish it, or pass --allow-incomplete to use the rows it has"
            )
        return f"store {self.path} is not complete: using the {rows} it has (--allow-incomplete)"

    def d(self, hook: str) -> int:
        return int(self._hook_info(hook)["d"])

    def store_dtype(self, hook: str) -> str:
        return self._hook_info(hook)["dtype"]

    def _hook_info(self, hook: str) -> dict:
        try:
            return self.manifest.hook_info(hook)
        except StoreError:
            raise StoreError(f"hook {hook!r} is not in store {self.path}; it holds {self.hooks}") from None

    def chunk_bounds(self, index: int) -> tuple[int, int]:
        try:
            return self.manifest.chunk_bounds(index)
        except StoreError:
            raise StoreError(f"chunk {index} is not committed in {self.path} ({self.n_chunks} chunks)") from None

    def split_chunks(self, split: Split, heldout_chunks: int) -> list[int]:
        """The chunks of a split, in store order (store/split.py: held-out chunks are spread over
        the store). Training never reads a held-out chunk, and statistics used for initialization
        or normalization come from the training split only."""
        if split not in ("train", "heldout"):
            raise StoreError(f"split must be 'train' or 'heldout', got {split!r}")
        check_heldout_chunks(self.n_chunks, heldout_chunks, str(self.path))
        recorded_heldout_ranges(self.manifest, heldout_chunks, str(self.path))  # a shuffled copy has one split
        if split == "heldout" and heldout_chunks == 0:
            raise StoreError("the held-out split is empty (heldout_chunks=0); set loader.heldout_chunks >= 1")
        if split == "train":
            return training_chunks(self.n_chunks, heldout_chunks)
        return heldout_chunk_indices(self.n_chunks, heldout_chunks)

    def split_ranges(self, split: Split, heldout_chunks: int) -> list[RowRange]:
        """The rows of a split, per chunk in store order: whole training chunks; held-out chunks
        without the rows of documents that training rows also hold (store/split.py)."""
        chunks = self.split_chunks(split, heldout_chunks)
        recorded = recorded_heldout_ranges(self.manifest, heldout_chunks, str(self.path))  # a shuffled copy's
        if split == "train":
            return [RowRange(c, *self.chunk_bounds(c)) for c in chunks]
        ranges = recorded if recorded is not None else heldout_ranges(
            self.n_chunks, heldout_chunks, self.chunk_bounds, lambda start, stop: np.asarray(self.read_rows("doc", start, stop)))
        if not ranges:
            raise StoreError(
                f"the held-out chunks of store {self.path} hold no document of their own (every held-out row "
                "belongs to a document training rows also hold); raise loader.heldout_chunks"
            )
        return ranges

    def read_tensor(self, hook: str, rows: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        """Rows of `hook` as read (read_chunk, read_rows) -> a CPU tensor of `dtype`."""
        return from_stored_numpy(rows, self.store_dtype(hook)).to(dtype)

    # --- chunk reads --------------------------------------------------------------------
    def read_chunk(self, name: str, index: int, *, verify: bool | None = None, keep_map: bool = False) -> np.ndarray:
        """Chunk `index` of `acts/<hook>` (by hook name) or of tokens/doc/pos, as stored;
        verified on first read unless verify (default: the reader's setting) is False.
        keep_map: keep a memory-mapped chunk mapped for later reads (store/chunk_maps.py), for
        readers that return to every chunk many times (the shuffled loader)."""
        array_path = _array_path(name)
        rows = self._maps.get(array_path, index) if keep_map else None
        if rows is None:
            rows = self._read_chunk(array_path, index, *self.chunk_bounds(index))
            if keep_map and isinstance(rows, np.memmap):
                self._maps.keep(array_path, index, rows)
        if self.verify if verify is None else verify:
            self.verify_chunk(name, index, rows)
        return rows

    def keeps_every_map(self, names: list[str]) -> bool:
        """Whether every chunk of these arrays is a raw local file (or a remote chunk kept in
        cache_dir) and all of them fit the kept maps at once (store/chunk_maps.py), so
        read_chunk(keep_map=True) maps each chunk once."""
        if self.path.remote:  # with a cache, every chunk is read as a map of its cached file, whatever its codec
            mappable = self.caches_chunks
        else:
            mappable = all(self._layouts[_array_path(name)].raw for name in names)
        return mappable and self.n_chunks * len(names) <= self._maps.limit

    def verify_chunk(self, name: str, index: int, rows: np.ndarray) -> None:
        """ChunkError unless `rows`, chunk `index` as read, match the checksum the writer recorded
        (each chunk is checked once per reader)."""
        array_path = _array_path(name)
        if (array_path, index) in self._verified:
            return
        if chunk_checksum(rows, self.manifest["checksum_algorithm"]) != int(self.recorded_checksums(array_path)[index]):
            raise self._damaged(array_path, index, CHECKSUM_MISMATCH)
        self._verified.add((array_path, index))

    def check_chunk_files(self) -> None:
        """ChunkError for the first committed chunk whose file is missing or, for raw chunk
        files, has the wrong size: one stat per file, no data read (train and evaluate run it
        before they start; only a read with verify sees a changed byte)."""
        for array_path, layout in self._layouts.items():
            files = range(self.n_chunks) if layout.per_shard is None else range(0, self.n_chunks, layout.per_shard)
            listed = self.path.sizes(array_path) if self.path.remote else None  # one LIST, not a HEAD per chunk
            for index in files:
                file = self._chunk_file(array_path, index)
                if listed is not None:
                    size = listed.get(self._chunk_key(array_path, index))
                else:
                    size = file.stat().st_size if file.is_file() else None
                if size is None:
                    self._check_fill_chunk(file, array_path, index)
                elif layout.raw and layout.per_shard is None:
                    self._check_raw_size(file, array_path, index, layout, size)

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        stop = min(stop, self.n_rows)
        return self._array(_array_path(name))[start:stop]

    def _array(self, array_path: str) -> zarr.Array:
        return self._group[array_path]

    def _damaged(self, array_path: str, index: int, reason: str) -> ChunkError:
        return ChunkError(self.path, array_path, index, reason)

    @cached_property
    def _layouts(self) -> dict[str, _ArrayLayout]:
        layouts = {}
        for name in [*self.hooks, *TOKEN_ARRAYS]:
            array = self._array(_array_path(name))
            dtype = np.dtype(TOKEN_ARRAYS[name]) if name in TOKEN_ARRAYS else numpy_dtype(self.store_dtype(name))
            per_shard = array.shards[0] // array.chunks[0] if array.shards else None
            raw = not (array.compressors or array.filters)
            layouts[_array_path(name)] = _ArrayLayout(dtype, tuple(array.chunks), per_shard, raw)
        return layouts

    def _chunk_key(self, array_path: str, index: int) -> str:
        """The key (path in the store) of the file holding chunk `index`: its own, or its shard's."""
        layout = self._layouts[array_path]
        key = index if layout.per_shard is None else index // layout.per_shard
        return f"{array_path}/c/{key}" + ("/0" if len(layout.chunk_shape) == 2 else "")

    def _chunk_file(self, array_path: str, index: int) -> Path | str:
        """Where chunk `index` lives, as messages name it: a local file, or the object's URL."""
        key = self._chunk_key(array_path, index)
        return self.path.local / key if self.path.local is not None else f"{self.path}/{key}"

    def _check_fill_chunk(self, file: Path, array_path: str, index: int) -> None:
        """A chunk without a file reads as zeros: fine only if zeros are what was committed (stores
        written before every chunk got a file lack their all-zero chunks); otherwise damage."""
        start, stop = self.chunk_bounds(index)
        layout = self._layouts[array_path]
        zeros = np.zeros((stop - start, *layout.chunk_shape[1:]), dtype=layout.dtype)
        if chunk_checksum(zeros, self.manifest["checksum_algorithm"]) != int(self.recorded_checksums(array_path)[index]):
            raise self._damaged(array_path, index, f"is missing ({file} does not exist)")

    def identity(self) -> str:
        """A digest of every committed chunk's recorded checksum: the same for stores that hold
        the same bytes, wherever they live (no chunk is read)."""
        sums = np.concatenate([self.recorded_checksums(path) for path in self.manifest.array_paths])
        return f"{chunk_checksum(sums, self.manifest['checksum_algorithm']):016x}"

    def recorded_checksums(self, array_path: str) -> np.ndarray:
        """The checksums the writer recorded for the committed chunks of `array_path`."""
        if array_path not in self._checksums:
            self._checksums[array_path] = np.asarray(self._array(checksum_path(array_path))[: self.n_chunks])
        return self._checksums[array_path]

    def _read_chunk(self, array_path: str, index: int, start: int, stop: int) -> np.ndarray:
        if self.path.remote:
            return self._read_remote_chunk(array_path, index, start, stop)
        file = self._chunk_file(array_path, index)
        layout = self._layouts[array_path]
        if not file.is_file():  # never fill values in place of committed data
            self._check_fill_chunk(file, array_path, index)
            return np.zeros((stop - start, *layout.chunk_shape[1:]), dtype=layout.dtype)
        mapped = self._memmap_chunk(file, array_path, index, layout) if layout.raw else None
        if mapped is not None:
            return mapped[: stop - start]
        try:
            return self._array(array_path)[start:stop]
        except Exception as error:  # noqa: BLE001 - any codec failure means undecodable bytes
            raise self._damaged(array_path, index, f"cannot be decoded ({type(error).__name__}: {error})") from None

    def _read_remote_chunk(self, array_path: str, index: int, start: int, stop: int) -> np.ndarray:
        """A raw chunk is one GET of its object (or a hit in the local cache); shards and
        compressed chunks are decoded by zarr through the ObjectStore."""
        layout = self._layouts[array_path]
        checksum = int(self.recorded_checksums(array_path)[index])
        shape = (stop - start, *layout.chunk_shape[1:])
        if self._cache is not None and (cached := self._cache.load(checksum, layout.dtype, shape)) is not None:
            self._verified.add((array_path, index))  # the cache checked it against the same checksum
            return cached
        if layout.raw and layout.per_shard is None:
            data = self.path.read(self._chunk_key(array_path, index))
            if data is None:
                self._check_fill_chunk(self._chunk_file(array_path, index), array_path, index)
                return np.zeros(shape, dtype=layout.dtype)
            self._check_raw_size(self._chunk_file(array_path, index), array_path, index, layout, len(data))
            rows = np.frombuffer(data, dtype=layout.dtype).reshape(layout.chunk_shape)[: stop - start]
        else:
            if self.path.size(self._chunk_key(array_path, index)) is None:  # zarr would read fill values
                self._check_fill_chunk(self._chunk_file(array_path, index), array_path, index)
                return np.zeros(shape, dtype=layout.dtype)
            try:
                rows = self._array(array_path)[start:stop]
            except StoreError:
                raise
            except Exception as error:  # noqa: BLE001 - any codec failure means undecodable bytes
                raise self._damaged(array_path, index, f"cannot be decoded ({type(error).__name__}: {error})") from None
        if self._cache is not None and (cached := self._cache.save(checksum, rows)) is not None:
            self._verified.add((array_path, index))  # only rows that match their checksum are kept
            return cached  # a map of the file, kept by read_chunk(keep_map=True) like a local chunk's
        return rows

    def _check_raw_size(self, file: Path | str, array_path: str, index: int, layout: _ArrayLayout,
                        size: int | None = None) -> None:
        size = Path(file).stat().st_size if size is None else size
        if size != layout.chunk_bytes:
            raise self._damaged(array_path, index, f"file {file} has {size} bytes, a chunk has {layout.chunk_bytes}")

    def _memmap_chunk(self, file: Path, array_path: str, index: int, layout: _ArrayLayout) -> np.ndarray | None:
        if layout.per_shard is None:
            self._check_raw_size(file, array_path, index, layout)
            return np.memmap(file, dtype=layout.dtype, mode="r", shape=layout.chunk_shape)
        chunk_bytes = layout.chunk_bytes
        size = file.stat().st_size
        index_bytes = layout.per_shard * 16 + _SHARD_INDEX_CRC_BYTES
        if size < index_bytes:
            raise self._damaged(array_path, index, f"shard file {file} has {size} bytes, less than its index")
        table = np.fromfile(file, dtype="<u8", count=2 * layout.per_shard, offset=size - index_bytes).reshape(-1, 2)
        offset, nbytes = (int(v) for v in table[index % layout.per_shard])
        if offset == 2**64 - 1 or nbytes != chunk_bytes or offset + nbytes > size - index_bytes:
            return None  # missing from the shard, stored some other way or a bad index: zarr decides
        return np.memmap(file, dtype=layout.dtype, mode="r", shape=layout.chunk_shape, offset=offset)


def _array_path(name: str) -> str:
    """The array of a hook name or of tokens/doc/pos."""
    return name if name in TOKEN_ARRAYS else acts_path(name)
