"""Documents for Stage 1, in a fixed order, from one of three sources (`dataset.source`):

- "python-docstrings": the built-in offline corpus (see docstrings.py);
- local files: a .json/.jsonl/.parquet/.arrow/.csv/.txt file, a glob, or a directory of such
  files, read with `datasets.load_dataset` ("text" files: one line = one document, HF's default);
- anything else: a Hugging Face hub dataset name (`dataset.name` = its config name,
  `dataset.revision` = the branch, tag or commit to load).

A document is a text (column `dataset.text_field`) or, for a pretokenized dataset, the list of
token ids in column `dataset.token_field`: the ids a tokenizer gives the text without special
tokens, so windows, packing, EOS and BOS follow the same rules as text (windows.py); ids are
checked against the model's vocabulary when they are used (LanguageModel.encode).
The document sequence is: non-empty documents (whitespace-only texts and empty id lists are
skipped) in source order, cut to `max_docs`; `iter_documents(cfg, start)` resumes after the first
`start` of them.
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
BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".txt": "text",
            ".text": "text"}
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
            raise DatasetError(f"no .json/.jsonl/.parquet/.arrow/.csv/.txt files match {source!r}; check the pattern")
        return files
    path = Path(source).expanduser()
    if path.is_file():
        if not _builder(path):
            raise DatasetError(f"unsupported file type {path.name!r}; use .json, .jsonl, .parquet, .arrow, .csv or .txt")
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _builder(p) and not p.name.startswith("."))
        if not files:
            raise DatasetError(f"directory {source!r} holds no .json/.jsonl/.parquet/.arrow/.csv/.txt files")
        return files
    if source.startswith(("/", "./", "../", "~")) or _builder(path):
        raise DatasetError(f"dataset file {source!r} does not exist; check dataset.source")
    return None


def _builder(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes = suffixes[:-1]
    return BUILDERS.get(suffixes[-1]) if suffixes else None


Document = str | list[int]  # a text, or the token ids of a pretokenized dataset


def iter_documents(cfg: DatasetConfig, start: int = 0) -> Iterator[Document]:
    """Documents in a fixed order, skipping the first `start` (resume)."""
    if start < 0:
        raise DatasetError(f"start={start} must be >= 0")
    check_source_settings(cfg)
    documents = (doc for doc in _raw_documents(cfg) if (doc.strip() if isinstance(doc, str) else doc))
    if cfg.max_docs is not None:
        documents = islice(documents, cfg.max_docs)
    produced = False
    for text in islice(documents, start, None):
        produced = True
        yield text
    if not produced and start == 0:
        raise DatasetError(
            f"dataset {cfg.source} has no {_content(cfg)} in field {column(cfg)!r}; "
            f"point dataset.source at files with non-empty documents or set dataset.{_field_key(cfg)}"
        )


def column(cfg: DatasetConfig) -> str:
    """The column documents are read from: token_field for a pretokenized dataset, else text_field."""
    return cfg.token_field or cfg.text_field


def _field_key(cfg: DatasetConfig) -> str:
    return "token_field" if cfg.token_field else "text_field"


def _content(cfg: DatasetConfig) -> str:
    return "token ids" if cfg.token_field else "text"


def check_source_settings(cfg: DatasetConfig) -> None:
    """Settings that only some sources take (one line naming the key to remove)."""
    kind = source_kind(cfg)
    if cfg.revision is not None and kind != "hub":
        raise DatasetError(f"dataset.revision applies to hub datasets only; remove it for the {kind} source {cfg.source!r}")
    if cfg.token_field is not None and kind == "python-docstrings":
        raise DatasetError("python-docstrings is text, not token ids; remove dataset.token_field")


def _raw_documents(cfg: DatasetConfig) -> Iterator[Document]:
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
            raise DatasetError(f"dataset {_hub_name(cfg)} is not available offline: {OFFLINE_HINT}")
        # Offline, datasets reuses its latest cached copy and cannot check the revision.
        return load_dataset(cfg.source, cfg.name, split=cfg.split, streaming=cfg.streaming, cache_dir=cache_dir,
                            revision=cfg.revision)
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
        return DatasetError(f"dataset {_hub_name(cfg)} is not available offline: {OFFLINE_HINT}")
    return DatasetError(f"dataset {cfg.source!r} could not be loaded ({first}); check dataset.source, name and split")


def _hub_name(cfg: DatasetConfig) -> str:
    return cfg.source if cfg.revision is None else f"{cfg.source} at revision {cfg.revision}"


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


def _field_values(cfg: DatasetConfig, dataset: Any) -> Iterator[Document]:
    field = column(cfg)
    columns = getattr(dataset, "column_names", None)
    if columns is not None:
        _check_field(cfg, columns)
        dataset = dataset.select_columns([field])
    values = _as_token_ids if cfg.token_field else _as_texts
    for batch in dataset.iter(batch_size=1024):
        if field not in batch:  # streaming sources only reveal columns when read
            _check_field(cfg, list(batch))
        yield from values(cfg, batch[field])


def _check_field(cfg: DatasetConfig, columns: Iterable[str]) -> None:
    columns = list(columns)
    if column(cfg) not in columns:
        raise DatasetError(
            f"dataset {cfg.source} has no field {column(cfg)!r} (columns: {', '.join(columns)}); "
            f"set dataset.{_field_key(cfg)} to the {_content(cfg)} column"
        )


def _as_texts(cfg: DatasetConfig, values: list) -> Iterator[str]:
    for value in values:
        if value is None:
            continue
        if not isinstance(value, str):
            hint = f"; for token ids set dataset.token_field: {cfg.text_field}" if isinstance(value, list) else ""
            raise DatasetError(
                f"field {cfg.text_field!r} of dataset {cfg.source} holds {type(value).__name__} values, not text; "
                f"set dataset.text_field to a text column{hint}"
            )
        yield value


def _as_token_ids(cfg: DatasetConfig, values: list) -> Iterator[list[int]]:
    for value in values:
        if value is None:
            continue
        if not isinstance(value, list) or not all(type(i) is int for i in value):
            kind = type(value).__name__ if not isinstance(value, list) else "lists of non-integers"
            raise DatasetError(
                f"field {cfg.token_field!r} of dataset {cfg.source} holds {kind}, not lists of token ids; "
                "set dataset.token_field to a column of token id lists (or remove it to read text)"
            )
        yield value


def dataset_fingerprint(cfg: DatasetConfig) -> str:
    """Changes when the documents change (file contents, the Python environment, or the hub name
    and revision). Settings added later join the hash only when set, so older stores keep theirs."""
    if cfg.source == DOCSTRINGS:
        from pipeline.generate.docstrings import environment_key

        return f"{DOCSTRINGS}-{environment_key()}"
    files = local_files(cfg.source)
    later = [f"{key}={getattr(cfg, key)}" for key in ("token_field", "revision") if getattr(cfg, key) is not None]
    if files is None:  # a hub dataset: its name and revision (the bytes are the hub's to keep)
        return stable_hash(["hub", cfg.source, cfg.name, cfg.split, cfg.text_field, *later])
    root = Path(os.path.commonpath([str(path.resolve().parent) for path in files]))
    digest = hashlib.sha256("".join(f"{part}\0" for part in [cfg.split, cfg.text_field, *later]).encode())
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
    check_source_settings(cfg)
    kind = source_kind(cfg)
    info: dict[str, Any] = {
        "source": cfg.source,
        "kind": kind,
        "split": cfg.split,
        "text_field": cfg.text_field,
        "token_field": cfg.token_field,
        "name": cfg.name,
        "revision": cfg.revision,
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
    values = dataset.data.column(column(cfg))
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        nonempty = pc.not_equal(pc.utf8_trim_whitespace(values), "")
    elif cfg.token_field and (pa.types.is_list(values.type) or pa.types.is_large_list(values.type)):
        nonempty = pc.greater(pc.list_value_length(values), 0)
    else:
        return None
    count = pc.sum(nonempty).as_py() or 0
    return count if cfg.max_docs is None else min(count, cfg.max_docs)
