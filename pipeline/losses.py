"""Loss terms of SAE training, in the SAE's normalized activation space.

reconstruction: mean over the batch of ||target - x_hat||^2 (summed over d_model).
sparsity (relu): coefficient * mean over the batch of sum_i |z_i| * ||W_D,i|| (decoder norm
    included when sae.sparsity_include_decoder_norm), or the tanh variant
    sum_i tanh(stretch * |z_i| * ||W_D,i||), which saturates for large activations.
sparsity (jumprelu): coefficient * mean over the batch of the L0, with the step function's
    straight-through rectangle-kernel gradient to the thresholds.
aux_k (topk/batchtopk, Gao et al. 2024): the residual e = target - x_hat (detached) is
    reconstructed by the k_aux largest pre-activations among dead latents (no decoder bias):
    aux = ||e - e_hat||^2 / ||e - mean(e)||^2 summed over the batch, scaled by
    min(n_dead / k_aux, 1), times aux_k_coefficient. It gives dead latents a gradient towards
    what the live ones miss. Dead = not fired in the last dead_threshold_tokens tokens.
"""

from __future__ import annotations

import torch


def reconstruction_loss(target: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    return (target - x_hat).pow(2).sum(dim=-1).mean()


def l1_sparsity(z: torch.Tensor, decoder_norms: torch.Tensor | None) -> torch.Tensor:
    weighted = z.abs() if decoder_norms is None else z.abs() * decoder_norms
    return weighted.sum(dim=-1).mean()


def tanh_sparsity(z: torch.Tensor, decoder_norms: torch.Tensor | None, stretch: float) -> torch.Tensor:
    weighted = z.abs() if decoder_norms is None else z.abs() * decoder_norms
    return torch.tanh(stretch * weighted).sum(dim=-1).mean()


def aux_k_loss(
    residual: torch.Tensor,
    hidden_pre: torch.Tensor,
    dead_mask: torch.Tensor,
    decoder_weight: torch.Tensor,
    k_aux: int,
) -> torch.Tensor:
    """residual (B, d) detached; hidden_pre (B, d_sae); decoder_weight (d_sae, d)."""
    n_dead = int(dead_mask.sum())
    if n_dead == 0:
        return hidden_pre.new_zeros(())
    k = min(k_aux, n_dead)
    dead_pre = hidden_pre.masked_fill(~dead_mask, float("-inf"))
    values, indices = dead_pre.topk(k, dim=-1, sorted=False)
    values = values.relu()
    e_hat = torch.nn.functional.embedding_bag(
        indices, decoder_weight, per_sample_weights=values.to(decoder_weight.dtype), mode="sum"
    )
    variance = (residual - residual.mean(dim=0)).pow(2).sum().clamp_min(1e-12)
    scale = min(n_dead / k_aux, 1.0)
    return scale * (residual - e_hat).pow(2).sum() / variance
