"""SAEs spliced into a language model's forward pass, and the language-model metrics of evaluate.

The splice (the one implementation; public as pipeline.spliced / pipeline.run_with_latents):
`with spliced(model, {hook: sae}): model(tokens)` runs a TransformerLens model (HookedTransformer
or TransformerBridge, or our LanguageModel) with each hook's activation replaced by its SAE's
reconstruction of the raw activation (heads of attn.hook_z flattened as the store does).
keep_error=True adds the SAE's error term (x - x_hat) back, so the hook passes on x itself, bit
for bit, while gradients reach the latents through x_hat: the model's output is unchanged and
the latents can be read (Splice.latents) or attributed.

Special tokens. By default (exclude_special_tokens=True, SAELens' default too) positions holding
a BOS, EOS or pad token keep their clean activation and their latents are 0: the SAE is not
applied there. Generate drops BOS and pad rows by default, so the SAE never trained on them (BOS
activations are often huge outliers), and CE recovered then compares with SAELens', which
excludes EOS too. The token
ids come from the tokens the model's embedding reads (special_token_ids says which count);
False splices every position; a collection of ids chooses them.

Per batch of held-out sequences the model runs clean once, once per distinct target hook with
that hook zero-ablated and mean-ablated (the dataset mean from the store), and once per SAE with
the hook's activation replaced by the SAE's reconstruction. Ablations replace every position,
special ones included, as SAELens' do (so a zero SAE, which leaves special positions clean,
recovers exactly 0 only with exclude_special_tokens=False); the loss mask only decides which
predictions count.

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

from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.evaluate.sequences import EvalSequences
from pipeline.generate.lm import LanguageModel
from pipeline.sae.model import SparseAutoencoder

Hook = tuple[str, Callable]
# Tokenizer attributes of the ids a bare TransformerLens model's special tokens have (SAELens'
# get_special_token_ids, plus [CLS]); our LanguageModel knows its own bos/eos/pad ids.
SPECIAL_TOKEN_ATTRS = ("bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "cls_token_id", "decoder_start_token_id")


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


class Splice:
    """The fwd_hooks of SAEs spliced at their hooks; `latents` holds each SAE's latents of the
    last forward pass, {hook: (batch, seq, d_sae)}. skip_ids: token ids whose positions keep
    their clean activation (empty: none)."""

    def __init__(self, saes: dict[str, SparseAutoencoder], keep_error: bool, skip_ids: frozenset[int] = frozenset()):
        self.saes, self.keep_error, self.skip_ids = saes, keep_error, skip_ids
        self.tokens: torch.Tensor | None = None  # (batch, seq) ids of the running forward pass
        self._inputs: dict[str, torch.Tensor] = {}  # a transcoder's input, captured upstream
        self._outputs: dict[str, tuple] = {}  # hook -> (SAEOutput, leading shape, skipped rows or None)

    @property
    def latents(self) -> dict[str, torch.Tensor]:
        # dense only when asked for: evaluate's CE runs never pay for a (tokens, d_sae) tensor
        latents = {}
        for hook, (out, shape, skipped) in self._outputs.items():
            dense = out.dense_feature_acts()
            if skipped is not None:  # the SAE was not applied there
                dense = dense.masked_fill(skipped[:, None], 0)
            latents[hook] = dense.reshape(*shape, -1)
        return latents

    def capture_tokens(self, module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook of the model's embedding: the token ids of this forward pass."""
        tokens = args[0] if args else kwargs.get("input_ids", kwargs.get("tokens"))
        self.tokens = tokens if isinstance(tokens, torch.Tensor) and not tokens.is_floating_point() else None

    def fwd_hooks(self) -> list[Hook]:
        hooks = []
        for hook, sae in self.saes.items():
            if sae.cfg.is_transcoder:  # added first: it reads the activation before any SAE replaces it
                hooks.insert(0, (sae.cfg.hook_point_in, self._capture(hook)))
            hooks.append((hook, self._replace(hook, sae)))
        return hooks

    def _capture(self, key: str) -> Callable:
        def capture(activation: torch.Tensor, hook=None) -> None:
            self._inputs[key] = activation

        return capture

    def _skipped(self, activation: torch.Tensor) -> torch.Tensor | None:
        """(batch, seq) bool: the positions of special tokens, None when nothing is skipped."""
        if not self.skip_ids:
            return None
        if self.tokens is None or tuple(self.tokens.shape) != tuple(activation.shape[:2]):
            raise ValueError("exclude_special_tokens needs the token ids the model's embedding reads (this forward pass "
                             "started from something else); splice with exclude_special_tokens=False")
        ids = torch.tensor(sorted(self.skip_ids), device=self.tokens.device)
        return torch.isin(self.tokens, ids).to(activation.device)

    def _replace(self, key: str, sae: SparseAutoencoder) -> Callable:
        cfg = sae.cfg

        def replace(activation: torch.Tensor, hook=None) -> torch.Tensor:
            source = activation
            if cfg.is_transcoder:
                if key not in self._inputs:
                    raise ValueError(f"transcoder input {cfg.hook_point_in!r} does not run before its output {cfg.hook_point_out!r}")
                source = self._inputs.pop(key)
            skipped = self._skipped(activation)
            flat = source.reshape(-1, cfg.d_model).to(sae.W_dec.device)  # heads (attn.hook_z) flatten as in the store
            x_hat, out = sae(sae.normalize_input(flat))
            self._outputs[key] = (out, source.shape[:2], None if skipped is None else skipped.reshape(-1).to(flat.device))
            x_hat = sae.denormalize_output(x_hat, flat).reshape(activation.shape).to(activation.device)
            if skipped is not None:  # special positions pass on their clean activation
                x_hat = torch.where(skipped.view(*skipped.shape, *[1] * (activation.dim() - 2)), activation, x_hat)
            if self.keep_error:  # value: x exactly; gradient: through x_hat, as x_hat + (x - x_hat).detach()
                return (activation.detach() + (x_hat - x_hat.detach())).to(activation.dtype)
            return x_hat.to(activation.dtype)

        return replace


def special_token_ids(model: Any) -> frozenset[int]:
    """BOS/EOS/pad ids of `model`: our LanguageModel's own, else its tokenizer's (SPECIAL_TOKEN_ATTRS)."""
    if isinstance(model, LanguageModel):
        ids = (model.bos_id, model.eos_id, model.pad_id)
    else:
        tokenizer = getattr(model, "tokenizer", None)
        ids = tuple(getattr(tokenizer, attr, None) for attr in SPECIAL_TOKEN_ATTRS)
    return frozenset(int(i) for i in ids if isinstance(i, int))


def _hooked_model(model: Any) -> Any:
    """The TransformerLens model inside our LanguageModel, or the model itself."""
    return model.model if isinstance(model, LanguageModel) else model


def _by_hook(saes: Mapping[str, SparseAutoencoder] | SparseAutoencoder, model: Any) -> dict[str, SparseAutoencoder]:
    """{hook it replaces: SAE}, checked: a transcoder is keyed by the hook it writes."""
    if isinstance(saes, SparseAutoencoder):
        saes = {saes.cfg.hook_point_out: saes}
    hook_dict = getattr(model, "hook_dict", None)
    for hook, sae in saes.items():
        cfg = sae.cfg
        if hook != cfg.hook_point_out:
            raise ValueError(f"an SAE keyed {hook!r} replaces {cfg.hook_point_out!r} (reading {cfg.hook_point_in!r}); "
                             f"key it by {cfg.hook_point_out!r}")
        for name in {cfg.hook_point_in, cfg.hook_point_out}:
            if hook_dict is not None and name not in hook_dict:
                raise ValueError(f"the model has no hook {name!r}; the SAE was trained on another model or hook")
    return dict(saes)


@contextmanager
def spliced(model: Any, saes: Mapping[str, SparseAutoencoder] | SparseAutoencoder, *, keep_error: bool = False,
            exclude_special_tokens: bool | Collection[int] = True) -> Iterator[Splice]:
    """Inside the block, `model` runs with each SAE replacing its hook's activation (see the
    module docstring); yields the Splice, whose `latents` are those of the last forward pass.
    saes: {hook: SAE} (a transcoder keyed by its hook_point_out) or one SAE. exclude_special_tokens:
    True keeps the clean activation at BOS/EOS/pad positions (special_token_ids), False splices
    every position, a collection of token ids keeps those."""
    hooked = _hooked_model(model)
    if exclude_special_tokens is True:
        skip_ids = special_token_ids(model)
    else:
        skip_ids = frozenset(int(i) for i in exclude_special_tokens) if exclude_special_tokens else frozenset()
    splice = Splice(_by_hook(saes, hooked), keep_error, skip_ids)
    embed = getattr(hooked, "embed", None)
    if skip_ids and not isinstance(embed, torch.nn.Module):
        raise ValueError(f"{type(hooked).__name__} has no `embed` module to read the token ids from; "
                         "splice with exclude_special_tokens=False")
    capture = embed.register_forward_pre_hook(splice.capture_tokens, with_kwargs=True) if skip_ids else None
    try:
        with hooked.hooks(fwd_hooks=splice.fwd_hooks()):
            yield splice
    finally:
        if capture is not None:
            capture.remove()


@torch.no_grad()
def run_with_latents(model: Any, saes: Mapping[str, SparseAutoencoder] | SparseAutoencoder, tokens: torch.Tensor | str | list[str],
                     *, keep_error: bool = True, exclude_special_tokens: bool | Collection[int] = True,
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(logits, {hook: latents (batch, seq, d_sae)}) of `tokens` ((batch, seq) ids, or text,
    tokenized by the model's to_tokens, BOS first). keep_error (the default) leaves the logits
    those of the clean model; False gives the spliced model's. Latents are 0 at special-token
    positions, where the SAE is not applied, unless exclude_special_tokens=False (see spliced)."""
    hooked = _hooked_model(model)
    if isinstance(tokens, (str, list)):
        tokens = hooked.to_tokens(tokens)
    with spliced(model, saes, keep_error=keep_error, exclude_special_tokens=exclude_special_tokens) as splice:
        logits = hooked(tokens, return_type="logits")
        return logits, splice.latents


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
    exclude_special_tokens: bool = True,
) -> dict[str, dict]:
    """{variant: metrics} for every SAE; hook_means holds the dataset mean of each hook_point_out;
    exclude_special_tokens: keep clean activations at BOS/EOS/pad positions (see spliced)."""
    out_hooks = sorted({sae.cfg.hook_point_out for sae in saes.values()})
    clean = _Sums()
    ablated = {(hook, kind): _Sums() for hook in out_hooks for kind in ("zero", "mean")}
    with_sae = {name: _Sums() for name in saes}
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
            with spliced(lm, sae, exclude_special_tokens=exclude_special_tokens):
                losses, log_probs = next_token_losses(_logits(lm, tokens, []), tokens)
            with_sae[name].add(losses, mask, kl_per_token(clean_log_probs, log_probs))
            del log_probs
    counted = int(loss_mask.sum())
    results = {}
    for name, sae in saes.items():
        hook = sae.cfg.hook_point_out
        results[name] = summarize(
            clean.ce / counted, with_sae[name].ce / counted, ablated[hook, "zero"].ce / counted,
            ablated[hook, "mean"].ce / counted, with_sae[name].kl / counted,
        ) | {"lm_eval_tokens": counted, "lm_eval_sequences": len(sequences), "lm_eval_source": sequences.source,
             "lm_eval_exclude_special_tokens": exclude_special_tokens}
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
