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
aux_k (topk/batchtopk, Gao et al. 2024): the residual e = target - x_hat (detached) is
    reconstructed by each row's k_aux largest pre-activations among dead latents (ReLU'd, no
    decoder bias): aux = sum_b ||e - e_hat||^2 / sum_b ||e - mean_b(e)||^2, times
    aux_k_coefficient; 0 when no latent is dead. It gives dead latents a gradient towards what
    the live ones miss. Dead = not fired in the last train.dead_window_tokens() tokens.
"""

from __future__ import annotations

from collections.abc import Callable

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


def aux_k_loss(
    residual: torch.Tensor,
    hidden_pre: torch.Tensor,
    dead_mask: torch.Tensor,
    decoder_weight: torch.Tensor,
    k_aux: int,
    values_at: Callable[[torch.Tensor], torch.Tensor] | None = None,
    *,
    sync_free: bool = False,
) -> torch.Tensor:
    """residual (B, d) detached; hidden_pre (B, d_sae); decoder_weight (d_sae, d).

    values_at(indices) -> relu(hidden_pre) at (B, k) indices, with gradient; default: gathered
    from hidden_pre by autograd, whose backward is a dense (B, d_sae) gradient and, through the
    encoder, a dense matmul. The trainer's TopK sparse path passes pipeline.sae.sparse_topk's
    gathered encoder values instead: the same values and gradients in O(B * k * d_model).

    sync_free: fixed shapes throughout (a top-k over hidden_pre with live latents masked out),
    for accelerators, where the default's data-dependent shapes (which latents are dead) cost a
    host sync every step. The CPU default instead selects among the dead columns only: the same
    loss and gradients, 10x cheaper when few latents are dead."""
    if sync_free:
        return _aux_k_loss_fixed_shape(residual, hidden_pre, dead_mask, decoder_weight, k_aux, values_at)
    dead_latents = dead_mask.nonzero().squeeze(1)
    n_dead = dead_latents.numel()
    if n_dead == 0:
        return hidden_pre.new_zeros(())
    k = min(k_aux, n_dead)
    # top-k among the dead columns only: the same choice as a top-k over hidden_pre with live
    # latents masked to -inf. Selection carries no gradient.
    with torch.no_grad():
        positions = hidden_pre.index_select(-1, dead_latents).topk(k, dim=-1, sorted=False).indices
    indices = dead_latents[positions]
    values = values_at(indices) if values_at is not None else hidden_pre.gather(-1, indices).relu()
    return _normalized_error(residual, indices, values, decoder_weight)


def _aux_k_loss_fixed_shape(residual, hidden_pre, dead_mask, decoder_weight, k_aux, values_at) -> torch.Tensor:
    k = min(k_aux, hidden_pre.shape[-1])
    with torch.no_grad():
        indices = hidden_pre.masked_fill(~dead_mask, float("-inf")).topk(k, dim=-1, sorted=False).indices
    values = values_at(indices) if values_at is not None else hidden_pre.gather(-1, indices).relu()
    values = values * dead_mask[indices]  # fewer than k dead: the live latents picked add nothing
    return dead_mask.any() * _normalized_error(residual, indices, values, decoder_weight)  # 0 when none is dead


def _normalized_error(residual, indices, values, decoder_weight) -> torch.Tensor:
    """||e - e_hat||^2 / ||e - mean(e)||^2 over the batch, e_hat = the latents' decoder rows
    weighted by their values (no decoder bias)."""
    e_hat = torch.nn.functional.embedding_bag(
        indices, decoder_weight, per_sample_weights=values.to(decoder_weight.dtype), mode="sum"
    )
    return (residual - e_hat).pow(2).sum() / total_variance(residual)
