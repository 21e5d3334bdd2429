"""TopK in sparse form: everything after the encoder matmul costs O(B * k * d_model).

The dense TopK step does five (B x d_sae x d_model) matmuls: encoder forward, encoder weight
gradient, decoder forward, decoder weight gradient, latent gradient. Here only the encoder
forward stays dense (every latent must be scored to pick the top k):
- decode: embedding_bag(indices, W_dec, per_sample_weights=values) = sum_j v_j W_dec[idx_j];
  its backward for W_dec and values is O(B*k*d_model) too.
- the weight gradients, of the encoder and the decoder alike: only the k kept latents of each row
  receive gradient, so dW[j] = sum over rows b that kept latent j of g_bj * u_b (u = x for the
  encoder's column j, u = dL/dx_hat for the decoder's row j). Sorting the (row, latent) pairs
  by latent turns that into one embedding_bag over rows of u with one bag per latent: 2.5-4x
  faster on the CPU than torch's own embedding_bag backward for W, which scatters every pair
  into its row (bench/sae_step.py --aux).
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
    def forward(ctx, x: Tensor, W_enc: Tensor, b_enc: Tensor, hidden_pre: Tensor, groups: LatentGroups) -> Tensor:
        values = hidden_pre.gather(-1, groups.indices).relu()
        ctx.save_for_backward(x, W_enc, values)
        ctx.groups = groups
        return values

    @staticmethod
    def backward(ctx, grad_values: Tensor):
        x, W_enc, values = ctx.saved_tensors
        groups, indices = ctx.groups, ctx.groups.indices
        grad = (grad_values * (values > 0)).to(W_enc.dtype)
        grad_x = grad_W_enc = grad_b_enc = None
        if ctx.needs_input_grad[2]:
            grad_b_enc = torch.zeros(groups.d_sae, dtype=W_enc.dtype, device=W_enc.device).index_add_(
                0, indices.reshape(-1), grad.reshape(-1))
        if ctx.needs_input_grad[1]:
            grad_W_enc = groups.sums(grad, x.to(W_enc.dtype)).t()
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(indices, W_enc.t().contiguous(), mode="sum", per_sample_weights=grad).to(x.dtype)
        return grad_x, grad_W_enc, grad_b_enc, None, None


def gathered_encoder_values(x: Tensor, W_enc: Tensor, b_enc: Tensor, hidden_pre: Tensor,
                            selected: LatentGroups) -> Tensor:
    """relu(hidden_pre) at the selected indices (B, k); gradients to x, W_enc, b_enc in
    O(B*k*d_model). hidden_pre must equal x @ W_enc + b_enc (it is used detached); `selected`
    groups the indices once for this gradient and the decode's of the same indices."""
    return _GatheredEncoder.apply(x, W_enc, b_enc, hidden_pre.detach(), selected)


class LatentGroups:
    """The (row, slot) pairs of a (B, k) index tensor grouped by latent, sorted once for every
    weight gradient over them (the encoder's and the decoder's of the same selection)."""

    def __init__(self, indices: Tensor, d_sae: int):
        self.indices, self.d_sae = indices, d_sae
        self._grouping: tuple[Tensor, Tensor, Tensor] | None = None

    def sums(self, weights: Tensor, rows: Tensor) -> Tensor:
        """(d_sae, d): out[j] = sum over (b, i) with indices[b, i] == j of weights[b, i] * rows[b]
        (weights (B, k), rows (B, d)), as one embedding_bag with a bag per latent."""
        order, row_of_pair, offsets = self._grouped()
        return F.embedding_bag(row_of_pair, rows, offsets, mode="sum", per_sample_weights=weights.reshape(-1)[order])

    def _grouped(self) -> tuple[Tensor, Tensor, Tensor]:
        if self._grouping is None:
            flat_latents = self.indices.reshape(-1)
            order = torch.sort(flat_latents, stable=True).indices  # stable = radix sort: 3x faster
            counts = latent_counts(flat_latents, self.d_sae)
            offsets = counts.cumsum(0) - counts  # a latent no row kept is an empty bag: a zero row
            self._grouping = (order, order // self.indices.shape[-1], offsets)
        return self._grouping


class _SparseDecode(torch.autograd.Function):
    """x_hat = sum_j values[b, j] * W_dec[indices[b, j]]; W_dec's gradient by LatentGroups.sums."""

    @staticmethod
    def forward(ctx, values: Tensor, W_dec: Tensor, groups: LatentGroups) -> Tensor:
        ctx.save_for_backward(values, W_dec)
        ctx.groups = groups
        return F.embedding_bag(groups.indices, W_dec, mode="sum", per_sample_weights=values)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        values, W_dec = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_values = grad_W_dec = None
        if ctx.needs_input_grad[0]:  # grad_values[b, i] = grad_out[b] . W_dec[indices[b, i]]
            grad_values = row_dots(grad_out, W_dec, ctx.groups.indices)
        if ctx.needs_input_grad[1]:
            grad_W_dec = ctx.groups.sums(values, grad_out)
        return grad_values, grad_W_dec, None


def row_dots(rows: Tensor, table: Tensor, indices: Tensor) -> Tensor:
    """(B, k): rows[b] . table[indices[b, i]], without materializing the (B, k, d) gather: the
    op torch's own embedding_bag backward computes the per-sample weights' gradient with."""
    B, k = indices.shape
    flat = indices.reshape(-1)
    bags = torch.arange(0, B * k, k, device=flat.device)
    bag_of_index = torch.arange(B * k, device=flat.device) // k
    return torch.ops.aten._embedding_bag_per_sample_weights_backward(
        rows, table, flat, bags, bag_of_index, 0, -1).view(B, k)


def sparse_decode(values: Tensor, selected: LatentGroups, W_dec: Tensor) -> Tensor:
    """sum_j values[b, j] * W_dec[indices[b, j]] -> (B, d_out) over the selected indices, without
    the bias."""
    return _SparseDecode.apply(values.to(W_dec.dtype), W_dec, selected)
