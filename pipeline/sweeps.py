"""Sweeps: the SAE variants of one experiment, trained from one pass over the loader.

`train.sweep` entries are maps of dotted overrides ({"sae.top_k": 16, "train.lr": 1e-3}) plus an
optional "name"; each becomes a full, validated experiment config. Only what the variants may
differ in can be swept: one loader feeds them all.
"""

from __future__ import annotations

import yaml

from pipeline.config import ConfigError, ExperimentConfig, TrainConfig, apply_override, is_per_sae, validate_config

# Whole sections a sweep entry may change; of train only the per_sae fields.
SWEEPABLE_SECTIONS = ("sae", "initializer")
# <train.out_dir>/sweep/ holds the sweep's comparison plots (pipeline/train/compare.py), so no variant takes the name
SWEEP_PLOTS_FOLDER = "sweep"


def per_sae_train_keys() -> frozenset[str]:
    """The train settings a sweep variant may change: the fields marked per_sae(...)."""
    return frozenset(name for name, field in TrainConfig.model_fields.items() if is_per_sae(field))


def sweep_variants(cfg: ExperimentConfig) -> list[tuple[str, ExperimentConfig]]:
    """(name, config) per SAE variant; no sweep = one variant named "sae"."""
    if not cfg.train.sweep:
        return [("sae", cfg)]
    base = cfg.model_dump(mode="json")
    variants = []
    for index, entry in enumerate(cfg.train.sweep):
        entry = dict(entry)
        name = str(entry.pop("name", None) or _variant_name(entry, index))
        data = yaml.safe_load(yaml.safe_dump(base))  # deep copy of plain data
        data["train"]["sweep"] = []
        for key, value in entry.items():
            _check_sweepable(name, key)
            apply_override(data, key.split("."), value)
        variants.append((name, validate_config(data)))
    names = [name for name, _ in variants]
    if SWEEP_PLOTS_FOLDER in names:
        raise ConfigError(f"sweep variant name {SWEEP_PLOTS_FOLDER!r} is the folder of the sweep's comparison plots; "
                          "give that entry another 'name'")
    if len(set(names)) != len(names):
        raise ConfigError(f"sweep variant names {names} repeat; give each entry a distinct 'name'")
    return variants


def _check_sweepable(variant: str, key: str) -> None:
    """Only sae.*, initializer.* and the per-SAE train settings may vary: one loader feeds every variant."""
    section, _, name = key.partition(".")
    if section in SWEEPABLE_SECTIONS or (section == "train" and name in per_sae_train_keys()):
        return
    raise ConfigError(
        f"sweep variant {variant!r} changes {key}, which all variants share "
        f"(one loader feeds them); sweep only sae.*, initializer.* and per-SAE train settings"
    )


def _variant_name(entry: dict, index: int) -> str:
    if not entry:
        return f"variant{index}"
    return "-".join(f"{key.split('.')[-1]}={value}" for key, value in entry.items())
