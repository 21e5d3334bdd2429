"""Files saeflow writes outside the store, written so that a crash never leaves half of one.

Every file or directory is built under a temporary name in its final directory and renamed into
place: a reader sees the old version or the new one, never a partial one. Several processes may
build the same cache entry at once (parallel tests, a dvc sweep); the first rename wins.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path


def write_file_atomically(final: Path, write: Callable[[Path], None]) -> Path:
    """write(temp path) in `final`'s directory, then rename it to `final` (replacing it)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    # a unique name that `write` creates itself, so the file gets the usual permissions
    temp = final.with_name(f".{final.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(temp)
        os.replace(temp, final)
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
    final.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build(temp)
        if replace:
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(temp, final)
        except OSError:
            if replace or not final.is_dir():  # not a lost race with another builder: a real failure
                raise
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return final
