"""What a run folder says about how its SAE was made: <train.out_dir>/<variant>/run.json.

    {"config": every section of the variant's config after overrides, "store": path, creation
     time, rows and an identity hash of its chunk checksums, "versions": saeflow, torch,
     transformer-lens, zarr, "git_commit": of the working directory when it is a git checkout,
     "started", "finished" (null until the SAE is saved), "resumed_from_step"}

A folder that holds a finished SAE is never silently replaced: the same config on the same store
has nothing left to do, another config or store is refused unless --overwrite says to start
over. Where things live (generate.store, train.out_dir) is not part of a config's identity: a
moved store or run folder is the same run; the store's identity is its checksums.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import shutil
import subprocess
from pathlib import Path

from pipeline.config import ConfigError, ExperimentConfig, changed_keys, recorded_config
from pipeline.files import write_text_atomically
from pipeline.sae.io import WEIGHTS_FILE
from store.reader import StoreReader

RUN_FILE = "run.json"
# Where things live and how they are reached, not what they are: never compared.
LOCATIONS = (("generate", "store"), ("generate", "storage_options"), ("loader", "cache_dir"), ("train", "out_dir"))


def _what(config: dict) -> dict:
    """A config dump without the keys that say where things live."""
    config = {section: dict(values) if isinstance(values, dict) else values for section, values in config.items()}
    for section, key in LOCATIONS:
        (config.get(section) or {}).pop(key, None)
    return config


def read_record(directory: Path) -> dict | None:
    path = directory / RUN_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def run_changes(cfg: ExperimentConfig, store_identity: str | None, recorded_config: dict | None,
                recorded_identity: str | None) -> list[str]:
    """What differs between the run `cfg` asks for on a store and one recorded (run.json, a
    checkpoint): the config keys, locations left out, and the store by its identity ([] = the same run)."""
    changed = changed_keys(_what(cfg.model_dump(mode="json")), _what(recorded_config)) if recorded_config else ["no recorded config"]
    if recorded_identity != store_identity:
        changed.append("the store (its identity)")
    return changed


def finished_here(directory: Path, cfg: ExperimentConfig, reader: StoreReader, *, overwrite: bool) -> bool:
    """True when `directory` holds the finished SAE of `cfg` trained on this store. A finished
    SAE of another config or store (or an unknown one) is a ConfigError unless `overwrite`,
    which empties the folder."""
    if not (directory / WEIGHTS_FILE).is_file():
        return False  # nothing finished here: train, or resume from its checkpoints
    record = read_record(directory) or {}
    changed = run_changes(cfg, reader.identity(), record.get("config"), (record.get("store") or {}).get("identity"))
    if record.get("finished") and not changed:
        return True
    if overwrite:
        shutil.rmtree(directory)
        return False
    raise ConfigError(
        f"{directory} holds a finished SAE of a different config (changed: {', '.join(changed[:6])}); "
        "pass --overwrite to replace it, or choose another train.out_dir"
    )


def start_record(directory: Path, cfg: ExperimentConfig, reader: StoreReader, resumed_from_step: int) -> dict:
    record = {
        "config": recorded_config(cfg),
        "store": {"path": str(reader.path), "created": reader.manifest.get("created"), "n_rows": reader.n_rows,
                  "identity": reader.identity()},
        "versions": {name: _version(name) for name in ("saeflow", "torch", "transformer-lens", "zarr")},
        "git_commit": _git_commit(),
        "started": _now(),
        "finished": None,
        "resumed_from_step": resumed_from_step,
    }
    write_text_atomically(directory / RUN_FILE, json.dumps(record, indent=1))
    return record


def finish_record(directory: Path, record: dict) -> None:
    write_text_atomically(directory / RUN_FILE, json.dumps({**record, "finished": _now()}, indent=1))


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _git_commit() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
