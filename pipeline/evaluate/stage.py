"""Evaluate every trained SAE of a config on data its training never saw.

For each variant (pipeline/sweeps.py sweep_variants) in <train.out_dir>/<name>/:
- activation metrics on the store's held-out split (loader.heldout_chunks chunks spread over
  the store, minus documents training rows hold: store/split.py; up to evaluate.n_tokens rows):
  FVU (against the target hook's dataset mean from the store's statistics), explained
  variance, MSE (summed over dimensions, mean per row), L0 mean and histogram, dead latents
  (dead_fraction_heldout, dead_latents: no firing on those rows) and dense ones (firing on > 10% of them);
- for causal LMs with a head, the spliced-model metrics of splice.py on held-out text
  (sequences.py). Encoders without an LM head (MiniLM) get
  "lm_metrics_skipped": <why> instead.

Writes <train.out_dir>/metrics.json ({variant: {metric: number or string}}, null where a ratio
is undefined) and <train.out_dir>/<variant>/eval_l0_histogram.json, and returns the metrics.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline.config import ConfigError, ExperimentConfig, resolve_device
from pipeline.sweeps import sweep_variants
from pipeline.evaluate.sequences import HELDOUT_TEXT, heldout_sequences
from pipeline.evaluate.splice import lm_metrics
from pipeline.files import write_text_atomically
from pipeline.generate.lm import LanguageModel, load_language_model
from pipeline.sae.io import load_sae
from pipeline.sae.metrics import heldout_metrics
from pipeline.sae.model import SparseAutoencoder
from store.loader import ActivationLoader
from store.reader import StoreReader
from store.split_moments import store_moments

METRICS_FILE = "metrics.json"
HISTOGRAM_FILE = "eval_l0_histogram.json"


def evaluate(cfg: ExperimentConfig, *, lm: LanguageModel | None = None, allow_incomplete: bool = False) -> dict[str, dict]:
    """Evaluate every variant of cfg; `lm` reuses a loaded model (tests, notebooks). A store
    generate has not finished is refused unless `allow_incomplete`."""
    reader = StoreReader(cfg.generate.location(), verify=cfg.loader.verify, cache_dir=cfg.loader.cache_dir)
    note = reader.require_complete(allow_incomplete=allow_incomplete)
    if note:
        _say(note)
    reader.check_chunk_files()  # a deleted or cut chunk anywhere: the store needs repair first
    reader.split_ranges("heldout", cfg.loader.heldout_chunks)  # a StoreError naming the fix if there is none
    root = Path(cfg.train.out_dir)
    variants = sweep_variants(cfg)
    saes = {name: _load_trained(root / name, variant) for name, variant in variants}
    _say(f"{len(saes)} SAE(s) on {next(iter(saes.values())).W_dec.device} (sae.device: {cfg.sae.device})")
    means = _DatasetMeans(reader, cfg.loader.heldout_chunks)
    results: dict[str, dict] = {}
    for name, sae in saes.items():
        metrics, histogram = activation_metrics(sae, reader, cfg, means.of(sae.cfg.hook_point_out))
        results[name] = metrics
        _write_json(root / name / HISTOGRAM_FILE, {"rows": metrics["rows"], "l0_histogram": histogram})
    lm_results = language_model_metrics(cfg, reader, saes, means, lm)
    for name in results:
        if isinstance(lm_results, str):
            results[name]["lm_metrics_skipped"] = lm_results
        else:
            results[name].update(lm_results[name])
    results = _plain(results)
    _write_json(root / METRICS_FILE, results)
    _say(f"wrote {root / METRICS_FILE}")
    return results


@torch.no_grad()
def activation_metrics(
    sae: SparseAutoencoder, reader: StoreReader, cfg: ExperimentConfig, dataset_mean_out: torch.Tensor
) -> tuple[dict, dict[str, int]]:
    """(metrics, L0 histogram {l0: rows}) over up to evaluate.n_tokens held-out rows."""
    loader = ActivationLoader(
        reader, [sae.cfg.hook_point_in, sae.cfg.hook_point_out], batch_size=cfg.evaluate.batch_size, split="heldout",
        heldout_chunks=cfg.loader.heldout_chunks, dtype=torch.float32, device=sae.W_dec.device,
        max_rows=cfg.evaluate.n_tokens,
    )
    rows = sum(r.rows for r in loader.ranges)
    batches = tqdm(loader, total=-(-min(rows, cfg.evaluate.n_tokens) // cfg.evaluate.batch_size), unit="batch",
                   desc="evaluate", dynamic_ncols=True)
    accumulated = heldout_metrics(sae, batches, dataset_mean_out, l0_histogram=True)
    histogram = {str(l0): count for l0, count in sorted(accumulated.l0_histogram().items())}
    return accumulated.result(), histogram


def language_model_metrics(
    cfg: ExperimentConfig,
    reader: StoreReader,
    saes: dict[str, SparseAutoencoder],
    means: _DatasetMeans,
    lm: LanguageModel | None = None,
) -> dict[str, dict] | str:
    """Spliced-LM metrics per variant, or the reason they are not defined for this model."""
    reason = _skip_reason(cfg, reader.manifest.get("model") or {})
    if reason:
        return _skipped(reason)
    if lm is None:
        lm = load_language_model(cfg.model)
    reason = _skip_reason(cfg, {"name": lm.name, "has_lm_head": lm.has_lm_head, "is_causal": lm.is_causal})
    if reason:
        return _skipped(reason)
    sequences = heldout_sequences(cfg, lm, reader, cfg.evaluate.lm_eval_sequences)
    if sequences.source == HELDOUT_TEXT:
        _say(f"language-model metrics on {len(sequences)} sequences of held-out text (documents {sequences.first_doc}+)")
    else:
        _say(f"the dataset has no documents after those the store consumed; language-model metrics on "
             f"{len(sequences)} sequences rebuilt from the held-out chunks' token rows")
    hook_means = {sae.cfg.hook_point_out: means.of(sae.cfg.hook_point_out).float() for sae in saes.values()}
    return lm_metrics(lm, sequences, saes, hook_means, cfg.evaluate.lm_eval_batch_size, cfg.evaluate.exclude_special_tokens)


def _skip_reason(cfg: ExperimentConfig, model: dict) -> str | None:
    """Why next-token metrics are undefined (None = they are, or unknown until the model loads)."""
    name = model.get("name", cfg.model.name)
    if cfg.evaluate.lm_eval_sequences <= 0:
        return "evaluate.lm_eval_sequences is 0"
    if model.get("has_lm_head") is False:
        return f"{name} has no language-model head (its checkpoint lacks one), so CE loss, CE recovered and KL are undefined"
    if model.get("is_causal") is False:
        return f"{name} is not a causal language model, so next-token CE loss, CE recovered and KL are undefined"
    return None


def _skipped(reason: str) -> str:
    _say(f"language-model metrics skipped: {reason}")
    return reason


class _DatasetMeans:
    """Training-split mean of each hook from the store's statistics, computed once per hook."""

    def __init__(self, reader: StoreReader, heldout_chunks: int):
        self.reader, self.heldout_chunks = reader, heldout_chunks
        self._means: dict[str, torch.Tensor] = {}

    def of(self, hook: str) -> torch.Tensor:
        if hook not in self._means:
            moments = store_moments(self.reader, hook, heldout_chunks=self.heldout_chunks, track_covariance=False)
            self._means[hook] = moments.mean
        return self._means[hook]


def _load_trained(directory: Path, variant: ExperimentConfig) -> SparseAutoencoder:
    try:
        return load_sae(directory, device=resolve_device(variant.sae.device))
    except FileNotFoundError:
        raise ConfigError(f"no trained SAE in {directory}; run `saeflow train` with this config first") from None


def _write_json(path: Path, data: dict) -> None:
    write_text_atomically(path, json.dumps(_plain(data), indent=2) + "\n")


def _plain(value):
    """JSON-safe: tensors and numpy scalars to Python numbers, NaN/inf to null."""
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _say(message: str) -> None:
    print(f"saeflow evaluate: {message}", file=sys.stderr, flush=True)
