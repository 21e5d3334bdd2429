"""`saeflow features`: what each latent of every trained SAE of a config means, from its store.

For each variant (sweep_variants) in <train.out_dir>/<name>/, one pass over the rows of
features.split (scan.py: statistics, top and interval examples), a second, small one over the
examples' context rows (examples.py), the decoder directions' logit effects for causal LMs
(logits.py), then
<train.out_dir>/<name>/features/features.json (report.py; docs/features.md) and index.html
(dashboard.py), both written atomically.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from pipeline.config import ConfigError, ExperimentConfig, FeaturesConfig, resolve_device
from pipeline.sweeps import sweep_variants
from pipeline.features.dashboard import render_dashboard
from pipeline.features.examples import example_contexts, store_tokenizer
from pipeline.features.logits import logit_effects, skip_reason, unembedding
from pipeline.features.report import Picked, build_report
from pipeline.features.scan import scan, split_rows
from pipeline.features.stats import LatentStats
from pipeline.files import write_text_atomically
from pipeline.generate.lm import LanguageModel, load_language_model
from pipeline.sae.io import load_sae
from pipeline.sae.model import SparseAutoencoder
from store.format import StoreError
from store.reader import Split, StoreReader
from store.split import SHUFFLED_KEY

FEATURES_DIR = "features"
REPORT_FILE = "features.json"
DASHBOARD_FILE = "index.html"


def features(cfg: ExperimentConfig, *, split: Split | None = None, lm: LanguageModel | None = None) -> dict[str, Path]:
    """Write features.json and index.html for every variant of cfg; {variant: its features/ folder}.
    split overrides features.split; `lm` reuses a loaded model (tests, notebooks)."""
    settings = cfg.features if split is None else cfg.features.model_copy(update={"split": split})
    reader = StoreReader(cfg.generate.location(), verify=cfg.loader.verify, cache_dir=cfg.loader.cache_dir)
    shuffled = reader.manifest.get(SHUFFLED_KEY)
    if shuffled:  # an example's context is its neighbouring rows, which a shuffled copy no longer keeps
        raise StoreError(f"store {reader.path} is a shuffled copy, whose rows are out of document order; read latents on "
                         f"its source (the same rows): --set generate.store={shuffled['source']}")
    reader.check_chunk_files()
    first_row, _ = split_rows(reader, settings.split, cfg.loader.heldout_chunks)  # a StoreError naming the fix if empty
    root = Path(cfg.train.out_dir)
    saes = {name: _load_trained(root / name, variant) for name, variant in sweep_variants(cfg)}
    tokenizer = store_tokenizer(reader)
    w_u = _unembedding(cfg, settings, reader, lm)
    if isinstance(w_u, str):
        _say(f"logit effects skipped: {w_u}")
    written = {}
    for name, sae in saes.items():
        stats = _statistics(name, sae, reader, cfg, settings)
        picked = Picked.of(stats)
        contexts = example_contexts(sae, reader, *picked.example_rows(), settings.context_tokens, settings.batch_size)
        header = {
            "variant": name,
            "store": {"path": str(reader.path), "identity": reader.identity(),
                      "model": (reader.manifest.get("model") or {}).get("name"),
                      "dataset": (reader.manifest.get("dataset") or {}).get("source")},
            "split": settings.split,
            "first_row": first_row,
            "settings": settings.model_dump(mode="json", exclude={"split"}),
            "summary": stats.summary(),
        }
        logits = w_u if isinstance(w_u, str) else logit_effects(sae, w_u, settings.logit_tokens)
        report = build_report(header, sae, stats, picked, contexts, logits, tokenizer)
        text = json.dumps(report, separators=(",", ":"), allow_nan=False)
        directory = root / name / FEATURES_DIR
        directory.mkdir(parents=True, exist_ok=True)
        write_text_atomically(directory / REPORT_FILE, text + "\n")
        write_text_atomically(directory / DASHBOARD_FILE, render_dashboard(text))
        alive = int((stats.count > 0).sum())
        _say(f"{name}: {sae.cfg.d_sae} latents ({alive} fire) on {stats.rows} {settings.split} rows -> {directory / DASHBOARD_FILE}")
        written[name] = directory
    return written


def _statistics(name: str, sae: SparseAutoencoder, reader: StoreReader, cfg: ExperimentConfig,
                settings: FeaturesConfig) -> LatentStats:
    stats = LatentStats(sae.cfg.d_sae, top_n=settings.top_examples, sample_n=settings.interval_examples,
                        bins=settings.histogram_bins, intervals=settings.intervals, seed=settings.seed, device=sae.W_dec.device)
    scan(sae, reader, stats, split=settings.split, heldout_chunks=cfg.loader.heldout_chunks, batch_size=settings.batch_size,
         max_rows=settings.n_tokens, num_workers=cfg.loader.num_workers,
         prefetch_batches=cfg.loader.prefetch_batches, desc=f"features {name}")
    return stats


def _unembedding(cfg: ExperimentConfig, settings: FeaturesConfig, reader: StoreReader,
                 lm: LanguageModel | None) -> torch.Tensor | str:
    """W_U (final norm folded), or why logit effects are not defined; the LM loads only if needed."""
    if settings.logit_tokens == 0:
        return "features.logit_tokens is 0"
    reason = skip_reason(reader.manifest.get("model") or {})
    if reason:
        return reason
    lm = lm or load_language_model(cfg.model)
    return skip_reason({"name": lm.name, "is_causal": lm.is_causal, "has_lm_head": lm.has_lm_head}) or unembedding(lm.model)


def _load_trained(directory: Path, variant: ExperimentConfig) -> SparseAutoencoder:
    try:
        return load_sae(directory, device=resolve_device(variant.sae.device))
    except FileNotFoundError:
        raise ConfigError(f"no trained SAE in {directory}; run `saeflow train` with this config first") from None


def _say(message: str) -> None:
    print(f"saeflow features: {message}", file=sys.stderr, flush=True)
