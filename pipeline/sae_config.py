"""SAEConfig and InitializerConfig: the seed's (lm_saes) names and meaning, validated.

`SAEConfig(hook_point_in=..., hook_point_out=..., use_glu_encoder=False, d_model=768,
expansion_factor=8, act_fn="topk", top_k=64, dtype=torch.float32, device="cpu")` constructs as
written in the seed. hook_point_in != hook_point_out makes the model a transcoder.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, field_serializer, field_validator, model_validator

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def parse_dtype(value: str | torch.dtype) -> torch.dtype:
    """Accept torch dtypes and their names ("float32", "torch.bfloat16")."""
    if isinstance(value, torch.dtype):
        return value
    name = str(value).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {value!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class StrictModel(BaseModel):
    """Base for every config section: a misspelled key is an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, validate_assignment=True)


class SAEConfig(StrictModel):
    hook_point_in: str
    hook_point_out: str
    use_glu_encoder: bool = False
    d_model: int
    expansion_factor: float = 8
    act_fn: Literal["relu", "topk", "batchtopk", "jumprelu"] = "topk"
    top_k: int = 50
    use_decoder_bias: bool = True
    # dataset-wise: inputs scaled so their mean norm is sqrt(d_model) (factor from the store's
    # statistics, folded into the weights at save); token-wise: each row to norm sqrt(d_model);
    # inference: no scaling (weights already folded).
    norm_activation: Literal["dataset-wise", "token-wise", "inference"] = "dataset-wise"
    sparsity_include_decoder_norm: bool = True
    jumprelu_window: float = 2.0  # width of the rectangle kernel for the threshold's gradient
    dtype: torch.dtype = torch.float32
    device: str = "cpu"

    @field_validator("dtype", mode="before")
    @classmethod
    def _parse_dtype(cls, value):
        return parse_dtype(value)

    @field_serializer("dtype")
    def _serialize_dtype(self, value: torch.dtype) -> str:
        return dtype_name(value)

    @model_validator(mode="after")
    def _check_sizes(self):
        d_sae = self.d_model * self.expansion_factor
        if d_sae != int(d_sae) or d_sae <= 0:
            raise ValueError(
                f"d_model * expansion_factor = {d_sae} is not a positive integer; "
                "choose an expansion_factor that gives a whole number of latents"
            )
        if self.act_fn in ("topk", "batchtopk") and not 0 < self.top_k <= d_sae:
            raise ValueError(f"top_k={self.top_k} must be in 1..d_sae={int(d_sae)}")
        return self

    @property
    def d_sae(self) -> int:
        return int(self.d_model * self.expansion_factor)

    @property
    def is_transcoder(self) -> bool:
        return self.hook_point_in != self.hook_point_out


class InitializerConfig(StrictModel):
    """Seed-recommended values: geometric_median, grid_search_init_norm=True,
    init_encoder_bias_with_mean_hidden_pre=True; for low-rank hooks (attention outputs) also
    initialize_W_D_with_active_subspace=True with d_active_subspace ~ d_model / 2."""

    bias_init_method: Literal["all_zero", "mean", "geometric_median"] = "geometric_median"
    grid_search_init_norm: bool = True
    init_encoder_bias_with_mean_hidden_pre: bool = True
    initialize_W_D_with_active_subspace: bool = False
    d_active_subspace: int | None = None
    init_log_jumprelu_threshold_value: float | None = None
    init_decoder_norm: float | None = None  # used when grid_search_init_norm is False
    n_samples: int = 100_000  # rows drawn from the store for data-dependent init
    seed: int = 0
