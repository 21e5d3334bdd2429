"""Activation functions: the table of their traits (ACT_FNS), and JumpReLU, its L0 step and
BatchTopK with their training gradients.

JumpReLU (Rajamanoharan et al. 2024, "Jumping Ahead"): z = h * H(h - theta). The jump has no
gradient, so theta learns through a straight-through pseudo-derivative with a rectangle kernel
K(u) = 1[|u| < 1/2] of width epsilon (the config's jumprelu_window):
    d z / d theta   := -(theta / epsilon) * K((h - theta) / epsilon)
    d H / d theta   := -(1 / epsilon)     * K((h - theta) / epsilon)     (the L0 penalty)
and z passes gradient to h only where the latent is active (no STE on h). Only pre-activations
within epsilon/2 of the threshold move it. grad_output is multiplied into the threshold's
gradient, as in the paper (and lm_saes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor


def _rectangle(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


def _sum_to_latents(grad: Tensor) -> Tensor:
    """Sum a (..., d_sae) gradient over every leading (batch) dimension."""
    return grad.reshape(-1, grad.shape[-1]).sum(0)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, threshold: Tensor, window: float) -> Tensor:
        ctx.save_for_backward(h, threshold)
        ctx.window = window
        return h * (h > threshold)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        h, threshold = ctx.saved_tensors
        window = ctx.window
        grad_h = grad_out * (h > threshold)
        kernel = _rectangle((h - threshold) / window)
        grad_threshold = _sum_to_latents(-(threshold / window) * kernel * grad_out)
        return grad_h, grad_threshold, None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, threshold: Tensor, window: float) -> Tensor:
        ctx.save_for_backward(h, threshold)
        ctx.window = window
        return (h > threshold).to(h.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        h, threshold = ctx.saved_tensors
        window = ctx.window
        kernel = _rectangle((h - threshold) / window)
        grad_threshold = _sum_to_latents(-(1.0 / window) * kernel * grad_out)
        return None, grad_threshold, None


def jumprelu(h: Tensor, threshold: Tensor, window: float) -> Tensor:
    """h * H(h - threshold); threshold (d_sae,) gets the rectangle-kernel gradient."""
    return _JumpReLU.apply(h, threshold, window)


def heaviside_step(h: Tensor, threshold: Tensor, window: float) -> Tensor:
    """H(h - threshold) as 0/1 values; gradient reaches only the threshold (for an L0 loss)."""
    return _Step.apply(h, threshold, window)


def batch_topk_mask(gate: Tensor, k_per_row: int) -> Tensor:
    """Boolean mask of the k * B largest entries of gate (B, d_sae) over the whole batch
    (Bussmann et al. 2024, BatchTopK): rows share the budget, so L0 varies per row."""
    rows, width = gate.shape
    kept = min(k_per_row * rows, rows * width)
    flat_indices = gate.reshape(-1).topk(kept, sorted=False).indices
    mask = torch.zeros(rows * width, dtype=torch.bool, device=gate.device)
    mask[flat_indices] = True
    return mask.view(rows, width)


@torch.no_grad()
def update_batchtopk_threshold(threshold: Tensor, gate: Tensor, mask: Tensor, momentum: float) -> None:
    """Running estimate of the inference threshold: an exponential moving average of the
    smallest positive gate value BatchTopK kept in each training batch (Bussmann et al.).
    The first batch sets it directly (threshold still 0). No host sync."""
    kept_positive = gate.masked_fill(~mask | (gate <= 0), float("inf"))
    smallest = kept_positive.min()
    if_found = torch.isfinite(smallest)
    smallest = torch.where(if_found, smallest, threshold).to(threshold.dtype)
    blended = (1 - momentum) * threshold + momentum * smallest
    threshold.copy_(torch.where(threshold > 0, blended, smallest))


@dataclass(frozen=True)
class ActFn:
    """What saeflow needs to know about an activation function: the one table that the model,
    initializer, trainer and exporter consult instead of testing act_fn names."""

    name: str
    uses_top_k: bool  # top_k sets the sparsity (per row, or per row on average): k schedules and AuxK apply
    row_top_k: bool  # exactly the top k of each row: the sparse (values, indices) path applies
    sparsity_loss: Literal["l1", "l0"] | None  # the trainer's penalty; None: sparse by construction
    threshold: Literal["log_threshold", "batchtopk_threshold"] | None  # the learned threshold tensor
    saelens_architecture: str  # as an SAE in SAELens (batchtopk runs there as a jumprelu)
    # act(s * h) = s * act(h) for every s > 0 in training mode (no fixed threshold): the
    # initial reconstruction is then quadratic in the decoder norm (initialize.py, step 4)
    scale_equivariant: bool


ACT_FNS = {
    "relu": ActFn("relu", uses_top_k=False, row_top_k=False, sparsity_loss="l1", threshold=None, saelens_architecture="standard",
                  scale_equivariant=True),
    "topk": ActFn("topk", uses_top_k=True, row_top_k=True, sparsity_loss=None, threshold=None, saelens_architecture="topk",
                  scale_equivariant=True),
    "batchtopk": ActFn("batchtopk", uses_top_k=True, row_top_k=False, sparsity_loss=None, threshold="batchtopk_threshold",
                       saelens_architecture="jumprelu", scale_equivariant=True),
    "jumprelu": ActFn("jumprelu", uses_top_k=False, row_top_k=False, sparsity_loss="l0", threshold="log_threshold",
                      saelens_architecture="jumprelu", scale_equivariant=False),
}
ActFnName = Literal["relu", "topk", "batchtopk", "jumprelu"]
