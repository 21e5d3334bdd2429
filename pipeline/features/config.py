"""The `features` section of the experiment config (pipeline/config.py holds the others): the
settings of `saeflow features`. Kept with its stage, as the SAE's sections are with the SAE; the
other stages validate it with the config but never read it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipeline.sae.config import StrictModel


class FeaturesConfig(StrictModel):
    """`saeflow features`: what each latent means, from the store's own rows (pipeline/features/)."""

    split: Literal["heldout", "train"] = "heldout"
    """rows to read: heldout (the last loader.heldout_chunks chunks) or train (the chunks before them; more examples)"""
    n_tokens: int | None = Field(None, ge=1)
    """read at most this many rows of the split, from its start (null = all of it)"""
    batch_size: int = Field(4096, ge=1)
    """activation rows per SAE forward pass"""
    top_examples: int = Field(10, ge=1)
    """top-activating rows kept per latent"""
    intervals: int = Field(4, ge=1)
    """activation quantile intervals per latent (each about 1/intervals of its firings)"""
    interval_examples: int = Field(5, ge=0)
    """rows sampled uniformly (seeded) from each quantile interval"""
    histogram_bins: int = Field(32, ge=2, le=1024)
    """equal bins of each latent's activation histogram over [0, a power of two above its max]"""
    context_tokens: int = Field(10, ge=0)
    """tokens shown on each side of an example, within the LM window it was computed in"""
    logit_tokens: int = Field(10, ge=0)
    """tokens listed per latent as most promoted and most suppressed by its decoder direction (causal LMs; 0 = none)"""
    seed: int = Field(0, ge=0)
    """seed of the interval samples"""
