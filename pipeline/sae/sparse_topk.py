"""TopK in sparse form: everything after the encoder matmul costs O(B * k * d_model).

The dense TopK step does five (B x d_sae x d_model) matmuls: encoder forward, encoder weight
gradient, decoder forward, decoder weight gradient, latent gradient. Here only the encoder
forward stays dense (every latent must be scored to pick the top k):
- decode: embedding_bag(indices, W_dec, per_sample_weights=values) = sum_j v_j W_dec[idx_j];
  its backward for W_dec and values is O(B*k*d_model) too.
- the encoder's gradients: only the k kept pre-activations of each row receive gradient, so
  dW_enc[:, j] = sum over rows b that kept latent j of g_bj * x_b. Sorting the (row, latent)
  pairs by latent turns that into one embedding_bag over rows of x with one bag per latent.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.sae.encoder_kernel import pre_activations


def pre_activations_no_grad(x: Tensor, W_enc: Tensor, b_enc: Tensor) -> Tensor:
    """x @ W_enc + b_enc, (B, d_sae), with no autograd graph: the sparse path only selects from
    it and takes its gradients through gathered_encoder_values. On the CPU in float32 by the
    faster of torch's matmul and oneDNN's inner product, timed once per problem shape
    (pipeline/sae/encoder_kernel.py)."""
    with torch.no_grad():
        return pre_activations(x, W_enc, b_enc)


def latent_counts(indices: Tensor, d_sae: int, present: Tensor | None = None) -> Tensor:
    """(d_sae,) int64: how often each latent occurs in `indices` (where `present`, a bool tensor
    of the same shape, is true). A scatter-add, not bincount: CUDA's bincount sizes its output
    from the indices' max, a host sync in every training step."""
    ones = torch.ones_like(indices) if present is None else present.to(indices.dtype)
    return torch.zeros(d_sae, dtype=torch.int64, device=indices.device).scatter_add_(0, indices.reshape(-1), ones.reshape(-1))


def topk_indices(gate: Tensor, k: int) -> Tensor:
    """(B, k) indices of the k largest gate values per row (selection only: no gradient)."""
    return gate.detach().topk(k, dim=-1, sorted=False).indices


class _GatheredEncoder(torch.autograd.Function):
    """values = relu((x @ W_enc + b_enc)[b, indices[b]]), with sparse backward.

    hidden_pre is passed in (already computed for the selection) so the forward costs a gather.
    """

    @staticmethod
    def forward(ctx, x: Tensor, W_enc: Tensor, b_enc: Tensor, hidden_pre: Tensor, indices: Tensor) -> Tensor:
        values = hidden_pre.gather(-1, indices).relu()
        ctx.save_for_backward(x, W_enc, indices, values)
        return values

    @staticmethod
    def backward(ctx, grad_values: Tensor):
        x, W_enc, indices, values = ctx.saved_tensors
        grad = (grad_values * (values > 0)).to(W_enc.dtype)
        flat_latents = indices.reshape(-1)
        flat_grad = grad.reshape(-1)
        d_sae = W_enc.shape[1]
        grad_x = grad_W_enc = grad_b_enc = None
        if ctx.needs_input_grad[2]:
            grad_b_enc = torch.zeros(d_sae, dtype=W_enc.dtype, device=W_enc.device).index_add_(0, flat_latents, flat_grad)
        if ctx.needs_input_grad[1]:
            order = torch.sort(flat_latents, stable=True).indices  # stable = radix sort: 3x faster
            rows = order // indices.shape[-1]
            counts = latent_counts(flat_latents, d_sae)
            offsets = counts.cumsum(0) - counts
            grad_W_enc_t = F.embedding_bag(
                rows, x.to(W_enc.dtype), offsets, mode="sum", per_sample_weights=flat_grad[order]
            )
            grad_W_enc = grad_W_enc_t.t()
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(indices, W_enc.t().contiguous(), mode="sum", per_sample_weights=grad).to(x.dtype)
        return grad_x, grad_W_enc, grad_b_enc, None, None


def gathered_encoder_values(x: Tensor, W_enc: Tensor, b_enc: Tensor, hidden_pre: Tensor, indices: Tensor) -> Tensor:
    """relu(hidden_pre) at `indices` (B, k); gradients to x, W_enc, b_enc in O(B*k*d_model).
    hidden_pre must equal x @ W_enc + b_enc (it is used detached)."""
    return _GatheredEncoder.apply(x, W_enc, b_enc, hidden_pre.detach(), indices)


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    """sum_j values[b, j] * W_dec[indices[b, j]] -> (B, d_out), without the bias."""
    return F.embedding_bag(indices, W_dec, mode="sum", per_sample_weights=values.to(W_dec.dtype))
