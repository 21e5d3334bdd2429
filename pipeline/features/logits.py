"""The tokens each latent's decoder direction promotes and suppresses most: W_dec row @ W_U.

The direct path to the logits, with the final norm's gain folded into W_U (as TransformerLens
does with fold_ln) and its per-token scale left out: values compare the tokens of one latent,
not latents with each other. Defined only for causal LMs with a real head and for SAEs writing
a residual-stream-sized hook; otherwise the reason is returned instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.sae.model import SparseAutoencoder

_LATENTS_PER_MATMUL = 1024  # bounds the (latents, d_vocab) product in memory


@dataclass
class LogitEffects:
    promoted: torch.Tensor  # (d_sae, k) token ids, strongest first
    promoted_values: torch.Tensor  # (d_sae, k)
    suppressed: torch.Tensor  # (d_sae, k) token ids, most negative first
    suppressed_values: torch.Tensor


def skip_reason(model: dict) -> str | None:
    """Why logit effects are undefined for the model a store's manifest describes (None: defined)."""
    name = model.get("name", "the model")
    if model.get("is_causal") is False:
        return f"{name} is not a causal language model: its decoder directions have no next-token logit effect"
    if model.get("has_lm_head") is False:
        return f"{name}'s checkpoint has no language-model head, so its unembedding is random"
    return None


def unembedding(hooked) -> torch.Tensor:
    """(d_model, d_vocab) W_U with the final norm's gain folded in."""
    w_u = hooked.W_U.detach().float()
    norm = getattr(hooked, "ln_final", None)
    gain = getattr(norm, "w", None) if norm is not None else None
    gain = getattr(norm, "weight", None) if gain is None and norm is not None else gain
    return w_u if gain is None else gain.detach().float()[:, None] * w_u


@torch.no_grad()
def logit_effects(sae: SparseAutoencoder, w_u: torch.Tensor, k: int) -> LogitEffects | str:
    """Top-k promoted and suppressed tokens per latent, or why there are none."""
    if w_u.shape[0] != sae.cfg.d_model:
        return (f"decoder rows of {sae.cfg.hook_point_out} have {sae.cfg.d_model} dimensions, the residual stream "
                f"{w_u.shape[0]}: they do not map onto the unembedding")
    w_u = w_u.to(sae.W_dec.device)
    k = min(k, w_u.shape[1])
    parts = []
    for start in range(0, sae.cfg.d_sae, _LATENTS_PER_MATMUL):
        effects = sae.W_dec[start : start + _LATENTS_PER_MATMUL].float() @ w_u
        top, bottom = effects.topk(k, dim=1), effects.topk(k, dim=1, largest=False)
        parts.append((top.indices, top.values, bottom.indices, bottom.values))
    return LogitEffects(*(torch.cat(column).cpu() for column in zip(*parts)))
