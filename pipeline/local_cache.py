"""saeflow's local cache directory (random models, the docstring corpus) and atomic writes.

Several processes may build the same cache entry at once (parallel tests, a DVC sweep): every
entry is written under a temporary name in its final directory and renamed into place, so a
reader sees either nothing or a complete entry, never a partial one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable


def cache_root() -> Path:
    """$SAEFLOW_CACHE, else ~/.cache/saeflow (read at call time so tests can redirect it)."""
    configured = os.environ.get("SAEFLOW_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "saeflow"


def stable_hash(value: Any, length: int = 16) -> str:
    """A short hex digest of JSON-able data, independent of dict order."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def build_dir_atomically(final: Path, build: Callable[[Path], None]) -> Path:
    """Return `final`, first creating it with `build(tmp_dir)` + rename when it does not exist."""
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # not a lost race with another builder: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def write_text_atomically(final: Path, text: str) -> None:
    """Write `text` to `final` through a temporary file in the same directory + rename."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", dir=final.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
