"""One writer per store: a lock file beside the store (`<store>.lock`).

The lock file is created with O_EXCL and holds the writer's pid and host (JSON). While held it is
also flock()ed, so on this host a lock whose process died (even by SIGKILL) is recognised as stale
and taken over: the kernel drops the flock with the process, and the pid check covers filesystems
without flock. A lock naming another host is never taken over automatically (its pid cannot be
checked from here); the error says which file to delete once no writer runs there.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from collections.abc import Callable
from pathlib import Path

from store.format import StoreError, now


def lock_path(store: str | Path) -> Path:
    store = Path(store)
    return store.with_name(store.name + ".lock")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by another user
    return True


def refuse_live_holder(holder: dict, store: object, kind: str, path: object, *,
                       still_held: Callable[[object], bool]) -> None:
    """Raise unless the writer named by a lock or lease (`holder`: its JSON) is certainly gone.

    kind ("lock", "lease object") and path name the guard in messages. A holder on another host
    is never judged stale (its pid cannot be checked from here); on this host, still_held(pid)
    says whether that writer may still run."""
    host, pid = holder.get("host"), holder.get("pid")
    guard = f"{kind} {path}"
    if host is not None and host != socket.gethostname():
        raise StoreError(
            f"store {store} is held by process {pid} on host {host} ({guard}); "
            f"if no writer runs there any more, delete {path} and rerun"
        )
    if pid == os.getpid():
        raise StoreError(f"store {store} is already being written by this process ({guard})")
    if still_held(pid):
        raise StoreError(
            f"store {store} is being written by process {pid} on this host ({guard}); "
            "wait for it to finish or stop it, then rerun"
        )


class StoreLock:
    """Exclusive write access to one store; use as a context manager or acquire()/release()."""

    def __init__(self, store: str | Path):
        self.store = Path(store)
        self.path = lock_path(self.store)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> StoreLock:
        if self.held:
            return self
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise self._cannot_write(error) from None
        for _ in range(3):  # a stale lock is removed, then creation is retried
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o644)
            except FileExistsError:
                self._remove_if_stale()
                continue
            except OSError as error:  # a read-only filesystem or directory
                raise self._cannot_write(error) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                pass  # no flock on this filesystem: the pid check alone guards staleness
            info = {"pid": os.getpid(), "host": socket.gethostname(), "created": now()}
            try:
                os.write(fd, json.dumps(info).encode())
                os.fsync(fd)
            except OSError as error:  # a full disk
                os.close(fd)
                self.path.unlink(missing_ok=True)
                raise self._cannot_write(error) from None
            self._fd = fd
            return self
        raise StoreError(f"could not take the writer lock {self.path}; delete it if no saeflow process writes {self.store}")

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def _remove_if_stale(self) -> None:
        # Stale: the pid is dead, or it is alive but no longer holds the flock (pid reused).
        refuse_live_holder(self._read_holder(), self.store, "lock", self.path,
                           still_held=lambda pid: (not isinstance(pid, int) or pid_alive(pid)) and self._flock_held())
        try:
            self.path.unlink(missing_ok=True)
        except OSError as error:
            raise self._cannot_write(error) from None

    def _cannot_write(self, error: OSError) -> StoreError:
        return StoreError(
            f"cannot create the writer lock {self.path} ({error.strerror or error}): writing store {self.store} needs "
            f"write access to {self.path.parent}; make it writable or write the store elsewhere"
        )

    def _read_holder(self) -> dict:
        """The lock's JSON; {} while a writer is between creating it and writing it."""
        try:
            holder = json.loads(self.path.read_text() or "{}")
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def _flock_held(self) -> bool:
        """Whether some process holds the flock on the lock file (True where flock is unsupported)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        finally:
            os.close(fd)

    def __enter__(self) -> StoreLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
