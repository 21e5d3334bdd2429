"""SAEConfig and InitializerConfig: the seed's (lm_saes) names and meaning, validated.

`SAEConfig(hook_point_in=..., hook_point_out=..., use_glu_encoder=False, d_model=768,
expansion_factor=8, act_fn="topk", top_k=64, dtype=torch.float32, device="cpu")` constructs as
written in the seed. hook_point_in != hook_point_out makes the model a transcoder.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_serializer, field_validator, model_validator

from pipeline.sae.activation_fns import ACT_FNS, ActFn, ActFnName
from store.dtypes import dtype_name, torch_dtype

class StrictModel(BaseModel):
    """Base for every config section: a misspelled key is an error, not silently ignored."""

    # use_attribute_docstrings: the docstring under a field is its description (pydantic >= 2.7),
    # which `saeflow config` prints next to the field's value.
    model_config = ConfigDict(
        extra="forbid", arbitrary_types_allowed=True, validate_assignment=True, use_attribute_docstrings=True
    )


class SAEConfig(StrictModel):
    """The SAE of the seed: z = act(x W_enc + b_enc), x_hat = z W_dec + b_dec.

    Weights follow SAELens: W_enc (d_model, d_sae), W_dec (d_sae, d_model); the seed's W_E is
    W_enc.T and its W_D is W_dec.T. hook_point_in != hook_point_out makes a transcoder (same
    math: the trainer feeds x from hook_point_in and the target from hook_point_out).
    """

    hook_point_in: str
    """hook whose activations the SAE encodes (one of generate.hook_points)"""
    hook_point_out: str
    """hook the SAE reconstructs; != hook_point_in makes a transcoder"""
    use_glu_encoder: bool = False
    """gate hidden_pre by sigmoid(x W_enc_glu + b_enc_glu) (a GLU encoder)"""
    d_model: int
    """width of the hook activations (the SAE's input and output size)"""
    expansion_factor: float = 8
    """d_sae / d_model: number of latents per input dimension"""
    act_fn: ActFnName = "topk"
    """activation function: relu (L1 penalty), topk, batchtopk or jumprelu (L0 penalty)"""
    top_k: int = 50
    """active latents per token for topk, per token on average for batchtopk"""
    use_decoder_bias: bool = True
    """learn b_dec (false = a zero buffer)"""
    # dataset-wise: inputs scaled so their mean norm is sqrt(d_model) (factor from the store's
    # statistics, folded into the weights at save); token-wise: each row to norm sqrt(d_model);
    # inference: no scaling (weights already folded).
    norm_activation: Literal["dataset-wise", "token-wise", "inference"] = "dataset-wise"
    """input scaling: dataset-wise (mean norm sqrt(d_model)), token-wise, or inference (none)"""
    # Latents are ranked/thresholded by hidden_pre * ||W_dec row|| (topk, batchtopk, jumprelu
    # gates), and the trainer's sparsity penalty weighs activations by decoder norms.
    sparsity_include_decoder_norm: bool = True
    """rank, gate and penalize latents by activation * decoder row norm"""
    # JumpReLU: width epsilon of the rectangle kernel of the threshold's pseudo-derivative, in
    # units of hidden pre-activations of normalized inputs (mean norm sqrt(d_model)). The paper's
    # epsilon=0.001 at unit-norm inputs is ~0.001*sqrt(d_model) here (0.03 at d=768); SAELens
    # trains with 0.05 at this scale. (lm_saes' default 2.0 is wider than typical thresholds.)
    jumprelu_window: float = Field(default=0.05, gt=0)
    """JumpReLU: width of the threshold's pseudo-derivative kernel (normalized units)"""
    # topk: "sparse" = embedding_bag over the k kept latents, decoder and encoder gradient in
    # O(B*k*d_model); "dense" = (B, d_sae) @ W_dec with autograd; "auto" = sparse when
    # top_k <= d_sae / 8, the break-even measured on the CPU (bench/sae_step.py: 1.1x there, 3x at
    # d_sae/96), and timed on the running device near it or where none was measured
    # (pipeline/sae/decode_path.py).
    topk_decode: Literal["auto", "sparse", "dense"] = "auto"
    """topk decoder path: sparse (embedding_bag), dense (matmul), auto (sparse if top_k <= d_sae/8; timed on the device near that ratio)"""
    dtype: torch.dtype = torch.float32
    """dtype of the SAE's parameters (float32, bfloat16, float16)"""
    device: str = "auto"
    """device the SAE trains on: auto (cuda when available, like model.device), cpu, cuda or cuda:N"""

    @field_validator("dtype", mode="before")
    @classmethod
    def _parse_dtype(cls, value):
        return torch_dtype(value)

    @field_serializer("dtype")
    def _serialize_dtype(self, value: torch.dtype) -> str:
        return dtype_name(value)

    @model_validator(mode="after")
    def _check_sizes(self):
        d_sae = self.d_model * self.expansion_factor
        if d_sae != int(d_sae) or d_sae <= 0:
            raise ValueError(
                f"d_model * expansion_factor = {self.d_model} * {self.expansion_factor} = {d_sae} is not "
                "a positive integer; choose an expansion_factor that gives a whole number of latents"
            )
        if self.act.uses_top_k and not 0 < self.top_k <= d_sae:
            raise ValueError(
                f"top_k={self.top_k} must be in 1..d_sae={int(d_sae)} (d_model * expansion_factor); "
                "lower top_k or raise expansion_factor"
            )
        return self

    @property
    def d_sae(self) -> int:
        return int(self.d_model * self.expansion_factor)

    @property
    def is_transcoder(self) -> bool:
        return self.hook_point_in != self.hook_point_out

    @property
    def act(self) -> ActFn:
        """The traits of act_fn (pipeline/sae/activation_fns.py)."""
        return ACT_FNS[self.act_fn]


class InitializerConfig(StrictModel):
    """Data-dependent initialization (pipeline/sae/initialize.py), with the seed's names and meaning.

    Recommended (the seed): bias_init_method="geometric_median", grid_search_init_norm=True,
    init_encoder_bias_with_mean_hidden_pre=True; for low-rank hooks (attention outputs) also
    initialize_W_D_with_active_subspace=True with d_active_subspace ~ d_model / 2 (384 for
    d_model=768; tune to the effective rank). For act_fn="jumprelu",
    init_log_jumprelu_threshold_value is required: log(0.01)~-4.6 to log(0.1)~-2.3 at our
    normalized scale (SAELens starts at 0.01).

    Where lm_saes is wrong we are right: "geometric_median" is a real geometric median
    (Weiszfeld), not the mean; "mean" is offered under its own name.
    """

    bias_init_method: Literal["all_zero", "mean", "geometric_median"] = "geometric_median"
    """b_dec starts at: all_zero, the sample mean, or its geometric median (Weiszfeld)"""
    # Coarse then fine grid over the decoder row norm, keeping the one with the lowest
    # reconstruction MSE on (up to 4096 rows of) the sample; see initialize.py for the grid.
    grid_search_init_norm: bool = True
    """pick the initial decoder row norm minimizing reconstruction MSE on 4096 random sample rows (closed form for relu/topk/batchtopk, a grid search for jumprelu)"""
    # b_enc = -mean over the sample of the hidden pre-activation without b_enc: every latent's
    # mean pre-activation starts at 0 (exactly, GLU gate included).
    init_encoder_bias_with_mean_hidden_pre: bool = True
    """set b_enc so every latent's mean pre-activation on the sample starts at 0"""
    # W_enc starts as W_dec.T (the seed/lm_saes default); False = independent random directions
    # (lm_saes recommends False for transcoders, whose in and out spaces differ).
    init_encoder_with_decoder_transpose: bool = True
    """W_enc starts as W_dec.T (false = independent random directions)"""
    initialize_W_D_with_active_subspace: bool = False
    """draw decoder rows from the target's top principal directions (low-rank hooks)"""
    d_active_subspace: int | None = Field(default=None, gt=0)
    """number of principal directions for initialize_W_D_with_active_subspace"""
    init_log_jumprelu_threshold_value: float | None = None
    """jumprelu: initial log threshold (required there), e.g. -2.3 for 0.1"""
    # Decoder row norm when grid_search_init_norm is False (None = 0.1, Anthropic's April 2024
    # heuristic and SAELens' default).
    init_decoder_norm: float | None = Field(default=None, gt=0)
    """decoder row norm without the norm search (null = 0.1)"""
    n_samples: int = Field(default=100_000, gt=0)
    """rows drawn from the store's training split for the initialization"""
    seed: int = 0
    """seed of the random weights and of the sample of rows"""


def check_sae_and_initializer(sae: SAEConfig, init: InitializerConfig) -> None:
    """Cross-section checks; ValueError with the problem and the fix (ExperimentConfig and
    initialize_sae turn it into a ConfigError)."""
    if sae.act.threshold == "log_threshold" and init.init_log_jumprelu_threshold_value is None:
        raise ValueError(
            "act_fn='jumprelu' needs initializer.init_log_jumprelu_threshold_value "
            "(the log of the initial threshold, e.g. -2.3 for 0.1)"
        )
    if init.initialize_W_D_with_active_subspace:
        if init.d_active_subspace is None:
            raise ValueError(
                "initialize_W_D_with_active_subspace=True needs initializer.d_active_subspace "
                f"(e.g. {sae.d_model // 2} = d_model / 2)"
            )
        if init.d_active_subspace > sae.d_model:
            raise ValueError(
                f"initializer.d_active_subspace={init.d_active_subspace} exceeds sae.d_model="
                f"{sae.d_model}; use at most d_model"
            )
