"""Loss terms of SAE training, in the SAE's normalized activation space.

reconstruction (topk/batchtopk, Gao et al. 2024): sum_b ||target - x_hat||^2 over the batch's
    total variance sum_b ||target - mean_b(target)||^2 (the batch's FVU around its own mean, as
    EleutherAI sparsify's fvu): no scale to tune, and AuxK's coefficient weighs two terms of the
    same kind. OpenAI's reference divides by a fixed variance taken from a sample instead; at
    4096 rows a batch's variance is that within a percent or two.
reconstruction (relu/jumprelu): mean over the batch of ||target - x_hat||^2 summed over d_model,
    the scale their sparsity coefficients are tuned against (Anthropic 2024, SAELens).
sparsity (relu): coefficient * mean over the batch of sum_i |z_i| * ||W_D,i|| (decoder norm
    included when sae.sparsity_include_decoder_norm), or the tanh variant
    sum_i tanh(stretch * |z_i| * ||W_D,i||), which saturates for large activations.
sparsity (jumprelu): coefficient * mean over the batch of the L0, with the step function's
    straight-through rectangle-kernel gradient to the thresholds.
aux_k (topk/batchtopk): pipeline/train/aux_k.py.
"""

from __future__ import annotations

import torch


def reconstruction_loss(target: torch.Tensor, x_hat: torch.Tensor, *, normalized: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(the loss term, the batch's sum of ||target - x_hat||^2, for the metrics)."""
    squared_error = (target - x_hat).pow(2).sum()
    if normalized:
        return squared_error / total_variance(target), squared_error
    return squared_error / target.shape[0], squared_error


def total_variance(values: torch.Tensor) -> torch.Tensor:
    """sum_b ||v_b - mean_b(v)||^2 of a (B, d) batch (no gradient: a normalizer)."""
    with torch.no_grad():
        return (values - values.mean(dim=0)).pow(2).sum().clamp_min(1e-12)


def l1_sparsity(z: torch.Tensor, decoder_norms: torch.Tensor | None, *, nonnegative: bool = False) -> torch.Tensor:
    """Mean over the batch of sum_i |z_i| (* ||W_D,i||). nonnegative=True when z >= 0 is known
    (ReLU outputs): |z| = z, and the gradient is the same (|z|' = 0 only where z = 0, where
    the ReLU passes none). The weighted sum is one matrix-vector product: on a (B, d_sae)
    batch that skips two full passes forward and three backward."""
    magnitude = z if nonnegative else z.abs()
    if decoder_norms is None:
        return magnitude.sum(dim=-1).mean()
    return (magnitude @ decoder_norms.to(magnitude.dtype)).mean()


def tanh_sparsity(z: torch.Tensor, decoder_norms: torch.Tensor | None, stretch: float) -> torch.Tensor:
    weighted = z.abs() if decoder_norms is None else z.abs() * decoder_norms
    return torch.tanh(stretch * weighted).sum(dim=-1).mean()
