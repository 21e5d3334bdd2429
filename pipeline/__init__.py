"""saeflow stage 2 and orchestration: configs, models, generate/train/evaluate, CLI."""

from pipeline.sae_config import InitializerConfig, SAEConfig

__all__ = ["SAEConfig", "InitializerConfig"]
