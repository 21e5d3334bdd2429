"""Pretokenized datasets (dataset.token_field): a column of token id lists stands in for text, and
the store it makes is the text path's, byte for byte."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import validate_config
from pipeline.generate.stage import generate
from pipeline.generate.lm import ModelLoadError
from pipeline.generate.text import DatasetError, describe_dataset, iter_documents
from store.format import read_manifest
from store.validate import compare_stores
from tests.generate.corpus import config_dict, make_config


def token_table(corpus: Path, lm) -> pa.Table:
    """The corpus tokenized by the model's tokenizer, without special tokens (as the text path does)."""
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    return pa.table({"input_ids": pa.array(lm.tokenizer(texts, add_special_tokens=False)["input_ids"], pa.list_(pa.int32()))})


def pretokenized_config(store: Path, source: Path, **dataset):
    data = config_dict(store, source)
    data["dataset"].update(token_field="input_ids", **dataset)
    return validate_config(data)


@pytest.mark.parametrize("suffix", [".parquet", ".arrow"])
def test_a_pretokenized_dataset_makes_the_text_path_store(tmp_path, corpus, lm, reference, suffix):
    source = tmp_path / f"tokens{suffix}"
    table = token_table(corpus, lm)
    if suffix == ".parquet":
        pq.write_table(table, source)
    else:  # datasets' own Arrow stream format
        with pa.OSFile(str(source), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    store = tmp_path / "store.zarr"
    generate(pretokenized_config(store, source), lm=lm)
    # Same windows, packing, BOS/EOS and batches: tokens, doc, pos, activations, checksums and
    # statistics equal the text store's; only the dataset's description differs.
    assert compare_stores(reference, store, ignore=("created", "updated", "dataset", "config")) == []
    dataset = read_manifest(store)["dataset"]
    assert dataset["token_field"] == "input_ids" and dataset["n_docs"] == 200
    assert dataset["fingerprint"] != read_manifest(reference)["dataset"]["fingerprint"]


def test_empty_and_null_id_lists_are_skipped_like_blank_texts(tmp_path):
    source = tmp_path / "ids.jsonl"
    rows = [{"ids": [5, 6]}, {"ids": []}, {"ids": None}, {"ids": [7]}]
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cfg = pretokenized_config(tmp_path / "s.zarr", source).dataset.model_copy(update={"token_field": "ids"})
    assert list(iter_documents(cfg)) == [[5, 6], [7]]
    assert list(iter_documents(cfg, start=1)) == [[7]]
    assert describe_dataset(cfg)["n_docs"] == 2


def test_ids_outside_the_models_vocabulary_are_one_error_line(tmp_path, lm):
    source = tmp_path / "ids.parquet"
    pq.write_table(pa.table({"input_ids": [[101, 2000], [5, lm.d_vocab + 3]]}), source)
    with pytest.raises(ModelLoadError, match=rf"token id {lm.d_vocab + 3} of the pretokenized dataset is outside "
                                              rf"random's vocabulary \(0..{lm.d_vocab - 1}\); tokenize the dataset"):
        generate(pretokenized_config(tmp_path / "s.zarr", source), lm=lm)
    assert not (tmp_path / "s.zarr").exists()  # refused before a store was made


def test_a_column_of_other_values_is_refused(tmp_path):
    source = tmp_path / "mixed.jsonl"
    source.write_text(json.dumps({"input_ids": [1.5, 2.0], "text": "words"}) + "\n")
    cfg = pretokenized_config(tmp_path / "s.zarr", source).dataset
    with pytest.raises(DatasetError, match="holds lists of non-integers, not lists of token ids; set dataset.token_field"):
        list(iter_documents(cfg))
    with pytest.raises(DatasetError, match="holds str, not lists of token ids"):
        list(iter_documents(cfg.model_copy(update={"token_field": "text"})))
    with pytest.raises(DatasetError, match="has no field 'ids' .*set dataset.token_field to the token ids column"):
        list(iter_documents(cfg.model_copy(update={"token_field": "ids"})))


def test_a_token_column_read_as_text_points_at_token_field(tmp_path, corpus):
    source = tmp_path / "ids.jsonl"
    source.write_text(json.dumps({"text": [1, 2, 3]}) + "\n")
    with pytest.raises(DatasetError, match="holds list values, not text; .*for token ids set dataset.token_field: text"):
        list(iter_documents(make_config(tmp_path / "s.zarr", source).dataset))


def test_the_docstring_corpus_takes_no_token_field(tmp_path, corpus):
    cfg = make_config(tmp_path / "s.zarr", corpus).dataset.model_copy(update={"source": "python-docstrings",
                                                                              "token_field": "ids"})
    with pytest.raises(DatasetError, match="python-docstrings is text, not token ids; remove dataset.token_field"):
        list(iter_documents(cfg))
