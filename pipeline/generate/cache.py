"""saeflow's local cache directory (random models, the docstring corpus) and its entry keys."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def cache_root() -> Path:
    """$SAEFLOW_CACHE, else ~/.cache/saeflow (read at call time so tests can redirect it)."""
    configured = os.environ.get("SAEFLOW_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "saeflow"


def stable_hash(value: Any, length: int = 16) -> str:
    """A short hex digest of JSON-able data, independent of dict order."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]
