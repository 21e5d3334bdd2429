"""One writer per remote store: a lease object beside the store (`<store>.lock`).

An object store has no flock and no O_EXCL file, so the lease is created with a conditional put
(write only if absent: If-None-Match on S3, generation match on GCS, obstore's mode="create"),
holding the writer's pid, host and a random token, and read back to check the token is ours.
Where the backend has conditional puts (AWS S3 since 2024, GCS, Azure, MinIO, SeaweedFS) two
writers can never both hold it. Where it has none, the lease is written after a check that no
lease exists and read back: this still refuses a second writer that starts while the first one
runs, but two writers starting within the same instant could both proceed, so such backends rely
on the rule of one writer per store. A lease whose process is gone on this host is stale and taken
over; one naming another host is never taken over automatically (its pid cannot be checked from
here): the error names the object to delete once no writer runs there.
"""

from __future__ import annotations

import json
import os
import socket
import uuid

from pathlib import Path

from store.format import StoreError, now
from store.location import StoreLocation, locate
from store.lock import StoreLock, pid_alive, refuse_live_holder


class RemoteLease:
    """Exclusive write access to one remote store; the same interface as store.lock.StoreLock."""

    def __init__(self, store: StoreLocation):
        self.store = store
        self.object = store.sibling(".lock")
        self.path = self.object.text  # what messages name
        self._token: str | None = None

    @property
    def held(self) -> bool:
        return self._token is not None

    def acquire(self) -> RemoteLease:
        if self.held:
            return self
        for _ in range(3):  # a stale lease is removed, then creation is retried
            token = uuid.uuid4().hex
            body = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "created": now(), "token": token}).encode()
            made = self.object.create("", body)
            if made is None:  # no conditional put on this backend: check, write, read back
                made = self.object.read("") is None
                if made:
                    self.object.write("", body)
            if made:
                if self._read_holder().get("token") != token:
                    raise StoreError(f"store {self.store} was claimed by another writer at the same moment (lease {self.path}); "
                                     "run one writer per store")
                self._token = token
                return self
            self._remove_if_stale()
        raise StoreError(f"could not take the writer lease {self.path}; delete it if no saeflow process writes {self.store}")

    def release(self) -> None:
        if self._token is None:
            return
        try:
            if self._read_holder().get("token") == self._token:
                self.object.delete("")
        finally:
            self._token = None

    def _remove_if_stale(self) -> None:
        refuse_live_holder(self._read_holder(), self.store, "lease object", self.path,
                           still_held=lambda pid: isinstance(pid, int) and pid_alive(pid))
        self.object.delete("")  # its writer is gone (or the lease is unreadable): stale

    def _read_holder(self) -> dict:
        data = self.object.read("")
        try:
            holder = json.loads(data or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def __enter__(self) -> RemoteLease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def writer_lock(store: str | Path | StoreLocation) -> StoreLock | RemoteLease:
    """The single-writer guard of a store: a lock file beside a local one, a lease object beside
    a remote one."""
    location = locate(store)
    return StoreLock(location.local) if location.local is not None else RemoteLease(location)
