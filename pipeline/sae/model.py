"""The sparse autoencoder of the seed (and its transcoder form), built from an SAEConfig.

    hidden_pre = x @ W_enc + b_enc            (GLU: times sigmoid(x @ W_enc_glu + b_enc_glu))
    z          = act(hidden_pre)              relu | topk | batchtopk | jumprelu
    x_hat      = z @ W_dec + b_dec

Shapes follow SAELens, which we export to: W_enc (d_model, d_sae), W_dec (d_sae, d_model),
b_enc (d_sae,), b_dec (d_model,). The seed's W_E is W_enc.T and its W_D is W_dec.T.

Spaces. encode_pre/decode/forward work in the *normalized* space the SAE trains in. The trainer
calls normalize_input(x_in) and normalize_target(x_out, x_in) first; inference on raw
activations goes through encode(x_raw) (the latents) and reconstruct(x_raw), which undoes the
scaling. Dataset-wise factors are
the buffers norm_factor_in / norm_factor_out (x_normalized = x * factor); fold_normalization()
moves them into the weights so a saved SAE reads raw activations ("inference").

sparsity_include_decoder_norm: latents are ranked (topk, batchtopk) and gated (jumprelu,
batchtopk threshold) by gate = hidden_pre * ||W_dec row|| (the norms detached: they select,
they do not train), as lm_saes does; activations themselves stay hidden_pre. A trainer that keeps
every decoder row at unit norm sets decoder_rows_are_unit, and the (B, d_sae) multiply by
norms of 1 is skipped (8% of a CPU TopK step at d_sae 3072).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pipeline.config import resolve_device
from pipeline.sae import decode_path
from pipeline.sae.activation_fns import batch_topk_mask, heaviside_step, jumprelu, update_batchtopk_threshold
from pipeline.sae.config import SAEConfig
from pipeline.sae.sparse_topk import (
    LatentGroups,
    gathered_encoder_values,
    latent_counts,
    pre_activations_no_grad,
    sparse_decode,
    topk_indices,
)

# Momentum of the running BatchTopK inference threshold (SAELens' topk_threshold_lr).
BATCHTOPK_THRESHOLD_MOMENTUM = 0.01
_NORM_EPS = 1e-8


@dataclass
class SAEOutput:
    """What the trainer needs besides x_hat.

    hidden_pre keeps its graph: an AuxK (dead-latent) loss or l0_pseudo can backpropagate
    through it. On the sparse topk path feature_acts is None, (top_values, top_indices) carry
    the activations, and hidden_pre has no graph (without GLU): gradients to the encoder go
    through pipeline.sae.sparse_topk.gathered_encoder_values, AuxK's too."""

    hidden_pre: Tensor
    feature_acts: Tensor | None
    top_values: Tensor | None = None
    top_indices: Tensor | None = None

    def dense_feature_acts(self) -> Tensor:
        if self.feature_acts is not None:
            return self.feature_acts
        dense = torch.zeros_like(self.hidden_pre, dtype=self.top_values.dtype)
        return dense.scatter(-1, self.top_indices, self.top_values)

    @property
    def l0(self) -> Tensor:
        """(B,) active latents per row, as floats, no gradient."""
        if self.feature_acts is not None:
            return (self.feature_acts.detach() != 0).sum(-1).to(torch.float32)
        return (self.top_values.detach() != 0).sum(-1).to(torch.float32)

    def firing_counts(self) -> Tensor:
        """(d_sae,) rows of the batch on which each latent fired, on the batch's device, without
        a host sync (int32 for dense activations: a column sum of a bool tensor into int64 is 4x
        slower on the CPU)."""
        if self.feature_acts is not None:
            return (self.feature_acts.detach() != 0).sum(0, dtype=torch.int32)
        return latent_counts(self.top_indices, self.hidden_pre.shape[-1], self.top_values.detach() != 0)


class SparseAutoencoder(nn.Module):
    def __init__(self, cfg: SAEConfig):
        super().__init__()
        device = resolve_device(cfg.device)  # "auto" becomes the device it resolved to
        self.cfg = cfg = cfg.model_copy(update={"device": str(device)})
        d_in, d_sae = cfg.d_model, cfg.d_sae
        factory = {"dtype": cfg.dtype, "device": device}
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae, **factory))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, **factory))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_in, **factory))
        if cfg.use_decoder_bias:
            self.b_dec = nn.Parameter(torch.zeros(d_in, **factory))
        else:
            self.register_buffer("b_dec", torch.zeros(d_in, **factory))
        if cfg.use_glu_encoder:
            self.W_enc_glu = nn.Parameter(torch.empty(d_in, d_sae, **factory))
            self.b_enc_glu = nn.Parameter(torch.zeros(d_sae, **factory))
        if cfg.act.threshold == "log_threshold":
            # threshold = exp(log_threshold) stays positive (the paper's choice); initialize_sae
            # sets it. Under Adam a log threshold moves ~threshold * lr per step (SAELens #494):
            # far below bfloat16's resolution near log(0.05), so it is float32 whatever the
            # weights' dtype (in bf16 not one threshold moved in 20 steps), as in SAELens
            self.log_threshold = nn.Parameter(torch.zeros(d_sae, dtype=torch.float32, device=device))
        # scalars stay float32 whatever the weights' dtype: bfloat16 keeps ~3 digits
        scalar = {"dtype": torch.float32, "device": device}
        if cfg.act.threshold == "batchtopk_threshold":
            self.register_buffer("batchtopk_threshold", torch.zeros((), **scalar))
        self.register_buffer("norm_factor_in", torch.ones((), **scalar))
        self.register_buffer("norm_factor_out", torch.ones((), **scalar))
        # Set by a trainer that renormalizes W_dec rows to 1 around every step; never saved.
        self.decoder_rows_are_unit = False
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Random unit-norm decoder rows, encoder = decoder transpose, zero biases; the GLU gate
        gets a small uniform weight and a zero bias (gate ~ 0.5), every tensor set (lm_saes
        leaves its GLU bias uninitialized)."""
        self.W_dec.copy_(random_unit_rows(self.cfg.d_sae, self.cfg.d_model, generator).to(self.W_dec))
        self.W_enc.copy_(self.W_dec.t())
        self.b_enc.zero_()
        self.b_dec.zero_()
        if self.cfg.use_glu_encoder:
            bound = 1 / math.sqrt(self.cfg.d_model)
            glu = torch.rand(self.W_enc_glu.shape, generator=generator) * 2 * bound - bound
            self.W_enc_glu.copy_(glu.to(self.W_enc_glu))
            self.b_enc_glu.zero_()

    # --- normalization ----------------------------------------------------------------------
    def input_scale(self, x_in: Tensor) -> Tensor:
        """Factor the raw input is multiplied by: a scalar (dataset-wise, inference) or (B, 1)."""
        mode = self.cfg.norm_activation
        if mode == "dataset-wise":
            return self.norm_factor_in
        if mode == "token-wise":
            wide = x_in if x_in.dtype in (torch.float32, torch.float64) else x_in.float()  # fp16 norms overflow
            norms = wide.norm(dim=-1, keepdim=True).clamp_min(_NORM_EPS)
            return math.sqrt(self.cfg.d_model) / norms
        return torch.ones((), device=self.W_enc.device)

    def output_scale(self, x_in: Tensor | None = None) -> Tensor:
        """Factor of the target space. Token-wise uses the *input's* per-row factor, the only one
        known at inference, for training targets and for undoing it alike."""
        mode = self.cfg.norm_activation
        if mode == "dataset-wise":
            return self.norm_factor_out
        if mode == "token-wise":
            if x_in is None:
                raise ValueError("token-wise normalization of the output needs the raw input x_in")
            return self.input_scale(x_in)
        return torch.ones((), device=self.W_enc.device)

    def normalize_input(self, x_in: Tensor) -> Tensor:
        return (x_in * self.input_scale(x_in)).to(self.W_enc.dtype)

    def normalize_target(self, x_out: Tensor, x_in: Tensor | None = None) -> Tensor:
        """Training target in the SAE's space; x_in is needed for token-wise (defaults to x_out,
        right for a plain SAE whose input is its target)."""
        return (x_out * self.output_scale(x_out if x_in is None else x_in)).to(self.W_enc.dtype)

    def denormalize_output(self, x_hat: Tensor, x_in: Tensor | None = None) -> Tensor:
        """x_hat back to raw units of hook_point_out (token-wise needs the raw input x_in)."""
        return x_hat / self.output_scale(x_in)

    def reconstruct(self, x_raw: Tensor) -> Tensor:
        """Raw activations in, raw reconstruction (of hook_point_out) out: for evaluation."""
        x_hat, _ = self(self.normalize_input(x_raw))
        return self.denormalize_output(x_hat, x_raw)

    @torch.no_grad()
    def fold_normalization(self) -> None:
        """Fold dataset-wise factors into the weights: afterwards the SAE reads raw activations
        and writes raw reconstructions (norm_activation="inference"). hidden_pre is unchanged,
        so top-k choices and thresholds are too, except gates scaled by decoder norms, which
        shrink with W_dec and take their thresholds along."""
        if self.cfg.norm_activation != "dataset-wise":
            return
        scale_in, scale_out = self.norm_factor_in.clone(), self.norm_factor_out.clone()
        self.W_enc.mul_(scale_in)
        if self.cfg.use_glu_encoder:
            self.W_enc_glu.mul_(scale_in)
        self.W_dec.div_(scale_out)
        self.b_dec.div_(scale_out)
        if self.cfg.sparsity_include_decoder_norm:
            if self.cfg.act.threshold == "log_threshold":
                self.log_threshold.sub_(torch.log(scale_out))
            if self.cfg.act.threshold == "batchtopk_threshold":
                self.batchtopk_threshold.div_(scale_out)
        self.norm_factor_in.fill_(1.0)
        self.norm_factor_out.fill_(1.0)
        self.decoder_rows_are_unit = False
        self.cfg = self.cfg.model_copy(update={"norm_activation": "inference"})

    @torch.no_grad()
    def fold_decoder_norms(self, *, keep_function: bool = True) -> bool:
        """Make every decoder row unit-norm: latent i's encoder column, bias and threshold scale by
        n_i = ||W_dec row i|| and its row by 1/n_i (relu, topk and jumprelu are positively
        homogeneous), so a latent's value becomes the norm of its contribution to the
        reconstruction, as in SAELens' saved SAEs. Gates scaled by decoder norms are unchanged.
        Where latents are ranked (topk) or share one threshold (batchtopk) by hidden_pre alone,
        only a common norm keeps the function: with unequal norms and keep_function the SAE is
        left as it is and False is returned; without it (training's start, where only the init
        norm must survive) the rows are moved all the same and the ranking may change. Zero rows
        stay zero. Computed in float64, one rounding per weight."""
        norms = self.decoder_norms().double()
        norms = torch.where(norms > 0, norms, torch.ones_like(norms))  # a zero row adds nothing: left as it is
        ranked_by_hidden_pre = self.cfg.act.uses_top_k and not self.cfg.sparsity_include_decoder_norm
        if ranked_by_hidden_pre and keep_function:
            common = norms.mean()
            if float((norms - common).abs().max() / common) > 1e-6:
                return False
            norms = common.expand_as(norms)  # one factor for all: the ranking cannot change
        for weight, factor in ((self.W_enc, norms[None, :]), (self.b_enc, norms), (self.W_dec, 1 / norms[:, None])):
            weight.copy_((weight.double() * factor).to(weight.dtype))
        if not self.cfg.sparsity_include_decoder_norm:  # thresholds on hidden_pre, which just grew by n_i
            if self.cfg.act.threshold == "log_threshold":
                self.log_threshold.add_(norms.log().to(self.log_threshold.dtype))
            if self.cfg.act.threshold == "batchtopk_threshold":
                self.batchtopk_threshold.mul_(norms.mean().to(self.batchtopk_threshold.dtype))
        self.decoder_rows_are_unit = False  # unit up to rounding; the flag is the trainer's promise
        return True

    # --- encoder ----------------------------------------------------------------------------
    def encode_pre(self, x: Tensor) -> Tensor:
        """(B, d_sae) hidden pre-activation of a normalized input."""
        x = x.to(self.W_enc.dtype)
        # matmul then an in-place bias add: on the CPU addmm first copies the broadcast bias into
        # the whole (B, d_sae) output and reads it back in the GEMM (7 ms of a 108 ms step)
        hidden_pre = (x @ self.W_enc).add_(self.b_enc)
        if self.cfg.use_glu_encoder:
            hidden_pre = hidden_pre * torch.sigmoid(x @ self.W_enc_glu + self.b_enc_glu)
        return hidden_pre

    def gate(self, hidden_pre: Tensor) -> Tensor:
        """What latents are ranked/thresholded by (see the module docstring)."""
        if self.cfg.sparsity_include_decoder_norm and not self.decoder_rows_are_unit:
            return hidden_pre * self.decoder_norms().detach()
        return hidden_pre

    @property
    def threshold(self) -> Tensor:
        """(d_sae,) jumprelu threshold, or the BatchTopK inference threshold, on the gate scale."""
        if self.cfg.act.threshold == "log_threshold":
            return self.log_threshold.exp()
        if self.cfg.act.threshold == "batchtopk_threshold":
            return self.batchtopk_threshold.expand(self.cfg.d_sae)
        raise AttributeError(f"act_fn={self.cfg.act_fn!r} has no threshold")

    def activate(self, hidden_pre: Tensor, k: int | None = None) -> Tensor:
        """Dense (B, d_sae) activations. k overrides top_k (for a k schedule)."""
        return _ACTIVATIONS[self.cfg.act_fn](self, hidden_pre, k or self.cfg.top_k)

    def _relu(self, hidden_pre: Tensor, k: int) -> Tensor:
        return hidden_pre.relu()

    def _topk(self, hidden_pre: Tensor, k: int) -> Tensor:
        indices = topk_indices(self.gate(hidden_pre), k)
        return torch.zeros_like(hidden_pre).scatter(-1, indices, hidden_pre.gather(-1, indices).relu())

    def _batchtopk(self, hidden_pre: Tensor, k: int) -> Tensor:
        """The batch shares k * B slots in training; eval uses the learned threshold."""
        gate = self.gate(hidden_pre)
        if self.training:
            flat_gate = gate.detach().reshape(-1, gate.shape[-1])
            mask = batch_topk_mask(flat_gate, k)
            update_batchtopk_threshold(self.batchtopk_threshold, flat_gate, mask, BATCHTOPK_THRESHOLD_MOMENTUM)
            return hidden_pre.relu() * mask.view(hidden_pre.shape)
        return hidden_pre.relu() * (gate.detach() > self.batchtopk_threshold)

    def _jumprelu(self, hidden_pre: Tensor, k: int) -> Tensor:
        threshold = self.log_threshold.exp()
        if not self.cfg.sparsity_include_decoder_norm or self.decoder_rows_are_unit:
            return jumprelu(hidden_pre, threshold, self.cfg.jumprelu_window)
        norms = self.decoder_norms().detach().clamp_min(_NORM_EPS)
        return jumprelu(hidden_pre * norms, threshold, self.cfg.jumprelu_window) / norms

    def l0_pseudo(self, hidden_pre: Tensor) -> Tensor:
        """(B,) L0 per row whose gradient reaches log_threshold through the Heaviside step's
        pseudo-derivative (same window as the jump); the trainer's JumpReLU sparsity loss."""
        if self.cfg.act.sparsity_loss != "l0":
            raise ValueError(f"l0_pseudo is for act_fn='jumprelu', not {self.cfg.act_fn!r}")
        steps = heaviside_step(self.gate(hidden_pre), self.log_threshold.exp(), self.cfg.jumprelu_window)
        return steps.sum(-1)

    def encode(self, x_raw: Tensor, k: int | None = None) -> Tensor:
        """Dense (B, d_sae) latents of raw activations (normalized here, as reconstruct does)."""
        return self.activate(self.encode_pre(self.normalize_input(x_raw)), k)

    def _encode_sparse(self, x: Tensor, k: int) -> tuple[Tensor, LatentGroups, Tensor]:
        """(values, the indices grouped, hidden_pre) of the row top-k; gradients stay O(B*k*d_model)."""
        x = x.to(self.W_enc.dtype)
        if self.cfg.use_glu_encoder:
            hidden_pre = self.encode_pre(x)
            groups = LatentGroups(topk_indices(self.gate(hidden_pre), k), self.cfg.d_sae)
            values = hidden_pre.gather(-1, groups.indices).relu()  # GLU: plain autograd
        else:
            # hidden_pre is only selected from here (and by AuxK); gradients take the sparse route
            hidden_pre = pre_activations_no_grad(x, self.W_enc, self.b_enc)
            groups = LatentGroups(topk_indices(self.gate(hidden_pre), k), self.cfg.d_sae)
            values = gathered_encoder_values(x, self.W_enc, self.b_enc, hidden_pre, groups)
        return values, groups, hidden_pre

    # --- decoder ----------------------------------------------------------------------------
    def decode(self, feature_acts: Tensor) -> Tensor:
        return feature_acts.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def decode_sparse(self, values: Tensor, selected: LatentGroups) -> Tensor:
        return sparse_decode(values, selected, self.W_dec) + self.b_dec

    def uses_sparse_path(self, k: int | None = None) -> bool:
        """Whether forward takes the sparse TopK path (k: the k in effect, default top_k)."""
        if not self.cfg.act.row_top_k or self.cfg.topk_decode == "dense":
            return False
        return self.cfg.topk_decode == "sparse" or decode_path.is_sparse(self._decode_problem(k or self.cfg.top_k))

    def settle_decode_path(self, x: Tensor, k: int | None = None, agree=None) -> None:
        """Under topk_decode "auto", time both TopK paths on the training batch x (normalized) where
        pipeline/sae/decode_path.py says the choice needs it; run before the step's forward, in its
        autocast. agree: makes every rank's choice the same (distributed)."""
        if self.cfg.topk_decode != "auto" or not self.cfg.act.row_top_k or x.dim() != 2:
            return
        k = k or self.cfg.top_k
        problem = self._decode_problem(k)
        if not decode_path.undecided(problem, x.shape[0]):  # every step but the first of each problem
            return
        rows = x[: decode_path.PROBE_ROWS].detach()
        params = [p for p in self.parameters() if p.requires_grad]

        def step(sparse: bool) -> None:
            x_hat, _ = self._forward_on(rows, k, sparse)
            torch.autograd.grad(x_hat.float().square().sum(), params, allow_unused=True)  # .grad untouched
        decode_path.settle(problem, x.shape[0], step, agree)

    def _decode_problem(self, k: int) -> decode_path.Problem:
        device = self.W_enc.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.W_enc.dtype
        return decode_path.Problem(device, str(dtype).removeprefix("torch."), self.cfg.d_model, self.cfg.d_sae, k,
                                   self.cfg.use_glu_encoder)

    def forward(self, x: Tensor, k: int | None = None) -> tuple[Tensor, SAEOutput]:
        """Normalized x (B, d_model) -> (x_hat, SAEOutput). k overrides top_k (k schedules)."""
        k = k or self.cfg.top_k
        return self._forward_on(x, k, x.dim() == 2 and self.uses_sparse_path(k))

    def _forward_on(self, x: Tensor, k: int, sparse: bool) -> tuple[Tensor, SAEOutput]:
        if sparse:
            values, groups, hidden_pre = self._encode_sparse(x, k)
            x_hat = self.decode_sparse(values, groups)  # one sort of the indices for both gradients
            return x_hat, SAEOutput(hidden_pre, None, values, groups.indices)
        hidden_pre = self.encode_pre(x)
        feature_acts = _ACTIVATIONS[self.cfg.act_fn](self, hidden_pre, k)
        return self.decode(feature_acts), SAEOutput(hidden_pre, feature_acts)

    # --- decoder geometry -------------------------------------------------------------------
    def decoder_norms(self) -> Tensor:
        """(d_sae,) L2 norm of each latent's decoder row."""
        return self.W_dec.norm(dim=-1)

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        self.W_dec.div_(self.decoder_norms().clamp_min(_NORM_EPS)[:, None])

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """Project each decoder row's gradient onto the row's orthogonal complement, so a step
        rotates unit-norm rows instead of growing them (call after backward, before step)."""
        if self.W_dec.grad is None:
            return
        directions = self.W_dec / self.decoder_norms().clamp_min(_NORM_EPS)[:, None]
        parallel = (self.W_dec.grad * directions).sum(-1, keepdim=True)
        self.W_dec.grad.sub_(parallel * directions)


def random_unit_rows(rows: int, cols: int, generator: torch.Generator | None = None) -> Tensor:
    """(rows, cols) float32 rows drawn uniformly on the unit sphere (normalized Gaussians)."""
    weights = torch.randn(rows, cols, generator=generator)
    return weights / weights.norm(dim=-1, keepdim=True).clamp_min(_NORM_EPS)


# act_fn -> the SparseAutoencoder method computing dense activations (hidden_pre, k)
_ACTIVATIONS = {
    "relu": SparseAutoencoder._relu,
    "topk": SparseAutoencoder._topk,
    "batchtopk": SparseAutoencoder._batchtopk,
    "jumprelu": SparseAutoencoder._jumprelu,
}
