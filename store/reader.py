"""Read committed chunks of a store: np.memmap for raw chunk files, zarr decoding otherwise.

Only rows below the manifest's committed count are ever returned. For uncompressed arrays a
chunk is a raw little-endian C-order file (or a byte range of a shard file found through the
shard index), so the fast path maps it without a copy or a codec.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import zarr

from store.dtypes import from_stored_numpy, numpy_dtype
from store.format import TOKEN_ARRAYS, StoreError, acts_path, read_manifest

# An uncompressed shard ends with an index of (offset, nbytes) uint64 pairs per inner chunk,
# followed by a crc32c checksum of the index (zarr's default index codecs).
_SHARD_INDEX_CRC_BYTES = 4


Split = Literal["train", "heldout"]


class StoreReader:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self._group = zarr.open_group(str(self.path), mode="r")

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

    def split_chunks(self, split: Split, heldout_chunks: int) -> range:
        """The chunks of a split: the held-out split is the store's last `heldout_chunks` chunks,
        the training split every chunk before them. Training never reads a held-out chunk, and
        statistics used for initialization or normalization come from the training split only."""
        if split not in ("train", "heldout"):
            raise StoreError(f"split must be 'train' or 'heldout', got {split!r}")
        if not 0 <= heldout_chunks < self.n_chunks:
            raise StoreError(
                f"loader.heldout_chunks={heldout_chunks} must leave training chunks in store {self.path} of "
                f"{self.n_chunks} chunks; lower loader.heldout_chunks or generate more rows"
            )
        if split == "heldout" and heldout_chunks == 0:
            raise StoreError("the held-out split is empty (heldout_chunks=0); set loader.heldout_chunks >= 1")
        n_train = self.n_chunks - heldout_chunks
        return range(0, n_train) if split == "train" else range(n_train, self.n_chunks)

    def read_tensor(self, hook: str, rows: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        """Rows of `hook` as read (read_chunk, read_rows) -> a CPU tensor of `dtype`."""
        return from_stored_numpy(rows, self.store_dtype(hook)).to(dtype)

    # --- chunk reads --------------------------------------------------------------------
    def read_chunk(self, name: str, index: int) -> np.ndarray:
        """Chunk `index` of `acts/<hook>` (by hook name) or of tokens/doc/pos, as stored."""
        start, stop = self.chunk_bounds(index)
        array_path = name if name in TOKEN_ARRAYS else acts_path(name)
        mapped = self._memmap_chunk(array_path, name, index)
        if mapped is not None:
            return mapped[: stop - start]
        return self._array(array_path)[start:stop]

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        stop = min(stop, self.n_rows)
        array_path = name if name in TOKEN_ARRAYS else acts_path(name)
        return self._array(array_path)[start:stop]

    def _array(self, array_path: str) -> zarr.Array:
        return self._group[array_path]

    @cached_property
    def _raw_layout(self) -> dict[str, tuple[np.dtype, tuple[int, ...], int | None] | None]:
        """Per array: (dtype, chunk shape, inner chunks per shard) when chunks are raw bytes."""
        layout = {}
        for name in [*self.hooks, *TOKEN_ARRAYS]:
            path = name if name in TOKEN_ARRAYS else acts_path(name)
            array = self._array(path)
            if array.compressors or array.filters:
                layout[path] = None
                continue
            dtype = np.dtype(TOKEN_ARRAYS[name]) if name in TOKEN_ARRAYS else numpy_dtype(self.store_dtype(name))
            shards = array.shards
            per_shard = shards[0] // array.chunks[0] if shards else None
            layout[path] = (dtype, tuple(array.chunks), per_shard)
        return layout

    def _memmap_chunk(self, array_path: str, name: str, index: int) -> np.ndarray | None:
        layout = self._raw_layout.get(array_path)
        if layout is None:
            return None
        dtype, chunk_shape, per_shard = layout
        suffix = "/".join(["0"] * (len(chunk_shape) - 1))
        if per_shard is None:
            file = self.path / array_path / "c" / str(index) / suffix if suffix else self.path / array_path / "c" / str(index)
            if not file.is_file():
                return None
            return np.memmap(file, dtype=dtype, mode="r", shape=chunk_shape)
        shard, inner = divmod(index, per_shard)
        file = self.path / array_path / "c" / str(shard) / suffix if suffix else self.path / array_path / "c" / str(shard)
        if not file.is_file():
            return None
        index_bytes = per_shard * 16 + _SHARD_INDEX_CRC_BYTES
        size = file.stat().st_size
        table = np.fromfile(file, dtype="<u8", count=2 * per_shard, offset=size - index_bytes).reshape(-1, 2)
        offset, nbytes = (int(v) for v in table[inner])
        if offset == 2**64 - 1 or nbytes != int(np.prod(chunk_shape)) * dtype.itemsize:
            return None  # chunk missing from the shard or stored some other way: let zarr decode
        return np.memmap(file, dtype=dtype, mode="r", shape=chunk_shape, offset=offset)
