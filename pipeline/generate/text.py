"""Documents for Stage 1, in a fixed order, from one of three sources (`dataset.source`):

- "python-docstrings": the built-in offline corpus (see docstrings.py);
- local files: a .json/.jsonl/.parquet/.csv/.txt file, a glob, or a directory of such files,
  read with `datasets.load_dataset` ("text" files: one line = one document, HF's default);
- anything else: a Hugging Face hub dataset name (`dataset.name` = its config name).

The document sequence is: non-empty documents (whitespace-only ones are skipped) in source
order, cut to `max_docs`; `iter_documents(cfg, start)` resumes after the first `start` of them.
"""

from __future__ import annotations

import glob
import hashlib
import os
import sys
from itertools import islice
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

from pipeline.config import ConfigError, DatasetConfig
from pipeline.generate.cache import stable_hash

DOCSTRINGS = "python-docstrings"
BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text", ".text": "text"}
COMPRESSIONS = {".gz", ".bz2", ".xz", ".zst"}
HASH_CONTENT_BELOW = 64 * 2**20  # larger files are fingerprinted by size + mtime
OFFLINE_HINT = "give local json/parquet/text files or use dataset.source: python-docstrings"


class DatasetError(ConfigError):
    """The text source cannot be read (one line: problem and fix)."""


def source_kind(cfg: DatasetConfig) -> Literal["python-docstrings", "local", "hub"]:
    if cfg.source == DOCSTRINGS:
        return "python-docstrings"
    return "local" if local_files(cfg.source) is not None else "hub"


def local_files(source: str) -> list[Path] | None:
    """The files a local source names, sorted; None when `source` is not a local path or glob."""
    if glob.has_magic(source):
        matches = [Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True)]
        files = sorted(p for p in matches if p.is_file() and _builder(p))
        if not files:
            raise DatasetError(f"no .json/.jsonl/.parquet/.csv/.txt files match {source!r}; check the pattern")
        return files
    path = Path(source).expanduser()
    if path.is_file():
        if not _builder(path):
            raise DatasetError(f"unsupported file type {path.name!r}; use .json, .jsonl, .parquet, .csv or .txt")
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _builder(p) and not p.name.startswith("."))
        if not files:
            raise DatasetError(f"directory {source!r} holds no .json/.jsonl/.parquet/.csv/.txt files")
        return files
    if source.startswith(("/", "./", "../", "~")) or _builder(path):
        raise DatasetError(f"dataset file {source!r} does not exist; check dataset.source")
    return None


def _builder(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes = suffixes[:-1]
    return BUILDERS.get(suffixes[-1]) if suffixes else None


def iter_documents(cfg: DatasetConfig, start: int = 0) -> Iterator[str]:
    """Documents in a fixed order, skipping the first `start` (resume)."""
    if start < 0:
        raise DatasetError(f"start={start} must be >= 0")
    documents = (text for text in _raw_texts(cfg) if text.strip())
    if cfg.max_docs is not None:
        documents = islice(documents, cfg.max_docs)
    produced = False
    for text in islice(documents, start, None):
        produced = True
        yield text
    if not produced and start == 0:
        raise DatasetError(
            f"dataset {cfg.source} has no text in field {cfg.text_field!r}; "
            "point dataset.source at files with non-empty documents or set dataset.text_field"
        )


def _raw_texts(cfg: DatasetConfig) -> Iterator[str]:
    if cfg.source == DOCSTRINGS:
        from pipeline.generate.docstrings import iter_docstrings

        return (doc.text for doc in iter_docstrings())
    return _field_values(cfg, _load(cfg))


def _load(cfg: DatasetConfig) -> Any:
    """A datasets.Dataset (or IterableDataset when streaming)."""
    from datasets import load_dataset

    files = local_files(cfg.source)
    # Read at call time so a test or the CLI can redirect the Arrow cache.
    cache_dir = os.environ.get("HF_DATASETS_CACHE") or None
    try:
        if files is not None:
            builders = {_builder(path) for path in files}
            if len(builders) > 1:
                raise DatasetError(f"{cfg.source!r} mixes file types {sorted(builders)}; use one kind of file")
            split_name = cfg.split.split("[")[0]  # keep slices like train[:1000] working
            return load_dataset(
                builders.pop(),
                data_files={split_name: [str(path) for path in files]},
                split=cfg.split,
                streaming=cfg.streaming,
                cache_dir=cache_dir,
            )
        if _datasets_offline() and not _hub_dataset_cached(cfg.source, cache_dir):
            # Fail now: datasets imported before offline mode was set would retry the network.
            raise DatasetError(f"dataset {cfg.source} is not available offline: {OFFLINE_HINT}")
        return load_dataset(cfg.source, cfg.name, split=cfg.split, streaming=cfg.streaming, cache_dir=cache_dir)
    except DatasetError:
        raise
    except Exception as error:  # datasets raises many types; each becomes one line here
        raise _load_error(cfg, error, files is not None) from None


def _load_error(cfg: DatasetConfig, error: Exception, local: bool) -> DatasetError:
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    connection = isinstance(error, ConnectionError) or any(
        word in f"{type(error).__name__} {first}".lower() for word in ("offline", "connect", "resolve host")
    )
    if not local and (connection or _datasets_offline()):
        return DatasetError(f"dataset {cfg.source} is not available offline: {OFFLINE_HINT}")
    return DatasetError(f"dataset {cfg.source!r} could not be loaded ({first}); check dataset.source, name and split")


def _datasets_offline() -> bool:
    names = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    if any(os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"} for name in names):
        return True
    import datasets.config

    return bool(getattr(datasets.config, "HF_HUB_OFFLINE", False) or getattr(datasets.config, "HF_DATASETS_OFFLINE", False))


def _hub_dataset_cached(source: str, cache_dir: str | None) -> bool:
    """Whether a hub dataset left files in the hub cache or datasets' Arrow cache."""
    import datasets.config
    from huggingface_hub import constants

    hub_cache = Path(os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE)
    arrow_cache = Path(cache_dir or datasets.config.HF_DATASETS_CACHE)
    return (hub_cache / f"datasets--{source.replace('/', '--')}").is_dir() or (
        arrow_cache / source.replace("/", "___")
    ).is_dir()


def _field_values(cfg: DatasetConfig, dataset: Any) -> Iterator[str]:
    columns = getattr(dataset, "column_names", None)
    if columns is not None:
        _check_field(cfg, columns)
        dataset = dataset.select_columns([cfg.text_field])
    rows = dataset.iter(batch_size=1024)
    for batch in rows:
        if cfg.text_field not in batch:  # streaming sources only reveal columns when read
            _check_field(cfg, list(batch))
        yield from _as_texts(cfg, batch[cfg.text_field])


def _check_field(cfg: DatasetConfig, columns: Iterable[str]) -> None:
    columns = list(columns)
    if cfg.text_field not in columns:
        raise DatasetError(
            f"dataset {cfg.source} has no field {cfg.text_field!r} (columns: {', '.join(columns)}); "
            "set dataset.text_field to the text column"
        )


def _as_texts(cfg: DatasetConfig, values: list) -> Iterator[str]:
    for value in values:
        if value is None:
            continue
        if not isinstance(value, str):
            raise DatasetError(
                f"field {cfg.text_field!r} of dataset {cfg.source} holds {type(value).__name__} values, not text; "
                "set dataset.text_field to a text column"
            )
        yield value


def dataset_fingerprint(cfg: DatasetConfig) -> str:
    """Changes when the text changes (file contents, the Python environment, or the hub name)."""
    if cfg.source == DOCSTRINGS:
        from pipeline.generate.docstrings import environment_key

        return f"{DOCSTRINGS}-{environment_key()}"
    files = local_files(cfg.source)
    if files is None:  # a hub dataset: its identity only (pin a revision in the name for more)
        return stable_hash(["hub", cfg.source, cfg.name, cfg.split, cfg.text_field])
    root = Path(os.path.commonpath([str(path.resolve().parent) for path in files]))
    digest = hashlib.sha256(f"{cfg.split}\0{cfg.text_field}\0".encode())
    for path in files:
        stat = path.stat()
        digest.update(f"{path.resolve().relative_to(root)}\0{stat.st_size}\0".encode())
        if stat.st_size < HASH_CONTENT_BELOW:
            digest.update(hashlib.sha256(path.read_bytes()).digest())
        else:
            digest.update(str(stat.st_mtime_ns).encode())
    return digest.hexdigest()[:16]


def describe_dataset(cfg: DatasetConfig) -> dict:
    """JSON-able provenance for the store manifest."""
    kind = source_kind(cfg)
    info: dict[str, Any] = {
        "source": cfg.source,
        "kind": kind,
        "split": cfg.split,
        "text_field": cfg.text_field,
        "name": cfg.name,
        "streaming": cfg.streaming,
        "max_docs": cfg.max_docs,
        "fingerprint": dataset_fingerprint(cfg),
    }
    if kind == "python-docstrings":
        info["python"] = sys.version.split()[0]
    elif kind == "local":
        info["files"] = [str(path.resolve()) for path in local_files(cfg.source)]
        if not cfg.streaming:
            info["n_docs"] = _count_documents(cfg)
    return info


def _count_documents(cfg: DatasetConfig) -> int | None:
    """Non-empty documents of a local dataset, counted in Arrow (no Python loop per row)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    dataset = _load(cfg)
    _check_field(cfg, dataset.column_names)
    column = dataset.data.column(cfg.text_field)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        return None
    nonempty = pc.sum(pc.not_equal(pc.utf8_trim_whitespace(column), "")).as_py() or 0
    return nonempty if cfg.max_docs is None else min(nonempty, cfg.max_docs)
