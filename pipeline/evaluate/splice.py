"""Language-model metrics with an SAE spliced into the forward pass.

Per batch of held-out sequences the model runs clean once, once per distinct target hook with
that hook zero-ablated and mean-ablated (the dataset mean from the store), and once per SAE with
the hook's activation replaced by the SAE's reconstruction. Splicing replaces every position,
BOS included (the SAE never trained on BOS rows when generate dropped them, so a bad BOS
reconstruction is part of the measured cost); the loss mask only decides which predictions count.

A transcoder reads hook_point_in and writes hook_point_out: a first hook captures the input
activation and a later hook of the same forward pass replaces the output with the transcoder's
prediction, so everything downstream of hook_point_out sees the reconstruction.

Metrics (mean per counted next-token prediction):
  ce_loss_recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean)   (1 = perfect, 0 = as bad as zeroing)
  delta_lm_loss     = CE_sae - CE_clean
  kl_divergence     = KL(clean next-token distribution || spliced one)
A ratio whose denominator is 0 (ablation changes nothing) is None.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.evaluate.sequences import EvalSequences
from pipeline.generate.lm import LanguageModel
from pipeline.sae.model import SparseAutoencoder

Hook = tuple[str, Callable]


def next_token_losses(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-prediction CE (B, T-1), log-probabilities (B, T-1, V)) in float32."""
    log_probs = F.log_softmax(logits[:, :-1].float(), dim=-1)
    losses = -log_probs.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    return losses, log_probs


def kl_per_token(clean_log_probs: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """KL(clean || other) per position: sum_v p_clean (log p_clean - log p_other)."""
    return F.kl_div(log_probs, clean_log_probs, log_target=True, reduction="none").sum(-1)


def replace_with(value: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    def hook(activation: torch.Tensor, hook=None) -> torch.Tensor:
        return value(activation).to(activation.device, activation.dtype)

    return hook


def splice_hooks(sae: SparseAutoencoder) -> list[Hook]:
    """fwd_hooks that replace hook_point_out by sae.reconstruct(activation at hook_point_in)."""
    cfg = sae.cfg
    device = sae.W_dec.device

    def reconstruct(activation: torch.Tensor) -> torch.Tensor:
        flat = activation.reshape(-1, cfg.d_model).to(device)  # heads (attn.hook_z) flatten as in the store
        return sae.reconstruct(flat)

    if not cfg.is_transcoder:
        return [(cfg.hook_point_out, replace_with(lambda act: reconstruct(act).reshape(act.shape)))]
    captured: dict[str, torch.Tensor] = {}

    def capture(activation: torch.Tensor, hook=None) -> None:
        captured["in"] = activation

    def predict(activation: torch.Tensor) -> torch.Tensor:
        if "in" not in captured:
            raise ValueError(f"transcoder input {cfg.hook_point_in!r} does not run before its output {cfg.hook_point_out!r}")
        return reconstruct(captured.pop("in")).reshape(activation.shape)

    return [(cfg.hook_point_in, capture), (cfg.hook_point_out, replace_with(predict))]


def ablation_hooks(hook_point: str, mean: torch.Tensor | None) -> list[Hook]:
    """Zero ablation (mean None) or mean ablation with the hook's dataset mean (d,)."""
    if mean is None:
        return [(hook_point, replace_with(torch.zeros_like))]
    # the store flattens heads, so the mean is (B, T)-broadcast and reshaped like the activation
    return [(hook_point, replace_with(lambda act: mean.to(act).expand(*act.shape[:2], -1).reshape(act.shape)))]


class _Sums:
    """Float64 sums of CE (and KL) over counted predictions."""

    def __init__(self):
        self.ce = 0.0
        self.kl = 0.0

    def add(self, losses: torch.Tensor, mask: torch.Tensor, kl: torch.Tensor | None = None) -> None:
        self.ce += float(losses[mask].double().sum())
        if kl is not None:
            self.kl += float(kl[mask].double().sum())


@torch.inference_mode()
def lm_metrics(
    lm: LanguageModel,
    sequences: EvalSequences,
    saes: dict[str, SparseAutoencoder],
    hook_means: dict[str, torch.Tensor],
    batch_size: int,
) -> dict[str, dict]:
    """{variant: metrics} for every SAE; hook_means holds the dataset mean of each hook_point_out."""
    out_hooks = sorted({sae.cfg.hook_point_out for sae in saes.values()})
    clean = _Sums()
    ablated = {(hook, kind): _Sums() for hook in out_hooks for kind in ("zero", "mean")}
    spliced = {name: _Sums() for name in saes}
    loss_mask = sequences.loss_mask
    for start in tqdm(range(0, len(sequences), batch_size), unit="batch", desc="evaluate LM splice", dynamic_ncols=True):
        tokens = sequences.tokens[start : start + batch_size].to(lm.device)
        mask = loss_mask[start : start + batch_size].to(lm.device)
        clean_losses, clean_log_probs = next_token_losses(_logits(lm, tokens, []), tokens)
        clean.add(clean_losses, mask)
        for hook in out_hooks:
            for kind, mean in (("zero", None), ("mean", hook_means[hook])):
                losses, _ = next_token_losses(_logits(lm, tokens, ablation_hooks(hook, mean)), tokens)
                ablated[hook, kind].add(losses, mask)
        for name, sae in saes.items():
            losses, log_probs = next_token_losses(_logits(lm, tokens, splice_hooks(sae)), tokens)
            spliced[name].add(losses, mask, kl_per_token(clean_log_probs, log_probs))
            del log_probs
    counted = int(loss_mask.sum())
    results = {}
    for name, sae in saes.items():
        hook = sae.cfg.hook_point_out
        results[name] = summarize(
            clean.ce / counted, spliced[name].ce / counted, ablated[hook, "zero"].ce / counted,
            ablated[hook, "mean"].ce / counted, spliced[name].kl / counted,
        ) | {"lm_eval_tokens": counted, "lm_eval_sequences": len(sequences), "lm_eval_source": sequences.source}
    return results


def summarize(ce_clean: float, ce_sae: float, ce_zero: float, ce_mean: float, kl: float) -> dict[str, float | None]:
    return {
        "ce_loss_clean": ce_clean,
        "ce_loss_spliced": ce_sae,
        "ce_loss_zero_ablation": ce_zero,
        "ce_loss_mean_ablation": ce_mean,
        "ce_loss_recovered": _ratio(ce_zero - ce_sae, ce_zero - ce_clean),
        "ce_loss_recovered_vs_mean_ablation": _ratio(ce_mean - ce_sae, ce_mean - ce_clean),
        "delta_lm_loss": ce_sae - ce_clean,
        "kl_divergence": kl,
    }


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator != 0 else None


def _logits(lm: LanguageModel, tokens: torch.Tensor, hooks: list[Hook]) -> torch.Tensor:
    if not hooks:
        return lm.model(tokens, return_type="logits")
    return lm.model.run_with_hooks(tokens, return_type="logits", fwd_hooks=hooks)
