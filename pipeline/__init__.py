"""saeflow: cache language-model activations once, train many sparse autoencoders from them.

The public API (README, "Python API"): load_config, SAEConfig, InitializerConfig,
SparseAutoencoder, load_sae, StoreReader, ActivationLoader; and for reading a trained SAE,
load_language_model, spliced, run_with_latents and top_examples. The stages live in
pipeline.generate, pipeline.train, pipeline.evaluate and pipeline.features, the SAE in
pipeline.sae, the activation store in `store`.

Names are imported on first use, so `import pipeline.generate.stage` (or the CLI) does not load
the SAE or the loader, and each stage imports only the code it runs (dvc.yaml's deps rely on it).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_API = {
    "load_config": "pipeline.config",
    "SAEConfig": "pipeline.sae.config",
    "InitializerConfig": "pipeline.sae.config",
    "SparseAutoencoder": "pipeline.sae.model",
    "load_sae": "pipeline.sae.io",
    "StoreReader": "store.reader",
    "ActivationLoader": "store.loader",
    "load_language_model": "pipeline.generate.lm",
    "spliced": "pipeline.evaluate.splice",
    "run_with_latents": "pipeline.evaluate.splice",
    "top_examples": "pipeline.features.examples",
}
__all__ = ["ActivationLoader", "InitializerConfig", "SAEConfig", "SparseAutoencoder", "StoreReader", "load_config", "load_language_model",
           "load_sae", "run_with_latents", "spliced", "top_examples"]

if TYPE_CHECKING:
    from pipeline.config import load_config
    from pipeline.evaluate.splice import run_with_latents, spliced
    from pipeline.features.examples import top_examples
    from pipeline.generate.lm import load_language_model
    from pipeline.sae.config import InitializerConfig, SAEConfig
    from pipeline.sae.io import load_sae
    from pipeline.sae.model import SparseAutoencoder
    from store.loader import ActivationLoader
    from store.reader import StoreReader


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    return getattr(importlib.import_module(_API[name]), name)
