"""Data-dependent SAE initialization with InitializerConfig's (the seed's) semantics.

The trainer draws a sample of store rows (store.sampling.sample_rows) and calls initialize_sae.
All statistics are taken in the SAE's normalized space, in this order:
1. norm factors (dataset-wise): given (from the store's statistics) or from the sample's mean
   row norm; x_normalized = x * factor has mean norm sqrt(d_model).
2. decoder directions: random unit rows; with initialize_W_D_with_active_subspace, random
   combinations of the top d_active_subspace principal directions of the target's covariance
   (pipeline/sae/geometry.py), so every row lies in that span.
3. b_dec (target space): all_zero | mean | geometric_median (a real Weiszfeld median from
   pipeline/sae/geometry.py; lm_saes' "geometric_median" was the mean).
4. decoder row norm, with grid_search_init_norm the one minimizing the reconstruction MSE of
   the complete initial SAE (encoder, b_enc rule and activation included) on GRID_SEARCH_ROWS
   rows drawn at random (seeded) from the whole sample: the sample comes chunk by chunk, so its
   first rows would all be one chunk's, consecutive tokens of a few documents.
   - relu, topk, batchtopk (ActFn.scale_equivariant): in closed form from one forward. With
     every decoder row and encoder column at norm s and b_enc = s * b (its centering rule is
     linear in the encoder), hidden_pre = s * h (a GLU gate keeps its weights); the latents
     kept do not depend on s (the top k of s * h, or of its gate s^2 * h, are the top k of h;
     BatchTopK's top k*B of the batch in training mode alike) and their values are
     s * relu(h). So x_hat = b_dec + s^2 * r, r the reconstruction at s = 1 less b_dec, and
     MSE(s) = E||e||^2 - 2 s^2 E<e, r> + s^4 E||r||^2 with e = target - b_dec: the optimum is
     s^2 = E<e, r> / E||r||^2, clamped to the range the grid below could return.
   - jumprelu (its threshold does not scale): a coarse geometric grid of 13 norms from 0.01
     to 10 (x1.78 steps), then 21 evenly spaced norms between best/1.78 and best*1.78. (lm_saes
     searched 0.1..1 until February 2026, which misses the optimum of small-k TopK SAEs, often
     > 1; it now searches linspace(0.1, 5.0, 50) and then a finer grid.)
   Otherwise init_decoder_norm (default 0.1).
5. W_enc = W_dec.T (init_encoder_with_decoder_transpose) or independent random unit columns,
   at the same norm.
6. b_enc: with init_encoder_bias_with_mean_hidden_pre, minus the sample mean of the hidden
   pre-activation without bias (lm_saes' rule), so each latent's mean pre-activation is 0; for
   a GLU encoder, (x W + b) * gate is centered exactly: b = -mean((x W) * gate) / mean(gate).
7. jumprelu: log_threshold = init_log_jumprelu_threshold_value (required).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from pipeline.config import ConfigError
from pipeline.sae.config import InitializerConfig, SAEConfig, check_sae_and_initializer
from pipeline.sae.geometry import geometric_median, principal_components
from pipeline.sae.model import SparseAutoencoder, random_unit_rows
from store.moments import norm_scale_factor

GRID_SEARCH_ROWS = 4096
COARSE_NORMS = [10 ** (-2 + i / 4) for i in range(13)]  # 0.01 .. 10
COARSE_STEP = COARSE_NORMS[1] / COARSE_NORMS[0]
FINE_STEPS = 21
NORM_RANGE = (COARSE_NORMS[0] / COARSE_STEP, COARSE_NORMS[-1] * COARSE_STEP)  # what the grid can return
DEFAULT_DECODER_NORM = 0.1
_ROW_BLOCK = 4096  # rows per block when averaging over the whole sample


def initialize_sae(
    sae_cfg: SAEConfig,
    init_cfg: InitializerConfig,
    x_in: Tensor,
    x_out: Tensor | None = None,
    norm_factor_in: float | None = None,
    norm_factor_out: float | None = None,
    say: Callable[[str], None] = lambda message: None,
) -> SparseAutoencoder:
    """An SAE initialized from a sample of raw activations x_in (n, d_model) and, for a
    transcoder, the matching rows x_out of hook_point_out. Norm factors: pass the store's
    (store.moments.norm_scale_factor(mean_norm, d)); None = estimate from the sample."""
    try:
        check_sae_and_initializer(sae_cfg, init_cfg)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if sae_cfg.is_transcoder and x_out is None:
        raise ValueError(f"a transcoder needs x_out, sample rows of {sae_cfg.hook_point_out!r}")
    _check_sample(x_in, sae_cfg, "x_in")
    if x_out is not None:
        _check_sample(x_out, sae_cfg, "x_out")
        if x_out.shape[0] != x_in.shape[0]:
            raise ValueError(f"x_in has {x_in.shape[0]} rows but x_out {x_out.shape[0]}; pass matching rows")

    generator = torch.Generator().manual_seed(init_cfg.seed)
    sae = SparseAutoencoder(sae_cfg)
    sae.reset_parameters(generator)
    device = sae.W_enc.device
    x_in = x_in.to(device)
    x_out = x_in if x_out is None else x_out.to(device)
    with torch.no_grad():
        _set_norm_factors(sae, x_in, x_out, norm_factor_in, norm_factor_out)
        x = sae.normalize_input(x_in)
        target = sae.normalize_target(x_out, x_in)
        directions = _decoder_directions(sae_cfg, init_cfg, target, generator)
        encoder_directions = directions.t() if init_cfg.init_encoder_with_decoder_transpose else (
            random_unit_rows(sae_cfg.d_sae, sae_cfg.d_model, generator).t()
        )
        sae.W_dec.copy_(directions.to(sae.W_dec))
        sae.W_enc.copy_(encoder_directions.to(sae.W_enc))
        if sae_cfg.use_decoder_bias:
            say(f"decoder bias: {init_cfg.bias_init_method} of {target.shape[0]} rows")
            sae.b_dec.copy_(decoder_bias(target, init_cfg.bias_init_method).to(sae.b_dec))
        if sae_cfg.act.threshold == "log_threshold":
            sae.log_threshold.fill_(init_cfg.init_log_jumprelu_threshold_value)
        unit_encoder = sae.W_enc.clone()
        unit_b_enc = (
            centering_encoder_bias(sae, x) if init_cfg.init_encoder_bias_with_mean_hidden_pre else torch.zeros_like(sae.b_enc)
        )
        if init_cfg.grid_search_init_norm:
            rows = scoring_rows(x.shape[0], init_cfg.seed)
            scored_x, scored_target = x[rows.to(x.device)], target[rows.to(x.device)]
            if sae_cfg.act.scale_equivariant:
                say(f"decoder norm: closed form ({sae_cfg.act_fn}: MSE quadratic in norm^2), one forward on {len(rows)} rows")
                norm = closed_form_decoder_norm(sae, directions, unit_encoder, unit_b_enc, scored_x, scored_target)
            else:
                say(f"decoder norm: grid search of {len(COARSE_NORMS) + FINE_STEPS} norms on {len(rows)} rows")
                norm = grid_search_decoder_norm(sae, directions, unit_encoder, unit_b_enc, scored_x, scored_target)
            say(f"decoder norm: {norm:.4g}")
        else:
            norm = init_cfg.init_decoder_norm or DEFAULT_DECODER_NORM
        _apply_norm(sae, directions, unit_encoder, unit_b_enc, norm)
        if sae_cfg.act.threshold == "batchtopk_threshold":
            sae.batchtopk_threshold.zero_()  # the norm search's forward passes must not seed it
    return sae


def check_against_store(sae_cfg: SAEConfig, hooks_in_store: dict[str, int]) -> None:
    """ConfigError unless the store holds the SAE's hooks with width d_model (trainer calls it)."""
    held = sorted(hooks_in_store)
    roles = [("hook_point_in", sae_cfg.hook_point_in)]
    if sae_cfg.is_transcoder:
        roles.append(("hook_point_out", sae_cfg.hook_point_out))
    for role, hook in roles:
        if hook not in hooks_in_store:
            kind = "transcoder target " if role == "hook_point_out" else ""
            raise ConfigError(
                f"sae.{role}={hook!r} ({kind}hook) is not in the store, which holds {held}; "
                f"add it to generate.hook_points and regenerate, or set sae.{role} to one of those"
            )
        if hooks_in_store[hook] != sae_cfg.d_model:
            raise ConfigError(
                f"sae.d_model={sae_cfg.d_model} but the store's {hook!r} has d={hooks_in_store[hook]}; "
                f"set sae.d_model={hooks_in_store[hook]}"
            )


# --- the steps ------------------------------------------------------------------------------
def _check_sample(x: Tensor, cfg: SAEConfig, name: str) -> None:
    if x.dim() != 2 or x.shape[1] != cfg.d_model or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty (n, d_model={cfg.d_model}) sample, got {tuple(x.shape)}")


def _set_norm_factors(sae, x_in, x_out, norm_factor_in, norm_factor_out) -> None:
    if sae.cfg.norm_activation != "dataset-wise":
        return
    d = sae.cfg.d_model
    factor_in = norm_factor_in or norm_scale_factor(_mean_norm(x_in), d)
    if sae.cfg.is_transcoder:
        factor_out = norm_factor_out or norm_scale_factor(_mean_norm(x_out), d)
    else:
        factor_out = factor_in  # one hook, one factor
    sae.norm_factor_in.fill_(factor_in)
    sae.norm_factor_out.fill_(factor_out)


def _mean_norm(x: Tensor) -> float:
    return float(sum(block.double().norm(dim=-1).sum() for block in x.split(_ROW_BLOCK)) / x.shape[0])


def _mean_rows(x: Tensor) -> Tensor:
    """(d,) float64 mean of the rows, in blocks (no float64 copy of the whole sample)."""
    return sum(block.double().sum(0) for block in x.split(_ROW_BLOCK)) / x.shape[0]


def _decoder_directions(sae_cfg, init_cfg, target: Tensor, generator: torch.Generator) -> Tensor:
    """(d_sae, d_model) float32 unit rows on the device of target."""
    if not init_cfg.initialize_W_D_with_active_subspace:
        return random_unit_rows(sae_cfg.d_sae, sae_cfg.d_model, generator).to(target.device)
    components, _ = principal_components(covariance(target), init_cfg.d_active_subspace)
    coefficients = torch.randn(sae_cfg.d_sae, components.shape[0], generator=generator, dtype=torch.float64)
    rows = coefficients.to(components.device) @ components
    return (rows / rows.norm(dim=-1, keepdim=True)).float().to(target.device)


def covariance(x: Tensor) -> Tensor:
    """(d, d) float64 sample covariance, accumulated in row blocks."""
    mean = _mean_rows(x)
    total = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
    for block in x.split(_ROW_BLOCK):
        centered = block.double() - mean
        total += centered.t() @ centered
    return total / max(x.shape[0] - 1, 1)


def decoder_bias(target: Tensor, method: str) -> Tensor:
    if method == "all_zero":
        return torch.zeros(target.shape[1], dtype=torch.float64)
    if method == "mean":
        return _mean_rows(target)
    return geometric_median(target)


@torch.no_grad()
def centering_encoder_bias(sae: SparseAutoencoder, x: Tensor) -> Tensor:
    """b_enc making every latent's mean hidden pre-activation over x zero (at the current W_enc)."""
    if not sae.cfg.use_glu_encoder:
        mean = _mean_rows(x)
        return -(mean @ sae.W_enc.double()).to(sae.b_enc.dtype)
    weighted = torch.zeros(sae.cfg.d_sae, dtype=torch.float64, device=x.device)
    gates = torch.zeros_like(weighted)
    for block in x.split(_ROW_BLOCK):
        gate = torch.sigmoid(block @ sae.W_enc_glu + sae.b_enc_glu).double()
        weighted += ((block @ sae.W_enc).double() * gate).sum(0)
        gates += gate.sum(0)
    return -(weighted / gates.clamp_min(1e-12)).to(sae.b_enc.dtype)


def _apply_norm(sae, directions: Tensor, unit_encoder: Tensor, unit_b_enc: Tensor, norm: float) -> None:
    """Decoder rows and encoder columns at `norm`; b_enc scales along (the hidden
    pre-activation is linear in the encoder, so its centering bias is too)."""
    sae.W_dec.copy_((directions * norm).to(sae.W_dec))
    sae.W_enc.copy_(unit_encoder * norm)
    sae.b_enc.copy_(unit_b_enc * norm)


@torch.no_grad()
def reconstruction_mse(sae: SparseAutoencoder, x: Tensor, target: Tensor) -> float:
    x_hat, _ = sae(x)
    return float((target - x_hat).double().pow(2).sum(-1).mean())


def scoring_rows(n: int, seed: int) -> Tensor:
    """Indices of the (at most GRID_SEARCH_ROWS) sample rows the norm search scores: a seeded
    random subset of all n, the same for the input and a transcoder's target."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=generator)[:GRID_SEARCH_ROWS]


@torch.no_grad()
def closed_form_decoder_norm(sae, directions, unit_encoder, unit_b_enc, x: Tensor, target: Tensor) -> float:
    """The MSE-optimal decoder row norm of a scale-equivariant activation (module docstring,
    step 4), from one forward at norm 1."""
    _apply_norm(sae, directions, unit_encoder, unit_b_enc, 1.0)
    x_hat, _ = sae(x)
    bias = sae.b_dec.double()
    r, e = x_hat.double() - bias, target.double() - bias
    along, power = float((e * r).sum()), float((r * r).sum())
    if not (math.isfinite(along) and math.isfinite(power)) or power <= 0:
        return DEFAULT_DECODER_NORM  # nothing reconstructed: every norm scores alike
    return min(max(math.sqrt(max(along / power, 0.0)), NORM_RANGE[0]), NORM_RANGE[1])


@torch.no_grad()
def grid_search_decoder_norm(sae, directions, unit_encoder, unit_b_enc, x: Tensor, target: Tensor) -> float:
    """Coarse-then-fine search of the decoder row norm (module docstring, step 4)."""

    def best(norms: list[float]) -> float:
        losses = {}
        for norm in norms:
            _apply_norm(sae, directions, unit_encoder, unit_b_enc, norm)
            losses[norm] = reconstruction_mse(sae, x, target)
        finite = {n: loss for n, loss in losses.items() if math.isfinite(loss)}
        return min(finite, key=finite.get) if finite else DEFAULT_DECODER_NORM

    coarse = best(COARSE_NORMS)
    low, high = coarse / COARSE_STEP, coarse * COARSE_STEP
    return best([low + (high - low) * i / (FINE_STEPS - 1) for i in range(FINE_STEPS)])
