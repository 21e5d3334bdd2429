"""A local disk cache of a remote store's chunks (`loader.cache_dir`), keyed by chunk checksum.

A cached chunk is the raw bytes of its committed rows in a file named after the checksum the
writer recorded for them (and their dtype and shape), so the second epoch, the next sweep and
every other store holding the same chunk read it from local disk. Only rows that match their
recorded checksum are ever saved, and a cached file is checked again when it is loaded (a file
damaged on disk is dropped and the chunk fetched anew): a stale or damaged cache can never feed
wrong rows. Files are written to a temporary name and renamed, so concurrent readers and
processes sharing the folder see whole files or none. Nothing is evicted: delete the folder to
reclaim the space.

A chunk is returned as a map of its cached file, also right after it was fetched and saved, so
the reader keeps it mapped and the shuffled loader gathers from it as from a local store's
chunk (store/chunk_maps.py): a remote chunk is fetched, decoded and checked once per reader.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import numpy as np

from store.errors import StoreError
from store.format import chunk_checksum


class ChunkCache:
    def __init__(self, directory: str | Path, algorithm: str):
        self.directory = Path(directory).expanduser()
        self.algorithm = algorithm

    def _file(self, checksum: int, dtype: np.dtype, shape: tuple[int, ...]) -> Path:
        name = f"{checksum:016x}-{dtype.str.replace('<', 'le-').replace('>', 'be-')}-{'x'.join(map(str, shape))}.bin"
        return self.directory / self.algorithm / name[:2] / name

    def load(self, checksum: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray | None:
        """The cached rows (a read-only memmap), or None if absent or not matching `checksum`."""
        file = self._file(checksum, dtype, shape)
        try:
            size = file.stat().st_size
        except OSError:  # absent, or the folder is unusable (save() says so)
            return None
        try:
            if size != int(np.prod(shape)) * dtype.itemsize:
                raise ValueError
            rows = _mapped(file, dtype, shape)
            if chunk_checksum(rows, self.algorithm) != checksum:
                raise ValueError
            return rows
        except (ValueError, OSError):
            with contextlib.suppress(OSError):  # a file that cannot be dropped is replaced by save()
                file.unlink(missing_ok=True)
            return None

    def save(self, checksum: int, rows: np.ndarray) -> np.ndarray | None:
        """Keep `rows` if they match `checksum` (never cache bytes that are not the committed ones):
        the kept rows as a read-only memmap of their file, or None for rows that do not match."""
        rows = np.ascontiguousarray(rows)
        if chunk_checksum(rows, self.algorithm) != checksum:
            return None
        file = self._file(checksum, rows.dtype, rows.shape)
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            fd, temporary = tempfile.mkstemp(dir=file.parent, prefix=".", suffix=".partial")
        except OSError as error:
            raise self._unwritable(error) from None
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(memoryview(rows).cast("B"))
            os.replace(temporary, file)
        except OSError as error:  # a full disk
            Path(temporary).unlink(missing_ok=True)
            raise self._unwritable(error) from None
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return _mapped(file, rows.dtype, rows.shape)

    def _unwritable(self, error: OSError) -> StoreError:
        return StoreError(f"cannot keep a fetched chunk in loader.cache_dir {self.directory} ({error.strerror or error}); "
                          "free space there, or set loader.cache_dir to another local folder (null: no cache)")


def _mapped(file: Path, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A read-only map of a cached file (an empty chunk has no bytes to map)."""
    return np.memmap(file, dtype=dtype, mode="r", shape=shape) if int(np.prod(shape)) else np.zeros(shape, dtype)
