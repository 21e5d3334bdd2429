"""What a killed store creation leaves behind, and its removal (the caller holds the writer lock).

A local store is built under `.<name>.creating-<pid>` beside its path and renamed into place; an
object store cannot rename, so a remote store is created at its address with the manifest last.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import zarr

from store.format import MANIFEST_KEY
from store.location import StoreLocation

CREATING_PREFIX = ".{name}.creating-"  # + pid: a store being built beside its final path


def remove_interrupted_creations(path: Path) -> None:
    """Stores a killed create() left half-built beside `path` (the caller holds the lock)."""
    prefix = CREATING_PREFIX.format(name=path.name)
    for leftover in path.parent.iterdir() if path.parent.is_dir() else ():
        if leftover.name.startswith(prefix):
            shutil.rmtree(leftover, ignore_errors=True)


def remove_interrupted_remote_creation(path: StoreLocation) -> bool:
    """An object store cannot rename a store into place, so a remote create() writes at `path`
    and its manifest last: a kill before it leaves zarr metadata objects only (no chunk, no
    manifest), which this removes (the caller holds the lease). True if it removed one."""
    if not path.remote:
        return False
    keys = path.sizes()
    if not keys or not all(key.endswith("zarr.json") for key in keys):
        return False
    try:
        manifest = zarr.open_group(store=path.zarr_store(read_only=True), mode="r").attrs.get(MANIFEST_KEY)
    except Exception:  # noqa: BLE001 - unreadable metadata is not ours to remove
        return False
    if manifest:
        return False
    path.remove()
    return True
