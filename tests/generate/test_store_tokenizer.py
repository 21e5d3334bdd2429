"""A store decodes its tokens with its own tokenizer/ folder: `saeflow inspect` of a copied store
prints its text after the model (and with it the tokenizer) it was made with is gone."""

from __future__ import annotations

import json
import shutil

from pipeline.config import RandomModelConfig
from pipeline.generate.random_lm import random_model_dir
from pipeline.generate.stage import generate
from store.inspect import SAMPLE_CHARS
from tests.generate.corpus import RANDOM_MODEL, make_config
from tests.test_cli import invoke_saeflow


def test_a_copied_store_decodes_its_text_after_its_model_is_gone(tmp_path, corpus):
    model = tmp_path / "model"  # a local HF model folder: the only source of the tokenizer's files
    shutil.copytree(random_model_dir(RandomModelConfig(**RANDOM_MODEL)), model)
    cfg = make_config(tmp_path / "store.zarr", corpus, target_tokens=128)
    generate(cfg.model_copy(update={"model": cfg.model.model_copy(update={"name": str(model)})}))
    shutil.rmtree(model)
    copy = tmp_path / "elsewhere" / "store.zarr"
    shutil.move(tmp_path / "store.zarr", copy)

    result = invoke_saeflow("inspect", str(copy))
    assert result.exit_code == 0, result.output
    first = json.loads(corpus.read_text().splitlines()[0])["text"]
    line = next(line for line in result.output.splitlines() if line.startswith("text "))
    # the corpus is lowercase words, which decode exactly; document 0 is long enough to be cut
    assert len(first) > SAMPLE_CHARS and line == f"text       document 0: {first[:SAMPLE_CHARS] + '...'!r}"


def test_a_store_without_its_tokenizer_says_so(tmp_path, reference):
    copy = tmp_path / "store.zarr"
    shutil.copytree(reference, copy)
    shutil.rmtree(copy / "tokenizer")
    result = invoke_saeflow("inspect", str(copy))
    assert result.exit_code == 0
    assert "text       not decodable: the store has no tokenizer/ folder" in result.output
