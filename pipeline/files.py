"""Files saeflow writes outside the store, written so that a crash never leaves half of one.

Every file or directory is built under a temporary name (`.<name>.<random>.tmp`) in its final
directory and renamed into place: a reader sees the old version or the new one, never a partial
one. Several processes may build the same cache entry at once (parallel tests, a dvc sweep); the
first rename wins. A write that fails (disk full, read-only, file too large) is a WriteError
naming the file, and the file it would have replaced is untouched.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

from safetensors import SafetensorError  # how safetensors reports a failed write

_TEMP_SUFFIX = ".tmp"


class WriteError(RuntimeError):
    """A file could not be written: one line naming it and the fix."""


def _cannot_write(path: Path, error: OSError | SafetensorError) -> WriteError:
    reason = getattr(error, "strerror", None) or str(error)
    return WriteError(f"could not write {path} ({reason}); what it would replace is untouched: "
                      "free disk space or fix permissions, then rerun")


def write_file_atomically(final: Path, write: Callable[[Path], None]) -> Path:
    """write(temp path) in `final`'s directory, then rename it to `final` (replacing it)."""
    final = Path(final)
    # a unique name that `write` creates itself, so the file gets the usual permissions
    temp = final.with_name(f".{final.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{_TEMP_SUFFIX}")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        write(temp)
        os.replace(temp, final)
    except (OSError, SafetensorError) as error:
        temp.unlink(missing_ok=True)
        raise _cannot_write(final, error) from None
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return final


def write_text_atomically(final: Path, text: str) -> Path:
    return write_file_atomically(final, lambda temp: temp.write_text(text, encoding="utf-8"))


def build_dir_atomically(final: Path, build: Callable[[Path], None], *, replace: bool = False) -> Path:
    """build(temp dir) then rename it to `final`. An existing `final` is kept as it is (a cache
    entry another process built), or with replace=True swapped out for the new one."""
    final = Path(final)
    if final.is_dir() and not replace:
        return final
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        temp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=_TEMP_SUFFIX, dir=final.parent))
    except OSError as error:
        raise _cannot_write(final, error) from None
    try:
        build(temp)
        if replace:
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(temp, final)
        except OSError:
            if replace or not final.is_dir():  # not a lost race with another builder: a real failure
                raise
    except (OSError, SafetensorError) as error:
        raise _cannot_write(final, error) from None
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return final


def append_line(path: Path, line: str) -> None:
    """Append one line to a log; a crash can tear only this last line."""
    try:
        with Path(path).open("a") as handle:
            handle.write(line + "\n")
    except OSError as error:
        raise WriteError(f"could not append to {path} ({error.strerror or error}): free disk space or fix "
                         "permissions, then rerun") from None


def remove_temporaries(directory: Path) -> None:
    """The temp files and directories a killed writer left in `directory`; only for a directory
    one process writes at a time (a run folder), never a shared cache."""
    for entry in Path(directory).iterdir():
        if entry.name.startswith(".") and entry.name.endswith(_TEMP_SUFFIX):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
