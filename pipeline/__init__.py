"""saeflow: cache language-model activations once, train many sparse autoencoders from them.

The public API (see README "Python API"); the stages live in pipeline.generate, pipeline.train
and pipeline.evaluate, the SAE in pipeline.sae and the activation store in the store package.
"""

from pipeline.config import load_config
from pipeline.sae.config import InitializerConfig, SAEConfig
from pipeline.sae.io import load_sae
from pipeline.sae.model import SparseAutoencoder
from store.loader import ActivationLoader
from store.reader import StoreReader

__all__ = [
    "ActivationLoader",
    "InitializerConfig",
    "SAEConfig",
    "SparseAutoencoder",
    "StoreReader",
    "load_config",
    "load_sae",
]
