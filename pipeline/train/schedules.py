"""Step-indexed schedules: learning rate, sparsity-coefficient warmup, top-k annealing.

All are pure functions of the step so that a resumed run needs only the step count.
"""

from __future__ import annotations

import math

from pipeline.config import TrainConfig


def lr_multiplier(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Linear warmup over lr_warmup_steps, then the schedule's shape, reaching 0 at the end.

    constant: flat, then linear decay to 0 over the last lr_decay_steps (at most all the steps
              after warmup, so a short run, e.g. a sweep's, keeps the peak lr after warmup).
    linear:   linear decay from 1 after warmup to 0 at total_steps.
    cosine:   cosine decay from 1 after warmup to 0 at total_steps.
    """
    if cfg.lr_warmup_steps and step < cfg.lr_warmup_steps:
        return (step + 1) / cfg.lr_warmup_steps
    after_warmup = max(total_steps - cfg.lr_warmup_steps, 1)
    progress = min(max(step - cfg.lr_warmup_steps, 0) / after_warmup, 1.0)
    if cfg.lr_schedule == "linear":
        return 1.0 - progress
    if cfg.lr_schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    decay_steps = min(cfg.lr_decay_steps, after_warmup)
    if decay_steps and step >= total_steps - decay_steps:
        return max(total_steps - step, 0) / decay_steps
    return 1.0


def sparsity_coefficient(step: int, cfg: TrainConfig) -> float:
    """The L1/tanh coefficient, warmed up linearly (dense early training finds features first)."""
    if cfg.l1_warmup_steps and step < cfg.l1_warmup_steps:
        return cfg.l1_coefficient * (step + 1) / cfg.l1_warmup_steps
    return cfg.l1_coefficient


def annealed_k(step: int, top_k: int, d_sae: int, cfg: TrainConfig) -> int:
    """Top-k annealed linearly from k_anneal_start (default min(4k, d_sae)) down to top_k."""
    if not cfg.k_anneal_steps or step >= cfg.k_anneal_steps:
        return top_k
    start = cfg.k_anneal_start or min(4 * top_k, d_sae)
    return int(round(start + (top_k - start) * step / cfg.k_anneal_steps))
