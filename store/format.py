"""Store format v1: layout, manifest, create and open. See store/FORMAT.md.

A store is a zarr v3 group directory. The manifest lives in the group attributes under
"saeflow"; zarr's LocalStore writes metadata through temp file + rename, so a manifest update is
atomic and readers see either the old or the new one. Readers trust only the committed row
count in the manifest, never the arrays' shapes (arrays are pre-sized to capacity while a store
is written and trimmed to the row count when it completes).

Per-chunk checksums live in small uint64 arrays `checksums/<array path>` rather than in the
manifest: a 1B-token store has ~100k chunks, and rewriting them all in the manifest at every
commit would make generation quadratic. Entries at or beyond the manifest's n_chunks mean nothing.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import math
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from store.dtypes import STORE_DTYPES
from store.errors import ChunkError, StoreError  # noqa: F401 - re-exported: the store's errors
from store.location import StoreLocation, locate

FORMAT_NAME = "saeflow-activation-store"
FORMAT_VERSION = 1
MANIFEST_KEY = "saeflow"
DEFAULT_CHUNK_BYTES = 16 * 2**20

TOKEN_ARRAYS = {"tokens": "<i4", "doc": "<i8", "pos": "<i4"}
CHECKSUM_BLOCK = 4096  # checksum entries per file of a checksums/ array

try:  # xxh3 hashes at memory speed; blake2b (stdlib) is the portable fallback
    import xxhash

    CHECKSUM_ALGORITHM = "xxh3_64"
except ImportError:  # pragma: no cover - xxhash is installed in the project's environment
    xxhash = None
    CHECKSUM_ALGORITHM = "blake2b_64"


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def acts_path(hook: str) -> str:
    return f"acts/{hook}"


def checksum_path(array_path: str) -> str:
    return f"checksums/{array_path}"


def stats_path(hook: str) -> str:
    return f"stats/{hook}"


def data_array_paths(manifest: dict[str, Any]) -> list[str]:
    """Every row-aligned array of a store: acts/<hook> for each hook, then tokens, doc, pos."""
    return [acts_path(hook) for hook in manifest["hook_points"]] + list(TOKEN_ARRAYS)


def chunk_checksum(data: np.ndarray, algorithm: str = CHECKSUM_ALGORITHM) -> int:
    """A 64-bit checksum of an array's raw C-order bytes (the bytes a chunk file holds)."""
    buffer = memoryview(np.ascontiguousarray(data)).cast("B")
    if algorithm == "xxh3_64" and xxhash is not None:
        # The same digest as xxh3_64_intdigest, but the hasher releases the GIL for inputs over
        # 64 KiB (the one-shot function holds it): reader threads verify chunks in parallel and
        # the rest of the process (gathers, the trainer, the LM forward) runs meanwhile.
        return xxhash.xxh3_64(buffer).intdigest()
    if algorithm == "blake2b_64":
        return int.from_bytes(hashlib.blake2b(buffer, digest_size=8).digest(), "little")
    raise StoreError(f"checksum algorithm {algorithm!r} is not available here; install xxhash to verify this store")


def default_chunk_rows(d_max: int, itemsize: int) -> int:
    """Rows per chunk so the widest hook's chunk is about 16 MiB (a power of two, >= 256)."""
    rows = DEFAULT_CHUNK_BYTES // (d_max * itemsize)
    return max(256, 2 ** int(math.log2(max(rows, 1))))


def _codecs(compressor: str | None):
    if compressor is None:
        return None
    if compressor == "zstd":
        return [zarr.codecs.ZstdCodec(level=3)]
    if compressor == "blosc":
        return [zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")]
    raise StoreError(f"unknown compressor {compressor!r}; use zstd, blosc or none")


def create_store(
    path: str | Path | StoreLocation,
    *,
    hook_dims: dict[str, int],
    store_dtype: str,
    chunk_rows: int,
    capacity_rows: int,
    shard_chunks: int | None,
    compressor: str | None,
    manifest: dict[str, Any],
) -> zarr.Group:
    """Create the group and its arrays (sized to capacity) and write the initial manifest."""
    capacity = max(chunk_rows, math.ceil(capacity_rows / chunk_rows) * chunk_rows)
    group = zarr.open_group(store=locate(path).zarr_store(read_only=False), mode="w-", zarr_format=3)
    shard_rows = chunk_rows * shard_chunks if shard_chunks else None
    for hook, d in hook_dims.items():
        group.create_array(
            acts_path(hook),
            shape=(capacity, d),
            chunks=(chunk_rows, d),
            shards=(shard_rows, d) if shard_rows else None,
            dtype=STORE_DTYPES[store_dtype],
            compressors=_codecs(compressor),
            fill_value=0,
            config={"write_empty_chunks": True},  # every chunk is a file: memmap never misses one
        )
    for name, dtype in TOKEN_ARRAYS.items():
        group.create_array(
            name,
            shape=(capacity,),
            chunks=(chunk_rows,),
            shards=(shard_rows,) if shard_rows else None,
            dtype=dtype,
            compressors=None,
            fill_value=0,
            config={"write_empty_chunks": True},
        )
    capacity_chunks = capacity // chunk_rows
    for array_path in [*map(acts_path, hook_dims), *TOKEN_ARRAYS]:
        group.create_array(
            checksum_path(array_path),
            shape=(capacity_chunks,),
            chunks=(CHECKSUM_BLOCK,),
            dtype="<u8",
            compressors=None,
            fill_value=0,
        )
    full = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "hook_points": {hook: {"d": d, "dtype": store_dtype} for hook, d in hook_dims.items()},
        "chunk_rows": chunk_rows,
        "shard_chunks": shard_chunks,
        "compressor": compressor,
        "capacity_rows": capacity,
        "n_chunks": 0,
        "n_rows": 0,
        "complete": False,
        "checksum_algorithm": CHECKSUM_ALGORITHM,
        "stats": None,  # {"chunks", "rows", "checksums"} of the saved stats/ arrays
        "cursor": None,
        "created": now(),
        "updated": now(),
        **manifest,
    }
    write_manifest(group, full)
    return group


def resize_rows(group: zarr.Group, manifest: dict[str, Any], rows: int) -> None:
    """Set every row-aligned array to `rows` rows and the checksum arrays to the matching chunks."""
    chunk_rows = int(manifest["chunk_rows"])
    chunks = -(-rows // chunk_rows)
    for array_path in data_array_paths(manifest):
        array = group[array_path]
        array.resize((rows, *array.shape[1:]))
        group[checksum_path(array_path)].resize((chunks,))
    manifest["capacity_rows"] = rows


class Manifest(dict):
    """A store's manifest: the JSON mapping kept in the group attributes, with typed accessors
    for the layout that every reader and writer of the store needs."""

    @property
    def hooks(self) -> list[str]:
        return list(self["hook_points"])

    @property
    def chunk_rows(self) -> int:
        return int(self["chunk_rows"])

    @property
    def n_chunks(self) -> int:
        return int(self["n_chunks"])

    @property
    def n_rows(self) -> int:
        return int(self["n_rows"])

    @property
    def layout(self) -> dict[str, tuple[int, str]]:
        """{hook: (d, store dtype)}."""
        return {hook: (int(info["d"]), info["dtype"]) for hook, info in self["hook_points"].items()}

    @property
    def array_paths(self) -> list[str]:
        return data_array_paths(self)

    def hook_info(self, hook: str) -> dict[str, Any]:
        info = self["hook_points"].get(hook)
        if info is None:
            raise StoreError(f"hook {hook!r} is not in this store; it holds {self.hooks}")
        return info

    def chunk_bounds(self, index: int) -> tuple[int, int]:
        """[start, stop) rows of committed chunk `index`."""
        if not 0 <= index < self.n_chunks:
            raise StoreError(f"chunk {index} is not committed ({self.n_chunks} chunks)")
        start = index * self.chunk_rows
        return start, min(start + self.chunk_rows, self.n_rows)


def write_manifest(group: zarr.Group, manifest: dict[str, Any]) -> None:
    manifest["updated"] = now()
    group.attrs.update({MANIFEST_KEY: dict(manifest)})


def open_store_group(path: str | Path | StoreLocation, mode: str = "r") -> zarr.Group:
    """The store's zarr group; unreadable group metadata is a StoreError naming the file."""
    location = locate(path)
    metadata = f"{location}/zarr.json"
    if location.local is not None:
        if not location.local.exists():
            raise StoreError(f"{location} does not exist; check the path, or run `saeflow generate` to create the store")
        present = (location.local / "zarr.json").is_file()
    else:
        present = location.read("zarr.json") is not None
    if not present:
        raise StoreError(f"{location} is not an activation store (no zarr.json); run `saeflow generate` to create one")
    try:
        # zarr_format=3: a store is always zarr v3, and zarr would otherwise also probe for v2
        # metadata (three more requests each open on object storage)
        return zarr.open_group(store=location.zarr_store(read_only=mode == "r"), mode=mode, zarr_format=3)
    except (ValueError, KeyError, TypeError) as error:  # JSONDecodeError is a ValueError
        raise StoreError(
            f"{metadata} is unreadable ({type(error).__name__}: {str(error).splitlines()[0]}); the store's "
            "metadata is damaged: restore the store from a copy or regenerate it"
        ) from None


def read_manifest(path: str | Path | StoreLocation, group: zarr.Group | None = None) -> Manifest:
    """The manifest of the store at `path`, from its `group` when the caller has it open."""
    path = locate(path)
    group = open_store_group(path) if group is None else group
    manifest = group.attrs.get(MANIFEST_KEY)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise StoreError(f"{path} is a zarr group but not a saeflow activation store (no manifest)")
    if manifest.get("version") != FORMAT_VERSION:
        raise StoreError(
            f"{path} has store format version {manifest.get('version')}, this saeflow reads version "
            f"{FORMAT_VERSION}; regenerate the store or use a matching saeflow release"
        )
    return Manifest(manifest)
