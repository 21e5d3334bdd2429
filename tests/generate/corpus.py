"""The local corpus and generate configs the stage-1 tests share (fixtures: conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.config import validate_config

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
RANDOM_MODEL = {"n_layers": 2, "d_model": 64, "n_heads": 4, "n_ctx": 256, "seed": 0}  # as configs/tiny.yaml
WORDS = (
    "the model reads text and writes activation rows into chunks of a store while a thread commits "
    "each chunk with checksums statistics and a cursor so that a crash loses nothing committed"
).split()
RARE_DOC, RARE_WORD = 30, "zebra"  # one word in one document: poisoned to make NaN activations


def write_corpus(path: Path) -> Path:
    """200 documents of 3..120 words; every 7th is long enough to span several windows."""
    rng = np.random.default_rng(0)
    with path.open("w") as f:
        for i in range(200):
            n = int(rng.integers(60, 120)) if i % 7 == 0 else int(rng.integers(3, 40))
            words = [WORDS[j] for j in rng.integers(0, len(WORDS), n)]
            if i == RARE_DOC:
                words.insert(n // 2, RARE_WORD)
            f.write(json.dumps({"text": " ".join(words)}) + "\n")
    return path


def config_dict(store: Path, corpus: Path, **generate) -> dict:
    return {
        "model": {"name": "random", "random": RANDOM_MODEL},
        "dataset": {"source": str(corpus)},
        "generate": {
            "store": str(store),
            "hook_points": HOOKS,
            "context_size": 32,
            "batch_size": 4,
            "target_tokens": 3000,
            "chunk_rows": 64,
            **generate,
        },
        "sae": {"hook_point_in": HOOKS[0], "hook_point_out": HOOKS[0], "d_model": 64, "expansion_factor": 2, "top_k": 4},
    }


def make_config(store: Path, corpus: Path, **generate):
    return validate_config(config_dict(store, corpus, **generate))
