"""AuxK (Gao et al. 2024): dead latents learn to reconstruct what the live ones miss.

    aux = sum_b ||e_b - e_hat_b||^2 / sum_b ||e_b - mean_b(e)||^2,   e = target - x_hat (detached),
    e_hat_b = sum over the k_aux largest pre-activations of row b among dead latents j of
              relu(hidden_pre_bj) * W_dec[j]   (no decoder bias).

Only entries with a positive pre-activation contribute (ReLU: value and gradient 0 otherwise),
which the CPU path uses. Three implementations of the same loss and gradients (tested against
a naive dense computation in tests/train/test_aux_k.py):
- dead columns (CPU): the (B, n) pre-activations of the dead latents; a row whose positive
  entries number at most k_aux needs no top-k (they are its top-k's only nonzero values); the
  columns no row uses are dropped; e_hat is one (B, n) @ (n, d) matmul, and the backward three
  more of that size. The table chooses it while n <= DENSE_COLUMNS_PER_K_AUX * k_aux; near
  there, training times both decodes (aux_k_path.py).
- gathered (CPU, more dead latents than that): each row's k_aux indices, decoded by
  embedding_bag, the weight gradients grouped by latent (sparse_topk.LatentGroups, one sort for
  the encoder's and the decoder's); O(B * k_aux * d) whatever the number of dead latents, but
  memory-bound. The path is chosen before any mask is built: the gathered top-k needs none.
- fixed shapes (accelerators): a top-k over hidden_pre with live latents masked out, so that
  no shape depends on values (no host sync in a step, tests/train/test_sync.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.sae.sparse_topk import LatentGroups, gathered_encoder_values, sparse_decode
from pipeline.train.losses import total_variance

# The table: dead columns decoded by matmul up to this many per k_aux, by embedding_bag beyond:
# the matmul does n/k_aux times the arithmetic at several times the speed. Measured with
# bench/sae_step.py --aux on an AMD EPYC (gathered faster from n_dead/k_aux 4.8-6.4, columns at
# 3.2; 2026-12-03); an Intel Xeon put the crossover between 6.4 and 9.6, so training times both
# near it (aux_k_path.py).
DENSE_COLUMNS_PER_K_AUX = 4


def table_says_columns(n_dead: int, k_aux: int) -> bool:
    return n_dead <= DENSE_COLUMNS_PER_K_AUX * k_aux


def aux_k_loss(
    residual: Tensor,
    hidden_pre: Tensor,
    dead_mask: Tensor,
    W_dec: Tensor,
    k_aux: int,
    encoder: tuple[Tensor, Tensor, Tensor] | None = None,
    *,
    sync_free: bool = False,
    columns: bool | None = None,
) -> Tensor:
    """residual (B, d) detached; hidden_pre (B, d_sae); dead_mask (d_sae,) bool; W_dec (d_sae, d).

    encoder = (x, W_enc, b_enc) when hidden_pre carries no graph (the sparse TopK path): the
    dead latents' gradients go to W_enc and b_enc directly, costing only the dead latents' share;
    None: through hidden_pre by autograd. sync_free: the fixed-shape accelerator version.
    columns: decode the dead columns by matmul (True) or gathered (False); None: the table's."""
    if sync_free:
        return _fixed_shape(residual, hidden_pre, dead_mask, W_dec, k_aux, encoder)
    dead = dead_mask.nonzero().squeeze(1)
    if dead.numel() == 0:
        return hidden_pre.new_zeros(())
    with torch.no_grad():
        pre = hidden_pre.detach().index_select(1, dead)
    if columns is None:
        columns = table_says_columns(dead.numel(), k_aux)
    if not columns:  # decided first: the gathered top-k needs no mask
        return _gathered(residual, hidden_pre, dead, pre, W_dec, k_aux, encoder)
    with torch.no_grad():
        keep = _kept_entries(pre, k_aux)
        used = keep.any(dim=0)  # columns no row keeps add nothing to the loss or any gradient
        if not bool(used.any()):
            return hidden_pre.new_zeros(())
        if not bool(used.all()):
            dead, pre, keep = dead[used], pre[:, used], keep[:, used]
    values = _column_values(hidden_pre, pre, keep, dead, encoder)
    e_hat = values.to(W_dec.dtype) @ W_dec.index_select(0, dead)
    return (residual - e_hat).pow(2).sum() / total_variance(residual)


def _kept_entries(pre: Tensor, k_aux: int) -> Tensor:
    """(B, n) bool: the positive entries among each row's k_aux largest."""
    positive = pre > 0
    if pre.shape[1] <= k_aux:
        return positive
    crowded = (positive.sum(dim=1) > k_aux).nonzero().squeeze(1)  # rows with more positives than k_aux
    if crowded.numel():
        top = pre.index_select(0, crowded).topk(k_aux, dim=1, sorted=False).indices
        in_top = torch.zeros(crowded.numel(), pre.shape[1], dtype=torch.bool, device=pre.device).scatter_(1, top, True)
        positive[crowded] &= in_top
    return positive


def _column_values(hidden_pre: Tensor, pre: Tensor, keep: Tensor, columns: Tensor, encoder) -> Tensor:
    """(B, n) relu'd pre-activations of `columns` where `keep` (0 elsewhere), with gradient."""
    if encoder is None:
        return (hidden_pre.index_select(1, columns) * keep).relu()
    x, W_enc, b_enc = encoder
    return _ColumnEncoder.apply(x, W_enc, b_enc, pre.masked_fill(~keep, 0.0), columns)


class _ColumnEncoder(torch.autograd.Function):
    """values = relu(pre), pre = (x @ W_enc + b_enc)[:, columns] where kept (0 elsewhere);
    the backward is one (d, B) @ (B, n) matmul into W_enc's columns."""

    @staticmethod
    def forward(ctx, x: Tensor, W_enc: Tensor, b_enc: Tensor, pre: Tensor, columns: Tensor) -> Tensor:
        values = pre.relu()
        ctx.save_for_backward(x, values, columns)
        ctx.shapes = (W_enc.shape, W_enc.dtype)
        return values

    @staticmethod
    def backward(ctx, grad_values: Tensor):
        x, values, columns = ctx.saved_tensors
        shape, dtype = ctx.shapes
        grad = (grad_values * (values > 0)).to(dtype)
        grad_W_enc = grad_b_enc = None
        if ctx.needs_input_grad[1]:
            grad_W_enc = torch.zeros(shape, dtype=dtype, device=grad.device)
            grad_W_enc.index_copy_(1, columns, x.to(dtype).t() @ grad)
        if ctx.needs_input_grad[2]:
            grad_b_enc = torch.zeros(shape[1], dtype=dtype, device=grad.device).index_copy_(0, columns, grad.sum(0))
        return None, grad_W_enc, grad_b_enc, None, None


def _gathered(residual, hidden_pre, dead, pre, W_dec, k_aux, encoder) -> Tensor:
    """Each row's k_aux largest dead pre-activations, decoded by embedding_bag."""
    with torch.no_grad():
        groups = LatentGroups(dead[pre.topk(min(k_aux, dead.numel()), dim=1, sorted=False).indices], W_dec.shape[0])
    return _decoded_error(residual, _values_at(hidden_pre, groups, encoder), groups, W_dec)


def _fixed_shape(residual, hidden_pre, dead_mask, W_dec, k_aux, encoder) -> Tensor:
    k = min(k_aux, hidden_pre.shape[-1])
    with torch.no_grad():
        indices = hidden_pre.detach().masked_fill(~dead_mask, float("-inf")).topk(k, dim=-1, sorted=False).indices
    groups = LatentGroups(indices, W_dec.shape[0])
    values = _values_at(hidden_pre, groups, encoder) * dead_mask[indices]  # live latents picked add nothing
    return dead_mask.any() * _decoded_error(residual, values, groups, W_dec)  # 0 when none is dead


def _values_at(hidden_pre: Tensor, groups: LatentGroups, encoder) -> Tensor:
    if encoder is None:
        return hidden_pre.gather(-1, groups.indices).relu()
    x, W_enc, b_enc = encoder
    return gathered_encoder_values(x, W_enc, b_enc, hidden_pre, groups)


def _decoded_error(residual: Tensor, values: Tensor, groups: LatentGroups, W_dec: Tensor) -> Tensor:
    e_hat = sparse_decode(values, groups, W_dec)
    return (residual - e_hat).pow(2).sum() / total_variance(residual)
