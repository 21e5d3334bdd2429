"""Read committed chunks of a store: np.memmap for raw chunk files, zarr decoding otherwise.

Only rows below the manifest's committed count are ever returned. For uncompressed arrays a
chunk is a raw little-endian C-order file (or a byte range of a shard file found through the
shard index), so the fast path maps it without a copy or a codec.
"""

from __future__ import annotations

import warnings
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import zarr

from store.format import TOKEN_ARRAYS, StoreError, acts_path, numpy_dtype, read_manifest

# An uncompressed shard ends with an index of (offset, nbytes) uint64 pairs per inner chunk,
# followed by a crc32c checksum of the index (zarr's default index codecs).
_SHARD_INDEX_CRC_BYTES = 4


class StoreReader:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self._group = zarr.open_group(str(self.path), mode="r")

    # --- shape of the store -------------------------------------------------------------
    @property
    def hooks(self) -> list[str]:
        return list(self.manifest["hook_points"])

    @property
    def chunk_rows(self) -> int:
        return int(self.manifest["chunk_rows"])

    @property
    def n_chunks(self) -> int:
        return int(self.manifest["n_chunks"])

    @property
    def n_rows(self) -> int:
        return int(self.manifest["n_rows"])

    def d(self, hook: str) -> int:
        return int(self._hook_info(hook)["d"])

    def store_dtype(self, hook: str) -> str:
        return self._hook_info(hook)["dtype"]

    def _hook_info(self, hook: str) -> dict:
        info = self.manifest["hook_points"].get(hook)
        if info is None:
            raise StoreError(f"hook {hook!r} is not in store {self.path}; it holds {self.hooks}")
        return info

    def chunk_bounds(self, index: int) -> tuple[int, int]:
        if not 0 <= index < self.n_chunks:
            raise StoreError(f"chunk {index} is not committed in {self.path} ({self.n_chunks} chunks)")
        start = index * self.chunk_rows
        return start, min(start + self.chunk_rows, self.n_rows)

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


def to_torch(rows: np.ndarray, store_dtype: str) -> torch.Tensor:
    """A CPU tensor of the stored values without a dtype conversion (bfloat16 bits reinterpreted).

    Read-only memmapped rows stay read-only: torch would warn that it cannot mark the tensor so,
    and callers only read these tensors (or convert them, which copies)."""
    rows = np.ascontiguousarray(rows)
    if not rows.flags.writeable:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return _from_numpy(rows, store_dtype)
    return _from_numpy(rows, store_dtype)


def _from_numpy(rows: np.ndarray, store_dtype: str) -> torch.Tensor:
    if store_dtype == "bfloat16":
        return torch.from_numpy(rows.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(rows)
