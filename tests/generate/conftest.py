"""Fixtures of the stage-1 tests, built once for the package: the corpus, the random model and
an uninterrupted reference store."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.config import ModelConfig
from pipeline.generate.lm import load_language_model
from pipeline.generate.stage import generate
from tests.generate.corpus import RANDOM_MODEL, make_config, write_corpus


@pytest.fixture(scope="package")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "docs.jsonl")


@pytest.fixture(scope="package", autouse=True)
def datasets_cache(tmp_path_factory):
    previous = os.environ.get("HF_DATASETS_CACHE")
    os.environ["HF_DATASETS_CACHE"] = str(tmp_path_factory.mktemp("hf-datasets"))
    yield
    if previous is None:
        os.environ.pop("HF_DATASETS_CACHE")
    else:
        os.environ["HF_DATASETS_CACHE"] = previous


@pytest.fixture(scope="package")
def lm():
    return load_language_model(ModelConfig(name="random", random=RANDOM_MODEL))


@pytest.fixture(scope="package")
def reference(tmp_path_factory, corpus, lm) -> Path:
    """An uninterrupted run of the base config."""
    store = tmp_path_factory.mktemp("reference") / "store.zarr"
    result = generate(make_config(store, corpus), lm=lm)
    assert (result.n_rows, result.rows_written, result.resumed) == (3000, 3000, False)
    return store
