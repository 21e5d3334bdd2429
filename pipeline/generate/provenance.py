"""What a store records about how it was made, and whether an existing store is this config's.

A store's identity is the config sections that decide its bytes (data_config: model, dataset and
generate settings, without the store's address, storage options and queue size) plus the dataset's fingerprint. A store
at the configured path with the same identity is resumed or reused; one with another identity is
refused, or replaced with overwrite=True; anything else at that path is never touched.
"""

from __future__ import annotations

import importlib.metadata
import json
import tempfile
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zarr

from pipeline.config import ConfigError, ExperimentConfig, changed_keys
from pipeline.files import build_dir_atomically, write_text_atomically
from pipeline.generate.lm import LanguageModel
from pipeline.generate.text import dataset_fingerprint, describe_dataset
from pipeline.generate.windows import WindowSpec
from store.dtypes import numpy_dtype
from store.format import FORMAT_NAME, MANIFEST_KEY, StoreError, default_chunk_rows, read_manifest
from store.lease import RemoteLease
from store.location import StoreLocation
from store.lock import StoreLock
from store.reader import StoreReader
from store.tokenizer import TOKENIZER_DIR, TOKENIZER_FILE
from store.tokenizer import load_store_tokenizer  # noqa: F401  read from here by features and tests
from store.writer import StoreWriter, remove_interrupted_remote_creation

# generate keys that cannot change the stored bytes: a store may be moved or resumed with them changed.
# storage_options also hold credentials, which a store must never record.
NOT_DATA_KEYS = ("store", "storage_options", "queue_chunks")


def data_config(cfg: ExperimentConfig) -> dict[str, Any]:
    """The config sections that decide a store's bytes (what a resume must match)."""
    generate = cfg.generate.model_dump(mode="json")
    for key in NOT_DATA_KEYS:
        generate.pop(key)
    return {"model": cfg.model.model_dump(mode="json"), "dataset": cfg.dataset.model_dump(mode="json"), "generate": generate}


def existing_store(path: StoreLocation, cfg: ExperimentConfig, overwrite: bool, say: Callable[[str], None]) -> dict | None:
    """The manifest of a store at `path` made with this config; None if there is none (any more)."""
    if path.is_empty() or remove_interrupted_remote_creation(path):
        return None
    reason = _mismatch(path, cfg)
    if reason is None:
        return read_manifest(path)
    if reason.startswith("not a store"):
        raise StoreError(f"{path} exists and is {reason}; choose another generate.store or remove it")
    if not overwrite:
        raise ConfigError(f"store {path} {reason}; pass --overwrite to replace it, or choose another generate.store")
    say(f"replacing store {path} ({reason})")
    path.remove()
    return None


def complete_store(path: StoreLocation, cfg: ExperimentConfig) -> dict | None:
    """The manifest of a complete store of this config at `path` (None: there is none), found
    without writing anything: nothing writes a complete store, and it may be read-only."""
    try:
        manifest = read_manifest(path)
    except StoreError:
        return None
    return manifest if manifest.get("complete") and _mismatch(path, cfg) is None else None


def _mismatch(path: StoreLocation, cfg: ExperimentConfig) -> str | None:
    """Why the store at `path` cannot be continued or reused for `cfg` (None: it can)."""
    try:
        attrs = zarr.open_group(store=path.zarr_store(read_only=True), mode="r").attrs.get(MANIFEST_KEY)
    except StoreError:
        raise
    except Exception:  # not zarr at all
        attrs = None
    if not isinstance(attrs, dict) or attrs.get("format") != FORMAT_NAME:
        return "not a store (no saeflow manifest)"
    try:
        manifest = read_manifest(path)
    except StoreError as error:
        return f"cannot be reused: {error}"
    changed = changed_keys(data_config(cfg), manifest.get("config", {}))
    if changed:
        return f"was made with a different config (changed: {', '.join(changed)})"
    fingerprint = dataset_fingerprint(cfg.dataset)
    if manifest["dataset"]["fingerprint"] != fingerprint:
        return f"was made from different data (dataset fingerprint {manifest['dataset']['fingerprint']} != {fingerprint})"
    return None


def create_writer(path: StoreLocation, cfg: ExperimentConfig, lm: LanguageModel, hook_dims: dict[str, int], spec: WindowSpec,
                  lock: StoreLock | RemoteLease, extra: dict[str, Any] | None = None) -> StoreWriter:
    """A writer of a new store at `path`, its manifest holding the provenance of `cfg` and `lm`
    (and the `extra` keys: how several ranks made it, pipeline/generate/ranks.py)."""
    g = cfg.generate
    itemsize = numpy_dtype(g.store_dtype).itemsize
    chunk_rows = g.chunk_rows or default_chunk_rows(max(hook_dims.values()), itemsize)
    model = lm.describe()
    tokenizer = {**model.pop("tokenizer", {}), "files": TOKENIZER_DIR}
    provenance = {
        "saeflow_version": saeflow_version(),
        "model": model,
        "tokenizer": tokenizer,
        "dataset": describe_dataset(cfg.dataset),
        "context_size": g.context_size,
        "prepend_bos": g.prepend_bos,
        "pack": g.pack,
        "dropped_special_tokens": sorted(g.drop_special_tokens),
        "special_token_ids": {"bos": spec.bos_id, "eos": spec.eos_id, "pad": spec.pad_id},
        "seed": g.seed,
        "target_rows": g.target_tokens,
        "config": data_config(cfg),
        **(extra or {}),
    }
    return StoreWriter.create(
        path,
        hook_dims=hook_dims,
        chunk_rows=chunk_rows,
        capacity_rows=g.target_tokens,
        store_dtype=g.store_dtype,
        shard_chunks=g.shard_chunks,
        compressor=g.compressor,
        manifest=provenance,
        queue_chunks=g.queue_chunks,
        lock=lock,
        stats_device=lm.device,
    )


def save_store_tokenizer(path: StoreLocation, lm: LanguageModel) -> None:
    """The tokenizer's files under <store>/tokenizer/ (once; a resume adds them if a crash came
    between the store's creation and them)."""
    save = lambda directory: lm.tokenizer.save_pretrained(str(directory))  # noqa: E731
    if path.local is not None:
        build_dir_atomically(path.local / TOKENIZER_DIR, save)
        return
    if path.size(f"{TOKENIZER_DIR}/{TOKENIZER_FILE}") is not None:
        return
    with tempfile.TemporaryDirectory() as directory:
        save(directory)
        # tokenizer.json last: its presence means the folder is whole
        for file in sorted(Path(directory).iterdir(), key=lambda file: file.name == TOKENIZER_FILE):
            path.write(f"{TOKENIZER_DIR}/{file.name}", file.read_bytes())


def write_identity(path: StoreLocation, file: Path) -> None:
    """What the store holds, in a small JSON file (no timestamps): rewritten with the same bytes
    when the store's content is the same, so a dvc stage depending on it reruns exactly when
    the store changes (dvc never hashes the store itself, which may be remote or terabytes)."""
    reader = StoreReader(path)
    record = {"identity": reader.identity(), "n_rows": reader.n_rows, "n_chunks": reader.n_chunks,
              "complete": bool(reader.manifest["complete"]), "hook_points": reader.manifest["hook_points"]}
    write_text_atomically(file, json.dumps(record, indent=1, sort_keys=True) + "\n")


def saeflow_version() -> str:
    try:
        return importlib.metadata.version("saeflow")
    except importlib.metadata.PackageNotFoundError:  # running from a checkout
        pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
        try:
            return tomllib.loads(pyproject.read_text())["project"]["version"]
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "unknown"
